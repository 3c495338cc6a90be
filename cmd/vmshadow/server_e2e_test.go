package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/vmshadow/vmshadow/internal/server/api/apitest"
)

// serverRig is `vmshadow server` run as a process on the real test guest
// (reached through a QMP connection's glob, frozen through its agent),
// with a local repository, and an HTTP client on its UNIX socket.
type serverRig struct {
	t      *testing.T
	g      *guestRig
	dir    string // state directory, sockets, configuration
	cfg    string
	sock   string
	client *http.Client
	stop   func() result
	proc   interface{ Signal(os.Signal) error }
	tokens map[string]string // role -> secret
	doc    *openapi3.T
}

func newServerRig(t *testing.T, g *guestRig, jobs string) *serverRig {
	t.Helper()
	dir, _ := stateEnv(t)
	s := &serverRig{t: t, g: g, doc: apitest.Doc(t), dir: dir, cfg: filepath.Join(dir, "server.yaml"), sock: filepath.Join(dir, "api.sock"), tokens: map[string]string{}}
	socks := filepath.Join(dir, "vms")
	if err := os.MkdirAll(socks, 0o700); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{"guest.qmp": g.vm.QMPSocket, "guest.qga": g.vm.AgentSocket} {
		if err := os.Symlink(target, filepath.Join(socks, link)); err != nil {
			t.Fatal(err)
		}
	}
	pw := filepath.Join(dir, "repo.pass")
	if err := os.WriteFile(pw, []byte("guest-test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`listen: [{address: "unix:%[1]s/api.sock"}]
state_dir: %[1]s/state
repositories:
  main: {location: %[2]s, password_file: %[3]s}
connections:
  lab:
    type: qmp
    sockets: [%[4]s/*.qmp]
    guest_agent: %[4]s/{vm}.qga
jobs:
%[5]s`, dir, g.repo, pw, socks, jobs)
	if err := os.WriteFile(s.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if res := vmshadow(t, nil, "server", "--config", s.cfg, "--check-config"); res.code != 0 {
		t.Fatalf("check-config: %s", res.errorMessage())
	}
	for _, role := range []string{"admin", "operator", "viewer"} {
		res := vmshadow(t, nil, "server", "token", "create", "--config", s.cfg, "--name", "test-"+role, "--role", role)
		if res.code != 0 {
			t.Fatalf("token create: %s", res.errorMessage())
		}
		s.tokens[role] = fmt.Sprint(res.summary(t)["token"])
	}
	s.client = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", s.sock)
	}}}
	return s
}

// start starts the server process and waits for /healthz.
func (s *serverRig) start() {
	s.t.Helper()
	s.startEnv()
}

// startEnv starts the server process with env added and waits for
// /healthz.
func (s *serverRig) startEnv(env ...string) {
	s.t.Helper()
	cmd, wait := startVmshadow(s.t, env, "server", "--config", s.cfg)
	s.proc, s.stop = cmd.Process, wait
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := s.client.Get("http://vmshadow/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("server did not answer /healthz: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// call makes an API request as role ("" no token) and decodes the JSON
// answer into out (if not nil); it returns the status code.
func (s *serverRig) call(role, method, path string, body any, out any) int {
	s.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = strings.NewReader(string(b))
	}
	req, _ := http.NewRequest(method, "http://vmshadow"+path, rd)
	if role != "" {
		tok := s.tokens[role]
		if tok == "" {
			tok = role // a literal (wrong) token
		}
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if strings.HasPrefix(path, "/api/v1/") {
		// Every answer of the real server matches the OpenAPI document.
		p, _, _ := strings.Cut(path, "?")
		apitest.ValidateResponse(s.t, s.doc, method, p, resp, data)
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			s.t.Fatalf("%s %s: %v: %s", method, path, err, data)
		}
	}
	return resp.StatusCode
}

type apiRun struct {
	ID      int64  `json:"id"`
	Job     string `json:"job"`
	Status  string `json:"status"`
	Trigger string `json:"trigger"`
	Error   string `json:"error"`
	VMs     []struct {
		VM          string    `json:"vm"`
		Ended       time.Time `json:"ended"`
		Status      string    `json:"status"`
		Mode        string    `json:"mode"`
		Consistency string    `json:"consistency"`
		BackupID    string    `json:"backup_id"`
		Error       string    `json:"error"`
	} `json:"vms"`
}

// waitRuns waits until job has n finished runs (skipped ones aside) and
// returns them, newest first.
func (s *serverRig) waitRuns(job string, n int) []apiRun {
	s.t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		var runs struct{ Runs []apiRun }
		if code := s.call("viewer", "GET", "/api/v1/runs?job="+job, nil, &runs); code != 200 {
			s.t.Fatalf("list runs: %d", code)
		}
		var done []apiRun
		for _, r := range runs.Runs {
			if r.Status != "running" && r.Status != "skipped" {
				done = append(done, r)
			}
		}
		if len(done) >= n {
			for i := range done {
				s.call("viewer", "GET", fmt.Sprintf("/api/v1/runs/%d", done[i].ID), nil, &done[i])
			}
			return done
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("job %s: %d finished runs, want %d: %+v", job, len(done), n, runs)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// TestServerEndToEnd: the server as a process backs the real guest up on
// its schedule (application-consistent through the agent, incremental
// after the first, retention applied), its API enforces tokens and roles,
// and, killed with SIGKILL mid-backup and started again, it marks the run
// interrupted, thaws and releases the guest, and the next run succeeds.
func TestServerEndToEnd(t *testing.T) {
	g := startGuest(t)
	s := newServerRig(t, g, `  - name: frequent
    type: backup
    repository: main
    vms: [{connection: lab}]
    schedule: "@every 10s"
    writers: {guest_agent: true, require: filesystem}
    retention: {keep_last: 2}
`)
	s.start()
	runs := s.waitRuns("frequent", 3)
	for i, r := range runs {
		want := "incremental"
		if i == len(runs)-1 {
			want = "full"
		}
		if r.Status != "succeeded" || r.Trigger != "schedule" || len(r.VMs) != 1 || r.VMs[0].VM != "guest" ||
			r.VMs[0].Mode != want || r.VMs[0].Consistency != "filesystem" {
			t.Fatalf("run %d: %+v, want %s", r.ID, r, want)
		}
	}
	var list struct {
		Backups []struct {
			ID   string `json:"id"`
			VM   string `json:"vm"`
			Mode string `json:"mode"`
		}
	}
	// Retention keeps 2 (a third may be a run's that ended after the listing of runs).
	if code := s.call("viewer", "GET", "/api/v1/backups?vm=guest", nil, &list); code != 200 || len(list.Backups) > 3 || len(list.Backups) < 2 {
		t.Fatalf("backups after retention keep_last 2: %d %+v", code, list)
	}
	backups := list.Backups
	// Tokens and roles.
	if code := s.call("", "GET", "/api/v1/vms", nil, nil); code != 401 {
		t.Fatalf("no token: %d", code)
	}
	if code := s.call("vmsh_0000", "GET", "/api/v1/vms", nil, nil); code != 401 {
		t.Fatalf("bad token: %d", code)
	}
	if code := s.call("viewer", "POST", "/api/v1/jobs/frequent/run", nil, nil); code != 403 {
		t.Fatalf("viewer runs a job: %d", code)
	}
	for _, role := range []string{"viewer", "operator"} {
		if code := s.call(role, "DELETE", "/api/v1/repositories/main/backups/"+backups[0].ID, nil, nil); code != 403 {
			t.Fatalf("%s deletes a backup: %d", role, code)
		}
	}
	var vms struct {
		VMs []struct {
			Name   string `json:"name"`
			Status string `json:"status"`
		}
	}
	if code := s.call("viewer", "GET", "/api/v1/vms", nil, &vms); code != 200 || len(vms.VMs) != 1 || vms.VMs[0].Name != "guest" || vms.VMs[0].Status != "fresh" {
		t.Fatalf("vms: %d %+v", code, vms)
	}
	// Metrics, parsed with Prometheus' own parser: the VM's last success
	// is the newest run's end.
	s.checkMetrics(runs[0])

	// Killed with the guest frozen: pause the schedule, restart the
	// server with a crash point at the freeze (SIGKILL, as kill -9 or the
	// OOM killer), start a run by hand.
	if code := s.call("operator", "POST", "/api/v1/jobs/frequent/disable", nil, nil); code != 200 {
		t.Fatalf("disable: %d", code)
	}
	waitNoRun(s, "frequent")
	s.proc.Signal(syscall.SIGTERM)
	if res := s.stop(); res.code != 0 && res.code != 130 {
		t.Fatalf("server stopped by SIGTERM: exit %d: %s", res.code, res.stderr)
	}
	s.startEnv("VMSHADOW_CRASH_AT=frozen")
	var started apiRun
	if code := s.call("operator", "POST", "/api/v1/jobs/frequent/run", nil, &started); code != 202 {
		t.Fatalf("run now: %d", code)
	}
	if res := s.stop(); res.code != 128+int(syscall.SIGKILL) {
		t.Fatalf("server killed at the freeze: exit %d: %s", res.code, res.stderr)
	}
	if st := g.status(); !st.Paused {
		t.Fatalf("the guest is not frozen after the kill: %+v", st)
	}
	s.start()
	var after apiRun
	s.call("viewer", "GET", fmt.Sprintf("/api/v1/runs/%d", started.ID), nil, &after)
	if after.Status != "interrupted" {
		t.Fatalf("killed run after restart: %+v", after)
	}
	g.waitRecords(g.status().Seq) // thawed: the workload writes again
	var next apiRun
	if code := s.call("operator", "POST", "/api/v1/jobs/frequent/run", nil, &next); code != 202 {
		t.Fatalf("run after restart: %d", code)
	}
	var end []apiRun
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
		var r apiRun
		s.call("viewer", "GET", fmt.Sprintf("/api/v1/runs/%d", next.ID), nil, &r)
		if r.Status != "running" {
			end = append(end, r)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the run after the restart did not end")
		}
	}
	if end[0].Status != "succeeded" || len(end[0].VMs) != 1 || end[0].VMs[0].Status != "succeeded" {
		t.Fatalf("run after the restart: %+v", end[0])
	}
	s.proc.Signal(syscall.SIGTERM)
	if res := s.stop(); res.code != 0 && res.code != 130 {
		t.Fatalf("server stopped by SIGTERM: exit %d: %s", res.code, res.stderr)
	}
}

// waitNoRun waits until job has no running run.
func waitNoRun(s *serverRig, job string) {
	s.t.Helper()
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
		var j struct {
			Running *int64 `json:"running"`
		}
		s.call("viewer", "GET", "/api/v1/jobs/"+job, nil, &j)
		if j.Running == nil {
			return
		}
	}
	s.t.Fatalf("job %s still running", job)
}

// checkMetrics scrapes /metrics and checks the per-VM last success time
// against run r's VM result.
func (s *serverRig) checkMetrics(r apiRun) {
	s.t.Helper()
	req, _ := http.NewRequest("GET", "http://vmshadow/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+s.tokens["viewer"])
	resp, err := s.client.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		s.t.Fatalf("parse /metrics: %v", err)
	}
	fam := families["vmshadow_vm_last_success_timestamp_seconds"]
	if fam == nil {
		s.t.Fatalf("no vmshadow_vm_last_success_timestamp_seconds among %d families", len(families))
	}
	var got float64
	for _, m := range fam.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["vm"] == "guest" && labels["job"] == "frequent" {
			got = m.GetGauge().GetValue()
		}
	}
	want := float64(r.VMs[0].Ended.UnixMilli()) / 1000
	if got < want-1 || got > want+1 {
		s.t.Fatalf("last success of guest: %v, want the run's end %v", got, want)
	}
}
