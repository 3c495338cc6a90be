// Package vmbackup owns one backup of a running VM as a unit of work, the
// same for the CLI (vmshadow backup --qmp|--xapi|--libvirt) and the
// server's backup jobs: under a shared repository lock, the live backup
// (livebackup.Start: the VM locked, its snapshot set taken; the backup
// pipeline; Finish: change tracking moved on or merged back, the set
// released), and, after a failure, the chunks it stored removed under
// the exclusive lock (backup.Reclaim). The repository stays open and
// unlocked between calls, so a server pays the key derivation once.
package vmbackup

import (
	"context"
	"fmt"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/livebackup"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// Options of one VM backup.
type Options struct {
	// Live says which VM (its Coordinator) and how (tags, --full, NBD
	// connections).
	Live livebackup.Options
	// Member, if set, is told the name in the repository of the VM whose
	// backup starts (each member of a group in turn), before its Plan.
	Member func(vm string)
	// Plan, if set, is told how each disk will be read, before reading.
	Plan func(livebackup.DiskPlan)
	// Progress, if set, gets the meter of the read (its total the disks'
	// size) and returns the function that stops reporting it.
	Progress func(m *progress.Meter) (stop func())
	// Warn gets what the caller should tell the operator: a set that
	// could not be released after the backup was stored, the chunks of a
	// failed backup removed or left.
	Warn func(format string, args ...any)
}

// Result is a stored backup and what the live backup knew of it: each
// disk's plan, the set's consistency, freeze time and instant.
type Result struct {
	*backup.Result
	Live *livebackup.Backup
}

// Run backs up the VM of o.Live.Coordinator into r. On error no backup
// exists, the VM's change tracking is where the last stored backup left
// it, and the chunks the failed backup stored are removed when nothing
// else holds the repository.
func Run(ctx context.Context, r *repo.Repo, o Options) (*Result, error) {
	res, err := RunGroup(ctx, r, "", []livebackup.Options{o.Live}, o)
	if err != nil {
		return nil, err
	}
	return res.Members[0], nil
}

// GroupResult is what RunGroup stored: each member's backup and, for a
// named group, the group record.
type GroupResult struct {
	Members []*Result
	// ID and Group are the group record (zero and nil without a name).
	ID    repo.ID
	Group *repo.Group
}

// RunGroup backs up the VMs of members at one instant: one snapshot set
// across all of them named group (livebackup.StartGroup), then each VM's
// backup in turn, each into its own chain, its set released as soon as
// it is stored, and last the group record naming them all (a named
// group only). o's Plan, Progress and Warn apply to each member (o.Live
// is not used). It returns the backups stored, in the order of members;
// with an error, those stored before the failure stay as ordinary
// backups (their change tracking moved on to them; without the group
// record they are no group backup) and the failed member's chunks are
// reclaimed as for Run.
func RunGroup(ctx context.Context, r *repo.Repo, group string, members []livebackup.Options, o Options) (*GroupResult, error) {
	warn := o.Warn
	if warn == nil {
		warn = func(string, ...any) {}
	}
	l, lctx, err := r.Lock(ctx, false, "backup")
	if err != nil {
		return nil, err
	}
	unlock := func() {
		if err := l.Unlock(); err != nil {
			warn("could not remove the repository lock (it becomes stale by itself): %v", err)
		}
	}
	res, err := runGroup(lctx, r, group, members, o, warn)
	unlock()
	if err != nil {
		return res, backup.Reclaim(ctx, r, err, warn)
	}
	return res, nil
}

func runGroup(ctx context.Context, r *repo.Repo, group string, members []livebackup.Options, o Options, warn func(string, ...any)) (*GroupResult, error) {
	lbs, err := livebackup.StartGroup(ctx, r, group, members)
	if err != nil {
		return nil, err
	}
	res := &GroupResult{}
	for i, lb := range lbs {
		m, err := store(ctx, r, lb, o, warn)
		if err != nil {
			for _, rest := range lbs[i+1:] {
				// Release the others' sets, merging change tracking back.
				if ferr := rest.Finish(ctx, false); ferr != nil {
					warn("VM %s: %v; the next backup or 'vmshadow recover' releases it", rest.Job.VM, ferr)
				}
			}
			if len(lbs) > 1 {
				err = fmt.Errorf("VM %s: %w", lb.Job.VM, err)
			}
			return res, err
		}
		res.Members = append(res.Members, m)
	}
	if group == "" {
		return res, nil
	}
	set := lbs[0].Set
	g := &repo.Group{Name: group, SetID: set.Group.SetID, Time: set.Created, FreezeMS: set.FreezeMS, Consistency: set.Group.Consistency.String()}
	for _, m := range res.Members {
		g.Members = append(g.Members, repo.GroupMember{VM: m.Manifest.VM, Backup: m.ID.String()})
	}
	if res.ID, err = r.SaveGroup(ctx, g); err != nil {
		return res, fmt.Errorf("store the record of group %s (its members' backups are stored, as ordinary backups): %w", group, err)
	}
	res.Group = g
	return res, nil
}

// store runs the backup pipeline of one started live backup and finishes
// it.
func store(ctx context.Context, r *repo.Repo, lb *livebackup.Backup, o Options, warn func(string, ...any)) (*Result, error) {
	if o.Member != nil {
		o.Member(lb.Job.VM)
	}
	if o.Plan != nil {
		for _, d := range lb.Disks {
			o.Plan(d)
		}
	}
	var total int64
	for _, d := range lb.Job.Disks {
		total += d.Source.Size()
	}
	meter := progress.NewMeter(total)
	stop := func() {}
	if o.Progress != nil {
		stop = o.Progress(meter)
	}
	res, err := backup.Run(ctx, r, lb.Job, backup.Options{Meter: meter, Storing: lb.Storing})
	stop()
	if ferr := lb.Finish(ctx, err == nil); ferr != nil {
		if err != nil {
			return nil, fmt.Errorf("%w; %v", err, ferr)
		}
		warn("the backup is stored, but %v; the next backup or 'vmshadow recover' releases it", ferr)
	}
	if err != nil {
		return nil, err
	}
	return &Result{Result: res, Live: lb}, nil
}
