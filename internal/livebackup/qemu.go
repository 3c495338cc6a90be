package livebackup

import (
	"context"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/nbdsource"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// QEMU adapts the QEMU provider: change tracking by persistent dirty
// bitmaps, each shadow copy read over NBD with its bitmap.
type QEMU struct{ *qemu.Provider }

// Track implements Provider: checkpoints are bitmap names.
func (q QEMU) Track(prefix string, prev *repo.Manifest, full bool) {
	cp := &qemu.Checkpoint{Prefix: prefix, Full: full, Previous: map[string]qemu.Previous{}}
	if prev != nil {
		for _, d := range prev.Disks {
			if d.Checkpoint != "" {
				cp.Previous[d.Name] = qemu.Previous{Bitmap: d.Checkpoint, Size: d.Size}
			}
		}
	}
	q.SetCheckpoint(cp)
}

// Idle implements Provider: the QMP socket is not held during the read; it
// is reopened for the release.
func (q QEMU) Idle() { q.Provider.Close() }

// Open implements Provider.
func (q QEMU) Open(ctx context.Context, sh coord.Shadow, incremental bool, conns int) (Source, error) {
	bitmap := ""
	if incremental {
		bitmap = sh.Bitmap
	}
	return nbdsource.Open(ctx, nbdsource.Options{Name: sh.Disk, URI: sh.NBD, Bitmap: bitmap, Conns: conns,
		ServerErrorHint: "the shadow copy is broken if its diff area filled up or failed: give the set more scratch space with --scratch-dir"})
}

// Complete implements Provider.
func (q QEMU) Complete(set *coord.Set, save func() error) error {
	return q.CompleteCheckpoint(set, save)
}
