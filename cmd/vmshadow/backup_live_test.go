package main

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

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

// backup runs a live backup that must succeed and returns its summary.
func (r *liveRig) backup(extra ...string) map[string]any {
	r.t.Helper()
	res := r.run(append([]string{"backup", "--repo", r.repo, "--qmp", r.vm.QMPPath}, extra...)...)
	if res.code != 0 {
		r.t.Fatalf("backup: exit %d: %s", res.code, res.errorMessage())
	}
	return res.summary(r.t)
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
	res := r.run("restore", "--repo", r.repo, id, "--to", dir)
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
