package libvirt_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/libvirttest"
	"github.com/vmshadow/vmshadow/internal/nbd"
	"github.com/vmshadow/vmshadow/internal/provider/libvirt"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/tracking"
)

func TestMain(m *testing.M) { os.Exit(libvirttest.Main(m)) }

const mib = 1 << 20

// rig is a running two-disk domain with no OS (qcow2 v3 vda, raw vdb),
// a journal and a scratch directory.
type rig struct {
	t       *testing.T
	dom     *libvirttest.Domain
	journal *coord.Journal
	scratch string
}

func newRig(t *testing.T) *rig {
	t.Helper()
	dom := libvirttest.NewDomain(t, libvirttest.Options{Disks: []libvirttest.Disk{
		{Target: "vda", Format: "qcow2", Size: 64 * mib},
		{Target: "vdb", Format: "raw", Size: 32 * mib},
	}})
	// Known content before the domain starts.
	dom.Write(t, "vda", 0x11, 0, 4*mib)
	dom.Write(t, "vda", 0x12, 40*mib, 3*mib)
	dom.Write(t, "vdb", 0x21, 1*mib, 2*mib)
	dom.Start(t)
	dir := libvirttest.TempDir(t)
	return &rig{t: t, dom: dom, journal: &coord.Journal{Dir: filepath.Join(dir, "journal")}, scratch: filepath.Join(dir, "scratch")}
}

// checkpoint is a set's change-tracking request on the rig's domain:
// Prefix's chain, and Incremental the previous checkpoint of every disk
// ("" for none: the first backup).
type checkpoint struct{ Prefix, Incremental string }

// request is cp as a tracking.Request, for disks of the given sizes.
func (cp *checkpoint) request(sizes map[string]int64) tracking.Request {
	req := tracking.Request{Prefix: cp.Prefix, Previous: map[string]tracking.Previous{}}
	if cp.Incremental != "" {
		for d, size := range sizes {
			req.Previous[d] = tracking.Previous{Checkpoint: cp.Incremental, Size: size}
		}
	}
	return req
}

var rigSizes = map[string]int64{"vda": 64 * mib, "vdb": 32 * mib}

func (r *rig) provider(cp *checkpoint) *libvirt.Provider {
	p := libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: r.dom.Name, ScratchDir: r.scratch})
	if cp != nil {
		p.Track(cp.request(rigSizes))
	}
	return p
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func (r *rig) open(ctx context.Context, p *libvirt.Provider, writers ...coord.Writer) *coord.Session {
	r.t.Helper()
	s, err := (&coord.Coordinator{Provider: p, Journal: r.journal, Writers: writers}).Open(ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { s.Close() })
	return s
}

// image returns the disk's content as qemu-img reads it now (-U: QEMU
// holds the image; the domain has no OS, so nothing writes to it).
func (r *rig) image(target string) []byte {
	r.t.Helper()
	out := filepath.Join(r.dom.Dir, target+".expect")
	d := r.dom.Disk(r.t, target)
	if b, err := exec.Command("qemu-img", "convert", "-U", "-f", d.Format, "-O", "raw", d.Path, out).CombinedOutput(); err != nil {
		r.t.Fatalf("qemu-img convert: %v: %s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		r.t.Fatal(err)
	}
	os.Remove(out)
	return b
}

// readShadow reads a whole shadow copy over NBD with vmshadow's client.
func readShadow(t *testing.T, ctx context.Context, sh coord.Shadow) []byte {
	t.Helper()
	c, err := nbd.DialURI(ctx, sh.NBD, nil)
	if err != nil {
		t.Fatalf("shadow %s: %v", sh.Disk, err)
	}
	defer c.Close()
	if c.Size() != sh.Size {
		t.Fatalf("shadow %s: export of %d bytes, set says %d", sh.Disk, c.Size(), sh.Size)
	}
	buf := make([]byte, c.Size())
	for off := int64(0); off < c.Size(); off += 4 * mib {
		if _, err := c.ReadAt(ctx, buf[off:min(off+4*mib, c.Size())], off); err != nil {
			t.Fatalf("shadow %s: read at %d: %v", sh.Disk, off, err)
		}
	}
	return buf
}

// dirty returns the dirty ranges of a shadow's exported bitmap.
func dirty(t *testing.T, ctx context.Context, sh coord.Shadow) []string {
	t.Helper()
	name := nbd.ContextDirtyBitmap(sh.Bitmap)
	c, err := nbd.DialURI(ctx, sh.NBD, &nbd.Options{MetaContexts: []string{name}})
	if err != nil {
		t.Fatalf("shadow %s with %s: %v", sh.Disk, name, err)
	}
	defer c.Close()
	var out []string
	for e, err := range c.Extents(ctx, name, 0, c.Size()) {
		if err != nil {
			t.Fatal(err)
		}
		if e.Flags&nbd.StateDirty != 0 {
			out = append(out, fmt.Sprintf("%d+%d", e.Offset, e.Length))
		}
	}
	return out
}

func sameContent(t *testing.T, what string, got, want []byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	if !bytes.Equal(got, want) {
		for i := 0; i < len(got); i += 64 << 10 {
			end := min(i+64<<10, len(got))
			if !bytes.Equal(got[i:end], want[i:end]) {
				t.Fatalf("%s differs first in the 64 KiB at offset %d (got %x..., want %x...)", what, i, got[i:i+8], want[i:i+8])
			}
		}
	}
}

func shadow(t *testing.T, set *coord.Set, disk string) coord.Shadow {
	t.Helper()
	for _, sh := range set.Shadows {
		if sh.Disk == disk {
			return sh
		}
	}
	t.Fatalf("set %s has no shadow of %s: %+v", set.ID, disk, set.Shadows)
	return coord.Shadow{}
}

// noJob checks with virsh that the domain has no job and no backup job.
func (r *rig) noJob() {
	r.t.Helper()
	info := libvirttest.Virsh(r.t, "domjobinfo", r.dom.Name)
	if !strings.Contains(info, "None") {
		r.t.Errorf("domain has a job after release:\n%s", info)
	}
	if out, err := libvirttest.VirshErr("backup-dumpxml", r.dom.Name); err == nil {
		r.t.Errorf("domain has a backup job after release:\n%s", out)
	}
}

func (r *rig) checkpoints() []string {
	r.t.Helper()
	return strings.Fields(libvirttest.Virsh(r.t, "checkpoint-list", r.dom.Name, "--name", "--topological"))
}

func (r *rig) scratchEmpty() {
	r.t.Helper()
	ents, err := os.ReadDir(r.scratch)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		r.t.Fatal(err)
	}
	if len(ents) > 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		r.t.Errorf("scratch dir not empty after release: %v", names)
	}
}

// TestFullThenIncremental takes a full set of a two-disk domain with a
// checkpoint, reads both shadows over NBD, and checks they hold the disks
// as at the set's instant even after the guest wrote over them; then an
// incremental whose dirty bitmap reports exactly what the guest wrote in
// between. Release leaves no job, no scratch file, and the checkpoint.
func TestFullThenIncremental(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	want := map[string][]byte{"vda": r.image("vda"), "vdb": r.image("vdb")}

	cp := &checkpoint{Prefix: "vmshadow-repo1"}
	p := r.provider(cp)
	s := r.open(ctx, p)
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(set.Shadows) != 2 {
		t.Fatalf("set has %d shadows, want 2: %+v", len(set.Shadows), set.Shadows)
	}
	for _, sh := range set.Shadows {
		if sh.Bitmap != "" || sh.FullReason == "" {
			t.Errorf("full set: shadow %s has bitmap %q, full reason %q", sh.Disk, sh.Bitmap, sh.FullReason)
		}
		sameContent(t, "shadow "+sh.Disk, readShadow(t, ctx, sh), want[sh.Disk])
	}
	// libvirt's API only: the domain is not tainted (checked before the
	// test's own monitor writes below, which do taint it).
	if lines := r.dom.Tainted(); len(lines) > 0 {
		t.Fatalf("domain tainted by the set:\n%s", strings.Join(lines, "\n"))
	}
	// The guest writes after the instant: the shadows do not change.
	r.dom.GuestWrite(t, "vda", 0x33, 0, 1*mib)
	r.dom.GuestWrite(t, "vdb", 0x44, 1*mib, 512<<10)
	if got := r.image("vda"); bytes.Equal(got, want["vda"]) {
		t.Fatal("the guest write did not reach vda")
	}
	for _, sh := range set.Shadows {
		sameContent(t, "shadow "+sh.Disk+" after guest writes", readShadow(t, ctx, sh), want[sh.Disk])
	}
	if err := p.Complete(set, s); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	r.noJob()
	r.scratchEmpty()
	first := "vmshadow-repo1-" + set.ID
	if got := r.checkpoints(); !slices.Equal(got, []string{first}) {
		t.Fatalf("checkpoints after the full set = %v, want [%s]", got, first)
	}
	s.Close()

	// Between the sets the guest writes two ranges on vda (64 KiB aligned:
	// the bitmaps' granularity) and one on vdb.
	r.dom.GuestWrite(t, "vda", 0x55, 8*mib, 128<<10)
	r.dom.GuestWrite(t, "vda", 0x56, 50*mib, 64<<10)
	r.dom.GuestWrite(t, "vdb", 0x66, 20*mib, 64<<10)
	want = map[string][]byte{"vda": r.image("vda"), "vdb": r.image("vdb")}

	cp2 := &checkpoint{Prefix: "vmshadow-repo1", Incremental: first}
	p2 := r.provider(cp2)
	s2 := r.open(ctx, p2)
	set2, err := s2.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, b := shadow(t, set2, "vda"), shadow(t, set2, "vdb")
	if a.Bitmap != "backup-vda" || a.FullReason != "" {
		t.Fatalf("incremental vda: bitmap %q, full reason %q", a.Bitmap, a.FullReason)
	}
	if b.Bitmap != "" || !strings.Contains(b.FullReason, "raw") {
		t.Fatalf("incremental vdb (raw): bitmap %q, full reason %q", b.Bitmap, b.FullReason)
	}
	// The first set's checkpoint started at its instant: the guest's write
	// while that set was exposed counts too.
	wantDirty := []string{fmt.Sprint(0, "+", 1*mib), fmt.Sprint(8*mib, "+", 128<<10), fmt.Sprint(50*mib, "+", 64<<10)}
	if got := dirty(t, ctx, a); !slices.Equal(got, wantDirty) {
		t.Fatalf("dirty ranges of vda = %v, want %v", got, wantDirty)
	}
	for _, sh := range set2.Shadows {
		sameContent(t, "incremental shadow "+sh.Disk, readShadow(t, ctx, sh), want[sh.Disk])
	}
	if err := p2.Complete(set2, s2); err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Delete(ctx, set2.ID); err != nil {
		t.Fatal(err)
	}
	r.noJob()
	r.scratchEmpty()
	second := "vmshadow-repo1-" + set2.ID
	if got := r.checkpoints(); !slices.Equal(got, []string{second}) {
		t.Fatalf("checkpoints after the incremental = %v, want [%s] (the base superseded)", got, second)
	}
}

// fsWriter is a writer that freezes and thaws fine at filesystem level:
// with application consistency required, the set fails after
// virDomainBackupBegin created the job and the checkpoint.
type fsWriter struct{}

func (fsWriter) Name() string                                    { return "fs-writer" }
func (fsWriter) Level() coord.Level                              { return coord.Filesystem }
func (fsWriter) Spec() coord.WriterSpec                          { return coord.WriterSpec{Kind: "test"} }
func (fsWriter) Prepare(context.Context, coord.SetContext) error { return nil }
func (fsWriter) Freeze(context.Context) error                    { return nil }
func (fsWriter) Thaw(context.Context) error                      { return nil }
func (fsWriter) Close() error                                    { return nil }

// TestFailedSetLosesNoChange: an incremental set that fails after the
// backup job and its checkpoint were created leaves no job, no scratch and
// no new checkpoint, and the base checkpoint still reports every change
// since it (libvirt merged the failed set's bitmap into it).
func TestFailedSetLosesNoChange(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	cp := &checkpoint{Prefix: "vmshadow-repo2"}
	p := r.provider(cp)
	s := r.open(ctx, p)
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Complete(set, s); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	s.Close()
	base := "vmshadow-repo2-" + set.ID

	r.dom.GuestWrite(t, "vda", 0x71, 2*mib, 64<<10)
	p2 := r.provider(&checkpoint{Prefix: "vmshadow-repo2", Incremental: base})
	c2 := &coord.Coordinator{Provider: p2, Journal: r.journal, Writers: []coord.Writer{fsWriter{}}}
	c2.Require = coord.Application
	s2, err := c2.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s2.Create(ctx); !errors.Is(err, errs.ErrConsistency) {
		t.Fatalf("set short of the required consistency: err = %v, want ErrConsistency", err)
	}
	s2.Close()
	r.noJob()
	r.scratchEmpty()
	if got := r.checkpoints(); !slices.Equal(got, []string{base}) {
		t.Fatalf("checkpoints after the failed set = %v, want [%s]", got, base)
	}

	// Written after the failed set's instant: the next incremental must
	// report both ranges.
	r.dom.GuestWrite(t, "vda", 0x72, 30*mib, 64<<10)
	p3 := r.provider(&checkpoint{Prefix: "vmshadow-repo2", Incremental: base})
	s3 := r.open(ctx, p3)
	set3, err := s3.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{fmt.Sprint(2*mib, "+", 64<<10), fmt.Sprint(30*mib, "+", 64<<10)}
	if got := dirty(t, ctx, shadow(t, set3, "vda")); !slices.Equal(got, want) {
		t.Fatalf("dirty ranges after a failed set = %v, want %v", got, want)
	}
	if _, err := s3.Delete(ctx, set3.ID); err != nil { // not completed: its checkpoint goes
		t.Fatal(err)
	}
	if got := r.checkpoints(); !slices.Equal(got, []string{base}) {
		t.Fatalf("checkpoints after an uncompleted set = %v, want [%s]", got, base)
	}
	r.noJob()
}

// TestRecoverLeftoverJob: a set whose process died (journal record lost)
// leaves a running backup job; the next set refuses with ErrBusy naming
// it, and Release(nil) aborts it and removes its directory.
func TestRecoverLeftoverJob(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	p := r.provider(nil)
	s := r.open(ctx, p)
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	os.RemoveAll(r.journal.Dir) // the record is lost with the process
	if _, err := libvirttest.VirshErr("backup-dumpxml", r.dom.Name); err != nil {
		t.Fatalf("no backup job left to recover: %v", err)
	}

	p2 := r.provider(nil)
	s2 := r.open(ctx, p2) // Identify
	err = p2.Prepare(ctx, &coord.Set{ID: coord.NewSetID()}, s2)
	if !errors.Is(err, errs.ErrBusy) || !strings.Contains(err.Error(), "recover") {
		t.Fatalf("set over a leftover job: err = %v, want ErrBusy telling to recover", err)
	}
	removed, err := p2.Release(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(removed, "backup job") {
		t.Errorf("Release(nil) removed %v, want the backup job", removed)
	}
	r.noJob()
	r.scratchEmpty()
	// Idempotent.
	if removed, err := p2.Release(ctx, nil); err != nil || len(removed) > 0 {
		t.Fatalf("second Release(nil) = %v, %v; want nothing", removed, err)
	}
	if removed, err := p2.Release(ctx, set); err != nil || len(removed) > 0 {
		t.Fatalf("Release of the recovered set = %v, %v; want nothing", removed, err)
	}
	// A set can be taken again.
	if _, err := s2.Create(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestForeignBackupJob: another tool's backup job makes the set fail with
// ErrBusy naming the job, and vmshadow leaves it alone.
func TestForeignBackupJob(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	other := filepath.Join(r.dom.Dir, "other")
	os.Mkdir(other, 0o777)
	os.Chmod(other, 0o777) // QEMU (libvirt-qemu) creates the socket
	sock := filepath.Join(other, "nbd.sock")
	x := filepath.Join(r.dom.Dir, "backup.xml")
	os.WriteFile(x, []byte(fmt.Sprintf(`<domainbackup mode='pull'><server transport='unix' socket='%s'/><disks><disk name='vda' type='file'><scratch file='%s'/></disk><disk name='vdb' backup='no'/></disks></domainbackup>`,
		sock, filepath.Join(r.dom.Dir, "other.scratch"))), 0o644)
	libvirttest.Virsh(t, "backup-begin", r.dom.Name, x)
	t.Cleanup(func() { libvirttest.VirshErr("domjobabort", r.dom.Name) })

	p := r.provider(nil)
	s := r.open(ctx, p)
	_, err := s.Create(ctx)
	if !errors.Is(err, errs.ErrBusy) || !strings.Contains(err.Error(), sock) {
		t.Fatalf("set during another backup job: err = %v, want ErrBusy naming %s", err, sock)
	}
	if removed, err := p.Release(ctx, nil); err != nil || len(removed) > 0 {
		t.Fatalf("Release(nil) = %v, %v: it must not touch another tool's job", removed, err)
	}
	if _, err := libvirttest.VirshErr("backup-dumpxml", r.dom.Name); err != nil {
		t.Fatalf("the other tool's job is gone: %v", err)
	}
}

// TestErrors checks the classes and messages of what cannot work.
func TestErrors(t *testing.T) {
	libvirttest.Need(t)
	ctx := ctxFor(t)
	// libvirt not reachable.
	p := libvirt.New(libvirt.Options{URI: "qemu+unix:///system?socket=/nonexistent/libvirt-sock", Domain: "x"})
	if _, err := p.Identify(ctx); !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "/nonexistent/libvirt-sock") {
		t.Errorf("unreachable libvirt: %v", err)
	}
	// No such domain.
	p = libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: "vmshadow-no-such-domain"})
	if _, err := p.Identify(ctx); !errors.Is(err, errs.ErrNotFound) || !strings.Contains(err.Error(), "vmshadow-no-such-domain") {
		t.Errorf("missing domain: %v", err)
	}
	p.Close()
	// A defined domain that does not run.
	dom := libvirttest.NewDomain(t, libvirttest.Options{Disks: []libvirttest.Disk{{}}})
	x := filepath.Join(dom.Dir, "def.xml")
	os.WriteFile(x, []byte(dom.XML()), 0o644)
	libvirttest.Virsh(t, "define", x)
	p = libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: dom.Name})
	if _, err := p.Identify(ctx); !errors.Is(err, errs.ErrNotFound) || !strings.Contains(err.Error(), "shut off") {
		t.Errorf("stopped domain: %v", err)
	}
	p.Close()
	// A disk that cannot be backed up.
	shared := libvirttest.NewDomain(t, libvirttest.Options{Disks: []libvirttest.Disk{{}, {Target: "vdb", Format: "raw", Shareable: true}}, Paused: true})
	shared.Start(t)
	p = libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: shared.UUID})
	if _, err := p.Identify(ctx); !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), "disk vdb is shareable") {
		t.Errorf("shareable disk: %v", err)
	}
	p.Close()
}

// TestScratchNotReachable: a scratch dir QEMU's user cannot enter (under a
// 0700 directory, like root's home) makes virDomainBackupBegin fail with
// permission denied; the set fails with a message saying what to fix, and
// leaves no job and no checkpoint.
func TestScratchNotReachable(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	private := filepath.Join(r.dom.Dir, "private")
	if err := os.Mkdir(private, 0o700); err != nil {
		t.Fatal(err)
	}
	p := libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: r.dom.Name, ScratchDir: filepath.Join(private, "scratch")})
	p.Track((&checkpoint{Prefix: "vmshadow-repo5"}).request(nil))
	s := r.open(ctx, p)
	_, err := s.Create(ctx)
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "may not create the NBD socket or scratch files") || !strings.Contains(err.Error(), "--scratch-dir") {
		t.Fatalf("unreachable scratch dir: %v", err)
	}
	r.noJob()
	if got := r.checkpoints(); len(got) > 0 {
		t.Fatalf("checkpoints left: %v", got)
	}
	if ents, _ := os.ReadDir(filepath.Join(private, "scratch")); len(ents) > 0 {
		t.Fatalf("scratch dir not empty: %v", ents)
	}
}

// TestReleaseUnrecordedCheckpoints: with Options.Recorded, Release(nil)
// deletes the vmshadow checkpoints no repository records and leaves the
// recorded ones and other tools' checkpoints alone.
func TestReleaseUnrecordedCheckpoints(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	for _, n := range []string{"vmshadow-repo6-a", "other-tool-1", "vmshadow-repo6-b"} {
		libvirttest.Virsh(t, "checkpoint-create-as", r.dom.Name, n, "--diskspec", "vda,checkpoint=bitmap", "--diskspec", "vdb,checkpoint=no")
	}
	p := libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: r.dom.Name, ScratchDir: r.scratch,
		Recorded: func(name string) bool { return name == "vmshadow-repo6-b" }})
	r.open(ctx, p)
	removed, err := p.Release(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || !strings.Contains(removed[0], "vmshadow-repo6-a") {
		t.Fatalf("removed %v, want checkpoint vmshadow-repo6-a only", removed)
	}
	got := r.checkpoints()
	slices.Sort(got)
	if !slices.Equal(got, []string{"other-tool-1", "vmshadow-repo6-b"}) {
		t.Fatalf("checkpoints left = %v", got)
	}
	// Without Recorded, no checkpoint is ever deleted.
	if removed, err := r.provider(nil).Release(ctx, nil); err != nil || len(removed) > 0 {
		t.Fatalf("Release(nil) without Recorded = %v, %v", removed, err)
	}
}

// TestRecoverKilledSet: a set whose process died with its journal record
// intact (the lock is gone with the process) is undone by Recover: the job
// is aborted, the uncompleted set's checkpoint deleted, the directory
// removed, the record dropped.
func TestRecoverKilledSet(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	p := r.provider(&checkpoint{Prefix: "vmshadow-repo7"})
	s := r.open(ctx, p)
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s.Close() // the process dies: the lock goes, the record and the job stay
	if got := r.checkpoints(); !slices.Equal(got, []string{"vmshadow-repo7-" + set.ID}) {
		t.Fatalf("checkpoints while the set exists = %v", got)
	}

	p2 := r.provider(nil)
	s2 := r.open(ctx, p2)
	if sets, err := s2.List(ctx); err != nil || len(sets) != 1 || sets[0].Phase != coord.PhaseExposed {
		t.Fatalf("List of the left set = %+v, %v; want it alive (exposed)", sets, err)
	}
	rep, err := s2.Recover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(rep.Removed, "; ")
	if rep.SetID != set.ID || !strings.Contains(joined, "backup job") || !strings.Contains(joined, "checkpoint vmshadow-repo7-"+set.ID) {
		t.Fatalf("recover report %+v", rep)
	}
	r.noJob()
	r.scratchEmpty()
	if got := r.checkpoints(); len(got) > 0 {
		t.Fatalf("checkpoints after recover: %v", got)
	}
	if cur, err := s2.Current(); err != nil || cur != nil {
		t.Fatalf("journal after recover: %+v, %v", cur, err)
	}
}

// TestCheckpointSurvivesLibvirtdRestart: a completed set's checkpoint is
// still there after libvirtd restarts, and the next incremental reports
// exactly the changes since it.
func TestCheckpointSurvivesLibvirtdRestart(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	p := r.provider(&checkpoint{Prefix: "vmshadow-repo8"})
	s := r.open(ctx, p)
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Complete(set, s); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	s.Close()
	first := "vmshadow-repo8-" + set.ID

	libvirttest.RestartLibvirtd(t)
	if got := r.checkpoints(); !slices.Equal(got, []string{first}) {
		t.Fatalf("checkpoints after the restart = %v, want [%s]", got, first)
	}
	r.dom.GuestWrite(t, "vda", 0x81, 20*mib, 64<<10)
	p2 := r.provider(&checkpoint{Prefix: "vmshadow-repo8", Incremental: first})
	s2 := r.open(ctx, p2)
	set2, err := s2.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{fmt.Sprint(20*mib, "+", 64<<10)}
	if got := dirty(t, ctx, shadow(t, set2, "vda")); !slices.Equal(got, want) {
		t.Fatalf("dirty after the restart = %v, want %v", got, want)
	}
	if _, err := s2.Delete(ctx, set2.ID); err != nil {
		t.Fatal(err)
	}
	r.noJob()
}

// TestDomainStoppedUnderSet: the domain stops while a set exists (its job
// goes with QEMU): List reports the set stale. libvirt cannot delete a
// checkpoint of a stopped domain, and dropping only its metadata would lose
// the changes its bitmap holds: deleting the set fails saying what to do,
// and succeeds once the domain runs again.
func TestDomainStoppedUnderSet(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	p := r.provider(&checkpoint{Prefix: "vmshadow-repo9"})
	s := r.open(ctx, p)
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	libvirttest.Virsh(t, "destroy", r.dom.Name)
	sets, err := s.List(ctx)
	if err != nil || len(sets) != 1 || sets[0].Phase != coord.PhaseStale {
		t.Fatalf("List after the domain stopped = %+v, %v; want the set stale", sets, err)
	}
	_, err = s.Delete(ctx, set.ID)
	if err == nil || !strings.Contains(err.Error(), "start it, then run 'vmshadow recover") {
		t.Fatalf("delete of a stale set on a stopped domain: %v, want an error saying to start it and recover", err)
	}
	r.scratchEmpty()
	if got := r.checkpoints(); len(got) != 1 {
		t.Fatalf("checkpoints while the domain is stopped: %v, want the set's", got)
	}
	libvirttest.Virsh(t, "start", r.dom.Name)
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	if got := r.checkpoints(); len(got) > 0 {
		t.Fatalf("checkpoints after deleting the stale set: %v", got)
	}
	r.noJob()
}

// TestCommitPastDeadline: when the freeze window ends while libvirt is
// still beginning the backup job, Commit fails with the deadline only once
// libvirt finished, so that Release finds and removes the job and the
// checkpoint instead of racing their creation.
func TestCommitPastDeadline(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	p := r.provider(&checkpoint{Prefix: "vmshadow-repo10"})
	r.open(ctx, p) // Identify
	set := &coord.Set{ID: coord.NewSetID()}
	save := (&coord.Journal{Dir: t.TempDir()}).Recorder("commit-past-deadline")
	if err := p.Prepare(ctx, set, save); err != nil {
		t.Fatal(err)
	}
	window, cancel := context.WithTimeout(ctx, time.Millisecond)
	defer cancel()
	if err := p.Commit(window, set, save); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("commit past its deadline: %v", err)
	}
	if _, err := p.Release(ctx, set); err != nil {
		t.Fatal(err)
	}
	r.noJob()
	r.scratchEmpty()
	if got := r.checkpoints(); len(got) > 0 {
		t.Fatalf("checkpoints left: %v", got)
	}
}

// TestPrunedChain: when the repository's latest backup has a checkpoint
// libvirt does not know, but another checkpoint of the repository's chain
// is there (its backup pruned), every disk is read in full saying so, and
// once the backup is stored the stale checkpoint goes: one checkpoint per
// repository stays. Other repositories' checkpoints are not touched.
func TestPrunedChain(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	done := func(cp *checkpoint) string {
		p := r.provider(cp)
		s := r.open(ctx, p)
		defer s.Close()
		set, err := s.Create(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Complete(set, s); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Delete(ctx, set.ID); err != nil {
			t.Fatal(err)
		}
		return cp.Prefix + "-" + set.ID
	}
	other := done(&checkpoint{Prefix: "vmshadow-repo11b"})
	stale := done(&checkpoint{Prefix: "vmshadow-repo11"})

	p := r.provider(&checkpoint{Prefix: "vmshadow-repo11", Incremental: "vmshadow-repo11-gone"})
	s := r.open(ctx, p)
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sh := shadow(t, set, "vda"); sh.Bitmap != "" || !strings.Contains(sh.FullReason, "pruned") || !strings.Contains(sh.FullReason, stale) {
		t.Fatalf("vda with the latest backup's checkpoint gone: bitmap %q, full reason %q", sh.Bitmap, sh.FullReason)
	}
	if err := p.Complete(set, s); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	want := []string{other, "vmshadow-repo11-" + set.ID}
	if got := r.checkpoints(); !slices.Equal(got, want) {
		t.Fatalf("checkpoints = %v, want %v (the stale one deleted)", got, want)
	}
	r.noJob()
}

// TestDescribeAndRedefine: a set's description holds the domain's
// persistent XML and its checkpoint's definition; when libvirt loses the
// checkpoint's metadata (deleted with --metadata, or the domain undefined
// and defined again) while the disks keep the bitmaps, the next set redefines
// it from that copy and is incremental, reading only what changed. A copy
// that cannot serve gives a full read saying why.
func TestDescribeAndRedefine(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	const prefix = "vmshadow-repo10"
	// set runs one completed set continuing from prev (whose definition
	// saved holds, nil: none kept) and returns its checkpoint, the files
	// describing it, and the plan of vda.
	set := func(prev string, saved []byte, write int64) (string, map[string][]byte, coord.Shadow) {
		t.Helper()
		p := libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: r.dom.Name, ScratchDir: r.scratch})
		req := (&checkpoint{Prefix: prefix, Incremental: prev}).request(rigSizes)
		if saved != nil {
			req.Saved = func(_ context.Context, name string) ([]byte, error) {
				if name != repo.FileCheckpointXML {
					return nil, fmt.Errorf("saved %s: %w", name, errs.ErrNotFound)
				}
				return saved, nil
			}
		}
		p.Track(req)
		s := r.open(ctx, p)
		defer s.Close()
		set, err := s.Create(ctx)
		if err != nil {
			t.Fatal(err)
		}
		def, files, err := p.Describe(ctx, set)
		if err != nil || def != repo.DefinitionLibvirt {
			t.Fatalf("Describe = %q, %v", def, err)
		}
		got := map[string][]byte{}
		for _, f := range files {
			b := make([]byte, f.Size())
			if _, err := f.ReadAt(ctx, b, 0); err != nil {
				t.Fatal(err)
			}
			got[f.Name()] = b
		}
		sh := shadow(t, set, "vda")
		if write > 0 && sh.Bitmap != "" {
			want := []string{fmt.Sprint(write, "+", 64<<10)}
			if d := dirty(t, ctx, sh); !slices.Equal(d, want) {
				t.Fatalf("dirty after the redefinition = %v, want %v", d, want)
			}
		}
		if err := p.Complete(set, s); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Delete(ctx, set.ID); err != nil {
			t.Fatal(err)
		}
		return prefix + "-" + set.ID, got, sh
	}

	cp1, files, _ := set("", nil, 0)
	if !strings.Contains(string(files[repo.FileDomainXML]), "<name>"+r.dom.Name+"</name>") {
		t.Fatalf("domain.xml does not name the domain:\n%s", files[repo.FileDomainXML])
	}
	if !strings.Contains(string(files[repo.FileCheckpointXML]), "<name>"+cp1+"</name>") {
		t.Fatalf("checkpoint.xml does not define %s:\n%s", cp1, files[repo.FileCheckpointXML])
	}
	if _, ok := files[repo.FileNVRAM]; ok {
		t.Fatal("a domain without UEFI got an nvram file")
	}

	// The metadata deleted, the bitmaps kept.
	libvirttest.Virsh(t, "checkpoint-delete", r.dom.Name, cp1, "--metadata")
	r.dom.GuestWrite(t, "vda", 0x91, 20*mib, 64<<10)
	cp2, files, sh := set(cp1, files[repo.FileCheckpointXML], 20*mib)
	if sh.Bitmap == "" {
		t.Fatalf("set after the metadata was lost: full read (%s), want incremental after the redefinition", sh.FullReason)
	}

	// The domain stopped, undefined (dropping the checkpoints' metadata),
	// defined again and started, as when it moves host: the bitmaps are
	// in its qcow2 image.
	inactive := filepath.Join(r.dom.Dir, "inactive.xml")
	if err := os.WriteFile(inactive, []byte(libvirttest.Virsh(t, "dumpxml", "--inactive", r.dom.Name)), 0o600); err != nil {
		t.Fatal(err)
	}
	libvirttest.Virsh(t, "destroy", r.dom.Name)
	libvirttest.Virsh(t, "undefine", r.dom.Name, "--checkpoints-metadata")
	libvirttest.Virsh(t, "define", inactive)
	libvirttest.Virsh(t, "start", r.dom.Name)
	if got := r.checkpoints(); len(got) != 0 {
		t.Fatalf("checkpoints after undefine and define: %v, want none", got)
	}
	r.dom.GuestWrite(t, "vda", 0x92, 30*mib, 64<<10)
	cp3, files, sh := set(cp2, files[repo.FileCheckpointXML], 30*mib)
	if sh.Bitmap == "" {
		t.Fatalf("set after undefine and define: full read (%s), want incremental after the redefinition", sh.FullReason)
	}

	// A copy of another checkpoint cannot serve: a full read that says so.
	libvirttest.Virsh(t, "checkpoint-delete", r.dom.Name, cp3, "--metadata")
	_, _, sh = set(cp3, files[repo.FileDomainXML], 0)
	if sh.Bitmap != "" || !strings.Contains(sh.FullReason, "could not be redefined") {
		t.Fatalf("set with an unusable copy: bitmap %q, reason %q; want a full read saying it could not be redefined", sh.Bitmap, sh.FullReason)
	}
}

// TestDescribeFirmware: a UEFI domain with an emulated TPM: its
// description holds the UEFI variable store and the TPM's state, as the
// host has them.
func TestDescribeFirmware(t *testing.T) {
	libvirttest.Need(t)
	dom := libvirttest.NewDomain(t, libvirttest.Options{Paused: true, UEFI: true, TPM: true,
		Disks: []libvirttest.Disk{{Target: "vda", Format: "qcow2", Size: 8 * mib}}})
	dom.Start(t)
	ctx := ctxFor(t)
	journal := &coord.Journal{Dir: filepath.Join(t.TempDir(), "journal")}
	p := libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: dom.Name, ScratchDir: libvirttest.TempDir(t)})
	p.Track(tracking.Request{Prefix: "vmshadow-repo11"})
	s, err := (&coord.Coordinator{Provider: p, Journal: journal}).Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Delete(ctx, set.ID)
	_, files, err := p.Describe(ctx, set)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]byte{}
	for _, f := range files {
		b := make([]byte, f.Size())
		if _, err := f.ReadAt(ctx, b, 0); err != nil {
			t.Fatal(err)
		}
		got[f.Name()] = b
	}
	x := string(got[repo.FileDomainXML])
	i, j := strings.Index(x, "<nvram"), strings.Index(x, "</nvram>")
	if i < 0 || j < i {
		t.Fatalf("domain.xml has no <nvram>:\n%s", x)
	}
	path := x[strings.Index(x[i:], ">")+i+1 : j]
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(want) == 0 || !bytes.Equal(got[repo.FileNVRAM], want) {
		t.Errorf("nvram: %d bytes stored, the host's %s has %d (equal: %v)", len(got[repo.FileNVRAM]), path, len(want), bytes.Equal(got[repo.FileNVRAM], want))
	}
	tpm := filepath.Join("/var/lib/libvirt/swtpm", dom.UUID, "tpm2", "tpm2-00.permall")
	want, err = os.ReadFile(tpm)
	if err != nil {
		t.Fatal(err)
	}
	if b := got[repo.FileTPMPrefix+"tpm2-00.permall"]; len(want) == 0 || !bytes.Equal(b, want) {
		t.Errorf("TPM state: stored %d bytes, the host's %s has %d; files %v", len(b), tpm, len(want), slices.Collect(maps.Keys(got)))
	}
	if _, ok := got[repo.FileTPMPrefix+".lock"]; ok {
		t.Errorf("swtpm's lock file stored as TPM state; files %v", slices.Collect(maps.Keys(got)))
	}
}
