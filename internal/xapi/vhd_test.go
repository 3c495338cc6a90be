package xapi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// vhdHead builds the head of a dynamic VHD stream (footer, header at 512,
// BAT at 1536) for a disk of size bytes whose allocated blocks are given.
func vhdHead(size int64, block uint32, allocated map[int]bool, diskType uint32) []byte {
	entries := uint32((size + int64(block) - 1) / int64(block))
	b := make([]byte, 1536+4*int(entries))
	f := b[:512]
	copy(f, "conectix")
	binary.BigEndian.PutUint64(f[16:], 512)
	binary.BigEndian.PutUint64(f[40:], uint64(size))
	binary.BigEndian.PutUint64(f[48:], uint64(size))
	binary.BigEndian.PutUint32(f[60:], diskType)
	binary.BigEndian.PutUint32(f[64:], vhdChecksum(f, 64))
	h := b[512:1536]
	copy(h, "cxsparse")
	binary.BigEndian.PutUint64(h[8:], ^uint64(0))
	binary.BigEndian.PutUint64(h[16:], 1536)
	binary.BigEndian.PutUint32(h[28:], entries)
	binary.BigEndian.PutUint32(h[32:], block)
	binary.BigEndian.PutUint32(h[36:], vhdChecksum(h, 36))
	next := uint32(4)
	for i := range int(entries) {
		v := uint32(vhdUnused)
		if allocated[i] {
			v, next = next, next+block/512+1
		}
		binary.BigEndian.PutUint32(b[1536+4*i:], v)
	}
	return b
}

func vhdRuns(a *VHDAllocation) string {
	var out []string
	for r := range a.Runs() {
		out = append(out, fmt.Sprintf("%d+%d:%v", r.Off>>20, r.Len>>20, r.Changed))
	}
	return strings.Join(out, " ")
}

// TestParseVHDAllocationQEMU: the allocation read from a dynamic VHD made
// by a real tool (qemu-img's vpc driver, the VHD format vhd-tool streams
// for export_raw_vdi?format=vhd) is the blocks written, and only they.
func TestParseVHDAllocationQEMU(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	dir := t.TempDir()
	raw, vhd := filepath.Join(dir, "d.raw"), filepath.Join(dir, "d.vhd")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(15 << 20) // 7.5 blocks of 2 MiB
	f.WriteAt([]byte("x"), 0)
	f.WriteAt([]byte("hello"), 5<<21+100)
	f.WriteAt([]byte("end"), 15<<20-3)
	f.Close()
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", raw, vhd).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v %s", err, out)
	}
	data, err := os.ReadFile(vhd)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ParseVHDAllocation(bytes.NewReader(data), 15<<20)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := vhdRuns(a), "0+2:true 2+8:false 10+2:true 12+2:false 14+1:true"; got != want {
		t.Errorf("runs %s, want %s", got, want)
	}
	if a.Allocated() != 5<<20 || a.BlockSize != 2<<20 {
		t.Errorf("allocated %d bytes in blocks of %d", a.Allocated(), a.BlockSize)
	}
	// The same from the hand-built head, which the fuzz seeds use.
	h, err := ParseVHDAllocation(bytes.NewReader(vhdHead(15<<20, 2<<20, map[int]bool{0: true, 5: true, 7: true}, vhdDynamic)), 15<<20)
	if err != nil || vhdRuns(h) != vhdRuns(a) {
		t.Errorf("hand-built head: %v %v, want %s", h, err, vhdRuns(a))
	}
}

func TestParseVHDAllocationBad(t *testing.T) {
	good := vhdHead(8<<20, 2<<20, map[int]bool{1: true}, vhdDynamic)
	flip := func(at int) []byte {
		b := bytes.Clone(good)
		b[at] ^= 1
		return b
	}
	tests := []struct {
		name string
		b    []byte
		size int64
		want string
	}{
		{"other size", good, 4 << 20, "the VDI has"},
		{"differencing", vhdHead(8<<20, 2<<20, nil, 4), 8 << 20, "dynamic"},
		{"footer checksum", flip(41), 8 << 20, "footer checksum"},
		{"header checksum", flip(512 + 29), 8 << 20, "header checksum"},
		{"truncated BAT", good[:1540], 8 << 20, "block allocation table"},
		{"not a VHD", bytes.Repeat([]byte{0}, 4096), 8 << 20, "cookie"},
		{"empty", nil, 8 << 20, "footer"},
	}
	for _, tt := range tests {
		_, err := ParseVHDAllocation(bytes.NewReader(tt.b), tt.size)
		if !errors.Is(err, errs.ErrCorrupt) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want %q", tt.name, err, tt.want)
		}
	}
	if a, err := ParseVHDAllocation(bytes.NewReader(good), 8<<20); err != nil || vhdRuns(a) != "0+2:false 2+2:true 4+4:false" {
		t.Errorf("good: %v %v", a, err)
	}
}

// FuzzParseVHDAllocation: bytes from the network never panic the parser,
// and what it accepts covers exactly the disk.
func FuzzParseVHDAllocation(f *testing.F) {
	f.Add(vhdHead(8<<20, 2<<20, map[int]bool{1: true}, vhdDynamic), int64(8<<20))
	f.Add(vhdHead(15<<20, 2<<20, map[int]bool{0: true, 7: true}, vhdDynamic), int64(15<<20))
	f.Add(vhdHead(4096, 512, map[int]bool{3: true}, vhdDynamic), int64(4096))
	f.Add(vhdHead(0, 2<<20, nil, vhdDynamic), int64(0))
	f.Fuzz(func(t *testing.T, b []byte, size int64) {
		a, err := ParseVHDAllocation(bytes.NewReader(b), size)
		if err != nil {
			if !errors.Is(err, errs.ErrCorrupt) {
				t.Fatalf("error not ErrCorrupt: %v", err)
			}
			return
		}
		var pos int64
		for r := range a.Runs() {
			if r.Off != pos || r.Len <= 0 {
				t.Fatalf("run %+v at %d", r, pos)
			}
			pos += r.Len
		}
		if pos != a.Size || (size >= 0 && a.Size != size) {
			t.Fatalf("runs cover %d of %d bytes (asked %d)", pos, a.Size, size)
		}
	})
}
