package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/grouptest"
	"github.com/vmshadow/vmshadow/internal/guestvm"
	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/qga"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// groupLogSize is the size of each VM's log disk (grouptest's records):
// distinct from the guests' data disks, so that a backup's log disk is
// found by its size.
const groupLogSize = 8 << 20

// rigVM is one VM of the consistency-group rig, in the workload's order.
type rigVM struct {
	name string         // the VM's -name, its name in the repository
	qmp  string         // QMP socket for vmshadow
	qga  string         // guest agent socket; "" for the VM without an OS
	peer *qemutest.Peer // the test's own QMP connection
}

// groupRig is issue 17's proof rig: two real test guests with qemu-ga and a
// QEMU VM without an OS, each with a log disk the grouptest workload writes
// n to in turn (guest a, guest b, then c through qemu-io), and a repository.
type groupRig struct {
	env     []string
	repo    string
	members []rigVM
	work    *grouptest.Workload
}

// startGroup boots the three VMs (the two guests at the same time) and
// starts the workload.
func startGroup(t *testing.T) *groupRig {
	t.Helper()
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "qemu-system-x86_64")
	testutil.NeedCommand(t, "qemu-img")
	testutil.NeedCommand(t, "apt-get")
	testutil.NeedCommand(t, "dpkg-deb")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	g, err := guestvm.Build(ctx)
	if err != nil {
		t.Fatal(err)
	}
	state, env := stateEnv(t)
	r := &groupRig{env: append(env, "VMSHADOW_PASSWORD=group-test"), repo: filepath.Join(state, "repo")}
	if res := vmshadow(t, r.env, "repo", "init", "--repo", r.repo); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}

	// The guests: an ext4 data disk (vda, frozen by the agent) and the log
	// disk (vdb, no file system). No walapp (noapp) and no fsfreeze hook:
	// the agent's freeze is the writer, the grouptest workload the load.
	guestNames := []string{"grp-a", "grp-b"}
	opts := make([]guestvm.Options, 2)
	for i := range opts {
		dir := guestvm.TempDir(t)
		data := guestvm.DataDiskForTest(t, dir, "data.qcow2", 32<<20, "qcow2")
		log := filepath.Join(dir, "log.qcow2")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", log, fmt.Sprint(groupLogSize)).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create %s: %v: %s", log, err, out)
		}
		opts[i] = guestvm.Options{Dir: dir, MemoryMB: 192, KernelArgs: []string{"vmshadow.noapp=1", "vmshadow.nohook=1"},
			DataDisks: []guestvm.Disk{data, {Path: log, Format: "qcow2"}},
			ExtraArgs: append([]string{"-name", guestNames[i]}, grouptest.WorkAgentArgs(filepath.Join(dir, "work.sock"))...)}
	}
	guests := make([]*guestvm.VM, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range opts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			guests[i], errs[i] = guestvm.Start(ctx, g, opts[i])
		}()
	}
	wg.Wait()
	for i, vm := range guests {
		if vm != nil {
			t.Cleanup(func() {
				vm.Kill()
				if t.Failed() {
					t.Logf("guest %d console:\n%s", i, tail(vm.Console(), 3000))
				}
			})
		}
	}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("guest %d: %v", i, err)
		}
	}
	workSock := make([]string, len(guests))
	for i, vm := range guests {
		t.Logf("guest %d ready in %v under %s", i, vm.BootTime.Round(time.Millisecond), vm.Accel)
		// The workload writes to /dev/vdb: it must be the log disk.
		con := vm.Console()
		if !strings.Contains(con, "mounted /dev/vda on /data") || !strings.Contains(con, "cannot mount /dev/vdb as ext4") {
			t.Fatalf("guest %d: vda is not the data disk or vdb not the bare log disk:\n%s", i, tail(con, 3000))
		}
		// The workload writes through an agent of its own, which the
		// backups do not hold (see grouptest.StartWorkAgent).
		if err := grouptest.StartWorkAgent(ctx, vm.AgentSocket); err != nil {
			t.Fatalf("guest %d: %v", i, err)
		}
		workSock[i] = filepath.Join(opts[i].Dir, "work.sock")
	}

	// The VM without an OS, its log written through a QMP monitor of the
	// workload's own.
	dir, err := os.MkdirTemp("", "vsgrp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	work := filepath.Join(dir, "work.sock")
	c := qemutest.Start(t, qemutest.Options{Name: "grp-c", Running: true,
		Disks: []qemutest.Disk{{ID: "log", Size: groupLogSize}},
		Extra: []string{"-qmp", "unix:" + work + ",server=on,wait=off"}})
	qio := &grouptest.QEMUIO{VMName: "grp-c", QMPSocket: work, Device: qemutest.QOMPath("log"), Stdout: c.StdoutPath, Dir: dir}

	r.members = []rigVM{
		{name: guestNames[0], qmp: guests[0].QMPSocket, qga: guests[0].AgentSocket, peer: qemutest.Attach(t, guests[0].TestQMPSocket, guests[0].PID)},
		{name: guestNames[1], qmp: guests[1].QMPSocket, qga: guests[1].AgentSocket, peer: qemutest.Attach(t, guests[1].TestQMPSocket, guests[1].PID)},
		{name: "grp-c", qmp: c.QMPPath, peer: c.Peer()},
	}
	r.work = grouptest.Start([]grouptest.Target{
		&grouptest.GuestAgent{VMName: guestNames[0], Socket: workSock[0], Device: "/dev/vdb"},
		&grouptest.GuestAgent{VMName: guestNames[1], Socket: workSock[1], Device: "/dev/vdb"},
		qio,
	}, grouptest.Options{Slots: groupLogSize / grouptest.RecordSize})
	t.Cleanup(func() {
		if err := r.work.Stop(); err != nil {
			t.Errorf("workload: %v", err)
		}
		qio.Close()
	})
	r.waitAll(t, 2)
	return r
}

// waitAll waits until every VM has k more records than now.
func (r *groupRig) waitAll(t *testing.T, k uint64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	last := len(r.members) - 1
	if err := r.work.WaitFor(ctx, last, r.work.Written()[0]+k); err != nil {
		t.Fatal(err)
	}
}

// backup backs one member up alone (its own set) and returns the backup.
// Without agent, the set is crash-consistent (for a paused VM, whose agent
// cannot answer).
func (r *groupRig) backup(t *testing.T, m rigVM, agent bool) string {
	t.Helper()
	args := []string{"backup", "--repo", r.repo, "--qmp", m.qmp}
	if m.qga != "" && agent {
		args = append(args, "--qga", m.qga, "--require", "filesystem")
	}
	res := vmshadow(t, r.env, args...)
	if res.code != 0 {
		t.Fatalf("backup %s: exit %d: %s", m.name, res.code, res.errorMessage())
	}
	sum := res.summary(t)
	if sum["vm"] != m.name {
		t.Errorf("backup of %s stored as VM %v", m.name, sum["vm"])
	}
	t.Logf("backup %s: %s, %s, freeze %v ms, %.1f s", m.name, sum["mode"], sum["consistency"], sum["freeze_ms"], sum["duration_s"])
	return sum["backup_id"].(string)
}

// restoreLog restores a member backup's log disk (found by its size) and
// returns the raw image.
func (r *groupRig) restoreLog(t *testing.T, id string) string {
	t.Helper()
	dir := t.TempDir()
	res := vmshadow(t, r.env, "restore", "--repo", r.repo, id, "--to", dir+"/")
	if res.code != 0 {
		t.Fatalf("restore %s: exit %d: %s", id, res.code, res.errorMessage())
	}
	logs := findLogs(t, dir)
	if len(logs) != 1 {
		t.Fatalf("restore %s: %d disks of %d bytes in %s (%v), want the one log disk", id, len(logs), groupLogSize, dir, logs)
	}
	return logs[0]
}

// during runs f and returns how many records the workload wrote meanwhile,
// to all VMs.
func (r *groupRig) during(f func()) uint64 {
	before := r.work.Written()
	f()
	var n uint64
	for i, w := range r.work.Written() {
		n += w - before[i]
	}
	return n
}

// findLogs lists the files of groupLogSize bytes under dir.
func findLogs(t *testing.T, dir string) []string {
	t.Helper()
	var logs []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if fi, err := d.Info(); err == nil && fi.Size() == groupLogSize {
			logs = append(logs, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return logs
}

// check runs the checker on restored log images, in the members' order.
func (r *groupRig) check(images []string) (grouptest.Result, error) {
	var ms []grouptest.Member
	for i, m := range r.members {
		ms = append(ms, grouptest.Member{Name: m.name, Image: images[i]})
	}
	return grouptest.Check(ms)
}

// takeSequential backs the members up one after another, each its own set,
// and restores their logs. Before each member's backup it waits until that
// member has a record the previous member's copy cannot hold (one past
// what the previous member had written when its backup ended): the
// workload has moved on, as it does between the jobs of a per-VM schedule.
func (r *groupRig) takeSequential(t *testing.T) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var ids []string
	for k, m := range r.members {
		if k > 0 {
			if err := r.work.WaitFor(ctx, k, r.work.Written()[k-1]+1); err != nil {
				t.Fatal(err)
			}
		}
		ids = append(ids, r.backup(t, m, true))
	}
	return r.restoreLogs(t, ids)
}

func (r *groupRig) restoreLogs(t *testing.T, ids []string) []string {
	t.Helper()
	var images []string
	for _, id := range ids {
		images = append(images, r.restoreLog(t, id))
	}
	return images
}

// takePaused makes one instant of the three VMs with what vmshadow has
// without groups: every VM paused (QMP stop), each backed up alone
// (crash-consistent: a paused guest's agent cannot answer), every VM
// resumed. It proves that restored backups of one instant pass the check.
func takePaused(t *testing.T, r *groupRig) []string {
	t.Helper()
	for _, m := range r.members {
		m.peer.Exec("stop", nil, nil)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			for _, m := range r.members {
				m.peer.Exec("cont", nil, nil)
			}
		}
	}
	defer resume()
	var ids []string
	for _, m := range r.members {
		ids = append(ids, r.backup(t, m, false))
	}
	resume()
	return r.restoreLogs(t, ids)
}

// groupRounds takes rounds restored groups with take while the workload
// runs and requires the cross-VM invariant in every one, each round's
// logs further on than the last round's.
func (r *groupRig) groupRounds(t *testing.T, rounds int, take func(t *testing.T, r *groupRig) []string) {
	t.Helper()
	prev := make([]uint64, len(r.members))
	for round := 1; round <= rounds; round++ {
		r.waitAll(t, 2)
		res, err := r.check(take(t, r))
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for i := range prev {
			if res.Max[i] <= prev[i] {
				t.Fatalf("round %d: %s's log ends at %d, not after the previous round's %d: the group did not catch the running workload (%s)", round, r.members[i].name, res.Max[i], prev[i], res)
			}
		}
		copy(prev, res.Max)
		t.Logf("round %d: one instant: %s (workload at %v)", round, res, r.work.Written())
	}
}

// takeGroup backs the members up as one group (one set across the three
// VMs: every writer frozen, the VMs paused together around the commit) and
// restores the group backup, each member into DIR/VM/.
func takeGroup(t *testing.T, r *groupRig) []string {
	t.Helper()
	args := []string{"backup", "--repo", r.repo, "--group", "grp"}
	for _, m := range r.members {
		args = append(args, "--qmp", m.qmp, "--qga", m.qga) // one --qga per --qmp; "" for none
	}
	var res result
	wrote := r.during(func() { res = vmshadow(t, r.env, args...) })
	if res.code != 0 {
		t.Fatalf("group backup: exit %d: %s", res.code, res.errorMessage())
	}
	if wrote == 0 {
		// Nothing happened to catch: a group that is not one instant
		// would pass as well.
		t.Errorf("the workload wrote nothing while the group backup ran: it must run through the set")
	}
	sum := res.summary(t)
	id, _ := sum["group_backup_id"].(string)
	if id == "" {
		t.Fatalf("group backup: no group_backup_id in the summary %v", sum)
	}
	t.Logf("group backup %s: %v-consistent, freeze %v ms, VMs paused together %v ms; the workload wrote %d records meanwhile", sum["short_id"], sum["consistency"], sum["freeze_ms"], sum["pause_ms"], wrote)
	dir := t.TempDir()
	if res := vmshadow(t, r.env, "restore", "--repo", r.repo, "--group", id, "--to", dir+"/"); res.code != 0 {
		t.Fatalf("restore --group %s: exit %d: %s", id, res.code, res.errorMessage())
	}
	var images []string
	for _, m := range r.members {
		logs := findLogs(t, filepath.Join(dir, m.name))
		if len(logs) != 1 {
			t.Fatalf("restore --group: %d disks of %d bytes in %s (%v), want the one log disk", len(logs), groupLogSize, filepath.Join(dir, m.name), logs)
		}
		images = append(images, logs[0])
	}
	return images
}

// TestGroupConsistency is issue 17's proof: two real test guests with
// qemu-ga and a QEMU VM without an OS, a workload writing n to each in
// turn while they are backed up. Backed up one after another (each VM its
// own set, the way per-VM backup jobs run), every restored trio breaks the
// cross-VM invariant: this is the control that proves the check can fail.
// Backed up one after another while all three are paused, the restored
// trios hold it: the control that proves the check passes one instant.
// Backed up as a group (one set across the three VMs), every restored group
// holds it, over repeated rounds.
func TestGroupConsistency(t *testing.T) {
	start := time.Now()
	r := startGroup(t)
	t.Logf("rig up in %v", time.Since(start).Round(time.Millisecond))

	t.Run("a frozen guest: the workload writes on, its agent refuses", func(t *testing.T) {
		a := r.members[0]
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		agent := func(do func(c *qga.Client) error) {
			t.Helper()
			c, err := qga.Dial(ctx, a.qga)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := do(c); err != nil {
				t.Fatal(err)
			}
		}
		agent(func(c *qga.Client) error { _, err := c.Freeze(ctx, nil); return err })
		thawed := false
		thaw := func() {
			if !thawed {
				thawed = true
				agent(func(c *qga.Client) error { _, err := c.Thaw(ctx); return err })
			}
		}
		defer thaw()
		// The log disk has no file system and the workload its own
		// agent: the freeze does not stop it (only a pause does), so a
		// group's cut is made by its pause.
		at := r.work.Written()[0]
		if err := r.work.WaitFor(ctx, 0, at+2); err != nil {
			t.Fatalf("the workload stopped while %s's file systems were frozen: %v", a.name, err)
		}
		// Through the guest's own agent, frozen, the same write is refused
		// as busy. (Record 1 again: the same bytes as the workload's.)
		probe := &grouptest.GuestAgent{VMName: a.name, Socket: a.qga, Device: "/dev/vdb"}
		if err := probe.Write(ctx, 1, 1); !errors.Is(err, grouptest.ErrBusy) || !strings.Contains(err.Error(), "frozen") {
			t.Fatalf("write through the frozen guest's agent: %v, want busy (frozen)", err)
		}
		thaw()
		if err := probe.Write(ctx, 1, 1); err != nil {
			t.Fatalf("write through the thawed guest's agent: %v", err)
		}
		t.Logf("%s frozen: the workload wrote %d to %d, the agent refused", a.name, at, r.work.Written()[0])
	})

	t.Run("per-VM backups break it", func(t *testing.T) {
		for round := 1; round <= 2; round++ {
			t0 := time.Now()
			res, err := r.check(r.takeSequential(t))
			var ie *grouptest.InvariantError
			if !errors.As(err, &ie) {
				t.Fatalf("round %d: per-VM backups in sequence: %v (%s), want the invariant broken", round, err, res)
			}
			if res.Max[0] == 0 {
				t.Fatalf("round %d: %s's restored log is empty", round, r.members[0].name)
			}
			t.Logf("round %d (%v): broken as it must be: %v", round, time.Since(t0).Round(time.Millisecond), err)
		}
	})

	t.Run("VMs paused together hold it", func(t *testing.T) {
		r.groupRounds(t, 2, takePaused)
	})

	t.Run("group backups hold it", func(t *testing.T) {
		r.groupRounds(t, 3, takeGroup)
	})

	if err := r.work.Err(); err != nil {
		t.Fatalf("workload: %v", err)
	}
	t.Logf("workload at %v, busy retries %v, in %v", r.work.Written(), r.work.Busy(), time.Since(start).Round(time.Millisecond))
}
