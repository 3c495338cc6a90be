package coord

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// GroupRef names the consistency group a VM's set belongs to: a set
// across several VMs, one instant for all (docs/snapshot-sets.md, "Sets
// across VMs").
type GroupRef struct {
	Name string `json:"name"`
	// SetID is the group's set: every member's set has its own ID (its
	// objects and scratch files are named by it, so that one VM's
	// leftovers are never taken for another's), and names this one.
	SetID string `json:"set_id"`
	// Members are the VMs' names, in the order given.
	Members []string `json:"members"`
	// Consistency is the whole group's level, the lowest of its members';
	// known once every member thawed.
	Consistency Level `json:"consistency"`
	// PauseMS is how long the members were paused together, from the
	// first pause to the last resume (0 for a group of one).
	PauseMS int64 `json:"pause_ms,omitempty"`
}

// Pauser is implemented by providers that can stop and restart a VM's
// virtual CPUs (QEMU's stop and cont, libvirt's suspend and resume). A set
// across several VMs pauses every member that runs, from before the first
// member's commit to after the last one's, so that all their disks are
// captured at one instant whatever the writers did.
type Pauser interface {
	// Running reports whether the VM's CPUs run now.
	Running(ctx context.Context) (bool, error)
	// Pause stops the VM's CPUs.
	Pause(ctx context.Context) error
	// Resume lets them run again; a VM that already runs is no error.
	Resume(ctx context.Context) error
}

// member is one VM of a set being created.
type member struct {
	s   *Session
	set *Set
	rec journalRecorder
	ok  []bool // writers that prepared
}

// writerRef is one writer of one member, in the group's freeze order.
type writerRef struct {
	m *member
	i int
}

// groupRun is a set being created across the VMs of one or more sessions.
type groupRun struct {
	ms []*member
	// pausedAt is when the members' pause started (zero: never).
	pausedAt time.Time
}

// CreateGroup takes one snapshot set across the VMs of sessions (opened,
// so locked, by the caller), named name in their journal records and
// backups (empty: not a group; only for a single VM). Every writer of
// every VM freezes (application writers first, VM by VM in the order
// given, then file-system writers), every running VM is paused, each VM's
// disks are committed, the VMs run again, and the writers thaw in reverse;
// the freeze window and the time limits are those of the whole set. Any
// VM failing aborts the set for all: everything created is released,
// every VM is resumed and thawed, and the VMs are as they were. The sets
// are returned in the order of sessions, each with its own ID and the
// group's (GroupRef.SetID; the first member's set has the group's ID).
//
// Members whose provider cannot pause them (XenServer, whose VM.snapshot
// pauses the VM by itself) are committed after the others, while those
// stay paused; at most one such VM can be in a group, since a second one
// would run on between the two snapshots.
func CreateGroup(ctx context.Context, name string, sessions []*Session) ([]*Set, error) {
	if len(sessions) == 0 {
		return nil, fmt.Errorf("a snapshot set needs at least one VM: %w", errs.ErrUsage)
	}
	if name == "" && len(sessions) > 1 {
		return nil, fmt.Errorf("a snapshot set across %d VMs needs a group name: %w", len(sessions), errs.ErrUsage)
	}
	if err := checkMembers(sessions); err != nil {
		return nil, err
	}
	for _, s := range sessions {
		if err := s.readyForCreate(ctx); err != nil {
			return nil, err
		}
	}
	g := &groupRun{}
	id, created := NewSetID(), time.Now().UTC().Truncate(time.Millisecond)
	var ref *GroupRef
	if name != "" {
		ref = &GroupRef{Name: name, SetID: id}
		for _, s := range sessions {
			ref.Members = append(ref.Members, s.vm.Name)
		}
	}
	for i, s := range sessions {
		if i > 0 {
			id = NewSetID()
		}
		set := &Set{ID: id, VM: s.vm.Name, Provider: s.c.Provider.Kind(), Created: created,
			Phase: PhasePreparing, PID: os.Getpid(), Ephemeral: s.c.Ephemeral, Group: ref.copy()}
		for _, w := range s.c.Writers {
			set.Writers = append(set.Writers, WriterState{Name: w.Name(), Level: w.Level(), Spec: w.Spec(), State: WriterPending})
		}
		m := &member{s: s, set: set, rec: s.rec()}
		if err := m.rec.save(set); err != nil {
			return nil, g.abort(ctx, err)
		}
		g.ms = append(g.ms, m)
	}
	if err := g.create(ctx); err != nil {
		return nil, g.abort(ctx, err)
	}
	sets := make([]*Set, len(g.ms))
	for i, m := range g.ms {
		sets[i] = m.set
	}
	return sets, nil
}

// copy returns a copy of the reference, so that each member's record
// holds its own.
func (r *GroupRef) copy() *GroupRef {
	if r == nil {
		return nil
	}
	c := *r
	c.Members = slices.Clone(r.Members)
	return &c
}

// checkMembers checks that the sessions are distinct VMs and that the
// group's instant can be kept: at most one VM that cannot be paused by
// the group (it is committed last, while the others stay paused).
func checkMembers(sessions []*Session) error {
	seen := map[string]bool{}
	var other []string
	for _, s := range sessions {
		if seen[s.vm.Key] {
			return fmt.Errorf("VM %s is named twice: %w", s.vm.Name, errs.ErrUsage)
		}
		seen[s.vm.Key] = true
		if _, ok := s.c.Provider.(Pauser); !ok {
			other = append(other, s.vm.Name+" ("+s.c.Provider.Kind()+")")
		}
	}
	if len(sessions) > 1 && len(other) > 1 {
		return fmt.Errorf("VMs %v cannot be paused together with the others: a group captures such a VM last, while the others stay paused, so a group can hold only one of them (each other one would run on between the snapshots, and the group would not be one instant): %w",
			other, errs.ErrUsage)
	}
	return nil
}

// readyForCreate checks that the VM has no set; a set left by a backup
// whose process died (ephemeral) is recovered first.
func (s *Session) readyForCreate(ctx context.Context) error {
	cur, err := s.c.Journal.Load(s.vm.Key)
	if err != nil {
		return err
	}
	if cur == nil {
		return nil
	}
	if cur.Ephemeral {
		// We hold the lock, so the process that owned it is gone.
		s.warn(nil, "recovering snapshot set %s left by an interrupted backup (pid %d)", cur.ID, cur.PID)
		_, err := s.Recover(ctx)
		return err
	}
	return fmt.Errorf("snapshot set %s (created %s by pid %d) exists for VM %s: delete it with 'vmshadow snapshot delete %s', or run 'vmshadow recover' if vmshadow was killed: %w",
		cur.ID, cur.Created.Format(time.RFC3339), cur.PID, s.vm.Name, cur.ID, errs.ErrBusy)
}

// create runs the phases across the members: prepare, freeze, commit
// (paused together), thaw, expose. The freeze window runs from the first
// freeze call to the end of the last thaw; thaw runs whatever happened
// before it.
func (g *groupRun) create(ctx context.Context) error {
	for _, m := range g.ms {
		ok, err := m.s.prepare(ctx, m.set, m.rec)
		if err != nil {
			return g.memberErr(m, err)
		}
		m.ok = ok
	}
	crashpoint.Hit("prepared")
	for _, m := range g.ms {
		if err := m.s.enter(m.set, PhaseFreezing, m.rec); err != nil {
			return err
		}
	}
	lead := g.ms[0].s
	lead.status("freeze")
	start := time.Now()
	window, cancelWindow := context.WithDeadline(ctx, start.Add(lead.c.FreezeTimeout))
	defer cancelWindow()
	order := g.freezeOrder()
	frozenErr := g.freeze(ctx, window, order)
	crashpoint.Hit("frozen")
	if frozenErr == nil {
		frozenErr = g.commit(ctx, window)
	}
	lead.status("thaw")
	thawErr := g.thaw(ctx, order)
	freezeMS := time.Since(start).Milliseconds()
	if len(order) == 0 {
		freezeMS = 0 // no writer took part: nothing was frozen
	}
	for _, m := range g.ms {
		m.set.FreezeMS = freezeMS
	}
	if frozenErr != nil {
		return frozenErr
	}
	if thawErr != nil {
		return thawErr
	}
	level := Application
	for _, m := range g.ms {
		if err := m.s.thawed(m.set, m.rec); err != nil {
			return g.memberErr(m, err)
		}
		level = min(level, m.set.Consistency)
	}
	for _, m := range g.ms {
		if m.set.Group != nil {
			m.set.Group.Consistency = level
			if !g.pausedAt.IsZero() {
				m.set.Group.PauseMS = m.set.PauseMS
			}
		}
		if err := m.s.expose(ctx, m.set, m.rec); err != nil {
			return g.memberErr(m, err)
		}
	}
	return nil
}

// memberErr names the member in an error of a set across several VMs.
func (g *groupRun) memberErr(m *member, err error) error {
	if len(g.ms) == 1 {
		return err
	}
	return fmt.Errorf("VM %s: %w", m.s.vm.Name, err)
}

// freezeOrder is the order the prepared writers of all members freeze
// in: writers above file-system level (application hooks) first, then
// file-system writers (guest agents), each kind VM by VM in the order
// given and, within a VM, in the writers' order. Thaw is the reverse.
func (g *groupRun) freezeOrder() []writerRef {
	var order []writerRef
	for _, fsPass := range []bool{false, true} {
		for _, m := range g.ms {
			for i, w := range m.s.c.Writers {
				if m.ok[i] && (w.Level() == Filesystem) == fsPass {
					order = append(order, writerRef{m, i})
				}
			}
		}
	}
	return order
}

// freeze is the freeze phase: the writers freeze in order.
func (g *groupRun) freeze(ctx, window context.Context, order []writerRef) error {
	for _, w := range order {
		if err := w.m.s.freezeOne(ctx, window, w.m.set, w.m.rec, w.i); err != nil {
			return g.memberErr(w.m, err)
		}
	}
	return nil
}

// commit is the commit phase: with several members, every running one is
// paused first and all resumed after the last commit (each records the
// pause before asking for it, so that Recover resumes a VM a killed
// process left paused). Members are paused, committed and resumed
// concurrently, each step finished for all before the next starts, to
// keep the pause short; a member that cannot be paused is committed after
// the others, while they stay paused.
func (g *groupRun) commit(ctx, window context.Context) error {
	lead := g.ms[0].s
	if expired(window) && ctx.Err() == nil {
		// The writers took the whole window: nothing is captured.
		return fmt.Errorf("the writers' freeze took the whole %s freeze limit, nothing was captured: %w", lead.c.FreezeTimeout, errs.ErrTimeout)
	}
	var err error
	if len(g.ms) > 1 {
		if err = g.pause(window); err != nil && expired(window) && ctx.Err() == nil {
			err = fmt.Errorf("pausing the VMs did not finish within the %s freeze limit: %v: %w", lead.c.FreezeTimeout, err, errs.ErrTimeout)
		}
	}
	if err == nil {
		var pausable, other []*member
		for _, m := range g.ms {
			if _, ok := m.s.c.Provider.(Pauser); ok || len(g.ms) == 1 {
				pausable = append(pausable, m)
			} else {
				other = append(other, m)
			}
		}
		commit := func(m *member) error {
			if err := m.s.commit(ctx, window, m.set, m.rec); err != nil {
				return g.memberErr(m, err)
			}
			return nil
		}
		if err = each(pausable, commit); err == nil {
			err = each(other, commit)
		}
	}
	if rerr := g.resume(ctx); rerr != nil && err == nil {
		err = rerr
	}
	return err
}

// each runs fn for every member concurrently and returns their errors
// joined, in the members' order.
func each(ms []*member, fn func(m *member) error) error {
	if len(ms) == 1 {
		return fn(ms[0])
	}
	errList := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errList[i] = fn(m)
		}()
	}
	wg.Wait()
	return errors.Join(errList...)
}

// pause pauses every member that can be paused and runs.
func (g *groupRun) pause(ctx context.Context) error {
	g.pausedAt = time.Now()
	err := each(g.ms, func(m *member) error {
		p, ok := m.s.c.Provider.(Pauser)
		if !ok {
			return nil
		}
		running, err := p.Running(ctx)
		if err != nil {
			return g.memberErr(m, fmt.Errorf("query whether the VM runs: %w", err))
		}
		if !running {
			return nil // paused or stopped already: nothing to pause, nothing to resume
		}
		m.set.Paused = true
		if err := m.rec.save(m.set); err != nil {
			return err
		}
		crashpoint.Hit("group-pausing")
		if err := p.Pause(ctx); err != nil {
			return g.memberErr(m, fmt.Errorf("pause the VM: %w", err))
		}
		return nil
	})
	if err != nil {
		return err
	}
	crashpoint.Hit("group-paused")
	return nil
}

// resume lets every member the set paused run again, whatever became of
// ctx, and records how long the group was paused.
func (g *groupRun) resume(ctx context.Context) error {
	err := each(g.ms, func(m *member) error {
		if err := m.s.resume(ctx, m.set); err != nil {
			return g.memberErr(m, err)
		}
		return nil
	})
	if !g.pausedAt.IsZero() {
		ms := time.Since(g.pausedAt).Milliseconds()
		for _, m := range g.ms {
			m.set.PauseMS = max(m.set.PauseMS, ms)
		}
	}
	return err
}

// resume lets a VM that its set paused (set.Paused) run again, with its
// own time limit, and records it. The one resume path, for Create,
// Delete and Recover.
func (s *Session) resume(ctx context.Context, set *Set) error {
	if !set.Paused {
		return nil
	}
	p, ok := s.c.Provider.(Pauser)
	if !ok {
		return fmt.Errorf("the set paused VM %s but its provider %s cannot resume it: resume it by hand", s.vm.Name, s.c.Provider.Kind())
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.c.WriterTimeout)
	defer cancel()
	if err := p.Resume(rctx); err != nil {
		return fmt.Errorf("VM %s was paused for the group's snapshot and could not be resumed (%v): resume it by hand, or run 'vmshadow recover'", s.vm.Name, err)
	}
	set.Paused = false
	return s.rec().save(set)
}

// thaw is the thaw phase of Create: every writer whose freeze was
// attempted is thawed, in the reverse freeze order, and what failed is
// recorded in each member's record.
func (g *groupRun) thaw(ctx context.Context, order []writerRef) error {
	failed := map[*member][]thawFailure{}
	for i := len(order) - 1; i >= 0; i-- {
		w := order[i]
		if w.m.set.Writers[w.i].State != WriterFreezing {
			continue
		}
		if err := w.m.s.thawOne(ctx, w.m.set, w.i, true); err != nil {
			failed[w.m] = append(failed[w.m], thawFailure{w.i, err})
		}
	}
	var firstErr error
	for _, m := range g.ms {
		err := m.s.thawFailed(m.set, failed[m])
		if serr := m.rec.save(m.set); serr != nil && err == nil {
			err = serr
		}
		if err != nil && firstErr == nil {
			firstErr = g.memberErr(m, err)
		}
	}
	return firstErr
}

// abort undoes a set that failed, member by member in reverse: the VM
// resumed, everything created released, the record removed unless a
// writer may still be frozen (then recover must thaw it).
func (g *groupRun) abort(ctx context.Context, err error) error {
	var problems []string
	// First every member resumed and released, each with its own time
	// limit, so that a slow one cannot use up another's.
	released := make([]bool, len(g.ms))
	for i := len(g.ms) - 1; i >= 0; i-- {
		m := g.ms[i]
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
		if rerr := m.s.resume(cctx, m.set); rerr != nil {
			problems = append(problems, rerr.Error())
		}
		if _, rerr := m.s.c.Provider.Release(cctx, m.set); rerr != nil {
			problems = append(problems, g.memberErr(m, fmt.Errorf("cleanup failed too: %w", rerr)).Error())
		} else {
			released[i] = true
		}
		cancel()
	}
	// Then the writers the live thaw left frozen, through new connections
	// (each call with its writer time limit), and the records of members
	// left as they were removed.
	for i := len(g.ms) - 1; i >= 0; i-- {
		m := g.ms[i]
		if len(m.s.stillFrozen(m.set)) > 0 {
			m.s.thawAgain(ctx, m.set)
			if frozen := m.s.stillFrozen(m.set); len(frozen) > 0 {
				problems = append(problems, g.memberErr(m, fmt.Errorf("writers %v may still be frozen", frozen)).Error())
				continue
			}
		}
		if !released[i] || m.set.Paused {
			continue // keep the record for recover
		}
		if rerr := m.s.c.Journal.Remove(m.s.vm.Key); rerr != nil {
			problems = append(problems, rerr.Error())
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w; %v: run 'vmshadow recover'", err, problems)
	}
	return err
}

// thawAgain thaws the writers of a failed set that its live writers could
// not thaw (a guest agent whose freeze never answered holds its
// connection): each one's connection is closed, and it is thawed through
// a writer rebuilt from the journal, over a new connection, as Recover
// would. The outcome is recorded.
func (s *Session) thawAgain(ctx context.Context, set *Set) {
	for i, ws := range set.Writers {
		if ws.State == WriterFreezing {
			s.c.Writers[i].Close()
		}
	}
	s.thaw(ctx, set)
	s.rec().save(set)
}

// RecoverGroup is Recover for several VMs, such as the members of a group
// set, with the order of a set across them: every VM a set left paused is
// resumed first (a paused guest cannot thaw), then the writers that may be
// frozen are thawed in the reverse of a group's freeze order (file-system
// writers first, the last VM's first; application writers last), then
// each VM's Recover removes the rest. It returns each VM's report, in the
// order of sessions, and the problems of those that failed.
func RecoverGroup(ctx context.Context, sessions []*Session) ([]RecoverReport, error) {
	sets := make([]*Set, len(sessions))
	early := make([]RecoverReport, len(sessions))
	var errList []error
	for i, s := range sessions {
		set, err := s.c.Journal.Load(s.vm.Key)
		if err != nil {
			errList = append(errList, fmt.Errorf("VM %s: %w", s.vm.Name, err))
			continue
		}
		sets[i] = set
		if set != nil && set.Paused {
			if err := s.resume(ctx, set); err != nil {
				errList = append(errList, err)
			} else {
				early[i].Resumed = true
			}
		}
	}
	for _, fsPass := range []bool{true, false} {
		for i := len(sessions) - 1; i >= 0; i-- {
			set := sets[i]
			if set == nil {
				continue
			}
			for w := len(set.Writers) - 1; w >= 0; w-- {
				ws := set.Writers[w]
				if ws.State != WriterFreezing || (ws.Level == Filesystem) != fsPass {
					continue
				}
				if err := sessions[i].thawOne(ctx, set, w, false); err == nil {
					early[i].Thawed = append(early[i].Thawed, ws.Name)
				}
			}
			sessions[i].rec().save(set)
		}
	}
	reps := make([]RecoverReport, len(sessions))
	for i, s := range sessions {
		rep, err := s.recover(ctx, false)
		rep.Resumed = rep.Resumed || early[i].Resumed
		rep.Thawed = append(early[i].Thawed, rep.Thawed...)
		reps[i] = rep
		if err != nil {
			errList = append(errList, fmt.Errorf("VM %s: %w", s.vm.Name, err))
		}
	}
	return reps, errors.Join(errList...)
}

// expired reports whether the freeze window is over, by its deadline as
// well as by its context: a call that failed at the deadline (a socket's
// own timeout) may return before the window's context says so.
func expired(window context.Context) bool {
	if window.Err() != nil {
		return true
	}
	d, ok := window.Deadline()
	return ok && !time.Now().Before(d)
}
