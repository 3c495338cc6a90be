package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// Triggers of runs.
const (
	TriggerSchedule = "schedule"
	TriggerManual   = "manual"
	TriggerCatchUp  = "catch-up"
)

// run is a running run of a job.
type run struct {
	info   state.Run
	job    *config.Job
	cfg    *config.Config // the configuration it started with
	cancel context.CancelCauseFunc
	done   chan struct{}

	mu       sync.Mutex
	subs     map[chan api.Event]struct{}
	progress map[string]api.Progress // latest per VM ("" for the run's task)
}

// errCancelled is the cause of a run cancelled through the API; the
// server's stop and the time limit have their own.
var (
	errCancelled   = errors.New("cancelled through the API")
	errStopping    = errors.New("the server is stopping")
	errTimeLimited = errors.New("the job's time limit was reached")
)

// startRun starts a run of j now. A job already running gets a skipped
// run (recorded with the reason) and errs.ErrBusy.
func (s *Server) startRun(j *config.Job, trigger string, slot time.Time) (*state.Run, error) {
	now := time.Now()
	s.mu.Lock()
	st := s.stateOf(j.Name)
	cfg := s.cfg
	if st.running != 0 {
		busy := st.running
		s.mu.Unlock()
		reason := fmt.Sprintf("run %d of this job is still going", busy)
		id, err := s.db.SkipRun(s.ctx, j.Name, j.Type, trigger, reason, now)
		if err != nil {
			s.log.Error("record a skipped run", "job", j.Name, "err", err)
		} else {
			s.ended(s.ctx, state.Run{ID: id, Job: j.Name, Kind: j.Type, Trigger: trigger, Status: state.Skipped, Started: now, Ended: now, Error: reason})
		}
		s.log.Warn("run skipped: the previous one is still going", "job", j.Name, "skipped_run", id, "running_run", busy)
		return nil, fmt.Errorf("job %s: %s (skipped as run %d): %w", j.Name, reason, id, errs.ErrBusy)
	}
	id, err := s.db.StartRun(s.ctx, j.Name, j.Type, trigger, now)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	ctx, cancel := context.WithCancelCause(s.ctx)
	r := &run{info: state.Run{ID: id, Job: j.Name, Kind: j.Type, Trigger: trigger, Status: state.Running, Started: now},
		job: j, cfg: cfg, cancel: cancel, done: make(chan struct{}), subs: map[chan api.Event]struct{}{}, progress: map[string]api.Progress{}}
	st.running = id
	if trigger == TriggerSchedule || trigger == TriggerCatchUp {
		st.lastSlot = slot
	}
	s.runs[id] = r
	s.wg.Add(1)
	s.mu.Unlock()
	if trigger == TriggerSchedule || trigger == TriggerCatchUp {
		if err := s.db.SetLastSlot(s.ctx, j.Name, slot); err != nil {
			s.log.Error("record the scheduled time", "job", j.Name, "err", err)
		}
	}
	go s.execute(ctx, r)
	info := r.info
	return &info, nil
}

// execute runs r to its end and records it.
func (s *Server) execute(ctx context.Context, r *run) {
	defer s.wg.Done()
	if r.job.TimeLimit > 0 {
		var c context.CancelFunc
		ctx, c = context.WithTimeoutCause(ctx, r.job.TimeLimit, errTimeLimited)
		defer c()
	}
	r.logf(s, slog.LevelInfo, "", "%s run started (%s)", r.job.Type, r.info.Trigger)
	var err error
	switch r.job.Type {
	case config.Backup:
		err = s.runBackup(ctx, r)
	case config.Verify:
		err = s.runVerify(ctx, r)
	case config.Prune:
		err = s.runPrune(ctx, r)
	case config.GC:
		err = s.runGC(ctx, r)
	case config.Copy:
		err = s.runCopy(ctx, r)
	default:
		err = fmt.Errorf("job type %q: %w", r.job.Type, errs.ErrUnsupported)
	}
	status, msg := state.Succeeded, ""
	switch {
	case err == nil:
	case ctx.Err() != nil && isCancel(err):
		status, msg = state.Cancelled, context.Cause(ctx).Error()
		if errors.Is(context.Cause(ctx), errTimeLimited) {
			status = state.Failed
		}
	default:
		status, msg = state.Failed, err.Error()
	}
	if status == state.Succeeded {
		r.logf(s, slog.LevelInfo, "", "run succeeded")
	} else {
		r.logf(s, slog.LevelError, "", "run %s: %s", status, msg)
	}
	end := time.Now()
	if err := s.db.EndRun(context.WithoutCancel(ctx), r.info.ID, status, msg, end); err != nil {
		s.log.Error("record the end of a run", "run", r.info.ID, "err", err)
	}
	s.mu.Lock()
	delete(s.runs, r.info.ID)
	if st := s.jobState[r.job.Name]; st != nil && st.running == r.info.ID {
		st.running = 0
	}
	s.mu.Unlock()
	r.info.Status, r.info.Ended, r.info.Error = status, end, msg
	s.ended(ctx, r.info, r.job.Repository, r.job.To)
	r.finish()
	r.cancel(nil)
}

// CancelRun cancels running run id.
func (s *Server) CancelRun(ctx context.Context, id int64) error {
	s.mu.Lock()
	r := s.runs[id]
	s.mu.Unlock()
	if r == nil {
		return fmt.Errorf("run %d is not running: %w", id, errs.ErrNotFound)
	}
	r.logf(s, slog.LevelWarn, "", "cancel requested")
	r.cancel(errCancelled)
	return nil
}

// logf records a line of r's log (database, server log, subscribers).
func (r *run) logf(s *Server, level slog.Level, vm, format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	lv := map[slog.Level]string{slog.LevelInfo: "info", slog.LevelWarn: "warning", slog.LevelError: "error"}[level]
	s.log.Log(context.Background(), level, msg, "run", r.info.ID, "job", r.job.Name, "vm", vm)
	at := time.Now()
	id, err := s.db.Log(context.Background(), r.info.ID, at, lv, vm, msg)
	if err != nil {
		s.log.Error("record a log line", "run", r.info.ID, "err", err)
		return // a line without an ID would break the event stream's resume
	}
	r.publish(api.Event{Type: "log", Data: state.LogLine{ID: id, Time: at, Level: lv, VM: vm, Message: msg}})
}

// setProgress publishes a progress event and keeps it for new watchers.
func (r *run) setProgress(p api.Progress) {
	r.mu.Lock()
	r.progress[p.VM] = p
	r.mu.Unlock()
	r.publish(api.Event{Type: "progress", Data: p})
}

// publish sends ev to every watcher without blocking: a watcher too slow
// to take it loses it (progress and log lines come again; the end event
// is always delivered by closing).
func (r *run) publish(ev api.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for ch := range r.subs {
		select {
		case ch <- ev:
		default:
		}
	}
}

// finish sends the end event and closes every watcher's channel.
func (r *run) finish() {
	r.mu.Lock()
	defer r.mu.Unlock()
	end := api.Event{Type: "end", Data: r.info}
	for ch := range r.subs {
		select {
		case ch <- end:
		default:
			// Make room: the end matters more than a stale progress.
			select {
			case <-ch:
			default:
			}
			ch <- end
		}
		close(ch)
	}
	r.subs = nil
	close(r.done)
}

// Watch implements api.Service.
func (s *Server) Watch(ctx context.Context, id int64) (<-chan api.Event, error) {
	s.mu.Lock()
	r := s.runs[id]
	s.mu.Unlock()
	if r == nil {
		info, err := s.db.GetRun(ctx, id)
		if err != nil {
			return nil, err
		}
		ch := make(chan api.Event, 1)
		ch <- api.Event{Type: "end", Data: *info}
		close(ch)
		return ch, nil
	}
	ch := make(chan api.Event, 64)
	r.mu.Lock()
	if r.subs == nil { // ended meanwhile
		r.mu.Unlock()
		return s.Watch(ctx, id)
	}
	for _, p := range r.progress {
		ch <- api.Event{Type: "progress", Data: p}
	}
	r.subs[ch] = struct{}{}
	r.mu.Unlock()
	go func() {
		select {
		case <-ctx.Done():
			r.mu.Lock()
			if _, ok := r.subs[ch]; ok {
				delete(r.subs, ch)
				close(ch)
			}
			r.mu.Unlock()
		case <-r.done:
		}
	}()
	return ch, nil
}
