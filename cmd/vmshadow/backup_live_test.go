package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qemutest"
)

const testChunk = 4 << 20

// liveRig is a running VM and a repository for live backup tests.
type liveRig struct {
	t    *testing.T
	vm   *qemutest.VM
	env  []string
	repo string
	rng  *rand.Rand
}

func newLiveRig(t *testing.T, vm *qemutest.VM, encrypted bool) *liveRig {
	t.Helper()
	state, env := stateEnv(t)
	r := &liveRig{t: t, vm: vm, env: append(env, "VMSHADOW_PASSWORD=test-password"), repo: filepath.Join(state, "repo"), rng: rand.New(rand.NewPCG(7, 11))}
	args := []string{"repo", "init", "--repo", r.repo}
	if !encrypted {
		args = append(args, "--encryption", "none")
	}
	if res := vmshadow(t, r.env, args...); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	return r
}

func (r *liveRig) run(args ...string) result {
	r.t.Helper()
	return vmshadow(r.t, r.env, args...)
}

// backup runs a live backup that must succeed and give back everything
// its set took, and returns its summary.
func (r *liveRig) backup(extra ...string) map[string]any {
	r.t.Helper()
	return r.backupFrom(r.baseline(), extra...)
}

// backupFrom is backup checked against a baseline taken earlier: before a
// killed backup whose leftovers this one recovers.
func (r *liveRig) backupFrom(before qemutest.Baseline, extra ...string) map[string]any {
	r.t.Helper()
	res := r.run(append([]string{"backup", "--repo", r.repo, "--qmp", r.vm.QMPPath}, extra...)...)
	if res.code != 0 {
		r.t.Fatalf("backup: exit %d: %s", res.code, res.errorMessage())
	}
	r.vm.AssertAsBefore(r.t, before)
	return res.summary(r.t)
}

// baseline records what a backup's set may take from the VM; the chain's
// bitmaps may move on.
func (r *liveRig) baseline() qemutest.Baseline {
	r.t.Helper()
	return r.vm.Baseline(scratchOf(r.t, r.env)).WithChains()
}

// expected copies every disk as it is now (nothing writes meanwhile).
func (r *liveRig) expected() map[string][]byte {
	r.t.Helper()
	m := map[string][]byte{}
	for _, d := range r.vm.Disks {
		b, err := os.ReadFile(r.vm.Snapshot(d.ID))
		if err != nil {
			r.t.Fatal(err)
		}
		m[d.ID] = b
	}
	return m
}

// restoreCompare restores a backup and compares every disk with want.
func (r *liveRig) restoreCompare(id string, want map[string][]byte) {
	r.t.Helper()
	dir := filepath.Join(r.t.TempDir(), "restore")
	to := dir
	if len(want) == 1 {
		os.Mkdir(dir, 0o700)
		for disk := range want {
			to = filepath.Join(dir, disk+".raw")
		}
	}
	res := r.run("restore", "--repo", r.repo, id, "--to", to)
	if res.code != 0 {
		r.t.Fatalf("restore %s: %s", id, res.errorMessage())
	}
	for disk, w := range want {
		got, err := os.ReadFile(filepath.Join(dir, disk+".raw"))
		if err != nil {
			r.t.Fatalf("restore %s: %v", id, err)
		}
		if !bytes.Equal(got, w) {
			r.t.Errorf("backup %s, disk %s: restored image differs from the disk at the snapshot instant", id, disk)
		}
	}
}

// scatter writes n random ranges into a disk through its device and
// returns the set of chunks they touch.
func (r *liveRig) scatter(id string, n int, touched map[int64]bool) {
	r.t.Helper()
	d := r.vm.Disk(id)
	for i := 0; i < n; i++ {
		length := int64(4096 * (1 + r.rng.IntN(64)))
		off := r.rng.Int64N(d.Size-length) &^ 4095
		r.vm.Write(id, byte(1+r.rng.IntN(255)), off, length)
		for c := off / testChunk; c <= (off+length-1)/testChunk; c++ {
			touched[c] = true
		}
	}
}

func diskSummaries(t *testing.T, sum map[string]any) map[string]map[string]any {
	t.Helper()
	m := map[string]map[string]any{}
	for _, d := range sum["disks"].([]any) {
		dm := d.(map[string]any)
		m[dm["name"].(string)] = dm
	}
	return m
}

func num(v any) int64 { f, _ := v.(float64); return int64(f) }

// TestLiveBackupIncrementalRounds: several rounds of scattered guest writes
// between backups; every incremental reads exactly the changed chunks, and
// every backup restores bit-identical to its snapshot instant.
func TestLiveBackupIncrementalRounds(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{
		{ID: "vda", Size: 128 << 20}, {ID: "vdb", Format: "raw", Size: 64 << 20}}})
	r := newLiveRig(t, vm, true)
	// Fill the disks so that every chunk is allocated data: then an
	// incremental reads exactly the touched chunks.
	vm.Write("vda", 0x5a, 0, 128<<20)
	vm.Write("vdb", 0xa5, 0, 64<<20)
	want := r.expected()
	sum := r.backup()
	if sum["mode"] != "full" || !strings.Contains(fmt.Sprint(sum["reason"]), "first backup") {
		t.Fatalf("first backup: mode %v reason %v", sum["mode"], sum["reason"])
	}
	for _, k := range []string{"backup_id", "vm", "time", "disks", "bytes_read", "bytes_new", "duration_s", "consistency", "set_id", "mode"} {
		if _, ok := sum[k]; !ok {
			t.Errorf("summary lacks %q", k)
		}
	}
	ids := []string{sum["backup_id"].(string)}
	wants := []map[string][]byte{want}
	if num(sum["bytes_read"]) != 192<<20 {
		t.Errorf("full backup read %d bytes, want %d", num(sum["bytes_read"]), 192<<20)
	}
	for round := 1; round <= 3; round++ {
		touched := map[string]map[int64]bool{"vda": {}, "vdb": {}}
		r.scatter("vda", 6+round, touched["vda"])
		if round != 2 {
			r.scatter("vdb", 3, touched["vdb"])
		}
		want := r.expected()
		sum := r.backup()
		if sum["mode"] != "incremental" {
			t.Fatalf("round %d: mode %v (%v)", round, sum["mode"], sum["reason"])
		}
		for name, d := range diskSummaries(t, sum) {
			wantRead := int64(len(touched[name])) * testChunk
			if got := num(d["bytes_read"]); got != wantRead {
				t.Errorf("round %d, disk %s: read %d bytes, want %d (%d chunks touched)", round, name, got, wantRead, len(touched[name]))
			}
			if d["mode"] != "incremental" {
				t.Errorf("round %d, disk %s: mode %v", round, name, d["mode"])
			}
		}
		ids = append(ids, sum["backup_id"].(string))
		wants = append(wants, want)
	}
	// Every backup is a synthetic full: each restores on its own.
	for i, id := range ids {
		r.restoreCompare(id, wants[i])
	}
	// Restore straight to qcow2: a valid image with the same content.
	last := ids[len(ids)-1]
	dir := filepath.Join(t.TempDir(), "q")
	if res := r.run("restore", "--repo", r.repo, last, "--to", dir, "--format", "qcow2"); res.code != 0 {
		t.Fatalf("restore qcow2: %s", res.errorMessage())
	}
	for disk, w := range wants[len(wants)-1] {
		raw := filepath.Join(t.TempDir(), disk+".raw")
		os.WriteFile(raw, w, 0o600)
		img := filepath.Join(dir, disk+".qcow2")
		for _, c := range [][]string{{"check", img}, {"compare", "-f", "qcow2", "-F", "raw", img, raw}} {
			if out, err := exec.Command("qemu-img", c...).CombinedOutput(); err != nil {
				t.Errorf("qemu-img %s %s: %v: %s", c[0], disk, err, out)
			}
		}
	}
	if res := r.run("verify", "--repo", r.repo); res.code != 0 {
		t.Fatalf("verify: %s", res.errorMessage())
	}
}

// TestLiveBackupChainBreaks: everything that breaks the change-tracking
// chain gives a full read of the affected disk, with the reason, and the
// backup is still right.
func TestLiveBackupChainBreaks(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{
		{ID: "vda", Size: 64 << 20}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
	r := newLiveRig(t, vm, false)
	vm.Write("vda", 1, 0, 8<<20)
	vm.Write("vdb", 2, 0, 8<<20)
	r.backup()

	touched := map[int64]bool{} // vda chunks written since it was last reset
	check := func(step string, modes map[string]string, reason map[string]string, args ...string) string {
		t.Helper()
		r.scatter("vda", 2, touched)
		want := r.expected()
		sum := r.backup(args...)
		for name, d := range diskSummaries(t, sum) {
			if d["mode"] != modes[name] || !strings.Contains(fmt.Sprint(d["reason"]), reason[name]) {
				t.Errorf("%s: disk %s: mode %v reason %q, want %s %q", step, name, d["mode"], d["reason"], modes[name], reason[name])
			}
		}
		r.restoreCompare(sum["backup_id"].(string), want)
		return sum["backup_id"].(string)
	}

	check("steady", map[string]string{"vda": "incremental", "vdb": "incremental"}, nil)
	check("--full", map[string]string{"vda": "full", "vdb": "full"}, map[string]string{"vda": "--full", "vdb": "--full"}, "--full")

	vm.AddDisk(qemutest.Disk{ID: "vdc", Size: 16 << 20})
	vm.Write("vdc", 3, 0, 1<<20)
	check("disk added", map[string]string{"vda": "incremental", "vdb": "incremental", "vdc": "full"}, map[string]string{"vdc": "disk added"})

	vm.Resize("vdb", 48<<20)
	check("resized", map[string]string{"vda": "incremental", "vdb": "full", "vdc": "incremental"}, map[string]string{"vdb": "resized"})

	// A clean restart keeps qcow2 bitmaps; a raw disk cannot keep them.
	// (The hot-plugged disk is gone after the restart.)
	vm.Restart()
	check("restarted", map[string]string{"vda": "incremental", "vdb": "full"}, map[string]string{"vdb": "missing"})

	// QEMU killed after a clean restart loaded the qcow2 bitmap (and
	// marked it in use in the image): it comes back inconsistent.
	vm.Restart()
	vm.CrashRestart()
	check("crashed", map[string]string{"vda": "full", "vdb": "full"}, map[string]string{"vda": "inconsistent", "vdb": "missing"})

	// The latest backup deleted from the repository (pruned): the disks'
	// bitmaps belong to it, so the chain is broken.
	last := check("before prune", map[string]string{"vda": "incremental", "vdb": "incremental"}, nil)
	manifests, _ := filepath.Glob(filepath.Join(r.repo, "*", last+"*"))
	if len(manifests) == 0 {
		manifests, _ = filepath.Glob(filepath.Join(r.repo, "*", "*", last+"*"))
	}
	if len(manifests) != 1 {
		t.Fatalf("manifest of %s: %v", last, manifests)
	}
	os.Remove(manifests[0])
	check("pruned", map[string]string{"vda": "full", "vdb": "full"}, map[string]string{"vda": "no longer in the repository", "vdb": "no longer in the repository"})

	// A second repository keeps its own chain; the first one's goes on.
	r2 := newLiveRig(t, vm, false)
	r2.backup()
	clear(touched)
	check("after another repository", map[string]string{"vda": "incremental", "vdb": "incremental"}, nil)
	r2.scatter("vda", 1, touched) // repository 2 sees both repositories' rounds of changes
	sum := r2.backup()
	if d := diskSummaries(t, sum)["vda"]; d["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched))*testChunk {
		t.Errorf("second repository: %v", d)
	}
}

// paused is a vmshadow run in the background that pauses at a point.
type paused struct {
	t    *testing.T
	file string
	done chan result
}

// startPaused runs vmshadow in the background, pausing at point; it
// returns once the process has reached it (or fails the test with the
// process's result if it ended first).
func (r *liveRig) startPaused(point string, args ...string) *paused {
	r.t.Helper()
	p := &paused{t: r.t, file: filepath.Join(r.t.TempDir(), "pause"), done: make(chan result, 1)}
	env := append(r.env, "VMSHADOW_PAUSE_AT="+point, "VMSHADOW_PAUSE_FILE="+p.file)
	go func() { p.done <- vmshadow(r.t, env, args...) }()
	deadline := time.After(2 * time.Minute)
	for {
		if _, err := os.Stat(p.file); err == nil {
			return p
		}
		select {
		case res := <-p.done:
			r.t.Fatalf("vmshadow ended before reaching %s: exit %d %q", point, res.code, res.errorMessage())
		case <-deadline:
			r.t.Fatalf("vmshadow did not reach %s", point)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// resume lets the process go on and waits for it to end.
func (p *paused) resume() result {
	os.Remove(p.file)
	return <-p.done
}

func (r *liveRig) ourBitmaps() []string {
	var out []string
	for _, b := range r.vm.Graph().Bitmaps {
		if strings.Contains(b, "/vmshadow-") {
			out = append(out, b)
		}
	}
	return out
}

// TestLiveBackupKilled: vmshadow killed (SIGKILL) in the middle of reading;
// the next backup recovers the set it left, reads the changes of both
// rounds (merged back), and restores right.
func TestLiveBackupKilled(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{
		{ID: "vda", Size: 64 << 20}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
	r := newLiveRig(t, vm, false)
	vm.Write("vda", 1, 0, 64<<20)
	vm.Write("vdb", 2, 0, 32<<20)
	r.backup()
	before := r.baseline()
	touched := map[string]map[int64]bool{"vda": {}, "vdb": {}}
	r.scatter("vda", 3, touched["vda"])
	r.scatter("vdb", 2, touched["vdb"])
	killed := vmshadow(t, append(r.env, "VMSHADOW_CRASH_AT=backup-read"), "backup", "--repo", r.repo, "--qmp", vm.QMPPath)
	if killed.code != 137 {
		t.Fatalf("backup was not killed: exit %d %s", killed.code, killed.errorMessage())
	}
	r.scatter("vda", 2, touched["vda"])
	want := r.expected()
	res := r.run("backup", "--repo", r.repo, "--qmp", vm.QMPPath)
	if res.code != 0 {
		t.Fatalf("backup after kill: %s", res.errorMessage())
	}
	if w := strings.Join(res.warnings(), "\n"); !strings.Contains(w, "interrupted backup") {
		t.Errorf("no warning about recovering the interrupted backup's set: %q", w)
	}
	sum := res.summary(t)
	for name, d := range diskSummaries(t, sum) {
		if d["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched[name]))*testChunk {
			t.Errorf("disk %s: mode %v read %d, want incremental %d", name, d["mode"], num(d["bytes_read"]), int64(len(touched[name]))*testChunk)
		}
	}
	r.restoreCompare(sum["backup_id"].(string), want)
	vm.AssertAsBefore(t, before)
	if bm := r.ourBitmaps(); len(bm) != 2 {
		t.Errorf("vmshadow bitmaps = %v, want one per disk", bm)
	}
}

// TestLiveBackupPausedVM: backups of a paused VM (suspended, or stopped for
// maintenance while its backups go on) are incremental, restore right, and
// each gives back everything its set took, the guest having rewritten
// 24 MiB while the set existed; the VM stays paused.
func TestLiveBackupPausedVM(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{
		{ID: "vda", Size: 64 << 20}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
	vm.Pause()
	r := newLiveRig(t, vm, false)
	vm.Write("vda", 1, 0, 64<<20)
	vm.Write("vdb", 2, 0, 32<<20)
	r.backup()
	touched := map[int64]bool{}
	for round := 1; round <= 3; round++ {
		r.scatter("vda", 3, touched)
		want := r.expected()
		before := r.baseline()
		p := r.startPaused("backup-read", "backup", "--repo", r.repo, "--qmp", vm.QMPPath)
		vm.Write("vda", byte(0x40+round), 0, 24<<20) // after the instant: not in this backup
		res := p.resume()
		if res.code != 0 {
			t.Fatalf("round %d: backup: exit %d %s", round, res.code, res.errorMessage())
		}
		vm.AssertAsBefore(t, before)
		sum := res.summary(t)
		if d := diskSummaries(t, sum)["vda"]; d["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched))*testChunk {
			t.Errorf("round %d: vda %v, want incremental reading %d chunks", round, d, len(touched))
		}
		r.restoreCompare(sum["backup_id"].(string), want)
		// The write during the backup is a change for the next one.
		clear(touched)
		for c := int64(0); c < 24<<20/testChunk; c++ {
			touched[c] = true
		}
	}
}

// TestLiveBackupFullKilled: a --full backup killed (SIGKILL) once its set
// exists leaves the chain where the last stored backup left it: the next
// backup is incremental, reads exactly what changed since that backup
// (before and during the killed one), and restores bit-identical.
func TestLiveBackupFullKilled(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{
		{ID: "vda", Size: 64 << 20}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
	r := newLiveRig(t, vm, false)
	vm.Write("vda", 1, 0, 64<<20)
	vm.Write("vdb", 2, 0, 32<<20)
	r.backup()
	before := r.baseline()
	touched := map[string]map[int64]bool{"vda": {}, "vdb": {}}
	r.scatter("vda", 3, touched["vda"])
	r.scatter("vdb", 2, touched["vdb"])
	killed := vmshadow(t, append(r.env, "VMSHADOW_CRASH_AT=backup-read"), "backup", "--full", "--repo", r.repo, "--qmp", vm.QMPPath)
	if killed.code != 137 {
		t.Fatalf("--full backup was not killed: exit %d %s", killed.code, killed.errorMessage())
	}
	r.scatter("vda", 2, touched["vda"])
	want := r.expected()
	res := r.run("backup", "--repo", r.repo, "--qmp", vm.QMPPath)
	if res.code != 0 {
		t.Fatalf("backup after the killed --full one: %s", res.errorMessage())
	}
	sum := res.summary(t)
	for name, d := range diskSummaries(t, sum) {
		if d["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched[name]))*testChunk {
			t.Errorf("disk %s after a killed --full backup: mode %v (reason %q) read %d, want incremental %d",
				name, d["mode"], d["reason"], num(d["bytes_read"]), int64(len(touched[name]))*testChunk)
		}
	}
	r.restoreCompare(sum["backup_id"].(string), want)
	vm.AssertAsBefore(t, before)
	// A --full backup that is stored moves the chain on.
	clear(touched["vda"])
	r.scatter("vda", 1, touched["vda"])
	r.backup("--full")
	want = r.expected()
	sum = r.backup()
	if d := diskSummaries(t, sum)["vda"]; d["mode"] != "incremental" || num(d["bytes_read"]) != 0 {
		t.Errorf("backup right after a stored --full one: %v, want incremental reading nothing", d)
	}
	r.restoreCompare(sum["backup_id"].(string), want)
}

// TestLiveBackupFaults: faults in the middle of a backup fail it cleanly:
// the set is released, the VM is left as it was (change tracking merged
// back), the repository stays valid, and the next backup works.
func TestLiveBackupFaults(t *testing.T) {
	t.Run("export removed", func(t *testing.T) {
		vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 64 << 20}}})
		r := newLiveRig(t, vm, false)
		vm.Write("vda", 1, 0, 64<<20)
		r.backup()
		before := r.baseline()
		touched := map[int64]bool{}
		r.scatter("vda", 3, touched)
		p := r.startPaused("backup-read", "backup", "--repo", r.repo, "--qmp", vm.QMPPath)
		var exports []struct{ ID string }
		vm.Exec("query-block-exports", nil, &exports)
		for _, e := range exports {
			vm.Exec("block-export-del", map[string]string{"id": e.ID, "mode": "hard"}, nil)
		}
		res := p.resume()
		if res.code == 0 || !strings.Contains(res.errorMessage(), "vda") {
			t.Fatalf("backup with its export removed: exit %d %q", res.code, res.errorMessage())
		}
		vm.AssertAsBefore(t, before)
		r.scatter("vda", 1, touched)
		want := r.expected()
		sum := r.backup()
		if d := diskSummaries(t, sum)["vda"]; d["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched))*testChunk {
			t.Errorf("next backup: %v", d)
		}
		r.restoreCompare(sum["backup_id"].(string), want)
	})

	t.Run("VM disappears", func(t *testing.T) {
		vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 64 << 20}}})
		r := newLiveRig(t, vm, false)
		vm.Write("vda", 1, 0, 64<<20)
		r.backup()
		r.scatter("vda", 2, map[int64]bool{})
		p := r.startPaused("backup-read", "backup", "--repo", r.repo, "--qmp", vm.QMPPath)
		vm.Kill()
		res := p.resume()
		if res.code == 0 {
			t.Fatal("backup of a VM that disappeared succeeded")
		}
		if v := r.run("verify", "--repo", r.repo); v.code != 0 {
			t.Fatalf("verify after the failed backup: %s", v.errorMessage())
		}
		// The VM comes back (same QMP socket): the next backup recovers the
		// old set's journal and reads in full (QEMU was killed).
		vm.CrashRestart()
		want := r.expected()
		res = r.run("backup", "--repo", r.repo, "--qmp", vm.QMPPath)
		if res.code != 0 {
			t.Fatalf("backup after the VM came back: %s", res.errorMessage())
		}
		sum := res.summary(t)
		if d := diskSummaries(t, sum)["vda"]; d["mode"] != "full" {
			t.Errorf("after a QEMU crash: %v", d)
		}
		r.restoreCompare(sum["backup_id"].(string), want)
	})

	t.Run("repository full", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to mount a small tmpfs for the repository")
		}
		vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 64 << 20}}})
		r := newLiveRig(t, vm, false)
		mnt := filepath.Join(t.TempDir(), "small")
		os.Mkdir(mnt, 0o700)
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", mnt).CombinedOutput(); err != nil {
			t.Fatalf("mount: %v %s", err, out)
		}
		defer exec.Command("umount", "-l", mnt).Run()
		r.repo = filepath.Join(mnt, "repo")
		if res := r.run("repo", "init", "--repo", r.repo, "--encryption", "none"); res.code != 0 {
			t.Fatal(res.errorMessage())
		}
		random := filepath.Join(t.TempDir(), "random")
		b := make([]byte, 48<<20)
		for i := range b {
			b[i] = byte(r.rng.IntN(256))
		}
		os.WriteFile(random, b, 0o600)
		if err := vm.GuestIO("vda", fmt.Sprintf("write -s %s 0 %d", random, len(b))); err != nil {
			t.Fatal(err)
		}
		before := r.baseline()
		res := r.run("backup", "--repo", r.repo, "--qmp", vm.QMPPath)
		if res.code != 11 {
			t.Fatalf("backup into a full repository: exit %d %q, want 11 (no space)", res.code, res.errorMessage())
		}
		vm.AssertAsBefore(t, before)
		if out, err := exec.Command("mount", "-o", "remount,size=256m", mnt).CombinedOutput(); err != nil {
			t.Fatalf("remount: %v %s", err, out)
		}
		if v := r.run("verify", "--repo", r.repo); v.code != 0 {
			t.Fatalf("verify after the failed backup: %s", v.errorMessage())
		}
		want := r.expected()
		sum := r.backup()
		r.restoreCompare(sum["backup_id"].(string), want)
	})
}

// serveBackup runs "vmshadow serve" in the background until the test ends
// and returns the NBD URI of each disk once they are served.
func (r *liveRig) serveBackup(args ...string) (uris map[string]string, stop func() result) {
	r.t.Helper()
	cmd := exec.Command(bin, append([]string{"--json", "serve", "--repo", r.repo}, args...)...)
	cmd.Env = append(os.Environ(), r.env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		r.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	lines := make(chan map[string]any, 16)
	go func() {
		dec := json.NewDecoder(out)
		for {
			var m map[string]any
			if dec.Decode(&m) != nil {
				close(lines)
				return
			}
			lines <- m
		}
	}()
	uris = map[string]string{}
	timeout := time.After(time.Minute)
	for len(uris) == 0 || len(lines) > 0 {
		select {
		case m, ok := <-lines:
			if !ok {
				r.t.Fatal("serve ended before serving")
			}
			if m["phase"] == "serving" {
				uris[m["disk"].(string)] = m["nbd"].(string)
			} else if m["message_type"] == "error" {
				r.t.Fatalf("serve: %v", m["message"])
			}
		case <-timeout:
			r.t.Fatal("serve did not start")
		}
	}
	stopped := false
	stop = func() result {
		if stopped {
			return result{}
		}
		stopped = true
		cmd.Process.Signal(os.Interrupt)
		var res result
		for m := range lines {
			res.msgs = append(res.msgs, m)
		}
		cmd.Wait()
		res.code = cmd.ProcessState.ExitCode()
		return res
	}
	r.t.Cleanup(func() { stop() })
	return uris, stop
}

// TestServeInstantRestore: a backup served over NBD reads as the disk was;
// a QEMU VM attaches it as a drive and reads it through its device;
// --writable keeps writes in an overlay and leaves the repository as it was.
func TestServeInstantRestore(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 64 << 20}}})
	r := newLiveRig(t, vm, true)
	vm.Write("vda", 0x61, 0, 8<<20)
	vm.Write("vda", 0x62, 20<<20, 1<<20)
	want := r.expected()
	id := r.backup()["backup_id"].(string)
	expFile := filepath.Join(t.TempDir(), "expected.raw")
	os.WriteFile(expFile, want["vda"], 0o600)

	sock := filepath.Join(t.TempDir(), "serve.sock")
	uris, stop := r.serveBackup(id, "--listen", "unix:"+sock, "--writable")
	uri := uris["vda"]
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, expFile).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare with the served backup: %v: %s", err, out)
	}
	// Instant restore: a second VM attaches the export as its disk.
	boot := qemutest.Start(t, qemutest.Options{Extra: []string{
		"-drive", "file=" + uri + ",format=raw,if=none,id=drv-restored",
		"-device", "virtio-blk-pci,drive=drv-restored,id=restored,share-rw=on"}})
	if err := boot.GuestIO("restored", "read -P 0x62 20M 1M"); err != nil {
		t.Fatalf("VM reading the restored disk: %v", err)
	}
	// Writes through the VM land in the overlay.
	boot.Write("restored", 0x7e, 1<<20, 64<<10)
	if err := boot.GuestIO("restored", "read -P 0x7e 1M 64k"); err != nil {
		t.Fatalf("read back a write: %v", err)
	}
	if err := boot.GuestIO("restored", "read -P 0x61 0 1M"); err != nil {
		t.Fatalf("unwritten data changed: %v", err)
	}
	boot.Kill()
	res := stop()
	if res.code != 0 || res.summary(t)["backup_id"] != id {
		t.Fatalf("serve ended with %d %v", res.code, res.msgs)
	}
	// The repository is unchanged: the backup still restores as it was.
	if v := r.run("verify", "--repo", r.repo); v.code != 0 {
		t.Fatal(v.errorMessage())
	}
	r.restoreCompare(id, want)
	// Read-only by default: writes are refused.
	uris, _ = r.serveBackup(id, "--listen", "unix:"+sock)
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uris["vda"]).CombinedOutput(); err == nil && !strings.Contains(string(out), "failed") && !strings.Contains(string(out), "read-only") && !strings.Contains(string(out), "Permission") {
		t.Fatalf("write to a read-only export succeeded: %s", out)
	}
}
