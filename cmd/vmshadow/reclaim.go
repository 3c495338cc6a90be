package main

import (
	"context"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// reclaimFailed removes the chunks a failed backup stored (backup.Reclaim)
// and returns err unchanged.
func reclaimFailed(ctx context.Context, a *app, r *repo.Repo, err error) error {
	return backup.Reclaim(ctx, r, err, a.out.Warn)
}
