package repo

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// ManifestVersion is the newest manifest schema this vmshadow reads.
// SaveManifest writes the oldest version that can express a manifest:
// 1, or 2 when it has Files (a vmshadow that reads only version 1 would
// not know their chunks are in use, so it must refuse such a manifest, and
// gc with it).
const ManifestVersion = 2

// Files describing a VM, stored with its backups (Manifest.Files).
const (
	// FileDomainXML is a libvirt domain's persistent definition.
	FileDomainXML = "domain.xml"
	// FileNVRAM is the VM's UEFI variable store.
	FileNVRAM = "nvram"
	// FileCheckpointXML is the definition of the libvirt checkpoint the
	// backup created, kept to redefine it when libvirt loses it.
	FileCheckpointXML = "checkpoint.xml"
	// FileTPMPrefix starts the names of the files of the VM's emulated
	// TPM state ("tpm-" + the file's name in swtpm's state directory).
	FileTPMPrefix = "tpm-"
)

// DefinitionLibvirt is Manifest.Definition of a backup that stores a
// libvirt domain's definition (FileDomainXML, and FileNVRAM and TPM state
// files where the domain has them).
const DefinitionLibvirt = "libvirt"

// MaxFileSize bounds a file stored in Manifest.Files: they are read into
// memory whole.
const MaxFileSize = 64 << 20

// Manifest describes one backup: a backup exists once its manifest is
// stored, and it is written last, after every chunk and index it names.
// Stored as JSON, sealed as a "vsMF" blob whose name is the backup ID.
type Manifest struct {
	Version int       `json:"version"`
	VM      string    `json:"vm"`
	Time    time.Time `json:"time"` // the snapshot instant (start of an image backup)
	Host    string    `json:"host,omitempty"`
	Tags    []string  `json:"tags,omitempty"`
	// Source is where the data came from: "image" (a disk image file),
	// "qemu" or "xapi" (a running VM's shadow copies).
	Source string `json:"source"`
	// Mode is "full" (every allocated extent read) or "incremental" (only
	// changed extents read, the rest taken from the previous backup's index).
	Mode string `json:"mode"`
	// Reason says why a full read was done when an incremental was possible
	// in principle (first backup, bitmap missing, disk resized, --full...).
	Reason string `json:"reason,omitempty"`
	// Consistency is the snapshot set's level: crash, filesystem, application.
	Consistency string         `json:"consistency,omitempty"`
	SetID       string         `json:"set_id,omitempty"`
	DurationS   float64        `json:"duration_s"`
	Disks       []ManifestDisk `json:"disks"`
	Stats       Stats          `json:"stats"`
	// Group names the consistency group whose snapshot set this backup
	// is a member of (a group backup, see Group); empty otherwise. The
	// backup is an ordinary one in every other way.
	Group string `json:"group,omitempty"`
	// Origin is set on a backup copied from another repository (vmshadow
	// copy): the ID of the original backup in the repository it was first
	// stored in (a copy of a copy keeps the first origin). A backup and
	// its copies share one identity, Identity(), which copy compares to
	// skip what the target already holds. A copy carries no checkpoints
	// and never continues a live backup's chain (LatestBackup skips it).
	Origin string `json:"origin,omitempty"`
	// Files are what describes the VM besides its disks (its definition,
	// firmware variables, TPM state, the checkpoint the backup created):
	// small files, stored like disks (chunks and an index each), so that
	// verify, gc and copy treat them as they treat disks. Restores of
	// disks do not see them.
	Files []ManifestDisk `json:"files,omitempty"`
	// Definition says which kind of VM definition Files hold, "libvirt"
	// (DefinitionLibvirt); empty when the backup has none.
	Definition string `json:"definition,omitempty"`
	// Nonce makes two otherwise identical manifests distinct backups.
	Nonce string `json:"nonce"`
}

// ManifestDisk is one disk of a backup.
type ManifestDisk struct {
	Name      string `json:"name"`
	Size      int64  `json:"size"`
	ChunkSize int64  `json:"chunk_size"`
	Index     string `json:"index"` // index blob ID
	// Checkpoint names the dirty bitmap started at this backup's snapshot
	// instant; the next incremental reads what it marks. Empty for images.
	Checkpoint string `json:"checkpoint,omitempty"`
	Stats      Stats  `json:"stats"`
}

// Stats counts what a backup read and stored.
type Stats struct {
	BytesRead    int64 `json:"bytes_read"`    // bytes read from the source
	BytesNew     int64 `json:"bytes_new"`     // bytes stored for new chunks (after compression and encryption)
	ChunksNew    int64 `json:"chunks_new"`    // chunks stored by this backup
	ChunksReused int64 `json:"chunks_reused"` // non-zero chunks already in the repository
	ChunksZero   int64 `json:"chunks_zero"`   // all-zero chunks (not stored)
}

// Add adds o to s.
func (s *Stats) Add(o Stats) {
	s.BytesRead += o.BytesRead
	s.BytesNew += o.BytesNew
	s.ChunksNew += o.ChunksNew
	s.ChunksReused += o.ChunksReused
	s.ChunksZero += o.ChunksZero
}

// ValidName checks a VM or disk name: 1-128 bytes of [A-Za-z0-9._-], not
// starting with '.' or '-', so it is safe as a file name when restoring.
func ValidName(what, s string) error {
	ok := s != "" && len(s) <= 128 && s[0] != '.' && s[0] != '-'
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("._-", c)) {
			ok = false
		}
	}
	if !ok {
		return fmt.Errorf("invalid %s name %q: use 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-': %w", what, s, errs.ErrUsage)
	}
	return nil
}

// Check validates a manifest's contents.
func (m *Manifest) Check() error {
	if m.Version > ManifestVersion {
		return fmt.Errorf("manifest version %d is newer than this vmshadow supports (%d): upgrade vmshadow: %w", m.Version, ManifestVersion, errs.ErrUnsupported)
	}
	if m.Version < 1 {
		return fmt.Errorf("manifest has invalid version %d: %w", m.Version, errs.ErrCorrupt)
	}
	if err := ValidName("VM", m.VM); err != nil {
		return fmt.Errorf("manifest: %v: %w", err, errs.ErrCorrupt)
	}
	if m.Group != "" {
		if err := ValidName("group", m.Group); err != nil {
			return fmt.Errorf("manifest: %v: %w", err, errs.ErrCorrupt)
		}
	}
	if m.Origin != "" {
		if _, err := ParseID(m.Origin); err != nil {
			return fmt.Errorf("manifest has invalid origin %q: %w", m.Origin, errs.ErrCorrupt)
		}
	}
	if len(m.Disks) == 0 {
		return fmt.Errorf("manifest lists no disks: %w", errs.ErrCorrupt)
	}
	if len(m.Files) > 0 && m.Version < 2 {
		return fmt.Errorf("manifest version %d cannot list files: %w", m.Version, errs.ErrCorrupt)
	}
	for _, list := range []struct {
		what  string
		disks []ManifestDisk
		max   int64
	}{{"disk", m.Disks, -1}, {"file", m.Files, MaxFileSize}} {
		seen := map[string]bool{}
		for _, d := range list.disks {
			if err := ValidName(list.what, d.Name); err != nil {
				return fmt.Errorf("manifest: %v: %w", err, errs.ErrCorrupt)
			}
			if seen[d.Name] {
				return fmt.Errorf("manifest lists %s %q twice: %w", list.what, d.Name, errs.ErrCorrupt)
			}
			seen[d.Name] = true
			if d.Size < 0 || list.max >= 0 && d.Size > list.max || d.ChunkSize < MinChunkSize || d.ChunkSize > MaxChunkSize {
				return fmt.Errorf("manifest %s %q has invalid size %d or chunk size %d: %w", list.what, d.Name, d.Size, d.ChunkSize, errs.ErrCorrupt)
			}
			if _, err := ParseID(d.Index); err != nil {
				return fmt.Errorf("manifest %s %q has invalid index id: %w", list.what, d.Name, errs.ErrCorrupt)
			}
		}
	}
	if m.Definition == DefinitionLibvirt && m.File(FileDomainXML) == nil {
		return fmt.Errorf("manifest says it has a libvirt definition but lists no %s: %w", FileDomainXML, errs.ErrCorrupt)
	}
	return nil
}

// File returns the named file of Files, or nil.
func (m *Manifest) File(name string) *ManifestDisk {
	for i := range m.Files {
		if m.Files[i].Name == name {
			return &m.Files[i]
		}
	}
	return nil
}

// Indexed returns every entry of the backup that has an index, its disks
// then its files: what verify checks, gc keeps and copy copies.
func (m *Manifest) Indexed() []ManifestDisk {
	return append(slices.Clip(m.Disks), m.Files...)
}

// DecodeManifest parses and checks manifest plaintext.
func DecodeManifest(b []byte) (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("manifest is not valid JSON (%v): %w", err, errs.ErrCorrupt)
	}
	if err := m.Check(); err != nil {
		return nil, err
	}
	return &m, nil
}

// Disk returns the named disk, or nil.
func (m *Manifest) Disk(name string) *ManifestDisk {
	for i := range m.Disks {
		if m.Disks[i].Name == name {
			return &m.Disks[i]
		}
	}
	return nil
}
