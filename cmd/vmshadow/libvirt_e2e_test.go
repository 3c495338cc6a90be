package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/libvirttest"
	libvirtprov "github.com/vmshadow/vmshadow/internal/provider/libvirt"
	"github.com/vmshadow/vmshadow/internal/vmconn"
)

// These tests run the vmshadow binary against a real libvirtd
// (internal/libvirttest) and a domain of type qemu (TCG) with no OS: the
// guest's writes go through the domain's device with HMP qemu-io, which
// taints the domain, so every taint check comes before the first of them.

const mibLV = 1 << 20

// lvRig is a running two-disk domain (qcow2 v3), a state directory, a
// scratch directory QEMU can reach and a repository of 256 KiB chunks.
type lvRig struct {
	t       *testing.T
	dom     *libvirttest.Domain
	env     []string
	scratch string
	repo    string
}

func newLVRig(t *testing.T) *lvRig {
	t.Helper()
	libvirttest.Need(t)
	dom := libvirttest.NewDomain(t, libvirttest.Options{Paused: true, Disks: []libvirttest.Disk{
		{Target: "vda", Size: 64 * mibLV}, {Target: "vdb", Size: 32 * mibLV},
	}})
	dom.Write(t, "vda", 0x11, 0, 4*mibLV)
	dom.Write(t, "vda", 0x12, 40*mibLV, 3*mibLV)
	dom.Write(t, "vdb", 0x21, 1*mibLV, 2*mibLV)
	dom.Start(t)
	state, env := stateEnv(t)
	r := &lvRig{t: t, dom: dom, env: append(env, "VMSHADOW_PASSWORD=test-password"), scratch: libvirttest.TempDir(t), repo: filepath.Join(state, "repo")}
	if res := r.run("repo", "init", "--repo", r.repo, "--encryption", "none", "--chunk-size", "262144"); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	return r
}

func (r *lvRig) run(args ...string) result {
	r.t.Helper()
	return vmshadow(r.t, r.env, args...)
}

// domain adds the flags naming the domain, and the scratch directory to
// the commands that take a set.
func (r *lvRig) domain(args ...string) []string {
	args = append(args, "--libvirt", libvirttest.URI, "--vm", r.dom.Name)
	if args[0] == "backup" || args[1] == "create" {
		args = append(args, "--scratch-dir", r.scratch)
	}
	return args
}

// image is the disk's content now, read from its image file.
func (r *lvRig) image(target string) []byte {
	r.t.Helper()
	out := filepath.Join(r.t.TempDir(), target+".raw")
	d := r.dom.Disk(r.t, target)
	if b, err := exec.Command("qemu-img", "convert", "-U", "-f", d.Format, "-O", "raw", d.Path, out).CombinedOutput(); err != nil {
		r.t.Fatalf("qemu-img convert: %v: %s", err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		r.t.Fatal(err)
	}
	return b
}

func (r *lvRig) images() map[string][]byte {
	return map[string][]byte{"vda": r.image("vda"), "vdb": r.image("vdb")}
}

// guestWrite writes through the guest's device (tainting the domain) and
// into want, the disks' expected content: the image file may not show the
// write yet (QEMU's qcow2 metadata cache).
func (r *lvRig) guestWrite(want map[string][]byte, target string, pattern byte, off, length int64) {
	r.t.Helper()
	r.dom.GuestWrite(r.t, target, pattern, off, length)
	copy(want[target][off:off+length], bytes.Repeat([]byte{pattern}, int(length)))
}

// backup backs the domain up and checks the summary's source and mode.
func (r *lvRig) backup(mode string) map[string]any {
	r.t.Helper()
	res := r.run(r.domain("backup", "--repo", r.repo)...)
	if res.code != 0 {
		r.t.Fatalf("backup: exit %d: %s", res.code, res.errorMessage())
	}
	sum := res.summary(r.t)
	if sum["source"] != "libvirt" || sum["mode"] != mode || sum["vm"] != r.dom.Name {
		r.t.Fatalf("backup summary: source %v, mode %v, vm %v; want libvirt, %s, %s (reason %v)", sum["source"], sum["mode"], sum["vm"], mode, r.dom.Name, sum["reason"])
	}
	return sum
}

// restoreCompare restores a backup and compares every disk with want.
func (r *lvRig) restoreCompare(id string, want map[string][]byte) {
	r.t.Helper()
	dir := filepath.Join(r.t.TempDir(), "restore")
	if res := r.run("restore", "--repo", r.repo, id, "--to", dir); res.code != 0 {
		r.t.Fatalf("restore %s: %s", id, res.errorMessage())
	}
	// The domain's definition comes with its disks.
	def, err := os.ReadFile(filepath.Join(dir, r.dom.Name+".xml"))
	if err != nil || !strings.Contains(string(def), "<name>"+r.dom.Name+"</name>") {
		r.t.Errorf("restore %s: %s.xml: %v\n%s", id, r.dom.Name, err, def)
	}
	for disk, w := range want {
		got, err := os.ReadFile(filepath.Join(dir, disk+".raw"))
		if err != nil {
			r.t.Fatalf("restore %s: %v", id, err)
		}
		if !bytes.Equal(got, w) {
			at := -1
			for i := range min(len(got), len(w)) {
				if got[i] != w[i] {
					at = i
					break
				}
			}
			r.t.Errorf("backup %s, disk %s: restored image (%d bytes) differs from the disk at the instant (%d bytes) first at %d: got %x want %x", id, disk, len(got), len(w), at, got[at], w[at])
		}
	}
}

// checkpoints lists the domain's checkpoints.
func (r *lvRig) checkpoints() []string {
	out := libvirttest.Virsh(r.t, "checkpoint-list", r.dom.Name, "--name", "--topological")
	return strings.Fields(out)
}

// noJob fails if the domain has a job.
func (r *lvRig) noJob() {
	r.t.Helper()
	out := libvirttest.Virsh(r.t, "domjobinfo", r.dom.Name)
	if !strings.Contains(out, "None") {
		r.t.Fatalf("domain %s still has a job:\n%s", r.dom.Name, out)
	}
}

// notTainted fails if the domain's log says it is tainted.
func (r *lvRig) notTainted(after string) {
	r.t.Helper()
	if lines := r.dom.Tainted(); len(lines) > 0 {
		r.t.Fatalf("domain tainted after %s:\n%s", after, strings.Join(lines, "\n"))
	}
}

// readsOnly checks an incremental backup's per-disk modes, reasons and
// bytes read (whole 256 KiB chunks around what changed).
func readsOnly(t *testing.T, sum map[string]any, want map[string]int64) {
	t.Helper()
	for name, d := range diskSummaries(t, sum) {
		if d["mode"] != "incremental" || d["reason"] != nil {
			t.Errorf("disk %s: mode %v, reason %v; want incremental", name, d["mode"], d["reason"])
		}
		if got := num(d["bytes_read"]); got != want[name] {
			t.Errorf("disk %s read %d bytes, want %d (the chunks that changed)", name, got, want[name])
		}
	}
}

// TestLibvirtBackup: full backup, snapshot commands, incremental, a backup
// killed mid-read and recover, on one domain; each backup restores
// bit-identical to the disks at its instant.
func TestLibvirtBackup(t *testing.T) {
	r := newLVRig(t)

	want := r.images()
	sum := r.backup("full")
	for name, d := range diskSummaries(t, sum) {
		if d["mode"] != "full" || !strings.Contains(fmt.Sprint(d["reason"]), "first backup") {
			t.Errorf("disk %s: mode %v, reason %v; want full, first backup", name, d["mode"], d["reason"])
		}
	}
	first := fmt.Sprint(sum["backup_id"])
	var files []string
	for _, f := range sum["files"].([]any) {
		files = append(files, fmt.Sprint(f.(map[string]any)["name"]))
	}
	if sum["definition"] != "libvirt" || !slices.Equal(files, []string{"domain.xml", "checkpoint.xml"}) {
		t.Errorf("backup summary: definition %v, files %v; want libvirt, [domain.xml checkpoint.xml]", sum["definition"], files)
	}
	r.noJob()
	cps := r.checkpoints()
	if len(cps) != 1 || !strings.HasPrefix(cps[0], "vmshadow-") {
		t.Fatalf("checkpoints after the full backup = %v, want one vmshadow checkpoint", cps)
	}
	r.notTainted("the full backup")

	// snapshot create, list, delete.
	res := r.run(r.domain("snapshot", "create")...)
	if res.code != 0 {
		t.Fatalf("snapshot create: exit %d: %s", res.code, res.errorMessage())
	}
	setID := fmt.Sprint(res.summary(t)["set_id"])
	res = r.run(r.domain("snapshot", "list")...)
	if sets := res.summary(t)["sets"].([]any); len(sets) != 1 || sets[0].(map[string]any)["set_id"] != setID {
		t.Fatalf("snapshot list = %v, want set %s", sets, setID)
	}
	if res := r.run(r.domain("snapshot", "create")...); res.code != errs.ErrBusy.ExitCode() {
		t.Errorf("a second set while one exists: exit %d (%s), want %d", res.code, res.errorMessage(), errs.ErrBusy.ExitCode())
	}
	if res := r.run(r.domain("snapshot", "delete", setID)...); res.code != 0 {
		t.Fatalf("snapshot delete: exit %d: %s", res.code, res.errorMessage())
	}
	res = r.run(r.domain("snapshot", "list")...)
	if sets := res.summary(t)["sets"].([]any); len(sets) != 0 {
		t.Fatalf("snapshot list after delete = %v", sets)
	}
	r.noJob()
	if got := r.checkpoints(); !slices.Equal(got, cps) {
		t.Fatalf("checkpoints after snapshot delete = %v, want %v (the backup chain's only)", got, cps)
	}
	r.notTainted("snapshot create and delete")
	r.restoreCompare(first, want)

	// Guest writes (these taint the domain), then an incremental.
	r.guestWrite(want, "vda", 0x55, 8*mibLV, 128<<10)
	r.guestWrite(want, "vda", 0x56, 50*mibLV, 64<<10)
	r.guestWrite(want, "vdb", 0x66, 20*mibLV, 64<<10)
	sum = r.backup("incremental")
	readsOnly(t, sum, map[string]int64{"vda": 512 << 10, "vdb": 256 << 10})
	r.restoreCompare(fmt.Sprint(sum["backup_id"]), want)
	cps = r.checkpoints()
	if len(cps) != 1 {
		t.Fatalf("checkpoints after the incremental = %v, want one (the base superseded)", cps)
	}

	// A backup killed while reading, then recover: no job, the chain's
	// checkpoint as before, and the next backup reads every change since
	// the last stored one.
	r.guestWrite(want, "vda", 0x77, 30*mibLV, 64<<10)
	killed := vmshadow(t, append(r.env, "VMSHADOW_CRASH_AT=backup-read"), r.domain("backup", "--repo", r.repo)...)
	if killed.code != 137 {
		t.Fatalf("backup was not killed: exit %d %s", killed.code, killed.errorMessage())
	}
	res = r.run(r.domain("recover")...)
	if res.code != 0 {
		t.Fatalf("recover: exit %d: %s", res.code, res.errorMessage())
	}
	r.noJob()
	if got := r.checkpoints(); !slices.Equal(got, cps) {
		t.Fatalf("checkpoints after recover = %v, want %v", got, cps)
	}
	if entries, _ := os.ReadDir(r.scratch); len(entries) > 0 {
		t.Errorf("scratch directory not empty after recover: %v", entries)
	}
	r.guestWrite(want, "vda", 0x78, 60*mibLV, 64<<10)
	sum = r.backup("incremental")
	readsOnly(t, sum, map[string]int64{"vda": 512 << 10, "vdb": 0})
	r.restoreCompare(fmt.Sprint(sum["backup_id"]), want)
	r.noJob()

	// libvirt loses the checkpoint's metadata (the disks keep its
	// bitmaps): the next backup redefines it from the last backup's copy
	// and stays incremental.
	cps = r.checkpoints()
	libvirttest.Virsh(t, "checkpoint-delete", r.dom.Name, cps[0], "--metadata")
	r.guestWrite(want, "vda", 0x79, 10*mibLV, 64<<10)
	res = r.run(r.domain("backup", "--repo", r.repo)...)
	if res.code != 0 || !strings.Contains(strings.Join(res.warnings(), "\n"), "redefined from the last backup's copy") {
		t.Fatalf("backup after the checkpoint was lost: exit %d (%s), warnings %q", res.code, res.errorMessage(), res.warnings())
	}
	sum = res.summary(t)
	readsOnly(t, sum, map[string]int64{"vda": 256 << 10, "vdb": 0})
	r.restoreCompare(fmt.Sprint(sum["backup_id"]), want)
	res = r.run("backups", "--repo", r.repo, "--json")
	for _, b := range res.summary(t)["backups"].([]any) {
		if d := b.(map[string]any)["definition"]; d != "libvirt" {
			t.Errorf("backups --json: %v has definition %v, want libvirt", b.(map[string]any)["short_id"], d)
		}
	}
}

// TestLibvirtErrors: each bad invocation fails with its exit code and a
// message saying what to do.
func TestLibvirtErrors(t *testing.T) {
	libvirttest.Need(t)
	state, env := stateEnv(t)
	repoDir := filepath.Join(state, "repo")
	env = append(env, "VMSHADOW_PASSWORD=test-password")
	if res := vmshadow(t, env, "repo", "init", "--repo", repoDir, "--encryption", "none"); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	for _, c := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"unreachable", []string{"backup", "--repo", repoDir, "--libvirt", "qemu+unix:///system?socket=/nonexistent/libvirt-sock", "--vm", "x"}, errs.ErrConnect.ExitCode(), "libvirtd is not running"},
		{"unknown domain", []string{"backup", "--repo", repoDir, "--libvirt", libvirttest.URI, "--vm", "vmshadow-no-such-domain"}, errs.ErrNotFound.ExitCode(), "no libvirt domain named"},
		{"unknown domain snapshot", []string{"snapshot", "create", "--libvirt", libvirttest.URI, "--vm", "vmshadow-no-such-domain"}, errs.ErrNotFound.ExitCode(), "no libvirt domain named"},
		{"secret in the URI", []string{"backup", "--repo", repoDir, "--libvirt", "qemu+unix://admin:s3cret@/system?socket=/nonexistent/libvirt-sock&token=s3cret", "--vm", "x"}, errs.ErrConnect.ExitCode(), "libvirtd is not running"},
		{"malformed URI with a secret", []string{"snapshot", "list", "--libvirt", "qemu://admin:s3cret@[::1/system", "--vm", "x"}, errs.ErrUsage.ExitCode(), "libvirt URI"},
		{"bad driver", []string{"snapshot", "list", "--libvirt", "xen:///system", "--vm", "x"}, errs.ErrUsage.ExitCode(), "driver"},
		{"no vm", []string{"snapshot", "list", "--libvirt", libvirttest.URI}, errs.ErrUsage.ExitCode(), "--vm NAME|UUID"},
		{"qga", []string{"backup", "--repo", repoDir, "--libvirt", libvirttest.URI, "--vm", "x", "--qga", "/tmp/qga.sock"}, errs.ErrUsage.ExitCode(), "--guest-agent"},
		{"guest-hook", []string{"snapshot", "create", "--libvirt", libvirttest.URI, "--vm", "x", "--guest-hook", "/bin/true"}, errs.ErrUsage.ExitCode(), "guest-exec"},
		{"guest-agent without libvirt", []string{"snapshot", "create", "--qmp", "/tmp/none.sock", "--guest-agent"}, errs.ErrUsage.ExitCode(), "--guest-agent"},
		{"two providers", []string{"recover", "--qmp", "/tmp/none.sock", "--libvirt", libvirttest.URI, "--vm", "x"}, errs.ErrUsage.ExitCode(), "not both"},
	} {
		t.Run(c.name, func(t *testing.T) {
			res := vmshadow(t, env, c.args...)
			if res.code != c.code || !strings.Contains(res.errorMessage(), c.msg) {
				t.Errorf("exit %d (%s), want %d and a message with %q", res.code, res.errorMessage(), c.code, c.msg)
			}
			if out := res.stderr + fmt.Sprint(res.msgs); strings.Contains(out, "s3cret") {
				t.Errorf("the URI's secret is in the output: %s", out)
			}
		})
	}
}

// TestLibvirtWriterRebuild: recover rebuilds the libvirt guest-agent
// writer from its journal record (which writer.FromSpec alone cannot), and
// the other kinds as before.
func TestLibvirtWriterRebuild(t *testing.T) {
	w0 := libvirtprov.NewFSFreeze("qemu:///system", "web1", nil)
	w, err := vmconn.RebuildWriter(w0.Spec())
	if err != nil {
		t.Fatalf("rebuild %+v: %v", w0.Spec(), err)
	}
	if _, ok := w.(*libvirtprov.FSFreeze); !ok || w.Spec() != w0.Spec() {
		t.Fatalf("rebuilt %T %+v, want the libvirt writer %+v", w, w.Spec(), w0.Spec())
	}
	h, err := vmconn.RebuildWriter(coord.WriterSpec{Kind: "hook", Path: "/bin/true"})
	if err != nil || h.Spec().Kind != "hook" {
		t.Fatalf("rebuild a hook: %v, %v", h, err)
	}
	if _, err := vmconn.RebuildWriter(coord.WriterSpec{Kind: "no-such-kind"}); err == nil {
		t.Fatal("an unknown writer kind was rebuilt")
	}
}
