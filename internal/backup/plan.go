package backup

import (
	"context"
	"fmt"

	"github.com/vmshadow/vmshadow/internal/repo"
)

// chunkPlan accumulates what the extents say about one chunk.
type chunkPlan struct {
	spans     []span // ranges to read if the chunk is read (Data and Unchanged)
	unchanged int64
	zero      int64
}

func (c *chunkPlan) add(s span, kind ExtentKind) {
	switch kind {
	case Zero:
		c.zero += s.n
		return
	case Unchanged:
		c.unchanged += s.n
	}
	if k := len(c.spans); k > 0 && c.spans[k-1].off+c.spans[k-1].n == s.off {
		c.spans[k-1].n += s.n
		return
	}
	c.spans = append(c.spans, s)
}

// plan turns the source's extents into per-chunk decisions: wholly
// unchanged chunks reuse the base entry (unless that chunk is quarantined:
// then they are read again, so the chunk is stored again), wholly zero chunks get a zero
// entry, and every other chunk becomes a read job for its Data and
// Unchanged parts (known-zero parts are not read).
func (p *pipeline) plan(ctx context.Context, d Disk, x *repo.Index, st *diskStats, reads chan<- readJob) error {
	src, base, cs := d.Source, d.Base, p.cs
	size := src.Size()
	meter := p.o.Meter
	ci := 0
	var cur chunkPlan

	flush := func() error {
		off, n := x.Range(ci)
		switch {
		case cur.unchanged == n && base != nil && ci < base.Len() && baseLen(base, ci) == n && !p.isQuarantined(base.ID(ci)):
			id := base.ID(ci)
			x.Set(ci, id)
			if id.IsZero() {
				st.zero.Add(1)
			} else {
				st.reused.Add(1)
			}
			meter.Add(n)
		case cur.zero == n:
			st.zero.Add(1)
			meter.Add(n)
		default:
			select {
			case reads <- readJob{i: ci, off: off, n: n, spans: cur.spans}:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		ci++
		cur = chunkPlan{}
		return nil
	}
	// add records [off, off+n) of kind, flushing each chunk it completes.
	add := func(off, n int64, kind ExtentKind) error {
		for n > 0 {
			chunkStart := int64(ci) * cs
			end := min(off+n, chunkStart+cs)
			cur.add(span{off - chunkStart, end - off}, kind)
			n -= end - off
			off = end
			if off == min(chunkStart+cs, size) {
				if err := flush(); err != nil {
					return err
				}
			}
		}
		return nil
	}

	pos := int64(0)
	for e, err := range src.Extents(ctx) {
		if err != nil {
			return fmt.Errorf("extent plan: %w", err)
		}
		if e.Len == 0 {
			continue
		}
		if e.Off < pos || e.Len < 0 || e.Off+e.Len > size || e.Kind < Data || e.Kind > Unchanged {
			return fmt.Errorf("%w: extent %d+%d (%s) overlaps, is out of order, or lies outside the %d-byte disk", errPlan, e.Off, e.Len, e.Kind, size)
		}
		if e.Kind == Unchanged && base == nil {
			return fmt.Errorf("%w: unchanged extent %d+%d but no base index", errPlan, e.Off, e.Len)
		}
		if e.Off > pos {
			if err := add(pos, e.Off-pos, Data); err != nil {
				return err
			}
		}
		if err := add(e.Off, e.Len, e.Kind); err != nil {
			return err
		}
		pos = e.Off + e.Len
	}
	if pos < size {
		return add(pos, size-pos, Data)
	}
	return nil
}

func baseLen(b *repo.Index, i int) int64 {
	_, n := b.Range(i)
	return n
}

func (p *pipeline) isQuarantined(id repo.ID) bool {
	_, q := p.quarantined[id]
	return q
}
