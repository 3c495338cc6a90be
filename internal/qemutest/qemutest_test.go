package qemutest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestStartWriteSnapshot proves the helper itself: a VM with a qcow2 and a
// legacy raw disk starts, a write through the device lands in the image, and
// the graph is stable between two reads.
func TestStartWriteSnapshot(t *testing.T) {
	vm := Start(t, Options{Disks: []Disk{{ID: "vda"}, {ID: "vdb", Legacy: true, Size: 32 << 20}}})
	g := vm.Graph()
	if len(g.Devices) != 2 {
		t.Fatalf("devices = %v", g.Devices)
	}
	vm.Write("vdb", 0x5a, 4096, 8192)
	img, err := os.ReadFile(vm.Snapshot("vdb"))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(img)) != 32<<20 {
		t.Fatalf("snapshot size %d", len(img))
	}
	if !bytes.Equal(img[4096:4096+8192], bytes.Repeat([]byte{0x5a}, 8192)) || img[4095] != 0 || img[4096+8192] != 0 {
		t.Fatal("write through the device did not land where expected")
	}
	if err := vm.GuestIO("vda", "write -P 1 128M 4k"); err == nil {
		t.Fatal("write beyond the end of the disk reported no error")
	}
	vm.SameGraph(g)
}

// recorder is a testing.TB whose Fatalf records the failure and ends the
// goroutine, so a test can check that a check fails.
type recorder struct {
	testing.TB
	failed string
}

func (r *recorder) Helper() {}

func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// failure runs check with a recorder and returns its failure message.
func failure(t *testing.T, check func(testing.TB)) string {
	r := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		check(r)
	}()
	<-done
	return r.failed
}

// TestAssertAsBefore proves the shared check: it passes on an untouched VM
// and names each thing a set could keep: an fdset, QEMU's descriptor on a
// deleted scratch file (QEMU keeps it while the VM is paused even after
// remove-fd), the scratch dir's space, a node, a bitmap not of a chain.
func TestAssertAsBefore(t *testing.T) {
	vm := Start(t, Options{Disks: []Disk{{ID: "vda"}}})
	vm.Pause()
	scratch := filepath.Join(t.TempDir(), "scratch")
	b := vm.Baseline(scratch)
	vm.AssertAsBefore(t, b)

	os.Mkdir(scratch, 0o700)
	f, err := os.Create(filepath.Join(scratch, "vmshadow-x-0.cow"))
	if err != nil {
		t.Fatal(err)
	}
	f.Write(bytes.Repeat([]byte{1}, 1<<20))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var fdset struct {
		ID int `json:"fdset-id"`
	}
	if err := vm.QMP().ExecuteWithFile(ctx, "add-fd", map[string]any{"opaque": "vmshadow-x-0-tgt"}, &fdset, f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	msg := failure(t, func(tb testing.TB) { vm.AssertAsBefore(tb, b) })
	for _, want := range []string{"fdsets", "vmshadow-x-0-tgt", "QEMU's open descriptors", "scratch dir", "1048576 bytes allocated"} {
		if !strings.Contains(msg, want) {
			t.Errorf("check with an fdset and a scratch file left: %q does not mention %q", msg, want)
		}
	}
	// Paused, QEMU keeps a removed fdset's descriptor: the file is deleted
	// and its space taken until the VM runs.
	os.Remove(filepath.Join(scratch, "vmshadow-x-0.cow"))
	vm.Exec("remove-fd", map[string]any{"fdset-id": fdset.ID}, nil)
	msg = failure(t, func(tb testing.TB) { vm.AssertAsBefore(tb, b) })
	if !strings.Contains(msg, "vmshadow-x-0.cow (deleted)") || !strings.Contains(msg, "fdsets") {
		t.Errorf("check with a descriptor on a deleted scratch file: %q", msg)
	}
	vm.Exec("cont", nil, nil)
	vm.Exec("remove-fd", map[string]any{"fdset-id": fdset.ID}, nil) // now it closes
	vm.Pause()
	vm.AssertAsBefore(t, b)

	vm.Exec("blockdev-add", map[string]any{"driver": "null-co", "node-name": "vmshadow-x-0-tgt"}, nil)
	vm.Exec("block-dirty-bitmap-add", map[string]any{"node": "fmt-vda", "name": "other-tool"}, nil)
	msg = failure(t, func(tb testing.TB) { vm.AssertAsBefore(tb, b.WithChains()) })
	if !strings.Contains(msg, "block nodes") || !strings.Contains(msg, "other-tool") {
		t.Errorf("check with a node and a bitmap left: %q", msg)
	}
	vm.Exec("blockdev-del", map[string]any{"node-name": "vmshadow-x-0-tgt"}, nil)
	vm.Exec("block-dirty-bitmap-remove", map[string]any{"node": "fmt-vda", "name": "other-tool"}, nil)

	// A chain may move on (one bitmap per node and repository), not grow.
	vm.Exec("block-dirty-bitmap-add", map[string]any{"node": "fmt-vda", "name": "vmshadow-repo1-aaaa"}, nil)
	vm.AssertAsBefore(t, b.WithChains())
	if msg := failure(t, func(tb testing.TB) { vm.AssertAsBefore(tb, b) }); !strings.Contains(msg, "dirty bitmaps") {
		t.Errorf("a new chain bitmap passed the strict check: %q", msg)
	}
	chained := vm.Baseline(scratch).WithChains()
	vm.Exec("block-dirty-bitmap-add", map[string]any{"node": "fmt-vda", "name": "vmshadow-repo1-bbbb"}, nil)
	if msg := failure(t, func(tb testing.TB) { vm.AssertAsBefore(tb, chained) }); !strings.Contains(msg, "2 bitmaps of one chain") {
		t.Errorf("two bitmaps of one chain: %q", msg)
	}
	vm.Exec("block-dirty-bitmap-remove", map[string]any{"node": "fmt-vda", "name": "vmshadow-repo1-aaaa"}, nil)
	vm.AssertAsBefore(t, chained)
	vm.Exec("block-dirty-bitmap-remove", map[string]any{"node": "fmt-vda", "name": "vmshadow-repo1-bbbb"}, nil)
	if msg := failure(t, func(tb testing.TB) { vm.AssertAsBefore(tb, chained) }); !strings.Contains(msg, "chain fmt-vda/vmshadow-repo1 is gone") {
		t.Errorf("a chain removed: %q", msg)
	}
}
