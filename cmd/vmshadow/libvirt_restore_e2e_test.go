package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/xml"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/libvirttest"
	"github.com/vmshadow/vmshadow/internal/qemutest"
)

// lvRestoreName is a libvirt object name unique to these tests.
func lvRestoreName(what string) string {
	var b [4]byte
	rand.Read(b[:])
	return "vmshadow-lvrestore-" + what + "-" + hex.EncodeToString(b[:])
}

// lvRestorePool defines and starts a dir pool in a new directory; the pool
// and its volumes go when the test ends.
func lvRestorePool(t *testing.T) (name, dir string) {
	t.Helper()
	libvirttest.Need(t)
	dir = libvirttest.TempDir(t)
	name = lvRestoreName("pool")
	libvirttest.Virsh(t, "pool-define-as", name, "dir", "--target", dir)
	t.Cleanup(func() {
		out, _ := libvirttest.VirshErr("vol-list", name)
		rows := false
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) > 0 && strings.HasPrefix(f[0], "---") {
				rows = true
			} else if rows && len(f) > 0 {
				libvirttest.VirshErr("vol-delete", f[0], "--pool", name)
			}
		}
		libvirttest.VirshErr("pool-destroy", name)
		if _, err := libvirttest.VirshErr("pool-undefine", name); err != nil {
			t.Logf("pool-undefine %s: %v", name, err)
		}
	})
	libvirttest.Virsh(t, "pool-start", name)
	return name, dir
}

// lvRestoreCleanup removes domain name, if defined, when the test ends.
func lvRestoreCleanup(t *testing.T, name string) {
	t.Cleanup(func() {
		if _, err := libvirttest.VirshErr("domstate", name); err != nil {
			return
		}
		libvirttest.VirshErr("destroy", name)
		if _, err := libvirttest.VirshErr("undefine", name, "--nvram"); err != nil {
			t.Logf("undefine %s: %v", name, err)
		}
	})
}

// rawOf is a volume's content (qemu-img convert to raw).
func rawOf(t *testing.T, path, format string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "disk.raw")
	if b, err := exec.Command("qemu-img", "convert", "-U", "-f", format, "-O", "raw", path, out).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert %s: %v: %s", path, err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// lvDomain is what the tests read of a domain's definition.
type lvDomain struct {
	UUID   string `xml:"uuid"`
	Memory int64  `xml:"memory"` // KiB
	VCPU   int    `xml:"vcpu"`
	Disks  []struct {
		Source struct {
			File string `xml:"file,attr"`
		} `xml:"source"`
		Target struct {
			Dev string `xml:"dev,attr"`
		} `xml:"target"`
	} `xml:"devices>disk"`
	MACs []struct {
		Address string `xml:"address,attr"`
	} `xml:"devices>interface>mac"`
}

func lvDump(t *testing.T, name string) lvDomain {
	t.Helper()
	var d lvDomain
	if err := xml.Unmarshal([]byte(libvirttest.Virsh(t, "dumpxml", name, "--inactive")), &d); err != nil {
		t.Fatalf("dumpxml %s: %v", name, err)
	}
	return d
}

// TestLibvirtRestoreFromQEMU: a QEMU VM's backup (no stored definition)
// restores into a libvirt dir pool: one qcow2 volume per disk holding the
// disk at the backup's instant, and a minimal domain (--memory, --vcpus)
// with virtio disks vda, vdb; a second restore under the same name is
// refused before anything is created; misused flags are usage errors.
func TestLibvirtRestoreFromQEMU(t *testing.T) {
	pool, pdir := lvRestorePool(t)
	vm := qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda", Size: 8 << 20}, {ID: "vdb", Format: "raw", Size: 4 << 20}}})
	r := newLiveRig(t, vm, false)
	vm.Write("vda", 0x3c, 1<<20, 2<<20)
	vm.Write("vdb", 0xc3, 0, 1<<20)
	want := r.expected()
	id := r.backup()["backup_id"].(string)

	name := lvRestoreName("dom")
	lvRestoreCleanup(t, name)
	res := r.run("restore", "--repo", r.repo, id, "--to-libvirt", libvirttest.URI, "--pool", pool, "--vm-name", name, "--memory", "128", "--vcpus", "2")
	if res.code != 0 {
		t.Fatalf("restore --to-libvirt: exit %d: %s", res.code, res.errorMessage())
	}
	sum := res.summary(t)
	if sum["format"] != "libvirt" || sum["domain"] != name || sum["definition"] != "minimal" || sum["started"] != false || sum["pool"] != pool {
		t.Errorf("summary %v", sum)
	}
	d := lvDump(t, name)
	if d.UUID == "" || sum["domain_uuid"] != d.UUID || d.Memory != 128<<10 || d.VCPU != 2 || len(d.Disks) != 2 {
		t.Fatalf("restored domain %+v, summary uuid %v", d, sum["domain_uuid"])
	}
	for i, disk := range []string{"vda", "vdb"} {
		vol := filepath.Join(pdir, name+"-"+disk+".qcow2")
		if d.Disks[i].Target.Dev != disk || d.Disks[i].Source.File != vol {
			t.Errorf("domain disk %d: %+v, want %s on %s", i, d.Disks[i], disk, vol)
		}
		if !bytes.Equal(rawOf(t, vol, "qcow2"), want[disk]) {
			t.Errorf("volume of disk %s differs from the disk at the backup's instant", disk)
		}
	}

	usage := errs.ErrUsage.ExitCode()
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"--to-libvirt", libvirttest.URI, "--pool", pool, "--vm-name", name}, usage, "already has a domain"},
		{[]string{"--to-libvirt", libvirttest.URI}, usage, "--to-libvirt needs --pool"},
		{[]string{"--to", t.TempDir(), "--pool", pool}, usage, "go with --to-libvirt"},
		{[]string{"--to", t.TempDir(), "--start"}, usage, "go with --to-libvirt"},
		{[]string{"--to", t.TempDir(), "--to-libvirt", libvirttest.URI, "--pool", pool}, usage, "only one of"},
		{[]string{"--to-libvirt", libvirttest.URI, "--pool", pool, "--format", "qcow2"}, usage, "the pool's type decides"},
		{[]string{"--to-libvirt", libvirttest.URI, "--pool", pool, "--sr", "x"}, usage, "--sr goes with --to-xapi"},
		{[]string{"--to-libvirt", "qemu+ssh://backup@host/system", "--pool", pool}, usage, "run it there with a local URI"},
		{[]string{"--to-libvirt", libvirttest.URI, "--pool", "vmshadow-lvrestore-nosuch"}, errs.ErrNotFound.ExitCode(), "no storage pool"},
	} {
		res := r.run(append([]string{"restore", "--repo", r.repo, id}, c.args...)...)
		if res.code != c.code || !strings.Contains(res.errorMessage(), c.msg) {
			t.Errorf("restore %v: exit %d, %q; want exit %d saying %q", c.args, res.code, res.errorMessage(), c.code, c.msg)
		}
	}
	libvirttest.Virsh(t, "pool-refresh", pool)
	if out := libvirttest.Virsh(t, "vol-list", pool); strings.Count(out, "\n"+" "+name) != 2 || strings.Count(out, ".qcow2 ") != 2 {
		t.Errorf("refused restores changed the pool:\n%s", out)
	}
}
