package notify

import (
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// Event is the JSON document POSTed to a webhook: a job's run that ended.
// Its field names are a contract (docs/notifications.md): add, never
// rename.
type Event struct {
	Event           string    `json:"event"`    // failure, success, interrupted, cancelled, skipped
	Host            string    `json:"host"`     // the server's host name
	Job             string    `json:"job"`      // the job's name
	JobType         string    `json:"job_type"` // backup, verify, prune, gc, copy
	RunID           int64     `json:"run_id"`
	Trigger         string    `json:"trigger,omitempty"` // schedule, manual, catch-up
	Status          string    `json:"status"`            // the run's status: failed, succeeded, ...
	Started         time.Time `json:"started"`
	Ended           time.Time `json:"ended,omitzero"`
	DurationSeconds float64   `json:"duration_seconds"`
	Error           string    `json:"error,omitempty"`
	VMs             []VM      `json:"vms"`  // empty for jobs without VMs
	Text            string    `json:"text"` // one line for humans
}

// VM is one VM's part of a run, with the field names of the API's VM
// results.
type VM struct {
	VM          string    `json:"vm"`
	Status      string    `json:"status"`
	Started     time.Time `json:"started"`
	Ended       time.Time `json:"ended,omitzero"`
	BackupID    string    `json:"backup_id,omitempty"`
	Mode        string    `json:"mode,omitempty"`        // full, incremental
	Consistency string    `json:"consistency,omitempty"` // application, filesystem, crash
	BytesRead   int64     `json:"bytes_read"`
	BytesNew    int64     `json:"bytes_new"`
	FreezeMS    int64     `json:"freeze_ms"`
	Error       string    `json:"error,omitempty"`
}

// maxErrorLen bounds each error message in a payload, so that a run of
// many VMs failing with long messages stays a small POST.
const maxErrorLen = 2000

// FromRun returns the event of an ended run and its VMs' results. The
// event name follows from the run's status (EventFor).
func FromRun(run state.Run, vms []state.VMResult) Event {
	ev := Event{
		Event:   EventFor(run.Status),
		Job:     run.Job,
		JobType: run.Kind,
		RunID:   run.ID,
		Trigger: run.Trigger,
		Status:  run.Status,
		Started: run.Started,
		Ended:   run.Ended,
		Error:   run.Error,
		VMs:     make([]VM, 0, len(vms)),
	}
	for _, v := range vms {
		ev.VMs = append(ev.VMs, VM{
			VM: v.VM, Status: v.Status, Started: v.Started, Ended: v.Ended,
			BackupID: v.BackupID, Mode: v.Mode, Consistency: v.Consistency,
			BytesRead: v.BytesRead, BytesNew: v.BytesNew, FreezeMS: v.FreezeMS, Error: v.Error,
		})
	}
	return ev
}

// EventFor returns the event of a run's status (package state), or ""
// for a run that has not ended.
func EventFor(status string) string {
	switch status {
	case state.Failed:
		return config.OnFailure
	case state.Succeeded:
		return config.OnSuccess
	case state.Interrupted:
		return config.OnInterrupted
	case state.Cancelled:
		return config.OnCancelled
	case state.Skipped:
		return config.OnSkipped
	}
	return ""
}

// complete fills what Send derives: the event name, host, duration, text,
// an empty VM list rather than null, and errors cut to maxErrorLen.
func (ev *Event) complete(host string) {
	if ev.Event == "" {
		ev.Event = EventFor(ev.Status)
	}
	if ev.Host == "" {
		ev.Host = host
	}
	if !ev.Ended.IsZero() && ev.Ended.After(ev.Started) {
		ev.DurationSeconds = ev.Ended.Sub(ev.Started).Seconds()
	}
	ev.Error = cut(ev.Error)
	vms := make([]VM, len(ev.VMs))
	for i, v := range ev.VMs {
		v.Error = cut(v.Error)
		vms[i] = v
	}
	ev.VMs = vms
	if ev.Text == "" {
		ev.Text = ev.summary()
	}
}

func cut(s string) string { return cutN(s, maxErrorLen) }

// cutN cuts s to at most n bytes (plus "…"), on a character boundary.
func cutN(s string, n int) string {
	if len(s) <= n {
		return s
	}
	// Cut before a character's first byte, not inside a character.
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// summary is the event in one line:
//
//	backup job nightly failed on host1 (run 42, 3m12s): 1 of 3 VMs failed: web1: freeze: timeout
func (ev *Event) summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s job %s %s", ev.JobType, ev.Job, ev.Status)
	if ev.Host != "" {
		fmt.Fprintf(&b, " on %s", ev.Host)
	}
	fmt.Fprintf(&b, " (run %d", ev.RunID)
	if ev.DurationSeconds > 0 {
		fmt.Fprintf(&b, ", %s", time.Duration(ev.DurationSeconds*float64(time.Second)).Round(time.Second))
	}
	b.WriteString(")")
	failed := 0
	var first *VM
	for i := range ev.VMs {
		if ev.VMs[i].Status == state.Failed {
			if first == nil {
				first = &ev.VMs[i]
			}
			failed++
		}
	}
	switch {
	case failed > 0:
		fmt.Fprintf(&b, ": %d of %d VMs failed: %s: %s", failed, len(ev.VMs), first.VM, firstLine(first.Error))
	case ev.Error != "":
		fmt.Fprintf(&b, ": %s", firstLine(ev.Error))
	case len(ev.VMs) > 0:
		fmt.Fprintf(&b, ": %d VMs", len(ev.VMs))
	}
	return cutN(b.String(), 300)
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
