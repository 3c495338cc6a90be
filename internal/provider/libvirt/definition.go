package libvirt

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// DomainXML returns the domain's definition for storage with a backup:
// with inactive, the persistent configuration (what a restore defines;
// virDomainGetXMLDesc with VIR_DOMAIN_XML_INACTIVE), else the running one.
// VIR_DOMAIN_XML_SECURE is never asked for: passwords (VNC/SPICE) are left
// out, so none ends up in a repository or a log.
func (p *Provider) DomainXML(ctx context.Context, inactive bool) (string, error) {
	l, dom := p.l, p.dom
	if l == nil {
		return "", fmt.Errorf("domain XML: call Identify first: %w", errs.ErrUsage)
	}
	var flags golibvirt.DomainXMLFlags
	if inactive {
		flags |= golibvirt.DomainXMLInactive
	}
	x, err := call(ctx, func() (string, error) { return l.DomainGetXMLDesc(dom, flags) })
	if err != nil {
		return "", fmt.Errorf("domain %s: get XML: %w", dom.Name, classify(err))
	}
	return x, nil
}

// CheckpointXML returns a checkpoint's definition (virDomainCheckpointGetXMLDesc,
// with the domain definition it was taken with) for storage with the backup
// that created it. The change-tracking seam keeps it so that, when libvirt
// has lost the checkpoint's metadata (the domain was undefined and defined
// again, or moved host) while QEMU still holds its bitmaps, the next backup
// can put it back with RedefineCheckpoint instead of failing with "Bitmap
// already exists" or reading everything. A missing checkpoint gives
// errs.ErrNotFound.
func (p *Provider) CheckpointXML(ctx context.Context, name string) (string, error) {
	l, dom := p.l, p.dom
	if l == nil {
		return "", fmt.Errorf("checkpoint XML: call Identify first: %w", errs.ErrUsage)
	}
	cp, err := call(ctx, func() (golibvirt.DomainCheckpoint, error) { return l.DomainCheckpointLookupByName(dom, name, 0) })
	if err != nil {
		return "", fmt.Errorf("domain %s: checkpoint %s: %w", dom.Name, name, classify(err))
	}
	x, err := call(ctx, func() (string, error) { return l.DomainCheckpointGetXMLDesc(cp, 0) })
	if err != nil {
		return "", fmt.Errorf("domain %s: checkpoint %s: get XML: %w", dom.Name, name, classify(err))
	}
	return x, nil
}

// RedefineCheckpoint puts back a checkpoint's metadata from the XML that
// CheckpointXML returned (virDomainCheckpointCreateXML with REDEFINE and
// REDEFINE_VALIDATE: libvirt checks that every disk still has the
// checkpoint's bitmap). Redefine a chain parents first. A checkpoint whose
// bitmaps are gone fails with errs.ErrNotFound: the next backup must then
// read in full. The seam calls it in Prepare's place, before the set, when
// Checkpoint.Incremental is missing from Checkpoints.
func (p *Provider) RedefineCheckpoint(ctx context.Context, xml string) error {
	l, dom := p.l, p.dom
	if l == nil {
		return fmt.Errorf("redefine checkpoint: call Identify first: %w", errs.ErrUsage)
	}
	flags := uint32(golibvirt.DomainCheckpointCreateRedefine | golibvirt.DomainCheckpointCreateRedefineValidate)
	_, err := call(ctx, func() (golibvirt.DomainCheckpoint, error) { return l.DomainCheckpointCreateXML(dom, xml, flags) })
	if err != nil {
		if isCode(err, golibvirt.ErrCheckpointInconsistent) || isCode(err, golibvirt.ErrInvalidDomainCheckpoint) {
			return fmt.Errorf("domain %s: redefine checkpoint: the disks no longer hold its bitmaps: %v: %w", dom.Name, err, errs.ErrNotFound)
		}
		return fmt.Errorf("domain %s: redefine checkpoint: %w", dom.Name, classify(err))
	}
	return nil
}

// SWTPMStateDir is where a system libvirtd keeps an emulated TPM's state
// (swtpm), per domain UUID; the state is in tpm2/ (TPM 2.0) or tpm1.2/.
const SWTPMStateDir = "/var/lib/libvirt/swtpm"

const swtpmStateDir = SWTPMStateDir

// Describe implements livebackup.Describer: every backup of a domain
// stores its persistent definition (repo.FileDomainXML, without secrets:
// see DomainXML) and the definition of the checkpoint the set created
// (repo.FileCheckpointXML, for RedefineCheckpoint); and, over a local
// connection, the files libvirt keeps beside the definition: the UEFI
// variable store (<os><nvram>, repo.FileNVRAM) and an emulated TPM's state
// (repo.FileTPMPrefix + its file name). They are read from the host's
// file system while the domain runs, as QEMU and swtpm left them at that
// moment. Over a remote connection libvirt offers no way to read them:
// they are left out with a warning.
func (p *Provider) Describe(ctx context.Context, set *coord.Set) (string, []backup.Source, error) {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return "", nil, fmt.Errorf("describe: no state: %v", err)
	}
	x, err := p.DomainXML(ctx, true)
	if err != nil {
		return "", nil, err
	}
	files := []backup.Source{backup.Bytes(repo.FileDomainXML, []byte(x))}
	if st.Checkpoint != "" {
		cx, err := p.CheckpointXML(ctx, st.Checkpoint)
		if err != nil {
			return "", nil, err
		}
		files = append(files, backup.Bytes(repo.FileCheckpointXML, []byte(cx)))
	}
	def, err := parseDomainXML(x)
	if err != nil {
		return "", nil, err
	}
	var host []string // what only the host's file system has
	if def.OS.NVRAM != "" {
		host = append(host, "UEFI variables "+def.OS.NVRAM)
	}
	for _, t := range def.Devices.TPMs {
		if t.Backend.Type == "emulator" {
			host = append(host, "TPM state")
		}
	}
	if len(host) > 0 && !p.local() {
		p.warn("domain %s: %s not stored: libvirt cannot read them over a remote connection (back them up on the host)", p.dom.Name, strings.Join(host, ", "))
		return repo.DefinitionLibvirt, files, nil
	}
	if def.OS.NVRAM != "" {
		b, err := readSmall(def.OS.NVRAM)
		if err != nil {
			return "", nil, fmt.Errorf("domain %s: UEFI variables: %w", p.dom.Name, err)
		}
		files = append(files, backup.Bytes(repo.FileNVRAM, b))
	}
	for _, t := range def.Devices.TPMs {
		if t.Backend.Type != "emulator" {
			continue
		}
		sub := "tpm1.2"
		if t.Backend.Version == "" || t.Backend.Version == "2.0" {
			sub = "tpm2"
		}
		dir := filepath.Join(swtpmStateDir, def.UUID, sub)
		entries, err := os.ReadDir(dir)
		if err != nil {
			return "", nil, fmt.Errorf("domain %s: TPM state: %w", p.dom.Name, err)
		}
		for _, e := range entries {
			if !e.Type().IsRegular() || repo.ValidName("file", e.Name()) != nil || repo.ValidName("file", repo.FileTPMPrefix+e.Name()) != nil {
				continue // swtpm's lock file and temporaries are not state
			}
			b, err := readSmall(filepath.Join(dir, e.Name()))
			if err != nil {
				return "", nil, fmt.Errorf("domain %s: TPM state: %w", p.dom.Name, err)
			}
			files = append(files, backup.Bytes(repo.FileTPMPrefix+e.Name(), b))
		}
	}
	return repo.DefinitionLibvirt, files, nil
}

// readSmall reads a file of at most repo.MaxFileSize bytes.
func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, repo.MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(b) > repo.MaxFileSize {
		return nil, fmt.Errorf("%s is larger than %d bytes: %w", path, repo.MaxFileSize, errs.ErrUnsupported)
	}
	return b, nil
}
