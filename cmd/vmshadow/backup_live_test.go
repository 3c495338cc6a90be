package main

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
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
	if res := r.run("verify", "--repo", r.repo); res.code != 0 {
		t.Fatalf("verify: %s", res.errorMessage())
	}
}
