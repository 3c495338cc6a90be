package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
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
	// Group is the consistency group the backup is a member of
	// (repo.Manifest.Group); GroupBackup the group backup (record) that
	// lists it, absent when none does (its record was never written).
	Group       string `json:"group,omitempty"`
	GroupBackup string `json:"group_backup,omitempty"`
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
	var vm, group string
	var groups bool
	cmd := &cobra.Command{
		Use:   "backups --repo DIR [--vm NAME | --group NAME | --groups]",
		Short: "List the backups in a repository, oldest first",
		Long: `List the backups in a repository, oldest first, with --vm only those of one VM.
A backup that is a member of a group backup shows its group.

--group NAME lists the group backups of consistency group NAME instead (one
snapshot set across several VMs, one member backup per VM): one line each,
with its ID, time, consistency, freeze window and members; --groups lists
those of every group.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if cmd.Flags().Changed("group") {
				if err := repo.ValidName("group", group); err != nil {
					return err
				}
			}
			gr := cmd.Flags().Changed("group") || groups
			if gr && vm != "" {
				return errorf(errs.ErrUsage, "--vm lists one VM's backups, --group and --groups list group backups: give one of them")
			}
			if cmd.Flags().Changed("group") && groups {
				return errorf(errs.ErrUsage, "--group NAME lists one group's group backups, --groups every group's: give one of them")
			}
			r, ctx, done, err := f.openLocked(ctx, a, false, "list")
			if err != nil {
				return err
			}
			defer done()
			if gr {
				return listGroups(ctx, a, r, group)
			}
			glist, badGroups, err := r.ScanGroups(ctx)
			if err != nil {
				return err
			}
			for id, err := range badGroups {
				a.out.Warn("group record %s cannot be read: %v (run 'vmshadow verify')", id.Short(), err)
			}
			groupOf := map[string]string{}
			for _, g := range glist {
				for _, mb := range g.Members {
					groupOf[mb.Backup] = g.ID.String()
				}
			}
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
					Definition: b.Definition, Files: fileEntries(b.Manifest), Group: b.Group, GroupBackup: groupOf[b.ID.String()]}
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
				fmt.Fprintf(w, "%-8s  %-20s  %-16s  %-11s  %-30s  %-18s  %-16s  %s\n", "ID", "TIME", "VM", "MODE", "DISKS", "HEALTH", "GROUP", "TAGS")
				for _, e := range out.Backups {
					var ds []string
					for _, d := range e.Disks {
						ds = append(ds, d.Name+":"+progress.Bytes(d.Size))
					}
					health := "-"
					if h := e.Health; h != nil {
						health = h.Result + " " + h.Time.Local().Format("01-02 15:04")
					}
					grp := "-"
					if e.Group != "" {
						grp = e.Group
					}
					fmt.Fprintf(w, "%-8s  %-20s  %-16s  %-11s  %-30s  %-18s  %-16s  %s\n", e.ShortID, e.Time.Local().Format("2006-01-02 15:04:05"), e.VM, e.Mode, strings.Join(ds, ","), health, grp, strings.Join(e.Tags, ","))
				}
				fmt.Fprintf(w, "%d backups\n", len(out.Backups))
			})
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&vm, "vm", "", "list only the backups of this VM")
	cmd.Flags().StringVar(&group, "group", "", "list the group backups of this consistency group")
	cmd.Flags().BoolVar(&groups, "groups", false, "list the group backups of every consistency group")
	return cmd
}

// groupEntry is one group backup in 'backups --group': the record's
// fields, its ID, and each member's backup with its short ID (Members
// replaces the record's own).
type groupEntry struct {
	ID      string `json:"id"`
	ShortID string `json:"short_id"`
	*repo.Group
	Members []groupMember `json:"members"`
}

type groupMember struct {
	VM      string `json:"vm"`
	Backup  string `json:"backup"`
	ShortID string `json:"short_id"`
	// Missing: the member's backup does not exist (verify reports the
	// group backup as incomplete).
	Missing bool `json:"missing,omitempty"`
}

// listGroups lists the group backups of group name ("": of every group).
func listGroups(ctx context.Context, a *app, r *repo.Repo, name string) error {
	list, bad, err := r.ScanGroups(ctx)
	if err != nil {
		return err
	}
	ids, err := r.BackupIDs(ctx)
	if err != nil {
		return err
	}
	exist := map[string]bool{}
	for _, id := range ids {
		exist[id.String()] = true
	}
	out := struct {
		Groups     []groupEntry `json:"groups"`
		Unreadable []unreadable `json:"unreadable,omitempty"`
	}{Groups: []groupEntry{}}
	for _, g := range list {
		if name != "" && g.Name != name {
			continue
		}
		e := groupEntry{ID: g.ID.String(), ShortID: g.ID.Short(), Group: g.Group}
		for _, mb := range g.Members {
			e.Members = append(e.Members, groupMember{VM: mb.VM, Backup: mb.Backup, ShortID: mb.Backup[:8], Missing: !exist[mb.Backup]})
			if !exist[mb.Backup] {
				a.out.Warn("group backup %s of group %s: member backup %.8s of VM %s is missing (run 'vmshadow verify')", g.ID.Short(), g.Name, mb.Backup, mb.VM)
			}
		}
		out.Groups = append(out.Groups, e)
	}
	for id, err := range bad {
		a.out.Warn("group record %s cannot be read: %v", id.Short(), err)
		out.Unreadable = append(out.Unreadable, unreadable{id.String(), err.Error()})
	}
	sort.Slice(out.Unreadable, func(i, j int) bool { return out.Unreadable[i].ID < out.Unreadable[j].ID })
	a.out.Summary(out, func(w io.Writer) {
		fmt.Fprintf(w, "%-8s  %-20s  %-16s  %-11s  %-9s  %s\n", "ID", "TIME", "GROUP", "CONSISTENCY", "FREEZE", "MEMBERS")
		for _, e := range out.Groups {
			var ms []string
			for _, m := range e.Members {
				s := m.VM + ":" + m.ShortID
				if m.Missing {
					s += "(missing)"
				}
				ms = append(ms, s)
			}
			fmt.Fprintf(w, "%-8s  %-20s  %-16s  %-11s  %-9s  %s\n", e.ShortID, e.Time.Local().Format("2006-01-02 15:04:05"), e.Name,
				cmp.Or(e.Consistency, "-"), fmt.Sprintf("%d ms", e.FreezeMS), strings.Join(ms, ","))
		}
		fmt.Fprintf(w, "%d group backups\n", len(out.Groups))
	})
	return nil
}
