package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/redact"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3"
	"github.com/vmshadow/vmshadow/internal/restore"
	"github.com/vmshadow/vmshadow/internal/schedule"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/notify"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

var _ api.Service = (*Server)(nil)

// Authenticate implements api.Service.
func (s *Server) Authenticate(ctx context.Context, secret string) (*state.Token, error) {
	return s.db.Authenticate(ctx, secret, time.Now())
}

// listTimeout bounds listing a connection's VMs for the API.
const listTimeout = 10 * time.Second

// VMs implements api.Service: every VM the connections reach now, those
// the backup jobs select and those with backups, with their protection
// state.
func (s *Server) VMs(ctx context.Context) ([]api.VM, error) {
	cfg := s.Config()
	byName := map[string]*api.VM{}
	get := func(name string) *api.VM {
		v := byName[name]
		if v == nil {
			v = &api.VM{Name: name, Jobs: []string{}}
			byName[name] = v
		}
		return v
	}
	lctx, cancel := context.WithTimeout(ctx, listTimeout)
	defer cancel()
	// Every VM the connections reach, with a job or not: an unprotected VM
	// must show as such. A connection that cannot be listed is logged.
	names := slices.Sorted(maps.Keys(cfg.Connections))
	for _, n := range names {
		refs, err := listConnection(lctx, cfg.Connections[n], nil)
		if err != nil {
			s.log.Warn("VMs of a connection not listed", "connection", n, "err", err)
		}
		for _, r := range refs {
			get(r.Name).Connection = n
		}
	}
	jobs := s.jobList()
	for _, j := range jobs {
		if j.Type != config.Backup {
			continue
		}
		refs, _ := s.selectVMs(lctx, cfg, j)
		for _, r := range refs {
			v := get(r.Name)
			v.Connection = r.Conn.Name
			v.Jobs = append(v.Jobs, j.Name)
		}
	}
	backups, err := s.allBackups(ctx, "")
	if err != nil {
		return nil, err
	}
	for i := range backups {
		b := &backups[i]
		v := get(b.VM)
		if v.LastBackup == nil || b.Time.After(v.LastBackup.Time) {
			v.LastBackup = b
		}
	}
	last, lastOK, err := s.db.LastResults(ctx)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	out := make([]api.VM, 0, len(byName))
	for name, v := range byName {
		if r, ok := last[name]; ok {
			v.Last = &r
		}
		if r, ok := lastOK[name]; ok {
			v.LastSuccess = &r
		}
		if v.LastBackup != nil {
			age := now.Sub(v.LastBackup.Time).Seconds()
			v.AgeS = &age
		}
		v.Status = protection(jobs, v, now)
		out = append(out, *v)
	}
	sort.Slice(out, func(i, k int) bool { return out[i].Name < out[k].Name })
	return out, nil
}

// protection is a VM's state: never (no backup), failed (its last run
// failed), late (a scheduled time of one of its jobs passed more than an
// hour, or the job's time limit, before now without a backup since),
// fresh otherwise.
func protection(jobs []*config.Job, v *api.VM, now time.Time) string {
	if v.LastBackup == nil {
		return "never"
	}
	if v.Last != nil && v.Last.Status == state.Failed {
		return "failed"
	}
	for _, name := range v.Jobs {
		for _, j := range jobs {
			if j.Name != name || j.Schedule == nil {
				continue
			}
			slot := j.Schedule.Next(v.LastBackup.Time)
			grace := max(j.TimeLimit, time.Hour) + j.RandomDelay
			if !slot.IsZero() && now.Sub(slot) > grace {
				return "late"
			}
		}
	}
	return "fresh"
}

// allBackups lists the backups of repository name (every repository
// when name is ""), newest first. A repository that cannot be read is an
// error only when it was named.
func (s *Server) allBackups(ctx context.Context, name string) ([]api.Backup, error) {
	cfg := s.Config()
	var names []string
	if name != "" {
		if cfg.Repositories[name] == nil {
			return nil, fmt.Errorf("no repository %q in the configuration: %w", name, errs.ErrNotFound)
		}
		names = []string{name}
	} else {
		for n := range cfg.Repositories {
			names = append(names, n)
		}
		sort.Strings(names)
	}
	var out []api.Backup
	for _, n := range names {
		r, release, err := s.repository(ctx, n)
		if err != nil {
			if name != "" {
				return nil, err
			}
			s.log.Warn("repository not listed", "repository", n, "err", err)
			continue
		}
		bs, _, err := r.ListBackups(ctx)
		release()
		if err != nil {
			if name != "" {
				return nil, err
			}
			s.log.Warn("repository not listed", "repository", n, "err", err)
			continue
		}
		for _, b := range bs {
			out = append(out, apiBackup(n, b))
		}
	}
	sort.SliceStable(out, func(i, k int) bool { return out[i].Time.After(out[k].Time) })
	return out, nil
}

func apiBackup(repository string, b repo.Backup) api.Backup {
	out := api.Backup{ID: b.ID.String(), ShortID: b.ID.Short(), Repository: repository, VM: b.VM, Time: b.Time, Host: b.Host,
		Tags: b.Tags, Source: b.Source, Mode: b.Mode, Reason: b.Reason, Consistency: b.Consistency, SetID: b.SetID,
		Definition: b.Definition, BytesRead: b.Stats.BytesRead, BytesNew: b.Stats.BytesNew, DurationS: b.DurationS, Origin: b.Origin, Group: b.Group,
		Disks: []api.Disk{}}
	if out.Tags == nil {
		out.Tags = []string{}
	}
	for _, d := range b.Disks {
		out.Disks = append(out.Disks, api.Disk{Name: d.Name, Size: d.Size})
	}
	for _, f := range b.Files {
		out.Files = append(out.Files, api.Disk{Name: f.Name, Size: f.Size})
	}
	return out
}

// VMResults implements api.Service: from the run history (a VM never in
// a run has none).
func (s *Server) VMResults(ctx context.Context, vm string, before int64, limit int) ([]state.VMResult, error) {
	return s.db.VMResults(ctx, vm, before, limit)
}

// Backups implements api.Service.
func (s *Server) Backups(ctx context.Context, f api.BackupFilter) ([]api.Backup, error) {
	all, err := s.allBackups(ctx, f.Repository)
	if err != nil {
		return nil, err
	}
	limit := f.Limit
	if limit <= 0 {
		limit = 100
	}
	out := []api.Backup{}
	for _, b := range all {
		if (f.VM != "" && b.VM != f.VM) || (!f.Before.IsZero() && !b.Time.Before(f.Before)) {
			continue
		}
		if len(out) == limit {
			break
		}
		out = append(out, b)
	}
	if err := s.addResults(ctx, out); err != nil {
		return nil, err
	}
	return out, nil
}

// addResults adds to backups what the server's database knows of them:
// the run that stored each (its freeze time) and their last verification.
func (s *Server) addResults(ctx context.Context, backups []api.Backup) error {
	ids := make([]string, len(backups))
	for i, b := range backups {
		ids[i] = b.ID
	}
	res, err := s.db.BackupResults(ctx, ids)
	if err != nil {
		return err
	}
	verified := map[string]map[string]time.Time{}
	for i := range backups {
		b := &backups[i]
		if r, ok := res[b.ID]; ok {
			b.Run, b.FreezeMS = r.Run, r.FreezeMS
		}
		v, ok := verified[b.Repository]
		if !ok {
			if v, err = s.db.VerifiedSince(ctx, b.Repository, time.Time{}); err != nil {
				return err
			}
			verified[b.Repository] = v
		}
		b.Verified = v[b.ID]
	}
	return nil
}

// findBackup opens repository name and finds backup id (or prefix).
func (s *Server) findBackup(ctx context.Context, name, id string) (*repo.Repo, func(), repo.ID, *repo.Manifest, error) {
	r, release, err := s.repository(ctx, name)
	if err != nil {
		return nil, nil, repo.ID{}, nil, err
	}
	bid, err := r.FindBackup(ctx, id)
	if err == nil {
		var m *repo.Manifest
		if m, err = r.LoadManifest(ctx, bid); err == nil {
			return r, release, bid, m, nil
		}
	}
	release()
	return nil, nil, repo.ID{}, nil, err
}

// Backup implements api.Service.
func (s *Server) Backup(ctx context.Context, repository, id string) (*api.Backup, error) {
	_, release, bid, m, err := s.findBackup(ctx, repository, id)
	if err != nil {
		return nil, err
	}
	release()
	bs := []api.Backup{apiBackup(repository, repo.Backup{ID: bid, Manifest: m})}
	if err := s.addResults(ctx, bs); err != nil {
		return nil, err
	}
	return &bs[0], nil
}

// DeleteBackup implements api.Service: under the exclusive lock (waiting
// up to a minute for running backups).
func (s *Server) DeleteBackup(ctx context.Context, repository, id string) error {
	r, release, bid, _, err := s.findBackup(ctx, repository, id)
	if err != nil {
		return err
	}
	defer release()
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		l, lctx, err := r.Lock(wctx, true, "delete")
		if err == nil {
			defer l.Unlock()
			return r.DeleteBackup(lctx, bid)
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

// Jobs implements api.Service.
func (s *Server) Jobs(ctx context.Context) ([]api.Job, error) {
	cfg := s.Config()
	out := []api.Job{}
	for _, j := range s.jobList() {
		aj, err := s.apiJob(ctx, cfg, j, false)
		if err != nil {
			return nil, err
		}
		out = append(out, *aj)
	}
	return out, nil
}

// Job implements api.Service: with the VMs a backup job selects now.
func (s *Server) Job(ctx context.Context, name string) (*api.Job, error) {
	j, _, err := s.job(name)
	if err != nil {
		return nil, err
	}
	return s.apiJob(ctx, s.Config(), j, true)
}

func (s *Server) apiJob(ctx context.Context, cfg *config.Config, j *config.Job, withVMs bool) (*api.Job, error) {
	s.mu.Lock()
	st := *s.stateOf(j.Name)
	s.mu.Unlock()
	source := "config"
	if s.fromAPI(j.Name) {
		source = "api"
	}
	aj := &api.Job{Name: j.Name, Type: j.Type, Source: source, Enabled: st.enabledFor(j), Spec: j.Spec(), Next: []time.Time{}}
	if j.Schedule != nil {
		aj.Schedule = j.Schedule.String()
		if aj.Enabled {
			for _, t := range j.Schedule.NextN(time.Now(), 5) {
				aj.Next = append(aj.Next, t.Add(jitter(j, t)))
			}
		}
	}
	if st.running != 0 {
		id := st.running
		aj.Running = &id
	}
	runs, err := s.db.Runs(ctx, state.RunFilter{Job: j.Name, Limit: 1})
	if err != nil {
		return nil, err
	}
	if len(runs) > 0 {
		aj.LastRun = &runs[0]
	}
	if withVMs && j.Type == config.Backup {
		lctx, cancel := context.WithTimeout(ctx, listTimeout)
		refs, _ := s.selectVMs(lctx, cfg, j)
		cancel()
		aj.VMs = []string{}
		for _, r := range refs {
			aj.VMs = append(aj.VMs, r.Name)
		}
	}
	return aj, nil
}

// CreateJob implements api.Service: the job is validated against the
// configuration in force and kept in the database (jobs of the
// configuration file are edited there).
func (s *Server) CreateJob(ctx context.Context, spec []byte) (*api.Job, error) {
	return s.putJob(ctx, "", spec)
}

// UpdateJob implements api.Service: a job defined through the API is
// replaced (a running run goes on with its old settings).
func (s *Server) UpdateJob(ctx context.Context, name string, spec []byte) (*api.Job, error) {
	return s.putJob(ctx, name, spec)
}

// putJob creates (name "") or replaces job name from spec.
func (s *Server) putJob(ctx context.Context, name string, spec []byte) (*api.Job, error) {
	j, err := config.ParseJob(s.Config(), "job", spec)
	if err != nil {
		return nil, err
	}
	if _, err := notify.FromConfig(j); err != nil {
		return nil, fmt.Errorf("job %s: %w", j.Name, err)
	}
	s.mu.Lock()
	_, isAPI := s.apiSpecs[j.Name]
	inFile := slices.ContainsFunc(s.cfg.Jobs, func(c *config.Job) bool { return c.Name == j.Name || c.Name == name })
	s.mu.Unlock()
	switch {
	case inFile:
		return nil, fmt.Errorf("job %s is defined in the configuration file %s: edit it there and reload (SIGHUP): %w", cmp.Or(name, j.Name), s.opts.ConfigPath, errs.ErrBusy)
	case name == "" && isAPI:
		return nil, fmt.Errorf("job %s exists: update it with PUT, or pick another name: %w", j.Name, errs.ErrBusy)
	case name != "" && j.Name != name:
		return nil, fmt.Errorf("the job's name %q differs from %q: a job cannot be renamed; create the new one and delete the old: %w", j.Name, name, errs.ErrUsage)
	case name != "" && !s.fromAPI(name):
		return nil, fmt.Errorf("no job %q: %w", name, errs.ErrNotFound)
	}
	if err := s.db.PutAPIJob(ctx, j.Name, spec); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.apiSpecs[j.Name] = spec
	s.rebuildJobs()
	err = s.notify.Configure(s.jobs)
	s.mu.Unlock()
	if err != nil {
		s.log.Error("webhooks not reconfigured", "err", err)
	}
	s.replan()
	return s.Job(ctx, j.Name)
}

// DeleteJob implements api.Service: a job defined through the API that
// is not running; its runs stay in the history.
func (s *Server) DeleteJob(ctx context.Context, name string) error {
	if !s.fromAPI(name) {
		if _, _, err := s.job(name); err == nil {
			return fmt.Errorf("job %s is defined in the configuration file %s: remove it there and reload (SIGHUP): %w", name, s.opts.ConfigPath, errs.ErrBusy)
		}
		return fmt.Errorf("no job %q: %w", name, errs.ErrNotFound)
	}
	s.mu.Lock()
	running := s.stateOf(name).running
	s.mu.Unlock()
	if running != 0 {
		return fmt.Errorf("job %s is running (run %d): cancel it first: %w", name, running, errs.ErrBusy)
	}
	if err := s.db.DeleteAPIJob(ctx, name); err != nil {
		return err
	}
	s.mu.Lock()
	delete(s.apiSpecs, name)
	delete(s.jobState, name)
	s.rebuildJobs()
	err := s.notify.Configure(s.jobs)
	s.mu.Unlock()
	if err != nil {
		s.log.Error("webhooks not reconfigured", "err", err)
	}
	s.replan()
	return nil
}

// SetJobEnabled implements api.Service.
func (s *Server) SetJobEnabled(ctx context.Context, name string, enabled bool) (*api.Job, error) {
	if err := s.SetEnabled(ctx, name, enabled); err != nil {
		return nil, err
	}
	return s.Job(ctx, name)
}

// RunJob implements api.Service.
func (s *Server) RunJob(ctx context.Context, name string) (*state.Run, error) {
	j, _, err := s.job(name)
	if err != nil {
		return nil, err
	}
	return s.startRun(j, TriggerManual, time.Time{})
}

// Runs implements api.Service.
func (s *Server) Runs(ctx context.Context, f state.RunFilter) ([]state.Run, error) {
	return s.db.Runs(ctx, f)
}

// Run implements api.Service.
func (s *Server) Run(ctx context.Context, id int64) (*api.RunDetail, error) {
	r, err := s.db.GetRun(ctx, id)
	if err != nil {
		return nil, err
	}
	vms, err := s.db.VMs(ctx, id)
	if err != nil {
		return nil, err
	}
	if vms == nil {
		vms = []state.VMResult{}
	}
	return &api.RunDetail{Run: *r, VMs: vms}, nil
}

// RunLog implements api.Service.
func (s *Server) RunLog(ctx context.Context, id, after int64, limit int) ([]state.LogLine, error) {
	if _, err := s.db.GetRun(ctx, id); err != nil {
		return nil, err
	}
	lines, err := s.db.LogLines(ctx, id, after, limit)
	if lines == nil && err == nil {
		lines = []state.LogLine{}
	}
	return lines, err
}

// Repositories implements api.Service: the statistics as cached
// (computed in the background after each job and when an hour old; absent
// until first computed) and the last verify.
func (s *Server) Repositories(ctx context.Context) ([]api.Repository, error) {
	cfg := s.Config()
	var names []string
	for n := range cfg.Repositories {
		names = append(names, n)
	}
	sort.Strings(names)
	out := []api.Repository{}
	for _, n := range names {
		rc := cfg.Repositories[n]
		loc := rc.Location
		if s3.IsURL(loc) {
			loc = redact.URL(loc)
		}
		ar := api.Repository{Name: n, Location: loc}
		if st, ok := s.stats.Get(n); ok {
			if st.Stats != nil {
				ar.Backups, ar.VMs = st.Stats.Backups, st.Stats.VMs
				ar.StoredBytes, ar.LogicalBytes, ar.DedupFactor = st.Stats.StoredBytes, st.Stats.LogicalBytes, st.Stats.DedupFactor
				ar.StatsTime = st.Time
			}
			if st.Err != nil {
				ar.Error = st.Err.Error()
			}
		}
		if v, err := s.db.LastVerify(ctx, n); err == nil {
			ar.LastVerify = &api.VerifyStatus{Run: v.Run, Time: v.Time, Backups: int(v.Backups), Problems: int(v.Problems)}
		} else if !errors.Is(err, errs.ErrNotFound) {
			return nil, err
		}
		out = append(out, ar)
	}
	return out, nil
}

// Restore implements api.Service: the disks to files under req.To (a new
// or empty directory), every chunk checked; the VM's definition files
// too when the backup has them.
func (s *Server) Restore(ctx context.Context, req api.RestoreRequest) (*api.RestoreResult, error) {
	if req.Libvirt != nil {
		return s.restoreToLibvirt(ctx, req)
	}
	if req.XAPI != nil {
		return s.restoreToXAPI(ctx, req)
	}
	if !filepath.IsAbs(req.To) {
		return nil, fmt.Errorf("to %q: give an absolute directory on the server: %w", req.To, errs.ErrUsage)
	}
	format := req.Format
	if format == "" {
		format = "raw"
	}
	if _, ok := restore.Formats[format]; !ok {
		return nil, fmt.Errorf("format %q: want raw or qcow2: %w", format, errs.ErrUsage)
	}
	r, release, _, m, err := s.findBackup(ctx, req.Repository, req.Backup)
	if err != nil {
		return nil, err
	}
	defer release()
	sel, err := restore.Select(m, req.Disks)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(req.To, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", req.To, err)
	}
	lctx := ctx
	if l, c, err := r.Lock(ctx, false, "restore"); err == nil {
		defer l.Unlock()
		lctx = c
	} else {
		return nil, err
	}
	dest := req.To + string(filepath.Separator) // several disks: DIR/NAME.EXT each
	if len(sel) == 1 {
		dest = filepath.Join(req.To, sel[0].Name+restore.Formats[format].Ext)
	}
	files, err := restore.Plan(sel, dest, format)
	if err != nil {
		return nil, err
	}
	res, err := restore.Run(lctx, r, sel, files, restore.Options{})
	if err != nil {
		return nil, err
	}
	out := &api.RestoreResult{Files: []api.RestoredFile{}}
	for _, d := range res {
		out.Files = append(out.Files, api.RestoredFile{Disk: d.Name, Path: d.Path, Size: d.Size})
	}
	def, err := restore.WriteDefinition(lctx, r, m, req.To)
	if err != nil {
		return nil, fmt.Errorf("the disks are restored, the VM's definition is not: %w", err)
	}
	for _, f := range def {
		out.Files = append(out.Files, api.RestoredFile{Disk: f.Name, Path: f.Path})
	}
	return out, nil
}

// jitter is j's random delay of the run at slot.
func jitter(j *config.Job, slot time.Time) time.Duration {
	if j.RandomDelay <= 0 {
		return 0
	}
	return schedule.Jitter(j.RandomDelay, j.Name, slot)
}

func errorsIsBusy(err error) bool { return errors.Is(err, errs.ErrBusy) }
