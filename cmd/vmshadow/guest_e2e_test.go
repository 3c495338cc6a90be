package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/guestvm"
	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/walcheck"
)

// guestRig is the real test guest (Linux, qemu-ga, the walapp workload)
// with a repository.
type guestRig struct {
	t    *testing.T
	vm   *guestvm.VM
	env  []string
	repo string
	dir  string

	look    *qemutest.Peer // the test's own QMP connection to vm
	lookPID int
}

// peer is the test's own look at the guest's QEMU (a new one once the
// guest was started again).
func (g *guestRig) peer() *qemutest.Peer {
	g.t.Helper()
	if g.look == nil || g.lookPID != g.vm.PID {
		g.look, g.lookPID = qemutest.Attach(g.t, g.vm.TestQMPSocket, g.vm.PID), g.vm.PID
	}
	return g.look
}

// baseline records what a backup's set may take from the guest's QEMU.
func (g *guestRig) baseline() qemutest.Baseline {
	g.t.Helper()
	return g.peer().Baseline(scratchOf(g.t, g.env)).WithChains()
}

func startGuest(t *testing.T, kernelArgs ...string) *guestRig {
	t.Helper()
	dir := guestvm.TempDir(t)
	disk := guestvm.DataDiskForTest(t, dir, "data.qcow2", 256<<20, "qcow2")
	vm := guestvm.StartForTest(t, guestvm.Options{Dir: dir, DataDisks: []guestvm.Disk{disk}, KernelArgs: kernelArgs})
	state, env := stateEnv(t)
	g := &guestRig{t: t, vm: vm, env: append(env, "VMSHADOW_PASSWORD=guest-test"), repo: filepath.Join(state, "repo"), dir: dir}
	if res := vmshadow(t, g.env, "repo", "init", "--repo", g.repo); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	return g
}

func (g *guestRig) status() guestvm.Status {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := g.vm.Status(ctx)
	if err != nil {
		g.t.Fatalf("guest status: %v", err)
	}
	return st
}

func (g *guestRig) control(cmd string) {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := g.vm.Control(ctx, cmd); err != nil {
		g.t.Fatal(err)
	}
}

// waitRecords waits until the workload has written more than seq records,
// running and not paused: the guest is alive and the workload resumed.
func (g *guestRig) waitRecords(seq uint64) uint64 {
	g.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st := g.status()
		if st.Seq > seq && !st.Paused && st.State == "running" {
			return st.Seq
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("the workload did not go on writing (status %+v, waiting for > %d)", st, seq)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// backup runs a backup, which whether it succeeds or not must give back
// everything its set took.
func (g *guestRig) backup(args ...string) result {
	g.t.Helper()
	return g.backupFrom(g.baseline(), args...)
}

func (g *guestRig) backupFrom(before qemutest.Baseline, args ...string) result {
	g.t.Helper()
	res := vmshadow(g.t, g.env, append([]string{"backup", "--repo", g.repo, "--qmp", g.vm.QMPSocket, "--qga", g.vm.AgentSocket}, args...)...)
	g.peer().AssertAsBefore(g.t, before)
	return res
}

// checkRestored restores a backup's data disk and checks the file system
// and the workload's log. It returns the log's last record.
func (g *guestRig) checkRestored(id, level string) uint64 {
	g.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	img := filepath.Join(g.t.TempDir(), "data.raw")
	if res := vmshadow(g.t, g.env, "restore", "--repo", g.repo, id, "--to", img); res.code != 0 {
		g.t.Fatalf("restore %s: %s", id, res.errorMessage())
	}
	fsck, err := walcheck.Fsck(ctx, img)
	if err != nil || !fsck.Clean {
		g.t.Fatalf("backup %s: e2fsck -fn of the restored disk is not clean (%v):\n%s", id, err, fsck.Output)
	}
	res, err := walcheck.CheckImage(ctx, img, "")
	if err != nil {
		g.t.Fatalf("backup %s: the workload's log is damaged: %v", id, err)
	}
	if res.TrailingPartial {
		g.t.Errorf("backup %s (%s-consistent): the log ends in a torn record after %d", id, level, res.LastSeq)
	}
	if res.LastSeq == 0 {
		g.t.Errorf("backup %s: the log is empty", id)
	}
	if level == "application" {
		cp, err := walcheck.ImageCheckpoint(ctx, img, "")
		if err != nil {
			g.t.Fatalf("backup %s: no application checkpoint: %v", id, err)
		}
		if cp != res.LastSeq {
			g.t.Errorf("backup %s: application-consistent copy ends at record %d, but the application's consistency point is %d", id, res.LastSeq, cp)
		}
	}
	return res.LastSeq
}

// TestGuestConsistentBackups backs a real guest up, full then incremental,
// while its workload writes, and checks the restored images: file system
// clean, the log complete up to a record; with the application writer
// (--guest-hook, which pauses the workload), the copy ends exactly at the
// workload's consistency point and the set reports "application"; with the
// agent alone it reports "filesystem".
func TestGuestConsistentBackups(t *testing.T) {
	for _, tc := range []struct {
		level string
		args  []string
	}{
		{"application", []string{"--guest-hook", "/etc/qemu/fsfreeze-hook", "--require", "application"}},
		{"filesystem", []string{"--require", "filesystem"}},
	} {
		t.Run(tc.level, func(t *testing.T) {
			// The agent runs without its own fsfreeze hook: the
			// application writer is vmshadow's --guest-hook or nothing.
			g := startGuest(t, "vmshadow.nohook=1")
			seq := g.waitRecords(20)
			var last uint64
			for i, mode := range []string{"full", "incremental"} {
				res := g.backup(tc.args...)
				if res.code != 0 {
					t.Fatalf("%s backup: exit %d: %s", mode, res.code, res.errorMessage())
				}
				sum := res.summary(t)
				if sum["consistency"] != tc.level || sum["mode"] != mode {
					t.Errorf("backup %d: consistency %v mode %v, want %s %s", i, sum["consistency"], sum["mode"], tc.level, mode)
				}
				if ms := num(sum["freeze_ms"]); ms <= 0 || ms >= 10000 {
					t.Errorf("backup %d: freeze_ms %d, want within (0, 10000)", i, ms)
				}
				t.Logf("%s backup: freeze %d ms, read %d bytes in %.1f s", mode, num(sum["freeze_ms"]), num(sum["bytes_read"]), sum["duration_s"])
				seq = g.waitRecords(seq) // the guest runs on, the workload resumed
				got := g.checkRestored(sum["backup_id"].(string), tc.level)
				if got <= last {
					t.Errorf("backup %d ends at record %d, not after the previous backup's %d", i, got, last)
				}
				last = got
				seq = g.waitRecords(seq + 20)
			}
		})
	}
}

// TestGuestWriterFailures: the real agent stopped, the guest's hook
// refusing to freeze, and the guest killed mid-backup. Each fails cleanly
// or falls back to crash consistency as asked, the guest is left thawed and
// running, and the next backup succeeds.
func TestGuestWriterFailures(t *testing.T) {
	g := startGuest(t) // the agent runs the guest's fsfreeze hook (-F)
	seq := g.waitRecords(10)
	fast := []string{"--writer-timeout", "5s"}

	g.control("agent-stop")
	if res := g.backup(append(fast, "--require", "filesystem")...); res.code != 4 {
		t.Fatalf("agent stopped, --require filesystem: exit %d %q, want 4", res.code, res.errorMessage())
	}
	res := g.backup(fast...)
	if res.code != 0 || res.summary(t)["consistency"] != "crash" || !strings.Contains(strings.Join(res.warnings(), " "), "guest-agent") {
		t.Fatalf("agent stopped, no --require: exit %d, %v, warnings %q", res.code, res.msgs[len(res.msgs)-1], res.warnings())
	}
	seq = g.waitRecords(seq)
	g.control("agent-start")

	g.control("refuse-freeze on")
	if res := g.backup(append(fast, "--require", "filesystem")...); res.code != 4 || !strings.Contains(res.errorMessage(), "hook") {
		t.Fatalf("hook refuses, --require filesystem: exit %d %q, want 4", res.code, res.errorMessage())
	}
	if st := g.status(); st.Paused {
		t.Fatalf("workload left paused after a refused freeze: %+v", st)
	}
	seq = g.waitRecords(seq)
	g.control("refuse-freeze off")
	res = g.backup(append(fast, "--require", "filesystem")...)
	if res.code != 0 {
		t.Fatalf("backup after the failures: %s", res.errorMessage())
	}
	g.checkRestored(res.summary(t)["backup_id"].(string), "filesystem")
	g.waitRecords(seq)

	// The guest killed in the middle of a backup.
	time.Sleep(time.Second) // some changes for the incremental to read
	r := &liveRig{t: t, env: g.env}
	p := r.startPaused("backup-read", "backup", "--repo", g.repo, "--qmp", g.vm.QMPSocket, "--qga", g.vm.AgentSocket)
	g.vm.Kill()
	if res := p.resume(); res.code == 0 {
		t.Fatal("backup of a guest killed mid-backup succeeded")
	}
	if v := vmshadow(t, g.env, "verify", "--repo", g.repo); v.code != 0 {
		t.Fatalf("verify: %s", v.errorMessage())
	}
	// The guest boots again from the same disk; the next backup works.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	gb, err := guestvm.Build(ctx)
	if err != nil {
		t.Fatal(err)
	}
	vm2, err := guestvm.Start(ctx, gb, guestvm.Options{Dir: g.dir, DataDisks: g.vm.Disks})
	if err != nil {
		t.Fatal(err)
	}
	defer vm2.Kill()
	g.vm = vm2
	g.waitRecords(0)
	// This backup also releases the killed guest's set: its scratch files go.
	before := g.baseline()
	before.Scratch = nil
	res = g.backupFrom(before, append(fast, "--require", "filesystem")...)
	if res.code != 0 {
		t.Fatalf("backup after the guest came back: %s", res.errorMessage())
	}
	if w := strings.Join(res.warnings(), " "); !strings.Contains(w, "interrupted backup") {
		t.Errorf("no warning about the interrupted backup's set: %q", w)
	}
	g.checkRestored(res.summary(t)["backup_id"].(string), "filesystem")
}
