package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
	"github.com/vmshadow/vmshadow/internal/xapitest"
)

// rig is a server on real QEMU VMs (no guest OS) reached through a QMP
// connection's glob, with two local repositories.
type rig struct {
	dir, cfgPath string
	conns        string // more connections, YAML
	vms          map[string]*qemutest.VM
	s            *Server
}

func newRig(t *testing.T, names []string, jobs string) *rig {
	return newRigConns(t, names, "", jobs)
}

func newRigConns(t *testing.T, names []string, conns, jobs string) *rig {
	return newRigIn(t, t.TempDir(), names, conns, jobs)
}

// newRigIn is newRigConns in dir (its state directory dir/state).
func newRigIn(t *testing.T, dir string, names []string, conns, jobs string) *rig {
	t.Helper()
	g := &rig{dir: dir, vms: map[string]*qemutest.VM{}, conns: conns}
	socks := filepath.Join(g.dir, "sockets")
	if err := os.MkdirAll(socks, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		vm := qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda", Size: 8 << 20}}, Name: n})
		if err := os.Symlink(vm.QMPPath, filepath.Join(socks, n+".qmp")); err != nil {
			t.Fatal(err)
		}
		g.vms[n] = vm
	}
	pw := filepath.Join(g.dir, "pw")
	if err := os.WriteFile(pw, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"main", "offsite"} {
		be, err := local.Create(filepath.Join(g.dir, name))
		if err != nil {
			t.Fatal(err)
		}
		r, err := repo.Init(context.Background(), be, repo.InitOptions{Password: []byte("s3cret"), ChunkSize: repo.MinChunkSize, KDF: &repo.KDFParams{Name: "argon2id", Time: 1, MemoryKiB: 8 << 10, Threads: 1}})
		if err != nil {
			t.Fatal(err)
		}
		r.Close()
		be.Close()
	}
	g.cfgPath = filepath.Join(g.dir, "server.yaml")
	g.writeConfig(t, jobs)
	s, err := New(context.Background(), Options{ConfigPath: g.cfgPath, Log: slog.New(slog.NewTextHandler(testWriter{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	g.s = s
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Error(err)
		}
	})
	return g
}

func (g *rig) writeConfig(t testing.TB, jobs string) {
	t.Helper()
	cfg := fmt.Sprintf(`listen: [{address: "unix:%[1]s/api.sock"}]
state_dir: %[1]s/state
repositories:
  main: {location: %[1]s/main, password_file: %[1]s/pw}
  offsite: {location: %[1]s/offsite, password_file: %[1]s/pw}
connections:
  lab:
    type: qmp
    sockets: [%[1]s/sockets/*.qmp]
%[3]sjobs:
%[2]s`, g.dir, jobs, g.conns)
	if err := os.WriteFile(g.cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// waitRun waits for run id to end and returns it with its VMs.
func (g *rig) waitRun(t testing.TB, id int64) (*state.Run, []state.VMResult) {
	t.Helper()
	end := g.wait(t, id)
	vms, err := g.s.DB().VMs(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return end, vms
}

// wait waits for run id to end and returns it.
func (g *rig) wait(t testing.TB, id int64) *state.Run {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ch, err := g.s.Watch(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var end *state.Run
	for ev := range ch {
		if ev.Type == "end" {
			r := ev.Data.(state.Run)
			end = &r
		}
	}
	if end == nil {
		t.Fatalf("run %d: no end event (%v)", id, ctx.Err())
	}
	return end
}

func (g *rig) backups(t *testing.T, name string) []repo.Backup {
	t.Helper()
	r, release, err := g.s.repository(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	bs, _, err := r.ListBackups(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return bs
}

// TestJobs: scheduled backup runs of two VMs found through a glob
// (full, then incremental), retention after each run, a manual verify,
// copy and gc, a run cancelled mid-backup leaving the VM as it was, and
// a reload that adds a VM's job without touching the running schedule.
func TestJobs(t *testing.T) {
	g := newRig(t, []string{"vm1", "vm2"}, `  - name: nightly
    type: backup
    repository: main
    vms: [{connection: lab}]
    schedule: "@every 4s"
    retention: {keep_last: 2}
    concurrency: {per_job: 2}
  - {name: check, type: verify, repository: main, reverify_after_days: 7}
  - {name: offsite, type: copy, from: main, to: offsite, vms: [vm1]}
  - {name: sweep, type: gc, repository: main, grace: 0s}
`)
	ctx := context.Background()
	if err := g.s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// Three scheduled runs.
	var runs []state.Run
	deadline := time.Now().Add(3 * time.Minute)
	for len(runs) < 3 && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		all, err := g.s.Runs(ctx, state.RunFilter{Job: "nightly"})
		if err != nil {
			t.Fatal(err)
		}
		runs = runs[:0]
		for _, r := range all {
			if r.Status != state.Running && r.Status != state.Skipped {
				runs = append(runs, r)
			}
		}
	}
	if len(runs) < 3 {
		t.Fatalf("scheduled runs: %+v", runs)
	}
	for i, r := range runs {
		if r.Status != state.Succeeded || r.Trigger != TriggerSchedule {
			t.Fatalf("run %d: %+v", i, r)
		}
		_, vms := g.waitRun(t, r.ID)
		if len(vms) != 2 {
			t.Fatalf("run %d VMs: %+v", r.ID, vms)
		}
		for _, v := range vms {
			want := "incremental"
			if i == len(runs)-1 {
				want = "full" // runs are newest first: the oldest was the first backup
			}
			if v.Status != state.Succeeded || v.Mode != want || v.BackupID == "" {
				t.Fatalf("run %d VM %s: %+v, want %s", r.ID, v.VM, v, want)
			}
		}
	}
	// Retention keeps the 2 newest of each VM.
	if err := g.s.SetEnabled(ctx, "nightly", false); err != nil {
		t.Fatal(err)
	}
	waitIdle(t, g.s, "nightly")
	per := map[string]int{}
	for _, b := range g.backups(t, "main") {
		per[b.VM]++
	}
	if per["vm1"] != 2 || per["vm2"] != 2 {
		t.Fatalf("backups per VM after retention: %v", per)
	}
	// Manual verify, copy of vm1 only, gc.
	for _, job := range []string{"check", "offsite", "sweep"} {
		r, err := g.s.RunJob(ctx, job)
		if err != nil {
			t.Fatal(err)
		}
		end, _ := g.waitRun(t, r.ID)
		if end.Status != state.Succeeded {
			log, _ := g.s.RunLog(ctx, r.ID, 0, 0)
			t.Fatalf("%s: %+v\n%v", job, end, log)
		}
	}
	off := g.backups(t, "offsite")
	if len(off) != 2 || off[0].VM != "vm1" || off[1].VM != "vm1" {
		t.Fatalf("offsite: %+v", off)
	}
	// A second verify finds everything verified recently.
	r, err := g.s.RunJob(ctx, "check")
	if err != nil {
		t.Fatal(err)
	}
	g.waitRun(t, r.ID)
	log, err := g.s.RunLog(ctx, r.ID, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !hasLine(log, "0 of 4 backups not verified in the last 7 days") {
		t.Fatalf("re-verify log: %+v", log)
	}

	// Cancel a run mid-backup: the VM gives back everything the set took.
	base := g.vms["vm1"].Baseline(filepath.Join(g.dir, "state", "scratch"))
	g.vms["vm1"].Write("vda", 0x5a, 0, 8<<20)
	r, err = g.s.RunJob(ctx, "nightly")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.s.RunJob(ctx, "nightly"); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("second run while running: %v", err)
	}
	ch, err := g.s.Watch(ctx, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	for ev := range ch {
		if ev.Type == "log" && strings.Contains(fmt.Sprint(ev.Data), "disk vda") {
			if err := g.s.CancelRun(ctx, r.ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	end, _ := g.waitRun(t, r.ID)
	if end.Status != state.Cancelled && end.Status != state.Succeeded {
		t.Fatalf("cancelled run: %+v", end)
	}
	g.vms["vm1"].AssertAsBefore(t, base)
	all, err := g.s.Runs(ctx, state.RunFilter{Job: "nightly"})
	if err != nil {
		t.Fatal(err)
	}
	if all[0].ID != r.ID+1 || all[0].Status != state.Skipped {
		t.Fatalf("the refused second run is not recorded as skipped: %+v", all[0])
	}

	// Restore and instant restore of vm2's latest backup (vm2 has not
	// changed since): both hold its disk.
	var latest api.Backup
	bs, err := g.s.Backups(ctx, api.BackupFilter{VM: "vm2", Limit: 1})
	if err != nil || len(bs) != 1 {
		t.Fatalf("vm2's backups: %v %v", bs, err)
	}
	latest = bs[0]
	disk := g.vms["vm2"].Disk("vda").Path
	out := filepath.Join(g.dir, "restored")
	res, err := g.s.Restore(ctx, api.RestoreRequest{Repository: "main", Backup: latest.ShortID, To: out})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Files) != 1 || res.Files[0].Disk != "vda" {
		t.Fatalf("restored: %+v", res)
	}
	compare(t, res.Files[0].Path, disk)
	if _, err := g.s.Restore(ctx, api.RestoreRequest{Repository: "main", Backup: latest.ShortID, To: out}); err == nil {
		t.Fatal("a restore over existing files succeeded")
	}
	sv, err := g.s.StartServe(ctx, api.ServeRequest{Repository: "main", Backup: latest.ID})
	if err != nil {
		t.Fatal(err)
	}
	compare(t, sv.URI, disk)
	if list, _ := g.s.Serves(ctx); len(list) != 1 || list[0].ID != sv.ID {
		t.Fatalf("serves: %+v", list)
	}
	if err := g.s.StopServe(ctx, sv.ID); err != nil {
		t.Fatal(err)
	}
	if err := g.s.StopServe(ctx, sv.ID); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("stop twice: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(g.dir, "state", "serve")); len(ents) != 0 {
		t.Fatalf("left in the serve directory: %v", ents)
	}

	// Jobs defined through the API: created, run, updated, kept across a
	// restart of the server's state, deleted; the file's jobs are not
	// theirs to change.
	if _, err := g.s.CreateJob(ctx, []byte(`{"name": "api-prune", "type": "prune", "repository": "main", "retention": {"keep_last": 5}}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := g.s.CreateJob(ctx, []byte(`{"name": "api-prune", "type": "gc", "repository": "main"}`)); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("duplicate: %v", err)
	}
	if _, err := g.s.UpdateJob(ctx, "nightly", []byte(`{"name": "nightly", "type": "gc", "repository": "main"}`)); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("update a file's job: %v", err)
	}
	if _, err := g.s.CreateJob(ctx, []byte(`{"name": "x", "type": "prune", "repository": "nosuch"}`)); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("bad job: %v", err)
	}
	r, err = g.s.RunJob(ctx, "api-prune")
	if err != nil {
		t.Fatal(err)
	}
	if end, _ := g.waitRun(t, r.ID); end.Status != state.Succeeded {
		t.Fatalf("API job's run: %+v", end)
	}
	j, err := g.s.UpdateJob(ctx, "api-prune", []byte(`{"name": "api-prune", "type": "prune", "repository": "main", "retention": {"keep_last": 1}, "schedule": "@weekly"}`))
	if err != nil {
		t.Fatal(err)
	}
	if j.Source != "api" || j.Schedule != "@weekly" || len(j.Next) != 5 {
		t.Fatalf("updated job: %+v", j)
	}
	if err := g.s.DeleteJob(ctx, "nightly"); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("delete a file's job: %v", err)
	}
	if err := g.s.DeleteJob(ctx, "api-prune"); err != nil {
		t.Fatal(err)
	}
	if _, err := g.s.Job(ctx, "api-prune"); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("deleted job: %v", err)
	}

	// A bad configuration changes nothing; a good one takes effect.
	os.WriteFile(g.cfgPath, []byte("jobs: [}"), 0o600)
	if err := g.s.Reload(); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("bad reload: %v", err)
	}
	g.writeConfig(t, `  - {name: only, type: gc, repository: main}
`)
	if err := g.s.Reload(); err != nil {
		t.Fatal(err)
	}
	if _, err := g.s.RunJob(ctx, "nightly"); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("job removed by reload: %v", err)
	}
}

func hasLine(lines []state.LogLine, s string) bool {
	for _, l := range lines {
		if strings.Contains(l.Message, s) {
			return true
		}
	}
	return false
}

// waitIdle waits until job runs no more.
func waitIdle(t *testing.T, s *Server, job string) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		j, err := s.Job(context.Background(), job)
		if err != nil {
			t.Fatal(err)
		}
		if j.Running == nil {
			return
		}
	}
	t.Fatalf("job %s still running", job)
}

// TestXAPIJob: a backup job selects a fake pool's VMs by glob (listed
// with VM.get_all_records; templates, snapshots and the control domain
// left out) and backs them up through the XAPI provider.
func TestXAPIJob(t *testing.T) {
	pool := xapitest.New(t, xapitest.Options{})
	for _, n := range []string{"web-1", "web-2", "db"} {
		pool.AddVM(n, true, 4<<20)
	}
	before := pool.Dump()
	t.Setenv("VMSHADOW_TEST_POOL_PW", pool.Password)
	hooks := make(chan map[string]any, 10)
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m map[string]any
		json.NewDecoder(r.Body).Decode(&m)
		hooks <- m
	}))
	defer recv.Close()
	g := newRigConns(t, nil, fmt.Sprintf(`  pool:
    type: xapi
    url: %s
    user: %s
    password_env: VMSHADOW_TEST_POOL_PW
    ca: %s
`, pool.URL, pool.User, pool.CAFile), `  - {name: web, type: backup, repository: main, vms: [{connection: pool, vms: ["web-*"]}], concurrency: {per_job: 2}}
  - {name: ghost, type: backup, repository: main, vms: [{connection: pool, vms: ["nosuch"]}], notify: [{url: "`+recv.URL+`/hook"}]}
`)
	ctx := context.Background()
	if err := g.s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	j, err := g.s.Job(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(j.VMs, ",") != "web-1,web-2" {
		t.Fatalf("selected VMs: %v", j.VMs)
	}
	r, err := g.s.RunJob(ctx, "web")
	if err != nil {
		t.Fatal(err)
	}
	end, vms := g.waitRun(t, r.ID)
	if end.Status != state.Succeeded || len(vms) != 2 {
		log, _ := g.s.RunLog(ctx, r.ID, 0, 0)
		t.Fatalf("run: %+v %+v\n%v", end, vms, log)
	}
	for _, v := range vms {
		if v.Status != state.Succeeded || v.Mode != "full" {
			t.Fatalf("VM %+v", v)
		}
	}
	for _, b := range g.backups(t, "main") {
		if b.Source != "xapi" || (b.VM != "web-1" && b.VM != "web-2") {
			t.Fatalf("backup %s of %s from %s", b.ID.Short(), b.VM, b.Source)
		}
	}
	pool.CheckAsBefore(t, before, xapitest.Expect{Checkpoints: true})
	// Every VM the pool has is listed, the one no job backs up as never
	// protected.
	all, err := g.s.VMs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	status := map[string]string{}
	for _, v := range all {
		status[v.Name] = v.Status + "/" + v.Connection
	}
	if status["db"] != "never/pool" || status["web-1"] != "fresh/pool" || status["web-2"] != "fresh/pool" {
		t.Fatalf("VMs: %v", status)
	}
	r, err = g.s.RunJob(ctx, "ghost")
	if err != nil {
		t.Fatal(err)
	}
	if end, _ := g.waitRun(t, r.ID); end.Status != state.Failed || !strings.Contains(end.Error, "no VM to back up") {
		t.Fatalf("job naming a missing VM: %+v", end)
	}
	log, _ := g.s.RunLog(ctx, r.ID, 0, 0)
	if !hasLine(log, `VM "nosuch" is not found (3 VMs reachable)`) {
		t.Fatalf("log of the job naming a missing VM: %+v", log)
	}
	// Its webhook tells of the failure.
	select {
	case m := <-hooks:
		if m["job"] != "ghost" || m["status"] != state.Failed || m["run_id"] != float64(r.ID) {
			t.Fatalf("notification: %v", m)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no notification of the failed run")
	}
	// Metrics: the runs by result and the VMs' last success.
	rec := httptest.NewRecorder()
	g.s.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body := rec.Body.String()
	for _, want := range []string{`vmshadow_job_runs_total{job="web",kind="backup",result="succeeded"} 1`,
		`vmshadow_job_runs_total{job="ghost",kind="backup",result="failed"} 1`} {
		if !strings.Contains(body, want) {
			t.Fatalf("metrics lack %s:\n%s", want, body)
		}
	}
	// Repository statistics, computed in the background after the runs.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		repos, err := g.s.Repositories(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if repos[0].Name == "main" && repos[0].Backups == 2 && repos[0].LogicalBytes == 8<<20 && repos[0].DedupFactor > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("repositories: %+v", repos)
		}
	}
}

// compare checks with qemu-img that a (a file or an NBD URI) holds what
// the qcow2 image b of a running VM holds.
func compare(t *testing.T, a, b string) {
	t.Helper()
	args := []string{"compare", "-U", "-F", "qcow2", a, b}
	if !strings.HasPrefix(a, "nbd") {
		args = []string{"compare", "-U", "-f", "raw", "-F", "qcow2", a, b}
	}
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// TestCatchUp: a job with catch_up whose scheduled time passed while the
// server was down runs once at start (trigger catch-up); one without
// catch_up waits for its next time.
func TestCatchUp(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	db, err := state.Open(ctx, filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	long := time.Now().Add(-3 * time.Hour).Truncate(time.Hour)
	for _, j := range []string{"missed", "patient"} {
		if err := db.SetLastSlot(ctx, j, long); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	g := newRigIn(t, dir, nil, "", `  - {name: missed, type: gc, repository: main, schedule: "@hourly", catch_up: true}
  - {name: patient, type: gc, repository: main, schedule: "@hourly"}
`)
	if err := g.s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var runs []state.Run
	for deadline := time.Now().Add(time.Minute); len(runs) == 0 && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if runs, err = g.s.Runs(ctx, state.RunFilter{Job: "missed"}); err != nil {
			t.Fatal(err)
		}
	}
	if len(runs) != 1 || runs[0].Trigger != TriggerCatchUp {
		t.Fatalf("missed job's runs: %+v", runs)
	}
	g.wait(t, runs[0].ID)
	if p, _ := g.s.Runs(ctx, state.RunFilter{Job: "patient"}); len(p) != 0 {
		t.Fatalf("a job without catch_up ran at start: %+v", p)
	}
	j, err := g.s.Job(ctx, "patient")
	if err != nil {
		t.Fatal(err)
	}
	if len(j.Next) != 5 || !j.Next[0].After(time.Now()) || j.Next[0].Minute() != 0 {
		t.Fatalf("patient's next runs: %v", j.Next)
	}
}
