package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/qemutest"
)

// TestLiveBackupDamagedParent: incremental backups of a running VM after
// damage to what they build on. A damaged index of the previous backup
// makes the next backup read in full, saying why (instead of failing every
// backup from then on); a damaged chunk that verify quarantined is read
// again by the next incremental backup although the guest did not change
// it; each backup restores bit-identical.
func TestLiveBackupDamagedParent(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 32 << 20}}})
	r := newLiveRig(t, vm, true)
	for i := range int64(4) {
		vm.Write("vda", byte(1+i), i*testChunk, testChunk)
	}
	sum := r.backup()

	idx := filepath.Join(r.repo, "indexes", diskSummaries(t, sum)["vda"]["index"].(string))
	b, err := os.ReadFile(idx)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 1
	os.WriteFile(idx, b, 0o600)
	want := r.expected()
	sum = r.backup()
	if d := diskSummaries(t, sum)["vda"]; d["mode"] != "full" || !strings.Contains(fmt.Sprint(d["reason"]), "index cannot be read") {
		t.Errorf("backup after its parent's index was damaged: mode %v reason %q, want full saying why", d["mode"], d["reason"])
	}
	r.restoreCompare(sum["backup_id"].(string), want)

	chunks, _ := filepath.Glob(filepath.Join(r.repo, "chunks", "*", "*"))
	if len(chunks) == 0 {
		t.Fatal("no chunk files")
	}
	c, _ := os.ReadFile(chunks[0])
	c[len(c)/2] ^= 1
	os.WriteFile(chunks[0], c, 0o600)
	if res := r.run("verify", "--repo", r.repo); res.code != 8 {
		t.Fatalf("verify of a damaged chunk: exit %d %s", res.code, res.errorMessage())
	}
	want = r.expected()
	sum = r.backup()
	if d := diskSummaries(t, sum)["vda"]; d["mode"] != "incremental" || num(d["bytes_read"]) != testChunk || num(d["chunks_new"]) != 1 {
		t.Errorf("incremental after verify quarantined a chunk: %v; want incremental reading and storing that chunk", d)
	}
	r.restoreCompare(sum["backup_id"].(string), want)
	res := r.run("verify", "--repo", r.repo)
	if res.code != 0 {
		t.Fatalf("verify after the heal: exit %d %s", res.code, res.errorMessage())
	}
	if hb, _ := res.summary(t)["healed_backups"].([]any); len(hb) != 3 {
		t.Errorf("verify after the heal: healed_backups %v, want all 3 backups (they share the chunk)", hb)
	}
}
