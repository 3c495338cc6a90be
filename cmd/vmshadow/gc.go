package main

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

func init() { commands = append(commands, newGCCmd) }

func newGCCmd(a *app) *cobra.Command {
	var f repoFlags
	var o repo.GCOptions
	cmd := &cobra.Command{
		Use:   "gc --repo DIR [--grace 24h] [--dry-run]",
		Short: "Delete chunks and indexes that no backup references",
		Long: `Delete the chunks and indexes that no backup manifest references and that are
older than the grace period (default 24h), so the chunks of a backup still
being written are never taken. gc takes an exclusive lock: it waits for no one
and fails (busy) while a backup, restore or verify holds the repository. It
refuses to delete anything while a manifest or index cannot be read.

--grace 0s reclaims the space at once (after a failed backup on a full
repository, say): the exclusive lock already excludes running backups.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			o.Immediate = o.Grace == 0
			ctx := cmd.Context()
			r, ctx, done, err := f.openLocked(ctx, a, true, "gc")
			if err != nil {
				return err
			}
			defer done()
			res, err := r.GC(ctx, o)
			if err != nil {
				return err
			}
			out := struct {
				*repo.GCResult
				GraceS float64 `json:"grace_s"`
			}{res, o.Grace.Seconds()}
			a.out.Summary(out, func(w io.Writer) {
				verb := "deleted"
				if o.DryRun {
					verb = "would delete"
				}
				fmt.Fprintf(w, "%d backups reference %d chunks; %s %d chunks and %d indexes (%s); %d chunks younger than %s kept\n",
					res.Backups, res.ChunksReferenced, verb, res.ChunksDeleted, res.IndexesDeleted, progress.Bytes(res.BytesDeleted), res.ChunksInGrace, o.Grace)
				if res.HealthDeleted > 0 {
					fmt.Fprintf(w, "%s %d health check records of backups that no longer exist\n", verb, res.HealthDeleted)
				}
			})
			return nil
		},
	}
	f.register(cmd)
	durationFlag(cmd.Flags(), &o.Grace, "grace", repo.DefaultGrace, 0, 10*365*24*time.Hour, "never delete unreferenced data younger than this (0s: delete it at once; the exclusive lock excludes running backups)")
	cmd.Flags().BoolVar(&o.DryRun, "dry-run", false, "only count what would be deleted")
	return cmd
}
