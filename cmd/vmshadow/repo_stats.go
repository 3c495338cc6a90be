package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo/repostats"
)

func newRepoStatsCmd(a *app) *cobra.Command {
	var f repoFlags
	cmd := &cobra.Command{
		Use:   "stats --repo DIR|s3:URL",
		Short: "Show how much the repository stores and how many bytes of VM disks that stands for",
		Long: `Show the repository's statistics: backups, VMs, chunks and indexes; the
bytes it stores (every blob: chunks, indexes, manifests, config, key files,
locks, quarantine); the logical bytes (the sum over backups of their disks'
sizes, what restoring every backup would write); the referenced bytes (the
same without all-zero chunks, which are never stored); the unique bytes (the
plaintext of the distinct chunks, each counted once); the deduplication
factor, logical / stored (Proxmox Backup Server's: deduplication, zero
chunks and compression together); the chunks no backup references (what gc
removes after its grace period); and per VM its backups and the newest.

It reads every manifest and index once and lists every blob; memory is
about 20 to 40 bytes per distinct chunk. It takes no lock and writes
nothing: it runs on read-only storage and while backups, prune or gc run
(its figures are then a mix of before and after).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer func() { r.Close(); r.Backend().Close() }()
			s, err := repostats.Compute(ctx, r)
			if err != nil {
				return err
			}
			if s.UnreadableBackups > 0 || s.UnreadableIndexes > 0 {
				a.out.Warn("%d backup manifests and %d indexes cannot be read: their data is not counted; run 'vmshadow verify'", s.UnreadableBackups, s.UnreadableIndexes)
			}
			out := struct {
				Repository string `json:"repository"`
				ID         string `json:"id"`
				*repostats.Stats
			}{f.location(), r.Config().ID, s}
			a.out.Summary(out, func(w io.Writer) {
				b := progress.Bytes
				fmt.Fprintf(w, "repository %s at %s\n", r.Config().ID[:8], f.location())
				fmt.Fprintf(w, "backups:             %d (%d VMs)\n", s.Backups, s.VMs)
				fmt.Fprintf(w, "stored:              %s (%d bytes): chunks %s in %d, indexes %s in %d, manifests %s, other %s\n",
					b(s.StoredBytes), s.StoredBytes, b(s.ChunkBytes), s.Chunks, b(s.IndexBytes), s.Indexes, b(s.ManifestBytes), b(s.OtherBytes))
				fmt.Fprintf(w, "logical:             %s (%d bytes), of which in non-zero chunks %s\n", b(s.LogicalBytes), s.LogicalBytes, b(s.ReferencedBytes))
				fmt.Fprintf(w, "unique:              %s in %d chunks, stored as %s\n", b(s.UniqueBytes), s.ReferencedChunks, b(s.ReferencedChunkBytes))
				fmt.Fprintf(w, "unreferenced:        %s in %d chunks (gc removes them after its grace period)\n", b(s.UnreferencedBytes), s.UnreferencedChunks)
				fmt.Fprintf(w, "deduplication factor %.2f (logical / stored); compression factor %.2f\n", s.DedupFactor, s.CompressionFactor)
				if len(s.PerVM) > 0 {
					fmt.Fprintf(w, "\n%-24s  %7s  %-20s  %s\n", "VM", "BACKUPS", "NEWEST", "LOGICAL")
					for _, v := range s.PerVM {
						fmt.Fprintf(w, "%-24s  %7d  %-20s  %s\n", v.VM, v.Backups, v.Newest.Local().Format("2006-01-02 15:04:05"), b(v.LogicalBytes))
					}
				}
			})
			return nil
		},
	}
	f.register(cmd)
	return cmd
}
