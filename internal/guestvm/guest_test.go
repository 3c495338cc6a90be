package guestvm

import (
	"context"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/walcheck"
)

// waitStatus polls the guest's status until ok accepts it.
func waitStatus(t *testing.T, vm *VM, what string, ok func(Status) bool) Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for {
		st, err := vm.Status(ctx)
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ok(st) {
			return st
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: last status %+v", what, st)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func TestGuestBootsAndWorkloadRuns(t *testing.T) {
	dir := TempDir(t)
	disk := DataDiskForTest(t, dir, "data.qcow2", 256<<20, "qcow2")
	vm := StartForTest(t, Options{Dir: dir, DataDisks: []Disk{disk}})
	ctx := context.Background()

	st := waitStatus(t, vm, "walapp to write", func(s Status) bool { return s.App && s.Seq > 0 })
	if !st.Agent {
		t.Errorf("qemu-ga not running: %+v", st)
	}
	first := st.Seq
	st = waitStatus(t, vm, "walapp to go on writing", func(s Status) bool { return s.Seq > first })

	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	raw := filepath.Join(dir, "data.raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", disk.Path, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	fsck, err := walcheck.Fsck(ctx, raw)
	if err != nil {
		t.Fatal(err)
	}
	if !fsck.Clean {
		t.Errorf("e2fsck -fn not clean (exit %d):\n%s", fsck.ExitCode, fsck.Output)
	}
	res, err := walcheck.CheckImage(ctx, raw, "")
	if err != nil {
		t.Fatal(err)
	}
	if res.TrailingPartial {
		t.Errorf("clean shutdown left a partial record: %+v", res)
	}
	if res.LastSeq < st.Seq {
		t.Errorf("log ends at record %d, but the guest had written %d", res.LastSeq, st.Seq)
	}
	t.Logf("log: %d records, %d bytes", res.LastSeq, res.Bytes)
}
