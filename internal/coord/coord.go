// Package coord owns the snapshot-set sequence of the Volume Shadow Copy
// Service model: identify, prepare, freeze, commit, thaw, expose, and later
// release. It enforces the time limits, decides the consistency level a set
// reached, keeps the journal that lets Recover undo a set left behind by a
// killed process, and allows one set per VM at a time. The phases and
// writer states are typed and their transitions written down in phase.go;
// providers write the journal through a Recorder. A set may span several
// VMs at one instant (a consistency group, group.go: CreateGroup,
// RecoverGroup); a set of one VM is a group of one. docs/snapshot-sets.md
// is the specification.
//
// It knows nothing about any hypervisor or guest: providers (internal/provider/...)
// capture and expose disks, writers (internal/writer) freeze and thaw.
package coord

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// Writer is something that can make the data on the disks consistent and
// hold it so for a short while: the guest agent freezing file systems, a
// hook script pausing a database. Freeze and Thaw must honour ctx's deadline.
type Writer interface {
	// Name identifies the writer in messages ("guest-agent", "hook:/path").
	Name() string
	// Level is the consistency the writer contributes when it froze.
	Level() Level
	// Spec describes the writer so that Recover can rebuild it.
	Spec() WriterSpec
	// Prepare checks that the writer can take part (connects, checks
	// support) and tells it which set it serves. It is called before
	// anything is created, and by Recover before a thaw.
	Prepare(ctx context.Context, set SetContext) error
	// Freeze makes the data consistent and holds it until Thaw.
	Freeze(ctx context.Context) error
	// Thaw releases what Freeze held. It is called once Freeze was
	// attempted, whatever Freeze returned, and must be safe when nothing
	// is frozen.
	Thaw(ctx context.Context) error
	// Close releases connections.
	Close() error
}

// WriterSpec is the persistent description of a writer.
type WriterSpec struct {
	Kind string `json:"kind"` // "agent", "hook" or "guest-hook"
	Path string `json:"path"` // agent socket, hook executable, or guest hook's path in the guest
	// Socket is the agent socket a guest hook runs through.
	Socket string `json:"socket,omitempty"`
}

// SetContext is what a writer is told about the set it serves.
type SetContext struct {
	VM    string
	SetID string
	// Group is set in a set across several VMs.
	Group *GroupRef
}

// FrozenReporter is implemented by writers that can tell whether they are
// frozen now (the guest agent). Recover thaws such writers when they are,
// even without a journal record.
type FrozenReporter interface {
	Frozen(ctx context.Context) (bool, error)
}

// VMInfo is what a provider reports about the VM.
type VMInfo struct {
	Name string
	// Key names the VM's journal record and lock; stable for the VM.
	Key string
}

// Provider captures the disks of one VM. Every method that creates
// something records it with rec.Record BEFORE creating it, so that Release
// can always find and remove it, even from a record left by a process that
// was killed.
type Provider interface {
	// Kind is the provider's name ("qemu").
	Kind() string
	// Identify connects to the hypervisor, checks what the provider needs
	// and returns the VM. It fails with errs.ErrBusy if the VM carries
	// leftovers of a set that is not in the journal.
	Identify(ctx context.Context) (VMInfo, error)
	// Prepare checks space and creates what Commit needs, without
	// touching the guest's I/O path.
	Prepare(ctx context.Context, set *Set, rec Recorder) error
	// Commit captures every disk at one instant. Writers are frozen while
	// it runs: it must be fast and honour ctx's deadline.
	Commit(ctx context.Context, set *Set, rec Recorder) error
	// Expose makes each disk's shadow copy readable and fills set.Shadows.
	Expose(ctx context.Context, set *Set, rec Recorder) error
	// Release removes everything the set created, in whatever phase it
	// stopped; what was never created or is already gone is no error.
	// With a nil set it removes anything the provider can recognise as
	// its own leftovers. It returns what it removed.
	Release(ctx context.Context, set *Set) ([]string, error)
	// Alive reports whether the set's objects still exist in the VM.
	Alive(ctx context.Context, set *Set) (bool, error)
	// Close drops the connection to the hypervisor.
	Close() error
}

// Options are the time limits and requirements of a set.
type Options struct {
	// FreezeTimeout bounds the time from the first freeze to the last thaw.
	FreezeTimeout time.Duration
	// WriterTimeout bounds each writer call.
	WriterTimeout time.Duration
	// Require fails the set unless it reaches this level.
	Require Level
	// Ephemeral sets live only as long as the process that created them
	// holds the VM's lock (a backup reading its set). A later session that
	// finds one left behind knows its owner died, and recovers it before
	// creating its own set.
	Ephemeral bool
	// Status and Warn report progress and problems; either may be nil.
	Status func(phase string)
	Warn   func(msg string)
}

// Default time limits, as in VSS.
const (
	DefaultFreezeTimeout = 10 * time.Second
	DefaultWriterTimeout = 60 * time.Second
	// cleanupTimeout bounds release work done after a failure or signal.
	cleanupTimeout = 60 * time.Second
)

// Coordinator runs snapshot sets for one VM.
type Coordinator struct {
	Provider Provider
	Writers  []Writer
	Journal  *Journal
	// Rebuild makes a writer from its journal record, so that Delete and
	// Recover can thaw writers a set left frozen.
	Rebuild func(WriterSpec) (Writer, error)
	Options
}

// Session is an open coordinator: the VM identified and, for operations
// that change it, locked against other vmshadow processes.
type Session struct {
	c      *Coordinator
	vm     VMInfo
	unlock func()
}

// Open identifies the VM and takes its lock (errs.ErrBusy when another
// vmshadow process holds it). Close the session when done; on failure the
// provider's connection is closed.
func (c *Coordinator) Open(ctx context.Context) (*Session, error) {
	if c.FreezeTimeout <= 0 {
		c.FreezeTimeout = DefaultFreezeTimeout
	}
	if c.WriterTimeout <= 0 {
		c.WriterTimeout = DefaultWriterTimeout
	}
	vm, err := c.Provider.Identify(ctx)
	if err != nil {
		c.Provider.Close()
		return nil, err
	}
	unlock, err := c.Journal.Lock(vm.Key)
	if err != nil {
		c.Provider.Close() // log out of a pool rather than leave the session to expire
		return nil, err
	}
	return &Session{c: c, vm: vm, unlock: unlock}, nil
}

// Inspect identifies the VM without taking its lock: for reading its state
// (List, Current) while another process, such as a running backup, holds
// the lock. Do not create, delete or recover through it.
func (c *Coordinator) Inspect(ctx context.Context) (*Session, error) {
	vm, err := c.Provider.Identify(ctx)
	if err != nil {
		c.Provider.Close()
		return nil, err
	}
	return &Session{c: c, vm: vm, unlock: func() {}}, nil
}

// VM is the identified VM.
func (s *Session) VM() VMInfo { return s.vm }

// Close releases the lock and the provider's and writers' connections.
func (s *Session) Close() error {
	s.unlock()
	for _, w := range s.c.Writers {
		w.Close()
	}
	return s.c.Provider.Close()
}

func (s *Session) status(phase string) {
	if s.c.Status != nil {
		s.c.Status(phase)
	}
}

func (s *Session) warn(set *Set, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if set != nil {
		set.Warnings = append(set.Warnings, msg)
	}
	if s.c.Warn != nil {
		s.c.Warn(msg)
	}
}

// Record implements Recorder for the VM's journal record: a provider
// method that changes its state outside Create and Delete (completing a
// checkpoint) is given the session.
func (s *Session) Record(set *Set, state any) error { return s.rec().Record(set, state) }

func (s *Session) rec() journalRecorder { return journalRecorder{s.c.Journal, s.vm.Key} }

// Current returns the VM's set from the journal, or nil.
func (s *Session) Current() (*Set, error) { return s.c.Journal.Load(s.vm.Key) }

// Create takes a snapshot set. On any failure everything it created is
// released, writers are thawed, and the VM is as it was. It is a group
// of one (see CreateGroup): one code path for both.
func (s *Session) Create(ctx context.Context) (*Set, error) {
	sets, err := CreateGroup(ctx, "", []*Session{s})
	if err != nil {
		return nil, err
	}
	return sets[0], nil
}

func (s *Session) stillFrozen(set *Set) []string {
	var names []string
	for _, w := range set.Writers {
		if w.State == WriterFreezing {
			names = append(names, w.Name)
		}
	}
	return names
}

// enter moves the set to phase to and records it in the journal.
func (s *Session) enter(set *Set, to Phase, rec journalRecorder) error {
	if err := set.moveTo(to); err != nil {
		return err
	}
	return rec.save(set)
}

// prepare is the prepare phase: each writer checks it can take part (a
// writer that cannot is left out, unless --require needs it), then the
// provider creates what Commit needs. It returns which writers are ready.
func (s *Session) prepare(ctx context.Context, set *Set, rec journalRecorder) ([]bool, error) {
	c := s.c
	ok := make([]bool, len(c.Writers))
	for i, w := range c.Writers {
		s.status("prepare writer " + w.Name())
		wctx, cancel := context.WithTimeout(ctx, c.WriterTimeout)
		err := w.Prepare(wctx, SetContext{VM: set.VM, SetID: set.ID, Group: set.Group})
		cancel()
		if err != nil {
			if ferr := s.writerFailed(set, i, "prepare", err); ferr != nil {
				return nil, ferr
			}
			continue
		}
		ok[i] = true
	}
	s.status("prepare")
	if err := c.Provider.Prepare(ctx, set, rec); err != nil {
		return nil, fmt.Errorf("prepare: %w", err)
	}
	return ok, nil
}

// freezeOne freezes writer i, recorded as freezing before its call so
// that Recover thaws it. ctx is the set's context, window the freeze
// window's.
func (s *Session) freezeOne(ctx, window context.Context, set *Set, rec journalRecorder, i int) error {
	c := s.c
	w := c.Writers[i]
	if err := set.Writers[i].moveTo(WriterFreezing); err != nil {
		return err
	}
	if err := rec.save(set); err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(window, c.WriterTimeout)
	err := w.Freeze(wctx)
	cancel()
	if err != nil {
		if expired(window) && ctx.Err() == nil {
			return fmt.Errorf("freeze of %s did not finish within the %s freeze limit: %w", w.Name(), c.FreezeTimeout, errs.ErrTimeout)
		}
		if ferr := s.writerFailed(set, i, "freeze", err); ferr != nil {
			return ferr
		}
	}
	return nil
}

// commit is the commit phase: the provider captures every disk at one
// instant, within the freeze window.
func (s *Session) commit(ctx, window context.Context, set *Set, rec journalRecorder) error {
	s.status("commit")
	if err := s.c.Provider.Commit(window, set, rec); err != nil {
		if expired(window) && ctx.Err() == nil {
			return fmt.Errorf("commit did not finish within the %s freeze limit: %v: %w", s.c.FreezeTimeout, err, errs.ErrTimeout)
		}
		return fmt.Errorf("commit: %w", err)
	}
	if err := set.moveTo(PhaseCommitted); err != nil {
		return err
	}
	crashpoint.Hit("committed")
	return nil
}

// thawFailed records the writers the thaw path could not thaw in Create.
func (s *Session) thawFailed(set *Set, failed []thawFailure) error {
	var firstErr error
	for _, f := range failed {
		// The writer may still be frozen: its state stays freezing so
		// that Delete and Recover try again. A thaw that failed may also
		// mean the writer let go early: its data cannot be trusted to be
		// consistent.
		if ferr := s.writerFailed(set, f.i, "thaw", f.err); ferr != nil && firstErr == nil {
			firstErr = ferr
		}
	}
	return firstErr
}

// thawed ends the thaw phase of a set whose commit succeeded: it checks
// that no writer is left frozen and that the freeze window was kept,
// decides the consistency level, and records the set as thawed.
func (s *Session) thawed(set *Set, rec journalRecorder) error {
	c := s.c
	if frozen := s.stillFrozen(set); len(frozen) > 0 {
		// Never leave a guest or an application frozen behind a set
		// that looks fine: fail, keep the journal, let recover thaw.
		return fmt.Errorf("thaw of %v failed; they may still be frozen", frozen)
	}
	if set.FreezeMS > c.FreezeTimeout.Milliseconds() {
		return fmt.Errorf("writers were frozen for %d ms, more than the %s limit (raise --freeze-timeout if the guest needs longer): %w",
			set.FreezeMS, c.FreezeTimeout, errs.ErrTimeout)
	}
	crashpoint.Hit("thawed")
	if err := set.moveTo(PhaseThawed); err != nil {
		return err
	}
	set.Consistency = s.level(set)
	if set.Consistency < c.Require {
		return fmt.Errorf("set reached %s consistency, %s was required: %w", set.Consistency, c.Require, errs.ErrConsistency)
	}
	if len(set.Writers) > 0 && set.Consistency == Crash {
		s.warn(set, "no writer froze: the set is crash-consistent only")
	}
	return rec.save(set)
}

// expose is the expose phase: the provider makes the shadow copies
// readable, and the set is complete.
func (s *Session) expose(ctx context.Context, set *Set, rec journalRecorder) error {
	s.status("expose")
	if err := s.c.Provider.Expose(ctx, set, rec); err != nil {
		return fmt.Errorf("expose: %w", err)
	}
	return s.enter(set, PhaseExposed, rec)
}

// writerFailed records a writer's failure. It returns an error when the
// failure must abort the set (the writer was needed for --require).
func (s *Session) writerFailed(set *Set, i int, what string, err error) error {
	w := &set.Writers[i]
	if w.State != WriterFreezing {
		if err := w.moveTo(WriterFailed); err != nil {
			return err
		}
	}
	w.Error = fmt.Sprintf("%s: %v", what, err)
	if s.c.Require >= Filesystem && w.Level <= s.c.Require {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("writer %s %s: %v (limit %s): %w", w.Name, what, err, s.c.WriterTimeout, errs.ErrTimeout)
		}
		return fmt.Errorf("writer %s %s failed and %s consistency is required: %v: %w", w.Name, what, s.c.Require, err, errs.ErrConsistency)
	}
	s.warn(set, "writer %s %s failed, going on without it: %v", w.Name, what, err)
	return nil
}

// thawFailure is one writer the thaw path could not thaw.
type thawFailure struct {
	i   int
	err error
}

// thaw is the one thaw path for Delete and Recover: it thaws, in reverse
// order, every writer of set that may be frozen (state freezing), each
// rebuilt from its journal record (the process that froze it may be
// gone). Create thaws its live writers through thawOne in the group's
// reverse freeze order. thaw changes the set in memory only: the caller
// records the outcome.
func (s *Session) thaw(ctx context.Context, set *Set) (thawed []int, failed []thawFailure) {
	for i := len(set.Writers) - 1; i >= 0; i-- {
		if set.Writers[i].State != WriterFreezing {
			continue
		}
		if err := s.thawOne(ctx, set, i, false); err != nil {
			failed = append(failed, thawFailure{i, err})
			continue
		}
		thawed = append(thawed, i)
	}
	return thawed, failed
}

// thawOne thaws writer i of set, which may be frozen, with its own time
// limit whatever became of ctx: the writer Create prepared when live,
// else one rebuilt from its journal record, prepared and closed. A writer
// thawed is recorded as thawed, or failed when Create recorded an error
// for it; one rebuilt gets "thawed late". A writer whose thaw failed stays
// freezing.
func (s *Session) thawOne(ctx context.Context, set *Set, i int, live bool) error {
	ws := &set.Writers[i]
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.c.WriterTimeout)
	defer cancel()
	var err error
	switch {
	case live:
		err = s.c.Writers[i].Thaw(wctx)
	case s.c.Rebuild == nil:
		err = errors.New("no way to rebuild the writer")
	default:
		var w Writer
		if w, err = s.c.Rebuild(ws.Spec); err == nil {
			if err = w.Prepare(wctx, SetContext{VM: set.VM, SetID: set.ID, Group: set.Group}); err == nil {
				err = w.Thaw(wctx)
			}
			w.Close()
		}
	}
	if err != nil {
		return err
	}
	to := WriterThawed
	if live && ws.Error != "" {
		to = WriterFailed // froze badly, thawed fine
	}
	if err := ws.moveTo(to); err != nil {
		return err
	}
	if !live && ws.Error == "" {
		ws.Error = "thawed late"
	}
	return nil
}

// level is the consistency the set reached: application when every writer
// froze and at least one application writer was among them; filesystem
// when the file systems froze; crash otherwise.
func (s *Session) level(set *Set) Level {
	fs, app, all := false, false, true
	for _, w := range set.Writers {
		if w.State != WriterThawed {
			all = false
			continue
		}
		switch w.Level {
		case Filesystem:
			fs = true
		case Application:
			app = true
		}
	}
	switch {
	case app && all:
		return Application
	case fs:
		return Filesystem
	}
	return Crash
}

// Delete releases the set with the given id, or the VM's part of the
// group set with that id.
func (s *Session) Delete(ctx context.Context, id string) (*Set, error) {
	set, err := s.c.Journal.Load(s.vm.Key)
	if err != nil {
		return nil, err
	}
	if set == nil || (set.ID != id && (set.Group == nil || set.Group.SetID != id)) {
		return nil, fmt.Errorf("no snapshot set %q on VM %s (see 'vmshadow snapshot list'): %w", id, s.vm.Name, errs.ErrNotFound)
	}
	if err := set.moveTo(PhaseReleasing); err != nil {
		return nil, err
	}
	if err := s.rec().save(set); err != nil {
		return nil, err
	}
	if err := s.resume(ctx, set); err != nil {
		return nil, fmt.Errorf("set %s: %w", id, err)
	}
	if _, errList := s.thawLeftFrozen(ctx, set); len(errList) > 0 {
		return nil, fmt.Errorf("set %s: %v (run 'vmshadow recover' to retry)", id, errList)
	}
	s.status("release")
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	if _, err := s.c.Provider.Release(cctx, set); err != nil {
		return nil, fmt.Errorf("release set %s: %w (run 'vmshadow recover' to retry)", id, err)
	}
	return set, s.c.Journal.Remove(s.vm.Key)
}

// List returns the VM's sets (at most one) and whether each still exists
// in the VM. A set whose objects are gone (the VM restarted) is stale.
func (s *Session) List(ctx context.Context) ([]*Set, error) {
	set, err := s.c.Journal.Load(s.vm.Key)
	if err != nil || set == nil {
		return nil, err
	}
	alive, err := s.c.Provider.Alive(ctx, set)
	if err != nil {
		return nil, err
	}
	if !alive && set.Phase == PhaseExposed {
		if err := set.moveTo(PhaseStale); err != nil {
			return nil, err
		}
	}
	return []*Set{set}, nil
}

// RecoverReport says what Recover did.
type RecoverReport struct {
	SetID string `json:"set_id,omitempty"`
	// Resumed: the VM was left paused by a group set, and was resumed.
	Resumed bool     `json:"resumed,omitempty"`
	Thawed  []string `json:"thawed"`
	Removed []string `json:"removed"`
	Errors  []string `json:"errors,omitempty"`
}

// thawLeftFrozen thaws, in reverse order, the set's writers that may still
// be frozen (their thaw failed, or the process died) through the one thaw
// path, rebuilding them from the journal, and records the outcome. It
// returns what it thawed and what went wrong.
func (s *Session) thawLeftFrozen(ctx context.Context, set *Set) (thawed, problems []string) {
	done, failed := s.thaw(ctx, set)
	for _, i := range done {
		thawed = append(thawed, set.Writers[i].Name)
	}
	for _, f := range failed {
		problems = append(problems, fmt.Sprintf("thaw %s: %v", set.Writers[f.i].Name, f.err))
	}
	s.rec().save(set)
	return thawed, problems
}

// Recover undoes whatever a killed vmshadow left behind: it thaws writers
// whose freeze was attempted, removes the set's objects and any other
// leftovers the provider recognises, and deletes the journal record. On a
// clean VM it does nothing. Writers given to the coordinator that can
// report their state (FrozenReporter) are thawed too when they are frozen.
func (s *Session) Recover(ctx context.Context) (RecoverReport, error) {
	return s.recover(ctx, true)
}

// recover is Recover; alone says whether the VM is recovered alone (then
// the members of its group are named, to be recovered too).
func (s *Session) recover(ctx context.Context, alone bool) (RecoverReport, error) {
	rep := RecoverReport{Thawed: []string{}, Removed: []string{}}
	set, err := s.c.Journal.Load(s.vm.Key)
	if err != nil {
		return rep, err
	}
	thawed := map[WriterSpec]bool{}
	if set != nil {
		rep.SetID = set.ID
		if alone && set.Group != nil && len(set.Group.Members) > 1 {
			s.warn(nil, "set %s of VM %s is part of group %s (VMs %v): recover every one of them", set.ID, s.vm.Name, set.Group.Name, set.Group.Members)
		}
		// A paused guest cannot thaw: resume first.
		if set.Paused {
			if err := s.resume(ctx, set); err != nil {
				rep.Errors = append(rep.Errors, err.Error())
			} else {
				rep.Resumed = true
			}
		}
		names, problems := s.thawLeftFrozen(ctx, set)
		rep.Thawed = append(rep.Thawed, names...)
		rep.Errors = append(rep.Errors, problems...)
		for _, ws := range set.Writers {
			if ws.State == WriterThawed {
				thawed[ws.Spec] = true
			}
		}
	}
	for _, w := range s.c.Writers {
		fr, ok := w.(FrozenReporter)
		if !ok || thawed[w.Spec()] {
			continue
		}
		wctx, cancel := context.WithTimeout(ctx, s.c.WriterTimeout)
		err := w.Prepare(wctx, SetContext{VM: s.vm.Name})
		frozen := false
		if err == nil {
			frozen, err = fr.Frozen(wctx)
		}
		if err == nil && frozen {
			if err = w.Thaw(wctx); err == nil {
				rep.Thawed = append(rep.Thawed, w.Name())
			}
		}
		cancel()
		if err != nil {
			rep.Errors = append(rep.Errors, fmt.Sprintf("check %s: %v", w.Name(), err))
		}
	}
	removed, err := s.c.Provider.Release(ctx, set)
	rep.Removed = append(rep.Removed, removed...)
	if err != nil {
		rep.Errors = append(rep.Errors, err.Error())
	}
	if len(rep.Errors) > 0 {
		if set != nil {
			s.rec().save(set)
		}
		return rep, fmt.Errorf("recover left problems (run it again once they are fixed): %v", rep.Errors)
	}
	return rep, s.c.Journal.Remove(s.vm.Key)
}
