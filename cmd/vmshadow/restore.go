package main

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/restore"
)

func init() { commands = append(commands, newRestoreCmd) }

func newRestoreCmd(a *app) *cobra.Command {
	var f repoFlags
	var disks []string
	var to, format string
	cmd := &cobra.Command{
		Use:   "restore --repo DIR BACKUP_ID [--disk NAME] --to PATH [--format raw|qcow2]",
		Short: "Restore the disks of a backup to image files or block devices",
		Long: `Restore disks of a backup. BACKUP_ID may be any unambiguous prefix.

With one disk (the backup has one, or --disk names one) --to is the output
file or block device. With several disks --to is a directory, created if
needed, and each disk goes to DIR/NAME.raw (or NAME.qcow2).

Raw files are sparse where the disk was zero. Every chunk is checked
against its hash while restoring; a failed restore removes the file it
created. Existing files are never overwritten.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			start := time.Now()
			r, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			ctx, unlock, err := lock(ctx, a, r, false, "restore")
			if err != nil {
				return err
			}
			defer unlock()
			id, err := r.FindBackup(ctx, args[0])
			if err != nil {
				return err
			}
			m, err := r.LoadManifest(ctx, id)
			if err != nil {
				return err
			}
			targets, err := restore.Plan(m, disks, to, format)
			if err != nil {
				return err
			}
			var total int64
			for _, t := range targets {
				total += t.Disk.Size
			}
			meter := progress.NewMeter(total)
			stop := showProgress(ctx, a, "restore", meter)
			res, err := restore.Run(ctx, r, targets, format, restore.Options{Meter: meter})
			stop()
			if err != nil {
				return err
			}
			s := struct {
				BackupID     string               `json:"backup_id"`
				VM           string               `json:"vm"`
				Format       string               `json:"format"`
				Disks        []restore.DiskResult `json:"disks"`
				BytesWritten int64                `json:"bytes_written"`
				DurationS    float64              `json:"duration_s"`
			}{BackupID: id.String(), VM: m.VM, Format: format, Disks: res, DurationS: time.Since(start).Seconds()}
			for _, d := range res {
				s.BytesWritten += d.BytesWritten
			}
			a.out.Summary(s, func(w io.Writer) {
				for _, d := range res {
					fmt.Fprintf(w, "restored disk %s (%s) of backup %s to %s, verified\n", d.Name, progress.Bytes(d.Size), id.Short(), d.Path)
				}
			})
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringArrayVar(&disks, "disk", nil, "restore only this disk; repeat for several (default: all)")
	cmd.Flags().StringVar(&to, "to", "", "output file (one disk) or directory (several disks) (required)")
	cmd.Flags().StringVar(&format, "format", "raw", "output format: raw or qcow2")
	cmd.MarkFlagRequired("to")
	return cmd
}
