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

// openBackup opens the repository under a shared lock for op (gc keeps
// every chunk while it is held) and loads backup arg (an ID or a unique
// prefix). Call done when finished.
func (f *repoFlags) openBackup(ctx context.Context, a *app, op, arg string) (*repo.Repo, context.Context, repo.ID, *repo.Manifest, func(), error) {
	r, lctx, done, err := f.openLocked(ctx, a, false, op)
	if err != nil {
		return nil, nil, repo.ID{}, nil, nil, err
	}
	id, err := r.FindBackup(lctx, arg)
	if err == nil {
		var m *repo.Manifest
		if m, err = r.LoadManifest(lctx, id); err == nil {
			return r, lctx, id, m, done, nil
		}
	}
	done()
	return nil, nil, repo.ID{}, nil, nil, err
}
