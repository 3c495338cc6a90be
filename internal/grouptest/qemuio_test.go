package grouptest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qemutest"
)

// osless starts a running QEMU VM without an OS whose disk "log" is written
// by a QEMUIO target over a QMP monitor of its own.
func osless(t *testing.T, name string) (*qemutest.VM, *QEMUIO) {
	t.Helper()
	dir, err := os.MkdirTemp("", "vsgt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "work.sock")
	vm := qemutest.Start(t, qemutest.Options{
		Name: name, Running: true,
		Disks: []qemutest.Disk{{ID: "log", Size: 1 << 20}},
		Extra: []string{"-qmp", "unix:" + sock + ",server=on,wait=off"},
	})
	q := &QEMUIO{VMName: name, QMPSocket: sock, Device: qemutest.QOMPath("log"), Stdout: vm.StdoutPath, Dir: dir}
	t.Cleanup(func() { q.Close() })
	return vm, q
}

// TestQEMUIOWorkload proves the harness on real QEMU without guests (the
// guests' agent path is proved by cmd/vmshadow's TestGroupConsistency): the
// workload writes through qemu-io into three running VMs; copies of their
// disks taken with every VM paused hold the invariant, copies taken one
// after another while the workload runs break it; a paused VM is busy and
// the workload waits for it.
func TestQEMUIOWorkload(t *testing.T) {
	var vms []*qemutest.VM
	var targets []Target
	for _, name := range []string{"a", "b", "c"} {
		vm, q := osless(t, name)
		vms = append(vms, vm)
		targets = append(targets, q)
	}
	w := Start(targets, Options{Slots: 2048, Retry: 20 * time.Millisecond})
	defer w.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	members := func(paths []string) []Member {
		var ms []Member
		for i, p := range paths {
			ms = append(ms, Member{Name: vms[i].Name, Image: p})
		}
		return ms
	}

	// One instant: all paused, then copied, then resumed.
	for round := 0; round < 2; round++ {
		if err := w.WaitFor(ctx, 2, w.Written()[2]+3); err != nil {
			t.Fatal(err)
		}
		for _, vm := range vms {
			vm.Exec("stop", nil, nil)
		}
		var paths []string
		for _, vm := range vms {
			paths = append(paths, vm.Snapshot("log"))
		}
		for _, vm := range vms {
			vm.Exec("cont", nil, nil)
		}
		res, err := Check(members(paths))
		if err != nil {
			t.Fatalf("round %d, all paused together: %v", round, err)
		}
		if res.Max[0] == 0 {
			t.Fatalf("round %d: empty logs %v", round, res)
		}
		t.Logf("round %d, paused together: %s", round, res)
	}
	if b := w.Busy(); b[0]+b[1]+b[2] == 0 {
		t.Errorf("no write found a VM paused (busy %v): the pauses went unnoticed", b)
	}

	// One after another: each copied once the next VM has a record the
	// copied ones cannot have.
	var paths []string
	for i, vm := range vms {
		if i > 0 {
			if err := w.WaitFor(ctx, i, w.Written()[i-1]+1); err != nil {
				t.Fatal(err)
			}
		}
		paths = append(paths, vm.Snapshot("log"))
	}
	res, err := Check(members(paths))
	var ie *InvariantError
	if !errors.As(err, &ie) || ie.Earlier != 0 || ie.Later != 1 {
		t.Fatalf("copies one after another: %v (%s), want the invariant broken between a and b", err, res)
	}
	t.Logf("one after another: %v", err)
	if err := w.Stop(); err != nil {
		t.Fatal(err)
	}
}
