package coord

import (
	"fmt"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Phase is where a snapshot set is in its life. It is recorded in the
// journal as a string ("preparing", ...); the strings are a contract with
// journals already on disk and with the JSON of 'snapshot list'.
type Phase int

// The phases, in the order a set goes through them (docs/snapshot-sets.md).
const (
	// PhasePreparing: the set is recorded; writers are being prepared and
	// the provider creates what Commit needs, outside the guest's I/O path.
	PhasePreparing Phase = iota
	// PhaseFreezing: writers are being frozen, then the provider commits.
	// Writers whose state is WriterFreezing may be frozen.
	PhaseFreezing
	// PhaseCommitted: every disk was captured; writers are being thawed.
	PhaseCommitted
	// PhaseThawed: every writer was thawed; the provider exposes the
	// shadow copies.
	PhaseThawed
	// PhaseExposed: the set is complete and readable.
	PhaseExposed
	// PhaseReleasing: the set is being deleted.
	PhaseReleasing
	// PhaseStale: an exposed set whose objects are gone from the VM (it
	// restarted). Only 'snapshot list' reports it; it is never recorded.
	PhaseStale
)

var phaseNames = []string{"preparing", "freezing", "committed", "thawed", "exposed", "releasing", "stale"}

// phaseNext is the one place the allowed phase transitions are written
// down. A set that fails in any phase before exposed is released and its
// record removed, not moved to another phase.
var phaseNext = map[Phase][]Phase{
	PhasePreparing: {PhaseFreezing, PhaseReleasing},
	PhaseFreezing:  {PhaseCommitted, PhaseReleasing},
	PhaseCommitted: {PhaseThawed, PhaseReleasing},
	PhaseThawed:    {PhaseExposed, PhaseReleasing},
	PhaseExposed:   {PhaseStale, PhaseReleasing},
	PhaseStale:     {PhaseReleasing},
	PhaseReleasing: {PhaseReleasing}, // a delete that failed is retried
}

func (p Phase) String() string {
	if p < 0 || int(p) >= len(phaseNames) {
		return fmt.Sprintf("phase(%d)", int(p))
	}
	return phaseNames[p]
}

// MarshalText writes the phase's journal string.
func (p Phase) MarshalText() ([]byte, error) {
	if p < 0 || int(p) >= len(phaseNames) {
		return nil, fmt.Errorf("unknown snapshot-set phase %d", int(p))
	}
	return []byte(p.String()), nil
}

// UnmarshalText reads a phase from its journal string.
func (p *Phase) UnmarshalText(b []byte) error {
	for i, n := range phaseNames {
		if string(b) == n {
			*p = Phase(i)
			return nil
		}
	}
	return fmt.Errorf("unknown snapshot-set phase %q (want one of %s): %w", b, strings.Join(phaseNames, ", "), errs.ErrCorrupt)
}

// CanMove reports whether a set may go from phase p to phase to.
func (p Phase) CanMove(to Phase) bool {
	for _, n := range phaseNext[p] {
		if n == to {
			return true
		}
	}
	return false
}

// moveTo moves the set to phase to. An illegal transition is a bug in
// vmshadow, reported as an error (the set is left as it was).
func (s *Set) moveTo(to Phase) error {
	if !s.Phase.CanMove(to) {
		return fmt.Errorf("snapshot set %s: illegal phase transition %s -> %s (a bug in vmshadow; run 'vmshadow recover' to clean up)", s.ID, s.Phase, to)
	}
	s.Phase = to
	return nil
}

// WriterStatus is what became of one writer in a set, recorded in the
// journal as a string ("pending", ...) like Phase.
type WriterStatus int

const (
	// WriterPending: the writer has not been asked to freeze.
	WriterPending WriterStatus = iota
	// WriterFreezing: its freeze was attempted and it is not known to be
	// thawed: it may be frozen, and Delete and Recover thaw it. It is
	// recorded BEFORE the freeze call.
	WriterFreezing
	// WriterThawed: it froze and was thawed.
	WriterThawed
	// WriterFailed: its prepare or freeze failed (WriterState.Error says
	// why) and it is not frozen.
	WriterFailed
)

var writerNames = []string{"pending", "freezing", "thawed", "failed"}

// writerNext is the one place the allowed writer transitions are written
// down. A thaw that fails leaves the writer in WriterFreezing, so that it
// is retried.
var writerNext = map[WriterStatus][]WriterStatus{
	WriterPending:  {WriterFreezing, WriterFailed},
	WriterFreezing: {WriterThawed, WriterFailed},
}

func (w WriterStatus) String() string {
	if w < 0 || int(w) >= len(writerNames) {
		return fmt.Sprintf("writer-state(%d)", int(w))
	}
	return writerNames[w]
}

// MarshalText writes the state's journal string.
func (w WriterStatus) MarshalText() ([]byte, error) {
	if w < 0 || int(w) >= len(writerNames) {
		return nil, fmt.Errorf("unknown writer state %d", int(w))
	}
	return []byte(w.String()), nil
}

// UnmarshalText reads a state from its journal string.
func (w *WriterStatus) UnmarshalText(b []byte) error {
	for i, n := range writerNames {
		if string(b) == n {
			*w = WriterStatus(i)
			return nil
		}
	}
	return fmt.Errorf("unknown writer state %q (want one of %s): %w", b, strings.Join(writerNames, ", "), errs.ErrCorrupt)
}

// CanMove reports whether a writer may go from state w to state to.
func (w WriterStatus) CanMove(to WriterStatus) bool {
	for _, n := range writerNext[w] {
		if n == to {
			return true
		}
	}
	return false
}

// moveTo moves the writer to state to; an illegal transition is a bug in
// vmshadow, reported as an error (the state is left as it was).
func (ws *WriterState) moveTo(to WriterStatus) error {
	if !ws.State.CanMove(to) {
		return fmt.Errorf("writer %s: illegal state transition %s -> %s (a bug in vmshadow; run 'vmshadow recover' to clean up)", ws.Name, ws.State, to)
	}
	ws.State = to
	return nil
}
