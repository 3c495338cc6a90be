package main

import (
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

func init() { commands = append(commands, newVerifyCmd) }

func newVerifyCmd(a *app) *cobra.Command {
	var f repoFlags
	cmd := &cobra.Command{
		Use:   "verify --repo DIR [BACKUP_ID ...]",
		Short: "Re-read and re-hash everything the backups reference",
		Long: `Verify backups (all, or the given ones): every manifest, index and chunk they
reference is read back, decrypted, decompressed and re-hashed. Each missing or
corrupt file is reported with the backups (and disks) it breaks. The exit code
is non-zero (corrupt data) when anything is wrong. Damaged chunks are moved to
the quarantine so the next backup stores them again; quarantined chunks stored
again since are reported as healed, with the backups that are whole again.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, ctx, release, err := f.openLocked(ctx, a, false, "verify")
			if err != nil {
				return err
			}
			defer release()
			var ids []repo.ID
			for _, p := range args {
				id, err := r.FindBackup(ctx, p)
				if err != nil {
					return err
				}
				ids = append(ids, id)
			}
			var done, total atomic.Int64
			stop := func() {}
			if a.out.JSON || terminal(a) != nil {
				stop = tick(ctx, time.Second, func() {
					d, t := done.Load(), total.Load()
					a.out.Status(struct {
						Phase       string `json:"phase"`
						ChunksDone  int64  `json:"chunks_done"`
						ChunksTotal int64  `json:"chunks_total"`
					}{"verify", d, t}, fmt.Sprintf("verify: %d of %d chunks checked", d, t))
				})
			}
			res, err := r.Verify(ctx, repo.VerifyOptions{Backups: ids, Progress: func(d, t int64) {
				done.Store(d)
				total.Store(t)
			}})
			stop()
			if err != nil {
				return err
			}
			for _, p := range res.Problems {
				var aff []string
				for _, x := range p.Affected {
					s := x.Backup[:8]
					if x.VM != "" {
						s += " (" + x.VM
						if x.Disk != "" {
							s += " disk " + x.Disk
						}
						s += ")"
					}
					aff = append(aff, s)
				}
				q := ""
				if p.Quarantined {
					q = " (quarantined: the next backup of this data stores it again)"
				}
				a.out.Warn("%s %s: %s; affects backups %s%s", p.Kind, p.ID[:16], p.Error, strings.Join(aff, ", "), q)
			}
			out := struct {
				OK bool `json:"ok"`
				*repo.VerifyResult
			}{len(res.Problems) == 0, res}
			a.out.Summary(out, func(w io.Writer) {
				fmt.Fprintf(w, "checked %d backups, %d indexes, %d chunks (%s): %d problems\n",
					res.Backups, res.Indexes, res.Chunks, progress.Bytes(res.BytesChecked), len(res.Problems))
				if len(res.Healed) > 0 {
					var short []string
					for _, b := range res.HealedBackups {
						short = append(short, b[:8])
					}
					fmt.Fprintf(w, "%d quarantined chunks were stored again by later backups; whole again: %s\n", len(res.Healed), strings.Join(short, ", "))
				}
			})
			if len(res.Problems) > 0 {
				return fmt.Errorf("verify found %d damaged or missing files: %w", len(res.Problems), errs.ErrCorrupt)
			}
			return nil
		},
	}
	f.register(cmd)
	return cmd
}
