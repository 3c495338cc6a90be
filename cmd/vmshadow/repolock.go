package main

import (
	"context"

	"github.com/vmshadow/vmshadow/internal/repo"
)

// openLocked opens the repository and takes a shared or exclusive lock for
// op. Run the operation under the returned context (it ends if the lock is
// lost) and call done when finished: it unlocks and closes the repository
// and its storage.
func (f *repoFlags) openLocked(ctx context.Context, a *app, exclusive bool, op string) (*repo.Repo, context.Context, func(), error) {
	r, err := f.open(ctx)
	if err != nil {
		return nil, nil, nil, err
	}
	lctx, unlock, err := lock(ctx, a, r, exclusive, op)
	if err != nil {
		r.Close()
		r.Backend().Close()
		return nil, nil, nil, err
	}
	return r, lctx, func() { unlock(); r.Close(); r.Backend().Close() }, nil
}
