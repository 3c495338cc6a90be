package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
)

func init() { commands = append(commands, newPruneCmd) }

// maxKeep bounds the --keep-* counts (-1 is no limit).
const maxKeep = 1000000

func newPruneCmd(a *app) *cobra.Command {
	var f repoFlags
	var o repo.PruneOptions
	p := &o.Policy
	cmd := &cobra.Command{
		Use:   "prune --repo DIR [--vm NAME] [--group NAME] --keep-last N --keep-hourly N --keep-daily N --keep-weekly N --keep-monthly N --keep-yearly N [--dry-run]",
		Short: "Remove backups that the keep policy does not keep",
		Long: `Apply the keep policy to each VM's backups separately (restic semantics):
--keep-last N keeps the N newest; --keep-hourly/daily/weekly/monthly/yearly N
keep the newest backup of each of the N most recent hours, days, ISO weeks,
months or years that have backups. Rules add up; -1 means no limit. Time
buckets use the local time zone. With --dry-run nothing is removed and every
backup is listed with keep or remove and the reasons.

Group backups (one snapshot set across several VMs, see 'backups --groups')
are kept or removed whole: the same rules apply to each group's group
backups separately, and a member backup is not subject to its VM's rules.
Removing a group backup removes its record and every member's backup.
--vm NAME prunes only that VM's backups outside groups, --group NAME only
that group's group backups; with neither, every VM and every group.

prune removes manifests only; 'vmshadow gc' then frees the chunks that no
remaining backup uses.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			if p.Empty() {
				return errorf(errs.ErrUsage, "no keep policy given: prune would remove every backup; give at least one --keep-* option")
			}
			ctx, unlock, err := lock(ctx, a, r, true, "prune")
			if err != nil {
				return err
			}
			defer unlock()
			ds, err := r.Prune(ctx, o)
			if err != nil {
				return err
			}
			out := struct {
				DryRun  bool `json:"dry_run"`
				Kept    int  `json:"kept"`    // backups, members of group backups included
				Removed int  `json:"removed"` // backups, members of group backups included
				// GroupsKept and GroupsRemoved count group backups.
				GroupsKept    int                  `json:"groups_kept"`
				GroupsRemoved int                  `json:"groups_removed"`
				Backups       []repo.PruneDecision `json:"backups"`
			}{DryRun: o.DryRun, Backups: ds}
			if out.Backups == nil {
				out.Backups = []repo.PruneDecision{}
			}
			for _, d := range ds {
				n := 1
				if d.Group != "" {
					n = len(d.Members)
					if d.Keep {
						out.GroupsKept++
					} else {
						out.GroupsRemoved++
					}
				}
				if d.Keep {
					out.Kept += n
				} else {
					out.Removed += n
				}
			}
			a.out.Summary(out, func(w io.Writer) {
				verb := "removed"
				if o.DryRun {
					verb = "would remove"
				}
				for _, d := range ds {
					act := "keep  "
					if !d.Keep {
						act = "remove"
					}
					who := d.VM
					if d.Group != "" {
						who = "group " + d.Group
					}
					fmt.Fprintf(w, "%s %s  %-16s %s  %s\n", act, d.ID[:8], who, d.Time.Local().Format("2006-01-02 15:04:05"), strings.Join(d.Reasons, ", "))
					if d.Group != "" {
						var ms []string
						for _, m := range d.Members {
							ms = append(ms, m.VM+":"+m.Backup[:8])
						}
						fmt.Fprintf(w, "%17s members %s\n", "", strings.Join(ms, ","))
					}
				}
				fmt.Fprintf(w, "kept %d, %s %d backups\n", out.Kept, verb, out.Removed)
				if out.GroupsKept+out.GroupsRemoved > 0 {
					fmt.Fprintf(w, "of which group backups: kept %d, %s %d (with their members)\n", out.GroupsKept, verb, out.GroupsRemoved)
				}
			})
			return nil
		},
	}
	f.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&o.VM, "vm", "", "prune only this VM's backups (those outside group backups)")
	fl.StringVar(&o.Group, "group", "", "prune only this group's group backups (each kept or removed whole)")
	intFlag(fl, &p.Last, "keep-last", 0, -1, maxKeep, "keep the N newest backups")
	intFlag(fl, &p.Hourly, "keep-hourly", 0, -1, maxKeep, "keep the newest backup of each of the last N hours with backups")
	intFlag(fl, &p.Daily, "keep-daily", 0, -1, maxKeep, "keep the newest backup of each of the last N days with backups")
	intFlag(fl, &p.Weekly, "keep-weekly", 0, -1, maxKeep, "keep the newest backup of each of the last N ISO weeks with backups")
	intFlag(fl, &p.Monthly, "keep-monthly", 0, -1, maxKeep, "keep the newest backup of each of the last N months with backups")
	intFlag(fl, &p.Yearly, "keep-yearly", 0, -1, maxKeep, "keep the newest backup of each of the last N years with backups")
	fl.BoolVar(&o.DryRun, "dry-run", false, "only show what would be kept and removed, and why")
	return cmd
}
