package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

func init() { commands = append(commands, newBackupsCmd) }

type backupEntry struct {
	ID        string      `json:"id"`
	ShortID   string      `json:"short_id"`
	VM        string      `json:"vm"`
	Time      time.Time   `json:"time"`
	Host      string      `json:"host,omitempty"`
	Tags      []string    `json:"tags"`
	Source    string      `json:"source"`
	Mode      string      `json:"mode"`
	Disks     []diskEntry `json:"disks"`
	BytesNew  int64       `json:"bytes_new"`
	DurationS float64     `json:"duration_s"`
	Origin    string      `json:"origin,omitempty"` // a copy's original (vmshadow copy)
	// Definition says the backup stores the VM's definition ("libvirt"),
	// Files are what it stores besides the disks.
	Definition string      `json:"definition,omitempty"`
	Files      []diskEntry `json:"files,omitempty"`
	// Health is the latest health check's result (vmshadow healthcheck);
	// absent when the backup was never checked.
	Health *healthEntry `json:"health,omitempty"`
}

// fileEntries lists a backup's files (repo.Manifest.Files).
func fileEntries(m *repo.Manifest) []diskEntry {
	var out []diskEntry
	for _, f := range m.Files {
		out = append(out, diskEntry{f.Name, f.Size})
	}
	return out
}

type diskEntry struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

type unreadable struct {
	ID    string `json:"id"`
	Error string `json:"error"`
}

func newBackupsCmd(a *app) *cobra.Command {
	var f repoFlags
	var vm string
	cmd := &cobra.Command{
		Use:   "backups --repo DIR [--vm NAME]",
		Short: "List the backups in a repository, oldest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, ctx, done, err := f.openLocked(ctx, a, false, "list")
			if err != nil {
				return err
			}
			defer done()
			list, bad, err := r.ListBackups(ctx)
			if err != nil {
				return err
			}
			health, badHealth, err := r.HealthRecords(ctx)
			if err != nil {
				return err
			}
			for _, err := range badHealth {
				a.out.Warn("%v (run 'vmshadow healthcheck' again to replace it)", err)
			}
			out := struct {
				Backups    []backupEntry `json:"backups"`
				Unreadable []unreadable  `json:"unreadable,omitempty"`
			}{Backups: []backupEntry{}}
			for _, b := range list {
				if vm != "" && b.VM != vm {
					continue
				}
				e := backupEntry{ID: b.ID.String(), ShortID: b.ID.Short(), VM: b.VM, Time: b.Time, Host: b.Host, Tags: b.Tags,
					Source: b.Source, Mode: b.Mode, BytesNew: b.Stats.BytesNew, DurationS: b.DurationS, Origin: b.Origin,
					Definition: b.Definition, Files: fileEntries(b.Manifest)}
				if e.Tags == nil {
					e.Tags = []string{}
				}
				for _, d := range b.Disks {
					e.Disks = append(e.Disks, diskEntry{d.Name, d.Size})
				}
				e.Health = newHealthEntry(health[b.ID])
				out.Backups = append(out.Backups, e)
			}
			for id, err := range bad {
				a.out.Warn("backup %s cannot be read: %v", id.Short(), err)
				out.Unreadable = append(out.Unreadable, unreadable{id.String(), err.Error()})
			}
			sort.Slice(out.Unreadable, func(i, j int) bool { return out.Unreadable[i].ID < out.Unreadable[j].ID })
			a.out.Summary(out, func(w io.Writer) {
				fmt.Fprintf(w, "%-8s  %-20s  %-16s  %-11s  %-30s  %-18s  %s\n", "ID", "TIME", "VM", "MODE", "DISKS", "HEALTH", "TAGS")
				for _, e := range out.Backups {
					var ds []string
					for _, d := range e.Disks {
						ds = append(ds, d.Name+":"+progress.Bytes(d.Size))
					}
					health := "-"
					if h := e.Health; h != nil {
						health = h.Result + " " + h.Time.Local().Format("01-02 15:04")
					}
					fmt.Fprintf(w, "%-8s  %-20s  %-16s  %-11s  %-30s  %-18s  %s\n", e.ShortID, e.Time.Local().Format("2006-01-02 15:04:05"), e.VM, e.Mode, strings.Join(ds, ","), health, strings.Join(e.Tags, ","))
				}
				fmt.Fprintf(w, "%d backups\n", len(out.Backups))
			})
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&vm, "vm", "", "list only the backups of this VM")
	return cmd
}
