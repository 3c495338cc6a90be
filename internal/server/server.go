// Package server owns the vmshadow server's core: the configuration in
// force (loaded at start, reloaded on SIGHUP without cutting off a running
// job), the repositories opened once with their keys kept in memory, the
// scheduler that starts jobs at their times (a job still running when its
// next time comes is skipped, not doubled; missed runs caught up at start
// when configured), the runs of backup, verify, prune, gc and copy jobs
// recorded in the state database with their log, their live events, and
// recovery at start of the snapshot sets a killed server left behind, and
// each repository's usage history (a point per statistics computation:
// after each job, and hourly). It implements api.Service, which the HTTP
// layer serves, with the dry runs the web interface shows (retention, gc,
// schedules; previews.go) and restores to files, into libvirt or into a
// XenServer pool (restore_to.go).
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/repostats"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/metrics"
	"github.com/vmshadow/vmshadow/internal/server/notify"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// Options configure a Server.
type Options struct {
	// ConfigPath is the configuration file (reloaded by Reload).
	ConfigPath string
	// Version is vmshadow's version, for the API and metrics.
	Version string
	// Log receives the server's own log (runs' lines go to the database
	// too).
	Log *slog.Logger
}

// Server is the running server. Its methods are safe for concurrent use.
type Server struct {
	opts   Options
	log    *slog.Logger
	db     *state.DB
	notify *notify.Notifier
	stats  *metrics.StatsCache

	ctx    context.Context // the server's life; cancelled by Close
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup // runs and the scheduler
	wake   chan struct{}  // the scheduler re-plans

	mu       sync.Mutex
	cfg      *config.Config
	jobs     []*config.Job          // the configuration's, then the API's
	apiSpecs map[string][]byte      // jobs defined through the API, as given
	apiBad   map[string]error       // API jobs the configuration in force rejects
	repos    map[string]*repoHandle // by repository name
	jobState map[string]*jobState   // by job name
	runs     map[int64]*run         // running, by ID
	vmBusy   map[string]int64       // VM key -> the run backing it up
	hostSem  map[string]chan struct{}
	serves   map[string]*serve
}

// jobState is the server's view of one job beyond its configuration.
type jobState struct {
	enabled  *bool     // chosen through the API; nil: the configuration decides
	lastSlot time.Time // scheduled time of the latest scheduled run
	next     time.Time // the next scheduled time (zero: none planned)
	running  int64     // the running run, 0 when none
}

// New loads the configuration at o.ConfigPath and opens the state
// database in its state directory. Start starts the work.
func New(ctx context.Context, o Options) (*Server, error) {
	cfg, err := config.Load(o.ConfigPath)
	if err != nil {
		return nil, err
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	db, err := state.Open(ctx, cfg.StateDir)
	if err != nil {
		return nil, err
	}
	s := &Server{opts: o, log: o.Log, db: db, cfg: cfg, wake: make(chan struct{}, 1),
		repos: map[string]*repoHandle{}, jobState: map[string]*jobState{}, runs: map[int64]*run{},
		vmBusy: map[string]int64{}, hostSem: map[string]chan struct{}{}, serves: map[string]*serve{}}
	s.ctx, s.cancel = context.WithCancelCause(context.Background())
	states, err := db.JobStates(ctx)
	if err != nil {
		db.Close()
		return nil, err
	}
	for name, st := range states {
		s.jobState[name] = &jobState{enabled: st.Enabled, lastSlot: st.LastSlot}
	}
	if s.apiSpecs, err = db.APIJobs(ctx); err != nil {
		db.Close()
		return nil, err
	}
	s.rebuildJobs()
	s.notify = notify.New(notify.Options{Version: o.Version, Log: s.notifyLog})
	if err := s.notify.Configure(s.jobs); err != nil {
		db.Close()
		return nil, err
	}
	s.stats = metrics.NewStatsCache(s.ctx, slices.Sorted(maps.Keys(cfg.Repositories)), metrics.DefaultMaxAge,
		func(ctx context.Context, name string) (*repostats.Stats, error) {
			r, release, err := s.repository(ctx, name)
			if err != nil {
				return nil, err
			}
			defer release()
			st, err := repostats.Compute(ctx, r)
			if err != nil {
				return nil, err
			}
			// Each computation is a point of the usage history.
			now := time.Now()
			if err := s.db.RecordUsage(context.WithoutCancel(ctx), name, state.Usage{Time: now, StoredBytes: st.StoredBytes,
				LogicalBytes: st.LogicalBytes, Backups: int64(st.Backups)}, now); err != nil {
				s.log.Warn("repository usage not recorded", "repository", name, "err", err)
			}
			return st, nil
		})
	return s, nil
}

// notifyLog records a webhook delivery's outcome in the server's log and
// its run's.
func (s *Server) notifyLog(e notify.Entry) {
	level := map[string]slog.Level{"info": slog.LevelInfo, "warning": slog.LevelWarn, "error": slog.LevelError}[e.Level]
	s.log.Log(context.Background(), level, "notification: "+e.String(), "job", e.Job, "run", e.RunID)
	if e.RunID != 0 {
		if _, err := s.db.Log(context.Background(), e.RunID, e.Time, e.Level, "", "notification: "+e.String()); err != nil {
			s.log.Error("record a log line", "run", e.RunID, "err", err)
		}
	}
}

// ended tells the webhooks of a run that ended (or was skipped or
// interrupted), and refreshes the statistics of the repositories it
// changed.
func (s *Server) ended(ctx context.Context, run state.Run, repos ...string) {
	ctx = context.WithoutCancel(ctx)
	if r, err := s.db.GetRun(ctx, run.ID); err == nil {
		run = *r
	}
	vms, err := s.db.VMs(ctx, run.ID)
	if err != nil {
		s.log.Error("read a run's VMs for its notification", "run", run.ID, "err", err)
	}
	s.notify.Send(notify.FromRun(run, vms))
	for _, r := range repos {
		if r != "" {
			s.stats.Refresh(r)
		}
	}
}

// Config returns the configuration in force.
func (s *Server) Config() *config.Config {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cfg
}

// DB is the state database.
func (s *Server) DB() *state.DB { return s.db }

// Start marks the runs a killed server left as interrupted and recovers
// their VMs' snapshot sets, then starts the scheduler (and the catch-up
// runs of jobs that missed a scheduled time).
func (s *Server) Start(ctx context.Context) error {
	runs, vms, err := s.db.MarkInterrupted(ctx, time.Now())
	if err != nil {
		return err
	}
	for _, r := range runs {
		s.log.Warn("run interrupted by the server's stop", "run", r.ID, "job", r.Job, "vms", vms[r.ID])
		s.recoverVMs(ctx, r, vms[r.ID])
		s.ended(ctx, r)
	}
	s.wg.Add(2)
	go s.scheduler()
	go s.sampleUsage(usageEvery)
	return nil
}

// usageEvery is how often the server looks whether a repository's
// statistics (and so its usage history) are due a refresh: they are when
// an hour old (metrics.DefaultMaxAge), so the history gets a point an
// hour, and one after each job.
const usageEvery = 10 * time.Minute

// sampleUsage refreshes the repositories' statistics that are stale,
// now and every interval until the server stops: each computation records
// a point of the usage history.
func (s *Server) sampleUsage(every time.Duration) {
	defer s.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.stats.Stats()
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Reload reads the configuration file again. A bad file changes nothing
// (the error names each mistake); running runs go on with the settings
// they started with.
func (s *Server) Reload() error {
	cfg, err := config.Load(s.opts.ConfigPath)
	if err != nil {
		return err
	}
	s.mu.Lock()
	old, oldJobs, oldBad := s.cfg, s.jobs, s.apiBad
	s.cfg = cfg
	s.rebuildJobs()
	if err := s.notify.Configure(s.jobs); err != nil {
		s.cfg, s.jobs, s.apiBad = old, oldJobs, oldBad
		s.mu.Unlock()
		return err
	}
	for name, h := range s.repos {
		nr := cfg.Repositories[name]
		if nr == nil || *nr != *h.cfg {
			h.retire()
			delete(s.repos, name)
		}
	}
	s.mu.Unlock()
	s.stats.SetRepositories(slices.Sorted(maps.Keys(cfg.Repositories)))
	if old.StateDir != cfg.StateDir {
		s.log.Warn("state_dir changed: the new directory is used after a restart", "in_use", old.StateDir, "configured", cfg.StateDir)
	}
	s.replan()
	s.log.Info("configuration reloaded", "path", s.opts.ConfigPath, "jobs", len(cfg.Jobs), "api_jobs", len(s.apiSpecs))
	return nil
}

// Close cancels the running runs (their sets are released, their
// repositories left valid), waits for them until ctx ends, and closes
// the repositories and the database.
func (s *Server) Close(ctx context.Context) error {
	s.cancel(errStopping)
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("stop: runs still cleaning up: %w", ctx.Err())
	}
	s.stats.Wait()
	nctx, ncancel := context.WithTimeout(ctx, 15*time.Second)
	if err := s.notify.Close(nctx); err != nil {
		s.log.Warn("notifications not delivered before the stop", "err", err)
	}
	ncancel()
	s.mu.Lock()
	for _, sv := range s.serves {
		sv.stop()
	}
	for name, h := range s.repos {
		h.retire()
		delete(s.repos, name)
	}
	s.mu.Unlock()
	return s.db.Close()
}

// job returns the configured job name and its state.
func (s *Server) job(name string) (*config.Job, *jobState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.jobLocked(name)
}

func (s *Server) jobLocked(name string) (*config.Job, *jobState, error) {
	for _, j := range s.jobs {
		if j.Name == name {
			return j, s.stateOf(name), nil
		}
	}
	if err := s.apiBad[name]; err != nil {
		return nil, nil, fmt.Errorf("job %q, defined through the API, does not fit the configuration in force (%v): update or delete it: %w", name, err, errs.ErrUsage)
	}
	return nil, nil, fmt.Errorf("no job %q: %w", name, errs.ErrNotFound)
}

// rebuildJobs lists the jobs in force: the configuration's, then those
// defined through the API that fit it (checked again after each reload:
// one naming a repository the file no longer has is set aside, logged,
// until the file has it again or the job is changed); s.mu held.
func (s *Server) rebuildJobs() {
	s.jobs = slices.Clone(s.cfg.Jobs)
	s.apiBad = map[string]error{}
	names := slices.Sorted(maps.Keys(s.apiSpecs))
	for _, name := range names {
		if slices.ContainsFunc(s.cfg.Jobs, func(j *config.Job) bool { return j.Name == name }) {
			s.apiBad[name] = fmt.Errorf("the configuration file defines a job of the same name")
		} else if j, err := config.ParseJob(s.cfg, "job "+name, s.apiSpecs[name]); err != nil {
			s.apiBad[name] = err
		} else {
			s.jobs = append(s.jobs, j)
			continue
		}
		s.log.Error("job defined through the API set aside", "job", name, "err", s.apiBad[name])
	}
}

// jobList returns the jobs in force.
func (s *Server) jobList() []*config.Job {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.jobs
}

// fromAPI tells whether job name was defined through the API.
func (s *Server) fromAPI(name string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.apiSpecs[name]
	return ok
}

// stateOf returns (creating) the state of job name; s.mu held.
func (s *Server) stateOf(name string) *jobState {
	st := s.jobState[name]
	if st == nil {
		st = &jobState{}
		s.jobState[name] = st
	}
	return st
}

// enabled tells whether j is scheduled: the API's choice, else the file's.
func (st *jobState) enabledFor(j *config.Job) bool {
	if st.enabled != nil {
		return *st.enabled
	}
	return j.Enabled
}

// SetEnabled enables or disables job name's schedule, kept across
// restarts.
func (s *Server) SetEnabled(ctx context.Context, name string, on bool) error {
	if _, _, err := s.job(name); err != nil {
		return err
	}
	if err := s.db.SetJobEnabled(ctx, name, &on); err != nil {
		return err
	}
	s.mu.Lock()
	s.stateOf(name).enabled = &on
	s.mu.Unlock()
	s.replan()
	return nil
}

// isCancel tells whether err is a cancellation (by the API, a reload
// cannot cause one, the time limit or the server's stop).
func isCancel(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

// MetricsHandler serves the Prometheus metrics (/metrics).
func (s *Server) MetricsHandler() http.Handler {
	reg := metrics.NewRegistry(metrics.New(metrics.Options{Source: s.db, Repos: s.stats, Version: s.opts.Version,
		Jobs: func() []string {
			var names []string
			for _, j := range s.jobList() {
				names = append(names, j.Name)
			}
			return names
		}}))
	return metrics.Handler(reg, slog.NewLogLogger(s.log.Handler(), slog.LevelError))
}
