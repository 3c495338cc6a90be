package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/livebackup"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repocopy"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/state"
	"github.com/vmshadow/vmshadow/internal/vmbackup"
	"github.com/vmshadow/vmshadow/internal/vmconn"
)

// lockWait is how often a run retries a repository lock another process
// or run holds.
const lockWait = 2 * time.Second

// lock takes r's lock for op, waiting while it is busy (a prune or gc
// waits for running backups; a backup waits for a prune) until ctx ends.
func (s *Server) lock(ctx context.Context, run *run, r *repo.Repo, exclusive bool, op string) (context.Context, func(), error) {
	logged := false
	for {
		l, lctx, err := r.Lock(ctx, exclusive, op)
		if err == nil {
			return lctx, func() {
				if err := l.Unlock(); err != nil {
					run.logf(s, slog.LevelWarn, "", "could not remove the repository lock (it becomes stale by itself): %v", err)
				}
			}, nil
		}
		if !errors.Is(err, errs.ErrBusy) {
			return nil, nil, err
		}
		if !logged {
			run.logf(s, slog.LevelInfo, "", "waiting for the repository: %v", err)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(lockWait):
		}
	}
}

// runBackup backs up every VM the job selects, at most per_job at once
// and per_host per connection, then applies the job's retention to the
// VMs it backed up. The run fails if any VM failed.
func (s *Server) runBackup(ctx context.Context, run *run) error {
	j := run.job
	vms, problems := s.selectVMs(ctx, run.cfg, j)
	for _, p := range problems {
		run.logf(s, slog.LevelError, "", "%v", p)
	}
	for _, vm := range vms {
		if vm.Note != "" {
			run.logf(s, slog.LevelInfo, vm.Name, "%s", vm.Note)
		}
	}
	if len(vms) == 0 {
		if len(problems) > 0 {
			return fmt.Errorf("no VM to back up: %w", errors.Join(problems...))
		}
		run.logf(s, slog.LevelWarn, "", "the job selects no VM now")
		return nil
	}
	r, release, err := s.repository(ctx, j.Repository)
	if err != nil {
		return err
	}
	defer release()
	if j.Group != "" {
		return s.runGroupBackup(ctx, run, r, vms, problems)
	}
	workers := max(j.PerJob, 1)
	sem := make(chan struct{}, workers)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed []string
	var done []string
	for _, vm := range vms {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			err := s.backupVM(ctx, run, r, vm)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed = append(failed, vm.Name)
			} else {
				done = append(done, vm.Name)
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	if !j.Retention.Empty() && len(done) > 0 {
		if err := s.applyRetention(ctx, run, r, j, done); err != nil {
			failed = append(failed, "retention")
			run.logf(s, slog.LevelError, "", "retention: %v", err)
		}
	}
	if n := len(failed) + len(problems); n > 0 {
		return fmt.Errorf("%d of %d VMs failed (%v)", len(failed), len(vms), failed)
	}
	return nil
}

// runGroupBackup backs up the job's VMs as its group: one snapshot set
// across all of them, at one instant (vmbackup.RunGroup), each VM's result
// recorded as for single backups, then the job's retention applied to the
// group's group backups. A group missing a VM it selects (problems) is not
// backed up: its backup would not be the group's.
func (s *Server) runGroupBackup(ctx context.Context, run *run, r *repo.Repo, vms []vmRef, problems []error) error {
	j := run.job
	if len(problems) > 0 {
		return fmt.Errorf("group %s: not every VM of the group can be reached, so none is backed up: %w", j.Group, errors.Join(problems...))
	}
	started := time.Now()
	results := make([]state.VMResult, len(vms))
	byName := map[string]int{}
	for i, vm := range vms {
		results[i] = state.VMResult{Run: run.info.ID, VM: vm.Name, Started: started}
		byName[vm.Name] = i
		if err := s.db.StartVM(ctx, run.info.ID, vm.Name, started); err != nil {
			return err
		}
	}
	err := s.groupBackup(ctx, run, r, vms, results, byName)
	for i := range results {
		res := &results[i]
		res.Ended = time.Now()
		switch {
		case res.BackupID != "":
			res.Status = state.Succeeded
		case isCancel(err) && ctx.Err() != nil:
			res.Status, res.Error = state.Cancelled, context.Cause(ctx).Error()
		default:
			res.Status, res.Error = state.Failed, "the group's backup failed"
			if err != nil {
				res.Error = err.Error()
			}
		}
		if e := s.db.EndVM(context.WithoutCancel(ctx), *res); e != nil {
			s.log.Error("record a VM's result", "run", run.info.ID, "vm", res.VM, "err", e)
		}
		run.publish(api.Event{Type: "vm", Data: *res})
	}
	if err != nil {
		run.logf(s, slog.LevelError, "", "group %s: %v", j.Group, err)
		return err
	}
	if !j.Retention.Empty() {
		// The group's backups, and the VMs' backups outside any group
		// (members of a run that failed part way), by the job's rules.
		var names []string
		for _, vm := range vms {
			names = append(names, vm.Name)
		}
		if err := s.applyRetention(ctx, run, r, j, names); err != nil {
			run.logf(s, slog.LevelError, "", "retention: %v", err)
			return fmt.Errorf("retention: %w", err)
		}
	}
	return nil
}

// groupBackup takes the group's set and stores its backups, filling each
// stored member's result.
func (s *Server) groupBackup(ctx context.Context, run *run, r *repo.Repo, vms []vmRef, results []state.VMResult, byName map[string]int) error {
	j := run.job
	s.mu.Lock()
	for _, vm := range vms {
		if other := s.vmBusy[vm.key()]; other != 0 {
			s.mu.Unlock()
			return fmt.Errorf("run %d is backing VM %s up: one snapshot set at a time: %w", other, vm.Name, errs.ErrBusy)
		}
	}
	for _, vm := range vms {
		s.vmBusy[vm.key()] = run.info.ID
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		for _, vm := range vms {
			delete(s.vmBusy, vm.key())
		}
		s.mu.Unlock()
	}()
	var mu sync.Mutex
	current := ""
	cur := func() string { mu.Lock(); defer mu.Unlock(); return current }
	warn := func(format string, a ...any) { run.logf(s, slog.LevelWarn, cur(), format, a...) }
	var los []livebackup.Options
	for i, vm := range vms {
		phase := func(p string) { run.setProgress(api.Progress{VM: vm.Name, Phase: p}) }
		jm := j
		if i > 0 {
			// Host hooks run once for the group: with its first VM.
			c := *j
			c.Hooks = nil
			jm = &c
		}
		c, err := s.coordinator(run.cfg, jm, vm, phase, func(m string) { run.logf(s, slog.LevelWarn, vm.Name, "%s", m) })
		if err != nil {
			return fmt.Errorf("VM %s: %w", vm.Name, err)
		}
		full, why := s.fullDue(ctx, r, j, vm.Name)
		if full {
			run.logf(s, slog.LevelInfo, vm.Name, "full backup: %s", why)
		}
		los = append(los, livebackup.Options{Coordinator: c, VM: vm.Name, Full: full, Tags: []string{"job:" + j.Name},
			Warn: func(m string) { run.logf(s, slog.LevelWarn, vm.Name, "%s", m) }})
	}
	out, err := vmbackup.RunGroup(ctx, r, j.Group, los, vmbackup.Options{Warn: warn,
		Member: func(vm string) { mu.Lock(); current = vm; mu.Unlock() },
		Plan: func(d livebackup.DiskPlan) {
			why := ""
			if d.Reason != "" {
				why = " (" + d.Reason + ")"
			}
			run.logf(s, slog.LevelInfo, cur(), "disk %s: %s read%s", d.Name, d.Mode, why)
		},
		Progress: func(m *progress.Meter) func() {
			vm := cur()
			return progress.Report(ctx, m, time.Second, func(p progress.Snapshot) {
				run.setProgress(api.Progress{VM: vm, Phase: "reading", Done: p.BytesDone, Total: p.BytesTotal, Rate: p.Rate, ETA: max(p.ETAS, 0)})
			})
		},
	})
	if out != nil {
		for _, m := range out.Members {
			res := &results[byName[m.Manifest.VM]]
			res.BackupID, res.Mode, res.Consistency = m.ID.String(), m.Manifest.Mode, m.Manifest.Consistency
			res.BytesRead, res.BytesNew = m.Stats.BytesRead, m.Stats.BytesNew
			if m.Live != nil && m.Live.Set != nil {
				res.FreezeMS = m.Live.Set.FreezeMS
			}
			run.logf(s, slog.LevelInfo, m.Manifest.VM, "backup %s stored: %s, %s consistent, read %s, stored %s new, in %s",
				m.ID.Short(), m.Manifest.Mode, m.Manifest.Consistency, progress.Bytes(res.BytesRead), progress.Bytes(res.BytesNew), progress.Duration(m.Duration.Seconds()))
			run.setProgress(api.Progress{VM: m.Manifest.VM, Phase: "done", Done: res.BytesRead, Total: res.BytesRead})
		}
	}
	if err != nil {
		return err
	}
	run.logf(s, slog.LevelInfo, "", "group backup %s of %s stored: %d VMs at one instant, %s consistent, frozen %d ms",
		out.ID.Short(), j.Group, len(out.Members), out.Group.Consistency, out.Group.FreezeMS)
	return nil
}

// hostSlot takes a slot of connection c's per_host budget.
func (s *Server) hostSlot(ctx context.Context, c string, n int) (func(), error) {
	s.mu.Lock()
	sem := s.hostSem[c]
	if sem == nil || cap(sem) != n {
		sem = make(chan struct{}, n)
		s.hostSem[c] = sem
	}
	s.mu.Unlock()
	select {
	case sem <- struct{}{}:
		return func() { <-sem }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// backupVM backs up one VM and records its result.
func (s *Server) backupVM(ctx context.Context, run *run, r *repo.Repo, vm vmRef) (err error) {
	j := run.job
	started := time.Now()
	if err := s.db.StartVM(ctx, run.info.ID, vm.Name, started); err != nil {
		return err
	}
	res := state.VMResult{Run: run.info.ID, VM: vm.Name, Started: started}
	defer func() {
		res.Ended = time.Now()
		res.Status = state.Succeeded
		if err != nil {
			res.Status, res.Error = state.Failed, err.Error()
			if isCancel(err) && ctx.Err() != nil {
				res.Status, res.Error = state.Cancelled, context.Cause(ctx).Error()
			}
			run.logf(s, slog.LevelError, vm.Name, "backup %s: %s", res.Status, res.Error)
		}
		if e := s.db.EndVM(context.WithoutCancel(ctx), res); e != nil {
			s.log.Error("record a VM's result", "run", run.info.ID, "vm", vm.Name, "err", e)
		}
		run.publish(api.Event{Type: "vm", Data: res})
	}()
	s.mu.Lock()
	if other := s.vmBusy[vm.key()]; other != 0 {
		s.mu.Unlock()
		return fmt.Errorf("run %d is backing this VM up: one snapshot set at a time: %w", other, errs.ErrBusy)
	}
	s.vmBusy[vm.key()] = run.info.ID
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.vmBusy, vm.key())
		s.mu.Unlock()
	}()
	freeHost, err := s.hostSlot(ctx, vm.Conn.Name, max(j.PerHost, 1))
	if err != nil {
		return err
	}
	defer freeHost()

	warn := func(format string, a ...any) { run.logf(s, slog.LevelWarn, vm.Name, format, a...) }
	phase := func(p string) { run.setProgress(api.Progress{VM: vm.Name, Phase: p}) }
	c, err := s.coordinator(run.cfg, j, vm, phase, func(m string) { warn("%s", m) })
	if err != nil {
		return err
	}
	full, why := s.fullDue(ctx, r, j, vm.Name)
	if full {
		run.logf(s, slog.LevelInfo, vm.Name, "full backup: %s", why)
	}
	lo := livebackup.Options{Coordinator: c, VM: vm.Name, Full: full, Tags: []string{"job:" + j.Name},
		Warn: func(m string) { warn("%s", m) }}
	out, err := vmbackup.Run(ctx, r, vmbackup.Options{Live: lo, Warn: warn,
		Plan: func(d livebackup.DiskPlan) {
			why := ""
			if d.Reason != "" {
				why = " (" + d.Reason + ")"
			}
			run.logf(s, slog.LevelInfo, vm.Name, "disk %s: %s read%s", d.Name, d.Mode, why)
		},
		Progress: func(m *progress.Meter) func() {
			return progress.Report(ctx, m, time.Second, func(p progress.Snapshot) {
				run.setProgress(api.Progress{VM: vm.Name, Phase: "reading", Done: p.BytesDone, Total: p.BytesTotal, Rate: p.Rate, ETA: max(p.ETAS, 0)})
			})
		},
	})
	if err != nil {
		return err
	}
	m := out.Manifest
	res.BackupID, res.Mode, res.Consistency = out.ID.String(), m.Mode, m.Consistency
	res.BytesRead, res.BytesNew = out.Stats.BytesRead, out.Stats.BytesNew
	if out.Live != nil && out.Live.Set != nil {
		res.FreezeMS = out.Live.Set.FreezeMS
	}
	run.logf(s, slog.LevelInfo, vm.Name, "backup %s stored: %s, %s consistent, read %s, stored %s new, in %s",
		out.ID.Short(), m.Mode, m.Consistency, progress.Bytes(res.BytesRead), progress.Bytes(res.BytesNew), progress.Duration(out.Duration.Seconds()))
	run.setProgress(api.Progress{VM: vm.Name, Phase: "done", Done: res.BytesRead, Total: res.BytesRead})
	return nil
}

// coordinator builds the coordinator of vm's sets for job j.
func (s *Server) coordinator(cfg *config.Config, j *config.Job, vm vmRef, status, warn func(string)) (*coord.Coordinator, error) {
	o := coord.Options{FreezeTimeout: coord.DefaultFreezeTimeout, WriterTimeout: coord.DefaultWriterTimeout, Status: status, Warn: warn}
	if j != nil && j.Require != "" {
		lvl, err := coord.ParseLevel(j.Require)
		if err != nil {
			return nil, err
		}
		o.Require = lvl
	}
	var w vmconn.Writers
	if j != nil {
		w = writers(j, vm.Conn, vm.Listed)
	}
	return vmconn.Coordinator(vm.Target, w, vmconn.Options{StateDir: cfg.StateDir, Coord: o})
}

// fullDue tells whether j's full_every_days asks for a full backup of vm
// now, and why.
func (s *Server) fullDue(ctx context.Context, r *repo.Repo, j *config.Job, vm string) (bool, string) {
	if j.FullEveryDays == 0 {
		return false, ""
	}
	last, err := r.LatestBackup(ctx, vm, func(b *repo.Backup) bool { return b.Mode == "full" && b.Origin == "" })
	if err != nil || last == nil {
		return false, "" // the first backup is full anyway
	}
	age := time.Since(last.Time)
	if age < time.Duration(j.FullEveryDays)*24*time.Hour {
		return false, ""
	}
	return true, fmt.Sprintf("the last full backup (%s) is %s old; full_every_days is %d", last.ID.Short(), age.Round(time.Minute), j.FullEveryDays)
}

// applyRetention prunes vms' backups by j's retention, and the group
// backups of j's group, under the exclusive lock (waiting for other
// backups to finish).
func (s *Server) applyRetention(ctx context.Context, run *run, r *repo.Repo, j *config.Job, vms []string) error {
	lctx, unlock, err := s.lock(ctx, run, r, true, "prune")
	if err != nil {
		return err
	}
	defer unlock()
	removed := 0
	if j.Group != "" {
		ds, err := r.Prune(lctx, repo.PruneOptions{Group: j.Group, Policy: j.Retention})
		if err != nil {
			return fmt.Errorf("prune group %s: %w", j.Group, err)
		}
		for _, d := range ds {
			if !d.Keep {
				removed++
				run.logf(s, slog.LevelInfo, "", "retention removed group backup %s of %s (%d VMs)", d.ID[:8], d.Time.Format(time.RFC3339), len(d.Members))
			}
		}
	}
	for _, vm := range vms {
		ds, err := r.Prune(lctx, repo.PruneOptions{VM: vm, Policy: j.Retention})
		if err != nil {
			return fmt.Errorf("prune %s: %w", vm, err)
		}
		for _, d := range ds {
			if !d.Keep {
				removed++
				run.logf(s, slog.LevelInfo, vm, "retention removed backup %s of %s", d.ID[:8], d.Time.Format(time.RFC3339))
			}
		}
	}
	run.logf(s, slog.LevelInfo, "", "retention: %d backups removed (gc frees their chunks)", removed)
	return nil
}

// runPrune applies the job's retention to every VM of the repository.
func (s *Server) runPrune(ctx context.Context, run *run) error {
	r, release, err := s.repository(ctx, run.job.Repository)
	if err != nil {
		return err
	}
	defer release()
	lctx, unlock, err := s.lock(ctx, run, r, true, "prune")
	if err != nil {
		return err
	}
	defer unlock()
	ds, err := r.Prune(lctx, repo.PruneOptions{Policy: run.job.Retention})
	if err != nil {
		return err
	}
	removed := 0
	for _, d := range ds {
		if !d.Keep {
			removed++
			run.logf(s, slog.LevelInfo, d.VM, "removed backup %s of %s", d.ID[:8], d.Time.Format(time.RFC3339))
		}
	}
	run.logf(s, slog.LevelInfo, "", "kept %d, removed %d backups", len(ds)-removed, removed)
	return nil
}

// runGC deletes unreferenced chunks and indexes.
func (s *Server) runGC(ctx context.Context, run *run) error {
	r, release, err := s.repository(ctx, run.job.Repository)
	if err != nil {
		return err
	}
	defer release()
	lctx, unlock, err := s.lock(ctx, run, r, true, "gc")
	if err != nil {
		return err
	}
	defer unlock()
	grace := run.job.Grace
	res, err := r.GC(lctx, repo.GCOptions{Grace: grace, Immediate: grace == 0})
	if err != nil {
		return err
	}
	run.logf(s, slog.LevelInfo, "", "%d backups reference %d chunks; deleted %d chunks and %d indexes (%s); %d chunks younger than %s kept",
		res.Backups, res.ChunksReferenced, res.ChunksDeleted, res.IndexesDeleted, progress.Bytes(res.BytesDeleted), res.ChunksInGrace, grace)
	return nil
}

// runVerify re-reads what the repository's backups reference (with
// reverify_after_days: only the backups not verified intact within that
// many days) and records the intact ones.
func (s *Server) runVerify(ctx context.Context, run *run) error {
	j := run.job
	r, release, err := s.repository(ctx, j.Repository)
	if err != nil {
		return err
	}
	defer release()
	lctx, unlock, err := s.lock(ctx, run, r, false, "verify")
	if err != nil {
		return err
	}
	defer unlock()
	backups, bad, err := r.ListBackups(lctx)
	if err != nil {
		return err
	}
	var ids []repo.ID
	if j.ReverifyAfterDays > 0 {
		recent, err := s.db.VerifiedSince(lctx, j.Repository, time.Now().Add(-time.Duration(j.ReverifyAfterDays)*24*time.Hour))
		if err != nil {
			return err
		}
		for _, b := range backups {
			if _, ok := recent[b.ID.String()]; !ok {
				ids = append(ids, b.ID)
			}
		}
		run.logf(s, slog.LevelInfo, "", "%d of %d backups not verified in the last %d days", len(ids), len(backups), j.ReverifyAfterDays)
		if len(ids) == 0 && len(bad) == 0 {
			return nil
		}
	}
	res, err := r.Verify(lctx, repo.VerifyOptions{Backups: ids, Progress: func(done, total int64) {
		run.setProgress(api.Progress{Phase: "verify", Done: done, Total: total})
	}})
	if err != nil {
		return err
	}
	damaged := map[string]bool{}
	for _, p := range res.Problems {
		for _, a := range p.Affected {
			damaged[a.Backup] = true
		}
		run.logf(s, slog.LevelError, "", "%s %s: %s (affects %d backups)", p.Kind, p.ID, p.Error, len(p.Affected))
	}
	for id, e := range bad {
		damaged[id.String()] = true
		run.logf(s, slog.LevelError, "", "manifest %s: %v", id, e)
	}
	var intact []string
	checked := backups
	if ids != nil {
		checked = nil
		want := map[repo.ID]bool{}
		for _, id := range ids {
			want[id] = true
		}
		for _, b := range backups {
			if want[b.ID] {
				checked = append(checked, b)
			}
		}
	}
	for _, b := range checked {
		if !damaged[b.ID.String()] {
			intact = append(intact, b.ID.String())
		}
	}
	if err := s.db.Verified(context.WithoutCancel(ctx), j.Repository, intact, time.Now()); err != nil {
		return err
	}
	if err := s.db.RecordVerify(context.WithoutCancel(ctx), state.Verify{Repository: j.Repository, Time: time.Now(), Run: run.info.ID,
		Backups: int64(res.Backups), Chunks: int64(res.Chunks), Problems: int64(len(res.Problems) + len(bad))}); err != nil {
		return err
	}
	run.logf(s, slog.LevelInfo, "", "checked %d backups, %d indexes, %d chunks (%s): %d problems",
		res.Backups, res.Indexes, res.Chunks, progress.Bytes(res.BytesChecked), len(res.Problems)+len(bad))
	if n := len(res.Problems) + len(bad); n > 0 {
		return fmt.Errorf("verify found %d damaged or missing files: %w", n, errs.ErrCorrupt)
	}
	return nil
}

// runCopy copies the backups the source has and the target lacks.
func (s *Server) runCopy(ctx context.Context, run *run) error {
	j := run.job
	src, srel, err := s.repository(ctx, j.From)
	if err != nil {
		return err
	}
	defer srel()
	dst, drel, err := s.repository(ctx, j.To)
	if err != nil {
		return err
	}
	defer drel()
	sctx, sunlock, err := s.lock(ctx, run, src, false, "copy")
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	defer sunlock()
	tctx, tunlock, err := s.lock(sctx, run, dst, false, "copy")
	if err != nil {
		return fmt.Errorf("target: %w", err)
	}
	plan, err := repocopy.Select(tctx, src, dst, repocopy.Selection{})
	if err != nil {
		tunlock()
		return err
	}
	copied := 0
	for _, b := range plan.Copy {
		if !selected(b.VM, j.CopyVMs) {
			continue
		}
		meter := progress.NewMeter(repocopy.Size(b))
		stop := progress.Report(tctx, meter, time.Second, func(p progress.Snapshot) {
			run.setProgress(api.Progress{VM: b.VM, Phase: "copy", Done: p.BytesDone, Total: p.BytesTotal, Rate: p.Rate, ETA: max(p.ETAS, 0)})
		})
		res, err := repocopy.Copy(tctx, src, dst, b, backup.Options{Meter: meter})
		stop()
		if err != nil {
			tunlock()
			return backup.Reclaim(context.WithoutCancel(ctx), dst, fmt.Errorf("copy backup %s: %w", b.ID.Short(), err),
				func(f string, a ...any) { run.logf(s, slog.LevelWarn, b.VM, f, a...) })
		}
		copied++
		run.logf(s, slog.LevelInfo, b.VM, "copied backup %s as %s: %s sent", b.ID.Short(), res.ID.Short(), progress.Bytes(res.Stats.BytesNew))
	}
	tunlock()
	run.logf(s, slog.LevelInfo, "", "%d backups copied, %d already there", copied, len(plan.Skipped))
	if len(plan.Damaged) > 0 {
		return fmt.Errorf("%d source backups cannot be read and were not copied: run verify on %s: %w", len(plan.Damaged), j.From, errs.ErrCorrupt)
	}
	return nil
}

// recoverVMs recovers the snapshot sets of the VMs an interrupted run was
// backing up, found through the run's job as configured now.
func (s *Server) recoverVMs(ctx context.Context, r state.Run, names []string) {
	cfg := s.Config()
	var j *config.Job
	for _, cj := range s.jobList() {
		if cj.Name == r.Job {
			j = cj
		}
	}
	if j == nil || j.Type != config.Backup || len(names) == 0 {
		return
	}
	vms, _ := s.selectVMs(ctx, cfg, j)
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	for _, vm := range vms {
		if !want[vm.Name] {
			continue
		}
		warn := func(m string) { s.log.Warn(m, "vm", vm.Name) }
		c, err := s.coordinator(cfg, j, vm, nil, warn)
		if err == nil {
			var sess *coord.Session
			if sess, err = c.Open(ctx); err == nil {
				var rep coord.RecoverReport
				rep, err = sess.Recover(ctx)
				sess.Close()
				if err == nil {
					s.log.Info("recovered the snapshot set of an interrupted run", "run", r.ID, "vm", vm.Name, "thawed", rep.Thawed, "removed", rep.Removed)
					if _, e := s.db.Log(ctx, r.ID, time.Now(), "warning", vm.Name, fmt.Sprintf("recovered at the server's start: thawed %v, removed %v", rep.Thawed, rep.Removed)); e != nil {
						s.log.Error("record a log line", "err", e)
					}
				}
			}
		}
		if err != nil {
			s.log.Error("recover the snapshot set of an interrupted run; the next backup of the VM recovers it", "run", r.ID, "vm", vm.Name, "err", err)
		}
	}
}
