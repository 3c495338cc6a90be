package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repocopy"
)

func init() { commands = append(commands, newCopyCmd) }

// copySummary is the JSON summary of vmshadow copy; field names are a
// contract.
type copySummary struct {
	From           string         `json:"from"`
	To             string         `json:"to"`
	Copied         []copiedBackup `json:"copied"`
	Skipped        []skippedCopy  `json:"skipped"`
	BackupsCopied  int            `json:"backups_copied"`
	BackupsSkipped int            `json:"backups_skipped"`
	ChunksSent     int64          `json:"chunks_sent"`
	ChunksPresent  int64          `json:"chunks_present"` // already in the target: not sent
	ChunksZero     int64          `json:"chunks_zero"`
	BytesRead      int64          `json:"bytes_read"` // disk bytes read from the source
	BytesSent      int64          `json:"bytes_sent"` // stored bytes sent to the target
	DurationS      float64        `json:"duration_s"`

	// GroupsCopied are the group backups whose records were copied: those
	// whose every member the target now holds.
	GroupsCopied []copiedGroup `json:"groups_copied"`
}

type copiedBackup struct {
	BackupID      string    `json:"backup_id"` // in the source
	ShortID       string    `json:"short_id"`
	TargetID      string    `json:"target_id"`
	VM            string    `json:"vm"`
	Time          time.Time `json:"time"`
	Size          int64     `json:"size"`
	BytesRead     int64     `json:"bytes_read"`
	BytesSent     int64     `json:"bytes_sent"`
	ChunksSent    int64     `json:"chunks_sent"`
	ChunksPresent int64     `json:"chunks_present"`
	ChunksZero    int64     `json:"chunks_zero"`
	DurationS     float64   `json:"duration_s"`
}

type copiedGroup struct {
	GroupBackupID string    `json:"group_backup_id"` // in the source
	ShortID       string    `json:"short_id"`
	TargetID      string    `json:"target_id"`
	Group         string    `json:"group"`
	Time          time.Time `json:"time"`
}

type skippedCopy struct {
	BackupID string    `json:"backup_id"`
	ShortID  string    `json:"short_id"`
	TargetID string    `json:"target_id"` // the target's backup that holds it
	VM       string    `json:"vm"`
	Time     time.Time `json:"time"`
}

func newCopyCmd(a *app) *cobra.Command {
	var from, to repoFlags
	var sel repocopy.Selection
	cmd := &cobra.Command{
		Use:   "copy --from DIR|s3:URL --to DIR|s3:URL [--vm NAME] [BACKUP_ID ...]",
		Short: "Copy backups that one repository has and another lacks (offsite copy)",
		Long: `Copy backups from one repository (--from) to another (--to): every backup of
the source (or of --vm, or the given backup IDs or prefixes) that the target
does not hold yet. Only chunks the target lacks are sent. The repositories may
have different passwords, chunk-ID schemes and chunk sizes, and either may be
on S3. Every chunk read from the source is verified: damage fails the copy
(exit code 8) and leaves no backup in the target.

The source's password comes from $VMSHADOW_PASSWORD or --password-file, the
target's from $VMSHADOW_TO_PASSWORD or --to-password-file (else terminal
prompts); S3 credentials of both ends from the usual $AWS_* variables.
A copy keeps the backup's VM, time, tags, source, mode and consistency, and
records the original's ID as its origin: running copy again copies nothing.
Group backups follow their members: once the target holds every member of
one, its group record is copied too.
A copy never continues a live backup's chain in the target (its change
tracking belongs to the source repository): the first live backup of the VM
into the target is a full one.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			start := time.Now()
			if err := from.check(); err != nil { // before asking for passwords
				return err
			}
			if err := to.check(); err != nil {
				return err
			}
			if sel.VM != "" {
				if err := repo.ValidName("VM", sel.VM); err != nil {
					return err
				}
			}
			sel.Backups = args
			src, err := from.open(ctx)
			if err != nil {
				return fmt.Errorf("source: %w", err)
			}
			defer func() { src.Close(); src.Backend().Close() }()
			dst, err := to.open(ctx)
			if err != nil {
				return fmt.Errorf("target: %w", err)
			}
			defer func() { dst.Close(); dst.Backend().Close() }()
			sctx, sunlock, err := lock(ctx, a, src, false, "copy")
			if err != nil {
				return fmt.Errorf("source: %w", err)
			}
			defer sunlock()
			tctx, tunlock, err := lock(sctx, a, dst, false, "copy")
			if err != nil {
				return fmt.Errorf("target: %w", err)
			}
			plan, err := repocopy.Select(tctx, src, dst, sel)
			if err != nil {
				tunlock()
				return err
			}
			s := copySummary{From: from.location(), To: to.location(), Copied: []copiedBackup{}, Skipped: []skippedCopy{}}
			var damaged []string
			for id, derr := range plan.Damaged {
				damaged = append(damaged, id.Short())
				a.out.Warn("source backup %s cannot be read, not copied: %v", id.Short(), derr)
			}
			sort.Strings(damaged)
			for _, b := range plan.Copy {
				meter := progress.NewMeter(repocopy.Size(b))
				stop := showProgress(tctx, a, "copy "+b.ID.Short(), meter)
				res, err := repocopy.Copy(tctx, src, dst, b, backup.Options{Meter: meter})
				stop()
				if err != nil {
					tunlock()
					return reclaimFailed(ctx, a, dst, err)
				}
				c := copiedBackup{BackupID: b.ID.String(), ShortID: b.ID.Short(), TargetID: res.ID.String(), VM: b.VM, Time: b.Time,
					Size: repocopy.Size(b), BytesRead: res.Stats.BytesRead, BytesSent: res.Stats.BytesNew, ChunksSent: res.Stats.ChunksNew,
					ChunksPresent: res.Stats.ChunksReused, ChunksZero: res.Stats.ChunksZero, DurationS: res.Duration.Seconds()}
				s.Copied = append(s.Copied, c)
				s.ChunksSent += c.ChunksSent
				s.ChunksPresent += c.ChunksPresent
				s.ChunksZero += c.ChunksZero
				s.BytesRead += c.BytesRead
				s.BytesSent += c.BytesSent
			}
			groups, gskipped, err := repocopy.CopyGroups(tctx, src, dst)
			tunlock()
			for _, e := range gskipped {
				a.out.Warn("%v", e)
			}
			s.GroupsCopied = []copiedGroup{}
			for _, g := range groups {
				s.GroupsCopied = append(s.GroupsCopied, copiedGroup{GroupBackupID: g.SourceID.String(), ShortID: g.SourceID.Short(), TargetID: g.TargetID.String(), Group: g.Name, Time: g.Time})
			}
			if err != nil {
				return err
			}
			for _, b := range plan.Skipped {
				s.Skipped = append(s.Skipped, skippedCopy{BackupID: b.ID.String(), ShortID: b.ID.Short(), TargetID: plan.Present[b.ID].String(), VM: b.VM, Time: b.Time})
			}
			s.BackupsCopied, s.BackupsSkipped = len(s.Copied), len(s.Skipped)
			s.DurationS = time.Since(start).Seconds()
			a.out.Summary(s, func(w io.Writer) {
				for _, c := range s.Copied {
					fmt.Fprintf(w, "copied %s (%s, %s) as %s: %d chunks sent (%s), %d already there, %d zero, read %s in %s\n",
						c.ShortID, c.VM, c.Time.Local().Format("2006-01-02 15:04:05"), c.TargetID[:8], c.ChunksSent, progress.Bytes(c.BytesSent),
						c.ChunksPresent, c.ChunksZero, progress.Bytes(c.BytesRead), progress.Duration(c.DurationS))
				}
				for _, g := range s.GroupsCopied {
					fmt.Fprintf(w, "copied group backup %s (group %s, %s) as %s\n", g.ShortID, g.Group, g.Time.Local().Format("2006-01-02 15:04:05"), g.TargetID[:8])
				}
				switch {
				case s.BackupsCopied == 0 && s.BackupsSkipped == 0 && sel.VM != "":
					fmt.Fprintf(w, "no backups of VM %s to copy from %s\n", sel.VM, s.From)
				case s.BackupsCopied == 0 && s.BackupsSkipped == 0:
					fmt.Fprintf(w, "no backups to copy from %s\n", s.From)
				case s.BackupsCopied == 0:
					fmt.Fprintf(w, "nothing to copy: %s already holds the %s selected\n", s.To, plural(s.BackupsSkipped, "backup"))
				default:
					fmt.Fprintf(w, "%s copied to %s, %d already there; %d chunks sent (%s) in %s\n",
						plural(s.BackupsCopied, "backup"), s.To, s.BackupsSkipped, s.ChunksSent, progress.Bytes(s.BytesSent), progress.Duration(s.DurationS))
				}
			})
			if len(damaged) > 0 {
				return errorf(errs.ErrCorrupt, "source backups %s cannot be read and were not copied: run 'vmshadow verify' on the source", strings.Join(damaged, ", "))
			}
			return nil
		},
	}
	from.registerEnd(cmd, "from", "", "VMSHADOW_PASSWORD", "source")
	to.registerEnd(cmd, "to", "to-", "VMSHADOW_TO_PASSWORD", "target")
	cmd.Flags().StringVar(&sel.VM, "vm", "", "copy only backups of this VM")
	return cmd
}

// plural is "1 backup", "2 backups".
func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}
