package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

func init() { commands = append(commands, newBackupCmd) }

// backupFlags are the flags of the backup command. Each kind of source
// (disk image files now, a running VM through --qmp later) turns them into
// a backup.Job in its own function; runBackup does the rest.
type backupFlags struct {
	repo  repoFlags
	vm    string
	disks []string // NAME=IMAGE
	tags  []string
}

func newBackupCmd(a *app) *cobra.Command {
	var f backupFlags
	cmd := &cobra.Command{
		Use:   "backup --repo DIR --vm NAME --disk NAME=IMAGE.raw [--disk ...] [--tag T]",
		Short: "Back up disk images into a repository",
		Long: `Back up the raw disk images of a VM (shut down, or any image) into the
repository. Unallocated ranges of the images are not read; chunks already in
the repository are not stored again. The summary lists what was read and
stored per disk.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			job, cleanup, err := imageJob(&f)
			if err != nil {
				return err
			}
			defer cleanup()
			return runBackup(cmd.Context(), a, &f, job)
		},
	}
	f.repo.register(cmd)
	cmd.Flags().StringVar(&f.vm, "vm", "", "name of the VM the disks belong to (required)")
	cmd.Flags().StringArrayVar(&f.disks, "disk", nil, "disk to back up as NAME=IMAGE (raw image file or block device); repeat for several")
	cmd.Flags().StringArrayVar(&f.tags, "tag", nil, "tag to attach to the backup; repeat for several")
	return cmd
}

// imageJob builds the job of an image-file backup.
func imageJob(f *backupFlags) (backup.Job, func(), error) {
	if f.vm == "" {
		return backup.Job{}, nil, errorf(errs.ErrUsage, "--vm is required")
	}
	if len(f.disks) == 0 {
		return backup.Job{}, nil, errorf(errs.ErrUsage, "give at least one --disk NAME=IMAGE")
	}
	job := backup.Job{VM: f.vm, Tags: f.tags, Source: "image", Mode: "full"}
	var images []*imagefile.Image
	cleanup := func() {
		for _, im := range images {
			im.Close()
		}
	}
	for _, d := range f.disks {
		name, path, ok := strings.Cut(d, "=")
		if !ok || name == "" || path == "" {
			cleanup()
			return backup.Job{}, nil, errorf(errs.ErrUsage, "--disk %q: want NAME=IMAGE", d)
		}
		if err := repo.ValidName("disk", name); err != nil {
			cleanup()
			return backup.Job{}, nil, err
		}
		im, err := imagefile.Open(name, path)
		if err != nil {
			cleanup()
			return backup.Job{}, nil, fmt.Errorf("disk %s: %w", name, err)
		}
		images = append(images, im)
		job.Disks = append(job.Disks, backup.Disk{Source: im})
	}
	return job, cleanup, nil
}

// backupSummary is the JSON summary of a backup; field names are a contract.
type backupSummary struct {
	BackupID     string        `json:"backup_id"`
	ShortID      string        `json:"short_id"`
	VM           string        `json:"vm"`
	Time         time.Time     `json:"time"`
	Tags         []string      `json:"tags"`
	Source       string        `json:"source"`
	Mode         string        `json:"mode"`
	Reason       string        `json:"reason,omitempty"`
	Consistency  string        `json:"consistency,omitempty"`
	SetID        string        `json:"set_id,omitempty"`
	Disks        []diskSummary `json:"disks"`
	BytesRead    int64         `json:"bytes_read"`
	BytesNew     int64         `json:"bytes_new"`
	ChunksNew    int64         `json:"chunks_new"`
	ChunksReused int64         `json:"chunks_reused"`
	ChunksZero   int64         `json:"chunks_zero"`
	DurationS    float64       `json:"duration_s"`
	Rate         float64       `json:"rate_bytes_per_s"` // disk bytes processed per second
}

type diskSummary struct {
	Name         string `json:"name"`
	Size         int64  `json:"size"`
	BytesRead    int64  `json:"bytes_read"`
	BytesNew     int64  `json:"bytes_new"`
	ChunksNew    int64  `json:"chunks_new"`
	ChunksReused int64  `json:"chunks_reused"`
	ChunksZero   int64  `json:"chunks_zero"`
	Index        string `json:"index"`
	Checkpoint   string `json:"checkpoint,omitempty"`
}

// runBackup opens the repository, runs the job under a shared lock with
// progress, and prints the summary.
func runBackup(ctx context.Context, a *app, f *backupFlags, job backup.Job) error {
	r, err := f.repo.open(ctx)
	if err != nil {
		return err
	}
	defer r.Close()
	ctx, unlock, err := lock(ctx, a, r, false, "backup")
	if err != nil {
		return err
	}
	defer unlock()
	var total int64
	for _, d := range job.Disks {
		total += d.Source.Size()
	}
	meter := progress.NewMeter(total)
	stop := showProgress(ctx, a, "backup", meter)
	res, err := backup.Run(ctx, r, job, backup.Options{Meter: meter})
	stop()
	if err != nil {
		return err
	}
	m := res.Manifest
	s := backupSummary{BackupID: res.ID.String(), ShortID: res.ID.Short(), VM: m.VM, Time: m.Time, Tags: m.Tags,
		Source: m.Source, Mode: m.Mode, Reason: m.Reason, Consistency: m.Consistency, SetID: m.SetID,
		BytesRead: res.Stats.BytesRead, BytesNew: res.Stats.BytesNew, ChunksNew: res.Stats.ChunksNew,
		ChunksReused: res.Stats.ChunksReused, ChunksZero: res.Stats.ChunksZero, DurationS: res.Duration.Seconds()}
	if s.Tags == nil {
		s.Tags = []string{}
	}
	if s.DurationS > 0 {
		s.Rate = float64(total) / s.DurationS
	}
	for i, d := range res.Disks {
		s.Disks = append(s.Disks, diskSummary{Name: d.Name, Size: d.Size, BytesRead: d.Stats.BytesRead, BytesNew: d.Stats.BytesNew,
			ChunksNew: d.Stats.ChunksNew, ChunksReused: d.Stats.ChunksReused, ChunksZero: d.Stats.ChunksZero,
			Index: d.Index.String(), Checkpoint: m.Disks[i].Checkpoint})
	}
	a.out.Summary(s, func(w io.Writer) {
		fmt.Fprintf(w, "backup %s of %s done in %s (%s/s)\n", s.ShortID, s.VM, progress.Duration(s.DurationS), progress.Bytes(int64(s.Rate)))
		for _, d := range s.Disks {
			fmt.Fprintf(w, "  %-12s %10s  read %10s  stored %10s  chunks: %d new, %d reused, %d zero\n",
				d.Name, progress.Bytes(d.Size), progress.Bytes(d.BytesRead), progress.Bytes(d.BytesNew), d.ChunksNew, d.ChunksReused, d.ChunksZero)
		}
	})
	return nil
}
