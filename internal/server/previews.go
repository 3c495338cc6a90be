package server

import (
	"context"
	"fmt"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/retention"
	"github.com/vmshadow/vmshadow/internal/schedule"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// What the web interface's repository page and job form read: a
// repository's usage history and verifies, and the dry runs of
// retention, gc and schedules. Nothing here changes a repository.

// knownRepository is ErrNotFound unless the configuration has the
// repository.
func (s *Server) knownRepository(name string) error {
	if s.Config().Repositories[name] == nil {
		return fmt.Errorf("no repository %q in the configuration (list them with GET %s/repositories): %w", name, api.Prefix, errs.ErrNotFound)
	}
	return nil
}

// UsageHistory implements api.Service.
func (s *Server) UsageHistory(ctx context.Context, repository string, since time.Time) ([]state.Usage, error) {
	if err := s.knownRepository(repository); err != nil {
		return nil, err
	}
	return s.db.UsageHistory(ctx, repository, since)
}

// maxFindings bounds the findings shown with each verify.
const maxFindings = 20

// Verifies implements api.Service.
func (s *Server) Verifies(ctx context.Context, f state.VerifyFilter) ([]api.VerifyRun, error) {
	if err := s.knownRepository(f.Repository); err != nil {
		return nil, err
	}
	vs, err := s.db.Verifies(ctx, f)
	if err != nil {
		return nil, err
	}
	out := make([]api.VerifyRun, 0, len(vs))
	for _, v := range vs {
		vr := api.VerifyRun{ID: v.ID, Run: v.Run, Time: v.Time, Backups: v.Backups, Chunks: v.Chunks, Problems: v.Problems, Findings: []state.LogLine{}}
		if v.Run != 0 {
			if vr.Findings, vr.FindingsTotal, err = s.db.LogLinesAt(ctx, v.Run, "error", maxFindings); err != nil {
				return nil, err
			}
		}
		out = append(out, vr)
	}
	return out, nil
}

// readLocked runs f on the open repository name under a shared lock
// (waiting up to a minute while an exclusive one is held).
func (s *Server) readLocked(ctx context.Context, name, op string, f func(context.Context, *repo.Repo) error) error {
	r, release, err := s.repository(ctx, name)
	if err != nil {
		return err
	}
	defer release()
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		l, lctx, err := r.Lock(wctx, false, op)
		if err == nil {
			defer l.Unlock()
			return f(lctx, r)
		}
		if !errorsIsBusy(err) {
			return err
		}
		select {
		case <-wctx.Done():
			return err
		case <-time.After(lockWait):
		}
	}
}

// prunePreview is prune's dry run (repo.Prune with DryRun) for each of
// vms (every VM when empty).
func (s *Server) prunePreview(ctx context.Context, repository string, vms []string, p retention.Policy) (*api.PrunePreview, error) {
	if err := s.knownRepository(repository); err != nil {
		return nil, err
	}
	out := &api.PrunePreview{Repository: repository, VMs: vms, Backups: []api.PruneDecision{},
		Policy: api.RetentionPolicy{Last: p.Last, Hourly: p.Hourly, Daily: p.Daily, Weekly: p.Weekly, Monthly: p.Monthly, Yearly: p.Yearly}}
	err := s.readLocked(ctx, repository, "prune-preview", func(ctx context.Context, r *repo.Repo) error {
		each := vms
		if len(each) == 0 {
			each = []string{""}
		}
		for _, vm := range each {
			ds, err := r.Prune(ctx, repo.PruneOptions{VM: vm, Policy: p, DryRun: true})
			if err != nil {
				return err
			}
			for _, d := range ds {
				out.Backups = append(out.Backups, api.PruneDecision{ID: d.ID, ShortID: d.ID[:min(8, len(d.ID))], VM: d.VM, Time: d.Time, Keep: d.Keep, Reasons: d.Reasons})
				if d.Keep {
					out.Kept++
				} else {
					out.Removed++
				}
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// PrunePreview implements api.Service: the buckets in the configuration's
// time zone.
func (s *Server) PrunePreview(ctx context.Context, repository string, vms []string, policy api.RetentionPolicy) (*api.PrunePreview, error) {
	p := retention.Policy{Last: policy.Last, Hourly: policy.Hourly, Daily: policy.Daily, Weekly: policy.Weekly,
		Monthly: policy.Monthly, Yearly: policy.Yearly, Location: s.Config().Timezone}
	if p.Empty() {
		return nil, fmt.Errorf("the retention keeps nothing: give at least one keep_* rule: %w", errs.ErrUsage)
	}
	return s.prunePreview(ctx, repository, vms, p)
}

// JobPrunePreview implements api.Service.
func (s *Server) JobPrunePreview(ctx context.Context, name string) (*api.PrunePreview, error) {
	j, _, err := s.job(name)
	if err != nil {
		return nil, err
	}
	var vms []string
	switch {
	case j.Type == config.Prune:
	case j.Type == config.Backup && !j.Retention.Empty():
		lctx, cancel := context.WithTimeout(ctx, listTimeout)
		refs, _ := s.selectVMs(lctx, s.Config(), j)
		cancel()
		if len(refs) == 0 {
			return nil, fmt.Errorf("job %s selects no VM now: its retention has nothing to decide: %w", name, errs.ErrUsage)
		}
		for _, r := range refs {
			vms = append(vms, r.Name)
		}
	default:
		return nil, fmt.Errorf("job %s (%s) has no retention: only backup jobs with a retention and prune jobs remove backups: %w", name, j.Type, errs.ErrUsage)
	}
	p, err := s.prunePreview(ctx, j.Repository, vms, j.Retention)
	if err != nil {
		return nil, err
	}
	p.Job = name
	return p, nil
}

// GCPreview implements api.Service: gc's dry run under a shared lock,
// with the grace of the repository's gc job.
func (s *Server) GCPreview(ctx context.Context, repository string) (*api.GCPreview, error) {
	if err := s.knownRepository(repository); err != nil {
		return nil, err
	}
	grace := repo.DefaultGrace
	for _, j := range s.jobList() {
		if j.Type == config.GC && j.Repository == repository {
			grace = j.Grace
			break
		}
	}
	var res *repo.GCResult
	err := s.readLocked(ctx, repository, "gc-preview", func(ctx context.Context, r *repo.Repo) error {
		var err error
		res, err = r.GC(ctx, repo.GCOptions{Grace: grace, Immediate: grace == 0, DryRun: true})
		return err
	})
	if err != nil {
		return nil, err
	}
	return &api.GCPreview{Repository: repository, GraceS: grace.Seconds(), Backups: res.Backups, ChunksReferenced: res.ChunksReferenced,
		ChunksDeleted: res.ChunksDeleted, IndexesDeleted: res.IndexesDeleted, BytesDeleted: res.BytesDeleted,
		ChunksInGrace: res.ChunksInGrace, IndexesInGrace: res.IndexesInGrace}, nil
}

// SelectionPreview implements api.Service: the selectors as a job's,
// matched by the code a run uses.
func (s *Server) SelectionPreview(ctx context.Context, selectors []api.VMSelector) (*api.SelectionPreview, error) {
	j := &config.Job{Type: config.Backup}
	for _, sel := range selectors {
		j.VMs = append(j.VMs, config.VMSelector{Connection: sel.Connection, Names: sel.VMs})
	}
	lctx, cancel := context.WithTimeout(ctx, listTimeout)
	defer cancel()
	refs, problems := s.selectVMs(lctx, s.Config(), j)
	out := &api.SelectionPreview{VMs: []api.SelectedVM{}, Problems: []string{}}
	for _, r := range refs {
		out.VMs = append(out.VMs, api.SelectedVM{Name: r.Name, Connection: r.Conn.Name, UUID: r.UUID})
	}
	for _, p := range problems {
		out.Problems = append(out.Problems, p.Error())
	}
	return out, nil
}

// SchedulePreview implements api.Service: parsed as the configuration
// parses a job's schedule, with the scheduler's code.
func (s *Server) SchedulePreview(ctx context.Context, spec, timezone string, n int) (*api.SchedulePreview, error) {
	loc := s.Config().Timezone
	if timezone != "" {
		l, err := time.LoadLocation(timezone)
		if err != nil || timezone == "Local" {
			return nil, fmt.Errorf("time zone %q: unknown: give an IANA name such as Europe/Berlin, or UTC: %w", timezone, errs.ErrUsage)
		}
		loc = l
	}
	sc, err := schedule.Parse(spec, loc)
	if err != nil {
		return nil, fmt.Errorf("schedule %w: %w", err, errs.ErrUsage)
	}
	out := &api.SchedulePreview{Schedule: sc.String(), Timezone: sc.Location().String(), Next: sc.NextN(time.Now(), n)}
	if out.Next == nil {
		out.Next = []time.Time{}
	}
	return out, nil
}
