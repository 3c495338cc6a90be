package xapi

import (
	"encoding/base64"
	"fmt"
	"iter"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// CBTBlockSize is the granularity of XAPI's changed block tracking: one
// bit of a VDI.list_changed_blocks bitmap per 64 KiB of disk.
const CBTBlockSize = 64 << 10

// ChangedBlocks is a decoded VDI.list_changed_blocks bitmap for a disk:
// bit i (most significant bit of each byte first) says whether the 64 KiB
// block at offset i*CBTBlockSize changed. It holds just the bitmap (2 KiB
// per GiB of disk).
type ChangedBlocks struct {
	bits   []byte
	size   int64
	blocks int64
}

// ParseChangedBlocks decodes the base64 bitmap XAPI returned for a disk of
// size bytes. The bitmap must cover the whole disk; bits past the end of the
// disk (padding of the last byte, or a bitmap rounded up by the storage
// backend) are ignored.
func ParseChangedBlocks(b64 string, size int64) (*ChangedBlocks, error) {
	if size < 0 {
		return nil, fmt.Errorf("changed-block bitmap: negative disk size %d: %w", size, errs.ErrUsage)
	}
	s := strings.Map(func(r rune) rune {
		if r == ' ' || r == '\n' || r == '\r' || r == '\t' {
			return -1
		}
		return r
	}, b64)
	bits, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		bits, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "="))
	}
	if err != nil {
		return nil, fmt.Errorf("changed-block bitmap is not base64: %v: %w", err, errs.ErrCorrupt)
	}
	blocks := (size + CBTBlockSize - 1) / CBTBlockSize
	if need := (blocks + 7) / 8; int64(len(bits)) < need {
		return nil, fmt.Errorf("changed-block bitmap has %d bytes (%d blocks of 64 KiB), the %d-byte disk needs %d: %w",
			len(bits), 8*len(bits), size, need, errs.ErrCorrupt)
	}
	return &ChangedBlocks{bits: bits, size: size, blocks: blocks}, nil
}

// Size is the disk size the bitmap describes.
func (c *ChangedBlocks) Size() int64 { return c.size }

// Changed reports whether block i changed.
func (c *ChangedBlocks) Changed(i int64) bool {
	return c.bits[i/8]&(0x80>>(i%8)) != 0
}

// Run is a range of the disk that changed, or did not.
type Run struct {
	Off, Len int64
	Changed  bool
}

// Runs yields maximal runs of changed and unchanged blocks in order,
// covering [0, Size) exactly (the last run ends at the disk's end, which
// need not be a multiple of 64 KiB).
func (c *ChangedBlocks) Runs() iter.Seq[Run] {
	return func(yield func(Run) bool) {
		var cur Run
		for i := int64(0); i < c.blocks; {
			// Whole bytes of equal bits go at once.
			if i%8 == 0 && i+8 <= c.blocks && (c.bits[i/8] == 0 || c.bits[i/8] == 0xff) {
				changed := c.bits[i/8] == 0xff
				if cur.Len > 0 && cur.Changed != changed {
					if !yield(cur) {
						return
					}
					cur = Run{Off: i * CBTBlockSize}
				}
				cur.Changed = changed
				cur.Len = (i+8)*CBTBlockSize - cur.Off
				i += 8
				continue
			}
			changed := c.Changed(i)
			if cur.Len > 0 && cur.Changed != changed {
				if !yield(cur) {
					return
				}
				cur = Run{Off: i * CBTBlockSize}
			}
			cur.Changed = changed
			cur.Len = (i+1)*CBTBlockSize - cur.Off
			i++
		}
		if cur.Len > 0 {
			cur.Len = min(cur.Len, c.size-cur.Off)
			yield(cur)
		}
	}
}

// ChangedBytes is how much of the disk the bitmap marks as changed.
func (c *ChangedBlocks) ChangedBytes() int64 {
	var n int64
	for r := range c.Runs() {
		if r.Changed {
			n += r.Len
		}
	}
	return n
}
