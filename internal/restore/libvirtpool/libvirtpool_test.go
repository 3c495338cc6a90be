package libvirtpool_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/guestvm"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/libvirttest"
	lv "github.com/vmshadow/vmshadow/internal/provider/libvirt"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/restore"
	"github.com/vmshadow/vmshadow/internal/restore/libvirtpool"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

func TestMain(m *testing.M) { os.Exit(libvirttest.Main(m)) }

const mib = 1 << 20

// uniqueName is a libvirt object name unique to this branch's tests.
func uniqueName(what string) string {
	var b [4]byte
	rand.Read(b[:])
	return "vmshadow-lvrestore-" + what + "-" + hex.EncodeToString(b[:])
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newPool defines and starts a dir pool in a new directory, destroyed and
// undefined (its volumes deleted) when the test ends.
func newPool(t *testing.T) (name, dir string) {
	t.Helper()
	libvirttest.Need(t)
	dir = libvirttest.TempDir(t)
	name = uniqueName("pool")
	libvirttest.Virsh(t, "pool-define-as", name, "dir", "--target", dir)
	t.Cleanup(func() {
		out, _ := libvirttest.VirshErr("vol-list", name)
		for _, v := range volNames(out) {
			libvirttest.VirshErr("vol-delete", v, "--pool", name)
		}
		libvirttest.VirshErr("pool-destroy", name)
		if _, err := libvirttest.VirshErr("pool-undefine", name); err != nil {
			t.Logf("pool-undefine %s: %v", name, err)
		}
	})
	libvirttest.Virsh(t, "pool-start", name)
	return name, dir
}

// removeDomain undefines domain name (stopping it) when the test ends.
func removeDomain(t *testing.T, name string) {
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

func volumes(t *testing.T, pool string) []string {
	t.Helper()
	libvirttest.Virsh(t, "pool-refresh", pool)
	v := volNames(libvirttest.Virsh(t, "vol-list", pool))
	slices.Sort(v)
	return v
}

// volNames are the names in virsh vol-list's table (this virsh has no
// --name).
func volNames(out string) []string {
	var names []string
	rows := false
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) > 0 && strings.HasPrefix(f[0], "---"):
			rows = true
		case rows && len(f) > 0:
			names = append(names, f[0])
		}
	}
	return names
}

func domainExists(name string) bool {
	_, err := libvirttest.VirshErr("domstate", name)
	return err == nil
}

// stored is a backup in a fresh repository.
type stored struct {
	r   *repo.Repo
	dir string
	m   *repo.Manifest
}

// backupDisks backs up the named disk images (raw files) with the given
// files describing the VM.
func backupDisks(t *testing.T, vm string, disks [][2]string, files map[string][]byte) *stored {
	t.Helper()
	ctx := ctxFor(t)
	dir := filepath.Join(t.TempDir(), "repo")
	be, err := local.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(ctx, be, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: repo.MinChunkSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	job := backup.Job{VM: vm}
	for _, d := range disks {
		im, err := imagefile.Open(d[0], d[1])
		if err != nil {
			t.Fatal(err)
		}
		defer im.Close()
		job.Disks = append(job.Disks, backup.Disk{Source: im})
	}
	for _, name := range slices.Sorted(func(yield func(string) bool) {
		for k := range files {
			if !yield(k) {
				return
			}
		}
	}) {
		job.Files = append(job.Files, backup.Bytes(name, files[name]))
		job.Definition = repo.DefinitionLibvirt
	}
	res, err := backup.Run(ctx, r, job, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return &stored{r: r, dir: dir, m: res.Manifest}
}

// writeImage writes a raw image of size bytes: random data, text and
// holes.
func writeImage(t *testing.T, path string, size int64, seed uint64) {
	t.Helper()
	rng := mrand.New(mrand.NewPCG(seed, 7))
	img := make([]byte, size)
	const seg = 192 << 10
	for off := int64(0); off < size; off += seg {
		s := img[off:min(off+seg, size)]
		switch rng.IntN(3) {
		case 0:
			for i := range s {
				s[i] = byte(rng.Uint32())
			}
		case 1:
			for i := range s {
				s[i] = "vmshadow"[i%8]
			}
		}
	}
	if err := os.WriteFile(path, img, 0o644); err != nil {
		t.Fatal(err)
	}
}

// sameImage fails unless the volume holds exactly the raw image's bytes.
func sameImage(t *testing.T, raw, vol, format string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-U", "-f", "raw", "-F", format, raw, vol).CombinedOutput()
	if err != nil {
		t.Fatalf("volume %s differs from the backed-up image %s: %v: %s", vol, raw, err, out)
	}
	out, err = exec.Command("qemu-img", "info", "-U", "--output=json", "-f", format, vol).Output()
	var info struct {
		Size int64 `json:"virtual-size"`
	}
	if err == nil {
		err = json.Unmarshal(out, &info)
	}
	st, serr := os.Stat(raw)
	if err != nil || serr != nil || info.Size != st.Size() {
		t.Fatalf("volume %s: %d bytes (%v), the image %d (%v)", vol, info.Size, err, st.Size(), serr)
	}
	if format == "qcow2" {
		if out, err := exec.Command("qemu-img", "check", "-U", vol).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check %s: %v: %s", vol, err, out)
		}
	}
}

type domXML struct {
	Type   string `xml:"type,attr"`
	Name   string `xml:"name"`
	UUID   string `xml:"uuid"`
	Memory struct {
		Unit  string `xml:"unit,attr"`
		Value int64  `xml:",chardata"`
	} `xml:"memory"`
	VCPU  int    `xml:"vcpu"`
	NVRAM string `xml:"os>nvram"`
	Disks []struct {
		Type   string `xml:"type,attr"`
		Device string `xml:"device,attr"`
		Driver struct {
			Type string `xml:"type,attr"`
		} `xml:"driver"`
		Source *struct {
			File string `xml:"file,attr"`
		} `xml:"source"`
		Target struct {
			Dev string `xml:"dev,attr"`
			Bus string `xml:"bus,attr"`
		} `xml:"target"`
	} `xml:"devices>disk"`
	Interfaces []struct {
		MAC struct {
			Address string `xml:"address,attr"`
		} `xml:"mac"`
	} `xml:"devices>interface"`
}

func dumpXML(t *testing.T, name string, flags ...string) domXML {
	t.Helper()
	out := libvirttest.Virsh(t, append([]string{"dumpxml", name}, flags...)...)
	var d domXML
	if err := xml.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("dumpxml %s: %v", name, err)
	}
	return d
}

// TestRestoreMinimalDefinition: a backup without a definition (two disks,
// one of a size no chunk divides) is restored into qcow2 volumes of a dir
// pool holding exactly the backup's bytes, and a minimal domain is
// defined on them.
func TestRestoreMinimalDefinition(t *testing.T) {
	pool, pdir := newPool(t)
	ctx := ctxFor(t)
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.raw")
	writeImage(t, a, 6*mib, 1)
	writeImage(t, b, 3*mib+5*4096, 2)
	s := backupDisks(t, "db1", [][2]string{{"drive-virtio-disk0", a}, {"ide0-hd1", b}}, nil)
	name := uniqueName("dom")
	removeDomain(t, name)
	var warnings []string
	o := libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: name, MemoryMB: 256, VCPUs: 2, Warn: func(w string) { warnings = append(warnings, w) }}
	if err := o.Stored(ctx, s.r, s.m); err != nil || o.Definition != nil {
		t.Fatalf("Stored of a backup without a definition: %v, %d bytes", err, len(o.Definition))
	}
	tg, err := libvirtpool.New(ctx, s.m, s.m.Disks, o)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	out, err := restore.Run(ctx, s.r, s.m.Disks, tg, restore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	res := tg.Result()
	want := []string{name + "-drive-virtio-disk0.qcow2", name + "-ide0-hd1.qcow2"}
	if got := volumes(t, pool); !slices.Equal(got, want) {
		t.Fatalf("pool volumes %v, want %v", got, want)
	}
	if len(out) != 2 || !out[0].Verified || out[0].Path != pool+"/"+want[0] {
		t.Fatalf("restore results %+v", out)
	}
	for i, raw := range []string{a, b} {
		sameImage(t, raw, filepath.Join(pdir, want[i]), "qcow2")
		if v := res.Volumes[i]; v.Path != filepath.Join(pdir, want[i]) || v.Format != "qcow2" || v.Target != []string{"vda", "vdb"}[i] {
			t.Errorf("result volume %d: %+v", i, v)
		}
	}
	d := dumpXML(t, name, "--inactive")
	if d.Type != "kvm" && d.Type != "qemu" || d.Memory.Value != 256*1024 || d.VCPU != 2 || d.UUID != res.UUID || res.Definition != "minimal" {
		t.Errorf("defined domain: type %s, memory %d %s, vcpus %d, uuid %s (result %s), definition %s", d.Type, d.Memory.Value, d.Memory.Unit, d.VCPU, d.UUID, res.UUID, res.Definition)
	}
	if len(d.Disks) != 2 {
		t.Fatalf("domain disks %+v", d.Disks)
	}
	for i, disk := range d.Disks {
		if disk.Type != "file" || disk.Source == nil || disk.Source.File != filepath.Join(pdir, want[i]) || disk.Driver.Type != "qcow2" ||
			disk.Target.Dev != []string{"vda", "vdb"}[i] || disk.Target.Bus != "virtio" {
			t.Errorf("domain disk %d: %+v", i, disk)
		}
	}
	info, netErr := libvirttest.VirshErr("net-info", "default")
	active := netErr == nil && regexp.MustCompile(`(?m)^Active:\s+yes`).MatchString(info)
	if hasNIC := len(d.Interfaces) > 0; hasNIC != active || !active && len(warnings) != 1 {
		t.Errorf("network 'default' active: %v, interfaces %+v, warnings %q", active, d.Interfaces, warnings)
	}
}

// guestDefinition is a domain definition of the project's test guest on
// the raw data disk, with a UUID and a NIC with a fixed MAC address, as a
// backup stores it.
func guestDefinition(t *testing.T, data string) (*libvirttest.Domain, string) {
	opts := libvirttest.GuestOptions(t, libvirttest.Disk{Target: "vda", Format: "raw", Path: data})
	opts.Devices = "    <interface type='user'>\n      <mac address='52:54:00:5e:ed:01'/>\n      <model type='virtio'/>\n    </interface>\n"
	dom := libvirttest.NewDomain(t, opts)
	x := dom.XML()
	x = strings.Replace(x, "</name>", "</name>\n  <uuid>6c3c2f4e-1f7a-4f57-9b1e-6a2b5c0d9e01</uuid>", 1)
	return dom, x
}

// TestRestoreStoredDefinitionBoots: the test guest's disk and stored
// definition restore into a new domain with a new name, UUID and MAC on
// the new volume, which boots the guest.
func TestRestoreStoredDefinitionBoots(t *testing.T) {
	pool, pdir := newPool(t)
	ctx := ctxFor(t)
	dir := libvirttest.TempDir(t)
	data := filepath.Join(dir, "data.raw")
	if err := guestvm.MakeDataDisk(ctx, data, 64*mib, "raw"); err != nil {
		t.Fatal(err)
	}
	src, def := guestDefinition(t, data)
	s := backupDisks(t, src.Name, [][2]string{{"vda", data}}, map[string][]byte{repo.FileDomainXML: []byte(def)})
	name := uniqueName("dom")
	removeDomain(t, name)
	o := libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: name}
	if err := o.Stored(ctx, s.r, s.m); err != nil || string(o.Definition) != def {
		t.Fatalf("Stored: %v; definition %q", err, o.Definition)
	}
	tg, err := libvirtpool.New(ctx, s.m, s.m.Disks, o)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	if _, err := restore.Run(ctx, s.r, s.m.Disks, tg, restore.Options{}); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(pdir, name+"-vda.qcow2")
	sameImage(t, data, vol, "qcow2")
	d := dumpXML(t, name, "--inactive")
	if d.UUID == "" || d.UUID == "6c3c2f4e-1f7a-4f57-9b1e-6a2b5c0d9e01" || len(d.Interfaces) != 1 || d.Interfaces[0].MAC.Address == "" || d.Interfaces[0].MAC.Address == "52:54:00:5e:ed:01" {
		t.Errorf("new domain: uuid %s, interfaces %+v; want a new UUID and MAC", d.UUID, d.Interfaces)
	}
	if len(d.Disks) != 1 || d.Disks[0].Source == nil || d.Disks[0].Source.File != vol || d.Disks[0].Driver.Type != "qcow2" {
		t.Fatalf("new domain's disks %+v, want vda on %s (qcow2)", d.Disks, vol)
	}
	if err := tg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if !tg.Result().Started {
		t.Error("result does not say started")
	}
	// The stored definition's serial console is the source domain's file;
	// that domain never ran.
	src.WaitConsole(t, guestvm.ReadyMarker, 5*time.Minute)
	if con := src.Console(); !strings.Contains(con, "mounted /dev/vda on /data") {
		t.Fatalf("the guest did not mount its restored disk:\n%s", con)
	}
}

// TestFailedRestoreRemovesWhatItCreated: a damaged chunk in the second
// disk, a volume name taken during the restore, and a domain name taken
// before the definition each fail the restore, which leaves no volume,
// NVRAM file or domain of its own, and what others created untouched.
func TestFailedRestoreRemovesWhatItCreated(t *testing.T) {
	pool, _ := newPool(t)
	ctx := ctxFor(t)
	dir := libvirttest.TempDir(t)
	a, b := filepath.Join(dir, "vda.raw"), filepath.Join(dir, "vdb.raw")
	writeImage(t, a, 4*mib, 3)
	writeImage(t, b, 4*mib, 4)
	nvram := []byte(strings.Repeat("uefi variables ", 1000))
	def := fmt.Sprintf(`<domain type='qemu'><name>src</name><memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram>%s/src_VARS.fd</nvram></os><features><acpi/></features>
  <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s'/><target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s'/><target dev='vdb' bus='virtio'/></disk></devices></domain>`, dir, a, b)
	s := backupDisks(t, "src", [][2]string{{"vda", a}, {"vdb", b}}, map[string][]byte{repo.FileDomainXML: []byte(def), repo.FileNVRAM: nvram})

	restoreWith := func(t *testing.T, name string, between func()) error {
		t.Helper()
		removeDomain(t, name)
		o := libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: name}
		if err := o.Stored(ctx, s.r, s.m); err != nil || len(o.NVRAM) != len(nvram) {
			t.Fatalf("Stored: %v, nvram %d bytes", err, len(o.NVRAM))
		}
		tg, err := libvirtpool.New(ctx, s.m, s.m.Disks, o)
		if err != nil {
			t.Fatal(err)
		}
		defer tg.Close()
		between()
		_, err = restore.Run(ctx, s.r, s.m.Disks, tg, restore.Options{})
		return err
	}
	nvramFile := func(name string) string { return filepath.Join(dir, name+"_VARS.fd") }

	t.Run("success", func(t *testing.T) {
		name := uniqueName("dom")
		if err := restoreWith(t, name, func() {}); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(nvramFile(name)); err != nil || string(got) != string(nvram) {
			t.Fatalf("NVRAM file: %v, %d bytes; want the %d stored", err, len(got), len(nvram))
		}
		if d := dumpXML(t, name, "--inactive"); d.NVRAM != nvramFile(name) {
			t.Fatalf("domain's nvram %q, want %s", d.NVRAM, nvramFile(name))
		}
		libvirttest.Virsh(t, "undefine", name, "--nvram")
		for _, v := range volumes(t, pool) {
			libvirttest.Virsh(t, "vol-delete", v, "--pool", pool)
		}
		if _, err := os.Stat(nvramFile(name)); err == nil {
			os.Remove(nvramFile(name))
		}
	})

	t.Run("volume name taken", func(t *testing.T) {
		name := uniqueName("dom")
		other := name + "-vdb.qcow2"
		err := restoreWith(t, name, func() {
			libvirttest.Virsh(t, "vol-create-as", pool, other, "1M", "--format", "qcow2")
		})
		if !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "exists already") {
			t.Fatalf("restore onto a taken volume name: %v, want ErrUsage saying it exists", err)
		}
		if got := volumes(t, pool); !slices.Equal(got, []string{other}) {
			t.Fatalf("pool volumes after the failure %v, want only the other's %s", got, other)
		}
		libvirttest.Virsh(t, "vol-delete", other, "--pool", pool)
		if domainExists(name) {
			t.Fatal("domain defined after the failure")
		}
	})

	t.Run("domain name taken", func(t *testing.T) {
		name := uniqueName("dom")
		err := restoreWith(t, name, func() {
			x := filepath.Join(t.TempDir(), "d.xml")
			os.WriteFile(x, []byte("<domain type='qemu'><name>"+name+"</name><memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type></os></domain>"), 0o644)
			libvirttest.Virsh(t, "define", x)
		})
		if err == nil || !strings.Contains(err.Error(), "define domain "+name) {
			t.Fatalf("restore onto a taken domain name: %v", err)
		}
		if got := volumes(t, pool); len(got) != 0 {
			t.Fatalf("pool volumes after the failure %v", got)
		}
		if _, err := os.Stat(nvramFile(name)); err == nil {
			t.Fatal("NVRAM file left after the failure")
		}
		if d := dumpXML(t, name, "--inactive"); len(d.Disks) != 0 {
			t.Fatalf("the other domain %s was changed: %+v", name, d)
		}
	})

	t.Run("damaged chunk", func(t *testing.T) {
		x, err := restore.LoadIndex(ctx, s.r, s.m.Disks[1])
		if err != nil {
			t.Fatal(err)
		}
		var id repo.ID
		for i := range x.Len() {
			if !x.ID(i).IsZero() {
				id = x.ID(i)
			}
		}
		p := filepath.Join(s.dir, "chunks", id.String()[:2], id.String())
		c, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		c[len(c)/2] ^= 4
		if err := os.WriteFile(p, c, 0o600); err != nil {
			t.Fatal(err)
		}
		name := uniqueName("dom")
		err = restoreWith(t, name, func() {})
		if !errors.Is(err, errs.ErrCorrupt) || !strings.Contains(err.Error(), "disk vdb") {
			t.Fatalf("restore of a damaged backup: %v, want ErrCorrupt on disk vdb", err)
		}
		if got := volumes(t, pool); len(got) != 0 {
			t.Fatalf("pool volumes after the failure %v", got)
		}
		if domainExists(name) {
			t.Fatal("domain defined after the failure")
		}
		if _, err := os.Stat(nvramFile(name)); err == nil {
			t.Fatal("NVRAM file left after the failure")
		}
	})
}

// TestRefusedBeforeCreating: what New can check is refused with a clear
// error before anything is created.
func TestRefusedBeforeCreating(t *testing.T) {
	pool, _ := newPool(t)
	ctx := ctxFor(t)
	dir := t.TempDir()
	a := filepath.Join(dir, "vda.raw")
	writeImage(t, a, 1*mib, 5)
	s := backupDisks(t, "web", [][2]string{{"vda", a}}, nil)

	taken := uniqueName("dom")
	removeDomain(t, taken)
	x := filepath.Join(dir, "d.xml")
	os.WriteFile(x, []byte("<domain type='qemu'><name>"+taken+"</name><memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type></os></domain>"), 0o644)
	libvirttest.Virsh(t, "define", x)
	volTaken := uniqueName("dom")
	libvirttest.Virsh(t, "vol-create-as", pool, volTaken+"-vda.qcow2", "1M", "--format", "qcow2")
	inactive := uniqueName("pool")
	libvirttest.Virsh(t, "pool-define-as", inactive, "dir", "--target", dir)
	t.Cleanup(func() { libvirttest.VirshErr("pool-undefine", inactive) })

	cases := []struct {
		name string
		o    libvirtpool.Options
		want error
		msg  string
	}{
		{"remote URI", libvirtpool.Options{URI: "qemu+ssh://root@host/system", Pool: pool}, errs.ErrUsage, "run it there with a local URI"},
		{"not qemu", libvirtpool.Options{URI: "xen:///system", Pool: pool}, errs.ErrUsage, `driver "xen" is not supported`},
		{"no pool", libvirtpool.Options{URI: libvirttest.URI}, errs.ErrUsage, "--pool NAME"},
		{"missing pool", libvirtpool.Options{URI: libvirttest.URI, Pool: "vmshadow-lvrestore-nosuch"}, errs.ErrNotFound, `no storage pool "vmshadow-lvrestore-nosuch"`},
		{"inactive pool", libvirtpool.Options{URI: libvirttest.URI, Pool: inactive}, errs.ErrUsage, "virsh pool-start " + inactive},
		{"domain exists", libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: taken}, errs.ErrUsage, "already has a domain"},
		{"volume exists", libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: volTaken}, errs.ErrUsage, "already has a volume " + volTaken + "-vda.qcow2"},
		{"bad name", libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: "a/b"}, errs.ErrUsage, "without '/'"},
		{"definition without the disk", libvirtpool.Options{URI: libvirttest.URI, Pool: pool, Definition: []byte("<domain><devices><disk><target dev='sda'/></disk></devices></domain>")}, errs.ErrCorrupt, "<target dev='vda'>"},
		{"hostile definition", libvirtpool.Options{URI: libvirttest.URI, Pool: pool, Definition: []byte(`<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/shadow">]><domain>&e;</domain>`)}, errs.ErrCorrupt, "DTD"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tg, err := libvirtpool.New(ctx, s.m, s.m.Disks, c.o)
			if err == nil {
				tg.Close()
			}
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("error %v, want %v saying %q", err, c.want, c.msg)
			}
		})
	}
	if got := volumes(t, pool); !slices.Equal(got, []string{volTaken + "-vda.qcow2"}) {
		t.Fatalf("pool volumes %v: something was created", got)
	}
}

// TestStartFailureKeepsRestore: a domain that does not start (its kernel is
// gone) is reported with what to do, and the restore stays: the domain
// defined, its volume in the pool.
func TestStartFailureKeepsRestore(t *testing.T) {
	pool, pdir := newPool(t)
	ctx := ctxFor(t)
	dir := t.TempDir()
	a := filepath.Join(dir, "vda.raw")
	writeImage(t, a, 1*mib, 6)
	def := `<domain type='qemu'><name>k</name><memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type><kernel>/nonexistent/vmshadow-lvrestore/vmlinuz</kernel></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/old/vda.raw'/><target dev='vda' bus='virtio'/></disk></devices></domain>`
	s := backupDisks(t, "k", [][2]string{{"vda", a}}, map[string][]byte{repo.FileDomainXML: []byte(def)})
	name := uniqueName("dom")
	removeDomain(t, name)
	o := libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: name}
	if err := o.Stored(ctx, s.r, s.m); err != nil {
		t.Fatal(err)
	}
	tg, err := libvirtpool.New(ctx, s.m, s.m.Disks, o)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	if _, err := restore.Run(ctx, s.r, s.m.Disks, tg, restore.Options{}); err != nil {
		t.Fatal(err)
	}
	err = tg.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "the restore is complete, but domain "+name+" does not start") || !strings.Contains(err.Error(), "virsh start "+name) {
		t.Fatalf("start of a domain without its kernel: %v", err)
	}
	if tg.Result().Started || !domainExists(name) {
		t.Fatalf("after the failed start: started %v, domain defined %v", tg.Result().Started, domainExists(name))
	}
	if got := volumes(t, pool); !slices.Equal(got, []string{name + "-vda.qcow2"}) {
		t.Fatalf("pool volumes %v", got)
	}
	sameImage(t, a, filepath.Join(pdir, name+"-vda.qcow2"), "qcow2")
}

// tpmName is a domain name unique to this branch's TPM tests.
func tpmName() string {
	var b [4]byte
	rand.Read(b[:])
	return "vmshadow-tpm-" + hex.EncodeToString(b[:])
}

// tpmDef is a stored definition with an emulated TPM 2.0.
func tpmDef(disk string) string {
	return fmt.Sprintf(`<domain type='qemu'><name>src</name><memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='%s'/><target dev='vda' bus='virtio'/></disk>
  <tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm></devices></domain>`, disk)
}

// watchCreated reports the names created in dir from now on (inotify),
// until the returned function is called.
func watchCreated(t *testing.T, dir string) func() []string {
	t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := syscall.InotifyAddWatch(fd, dir, syscall.IN_CREATE); err != nil {
		syscall.Close(fd)
		t.Fatal(err)
	}
	return func() []string {
		defer syscall.Close(fd)
		var names []string
		buf := make([]byte, 64<<10)
		for {
			n, err := syscall.Read(fd, buf)
			if n <= 0 || err != nil {
				return names
			}
			for off := 0; off+syscall.SizeofInotifyEvent <= n; {
				ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
				name := buf[off+syscall.SizeofInotifyEvent : off+syscall.SizeofInotifyEvent+int(ev.Len)]
				names = append(names, strings.TrimRight(string(name), "\x00"))
				off += syscall.SizeofInotifyEvent + int(ev.Len)
			}
		}
	}
}

// TestRestoreTPMState: the TPM state a backup stores goes into swtpm's
// directory for the new domain's UUID, the .lock file older backups
// stored left out; a restore that fails after writing it (the domain's
// name taken before the definition) removes the directory again, and
// touches no other TPM's state.
func TestRestoreTPMState(t *testing.T) {
	pool, _ := newPool(t)
	ctx := ctxFor(t)
	dir := libvirttest.TempDir(t)
	a := filepath.Join(dir, "vda.raw")
	writeImage(t, a, 1*mib, 8)
	permall := make([]byte, 5000)
	rand.Read(permall)
	s := backupDisks(t, "src", [][2]string{{"vda", a}}, map[string][]byte{
		repo.FileDomainXML: []byte(tpmDef(a)), repo.FileTPMPrefix + "tpm2-00.permall": permall, repo.FileTPMPrefix + ".lock": nil})
	if err := os.MkdirAll(lv.SWTPMStateDir, 0o711); err != nil {
		t.Fatal(err)
	}

	restoreWith := func(t *testing.T, name string, between func()) (*libvirtpool.Target, []string, error) {
		t.Helper()
		removeDomain(t, name)
		var warnings []string
		o := libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: name, Warn: func(s string) { warnings = append(warnings, s) }}
		if err := o.Stored(ctx, s.r, s.m); err != nil {
			t.Fatal(err)
		}
		if len(o.TPMState) != 1 || !bytes.Equal(o.TPMState["tpm2-00.permall"], permall) {
			t.Fatalf("Stored's TPM state: %d files", len(o.TPMState))
		}
		tg, err := libvirtpool.New(ctx, s.m, s.m.Disks, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tg.Close() })
		between()
		_, err = restore.Run(ctx, s.r, s.m.Disks, tg, restore.Options{})
		return tg, warnings, err
	}

	t.Run("success", func(t *testing.T) {
		name := tpmName()
		tg, warnings, err := restoreWith(t, name, func() {})
		if err != nil {
			t.Fatal(err)
		}
		res := tg.Result()
		t.Cleanup(func() { os.RemoveAll(filepath.Join(lv.SWTPMStateDir, res.UUID)) })
		if d := dumpXML(t, name, "--inactive"); d.UUID != res.UUID || res.UUID == "" {
			t.Fatalf("domain UUID %s, result's %s", d.UUID, res.UUID)
		}
		want := filepath.Join(lv.SWTPMStateDir, res.UUID, "tpm2")
		if res.TPMState != want {
			t.Fatalf("TPM state put in %q, want %s", res.TPMState, want)
		}
		entries, err := os.ReadDir(want)
		if err != nil || len(entries) != 1 || entries[0].Name() != "tpm2-00.permall" {
			t.Fatalf("TPM state directory holds %v (%v), want tpm2-00.permall alone", entries, err)
		}
		if got, err := os.ReadFile(filepath.Join(want, "tpm2-00.permall")); err != nil || !bytes.Equal(got, permall) {
			t.Fatalf("TPM state file differs from the stored one (%v)", err)
		}
		for _, w := range warnings {
			if strings.Contains(w, "TPM") {
				t.Errorf("warning %q", w)
			}
		}
		libvirttest.Virsh(t, "undefine", name)
		for _, v := range volumes(t, pool) {
			libvirttest.Virsh(t, "vol-delete", v, "--pool", pool)
		}
	})

	t.Run("domain name taken", func(t *testing.T) {
		name := tpmName()
		var created func() []string
		_, _, err := restoreWith(t, name, func() {
			x := filepath.Join(t.TempDir(), "d.xml")
			os.WriteFile(x, []byte("<domain type='qemu'><name>"+name+"</name><memory unit='MiB'>32</memory><os><type arch='x86_64'>hvm</type></os></domain>"), 0o644)
			libvirttest.Virsh(t, "define", x)
			created = watchCreated(t, lv.SWTPMStateDir)
		})
		if err == nil || !strings.Contains(err.Error(), "define domain "+name) {
			t.Fatalf("restore onto a taken domain name: %v", err)
		}
		// The restore created its TPM state directory (named after a UUID
		// no domain has) and removed it; a directory that another test's
		// domain created meanwhile is that domain's.
		ours := 0
		for _, n := range created() {
			if _, err := libvirttest.VirshErr("domname", n); err == nil {
				continue
			}
			ours++
			if _, err := os.Lstat(filepath.Join(lv.SWTPMStateDir, n)); err == nil {
				os.RemoveAll(filepath.Join(lv.SWTPMStateDir, n))
				t.Errorf("TPM state directory %s left after the failed restore", n)
			}
		}
		if ours != 1 {
			t.Errorf("the restore created %d TPM state directories, want 1 (written, then removed)", ours)
		}
		if got := volumes(t, pool); len(got) != 0 {
			t.Fatalf("pool volumes after the failure %v", got)
		}
	})
}

// TestRestoreTPM12State: a TPM 1.2's state (manufactured by swtpm_setup)
// goes into tpm1.2/, where libvirt finds it: the restored domain starts on
// it without a new manufacture.
func TestRestoreTPM12State(t *testing.T) {
	pool, _ := newPool(t)
	testutil.NeedCommand(t, "swtpm_setup")
	ctx := ctxFor(t)
	dir := libvirttest.TempDir(t)
	a := filepath.Join(dir, "vda.raw")
	writeImage(t, a, 1*mib, 9)
	state := t.TempDir()
	if out, err := exec.Command("swtpm_setup", "--tpm-state", state, "--createek", "--not-overwrite").CombinedOutput(); err != nil {
		t.Fatalf("swtpm_setup (TPM 1.2): %v: %s", err, out)
	}
	permall, err := os.ReadFile(filepath.Join(state, "tpm-00.permall"))
	if err != nil {
		t.Fatal(err)
	}
	def := strings.Replace(tpmDef(a), "version='2.0'", "version='1.2'", 1)
	s := backupDisks(t, "src", [][2]string{{"vda", a}}, map[string][]byte{repo.FileDomainXML: []byte(def), repo.FileTPMPrefix + "tpm-00.permall": permall})
	name := tpmName()
	removeDomain(t, name)
	o := libvirtpool.Options{URI: libvirttest.URI, Pool: pool, VMName: name}
	if err := o.Stored(ctx, s.r, s.m); err != nil {
		t.Fatal(err)
	}
	tg, err := libvirtpool.New(ctx, s.m, s.m.Disks, o)
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	if _, err := restore.Run(ctx, s.r, s.m.Disks, tg, restore.Options{}); err != nil {
		t.Fatal(err)
	}
	res := tg.Result()
	t.Cleanup(func() { os.RemoveAll(filepath.Join(lv.SWTPMStateDir, res.UUID)) })
	if want := filepath.Join(lv.SWTPMStateDir, res.UUID, "tpm1.2"); res.TPMState != want {
		t.Fatalf("TPM state put in %q, want %s", res.TPMState, want)
	}
	if got, err := os.ReadFile(filepath.Join(res.TPMState, "tpm-00.permall")); err != nil || !bytes.Equal(got, permall) {
		t.Fatalf("TPM state file differs from the stored one (%v)", err)
	}
	if err := tg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	libvirttest.Virsh(t, "destroy", name)
	if log, err := os.ReadFile(libvirttest.SWTPMLog(name)); err == nil && strings.Contains(string(log), "manufacturing") {
		t.Fatalf("libvirt manufactured a new TPM 1.2 for the restored domain:\n%s", log)
	}
	if _, err := os.Stat(filepath.Join(res.TPMState, "tpm-00.permall")); err != nil {
		t.Fatalf("the TPM 1.2 state is gone after the domain ran: %v", err)
	}
}
