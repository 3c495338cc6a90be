package coord

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// oldJournal is a record as vmshadow wrote it while phases and writer
// states were plain strings: journals like it are on disk and must load.
const oldJournal = `{
  "version": 1,
  "set_id": "abcdefghij",
  "vm": "web1",
  "provider": "qemu",
  "consistency": "filesystem",
  "created": "2026-11-02T10:00:00.123Z",
  "freeze_ms": 0,
  "shadows": null,
  "writers": [
    {"name": "hook:/x", "level": "application", "spec": {"kind": "hook", "path": "/x"}, "state": "failed", "error": "freeze: boom"},
    {"name": "guest-agent", "level": "filesystem", "spec": {"kind": "agent", "path": "/run/qga.sock"}, "state": "freezing"},
    {"name": "other", "level": "filesystem", "spec": {"kind": "agent", "path": "/run/o.sock"}, "state": "pending"},
    {"name": "done", "level": "filesystem", "spec": {"kind": "agent", "path": "/run/d.sock"}, "state": "thawed"}
  ],
  "phase": "committed",
  "pid": 4242,
  "provider_state": {"qmp": "/run/vm.qmp"}
}`

func TestJournalOldFormLoads(t *testing.T) {
	j := &Journal{Dir: t.TempDir()}
	if err := os.WriteFile(j.path("vm", ".json"), []byte(oldJournal), 0o600); err != nil {
		t.Fatal(err)
	}
	set, err := j.Load("vm")
	if err != nil {
		t.Fatal(err)
	}
	if set.Phase != PhaseCommitted {
		t.Errorf("phase = %v, want committed", set.Phase)
	}
	want := []WriterStatus{WriterFailed, WriterFreezing, WriterPending, WriterThawed}
	for i, w := range want {
		if set.Writers[i].State != w {
			t.Errorf("writer %d state = %v, want %v", i, set.Writers[i].State, w)
		}
	}
	// Written back, the record carries the same strings.
	if err := j.Save("vm", set); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(j.path("vm", ".json"))
	var raw struct {
		Phase   string `json:"phase"`
		Writers []struct {
			State string `json:"state"`
		} `json:"writers"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	var states []string
	for _, w := range raw.Writers {
		states = append(states, w.State)
	}
	if raw.Phase != "committed" || strings.Join(states, ",") != "failed,freezing,pending,thawed" {
		t.Errorf("saved phase %q states %v", raw.Phase, states)
	}
	// Every phase and state survives the round trip under its old name.
	for i, n := range phaseNames {
		b, err := Phase(i).MarshalText()
		if err != nil || string(b) != n {
			t.Errorf("phase %d marshals as %q (%v), want %q", i, b, err, n)
		}
	}
	for i, n := range writerNames {
		b, err := WriterStatus(i).MarshalText()
		if err != nil || string(b) != n {
			t.Errorf("writer state %d marshals as %q (%v), want %q", i, b, err, n)
		}
	}
}

func TestJournalRejectsUnknownPhase(t *testing.T) {
	j := &Journal{Dir: t.TempDir()}
	for _, bad := range []string{
		strings.Replace(oldJournal, `"phase": "committed"`, `"phase": "committing"`, 1),
		strings.Replace(oldJournal, `"state": "pending"`, `"state": "asleep"`, 1),
	} {
		if err := os.WriteFile(j.path("vm", ".json"), []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := j.Load("vm"); !errors.Is(err, errs.ErrCorrupt) {
			t.Errorf("load: %v, want corrupt", err)
		}
	}
}

func TestTransitions(t *testing.T) {
	// The path of a set that succeeds, then is deleted.
	set := &Set{ID: "s"}
	for _, p := range []Phase{PhaseFreezing, PhaseCommitted, PhaseThawed, PhaseExposed, PhaseReleasing, PhaseReleasing} {
		if err := set.moveTo(p); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct{ from, to Phase }{
		{PhasePreparing, PhaseCommitted}, {PhaseFreezing, PhaseThawed}, {PhaseCommitted, PhaseExposed},
		{PhaseExposed, PhasePreparing}, {PhaseReleasing, PhaseExposed}, {PhasePreparing, PhaseStale}, {Phase(42), PhaseReleasing},
	} {
		set := &Set{ID: "s", Phase: tc.from}
		err := set.moveTo(tc.to)
		if err == nil || !strings.Contains(err.Error(), "illegal phase transition") {
			t.Errorf("%v -> %v: %v, want an illegal transition", tc.from, tc.to, err)
		}
		if set.Phase != tc.from {
			t.Errorf("%v -> %v: phase changed to %v by an illegal transition", tc.from, tc.to, set.Phase)
		}
	}
	ws := &WriterState{Name: "w"}
	for _, s := range []WriterStatus{WriterFreezing, WriterThawed} {
		if err := ws.moveTo(s); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct{ from, to WriterStatus }{
		{WriterPending, WriterThawed}, {WriterThawed, WriterFreezing}, {WriterFailed, WriterFreezing}, {WriterThawed, WriterFailed},
	} {
		ws := &WriterState{Name: "w", State: tc.from}
		if err := ws.moveTo(tc.to); err == nil || ws.State != tc.from {
			t.Errorf("writer %v -> %v allowed (now %v)", tc.from, tc.to, ws.State)
		}
	}
	if _, err := Phase(42).MarshalText(); err == nil {
		t.Error("an unknown phase was written to the journal")
	}
}
