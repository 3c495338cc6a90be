package backup

import (
	"context"
	"errors"

	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// Reclaim removes the chunks a failed backup stored (err is its error,
// a *Failure when it stored any), once the caller released its shared
// lock, so that a backup that filled the repository does not make the
// next one fail too. It takes the exclusive lock for that: when another
// process holds the repository (which might reuse those chunks), they
// stay, and the warning says how to reclaim them later. It returns err
// unchanged.
func Reclaim(ctx context.Context, r *repo.Repo, err error, warn func(format string, args ...any)) error {
	var f *Failure
	if !errors.As(err, &f) || ctx.Err() != nil {
		return err
	}
	l, lctx, lerr := r.Lock(ctx, true, "backup cleanup")
	if lerr != nil {
		warn("the %d chunks (%s) the failed backup stored stay (%v): the next backup of the same data reuses them; 'vmshadow gc --grace 0s' removes them at once when no other process holds the repository",
			f.Stored, progress.Bytes(f.Bytes), lerr)
		return err
	}
	defer l.Unlock()
	n, derr := r.DropChunks(lctx, f.Chunks(), f.Start)
	if derr != nil {
		warn("removing the chunks the failed backup stored: %v (removed %d of %d); 'vmshadow gc --grace 0s' removes the rest", derr, n, f.Stored)
		return err
	}
	if int64(n) == f.Stored {
		warn("removed the %d chunks (%s) the failed backup stored", n, progress.Bytes(f.Bytes))
	} else {
		warn("removed %d of the %d chunks (%s) the failed backup stored; the others are used by a backup written meanwhile, or heal quarantined chunks", n, f.Stored, progress.Bytes(f.Bytes))
	}
	return err
}
