package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/qga/qgatest"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

const qmpGreeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": ""}, "capabilities": []}}`

// qmpUntil greets and answers every command with an empty return until
// the command stall, from which on it answers nothing (stall "" : never
// answers; with garbage it answers every command with it instead).
func qmpUntil(stall, garbage string) func(net.Conn) {
	return func(conn net.Conn) {
		conn.Write([]byte(qmpGreeting + "\n"))
		br := bufio.NewReader(conn)
		stalled := stall == "" && garbage == ""
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			var req struct {
				Execute string
				ID      json.RawMessage
			}
			json.Unmarshal(line, &req)
			stalled = stalled || req.Execute == stall
			switch {
			case garbage != "":
				conn.Write([]byte(garbage + "\n"))
			case !stalled:
				conn.Write([]byte(`{"return": {}, "id": ` + string(req.ID) + "}\n"))
			}
		}
	}
}

// TestPeerStallsEndWithinBounds is the rule "every peer wait has a deadline"
// end to end: vmshadow against QMP monitors that accept and stall, greet and
// stall, stall on a command or answer garbage; a guest agent that accepts
// and stalls; and QEMU's NBD server at its connection limit. Each run ends
// within its bound with exit code 10 (the peer failed) or 5 (a writer's
// time limit), and an error naming the peer and what to do.
func TestPeerStallsEndWithinBounds(t *testing.T) {
	state, env := stateEnv(t)
	env = append(env, "VMSHADOW_PASSWORD=pw")
	repo := filepath.Join(state, "repo")
	if r := vmshadow(t, env, "repo", "init", "--repo", repo, "--encryption", "none"); r.code != 0 {
		t.Fatalf("repo init: %s", r.errorMessage())
	}
	acceptStall := testutil.ServeUnix(t, func(net.Conn) {})
	greetStall := testutil.ServeUnix(t, qmpUntil("qmp_capabilities", ""))
	commandStall := testutil.ServeUnix(t, qmpUntil("query-name", ""))
	garbage := testutil.ServeUnix(t, qmpUntil("", "\x00\x01 not JSON"))
	agentStall := testutil.ServeUnix(t, func(conn net.Conn) { conn.Read(make([]byte, 4096)) })
	hangFreeze := qgatest.Start(t, qgatest.HangFreeze, "")
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 16 << 20}, {ID: "vdb", Size: 16 << 20}}})
	vm.Write("vda", 7, 0, 8<<20)
	before := vm.Graph()

	tests := []struct {
		name  string
		args  []string
		code  int
		want  []string // in the error message, case-insensitive
		bound time.Duration
		vm    bool     // the real VM must be left as it was
		after []string // a command that must then succeed
	}{
		{"backup: QMP greets and stalls", []string{"backup", "--repo", repo, "--qmp", greetStall, "--peer-timeout", "2s"},
			10, []string{greetStall, "did not answer qmp_capabilities", "--peer-timeout"}, 20 * time.Second, false, nil},
		{"snapshot list: QMP stalls on a command", []string{"snapshot", "list", "--qmp", commandStall, "--peer-timeout", "2s"},
			10, []string{commandStall, "did not answer query-name"}, 20 * time.Second, false, nil},
		{"snapshot create: QMP accepts and stalls", []string{"snapshot", "create", "--qmp", acceptStall},
			10, []string{acceptStall, "no qmp greeting"}, 20 * time.Second, false, nil},
		{"recover: QMP greets and stalls", []string{"recover", "--qmp", greetStall, "--peer-timeout", "2s"},
			10, []string{greetStall, "did not answer"}, 20 * time.Second, false, nil},
		{"backup: QMP answers garbage", []string{"backup", "--repo", repo, "--qmp", garbage},
			10, []string{garbage, "bad message"}, 20 * time.Second, false, nil},
		{"snapshot create: agent stalls, filesystem required", []string{"snapshot", "create", "--qmp", vm.QMPPath, "--qga", agentStall, "--writer-timeout", "2s", "--require", "filesystem"},
			4, []string{agentStall, "guest-agent", "did not answer"}, 30 * time.Second, true, nil},
		{"snapshot create: agent stalls in the freeze, filesystem required", []string{"snapshot", "create", "--qmp", vm.QMPPath, "--qga", hangFreeze.Path, "--writer-timeout", "2s", "--require", "filesystem"},
			5, []string{"guest-agent", "guest-fsfreeze-freeze"}, 30 * time.Second, true,
			[]string{"recover", "--qmp", vm.QMPPath, "--qga", hangFreeze.Path}},
		// QEMU serves 100 NBD connections at a time (max-connections'
		// default since the fix of CVE-2024-7409, in Debian's 7.2 too); the
		// 101st (two disks, 51 each: --nbd-connections is at most 64) is
		// left in the listen queue, unanswered.
		{"backup: NBD server at its connection limit", []string{"backup", "--repo", repo, "--qmp", vm.QMPPath, "--nbd-connections", "51", "--peer-timeout", "3s"},
			10, []string{"opening connection 50 of 51", "at its connection limit"}, 60 * time.Second, true, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			r := vmshadowWithin(t, env, 3*tt.bound, tt.args...)
			took := time.Since(start)
			msg := strings.ToLower(r.errorMessage())
			if r.code != tt.code {
				t.Fatalf("exit %d, want %d: %s", r.code, tt.code, r.errorMessage())
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, strings.ToLower(w)) {
					t.Errorf("error %q does not say %q", r.errorMessage(), w)
				}
			}
			if took > tt.bound {
				t.Errorf("took %s, want at most %s", took, tt.bound)
			}
			if tt.vm {
				vm.SameGraph(before)
			}
			if tt.after != nil {
				if r := vmshadow(t, env, tt.after...); r.code != 0 {
					t.Fatalf("%v: exit %d: %s", tt.after, r.code, r.errorMessage())
				}
			}
		})
	}
	if r := vmshadow(t, env, "verify", "--repo", repo); r.code != 0 {
		t.Fatalf("verify: %s", r.errorMessage())
	}
	for _, v := range []string{"0s", "500ms", "2h"} {
		if r := vmshadow(t, env, "snapshot", "list", "--qmp", vm.QMPPath, "--peer-timeout", v); r.code != 2 || !strings.Contains(r.errorMessage(), "--peer-timeout") {
			t.Errorf("--peer-timeout %s: exit %d %q, want 2 naming the flag", v, r.code, r.errorMessage())
		}
	}
}

// vmshadowWithin is vmshadow, killing the process if it runs longer than
// limit (so that a test of a hang fails instead of hanging).
func vmshadowWithin(t *testing.T, env []string, limit time.Duration, args ...string) result {
	t.Helper()
	done := make(chan result, 1)
	cmd, wait := startVmshadow(t, env, args...)
	go func() { done <- wait() }()
	select {
	case r := <-done:
		return r
	case <-time.After(limit):
		cmd.Process.Kill()
		<-done
		t.Fatalf("vmshadow %v still running after %s", args, limit)
		return result{}
	}
}

// waitFor waits until cond holds, or fails the test.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestSignalWhileBlockedOnPeer: SIGINT or SIGTERM ends vmshadow promptly
// with exit code 130 whatever peer it is blocked on (a stalled QMP monitor,
// a guest agent hanging in the freeze, QEMU's NBD server not answering a
// handshake), and it cleans up: the real VM is left as it was (no vmshadow
// nodes, exports or jobs), and (after 'recover' thaws a hung agent) the
// next backup works.
func TestSignalWhileBlockedOnPeer(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		t.Run(fmt.Sprintf("%v/stalled QMP", sig), func(t *testing.T) {
			_, env := stateEnv(t)
			peer := testutil.ServeUnix(t, qmpUntil("query-name", ""))
			cmd, wait := startVmshadow(t, env, "snapshot", "list", "--qmp", peer)
			time.Sleep(2 * time.Second) // blocked in query-name (the limit is 60s)
			cmd.Process.Signal(sig)
			signalled := time.Now()
			r := wait()
			if r.code != 130 || !strings.Contains(r.errorMessage(), "interrupted") {
				t.Fatalf("exit %d, want 130 (interrupted): %s", r.code, r.errorMessage())
			}
			if d := time.Since(signalled); d > 5*time.Second {
				t.Errorf("ended %s after the signal", d)
			}
		})
		t.Run(fmt.Sprintf("%v/agent hangs in the freeze", sig), func(t *testing.T) {
			vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 16 << 20}}})
			rig := newLiveRig(t, vm, false)
			vm.Write("vda", 3, 0, 8<<20)
			rig.backup()
			before := vm.Graph()
			ag := qgatest.Start(t, qgatest.HangFreeze, "")
			cmd, wait := startVmshadow(t, rig.env, "backup", "--repo", rig.repo, "--qmp", vm.QMPPath, "--qga", ag.Path, "--writer-timeout", "5m", "--freeze-timeout", "5m")
			waitFor(t, "the freeze", ag.Frozen)
			time.Sleep(500 * time.Millisecond)
			cmd.Process.Signal(sig)
			signalled := time.Now()
			r := wait()
			took := time.Since(signalled)
			if r.code != 130 {
				t.Fatalf("exit %d, want 130: %s", r.code, r.errorMessage())
			}
			t.Logf("ended %s after the signal", took)
			if took > 30*time.Second {
				t.Errorf("ended %s after the signal", took)
			}
			// The hung connection is dropped and the guest thawed
			// through a new one before vmshadow exits.
			if ag.Frozen() {
				t.Errorf("guest left frozen after the interrupted backup (%s)", r.errorMessage())
			}
			vm.SameGraph(before)
			if res := rig.run("recover", "--qmp", vm.QMPPath, "--qga", ag.Path); res.code != 0 {
				t.Fatalf("recover: %s", res.errorMessage())
			}
			if ag.Frozen() {
				t.Fatal("recover did not thaw the agent")
			}
			vm.SameGraph(before)
			want := rig.expected()
			sum := rig.backup()
			rig.restoreCompare(sum["backup_id"].(string), want)
		})
		t.Run(fmt.Sprintf("%v/NBD server at its connection limit", sig), func(t *testing.T) {
			vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 16 << 20}, {ID: "vdb", Size: 16 << 20}}})
			rig := newLiveRig(t, vm, false)
			vm.Write("vda", 5, 0, 8<<20)
			before := vm.Graph()
			// The 101st connection (two disks, 51 each) waits for a
			// handshake QEMU never starts (the limit is --peer-timeout, 60s
			// by default).
			cmd, wait := startVmshadow(t, rig.env, "backup", "--repo", rig.repo, "--qmp", vm.QMPPath, "--nbd-connections", "51")
			fds := fmt.Sprintf("/proc/%d/fd", cmd.Process.Pid)
			waitFor(t, "100 NBD connections", func() bool { e, _ := os.ReadDir(fds); return len(e) > 100 })
			time.Sleep(time.Second)
			cmd.Process.Signal(sig)
			signalled := time.Now()
			r := wait()
			took := time.Since(signalled)
			t.Logf("ended %s after the signal", took)
			if r.code != 130 || !strings.Contains(r.errorMessage(), "interrupted") {
				t.Fatalf("exit %d, want 130 (interrupted): %s", r.code, r.errorMessage())
			}
			if took > 15*time.Second {
				t.Errorf("ended %s after the signal", took)
			}
			vm.SameGraph(before)
			want := rig.expected()
			sum := rig.backup()
			rig.restoreCompare(sum["backup_id"].(string), want)
		})
	}
}

// TestSIGTERMDuringLiveBackupRead: SIGTERM while a live backup reads its
// shadow copies over NBD: vmshadow exits 130, releases the set (no vmshadow
// nodes, exports or jobs left, change tracking merged back), the repository
// stays valid, and the next backup is an incremental that restores right.
func TestSIGTERMDuringLiveBackupRead(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 32 << 20}}})
	r := newLiveRig(t, vm, false)
	vm.Write("vda", 1, 0, 32<<20)
	r.backup()
	before := vm.Graph()
	touched := map[int64]bool{}
	r.scatter("vda", 3, touched)
	pause := filepath.Join(t.TempDir(), "pause")
	cmd, wait := startVmshadow(t, append(r.env, "VMSHADOW_PAUSE_AT=backup-read", "VMSHADOW_PAUSE_FILE="+pause), "backup", "--repo", r.repo, "--qmp", vm.QMPPath)
	waitFor(t, "the read phase", func() bool { _, err := os.Stat(pause); return err == nil })
	cmd.Process.Signal(syscall.SIGTERM)
	signalled := time.Now()
	time.Sleep(200 * time.Millisecond)
	os.Remove(pause) // the read goes on, its context cancelled
	res := wait()
	if res.code != 130 {
		t.Fatalf("exit %d, want 130: %s", res.code, res.errorMessage())
	}
	if d := time.Since(signalled); d > 30*time.Second {
		t.Errorf("ended %s after the signal", d)
	}
	vm.SameGraph(before)
	if v := r.run("verify", "--repo", r.repo); v.code != 0 {
		t.Fatalf("verify: %s", v.errorMessage())
	}
	want := r.expected()
	res = r.run("backup", "--repo", r.repo, "--qmp", vm.QMPPath)
	if res.code != 0 {
		t.Fatalf("next backup: %s", res.errorMessage())
	}
	if w := res.warnings(); len(w) > 0 {
		t.Errorf("next backup warned %q: the interrupted one left something behind", w)
	}
	sum := res.summary(t)
	if d := diskSummaries(t, sum)["vda"]; d["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched))*testChunk {
		t.Errorf("next backup: %v, want incremental reading %d chunks", d, len(touched))
	}
	r.restoreCompare(sum["backup_id"].(string), want)
}

// TestNBDReadStallsEndWithinBound: QEMU's NBD server that stops sending
// while a backup's read waits (the disk behind a throttle filter letting
// 4 KiB/s through, so a 4 MiB read takes 1000 s) fails the backup within
// --peer-timeout with exit code 10. QEMU holds the export until the read
// ends, so the release gives up within its own limit (60s) and the error
// says to run 'vmshadow recover'; the repository is untouched.
func TestNBDReadStallsEndWithinBound(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "vda.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "16M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v %s", err, out)
	}
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 9 0 16M", img).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v %s", err, out)
	}
	vm := qemutest.Start(t, qemutest.Options{Running: true, Extra: []string{
		"-object", "throttle-group,id=tg0,x-bps-read=4096",
		"-blockdev", "driver=file,filename=" + img + ",node-name=file-vda",
		"-blockdev", "driver=qcow2,file=file-vda,node-name=fmt-vda",
		"-blockdev", "driver=throttle,throttle-group=tg0,file=fmt-vda,node-name=thr-vda",
		"-device", "virtio-blk-pci,drive=thr-vda,id=vda,share-rw=on",
	}})
	r := newLiveRig(t, vm, false)
	start := time.Now()
	res := vmshadowWithin(t, r.env, 3*time.Minute, "backup", "--repo", r.repo, "--qmp", vm.QMPPath, "--peer-timeout", "3s", "--nbd-connections", "1")
	took := time.Since(start)
	t.Logf("failed after %s: %s", took, res.errorMessage())
	if res.code != 10 || !strings.Contains(res.errorMessage(), "sent nothing for 3s") {
		t.Fatalf("exit %d %q, want 10 naming the silent NBD server", res.code, res.errorMessage())
	}
	// QEMU cannot drop the export while the throttled read is in flight:
	// the release gives up after its own limit (60s) and says to recover.
	if took > 2*time.Minute {
		t.Errorf("took %s", took)
	}
	if !strings.Contains(res.errorMessage(), "vmshadow recover") {
		t.Errorf("error %q does not say to run recover", res.errorMessage())
	}
	if v := r.run("verify", "--repo", r.repo); v.code != 0 {
		t.Fatalf("verify: %s", v.errorMessage())
	}
}
