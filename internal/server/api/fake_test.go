package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// Secrets of the fake's tokens, one per role.
const (
	viewerTok   = "vmsh_viewer"
	operatorTok = "vmsh_operator"
	adminTok    = "vmsh_admin"
)

var t0 = time.Date(2026, 12, 1, 1, 30, 0, 0, time.UTC)

// fake is a Service for the HTTP layer's tests: fixed data, every call
// recorded, and an error to return per method.
type fake struct {
	mu    sync.Mutex
	calls []string
	fail  map[string]error

	// Watch: the events to send (the test sends on it), and the ctx of
	// the last Watch (to see that a client leaving cancels it).
	events   chan api.Event
	watchCtx chan context.Context
	logLines []state.LogLine
}

func newFake() *fake {
	return &fake{fail: map[string]error{}, watchCtx: make(chan context.Context, 4)}
}

func (f *fake) call(name string, args ...any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := name
	if len(args) > 0 {
		var parts []string
		for _, a := range args {
			parts = append(parts, fmt.Sprint(a))
		}
		s += "(" + strings.Join(parts, ",") + ")"
	}
	f.calls = append(f.calls, s)
	return f.fail[name]
}

func (f *fake) takeCalls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.calls
	f.calls = nil
	return c
}

func (f *fake) Authenticate(ctx context.Context, secret string) (*state.Token, error) {
	switch secret {
	case viewerTok:
		return &state.Token{Name: "v", Role: state.Viewer, Created: t0}, nil
	case operatorTok:
		return &state.Token{Name: "o", Role: state.Operator, Created: t0}, nil
	case adminTok:
		return &state.Token{Name: "a", Role: state.Admin, Created: t0}, nil
	}
	if err := f.fail["Authenticate"]; err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("unknown token: %w", errs.ErrAuth)
}

func backup(vm string, i int) api.Backup {
	id := strings.Repeat(fmt.Sprintf("%x", i%16), 64)
	return api.Backup{ID: id, ShortID: id[:8], Repository: "local", VM: vm, Time: t0.Add(time.Duration(i) * time.Hour),
		Source: "qemu", Mode: "incremental", Consistency: "application",
		Disks: []api.Disk{{Name: "vda", Size: 1 << 30}}, BytesRead: 1 << 20, BytesNew: 1 << 10, DurationS: 2.5}
}

func (f *fake) VMs(ctx context.Context) ([]api.VM, error) {
	if err := f.call("VMs"); err != nil {
		return nil, err
	}
	b := backup("web1", 1)
	age := 3600.0
	last := state.VMResult{Run: 7, VM: "web1", Status: state.Succeeded, Started: t0, Ended: t0.Add(time.Minute), BackupID: b.ID, Mode: "full", BytesRead: 10, BytesNew: 5, FreezeMS: 120}
	return []api.VM{
		{Name: "web1", Connection: "lab", Jobs: []string{"nightly"}, Last: &last, LastSuccess: &last, LastBackup: &b, AgeS: &age, Status: "fresh"},
		// nil slices: the handler must show them as [].
		{Name: "old vm", Status: "never"},
	}, nil
}

func (f *fake) Backups(ctx context.Context, bf api.BackupFilter) ([]api.Backup, error) {
	if err := f.call("Backups", bf.Repository, bf.VM, bf.Limit, bf.Before.Format(time.RFC3339)); err != nil {
		return nil, err
	}
	var out []api.Backup
	for i := 0; i < 3 && i < bf.Limit; i++ {
		b := backup("web1", 3-i)
		if i == 0 {
			b.Tags = []string{"x"}
			b.Files = []api.Disk{{Name: "nvram", Size: 128}}
		}
		out = append(out, b)
	}
	return out, nil
}

func (f *fake) Backup(ctx context.Context, repository, id string) (*api.Backup, error) {
	if err := f.call("Backup", repository, id); err != nil {
		return nil, err
	}
	b := backup("web1", 2)
	return &b, nil
}

func (f *fake) DeleteBackup(ctx context.Context, repository, id string) error {
	return f.call("DeleteBackup", repository, id)
}

func job(name string) *api.Job {
	r := state.Run{ID: 7, Job: name, Kind: "backup", Trigger: "schedule", Status: state.Succeeded, Started: t0, Ended: t0.Add(time.Minute)}
	running := int64(8)
	return &api.Job{Name: name, Type: "backup", Source: "api", Enabled: true, Schedule: "30 1 * * *",
		Spec: map[string]any{"name": name, "type": "backup", "repository": "local"},
		Next: []time.Time{t0.Add(24 * time.Hour)}, Running: &running, LastRun: &r, VMs: []string{"web1"}}
}

func (f *fake) Jobs(ctx context.Context) ([]api.Job, error) {
	if err := f.call("Jobs"); err != nil {
		return nil, err
	}
	return []api.Job{*job("nightly"), {Name: "verify", Type: "verify", Source: "config"}}, nil
}

func (f *fake) Job(ctx context.Context, name string) (*api.Job, error) {
	if err := f.call("Job", name); err != nil {
		return nil, err
	}
	return job(name), nil
}

func (f *fake) CreateJob(ctx context.Context, spec []byte) (*api.Job, error) {
	if err := f.call("CreateJob", string(spec)); err != nil {
		return nil, err
	}
	var m map[string]any
	json.Unmarshal(spec, &m)
	return job(fmt.Sprint(m["name"])), nil
}

func (f *fake) UpdateJob(ctx context.Context, name string, spec []byte) (*api.Job, error) {
	if err := f.call("UpdateJob", name, string(spec)); err != nil {
		return nil, err
	}
	return job(name), nil
}

func (f *fake) DeleteJob(ctx context.Context, name string) error { return f.call("DeleteJob", name) }

func (f *fake) SetJobEnabled(ctx context.Context, name string, enabled bool) (*api.Job, error) {
	if err := f.call("SetJobEnabled", name, enabled); err != nil {
		return nil, err
	}
	j := job(name)
	j.Enabled = enabled
	return j, nil
}

func (f *fake) RunJob(ctx context.Context, name string) (*state.Run, error) {
	if err := f.call("RunJob", name); err != nil {
		return nil, err
	}
	return &state.Run{ID: 9, Job: name, Kind: "backup", Trigger: "manual", Status: state.Running, Started: t0}, nil
}

func (f *fake) Runs(ctx context.Context, rf state.RunFilter) ([]state.Run, error) {
	if err := f.call("Runs", rf.Job, rf.Status, rf.VM, rf.Before, rf.Limit); err != nil {
		return nil, err
	}
	var out []state.Run
	for i := int64(0); i < 2 && i < int64(rf.Limit); i++ {
		out = append(out, state.Run{ID: 9 - i, Job: "nightly", Kind: "backup", Trigger: "schedule", Status: state.Failed, Started: t0, Ended: t0.Add(time.Minute), Error: "web1: connection failed"})
	}
	return out, nil
}

func (f *fake) Run(ctx context.Context, id int64) (*api.RunDetail, error) {
	if err := f.call("Run", id); err != nil {
		return nil, err
	}
	return &api.RunDetail{Run: state.Run{ID: id, Job: "nightly", Kind: "backup", Trigger: "manual", Status: state.Running, Started: t0},
		VMs: []state.VMResult{{Run: id, VM: "web1", Status: state.Running, Started: t0}}}, nil
}

func (f *fake) RunLog(ctx context.Context, id, after int64, limit int) ([]state.LogLine, error) {
	if err := f.call("RunLog", id, after, limit); err != nil {
		return nil, err
	}
	out := []state.LogLine{}
	for _, l := range f.logLines {
		if l.ID > after && len(out) < limit {
			out = append(out, l)
		}
	}
	return out, nil
}

func (f *fake) CancelRun(ctx context.Context, id int64) error { return f.call("CancelRun", id) }

func (f *fake) Watch(ctx context.Context, id int64) (<-chan api.Event, error) {
	if err := f.call("Watch", id); err != nil {
		return nil, err
	}
	f.watchCtx <- ctx
	return f.events, nil
}

func (f *fake) Repositories(ctx context.Context) ([]api.Repository, error) {
	if err := f.call("Repositories"); err != nil {
		return nil, err
	}
	return []api.Repository{
		{Name: "local", Location: "/srv/backup", Backups: 3, VMs: 1, StoredBytes: 100, LogicalBytes: 400, DedupFactor: 4, StatsTime: t0,
			LastVerify: &api.VerifyStatus{Run: 5, Time: t0, Backups: 3}},
		{Name: "offsite", Location: "s3://bucket/prefix", Error: "connection refused"},
	}, nil
}

func (f *fake) Restore(ctx context.Context, req api.RestoreRequest) (*api.RestoreResult, error) {
	if x := req.XAPI; x != nil {
		if err := f.call("Restore", req.Repository, req.Backup, "xapi", x.Connection, x.SR, x.VMName); err != nil {
			return nil, err
		}
		return &api.RestoreResult{XAPI: &api.XAPIResult{Connection: x.Connection, SR: "5r-uu1d", VM: "vm-uu1d"}}, nil // nil disks: the handler must show []
	}
	if l := req.Libvirt; l != nil {
		if err := f.call("Restore", req.Repository, req.Backup, "libvirt", l.Connection, l.Pool, l.VMName, l.Start); err != nil {
			return nil, err
		}
		return &api.RestoreResult{Libvirt: &api.LibvirtResult{Connection: l.Connection, Pool: l.Pool, Domain: "web1-restored", UUID: "0d1e",
			Definition: "stored", Started: l.Start, Volumes: []api.LibvirtVolume{{Disk: "vda", Volume: "web1-restored-vda.qcow2", Path: "/p/x", Format: "qcow2", Target: "vda"}}}}, nil
	}
	if err := f.call("Restore", req.Repository, req.Backup, req.To, req.Format); err != nil {
		return nil, err
	}
	return &api.RestoreResult{Files: []api.RestoredFile{{Disk: "vda", Path: req.To + "/vda.raw", Size: 1 << 30}}}, nil
}

func (f *fake) StartServe(ctx context.Context, req api.ServeRequest) (*api.Serve, error) {
	if err := f.call("StartServe", req.Repository, req.Backup, req.Disk, req.Writable); err != nil {
		return nil, err
	}
	return &api.Serve{ID: "s1", Repository: req.Repository, Backup: req.Backup, Disk: "vda", URI: "nbd+unix:///vda?socket=/run/vmshadow/s1.sock", Started: t0}, nil
}

func (f *fake) StopServe(ctx context.Context, id string) error { return f.call("StopServe", id) }

func (f *fake) Serves(ctx context.Context) ([]api.Serve, error) {
	if err := f.call("Serves"); err != nil {
		return nil, err
	}
	return nil, nil // the handler must show []
}

func (f *fake) UsageHistory(ctx context.Context, repository string, since time.Time) ([]state.Usage, error) {
	if err := f.call("UsageHistory", repository, since.Format(time.RFC3339)); err != nil {
		return nil, err
	}
	if repository == "empty" {
		return nil, nil // the handler must show []
	}
	return []state.Usage{{Time: t0, StoredBytes: 100, LogicalBytes: 400, Backups: 3}, {Time: t0.Add(time.Hour), StoredBytes: 120, LogicalBytes: 800, Backups: 4}}, nil
}

func (f *fake) Verifies(ctx context.Context, vf state.VerifyFilter) ([]api.VerifyRun, error) {
	if err := f.call("Verifies", vf.Repository, vf.Before, vf.Limit); err != nil {
		return nil, err
	}
	var out []api.VerifyRun
	for i := int64(0); i < 2 && i < int64(vf.Limit); i++ {
		v := api.VerifyRun{ID: 6 - i, Run: 20 - i, Time: t0, Backups: 3, Chunks: 40}
		if i == 0 {
			v.Problems, v.FindingsTotal = 1, 1
			v.Findings = []state.LogLine{{ID: 9, Time: t0, Level: "error", Message: "chunk 12ab: missing (affects 2 backups)"}}
		}
		out = append(out, v) // the second without findings: the handler must show []
	}
	return out, nil
}

func preview(repository string, vms []string, p api.RetentionPolicy) *api.PrunePreview {
	a, b := backup("web1", 2), backup("web1", 1)
	return &api.PrunePreview{Repository: repository, VMs: vms, Policy: p, Kept: 1, Removed: 1, Backups: []api.PruneDecision{
		{ID: a.ID, ShortID: a.ShortID, VM: "web1", Time: a.Time, Keep: true, Reasons: []string{"last"}},
		{ID: b.ID, ShortID: b.ShortID, VM: "web1", Time: b.Time, Keep: false}}}
}

func (f *fake) PrunePreview(ctx context.Context, repository string, vms []string, p api.RetentionPolicy) (*api.PrunePreview, error) {
	if err := f.call("PrunePreview", repository, strings.Join(vms, "+"), fmt.Sprintf("%+v", p)); err != nil {
		return nil, err
	}
	return preview(repository, vms, p), nil
}

func (f *fake) JobPrunePreview(ctx context.Context, name string) (*api.PrunePreview, error) {
	if err := f.call("JobPrunePreview", name); err != nil {
		return nil, err
	}
	p := preview("local", nil, api.RetentionPolicy{Last: 1}) // nil VMs: the handler must show []
	p.Job = name
	return p, nil
}

func (f *fake) GCPreview(ctx context.Context, repository string) (*api.GCPreview, error) {
	if err := f.call("GCPreview", repository); err != nil {
		return nil, err
	}
	return &api.GCPreview{Repository: repository, GraceS: 86400, Backups: 3, ChunksReferenced: 40, ChunksDeleted: 2, BytesDeleted: 1 << 20}, nil
}

func (f *fake) SchedulePreview(ctx context.Context, spec, tz string, n int) (*api.SchedulePreview, error) {
	if err := f.call("SchedulePreview", spec, tz, n); err != nil {
		return nil, err
	}
	out := &api.SchedulePreview{Schedule: spec, Timezone: "UTC"}
	for i := range n {
		out.Next = append(out.Next, t0.Add(time.Duration(i+1)*24*time.Hour))
	}
	return out, nil
}

func (f *fake) Connections(ctx context.Context) ([]api.Connection, error) {
	if err := f.call("Connections"); err != nil {
		return nil, err
	}
	return []api.Connection{{Name: "lab", Type: "qmp"}, {Name: "kvm1", Type: "libvirt"}, {Name: "pool", Type: "xapi"}}, nil
}

func (f *fake) SelectionPreview(ctx context.Context, sels []api.VMSelector) (*api.SelectionPreview, error) {
	var parts []string
	for _, s := range sels {
		parts = append(parts, s.Connection+":"+strings.Join(s.VMs, "+"))
	}
	if err := f.call("SelectionPreview", strings.Join(parts, ";")); err != nil {
		return nil, err
	}
	return &api.SelectionPreview{VMs: []api.SelectedVM{{Name: "web1", Connection: "lab"}}}, nil // nil problems: the handler must show []
}

func (f *fake) VMResults(ctx context.Context, vm string, before int64, limit int) ([]state.VMResult, error) {
	if err := f.call("VMResults", vm, before, limit); err != nil {
		return nil, err
	}
	var out []state.VMResult
	for i := int64(0); i < 2 && i < int64(limit); i++ {
		out = append(out, state.VMResult{Run: 9 - i, VM: vm, Status: state.Failed, Started: t0, Ended: t0.Add(time.Minute), Error: "qmp: connection refused"})
	}
	return out, nil
}
