package qemutest

import (
	"bytes"
	"os"
	"testing"
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
