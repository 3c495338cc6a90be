package server

import (
	"time"

	"github.com/vmshadow/vmshadow/internal/schedule"
	"github.com/vmshadow/vmshadow/internal/server/config"
)

// replan wakes the scheduler to plan again (configuration reloaded, a job
// enabled or disabled).
func (s *Server) replan() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// scheduler starts jobs at their scheduled times (plus their random
// delay) until the server stops. At its start, a job with catch_up whose
// scheduled time passed while the server was down runs once.
func (s *Server) scheduler() {
	defer s.wg.Done()
	s.catchUp(time.Now())
	// The planned slot of each job, by name and schedule (a reload that
	// changes a job's schedule plans it afresh; a disabled job's slot is
	// kept and runs are not started for it).
	slots := map[string]time.Time{}
	for {
		now := time.Now()
		var soonest time.Time
		var due []*config.Job
		dueSlot := map[string]time.Time{}
		s.mu.Lock()
		for _, j := range s.jobs {
			st := s.stateOf(j.Name)
			if j.Schedule == nil || !st.enabledFor(j) {
				st.next = time.Time{}
				continue
			}
			key := j.Name + "\x00" + j.Schedule.String()
			slot, ok := slots[key]
			if !ok {
				slot = j.Schedule.Next(now)
				slots[key] = slot
			}
			at := slot.Add(schedule.Jitter(j.RandomDelay, j.Name, slot))
			st.next = at
			if !at.After(now) {
				due = append(due, j)
				dueSlot[j.Name] = slot
				slots[key] = j.Schedule.Next(slot)
				continue
			}
			if soonest.IsZero() || at.Before(soonest) {
				soonest = at
			}
		}
		s.mu.Unlock()
		for _, j := range due {
			if _, err := s.startRun(j, TriggerSchedule, dueSlot[j.Name]); err != nil {
				s.log.Warn("scheduled run not started", "job", j.Name, "err", err)
			}
		}
		if len(due) > 0 {
			continue // plan again at once: the next slots were moved on
		}
		var timer <-chan time.Time
		var t *time.Timer
		if !soonest.IsZero() {
			t = time.NewTimer(time.Until(soonest))
			timer = t.C
		}
		select {
		case <-s.ctx.Done():
			return
		case <-s.wake: // plan again: schedules may have changed
		case <-timer:
		}
		if t != nil {
			t.Stop()
		}
	}
}

// catchUp starts once each enabled job with catch_up whose scheduled time
// passed after its last scheduled run and before now.
func (s *Server) catchUp(now time.Time) {
	s.mu.Lock()
	var jobs []*config.Job
	var firsts []time.Time
	for _, j := range s.jobs {
		st := s.stateOf(j.Name)
		if j.Schedule == nil || !j.CatchUp || !st.enabledFor(j) {
			continue
		}
		if first, missed := j.Schedule.Missed(st.lastSlot, now); missed {
			jobs = append(jobs, j)
			firsts = append(firsts, first)
		}
	}
	s.mu.Unlock()
	for i, j := range jobs {
		s.log.Info("catching up a missed scheduled run", "job", j.Name, "missed", firsts[i])
		if _, err := s.startRun(j, TriggerCatchUp, firsts[i]); err != nil {
			s.log.Warn("catch-up run not started", "job", j.Name, "err", err)
		}
	}
}
