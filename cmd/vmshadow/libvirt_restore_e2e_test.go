package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/xml"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/guestvm"
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
	if sum["format"] != "libvirt" || sum["domain"] != name || sum["domain_definition"] != "minimal" || sum["started"] != false || sum["pool"] != pool {
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

// TestLibvirtRestoreGuest: the real test guest, backed up as a libvirt
// domain (its definition stored with the backup), restores into a dir pool
// as a new domain with a new name, UUID and MAC address whose disk holds
// the backup; with --start the new domain boots the guest from the
// restored volume.
func TestLibvirtRestoreGuest(t *testing.T) {
	pool, pdir := lvRestorePool(t)
	ctx := context.Background()
	dir := libvirttest.TempDir(t)
	data := filepath.Join(dir, "data.qcow2")
	if err := guestvm.MakeDataDisk(ctx, data, 64<<20, "qcow2"); err != nil {
		t.Fatal(err)
	}
	opts := libvirttest.GuestOptions(t, libvirttest.Disk{Target: "vda", Format: "qcow2", Path: data})
	const mac = "52:54:00:5e:ed:02"
	opts.Devices = "    <interface type='user'>\n      <mac address='" + mac + "'/>\n      <model type='virtio'/>\n    </interface>\n"
	opts.Name = lvRestoreName("src")
	src := libvirttest.NewDomain(t, opts)
	src.Start(t)
	src.WaitConsole(t, guestvm.ReadyMarker, 5*time.Minute)

	state, env := stateEnv(t)
	env = append(env, "VMSHADOW_PASSWORD=test-password")
	repoDir := filepath.Join(state, "repo")
	if res := vmshadow(t, env, "repo", "init", "--repo", repoDir, "--encryption", "none"); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	res := vmshadow(t, env, "backup", "--repo", repoDir, "--libvirt", libvirttest.URI, "--vm", src.Name, "--scratch-dir", libvirttest.TempDir(t))
	if res.code != 0 {
		t.Fatalf("backup: exit %d: %s", res.code, res.errorMessage())
	}
	id := res.summary(t)["backup_id"].(string)
	// The guest's CPU time goes to the restored domain from here on; the
	// source's console file is the one the stored definition names.
	libvirttest.Virsh(t, "destroy", src.Name)
	os.Remove(filepath.Join(src.Dir, "console.log"))

	raw := filepath.Join(t.TempDir(), "vda.raw")
	if res := vmshadow(t, env, "restore", "--repo", repoDir, id, "--to", raw); res.code != 0 {
		t.Fatalf("restore --to: %s", res.errorMessage())
	}
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}

	// Without --start: the volume holds the backup, the definition is the
	// source's with a new identity.
	defined := lvRestoreName("dom")
	lvRestoreCleanup(t, defined)
	res = vmshadow(t, env, "restore", "--repo", repoDir, id, "--to-libvirt", libvirttest.URI, "--pool", pool, "--vm-name", defined)
	if res.code != 0 {
		t.Fatalf("restore --to-libvirt: exit %d: %s", res.code, res.errorMessage())
	}
	if sum := res.summary(t); sum["domain_definition"] != "stored" || sum["started"] != false {
		t.Fatalf("summary %v", sum)
	}
	vol := filepath.Join(pdir, defined+"-vda.qcow2")
	if !bytes.Equal(rawOf(t, vol, "qcow2"), want) {
		t.Fatal("the restored volume differs from the backup")
	}
	d := lvDump(t, defined)
	if d.UUID == "" || d.UUID == src.UUID || len(d.MACs) != 1 || d.MACs[0].Address == "" || d.MACs[0].Address == mac {
		t.Fatalf("restored domain: uuid %s (source %s), MACs %+v (source %s): want new ones", d.UUID, src.UUID, d.MACs, mac)
	}
	if len(d.Disks) != 1 || d.Disks[0].Target.Dev != "vda" || d.Disks[0].Source.File != vol {
		t.Fatalf("restored domain's disks %+v, want vda on %s", d.Disks, vol)
	}
	if s := libvirttest.Virsh(t, "domstate", defined); !strings.Contains(s, "shut off") {
		t.Fatalf("domain restored without --start is %s", s)
	}
	// A stored definition brings its own memory and vCPUs.
	if res := vmshadow(t, env, "restore", "--repo", repoDir, id, "--to-libvirt", libvirttest.URI, "--pool", pool, "--vm-name", lvRestoreName("dom"), "--memory", "512"); res.code != errs.ErrUsage.ExitCode() || !strings.Contains(res.errorMessage(), "stores the domain's definition") {
		t.Fatalf("--memory with a stored definition: exit %d: %s", res.code, res.errorMessage())
	}

	// With --start: the new domain boots the guest from its restored disk.
	started := lvRestoreName("dom")
	lvRestoreCleanup(t, started)
	res = vmshadow(t, env, "restore", "--repo", repoDir, id, "--to-libvirt", libvirttest.URI, "--pool", pool, "--vm-name", started, "--start")
	if res.code != 0 {
		t.Fatalf("restore --start: exit %d: %s", res.code, res.errorMessage())
	}
	if sum := res.summary(t); sum["started"] != true || sum["domain_uuid"] == d.UUID {
		t.Fatalf("summary %v", sum)
	}
	if s := libvirttest.Virsh(t, "domstate", started); !strings.Contains(s, "running") {
		t.Fatalf("domain restored with --start is %s", s)
	}
	src.WaitConsole(t, guestvm.ReadyMarker, 5*time.Minute)
	if con := src.Console(); !strings.Contains(con, "mounted /dev/vda on /data") {
		t.Fatalf("the restored guest did not mount its restored disk:\n%s", con)
	}
}
