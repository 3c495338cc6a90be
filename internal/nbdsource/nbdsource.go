// Package nbdsource reads a shadow copy exported over NBD as a backup
// source: reads spread over a pool of connections, and an extent plan built
// lazily from the export's allocation (base:allocation) and, for an
// incremental backup, from what changed since the base backup: the dirty
// bitmap exported with it (qemu:dirty-bitmap:NAME, QEMU) or changed ranges
// the hypervisor gave otherwise (XAPI's changed block tracking). It is
// hypervisor-neutral: anything that exports a point-in-time disk over NBD
// can be read through it.
package nbdsource

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"iter"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/nbd"
)

// Options say what to read.
type Options struct {
	Name string // the disk's name in the backup
	URI  string // the shadow copy's NBD URI
	// Target, when URI is empty, is the shadow copy (for export names that
	// are tokens rather than URI paths, as XenServer's).
	Target *nbd.Target
	// Bitmap, if not empty, is the dirty bitmap exported with the shadow
	// copy: what it does not mark is Unchanged since the base backup.
	Bitmap string
	// Changed, if not nil (and Bitmap empty), gives the changes since the
	// base backup from outside the export: extents covering the disk in
	// order, flagged nbd.StateDirty where the disk changed. What it does not
	// mark is Unchanged. It is consumed once, by Extents.
	Changed iter.Seq2[nbd.Extent, error]
	Conns   int // connections for parallel reads; default 4
	TLS     *tls.Config
	// ServerErrorHint is added to errors the NBD server reports for a read
	// (what such an error means for this kind of shadow copy).
	ServerErrorHint string
	// AllocationOptional reads a server that cannot report allocation (no
	// structured replies, or no base:allocation context) as if every range
	// held data, instead of failing. Not with Bitmap.
	AllocationOptional bool
	// Allocation, with AllocationOptional, gives the allocation another way
	// when the server cannot report it: extents covering the disk in
	// order, flagged nbd.StateHole|nbd.StateZero where the disk reads as
	// zeros. Nil, or an error from it, reads every range.
	Allocation func(ctx context.Context) (iter.Seq2[nbd.Extent, error], error)
	// AcceptFewer reads with fewer connections than Conns when the server
	// refuses the later ones (a connection limit shared with other
	// clients); Warn is told how many were opened.
	AcceptFewer bool
	Warn        func(string)
}

// Source is a shadow copy as a backup.Source.
type Source struct {
	o       Options
	pool    *nbd.Pool
	noAlloc bool // the server reports no allocation: everything is data
}

// OpenShadow opens a shadow copy exposed at sh.NBD by a hypervisor's own
// NBD server with a dirty-bitmap export (QEMU, libvirt). With incremental,
// ranges the exported bitmap sh.Bitmap does not mark are unchanged;
// otherwise every allocated range is read. hint says, in a read error the
// server reports, what may have broken the shadow copy.
func OpenShadow(ctx context.Context, sh coord.Shadow, incremental bool, conns int, hint string) (*Source, error) {
	bitmap := ""
	if incremental {
		bitmap = sh.Bitmap
	}
	return Open(ctx, Options{Name: sh.Disk, URI: sh.NBD, Bitmap: bitmap, Conns: conns, ServerErrorHint: hint})
}

// Open connects to the shadow copy.
func Open(ctx context.Context, o Options) (*Source, error) {
	var t nbd.Target
	if o.URI != "" || o.Target == nil {
		var err error
		if t, err = nbd.ParseURI(o.URI); err != nil {
			return nil, err
		}
	} else {
		t = *o.Target
	}
	if o.Conns <= 0 {
		o.Conns = 4
	}
	contexts := []string{nbd.ContextBaseAllocation}
	if o.Bitmap != "" {
		contexts = append(contexts, nbd.ContextDirtyBitmap(o.Bitmap))
	}
	dial := func(opts *nbd.Options) (*nbd.Pool, error) {
		if !o.AcceptFewer {
			return nbd.DialPool(ctx, t, o.Conns, opts)
		}
		pool, short, err := nbd.DialPoolAvailable(ctx, t, o.Conns, opts)
		if short != nil && o.Warn != nil {
			o.Warn(fmt.Sprintf("disk %s: read over %d NBD connections instead of %d: the server refused more (%v)", o.Name, pool.Conns(), o.Conns, short))
		}
		return pool, err
	}
	pool, err := dial(&nbd.Options{TLSConfig: o.TLS, MetaContexts: contexts})
	noAlloc := false
	if err != nil && o.AllocationOptional && o.Bitmap == "" && (errors.Is(err, errs.ErrUnsupported) || errors.Is(err, errs.ErrNotFound)) {
		pool, err = dial(&nbd.Options{TLSConfig: o.TLS})
		noAlloc = true
	}
	if err != nil {
		return nil, fmt.Errorf("open shadow copy of disk %s: %w", o.Name, err)
	}
	return &Source{o: o, pool: pool, noAlloc: noAlloc}, nil
}

// Conns is the number of connections the source reads over.
func (s *Source) Conns() int { return s.pool.Conns() }

// Allocation reports whether the server tells which ranges hold data;
// without it every range is read.
func (s *Source) Allocation() bool { return !s.noAlloc }

// Close drops the connections.
func (s *Source) Close() error { return s.pool.Close() }

// Name implements backup.Source.
func (s *Source) Name() string { return s.o.Name }

// Size implements backup.Source.
func (s *Source) Size() int64 { return s.pool.Size() }

// ReadAt implements backup.Source.
func (s *Source) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	crashpoint.Hit("backup-read")
	n, err := s.pool.ReadAt(ctx, p, off)
	if err != nil {
		var se *nbd.ServerError
		if errors.As(err, &se) && s.o.ServerErrorHint != "" {
			return n, fmt.Errorf("read shadow copy of disk %s at offset %d: %w (%s)", s.o.Name, off, err, s.o.ServerErrorHint)
		}
		return n, fmt.Errorf("read shadow copy of disk %s at offset %d: %w", s.o.Name, off, err)
	}
	return n, nil
}

// Extents implements backup.Source: ranges that read as zeros are Zero;
// with a bitmap or changed ranges, ranges they do not mark are Unchanged;
// the rest is Data.
func (s *Source) Extents(ctx context.Context) iter.Seq2[backup.Extent, error] {
	size := s.Size()
	alloc := s.pool.Extents(ctx, nbd.ContextBaseAllocation, 0, size)
	if s.noAlloc {
		alloc = func(yield func(nbd.Extent, error) bool) { yield(nbd.Extent{Offset: 0, Length: size}, nil) }
		if s.o.Allocation != nil {
			if a, err := s.o.Allocation(ctx); err == nil {
				alloc = a
			} else if s.o.Warn != nil {
				s.o.Warn(fmt.Sprintf("disk %s: the NBD server reports no allocation, nor could it be found otherwise (%v): every byte is read", s.o.Name, err))
			}
		}
	}
	if s.o.Bitmap == "" && s.o.Changed != nil {
		return merge(alloc, s.o.Changed, size, s.o.Name)
	}
	if s.o.Bitmap == "" {
		return func(yield func(backup.Extent, error) bool) {
			for e, err := range alloc {
				if err != nil {
					yield(backup.Extent{}, fmt.Errorf("disk %s: allocation: %w", s.o.Name, err))
					return
				}
				if !yield(backup.Extent{Off: e.Offset, Len: e.Length, Kind: allocKind(e)}, nil) {
					return
				}
			}
		}
	}
	dirty := s.pool.Extents(ctx, nbd.ContextDirtyBitmap(s.o.Bitmap), 0, size)
	return merge(alloc, dirty, size, s.o.Name)
}

func allocKind(e nbd.Extent) backup.ExtentKind {
	if e.Flags&nbd.StateZero != 0 {
		return backup.Zero
	}
	return backup.Data
}

// merge sweeps the allocation and dirty-bitmap extents together. Unchanged
// wins over allocation: what did not change is taken from the base index.
func merge(alloc, dirty iter.Seq2[nbd.Extent, error], size int64, name string) iter.Seq2[backup.Extent, error] {
	return func(yield func(backup.Extent, error) bool) {
		nextA, stopA := iter.Pull2(alloc)
		defer stopA()
		nextD, stopD := iter.Pull2(dirty)
		defer stopD()
		pull := func(next func() (nbd.Extent, error, bool), what string, pos int64) (nbd.Extent, error) {
			e, err, ok := next()
			switch {
			case err != nil:
				return e, fmt.Errorf("disk %s: %s: %w", name, what, err)
			case !ok || e.Offset != pos || e.Length <= 0:
				return e, fmt.Errorf("disk %s: %s extents do not cover offset %d", name, what, pos)
			}
			return e, nil
		}
		var a, d nbd.Extent
		var out backup.Extent
		for pos := int64(0); pos < size; {
			var err error
			if a.End() <= pos {
				if a, err = pull(nextA, "allocation", pos); err != nil {
					yield(backup.Extent{}, err)
					return
				}
			}
			if d.End() <= pos {
				if d, err = pull(nextD, "dirty bitmap", pos); err != nil {
					yield(backup.Extent{}, err)
					return
				}
			}
			end := min(a.End(), d.End(), size)
			kind := backup.Unchanged
			if d.Flags&nbd.StateDirty != 0 {
				kind = allocKind(a)
			}
			if out.Len > 0 && out.Kind == kind {
				out.Len += end - pos
			} else {
				if out.Len > 0 && !yield(out, nil) {
					return
				}
				out = backup.Extent{Off: pos, Len: end - pos, Kind: kind}
			}
			pos = end
		}
		if out.Len > 0 {
			yield(out, nil)
		}
	}
}
