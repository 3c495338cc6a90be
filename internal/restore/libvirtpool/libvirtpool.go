// Package libvirtpool is the restore target of a libvirt storage pool: each
// restored disk becomes a new volume of the pool, and a new domain is
// defined on them (optionally started); a failed restore deletes every
// volume, file and domain definition it created. Package restore selects
// the disks, loads and verifies their chunks and drives the Target.
//
// Volumes: qcow2 in pools of files (dir, fs, netfs, vstorage), raw in pools
// of block devices (logical, disk, iscsi, scsi, mpath, zfs); other pool
// types (rbd, gluster, iscsi-direct, ...) have no volume path on this host
// and are refused before anything is created. Each volume is created
// through libvirt's API (virStorageVolCreateXML, the disk's size) and then
// written through its path on this host (virStorageVolGetPath) with the
// writers a restore to files uses: the qcow2 writer (all-zero clusters
// stay unallocated) or the raw block-device writer (zero ranges zeroed
// explicitly); the pool is refreshed at the end. Memory stays bounded by
// the restore's chunk pipeline and the qcow2 writer's L2 cache whatever
// the disk size. Streaming through virStorageVolUpload instead would work
// over remote connections but sends every zero byte (go-libvirt has no
// sparse streams) and needs a seekable qcow2 producer; so a remote URI
// (qemu+ssh, qemu+tls, ...) is refused with errs.ErrUsage: run vmshadow on
// the libvirt host with a local URI.
//
// The domain: a backup that stores its libvirt definition (Options.Definition,
// the inactive domain XML) is restored from it, rewritten (domainxml.go): a
// new name, no UUID and no MAC addresses (libvirt makes new ones), a new VM
// generation ID, each restored disk's <source> on its new volume (type file
// or block, with the path, so that the restored domain can be backed up
// again), the driver type matching the volume. Disks of the definition that
// are not restored are left out (keeping them would share the old VM's
// writable disks), CD-ROM and floppy drives are kept empty, each with a
// warning. UEFI variables (Options.NVRAM) go into a new file next to the
// old <nvram> path, named NAME_VARS.fd; without them the domain starts with
// fresh variables from its template. An emulated TPM's state the backup
// stores (Options.TPMState) is put back before the domain is defined: the
// restore chooses the new UUID itself and writes the files where libvirt's
// swtpm looks for that UUID, laid out as libvirt 9.0 lays them out
// (tpm.go: /var/lib/libvirt/swtpm/UUID/tpm2 or tpm1.2, owned by qemu.conf's
// swtpm_user and swtpm_group, default tss); libvirt finds the state at the
// first start and runs no swtpm_setup, so the TPM keeps its keys, NV
// indexes and endorsement certificate. These are files on this host, which
// the local-URI rule above already requires. Without stored state (a
// backup taken before vmshadow stored it, or over a remote connection)
// the TPM starts empty, with a warning. A backup without a definition (QEMU,
// XenServer) gets a minimal one: type kvm when the host offers it, else
// qemu; BIOS boot; virtio disks vda, vdb, ... in backup order; a virtio NIC
// on the network 'default' when it exists and is active (else none); a
// serial console; Options.MemoryMB and VCPUs.
package libvirtpool

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmshadow/vmshadow/internal/errs"
	lv "github.com/vmshadow/vmshadow/internal/provider/libvirt"
	"github.com/vmshadow/vmshadow/internal/qcow2"
	"github.com/vmshadow/vmshadow/internal/redact"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// Defaults of the minimal definition.
const (
	DefaultMemoryMB = 1024
	DefaultVCPUs    = 1
)

// Options say where a backup's disks go in libvirt.
type Options struct {
	URI  string // local connection URI (default qemu:///system)
	Pool string // storage pool of the new volumes
	// VMName is the new domain's name; default the backup's VM name with
	// "-restored".
	VMName string
	// Definition is the domain XML the backup stores; nil builds a minimal
	// one.
	Definition []byte
	// NVRAM is the UEFI variable store the backup stores, nil if none.
	NVRAM []byte
	// TPMState is the emulated TPM's state the backup stores: swtpm's
	// files by name (tpm2-00.permall, ...), nil if none.
	TPMState map[string][]byte
	// MemoryMB and VCPUs size a minimal definition (default 1024 MiB, 1).
	MemoryMB, VCPUs int
	// Warn is told of what the restore leaves out or changes.
	Warn func(string)
}

// Volume is one restored disk.
type Volume struct {
	Disk   string `json:"name"`
	Volume string `json:"volume"`
	Path   string `json:"path"`
	Format string `json:"format"`
	Target string `json:"target"` // <target dev> in the new domain
}

// Result is what a restore into libvirt made.
type Result struct {
	Pool       string   `json:"pool"`
	Domain     string   `json:"domain"`
	UUID       string   `json:"uuid"`
	Definition string   `json:"definition"` // "stored" or "minimal"
	Volumes    []Volume `json:"volumes"`
	Started    bool     `json:"started"`
	// TPMState is the directory the stored TPM state was put back in, ""
	// if none.
	TPMState string `json:"tpm_state,omitempty"`
}

// Target implements restore.Target for a libvirt storage pool.
type Target struct {
	l     *golibvirt.Libvirt
	o     Options
	shown string // the URI as errors show it

	pool     golibvirt.StoragePool
	poolType string
	format   string // of the new volumes: qcow2 or raw
	names    map[string]string

	def   *node // the stored definition, nil for a minimal one
	info  definitionInfo
	nvram string   // the new domain's NVRAM file, "" if none
	tpm   *tpmPlan // where the stored TPM state goes, nil if none
	min   minimal

	created      []golibvirt.StorageVol
	disks        []newDisk
	vols         []Volume
	nvramCreated bool
	dom          *golibvirt.Domain
	uuid         string
	started      bool
}

// filePools hold volumes as files (qcow2); blockPools as block devices
// (raw). Other pool types have no local volume path.
var (
	filePools  = []string{"dir", "fs", "netfs", "vstorage"}
	blockPools = []string{"logical", "disk", "iscsi", "scsi", "mpath", "zfs"}
)

// New connects to libvirt and checks everything it can before a volume
// is created: the URI is local, the pool exists, is active and of a type
// with local volume paths, the domain name and the volume names are free,
// the stored definition parses and has every selected disk. m is the
// backup, sel the disks to restore (restore.Select). Restore into it with
// restore.Run, which ends it (Finish or Abort); then Start it if wanted and
// Close it. If Run is not called, call Abort and Close.
func New(ctx context.Context, m *repo.Manifest, sel []repo.ManifestDisk, o Options) (t *Target, err error) {
	if o.URI == "" {
		o.URI = lv.DefaultURI
	}
	if o.VMName == "" {
		o.VMName = m.VM + "-restored"
	}
	if o.MemoryMB == 0 {
		o.MemoryMB = DefaultMemoryMB
	}
	if o.VCPUs == 0 {
		o.VCPUs = DefaultVCPUs
	}
	shown := redact.URL(o.URI, "socket")
	if _, local, err := lv.ParseURI(o.URI); err != nil {
		return nil, err
	} else if !local {
		return nil, fmt.Errorf("--to-libvirt %s: a remote libvirt host: vmshadow writes the new volumes through their paths on the libvirt host, so run it there with a local URI (qemu:///system, or qemu+unix:///system?socket=PATH): %w", shown, errs.ErrUsage)
	}
	if o.Pool == "" {
		return nil, fmt.Errorf("no storage pool given: name the pool of the new volumes (--pool NAME; see 'virsh pool-list'): %w", errs.ErrUsage)
	}
	if err := checkName(o.VMName); err != nil {
		return nil, err
	}
	if len(sel) == 0 {
		return nil, fmt.Errorf("no disk to restore: %w", errs.ErrUsage)
	}
	t = &Target{o: o, shown: shown, names: map[string]string{}}
	if o.Definition != nil {
		if t.def, err = parseDefinition(o.Definition); err != nil {
			return nil, err
		}
		t.info = inspect(t.def)
		for _, d := range sel {
			if !slices.Contains(t.info.Targets, d.Name) {
				return nil, fmt.Errorf("stored domain definition has no disk with <target dev='%s'>, a disk of the backup: %w", d.Name, errs.ErrCorrupt)
			}
		}
		if t.info.NVRAM != "" {
			t.nvram = newNVRAMPath(t.info.NVRAM, o.VMName)
			if _, err := os.Lstat(t.nvram); err == nil {
				return nil, fmt.Errorf("the new domain's NVRAM file %s already exists: choose another --vm-name, or remove the file: %w", t.nvram, errs.ErrUsage)
			}
			if o.NVRAM == nil {
				t.warn("the backup holds no UEFI variables: the new domain starts with fresh ones from its firmware's template (boot entries are lost)")
			}
		} else if o.NVRAM != nil {
			t.warn("the stored definition names no NVRAM file: the backup's UEFI variables are not restored")
		}
	} else if o.NVRAM != nil {
		t.warn("the backup holds UEFI variables but no domain definition: they are not restored (the minimal definition boots BIOS)")
	}

	l, err := lv.Connect(ctx, o.URI)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			l.Disconnect()
		}
	}()
	t.l = l
	if err := t.findPool(ctx); err != nil {
		return nil, err
	}
	if _, err := lv.Call(ctx, func() (golibvirt.Domain, error) { return t.l.DomainLookupByName(o.VMName) }); err == nil {
		return nil, fmt.Errorf("libvirt at %s already has a domain %q: choose another name with --vm-name: %w", shown, o.VMName, errs.ErrUsage)
	} else if code(err) != golibvirt.ErrNoDomain {
		return nil, fmt.Errorf("look up domain %s: %w", o.VMName, lv.Classify(err))
	}
	for _, d := range sel {
		name := volumeName(o.VMName, d.Name, t.format)
		for _, other := range t.names {
			if other == name {
				return nil, fmt.Errorf("disks of the backup would share volume name %s: %w", name, errs.ErrUsage)
			}
		}
		t.names[d.Name] = name
		if _, err := lv.Call(ctx, func() (golibvirt.StorageVol, error) { return t.l.StorageVolLookupByName(t.pool, name) }); err == nil {
			return nil, fmt.Errorf("pool %s already has a volume %s: choose another --vm-name, or delete it (virsh vol-delete %s --pool %s): %w", o.Pool, name, name, o.Pool, errs.ErrUsage)
		} else if code(err) != golibvirt.ErrNoStorageVol {
			return nil, fmt.Errorf("pool %s: look up volume %s: %w", o.Pool, name, lv.Classify(err))
		}
	}
	if t.def == nil {
		if err := t.planMinimal(ctx); err != nil {
			return nil, err
		}
	} else if t.info.TPM && len(o.TPMState) > 0 {
		if err := t.planTPM(ctx); err != nil {
			return nil, err
		}
	} else if len(o.TPMState) > 0 {
		t.warn("the backup holds TPM state, but its stored definition has no emulated TPM: the state is not put back")
	}
	return t, nil
}

func (t *Target) warn(format string, args ...any) {
	if t.o.Warn != nil {
		t.o.Warn(fmt.Sprintf(format, args...))
	}
}

// checkName refuses a domain name libvirt would refuse at the end.
func checkName(name string) error {
	if strings.ContainsRune(name, '/') || strings.TrimSpace(name) == "" || strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("domain name %q: libvirt needs a non-empty name without '/' or control characters (--vm-name): %w", name, errs.ErrUsage)
	}
	return nil
}

// volumeName is a disk's new volume: NAME-DISK(.qcow2), with characters a
// logical volume or file name cannot hold replaced by '_'.
func volumeName(vm, disk, format string) string {
	s := []rune(vm + "-" + disk)
	for i, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' || r == '+') {
			s[i] = '_'
		}
	}
	if format == "qcow2" {
		return string(s) + ".qcow2"
	}
	return string(s)
}

// code is the libvirt error number of err, or -1.
func code(err error) golibvirt.ErrorNumber {
	var le golibvirt.Error
	if errors.As(err, &le) {
		return golibvirt.ErrorNumber(le.Code)
	}
	return -1
}

// findPool looks the pool up and picks the volume format from its type.
func (t *Target) findPool(ctx context.Context) error {
	l, name := t.l, t.o.Pool
	pool, err := lv.Call(ctx, func() (golibvirt.StoragePool, error) { return l.StoragePoolLookupByName(name) })
	if code(err) == golibvirt.ErrNoStoragePool {
		return fmt.Errorf("libvirt at %s has no storage pool %q (see 'virsh pool-list --all'): %w", t.shown, name, errs.ErrNotFound)
	} else if err != nil {
		return fmt.Errorf("look up storage pool %s: %w", name, lv.Classify(err))
	}
	active, err := lv.Call(ctx, func() (int32, error) { return l.StoragePoolIsActive(pool) })
	if err != nil {
		return fmt.Errorf("storage pool %s: %w", name, lv.Classify(err))
	}
	if active == 0 {
		return fmt.Errorf("storage pool %s is not active: start it (virsh pool-start %s): %w", name, name, errs.ErrUsage)
	}
	desc, err := lv.Call(ctx, func() (string, error) { return l.StoragePoolGetXMLDesc(pool, 0) })
	if err != nil {
		return fmt.Errorf("storage pool %s: get XML: %w", name, lv.Classify(err))
	}
	var px struct {
		Type string `xml:"type,attr"`
	}
	if err := xml.Unmarshal([]byte(desc), &px); err != nil {
		return fmt.Errorf("storage pool %s: parse its XML: %v", name, err)
	}
	switch {
	case slices.Contains(filePools, px.Type):
		t.format = "qcow2"
	case slices.Contains(blockPools, px.Type):
		t.format = "raw"
	default:
		return fmt.Errorf("storage pool %s is of type %s, whose volumes have no path on this host that vmshadow can write: restore into a pool of type %s: %w",
			name, px.Type, strings.Join(append(slices.Clone(filePools), blockPools...), ", "), errs.ErrUnsupported)
	}
	t.pool, t.poolType = pool, px.Type
	return nil
}

// planMinimal reads what the minimal definition needs from the host: the
// domain type and architecture (capabilities) and the network 'default'.
func (t *Target) planMinimal(ctx context.Context) error {
	l := t.l
	caps, err := lv.Call(ctx, l.ConnectGetCapabilities)
	if err != nil {
		return fmt.Errorf("libvirt at %s: get capabilities: %w", t.shown, lv.Classify(err))
	}
	typ, arch, err := domainType(caps)
	if err != nil {
		return err
	}
	t.min = minimal{Name: t.o.VMName, Type: typ, Arch: arch, MemoryMB: t.o.MemoryMB, VCPUs: t.o.VCPUs}
	net, err := lv.Call(ctx, func() (golibvirt.Network, error) { return l.NetworkLookupByName("default") })
	switch {
	case code(err) == golibvirt.ErrNoNetwork:
		t.warn("libvirt has no network 'default': the new domain has no network interface")
	case err != nil:
		return fmt.Errorf("look up network default: %w", lv.Classify(err))
	default:
		active, err := lv.Call(ctx, func() (int32, error) { return l.NetworkIsActive(net) })
		if err != nil {
			return fmt.Errorf("network default: %w", lv.Classify(err))
		}
		if active == 0 {
			t.warn("libvirt's network 'default' is not active: the new domain has no network interface")
		} else {
			t.min.Network = true
		}
	}
	return nil
}

// domainType picks, from libvirt's capabilities XML, the type of a minimal
// domain: kvm when libvirt offers it for the host's architecture, else
// qemu (TCG).
func domainType(caps string) (typ, arch string, err error) {
	var c struct {
		Host struct {
			Arch string `xml:"cpu>arch"`
		} `xml:"host"`
		Guests []struct {
			OSType string `xml:"os_type"`
			Arch   struct {
				Name    string `xml:"name,attr"`
				Domains []struct {
					Type string `xml:"type,attr"`
				} `xml:"domain"`
			} `xml:"arch"`
		} `xml:"guest"`
	}
	if err := xml.Unmarshal([]byte(caps), &c); err != nil {
		return "", "", fmt.Errorf("parse libvirt's capabilities: %v", err)
	}
	for _, g := range c.Guests {
		if g.OSType != "hvm" || g.Arch.Name != c.Host.Arch {
			continue
		}
		typ = ""
		for _, d := range g.Arch.Domains {
			if d.Type == "kvm" {
				return "kvm", g.Arch.Name, nil
			}
			if d.Type == "qemu" {
				typ = "qemu"
			}
		}
		if typ != "" {
			return typ, g.Arch.Name, nil
		}
	}
	return "", "", fmt.Errorf("libvirt offers no QEMU guest for this host's architecture %q: install qemu-system for it: %w", c.Host.Arch, errs.ErrUnsupported)
}

// Create implements restore.Target: a new volume of the disk's size in the
// pool, written through its path.
func (t *Target) Create(ctx context.Context, d repo.ManifestDisk, x *repo.Index) (restore.ImageWriter, string, error) {
	l, name := t.l, t.names[d.Name]
	if name == "" {
		return nil, "", fmt.Errorf("disk %s was not planned: %w", d.Name, errs.ErrUsage)
	}
	var vx strings.Builder
	vx.WriteString("<volume><name>")
	xml.EscapeText(&vx, []byte(name))
	fmt.Fprintf(&vx, "</name><capacity unit='bytes'>%d</capacity><allocation unit='bytes'>0</allocation>", x.Size())
	if t.format == "qcow2" {
		vx.WriteString("<target><format type='qcow2'/></target>")
	}
	vx.WriteString("</volume>")
	vol, err := lv.Call(ctx, func() (golibvirt.StorageVol, error) { return l.StorageVolCreateXML(t.pool, vx.String(), 0) })
	if err != nil {
		if code(err) == golibvirt.ErrStorageVolExist {
			return nil, "", fmt.Errorf("create volume %s in pool %s: it exists already: choose another --vm-name: %v: %w", name, t.o.Pool, err, errs.ErrUsage)
		}
		return nil, "", fmt.Errorf("create volume %s in pool %s: %w", name, t.o.Pool, lv.Classify(err))
	}
	t.created = append(t.created, vol)
	path, err := lv.Call(ctx, func() (string, error) { return l.StorageVolGetPath(vol) })
	if err != nil {
		return nil, "", fmt.Errorf("volume %s: get path: %w", name, lv.Classify(err))
	}
	where := t.o.Pool + "/" + name
	st, err := os.Stat(path)
	if err != nil {
		return nil, "", fmt.Errorf("volume %s: its path %s is not on this host: %v: %w", where, path, err, errs.ErrUnsupported)
	}
	nd := newDisk{Target: d.Name, Path: path, Format: t.format}
	var w restore.ImageWriter
	switch {
	case t.format == "qcow2" && st.Mode().IsRegular():
		nd.Type = "file"
		w, err = createQcow2(path, x.Size())
	case t.format == "raw" && st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0:
		nd.Type = "block"
		w, err = restore.CreateRaw(path, x.Size())
	default:
		err = fmt.Errorf("volume %s: %s is a %s, not the %s a %s pool's volume should be: %w", where, path, st.Mode().Type(), map[string]string{"qcow2": "file", "raw": "block device"}[t.format], t.poolType, errs.ErrUnsupported)
	}
	if err != nil {
		return nil, "", err
	}
	t.disks = append(t.disks, nd)
	t.vols = append(t.vols, Volume{Disk: d.Name, Volume: name, Path: path, Format: t.format, Target: d.Name})
	return w, where, nil
}

// qcow2Volume writes a qcow2 image into a volume's file.
type qcow2Volume struct {
	f    *os.File
	w    *qcow2.Writer
	path string
}

func createQcow2(path string, size int64) (*qcow2Volume, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrPermission) {
		return nil, fmt.Errorf("open volume %s: %w: vmshadow writes volumes through their files: run it as root (or as the owner of the pool's files): %w", path, err, errs.ErrUsage)
	} else if err != nil {
		return nil, fmt.Errorf("open volume %s: %w", path, err)
	}
	w, err := qcow2.Create(f, size, qcow2.Options{})
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("create qcow2 image in %s: %w", path, err)
	}
	return &qcow2Volume{f: f, w: w, path: path}, nil
}

func (q *qcow2Volume) WriteAt(p []byte, off int64) (int, error) {
	n, err := q.w.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("write %s: %w", q.path, err)
	}
	return n, nil
}

// Close completes the image (metadata, header, fsync).
func (q *qcow2Volume) Close() error {
	err := q.w.Close()
	if cerr := q.f.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("finish qcow2 image %s: %w", q.path, err)
	}
	return nil
}

// Abort leaves the unfinished image (its header says corrupt) to Target.Abort,
// which deletes the volume.
func (q *qcow2Volume) Abort() { q.f.Close() }

// Finish implements restore.Target: it refreshes the pool (libvirt sees
// the volumes' allocation), writes the NVRAM file and defines the domain.
func (t *Target) Finish(ctx context.Context) error {
	l := t.l
	if err := lv.Do(ctx, func() error { return l.StoragePoolRefresh(t.pool, 0) }); err != nil {
		return fmt.Errorf("refresh storage pool %s: %w", t.o.Pool, lv.Classify(err))
	}
	var root *node
	if t.def != nil {
		uuid := ""
		if t.tpm != nil {
			uuid = t.tpm.uuid
		}
		warnings, err := rewrite(t.def, t.o.VMName, t.disks, t.nvram, uuid, t.tpm != nil)
		for _, w := range warnings {
			t.warn("%s", w)
		}
		if err != nil {
			return err
		}
		root = t.def
		if t.nvram != "" && t.o.NVRAM != nil {
			if err := t.writeNVRAM(); err != nil {
				return err
			}
		}
		if t.tpm != nil {
			if err := t.writeTPM(); err != nil {
				return err
			}
		}
	} else {
		m := t.min
		m.Disks = t.disks
		for i := range t.vols {
			t.vols[i].Target = virtioName(i)
		}
		root = m.build()
	}
	x := string(root.marshal())
	dom, err := lv.Call(ctx, func() (golibvirt.Domain, error) { return l.DomainDefineXMLFlags(x, golibvirt.DomainDefineValidate) })
	if err != nil {
		return fmt.Errorf("define domain %s: %w", t.o.VMName, lv.Classify(err))
	}
	t.dom = &dom
	t.uuid = uuidString(dom.UUID)
	return nil
}

// writeNVRAM writes the backup's UEFI variables into the new domain's
// NVRAM file, which must not exist.
func (t *Target) writeNVRAM() error {
	f, err := os.OpenFile(t.nvram, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create NVRAM file %s: %w", t.nvram, err)
	}
	t.nvramCreated = true
	if _, err := f.Write(t.o.NVRAM); err != nil {
		f.Close()
		return fmt.Errorf("write NVRAM file %s: %w", t.nvram, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync NVRAM file %s: %w", t.nvram, err)
	}
	return f.Close()
}

// Abort implements restore.Target: it undefines the domain, removes the
// NVRAM file and the TPM state directory and deletes the volumes it
// created, and nothing else.
func (t *Target) Abort(ctx context.Context) {
	l := t.l
	if t.dom != nil {
		dom := *t.dom
		if t.started {
			lv.Do(ctx, func() error { return l.DomainDestroy(dom) })
		}
		if err := lv.Do(ctx, func() error { return l.DomainUndefineFlags(dom, golibvirt.DomainUndefineKeepNvram) }); err != nil {
			t.warn("undefine domain %s after the failed restore: %v (remove it: virsh undefine %s)", dom.Name, err, dom.Name)
		} else {
			t.dom = nil
		}
	}
	if t.nvramCreated {
		if err := os.Remove(t.nvram); err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.warn("remove NVRAM file %s after the failed restore: %v", t.nvram, err)
		}
		t.nvramCreated = false
	}
	t.removeTPM()
	for i := len(t.created) - 1; i >= 0; i-- {
		vol := t.created[i]
		if err := lv.Do(ctx, func() error { return l.StorageVolDelete(vol, golibvirt.StorageVolDeleteNormal) }); err != nil {
			t.warn("delete volume %s of pool %s after the failed restore: %v (delete it: virsh vol-delete %s --pool %s)", vol.Name, t.o.Pool, err, vol.Name, t.o.Pool)
		}
	}
	t.created, t.disks, t.vols = nil, nil, nil
	lv.Do(ctx, func() error { return l.StoragePoolRefresh(t.pool, 0) })
}

// Start starts the new domain. A failure leaves the restored domain
// defined, its disks in place: the restore itself succeeded.
func (t *Target) Start(ctx context.Context) error {
	if t.dom == nil {
		return fmt.Errorf("start: no domain was defined: %w", errs.ErrUsage)
	}
	dom := *t.dom
	if err := lv.Do(ctx, func() error { return t.l.DomainCreate(dom) }); err != nil {
		return fmt.Errorf("the restore is complete, but domain %s does not start (fix it and run 'virsh start %s'): %w", dom.Name, dom.Name, lv.Classify(err))
	}
	t.started = true
	return nil
}

// Result is what the restore made.
func (t *Target) Result() Result {
	r := Result{Pool: t.o.Pool, Domain: t.o.VMName, UUID: t.uuid, Definition: "minimal", Volumes: t.vols, Started: t.started}
	if t.def != nil {
		r.Definition = "stored"
	}
	if t.tpm != nil && t.tpm.created {
		r.TPMState = t.tpm.state()
	}
	return r
}

// Close closes the connection to libvirt.
func (t *Target) Close() error {
	if t.l == nil {
		return nil
	}
	err := t.l.Disconnect()
	t.l = nil
	return err
}

func uuidString(u golibvirt.UUID) string {
	const hex = "0123456789abcdef"
	var b strings.Builder
	for i, c := range u {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			b.WriteByte('-')
		}
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}

// Stored sets o.Definition, o.NVRAM and o.TPMState from what backup m
// stores (the libvirt domain XML, UEFI variables and TPM state files,
// read and checked through r); a backup without a libvirt definition
// leaves them nil (a minimal one is built). Without TPM state (a backup
// taken before vmshadow stored it, or over a remote connection) the new
// domain's emulated TPM starts empty (rewrite warns).
func (o *Options) Stored(ctx context.Context, r *repo.Repo, m *repo.Manifest) error {
	warn := func(format string, args ...any) {
		if o.Warn != nil {
			o.Warn(fmt.Sprintf(format, args...))
		}
	}
	switch m.Definition {
	case "":
		return nil
	case repo.DefinitionLibvirt:
	default:
		warn("the backup stores a %s definition, not a libvirt one: the new domain gets a minimal definition", m.Definition)
		return nil
	}
	def, err := restore.ReadFile(ctx, r, m, repo.FileDomainXML, maxDefinitionBytes)
	if err != nil {
		return fmt.Errorf("read the stored domain definition: %w", err)
	}
	o.Definition = def
	if m.File(repo.FileNVRAM) != nil {
		if o.NVRAM, err = restore.ReadFile(ctx, r, m, repo.FileNVRAM, 0); err != nil {
			return fmt.Errorf("read the stored UEFI variables: %w", err)
		}
	}
	for _, f := range m.Files {
		name, ok := strings.CutPrefix(f.Name, repo.FileTPMPrefix)
		if !ok || strings.HasPrefix(name, ".") {
			continue // swtpm's .lock, which backups up to this version stored, is not state
		}
		b, err := restore.ReadFile(ctx, r, m, f.Name, 0)
		if err != nil {
			return fmt.Errorf("read the stored TPM state: %w", err)
		}
		if o.TPMState == nil {
			o.TPMState = map[string][]byte{}
		}
		o.TPMState[name] = b
	}
	return nil
}
