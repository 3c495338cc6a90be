package libvirt

import (
	"context"
	"encoding/binary"
	"encoding/xml"
	"fmt"
	"os"
	"strconv"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// Disk is one of the domain's disks a set captures.
type Disk struct {
	Target string `json:"target"` // <target dev>: the NBD export name
	Type   string `json:"type"`   // file or block
	Source string `json:"source"` // image path or block device on the libvirt host
	Format string `json:"format"` // qcow2 or raw
	Size   int64  `json:"size"`   // virtual size, bytes
	// Bitmaps: the image keeps persistent dirty bitmaps (qcow2 v3), so the
	// disk can take part in checkpoints; raw and qcow2 v2 disks are read in
	// full each time.
	Bitmaps bool `json:"bitmaps"`
}

// domainXML is the part of a domain definition vmshadow reads.
type domainXML struct {
	Name string `xml:"name"`
	UUID string `xml:"uuid"`
	OS   struct {
		NVRAM string `xml:"nvram"` // the UEFI variable store's path on the host
	} `xml:"os"`
	Seclabel []struct {
		Type  string `xml:"type,attr"`
		Model string `xml:"model,attr"`
		Label string `xml:"label"`
	} `xml:"seclabel"`
	Devices struct {
		Disks    []diskXML `xml:"disk"`
		Channels []struct {
			Type   string `xml:"type,attr"`
			Target struct {
				Type  string `xml:"type,attr"`
				Name  string `xml:"name,attr"`
				State string `xml:"state,attr"`
			} `xml:"target"`
		} `xml:"channel"`
		TPMs []struct {
			Backend struct {
				Type    string `xml:"type,attr"`
				Version string `xml:"version,attr"`
			} `xml:"backend"`
		} `xml:"tpm"`
	} `xml:"devices"`
}

type diskXML struct {
	Type   string `xml:"type,attr"`
	Device string `xml:"device,attr"`
	Driver struct {
		Name string `xml:"name,attr"`
		Type string `xml:"type,attr"`
	} `xml:"driver"`
	Source *struct {
		File     string `xml:"file,attr"`
		Dev      string `xml:"dev,attr"`
		Protocol string `xml:"protocol,attr"`
		Name     string `xml:"name,attr"`
		Pool     string `xml:"pool,attr"`
		Volume   string `xml:"volume,attr"`
	} `xml:"source"`
	Target struct {
		Dev string `xml:"dev,attr"`
		Bus string `xml:"bus,attr"`
	} `xml:"target"`
	ReadOnly  *struct{} `xml:"readonly"`
	Shareable *struct{} `xml:"shareable"`
	Transient *struct{} `xml:"transient"`
}

func parseDomainXML(s string) (*domainXML, error) {
	var d domainXML
	if err := xml.Unmarshal([]byte(s), &d); err != nil {
		return nil, fmt.Errorf("parse domain XML: %v: %w", err, errs.ErrCorrupt)
	}
	return &d, nil
}

// qemuDAC is the uid and gid libvirt runs the domain's QEMU as, from the
// live XML's DAC label ("+64055:+107"); ok is false without one.
func (d *domainXML) qemuDAC() (uid, gid int, ok bool) {
	for _, s := range d.Seclabel {
		if s.Model != "dac" || s.Label == "" {
			continue
		}
		u, g, found := strings.Cut(s.Label, ":")
		if !found {
			continue
		}
		uid, err1 := strconv.Atoi(strings.TrimPrefix(u, "+"))
		gid, err2 := strconv.Atoi(strings.TrimPrefix(g, "+"))
		if err1 == nil && err2 == nil {
			return uid, gid, true
		}
	}
	return 0, 0, false
}

// agentChannel reports whether the domain has a guest agent channel, and
// whether the agent is connected.
func (d *domainXML) agentChannel() (present, connected bool) {
	for _, c := range d.Devices.Channels {
		if c.Target.Type == "virtio" && c.Target.Name == "org.qemu.guest_agent.0" {
			return true, c.Target.State == "connected"
		}
	}
	return false, false
}

// selectDisks decides which disks a set captures. Removable and read-only
// media are skipped (reasons in skipped); a disk vmshadow cannot capture
// fails the whole set, since leaving a writable disk out would lose data.
func selectDisks(d *domainXML) (disks []Disk, skipped []string, err error) {
	var refused []string
	for _, x := range d.Devices.Disks {
		t := x.Target.Dev
		switch {
		case x.Device == "cdrom" || x.Device == "floppy":
			skipped = append(skipped, fmt.Sprintf("%s (%s: removable medium)", t, x.Device))
			continue
		case x.ReadOnly != nil:
			skipped = append(skipped, fmt.Sprintf("%s (read-only)", t))
			continue
		case x.Source == nil || x.Source.File == "" && x.Source.Dev == "" && x.Type != "network" && x.Type != "volume":
			skipped = append(skipped, fmt.Sprintf("%s (no medium)", t))
			continue
		}
		reason := ""
		switch {
		case x.Device == "lun":
			reason = "a SCSI LUN passed through to the guest (device='lun'): QEMU cannot snapshot it"
		case x.Shareable != nil:
			reason = "shareable between domains (<shareable/>): other domains write to it, no point-in-time copy is possible from this one"
		case x.Transient != nil:
			reason = "transient (<transient/>): its writes are discarded when the domain stops"
		case x.Type == "network":
			reason = fmt.Sprintf("a network disk (%s %s): libvirt's pull-mode backup supports file and block disks only", x.Source.Protocol, x.Source.Name)
		case x.Type == "volume":
			reason = fmt.Sprintf("a storage pool volume (%s/%s): define the disk as type='file' or 'block'", x.Source.Pool, x.Source.Volume)
		case x.Type != "file" && x.Type != "block":
			reason = fmt.Sprintf("of type %q: only file and block disks can be backed up", x.Type)
		case x.Driver.Type != "qcow2" && x.Driver.Type != "raw":
			reason = fmt.Sprintf("in format %q: only qcow2 and raw images can be backed up", x.Driver.Type)
		}
		if reason != "" {
			refused = append(refused, fmt.Sprintf("disk %s is %s", t, reason))
			continue
		}
		src := x.Source.File
		if x.Type == "block" {
			src = x.Source.Dev
		}
		disks = append(disks, Disk{Target: t, Type: x.Type, Source: src, Format: x.Driver.Type, Bitmaps: x.Driver.Type == "qcow2"})
	}
	if len(refused) > 0 {
		return nil, nil, fmt.Errorf("domain %s: %s: %w", d.Name, strings.Join(refused, "; "), errs.ErrUnsupported)
	}
	return disks, skipped, nil
}

// qcow2Version reads the version field of a qcow2 header (2 or 3).
func qcow2Version(path string) (uint32, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var h [8]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		return 0, err
	}
	if string(h[:4]) != "QFI\xfb" {
		return 0, fmt.Errorf("%s is not a qcow2 image", path)
	}
	return binary.BigEndian.Uint32(h[4:]), nil
}

// scan reads the live definition: the disks, their sizes, whether they
// keep bitmaps, and what vmshadow left behind (a backup job).
func (p *Provider) scan(ctx context.Context) error {
	l, dom := p.l, p.dom
	x, err := call(ctx, func() (string, error) { return l.DomainGetXMLDesc(dom, 0) })
	if err != nil {
		return fmt.Errorf("domain %s: get XML: %w", dom.Name, classify(err))
	}
	live, err := parseDomainXML(x)
	if err != nil {
		return err
	}
	disks, skipped, err := selectDisks(live)
	if err != nil {
		return err
	}
	for i := range disks {
		d := &disks[i]
		_, capacity, _, err := call3(ctx, func() (uint64, uint64, uint64, error) { return l.DomainGetBlockInfo(dom, d.Target, 0) })
		if err != nil {
			return fmt.Errorf("domain %s: disk %s: get size: %w", dom.Name, d.Target, classify(err))
		}
		d.Size = int64(capacity)
		if d.Format == "qcow2" && d.Type == "file" && p.local() {
			// libvirt does not report the qcow2 version; a v2 image cannot
			// hold bitmaps and would fail the whole BackupBegin.
			if v, err := qcow2Version(d.Source); err == nil && v < 3 {
				d.Bitmaps = false
			}
		}
	}
	p.live, p.disks, p.skipped = live, disks, skipped
	p.leftovers = nil
	job, err := p.backupJob(ctx)
	if err != nil {
		return err
	}
	if job != nil && job.ours() {
		p.leftovers = append(p.leftovers, "backup job serving "+job.Server.Socket)
	}
	return nil
}

func call3[A, B, C any](ctx context.Context, fn func() (A, B, C, error)) (A, B, C, error) {
	type abc struct {
		a A
		b B
		c C
	}
	r, err := call(ctx, func() (abc, error) {
		a, b, c, err := fn()
		return abc{a, b, c}, err
	})
	return r.a, r.b, r.c, err
}

// backupXML is the part of virDomainBackupGetXMLDesc's answer vmshadow reads.
type backupXML struct {
	Mode        string `xml:"mode,attr"`
	Incremental string `xml:"incremental"`
	Server      struct {
		Transport string `xml:"transport,attr"`
		Socket    string `xml:"socket,attr"`
		Name      string `xml:"name,attr"`
		Port      string `xml:"port,attr"`
	} `xml:"server"`
}

// ours reports whether the job serves a socket in a vmshadow set directory.
func (b *backupXML) ours() bool {
	return strings.Contains(b.Server.Socket, "/"+Prefix)
}

func (b *backupXML) describe() string {
	switch {
	case b.Mode != "pull":
		return "a push-mode backup job"
	case b.Server.Socket != "":
		return "a pull-mode backup job serving NBD on " + b.Server.Socket
	default:
		return fmt.Sprintf("a pull-mode backup job serving NBD on %s:%s", b.Server.Name, b.Server.Port)
	}
}

// backupJob returns the domain's backup job, or nil when it has none.
func (p *Provider) backupJob(ctx context.Context) (*backupXML, error) {
	l, dom := p.l, p.dom
	x, err := call(ctx, func() (string, error) { return l.DomainBackupGetXMLDesc(dom, 0) })
	if isCode(err, golibvirt.ErrNoDomainBackup) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("domain %s: look for a backup job: %w", dom.Name, classify(err))
	}
	var b backupXML
	if err := xml.Unmarshal([]byte(x), &b); err != nil {
		return nil, fmt.Errorf("domain %s: parse backup job XML: %v: %w", dom.Name, err, errs.ErrCorrupt)
	}
	return &b, nil
}
