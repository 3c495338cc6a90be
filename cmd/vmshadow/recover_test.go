package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/qga/qgatest"
)

// TestRecoverAfterKill kills vmshadow (SIGKILL) at every phase of a snapshot
// set, of a running VM and of a paused one, and checks that recover leaves
// the VM exactly as it was (running or paused, thawed, everything the set
// took given back, no journal) and reports only what it removed.
func TestRecoverAfterKill(t *testing.T) {
	t.Run("running", func(t *testing.T) { testRecoverAfterKill(t, true) })
	t.Run("paused", func(t *testing.T) { testRecoverAfterKill(t, false) })
}

// checkRemoved fails t when recover's report names an fdset QEMU still has
// or a file that still exists.
func checkRemoved(t *testing.T, vm *qemutest.VM, sum map[string]any) {
	t.Helper()
	var fdsets []struct {
		ID int `json:"fdset-id"`
	}
	vm.Exec("query-fdsets", nil, &fdsets)
	removed, _ := sum["removed"].([]any)
	for _, r := range removed {
		what := fmt.Sprint(r)
		for _, f := range fdsets {
			if what == fmt.Sprintf("fdset %d", f.ID) {
				t.Errorf("recover reports %q removed, but QEMU still has it", what)
			}
		}
		if strings.HasPrefix(what, "/") {
			if _, err := os.Stat(what); err == nil {
				t.Errorf("recover reports %q removed, but it exists", what)
			}
		}
	}
}

func testRecoverAfterKill(t *testing.T, running bool) {
	vm := qemutest.Start(t, qemutest.Options{Running: running, Disks: []qemutest.Disk{{ID: "vda"}, {ID: "vdb", Format: "raw", Legacy: true}}})
	if !running {
		vm.Pause()
	}
	points := []struct {
		point  string
		frozen bool // the writers' freeze was attempted before the kill
	}{
		{"prepared", false}, {"qemu-filter-added", false}, {"frozen", true}, {"qemu-paused", true},
		{"qemu-inserted", true}, {"committed", true}, {"thawed", true}, {"qemu-server", true}, {"qemu-exported", true},
	}
	for _, p := range points {
		if !running && p.point == "qemu-paused" {
			continue // vmshadow does not pause a paused VM
		}
		t.Run(p.point, func(t *testing.T) {
			state, env := stateEnv(t)
			before := vm.Baseline(scratchOf(t, env))
			log := filepath.Join(t.TempDir(), "writers.log")
			ag := qgatest.Start(t, qgatest.OK, log)
			hook := hookScript(t, "db", log, "ok")
			r := vmshadow(t, append(env, "VMSHADOW_CRASH_AT="+p.point), "snapshot", "create", "--qmp", vm.QMPPath, "--qga", ag.Path, "--hook", hook)
			if r.code != 137 {
				t.Fatalf("vmshadow was not killed at %s: exit %d %s", p.point, r.code, r.errorMessage())
			}
			// The guest rewrites 24 MiB while the set is left behind.
			vm.Write("vda", byte(len(p.point)), 0, 24<<20)
			r = vmshadow(t, env, "recover", "--qmp", vm.QMPPath)
			if r.code != 0 {
				t.Fatalf("recover: exit %d: %s", r.code, r.errorMessage())
			}
			checkRemoved(t, vm, r.summary(t))
			vm.AssertAsBefore(t, before)
			if ag.Frozen() {
				t.Error("guest file systems left frozen")
			}
			calls := readLog(t, log)
			if p.frozen {
				if len(calls) == 0 || calls[len(calls)-1] != "hook db thaw" {
					t.Errorf("hook not thawed last: %q", calls)
				}
			} else if len(calls) != 0 {
				t.Errorf("writers called before freeze: %q", calls)
			}
			if left, _ := filepath.Glob(filepath.Join(state, "scratch", "vmshadow-*")); len(left) > 0 {
				t.Errorf("scratch files left: %v", left)
			}
			if left, _ := filepath.Glob(filepath.Join(state, "journal", "*.json")); len(left) > 0 {
				t.Errorf("journal left: %v", left)
			}
			// The next set works.
			r = vmshadow(t, env, "snapshot", "create", "--qmp", vm.QMPPath)
			if r.code != 0 {
				t.Fatalf("create after recover: %s", r.errorMessage())
			}
			if d := vmshadow(t, env, "snapshot", "delete", "--qmp", vm.QMPPath, fmt.Sprint(r.summary(t)["set_id"])); d.code != 0 {
				t.Fatal(d.errorMessage())
			}
			vm.AssertAsBefore(t, before)
		})
	}
	t.Run("clean VM", func(t *testing.T) {
		_, env := stateEnv(t)
		before := vm.Baseline(scratchOf(t, env))
		r := vmshadow(t, env, "recover", "--qmp", vm.QMPPath)
		sum := r.summary(t)
		if r.code != 0 || len(sum["removed"].([]any)) != 0 || len(sum["thawed"].([]any)) != 0 {
			t.Fatalf("recover on a clean VM did something: %v", sum)
		}
		vm.AssertAsBefore(t, before)
	})
	t.Run("journal lost", func(t *testing.T) {
		// A set taken with another state directory: recover finds its
		// objects by name and removes them.
		_, env1 := stateEnv(t)
		_, env2 := stateEnv(t)
		before := vm.Baseline(scratchOf(t, env1))
		if r := vmshadow(t, env1, "snapshot", "create", "--qmp", vm.QMPPath); r.code != 0 {
			t.Fatal(r.errorMessage())
		}
		if r := vmshadow(t, env2, "snapshot", "create", "--qmp", vm.QMPPath); r.code != 3 {
			t.Fatalf("create over another directory's set: exit %d, want 3", r.code)
		}
		vm.Write("vda", 0x44, 0, 24<<20)
		r := vmshadow(t, env2, "recover", "--qmp", vm.QMPPath)
		if r.code != 0 || len(r.summary(t)["removed"].([]any)) == 0 {
			t.Fatalf("recover: exit %d %s %v", r.code, r.errorMessage(), r.msgs)
		}
		checkRemoved(t, vm, r.summary(t))
		vm.AssertAsBefore(t, before)
	})
}

// TestDiffAreaFull: a diff area that fills breaks the shadow copy (reads
// fail with an error) while the guest keeps writing; delete cleans up.
func TestDiffAreaFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs as the diff area")
	}
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 512 << 20}}})
	_, env := stateEnv(t)
	scratch, err := os.MkdirTemp("", "vsfull")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(scratch)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", scratch).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	defer syscall.Unmount(scratch, syscall.MNT_DETACH)
	vm.Write("vda", 0x31, 0, 160<<20)
	before := vm.Baseline(scratch)

	r := vmshadow(t, env, "snapshot", "create", "--qmp", vm.QMPPath, "--scratch-dir", scratch)
	if r.code != 0 {
		t.Fatalf("create: %s", r.errorMessage())
	}
	if w := strings.Join(r.warnings(), "\n"); !strings.Contains(w, "free") {
		t.Errorf("no warning about the small diff area: %q", w)
	}
	uri := shadows(t, r.summary(t))["vda"]["nbd"].(string)
	// Before it fills, the shadow copy reads fine.
	if out, err := exec.Command("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x31 0 1M", uri).CombinedOutput(); err != nil || strings.Contains(string(out), "fail") {
		t.Fatalf("read before fill: %v %s", err, out)
	}
	// The guest overwrites 160 MiB: more than the 96 MiB diff area holds.
	if err := vm.GuestIO("vda", "write -P 0x32 0 160M"); err != nil {
		t.Fatalf("guest write failed (the guest must go on when the diff area fills): %v", err)
	}
	out, err := exec.Command("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x31 0 1M", uri).CombinedOutput()
	if err == nil && !strings.Contains(string(out), "fail") && !strings.Contains(string(out), "error") {
		t.Fatalf("read of a broken shadow copy succeeded: %s", out)
	}
	if strings.Contains(string(out), "0x32") {
		t.Fatalf("broken shadow copy returned newer data: %s", out)
	}
	sum := r.summary(t)
	if d := vmshadow(t, env, "snapshot", "delete", "--qmp", vm.QMPPath, fmt.Sprint(sum["set_id"])); d.code != 0 {
		t.Fatal(d.errorMessage())
	}
	vm.AssertAsBefore(t, before)
	live, _ := os.ReadFile(vm.Snapshot("vda"))
	if live[100<<20] != 0x32 {
		t.Fatal("guest write lost")
	}
}
