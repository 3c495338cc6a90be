package main

import (
	"context"
	"errors"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// reclaimFailed removes the chunks a failed backup stored (err is its
// error), once its shared lock is released, so that a backup that filled
// the repository does not make the next one fail too. It takes the
// exclusive lock for that: when another process holds the repository
// (which might reuse those chunks), they stay, and the warning says how to
// reclaim them later. It returns err unchanged.
func reclaimFailed(ctx context.Context, a *app, r *repo.Repo, err error) error {
	var f *backup.Failure
	if !errors.As(err, &f) || ctx.Err() != nil {
		return err
	}
	l, lctx, lerr := r.Lock(ctx, true, "backup cleanup")
	if lerr != nil {
		a.out.Warn("the %d chunks (%s) the failed backup stored stay (%v): the next backup of the same data reuses them; 'vmshadow gc --grace 0s' removes them at once when no other process holds the repository",
			f.Stored, progress.Bytes(f.Bytes), lerr)
		return err
	}
	defer l.Unlock()
	n, derr := r.DropChunks(lctx, f.Chunks(), f.Start)
	if derr != nil {
		a.out.Warn("removing the chunks the failed backup stored: %v (removed %d of %d); 'vmshadow gc --grace 0s' removes the rest", derr, n, f.Stored)
		return err
	}
	if int64(n) == f.Stored {
		a.out.Warn("removed the %d chunks (%s) the failed backup stored", n, progress.Bytes(f.Bytes))
	} else {
		a.out.Warn("removed %d of the %d chunks (%s) the failed backup stored; the others are used by a backup written meanwhile, or heal quarantined chunks", n, f.Stored, progress.Bytes(f.Bytes))
	}
	return err
}
