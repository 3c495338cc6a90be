package guestvm

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/qga"
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
		case <-time.After(300 * time.Millisecond):
		}
	}
}

func status(t *testing.T, vm *VM) Status {
	t.Helper()
	st, err := vm.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func dialAgent(t *testing.T, vm *VM) *qga.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := qga.Dial(ctx, vm.AgentSocket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// toRaw converts a qcow2 image to a raw one next to it for the e2fsprogs tools.
func toRaw(t *testing.T, qcow2 string) string {
	t.Helper()
	raw := strings.TrimSuffix(qcow2, filepath.Ext(qcow2)) + ".raw"
	if out, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	return raw
}

// TestGuestBootsAndWorkloadRuns boots the real guest under QEMU, freezes and
// thaws it through the real qemu-ga, whose fsfreeze hook pauses and resumes
// walapp, then powers it off and checks the data disk.
func TestGuestBootsAndWorkloadRuns(t *testing.T) {
	dir := TempDir(t)
	disk := DataDiskForTest(t, dir, "data.qcow2", 256<<20, "qcow2")
	vm := StartForTest(t, Options{Dir: dir, DataDisks: []Disk{disk}})
	ctx := context.Background()

	st := waitStatus(t, vm, "walapp to write", func(s Status) bool { return s.App && s.Seq > 0 })
	if !st.Agent || st.Paused || st.RefuseFreeze {
		t.Fatalf("unexpected guest state after boot: %+v", st)
	}

	agent := dialAgent(t, vm) // guest-sync-delimited
	if s, err := agent.FreezeStatus(ctx); err != nil || s != "thawed" {
		t.Fatalf("guest-fsfreeze-status = %q, %v; want thawed", s, err)
	}
	freezeStart := time.Now()
	n, err := agent.Freeze(ctx, nil)
	freezeTime := time.Since(freezeStart)
	if err != nil {
		t.Fatalf("guest-fsfreeze-freeze: %v", err)
	}
	if n != 1 {
		t.Errorf("guest-fsfreeze-freeze froze %d file systems, want 1 (/data)", n)
	}
	if s, err := agent.FreezeStatus(ctx); err != nil || s != "frozen" {
		t.Errorf("guest-fsfreeze-status = %q, %v; want frozen", s, err)
	}
	frozen := status(t, vm)
	if !frozen.Paused || frozen.State != "paused" || frozen.Seq != frozen.Durable {
		t.Errorf("walapp not paused by the fsfreeze hook: %+v", frozen)
	}
	want := fmt.Sprintf("fsfreeze-hook: freeze: walapp paused at seq %d", frozen.Durable)
	if !strings.Contains(vm.Console(), want) {
		t.Errorf("console lacks %q", want)
	}
	time.Sleep(2 * time.Second)
	if later := status(t, vm); later.Seq != frozen.Seq {
		t.Errorf("walapp wrote while frozen: record %d, then %d", frozen.Seq, later.Seq)
	}

	if n, err := agent.Thaw(ctx); err != nil || n != 1 {
		t.Errorf("guest-fsfreeze-thaw = %d, %v; want 1", n, err)
	}
	thawed := waitStatus(t, vm, "walapp to resume", func(s Status) bool { return s.Seq > frozen.Seq })
	if thawed.Paused {
		t.Errorf("paused marker still there after thaw: %+v", thawed)
	}
	if s, err := agent.FreezeStatus(ctx); err != nil || s != "thawed" {
		t.Errorf("guest-fsfreeze-status = %q, %v; want thawed", s, err)
	}

	stopStart := time.Now()
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	stopTime := time.Since(stopStart)
	raw := toRaw(t, disk.Path)
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
	if res.TrailingPartial || res.LastSeq < thawed.Seq {
		t.Errorf("log after a clean power-off: %+v; the guest had written record %d", res, thawed.Seq)
	}
	t.Logf("boot %v, freeze call %v, power-off %v; log: %d records, %d bytes",
		vm.BootTime.Round(time.Millisecond), freezeTime.Round(time.Millisecond), stopTime.Round(time.Millisecond), res.LastSeq, res.Bytes)
}

// TestGuestKnobs checks the guest's switches that the failure tests of the
// backup use: no agent at boot, agent started and stopped at run time, a hook
// that refuses to freeze, and a guest killed while walapp writes.
func TestGuestKnobs(t *testing.T) {
	dir := TempDir(t)
	disk := DataDiskForTest(t, dir, "data.raw", 64<<20, "raw")
	vm := StartForTest(t, Options{Dir: dir, DataDisks: []Disk{disk},
		KernelArgs: []string{"vmshadow.noagent=1", "vmshadow.refuse_freeze=1", "vmshadow.wal_interval_ms=0"}})
	ctx := context.Background()

	st := status(t, vm)
	if st.Agent || !st.RefuseFreeze || !st.App {
		t.Fatalf("boot knobs not applied: %+v", st)
	}
	short, cancel := context.WithTimeout(ctx, 3*time.Second)
	_, err := qga.Dial(short, vm.AgentSocket)
	cancel()
	if !errors.Is(err, errs.ErrConnect) {
		t.Fatalf("agent answered although not started: %v", err)
	}

	if _, err := vm.Control(ctx, "agent-start"); err != nil {
		t.Fatal(err)
	}
	agent := dialAgent(t, vm)
	if _, err := agent.Freeze(ctx, nil); err == nil || !strings.Contains(err.Error(), "hook") {
		t.Fatalf("freeze with a refusing hook: %v; want the hook's failure", err)
	}
	if !strings.Contains(vm.Console(), "fsfreeze-hook: freeze refused") {
		t.Error("console lacks the hook's refusal")
	}
	if s, err := agent.FreezeStatus(ctx); err != nil || s != "thawed" {
		t.Errorf("after a refused freeze: guest-fsfreeze-status = %q, %v; want thawed", s, err)
	}
	before := status(t, vm)
	waitStatus(t, vm, "walapp to go on after a refused freeze", func(s Status) bool { return s.Seq > before.Seq && !s.Paused })

	if _, err := vm.Control(ctx, "refuse-freeze off"); err != nil {
		t.Fatal(err)
	}
	if n, err := agent.Freeze(ctx, nil); err != nil || n != 1 {
		t.Fatalf("freeze after refuse-freeze off = %d, %v", n, err)
	}
	if n, err := agent.Thaw(ctx); err != nil || n != 1 {
		t.Fatalf("thaw = %d, %v", n, err)
	}
	agent.Close()
	if _, err := vm.Control(ctx, "agent-stop"); err != nil {
		t.Fatal(err)
	}
	if st := status(t, vm); st.Agent {
		t.Errorf("agent still running after agent-stop: %+v", st)
	}
	if strings.Contains(vm.Console(), "did not exit on SIGTERM") {
		t.Error("qemu-ga, not frozen, needed SIGKILL to stop")
	}
	if _, err := vm.Control(ctx, "no-such-command"); err == nil {
		t.Error("unknown control command accepted")
	}

	// A crash while writing flat out: the log may end in a partial record,
	// never in a corrupt one, once the journal is replayed.
	before = status(t, vm)
	waitStatus(t, vm, "walapp to write", func(s Status) bool { return s.Seq > before.Seq+50 })
	vm.Kill()
	if _, err := vm.Status(ctx); err == nil {
		t.Error("control port answers after the kill")
	}
	if err := walcheck.Recover(ctx, disk.Path); err != nil {
		t.Fatal(err)
	}
	fsck, err := walcheck.Fsck(ctx, disk.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !fsck.Clean {
		t.Errorf("e2fsck -fn after journal replay not clean (exit %d):\n%s", fsck.ExitCode, fsck.Output)
	}
	res, err := walcheck.CheckImage(ctx, disk.Path, "")
	if err != nil {
		t.Fatal(err)
	}
	if res.LastSeq == 0 {
		t.Errorf("no record survived the crash: %+v", res)
	}
	t.Logf("after the crash: %d records, %d bytes, partial tail %v (%d bytes)", res.LastSeq, res.Bytes, res.TrailingPartial, res.TrailingBytes())
}

// TestGuestPowerOffWhileFrozen: Stop works even when a freeze was left
// behind, and the disk is then clean with a complete log.
func TestGuestPowerOffWhileFrozen(t *testing.T) {
	dir := TempDir(t)
	disk := DataDiskForTest(t, dir, "data.raw", 64<<20, "raw")
	vm := StartForTest(t, Options{Dir: dir, DataDisks: []Disk{disk}})
	ctx := context.Background()
	waitStatus(t, vm, "walapp to write", func(s Status) bool { return s.Seq > 0 })
	agent := dialAgent(t, vm)
	if n, err := agent.Freeze(ctx, nil); err != nil || n != 1 {
		t.Fatalf("freeze = %d, %v", n, err)
	}
	paused := status(t, vm)
	if err := vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(vm.Console(), "vmshadow-guest: thawed /data") {
		t.Error("console does not show /data thawed before power-off")
	}
	if fsck, err := walcheck.Fsck(ctx, disk.Path); err != nil || !fsck.Clean {
		t.Errorf("e2fsck -fn: %v:\n%s", err, fsck.Output)
	}
	res, err := walcheck.CheckImage(ctx, disk.Path, "")
	if err != nil || res.TrailingPartial || res.LastSeq != paused.Durable {
		t.Errorf("log %+v, %v; walapp had paused at record %d and must not write after", res, err, paused.Durable)
	}
}
