package nbd

import (
	"context"
	"fmt"
	"iter"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Extent is a range of the export with the status flags one metadata
// context gives it (StateHole/StateZero for base:allocation, StateDirty for
// a dirty bitmap).
type Extent struct {
	Offset int64
	Length int64
	Flags  uint32
}

// End is the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// BlockStatus sends one NBD_CMD_BLOCK_STATUS for [off, off+length) and
// returns the extents the server reported for the metadata context name,
// merged where adjacent extents have the same flags. They start at off and
// are contiguous; they may end before off+length (servers may describe less
// than asked), never after. name must be one of Options.MetaContexts.
func (c *Client) BlockStatus(ctx context.Context, name string, off, length int64) ([]Extent, error) {
	id, ok := c.contexts[name]
	if !ok {
		return nil, fmt.Errorf("nbd %s: metadata context %q was not selected when connecting; add it to Options.MetaContexts (%w)", c.peer, name, errs.ErrUsage)
	}
	if off < 0 || length <= 0 || off >= c.size {
		return nil, fmt.Errorf("nbd %s: block status of %d bytes at offset %d is outside the export of %d bytes (%w)", c.peer, length, off, c.size, errs.ErrUsage)
	}
	length = min(length, c.size-off, c.maxLen)
	if err := c.checkAligned("block status", off, length); err != nil {
		return nil, err
	}
	req := &request{cmd: cmdBlockStatus, off: uint64(off), length: uint64(length), ctxID: id}
	if err := c.start(ctx, req, 0, nil); err != nil {
		return nil, err
	}
	if err := c.wait(ctx, req); err != nil {
		return nil, err
	}
	return req.extents, nil
}

// Extents walks the extents of metadata context name over [off, off+length)
// (clipped to the export), one NBD_CMD_BLOCK_STATUS at a time, so memory
// stays bounded whatever the size of the export. Adjacent extents with equal
// flags are merged. On error the iterator yields it once and stops; breaking
// out of the loop stops the walk.
func (c *Client) Extents(ctx context.Context, name string, off, length int64) iter.Seq2[Extent, error] {
	return walkExtents(ctx, c.BlockStatus, name, off, min(length, c.size-off))
}

func walkExtents(ctx context.Context, bs func(context.Context, string, int64, int64) ([]Extent, error), name string, off, length int64) iter.Seq2[Extent, error] {
	return func(yield func(Extent, error) bool) {
		end := off + length
		var pending Extent
		for pos := off; pos < end; {
			exts, err := bs(ctx, name, pos, end-pos)
			if err != nil {
				yield(Extent{}, err)
				return
			}
			for _, e := range exts {
				if pending.Length > 0 && pending.Flags == e.Flags {
					pending.Length += e.Length
					continue
				}
				if pending.Length > 0 && !yield(pending, nil) {
					return
				}
				pending = e
			}
			pos = exts[len(exts)-1].End()
		}
		if pending.Length > 0 {
			yield(pending, nil)
		}
	}
}
