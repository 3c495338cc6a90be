package xapi

import (
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

const K64 = CBTBlockSize

func runs(c *ChangedBlocks) string {
	var parts []string
	for r := range c.Runs() {
		mark := "-"
		if r.Changed {
			mark = "C"
		}
		parts = append(parts, fmt.Sprintf("%s%d+%d", mark, r.Off/K64, r.Len))
	}
	return strings.Join(parts, " ")
}

// TestChangedBlocksBitOrder checks the decoding against bitmaps built by
// hand: the most significant bit of the first byte is the first 64 KiB.
func TestChangedBlocksBitOrder(t *testing.T) {
	tests := []struct {
		name string
		bits []byte
		size int64
		want string // runs: C/- first block + length in bytes
	}{
		{"first block only (MSB)", []byte{0x80}, 8 * K64, "C0+65536 -1+458752"},
		{"last block of the byte (LSB)", []byte{0x01}, 8 * K64, "-0+458752 C7+65536"},
		{"0x40 is the second block", []byte{0x40}, 8 * K64, "-0+65536 C1+65536 -2+393216"},
		{"nothing changed", []byte{0, 0}, 16 * K64, "-0+1048576"},
		{"everything changed", []byte{0xff, 0xff}, 16 * K64, "C0+1048576"},
		{"run across a byte boundary", []byte{0x03, 0xc0}, 16 * K64, "-0+393216 C6+262144 -10+393216"},
		{"whole bytes then single bits", []byte{0xff, 0x00, 0xa0}, 24 * K64,
			"C0+524288 -8+524288 C16+65536 -17+65536 C18+65536 -19+327680"},
		{"partial last block", []byte{0x20}, 2*K64 + 4096 + 1, "-0+131072 C2+4097"},
		{"padding bits past the end ignored", []byte{0x5f}, 2 * K64, "-0+65536 C1+65536"},
		{"longer bitmap than the disk", []byte{0x80, 0xff, 0xff}, 3 * K64, "C0+65536 -1+131072"},
		{"empty disk", nil, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseChangedBlocks(base64.StdEncoding.EncodeToString(tt.bits), tt.size)
			if err != nil {
				t.Fatal(err)
			}
			if got := runs(c); got != tt.want {
				t.Errorf("runs %s\nwant %s", got, tt.want)
			}
			var total, changed int64
			for r := range c.Runs() {
				if r.Off != total {
					t.Fatalf("run at %d, want %d: runs must be contiguous", r.Off, total)
				}
				total += r.Len
				if r.Changed {
					changed += r.Len
				}
			}
			if total != tt.size {
				t.Errorf("runs cover %d bytes, disk has %d", total, tt.size)
			}
			if c.ChangedBytes() != changed {
				t.Errorf("ChangedBytes %d, runs say %d", c.ChangedBytes(), changed)
			}
		})
	}
}

// TestChangedBlocksAgainstBits compares the runs with a bit-by-bit reading
// for patterns that mix the whole-byte fast path and single bits.
func TestChangedBlocksAgainstBits(t *testing.T) {
	for seed := range 200 {
		n := 1 + seed%37
		bits := make([]byte, n)
		for i := range bits {
			switch (seed + i) % 5 {
			case 0:
				bits[i] = 0
			case 1:
				bits[i] = 0xff
			default:
				bits[i] = byte(seed*31 + i*17)
			}
		}
		size := int64(n*8)*K64 - int64(seed%3)*K64 - int64(seed%2)*100
		c, err := ParseChangedBlocks(base64.StdEncoding.EncodeToString(bits), size)
		if err != nil {
			t.Fatal(err)
		}
		for r := range c.Runs() {
			for off := r.Off; off < r.Off+r.Len; off += K64 {
				i := off / K64
				want := bits[i/8]>>(7-i%8)&1 == 1
				if r.Changed != want {
					t.Fatalf("seed %d: block %d: run says %v, bit says %v", seed, i, r.Changed, want)
				}
			}
		}
	}
}

func TestChangedBlocksBad(t *testing.T) {
	tests := []struct {
		name, b64 string
		size      int64
		want      string
	}{
		{"not base64", "%%%", 8 * K64, "not base64"},
		{"too short", base64.StdEncoding.EncodeToString([]byte{0xff}), 9 * K64, "needs 2"},
		{"empty for a disk", "", K64, "needs 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseChangedBlocks(tt.b64, tt.size)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, errs.ErrCorrupt) {
				t.Fatalf("error %v, want %q (corrupt)", err, tt.want)
			}
		})
	}
	// Whitespace (a line-wrapped encoder) and missing padding are accepted.
	c, err := ParseChangedBlocks("gA\n", 8*K64)
	if err != nil || !c.Changed(0) || c.Changed(1) {
		t.Fatalf("unpadded: %v", err)
	}
}

// FuzzParseChangedBlocks: any input either fails cleanly or gives runs
// that cover the disk exactly, in order.
func FuzzParseChangedBlocks(f *testing.F) {
	f.Add("gA==", int64(8*K64))
	f.Add("/wA=", int64(16*K64))
	f.Add("", int64(0))
	f.Add("AAAA", int64(3*K64+5))
	f.Fuzz(func(t *testing.T, b64 string, size int64) {
		if size < 0 || size > 1<<40 {
			return
		}
		c, err := ParseChangedBlocks(b64, size)
		if err != nil {
			return
		}
		var pos int64
		for r := range c.Runs() {
			if r.Off != pos || r.Len <= 0 {
				t.Fatalf("run %+v at %d", r, pos)
			}
			pos += r.Len
		}
		if pos != size {
			t.Fatalf("runs cover %d, size %d", pos, size)
		}
	})
}

// BenchmarkChangedBlocks decodes and walks the bitmap of a 1 TiB disk
// (2 MiB of bitmap, 3 MiB of base64) with 1% of its blocks changed in
// scattered runs.
func BenchmarkChangedBlocks(b *testing.B) {
	const size = 1 << 40
	bits := make([]byte, size/K64/8)
	for i := 0; i < len(bits); i += 97 {
		bits[i] = 0x3c
	}
	b64 := base64.StdEncoding.EncodeToString(bits)
	b.SetBytes(int64(len(b64)))
	b.ReportAllocs()
	for b.Loop() {
		c, err := ParseChangedBlocks(b64, size)
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		for range c.Runs() {
			n++
		}
		if n < len(bits)/97 {
			b.Fatalf("%d runs", n)
		}
	}
}
