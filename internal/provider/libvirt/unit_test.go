package libvirt

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/vmshadow/vmshadow/internal/errs"
)

func TestParseURI(t *testing.T) {
	for _, tt := range []struct {
		uri   string
		local bool
		bad   string
	}{
		{"qemu:///system", true, ""},
		{"qemu:///session", true, ""},
		{"qemu+unix:///system?socket=/run/x.sock", true, ""},
		{"qemu+tls://host.example/system", false, ""},
		{"qemu://host.example/system", false, ""},
		{"qemu+ssh://root@host/system", false, ""},
		{"qemu+libssh://root@host/system?known_hosts_verify=auto", false, ""},
		{"xen:///system", false, `driver "xen"`},
		{"qemu+ext:///system", false, `transport "ext"`},
		{"qemu:///embed", false, "/system or /session"},
		{"qemu://[bad", false, "libvirt URI"},
	} {
		_, local, err := ParseURI(tt.uri)
		if tt.bad != "" {
			if !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), tt.bad) {
				t.Errorf("ParseURI(%q) = %v, want a usage error mentioning %s", tt.uri, err, tt.bad)
			}
			continue
		}
		if err != nil || local != tt.local {
			t.Errorf("ParseURI(%q) = local %v, %v; want local %v", tt.uri, local, err, tt.local)
		}
	}
}

func TestCheckVersion(t *testing.T) {
	if err := checkVersion("qemu:///system", 9_000_000); err != nil {
		t.Fatal(err)
	}
	if err := checkVersion("qemu:///system", 7_002_000); err != nil {
		t.Fatal(err)
	}
	err := checkVersion("qemu:///system", 6_010_000)
	if !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), "version 6.10.0") || !strings.Contains(err.Error(), "7.2.0 or newer") {
		t.Fatalf("libvirt 6.10: %v", err)
	}
}

const testXML = `<domain type='qemu'><name>web</name>
<seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+107</label><imagelabel>+64055:+107</imagelabel></seclabel>
<devices>
 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/a.qcow2'/><target dev='vda' bus='virtio'/></disk>
 <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/b'/><target dev='vdb' bus='virtio'/></disk>
 <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/iso/x.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
 <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sdb' bus='sata'/><readonly/></disk>
 <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/v/ro.img'/><target dev='vdc' bus='virtio'/><readonly/></disk>
 %s
 <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/></channel>
</devices></domain>`

func TestSelectDisks(t *testing.T) {
	d, err := parseDomainXML(fmt.Sprintf(testXML, ""))
	if err != nil {
		t.Fatal(err)
	}
	disks, skipped, err := selectDisks(d)
	if err != nil {
		t.Fatal(err)
	}
	want := []Disk{{Target: "vda", Type: "file", Source: "/v/a.qcow2", Format: "qcow2", Bitmaps: true},
		{Target: "vdb", Type: "block", Source: "/dev/vg/b", Format: "raw"}}
	if fmt.Sprint(disks) != fmt.Sprint(want) {
		t.Errorf("disks = %+v, want %+v", disks, want)
	}
	if got := strings.Join(skipped, "; "); got != "sda (cdrom: removable medium); sdb (cdrom: removable medium); vdc (read-only)" {
		t.Errorf("skipped = %s", got)
	}
	if uid, gid, ok := d.qemuDAC(); !ok || uid != 64055 || gid != 107 {
		t.Errorf("qemuDAC = %d:%d %v", uid, gid, ok)
	}
	if present, connected := d.agentChannel(); !present || connected {
		t.Errorf("agent channel present %v connected %v", present, connected)
	}
	for extra, why := range map[string]string{
		`<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='rbd' name='pool/img'/><target dev='vdd' bus='virtio'/></disk>`: "disk vdd is a network disk (rbd pool/img)",
		`<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/v/s.img'/><target dev='vdd' bus='virtio'/><shareable/></disk>`:       "disk vdd is shareable",
		`<disk type='file' device='disk'><driver name='qemu' type='vmdk'/><source file='/v/s.vmdk'/><target dev='vdd' bus='virtio'/></disk>`:                 `disk vdd is in format "vmdk"`,
		`<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='p' volume='v'/><target dev='vdd' bus='virtio'/></disk>`:           "disk vdd is a storage pool volume (p/v)",
		`<disk type='block' device='lun'><driver name='qemu' type='raw'/><source dev='/dev/sdx'/><target dev='sdd' bus='scsi'/></disk>`:                      "disk sdd is a SCSI LUN",
		`<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/v/t.qcow2'/><target dev='vdd' bus='virtio'/><transient/></disk>`:   "disk vdd is transient",
	} {
		d, err := parseDomainXML(fmt.Sprintf(testXML, extra))
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := selectDisks(d); !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), why) || !strings.Contains(err.Error(), "domain web") {
			t.Errorf("%s: err = %v, want ErrUnsupported saying %q", extra, err, why)
		}
	}
}

func TestQcow2Version(t *testing.T) {
	dir := t.TempDir()
	for v, hdr := range map[uint32]string{2: "QFI\xfb\x00\x00\x00\x02", 3: "QFI\xfb\x00\x00\x00\x03"} {
		p := filepath.Join(dir, fmt.Sprint(v))
		os.WriteFile(p, []byte(hdr+strings.Repeat("\x00", 100)), 0o600)
		if got, err := qcow2Version(p); err != nil || got != v {
			t.Errorf("version %d: got %d, %v", v, got, err)
		}
	}
	p := filepath.Join(dir, "raw")
	os.WriteFile(p, make([]byte, 512), 0o600)
	if _, err := qcow2Version(p); err == nil {
		t.Error("a raw file read as qcow2")
	}
}

func TestBackupXML(t *testing.T) {
	st := &state{Socket: "/s/vmshadow-x/nbd.sock", Checkpoint: "vmshadow-r-x", Incremental: "vmshadow-r-w", Disks: []diskState{
		{Disk: Disk{Target: "vda", Bitmaps: true}, Scratch: "/s/vmshadow-x/vda.scratch", Incremental: true},
		{Disk: Disk{Target: "vdb"}, Scratch: "/s/vmshadow-x/vdb.scratch"},
	}}
	want := `<domainbackup mode='pull'>
  <incremental>vmshadow-r-w</incremental>
  <server transport='unix' socket='/s/vmshadow-x/nbd.sock'/>
  <disks>
    <disk name='vda' backup='yes' type='file' exportname='vda' backupmode='incremental' incremental='vmshadow-r-w' exportbitmap='backup-vda'>
      <scratch file='/s/vmshadow-x/vda.scratch'/>
    </disk>
    <disk name='vdb' backup='yes' type='file' exportname='vdb' backupmode='full'>
      <scratch file='/s/vmshadow-x/vdb.scratch'/>
    </disk>
  </disks>
</domainbackup>
`
	if got := st.backupXML(); got != want {
		t.Errorf("backup XML:\n%s\nwant:\n%s", got, want)
	}
	cp := st.checkpointDef([]string{"vda", "vdb", "sda"})
	for _, s := range []string{"<name>vmshadow-r-x</name>", "<disk name='vda' checkpoint='bitmap'/>", "<disk name='vdb' checkpoint='no'/>", "<disk name='sda' checkpoint='no'/>"} {
		if !strings.Contains(cp, s) {
			t.Errorf("checkpoint XML lacks %s:\n%s", s, cp)
		}
	}
	st.Incremental = ""
	if x := st.backupXML(); strings.Contains(x, "incremental") || strings.Contains(x, "backupmode") {
		t.Errorf("full backup XML mentions incremental:\n%s", x)
	}
}

func TestConnectError(t *testing.T) {
	u, _ := url.Parse("qemu+unix:///system?socket=/run/x.sock")
	err := connectError(u.String(), u, true, &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EACCES)})
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "permission denied on /run/x.sock") || !strings.Contains(err.Error(), "libvirt group") {
		t.Errorf("EACCES: %v", err)
	}
	err = connectError(u.String(), u, true, &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.ENOENT)})
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "libvirtd is not running") {
		t.Errorf("ENOENT: %v", err)
	}
	err = classify(golibvirt.Error{Code: uint32(golibvirt.ErrAccessDenied), Message: "access denied"})
	if !errors.Is(err, errs.ErrAuth) {
		t.Errorf("access denied: %v", err)
	}
	err = classify(golibvirt.Error{Code: uint32(golibvirt.ErrNoDomainCheckpoint), Message: "no checkpoint"})
	if !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("no checkpoint: %v", err)
	}
}

func TestDropParent(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"<domaincheckpoint>\n  <name>b</name>\n  <parent>\n    <name>a</name>\n  </parent>\n  <disks/>\n  <domain type='qemu'><name>d</name></domain>\n</domaincheckpoint>",
			"<domaincheckpoint>\n  <name>b</name>\n  \n  <disks/>\n  <domain type='qemu'><name>d</name></domain>\n</domaincheckpoint>"},
		{"<domaincheckpoint><name>b</name><disks/></domaincheckpoint>", "<domaincheckpoint><name>b</name><disks/></domaincheckpoint>"},
		// A <parent> only inside the embedded domain is not the checkpoint's.
		{"<domaincheckpoint><name>b</name><domain type='qemu'><parent>x</parent></domain></domaincheckpoint>",
			"<domaincheckpoint><name>b</name><domain type='qemu'><parent>x</parent></domain></domaincheckpoint>"},
		{"<domaincheckpoint></parent><parent></domaincheckpoint>", "<domaincheckpoint></parent><parent></domaincheckpoint>"},
	} {
		if got := dropParent(c.in); got != c.want {
			t.Errorf("dropParent(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
