package livebackup

import (
	"context"
	"iter"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/nbd"
	"github.com/vmshadow/vmshadow/internal/nbdsource"
	xapiprov "github.com/vmshadow/vmshadow/internal/provider/xapi"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/xapi"
)

// XAPI adapts the XenServer / XCP-ng provider: change tracking by CBT,
// checkpoints are snapshot VDI UUIDs, each shadow copy is read over the
// pool's NBD (TLS pinned to the certificate XAPI reports) with the changed
// blocks XAPI listed.
type XAPI struct{ *xapiprov.Provider }

// Track implements Provider.
func (x XAPI) Track(prefix string, prev *repo.Manifest, full bool) {
	t := &xapiprov.Tracking{Prefix: prefix, Full: full, Previous: map[string]xapiprov.Previous{}}
	if prev != nil {
		for _, d := range prev.Disks {
			if d.Checkpoint != "" {
				t.Previous[d.Name] = xapiprov.Previous{Checkpoint: d.Checkpoint, Size: d.Size}
			}
		}
	}
	x.SetTracking(t)
}

// Open implements Provider.
func (x XAPI) Open(ctx context.Context, sh coord.Shadow, incremental bool, conns int) (Source, error) {
	target, tlsConfig, err := x.NBD(sh)
	if err != nil {
		return nil, err
	}
	o := nbdsource.Options{Name: sh.Disk, Target: &target, TLS: tlsConfig, Conns: conns,
		ServerErrorHint: "the pool's NBD server failed to read the snapshot VDI", AllocationOptional: true}
	if incremental {
		cb, err := x.ChangedBlocks(sh)
		if err != nil {
			return nil, err
		}
		o.Changed = changedExtents(cb)
	}
	return nbdsource.Open(ctx, o)
}

// changedExtents gives XAPI's changed blocks as extents flagged dirty.
func changedExtents(cb *xapi.ChangedBlocks) iter.Seq2[nbd.Extent, error] {
	return func(yield func(nbd.Extent, error) bool) {
		for r := range cb.Runs() {
			var flags uint32
			if r.Changed {
				flags = nbd.StateDirty
			}
			if !yield(nbd.Extent{Offset: r.Off, Length: r.Len, Flags: flags}, nil) {
				return
			}
		}
	}
}

// Complete implements Provider.
func (x XAPI) Complete(set *coord.Set, save func() error) error { return x.CompleteTracking(set, save) }
