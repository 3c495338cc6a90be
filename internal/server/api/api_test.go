package api_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/api/apitest"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

var (
	docOnce sync.Once
	docVal  *openapi3.T
)

func doc(t testing.TB) *openapi3.T {
	docOnce.Do(func() { docVal = apitest.Doc(t) })
	if docVal == nil {
		t.Fatal("the OpenAPI document did not load")
	}
	return docVal
}

type logBuf struct {
	mu    sync.Mutex
	lines []string
}

func (l *logBuf) logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

func newHandler(f *fake, log *logBuf) http.Handler {
	o := api.Options{Version: "1.2.3", Metrics: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintln(w, "vmshadow_up 1")
	}), Now: func() time.Time { return t0.Add(48 * time.Hour) }}
	if log != nil {
		o.Logf = log.logf
	}
	return api.New(f, o)
}

// do sends one request to h; hdr are header name, value pairs.
func do(h http.Handler, method, path, token, body string, hdr ...string) *httptest.ResponseRecorder {
	var r *http.Request
	if body != "" {
		r = httptest.NewRequest(method, path, strings.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
	} else {
		r = httptest.NewRequest(method, path, nil)
	}
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func decode(t *testing.T, w *httptest.ResponseRecorder) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &m); err != nil {
		t.Fatalf("response is not a JSON object: %v: %s", err, w.Body)
	}
	return m
}

func errCode(t *testing.T, w *httptest.ResponseRecorder) (string, string) {
	t.Helper()
	m := decode(t, w)
	e, ok := m["error"].(map[string]any)
	if !ok {
		t.Fatalf("error response without an error object: %s", w.Body)
	}
	return fmt.Sprint(e["code"]), fmt.Sprint(e["message"])
}

// TestDocumentMatchesRoutes: every route the handler serves is in the
// OpenAPI document with the same least role, and every operation of the
// document is served.
func TestDocumentMatchesRoutes(t *testing.T) {
	d := doc(t)
	served := map[string]string{}
	for _, r := range api.Routes() {
		served[r.Method+" "+r.Path] = r.Role
	}
	documented := map[string]string{}
	for path, item := range d.Paths.Map() {
		for method, op := range item.Operations() {
			role, _ := op.Extensions["x-role"].(string)
			documented[method+" "+path] = role
			if role == "" && (op.Security == nil || len(*op.Security) != 0) {
				t.Errorf("%s %s: anonymous in x-role but not security: []", method, path)
			}
			if role != "" && op.Security != nil {
				t.Errorf("%s %s: needs role %s but overrides security", method, path, role)
			}
		}
	}
	for k, role := range served {
		drole, ok := documented[k]
		if !ok {
			t.Errorf("%s is served but not in the OpenAPI document", k)
		} else if drole != role {
			t.Errorf("%s: served for role %q, documented (x-role) for %q", k, role, drole)
		}
	}
	for k := range documented {
		if _, ok := served[k]; !ok {
			t.Errorf("%s is in the OpenAPI document but not served", k)
		}
	}
	if len(served) < 25 {
		t.Errorf("only %d routes", len(served))
	}
}

// TestEndpoints calls every endpoint with a token allowed to, checks the
// status, the call the service got and the body's key facts, and
// validates the response against the OpenAPI document.
func TestEndpoints(t *testing.T) {
	const bid = "ab12cd"
	tests := []struct {
		method, path, tok, body string
		status                  int
		calls                   []string
		check                   func(t *testing.T, w *httptest.ResponseRecorder)
	}{
		{"GET", "/healthz", "", "", 200, nil, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["status"] != "ok" || m["version"] != "1.2.3" {
				t.Errorf("healthz = %v", m)
			}
		}},
		{"GET", "/metrics", viewerTok, "", 200, nil, func(t *testing.T, w *httptest.ResponseRecorder) {
			if !strings.Contains(w.Body.String(), "vmshadow_up 1") {
				t.Errorf("metrics = %q", w.Body)
			}
		}},
		{"GET", "/api/v1/openapi.json", viewerTok, "", 200, nil, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["openapi"] != "3.0.3" {
				t.Errorf("openapi = %v", m["openapi"])
			}
		}},
		{"GET", "/api/v1/vms", viewerTok, "", 200, []string{"VMs"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if !strings.Contains(w.Body.String(), `"name":"old vm","connection":"","jobs":[]`) {
				t.Errorf("a VM without jobs does not show jobs: []: %s", w.Body)
			}
		}},
		{"GET", "/api/v1/vms/web1", viewerTok, "", 200, []string{"VMs"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["name"] != "web1" || m["status"] != "fresh" {
				t.Errorf("vm = %v", m)
			}
		}},
		{"GET", "/api/v1/vms/old%20vm", viewerTok, "", 200, []string{"VMs"}, nil},
		{"GET", "/api/v1/vms/nosuch", viewerTok, "", 404, []string{"VMs"}, nil},
		// XenServer names may hold a slash: escaped, it is one segment.
		{"GET", "/api/v1/vms/a%2Fb/backups", viewerTok, "", 200, []string{"Backups(,a/b,100,0001-01-01T00:00:00Z)"}, nil},
		{"GET", "/api/v1/vms/web1/backups?limit=3&repository=local&before=2026-12-02T00:00:00Z", viewerTok, "", 200,
			[]string{"Backups(local,web1,3,2026-12-02T00:00:00Z)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
				m := decode(t, w)
				if n := len(m["backups"].([]any)); n != 3 || m["next_before"] != "2026-12-01T02:30:00Z" {
					t.Errorf("%d backups, next_before %v; want 3 and the last one's time", n, m["next_before"])
				}
			}},
		{"GET", "/api/v1/vms/web1/results?before=10&limit=2", viewerTok, "", 200, []string{"VMResults(web1,10,2)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			m := decode(t, w)
			if rs := m["results"].([]any); len(rs) != 2 || m["next_before"] != 8.0 || rs[0].(map[string]any)["status"] != "failed" {
				t.Errorf("results = %v, want 2 failed and next_before 8", m)
			}
		}},
		{"GET", "/api/v1/vms/web1/results", viewerTok, "", 200, []string{"VMResults(web1,0,100)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["next_before"] != nil {
				t.Errorf("next_before %v on a page that is not full", m["next_before"])
			}
		}},
		{"GET", "/api/v1/backups", viewerTok, "", 200, []string{"Backups(,,100,0001-01-01T00:00:00Z)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["next_before"] != nil {
				t.Errorf("next_before %v on a page that is not full", m["next_before"])
			}
		}},
		{"GET", "/api/v1/backups?vm=web1&repository=offsite", viewerTok, "", 200, []string{"Backups(offsite,web1,100,0001-01-01T00:00:00Z)"}, nil},
		{"GET", "/api/v1/repositories/local/backups/AB12CD", viewerTok, "", 200, []string{"Backup(local," + bid + ")"}, nil},
		{"DELETE", "/api/v1/repositories/local/backups/" + bid, adminTok, "", 204, []string{"DeleteBackup(local," + bid + ")"}, nil},
		{"GET", "/api/v1/repositories", viewerTok, "", 200, []string{"Repositories"}, nil},
		{"GET", "/api/v1/repositories/local/usage?since=2026-11-01T00:00:00Z", viewerTok, "", 200, []string{"UsageHistory(local,2026-11-01T00:00:00Z)"},
			func(t *testing.T, w *httptest.ResponseRecorder) {
				m := decode(t, w)
				if pts := m["points"].([]any); m["repository"] != "local" || len(pts) != 2 || pts[1].(map[string]any)["logical_bytes"] != 800.0 {
					t.Errorf("usage = %v", m)
				}
			}},
		// Without since=: the last 90 days (the handler's clock).
		{"GET", "/api/v1/repositories/empty/usage", viewerTok, "", 200, []string{"UsageHistory(empty,2026-09-04T01:30:00Z)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if got := strings.TrimSpace(w.Body.String()); got != `{"repository":"empty","points":[]}` {
				t.Errorf("usage = %s, want no points as []", got)
			}
		}},
		{"GET", "/api/v1/repositories/local/verifies?before=7&limit=2", viewerTok, "", 200, []string{"Verifies(local,7,2)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			m := decode(t, w)
			vs := m["verifies"].([]any)
			if len(vs) != 2 || m["next_before"] != 5.0 {
				t.Fatalf("verifies = %v, want 2 and next_before 5", m)
			}
			f0, f1 := vs[0].(map[string]any)["findings"].([]any), vs[1].(map[string]any)["findings"]
			if len(f0) != 1 || !strings.Contains(fmt.Sprint(f0[0]), "chunk 12ab: missing") || fmt.Sprint(f1) != "[]" {
				t.Errorf("findings %v and %v", f0, f1)
			}
		}},
		{"GET", "/api/v1/repositories/local/verifies", viewerTok, "", 200, []string{"Verifies(local,0,100)"}, nil},
		{"POST", "/api/v1/repositories/local/prune-preview", viewerTok, `{"vms":["web1","db 1"],"retention":{"keep_last":1,"keep_daily":-1}}`, 200,
			[]string{"PrunePreview(local,web1+db 1,{Last:1 Hourly:0 Daily:-1 Weekly:0 Monthly:0 Yearly:0})"}, func(t *testing.T, w *httptest.ResponseRecorder) {
				m := decode(t, w)
				bs := m["backups"].([]any)
				if m["removed"] != 1.0 || len(bs) != 2 || fmt.Sprint(bs[1].(map[string]any)["reasons"]) != "[]" || bs[1].(map[string]any)["keep"] != false {
					t.Errorf("preview = %v", m)
				}
			}},
		{"POST", "/api/v1/repositories/local/prune-preview", viewerTok, `{"retention":{"keep_weekly":4}}`, 200,
			[]string{"PrunePreview(local,,{Last:0 Hourly:0 Daily:0 Weekly:4 Monthly:0 Yearly:0})"}, nil},
		{"GET", "/api/v1/repositories/local/gc-preview", operatorTok, "", 200, []string{"GCPreview(local)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["chunks_deleted"] != 2.0 || m["grace_s"] != 86400.0 {
				t.Errorf("gc preview = %v", m)
			}
		}},
		{"POST", "/api/v1/selection-preview", viewerTok, `{"vms":[{"connection":"lab","vms":["web*","db1"]},{"connection":"xen"}]}`, 200,
			[]string{"SelectionPreview(lab:web*+db1;xen:)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
				if got := strings.TrimSpace(w.Body.String()); got != `{"vms":[{"name":"web1","connection":"lab"}],"problems":[]}` {
					t.Errorf("selection preview = %s", got)
				}
			}},
		{"GET", "/api/v1/schedule-preview?schedule=0%202%20*%20*%20*&timezone=Europe/Berlin", viewerTok, "", 200,
			[]string{"SchedulePreview(0 2 * * *,Europe/Berlin,5)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
				if m := decode(t, w); len(m["next"].([]any)) != 5 {
					t.Errorf("schedule preview = %v, want 5 times", m)
				}
			}},
		{"GET", "/api/v1/schedule-preview?schedule=@hourly&count=2", viewerTok, "", 200, []string{"SchedulePreview(@hourly,,2)"}, nil},
		{"GET", "/api/v1/jobs/nightly/prune-preview", viewerTok, "", 200, []string{"JobPrunePreview(nightly)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["job"] != "nightly" || fmt.Sprint(m["vms"]) != "[]" {
				t.Errorf("job preview = %v", m)
			}
		}},
		{"GET", "/api/v1/runs?status=failed&vm=web1", viewerTok, "", 200, []string{"Runs(,failed,web1,0,100)"}, nil},
		{"GET", "/api/v1/jobs", viewerTok, "", 200, []string{"Jobs"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if !strings.Contains(w.Body.String(), `"spec":{},"next":[]`) {
				t.Errorf("a job without spec and next times does not show {} and []: %s", w.Body)
			}
		}},
		{"GET", "/api/v1/jobs/nightly", viewerTok, "", 200, []string{"Job(nightly)"}, nil},
		{"POST", "/api/v1/jobs", adminTok, `{"name":"n2","type":"backup","repository":"local"}`, 201,
			[]string{`CreateJob({"name":"n2","type":"backup","repository":"local"})`}, func(t *testing.T, w *httptest.ResponseRecorder) {
				if l := w.Header().Get("Location"); l != "/api/v1/jobs/n2" {
					t.Errorf("Location %q", l)
				}
			}},
		{"PUT", "/api/v1/jobs/n2", adminTok, `{"type":"backup","schedule":"@daily"}`, 200, []string{`UpdateJob(n2,{"name":"n2","schedule":"@daily","type":"backup"})`}, nil},
		{"PUT", "/api/v1/jobs/n2", adminTok, `{"name":"n2"}`, 200, []string{`UpdateJob(n2,{"name":"n2"})`}, nil},
		{"DELETE", "/api/v1/jobs/n2", adminTok, "", 204, []string{"DeleteJob(n2)"}, nil},
		{"POST", "/api/v1/jobs/nightly/run", operatorTok, "", 202, []string{"RunJob(nightly)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if l := w.Header().Get("Location"); l != "/api/v1/runs/9" {
				t.Errorf("Location %q", l)
			}
			if m := decode(t, w); m["status"] != "running" || m["id"] != 9.0 {
				t.Errorf("run = %v", m)
			}
		}},
		{"POST", "/api/v1/jobs/nightly/enable", operatorTok, "", 200, []string{"SetJobEnabled(nightly,true)"}, nil},
		{"POST", "/api/v1/jobs/nightly/disable", operatorTok, "", 200, []string{"SetJobEnabled(nightly,false)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["enabled"] != false {
				t.Errorf("enabled = %v", m["enabled"])
			}
		}},
		{"GET", "/api/v1/runs?job=nightly&before=10&limit=2", viewerTok, "", 200, []string{"Runs(nightly,,,10,2)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["next_before"] != 8.0 {
				t.Errorf("next_before = %v, want 8", m["next_before"])
			}
		}},
		{"GET", "/api/v1/runs", viewerTok, "", 200, []string{"Runs(,,,0,100)"}, nil},
		{"GET", "/api/v1/runs/8", viewerTok, "", 200, []string{"Run(8)"}, nil},
		{"GET", "/api/v1/runs/8/log?after=1&limit=5", viewerTok, "", 200, []string{"RunLog(8,1,5)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["next_after"] != 3.0 || len(m["lines"].([]any)) != 2 {
				t.Errorf("log page = %v, want lines 2 and 3, next_after 3", m)
			}
		}},
		{"GET", "/api/v1/runs/8/log?after=3", viewerTok, "", 200, []string{"RunLog(8,3,1000)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if m := decode(t, w); m["next_after"] != 3.0 || len(m["lines"].([]any)) != 0 {
				t.Errorf("log page = %v, want no lines, next_after 3", m)
			}
		}},
		{"POST", "/api/v1/runs/8/cancel", operatorTok, "", 202, []string{"CancelRun(8)", "Run(8)"}, nil},
		{"POST", "/api/v1/restore", operatorTok, `{"repository":"local","backup":"ab12","to":"/srv/restore","format":"qcow2"}`, 200,
			[]string{"Restore(local,ab12,/srv/restore,qcow2)"}, nil},
		{"POST", "/api/v1/restore", operatorTok, `{"repository":"local","backup":"ab12","libvirt":{"connection":"kvm1","pool":"default","vm_name":"w2","start":true}}`, 200,
			[]string{"Restore(local,ab12,libvirt,kvm1,default,w2,true)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
				m := decode(t, w)
				if l, _ := m["libvirt"].(map[string]any); l == nil || l["domain"] != "web1-restored" || fmt.Sprint(m["files"]) != "[]" {
					t.Errorf("restore into libvirt = %v", m)
				}
			}},
		{"POST", "/api/v1/restore", operatorTok, `{"repository":"local","backup":"ab12","xapi":{"connection":"pool","sr":"Local storage","vm_name":"web1 restored"}}`, 200,
			[]string{"Restore(local,ab12,xapi,pool,Local storage,web1 restored)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
				m := decode(t, w)
				if x, _ := m["xapi"].(map[string]any); x == nil || x["vm_uuid"] != "vm-uu1d" || fmt.Sprint(x["disks"]) != "[]" {
					t.Errorf("restore into a pool = %v", m)
				}
			}},
		{"GET", "/api/v1/connections", viewerTok, "", 200, []string{"Connections"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if got := strings.TrimSpace(w.Body.String()); got != `{"connections":[{"name":"lab","type":"qmp"},{"name":"kvm1","type":"libvirt"},{"name":"pool","type":"xapi"}]}` {
				t.Errorf("connections = %s", got)
			}
		}},
		{"GET", "/api/v1/serves", viewerTok, "", 200, []string{"Serves"}, func(t *testing.T, w *httptest.ResponseRecorder) {
			if got := strings.TrimSpace(w.Body.String()); got != `{"serves":[]}` {
				t.Errorf("serves = %s, want an empty list", got)
			}
		}},
		{"POST", "/api/v1/serves", operatorTok, `{"repository":"local","backup":"ab12","writable":true}`, 201,
			[]string{"StartServe(local,ab12,,true)"}, func(t *testing.T, w *httptest.ResponseRecorder) {
				if l := w.Header().Get("Location"); l != "/api/v1/serves/s1" {
					t.Errorf("Location %q", l)
				}
			}},
		{"DELETE", "/api/v1/serves/s1", operatorTok, "", 204, []string{"StopServe(s1)"}, nil},
	}
	f := newFake()
	f.logLines = []state.LogLine{{ID: 1, Time: t0, Level: "info", Message: "start"}, {ID: 2, Time: t0, Level: "warning", VM: "web1", Message: "no agent"}, {ID: 3, Time: t0, Level: "error", Message: "end"}}
	h := newHandler(f, nil)
	seen := map[string]bool{}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			f.takeCalls()
			w := do(h, tt.method, tt.path, tt.tok, tt.body)
			if w.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tt.status, w.Body)
			}
			if got := f.takeCalls(); !slices.Equal(got, tt.calls) {
				t.Errorf("service calls %q, want %q", got, tt.calls)
			}
			if cc := w.Header().Get("Cache-Control"); cc != "no-store" {
				t.Errorf("Cache-Control %q", cc)
			}
			if w.Header().Get("X-Request-ID") == "" {
				t.Error("no X-Request-ID")
			}
			if w.Code == 204 && w.Body.Len() != 0 {
				t.Errorf("204 with a body: %s", w.Body)
			}
			apitest.ValidateRecorder(t, doc(t), tt.method, tt.path, w)
			if tt.check != nil {
				tt.check(t, w)
			}
		})
		_, item, _, _ := apitest.Find(doc(t), tt.path)
		for m, op := range item.Operations() {
			if m == tt.method {
				seen[op.OperationID] = true
			}
		}
	}
	// Every operation but the event stream (TestEvents) was called.
	for _, r := range api.Routes() {
		_, item, _, _ := apitest.Find(doc(t), strings.NewReplacer("{vm}", "x", "{repo}", "x", "{id}", "1", "{name}", "x").Replace(r.Path))
		if op := item.GetOperation(r.Method); !seen[op.OperationID] && op.OperationID != "watchRun" {
			t.Errorf("%s %s (%s) not tested", r.Method, r.Path, op.OperationID)
		}
	}
}

// TestAuth: no token and bad tokens are 401 with WWW-Authenticate; each
// role reaches exactly the routes its rank allows, and a refused request
// never reaches the service.
func TestAuth(t *testing.T) {
	f := newFake()
	h := newHandler(f, nil)
	for _, tc := range []struct{ name, header string }{
		{"no token", ""}, {"unknown token", "Bearer vmsh_nope"}, {"basic auth", "Basic dXNlcjpwYXNz"},
		{"bearer without token", "Bearer "}, {"token without scheme", viewerTok},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var w *httptest.ResponseRecorder
			if tc.header == "" {
				w = do(h, "GET", "/api/v1/vms", "", "")
			} else {
				w = do(h, "GET", "/api/v1/vms", "", "", "Authorization", tc.header)
			}
			if w.Code != 401 {
				t.Fatalf("status %d, want 401", w.Code)
			}
			wa := w.Header().Get("WWW-Authenticate")
			if !strings.HasPrefix(wa, `Bearer realm="vmshadow"`) {
				t.Errorf("WWW-Authenticate %q", wa)
			}
			if tc.header != "" && !strings.Contains(wa, `error="invalid_token"`) {
				t.Errorf("WWW-Authenticate %q lacks invalid_token for a token given", wa)
			}
			if code, _ := errCode(t, w); code != "unauthorized" {
				t.Errorf("code %q", code)
			}
			if c := f.takeCalls(); len(c) != 0 {
				t.Errorf("service called: %q", c)
			}
			apitest.ValidateRecorder(t, doc(t), "GET", "/api/v1/vms", w)
		})
	}
	// A failing token store is a 500, not a 401.
	f.fail["Authenticate"] = fmt.Errorf("database is locked")
	if w := do(h, "GET", "/api/v1/vms", "vmsh_other", ""); w.Code != 500 {
		t.Errorf("token store failing: status %d, want 500", w.Code)
	}
	delete(f.fail, "Authenticate")

	toks := map[string]string{state.Viewer: viewerTok, state.Operator: operatorTok, state.Admin: adminTok}
	bodies := map[string]string{
		"POST /api/v1/jobs":                              `{"name":"x"}`,
		"PUT /api/v1/jobs/{name}":                        `{"name":"x"}`,
		"POST /api/v1/restore":                           `{"repository":"r","backup":"ab","to":"/t"}`,
		"POST /api/v1/serves":                            `{"repository":"r","backup":"ab"}`,
		"GET /api/v1/runs/{id}/events":                   "",
		"POST /api/v1/repositories/{repo}/prune-preview": `{"retention":{"keep_last":1}}`,
		"POST /api/v1/selection-preview":                 `{"vms":[{"connection":"lab"}]}`,
	}
	for _, r := range api.Routes() {
		if r.Role == "" || r.Path == "/api/v1/runs/{id}/events" {
			continue
		}
		path := strings.NewReplacer("{vm}", "web1", "{repo}", "local", "{id}", "1", "{name}", "x").Replace(r.Path)
		if r.Path == "/api/v1/schedule-preview" {
			path += "?schedule=@daily"
		}
		for _, role := range []string{state.Viewer, state.Operator, state.Admin} {
			t.Run(fmt.Sprintf("%s %s as %s", r.Method, r.Path, role), func(t *testing.T) {
				f.takeCalls()
				w := do(h, r.Method, path, toks[role], bodies[r.Method+" "+r.Path])
				calls := f.takeCalls()
				if state.Allows(role, r.Role) {
					if w.Code >= 400 {
						t.Errorf("status %d: %s", w.Code, w.Body)
					}
					return
				}
				if w.Code != 403 {
					t.Fatalf("status %d, want 403", w.Code)
				}
				code, msg := errCode(t, w)
				if code != "forbidden" || !strings.Contains(msg, "needs role "+r.Role) {
					t.Errorf("error %s %q", code, msg)
				}
				if len(calls) != 0 {
					t.Errorf("service called: %q", calls)
				}
				apitest.ValidateRecorder(t, doc(t), r.Method, path, w)
			})
		}
	}
}

// TestErrorMapping: the service's error classes become statuses and
// codes, with the service's message.
func TestErrorMapping(t *testing.T) {
	f := newFake()
	h := newHandler(f, nil)
	for _, tc := range []struct {
		err    error
		status int
		code   string
		class  string
	}{
		{fmt.Errorf("no job x: %w", errs.ErrNotFound), 404, "not_found", "not found"},
		{fmt.Errorf("bad schedule: %w", errs.ErrUsage), 400, "bad_request", "usage error"},
		{fmt.Errorf("job x is running: %w", errs.ErrBusy), 409, "conflict", "busy"},
		{fmt.Errorf("repository password: %w", errs.ErrAuth), 401, "unauthorized", "authentication failed"},
		{fmt.Errorf("qmp: %w", errs.ErrConnect), 500, "internal", "connection failed"},
		{fmt.Errorf("disk on fire"), 500, "internal", ""},
	} {
		t.Run(tc.code+" "+tc.err.Error(), func(t *testing.T) {
			f.fail["RunJob"] = tc.err
			w := do(h, "POST", "/api/v1/jobs/x/run", operatorTok, "")
			if w.Code != tc.status {
				t.Fatalf("status %d, want %d", w.Code, tc.status)
			}
			m := decode(t, w)["error"].(map[string]any)
			if want := strings.TrimSuffix(tc.err.Error(), ": "+tc.class); m["code"] != tc.code || m["message"] != want {
				t.Errorf("error %v, want code %s message %q", m, tc.code, tc.err)
			}
			if cls, _ := m["class"].(string); cls != tc.class {
				t.Errorf("class %q, want %q", cls, tc.class)
			}
			if wa := w.Header().Get("WWW-Authenticate"); tc.status == 401 && wa != `Bearer realm="vmshadow"` {
				t.Errorf("WWW-Authenticate %q: the token was fine", wa)
			}
			if w.Header().Get("Content-Type") != "application/json" {
				t.Errorf("Content-Type %q", w.Header().Get("Content-Type"))
			}
			apitest.ValidateRecorder(t, doc(t), "POST", "/api/v1/jobs/x/run", w)
		})
	}
}

// TestBadInput: what the HTTP layer refuses itself, each with 4xx JSON
// naming the mistake, without calling the service.
func TestBadInput(t *testing.T) {
	f := newFake()
	h := newHandler(f, nil)
	big := `{"name":"x","pad":"` + strings.Repeat("a", api.MaxBodySize) + `"}`
	for _, tc := range []struct {
		method, path, body string
		hdr                []string
		status             int
		code, msg          string
	}{
		{"GET", "/api/v1/runs?limit=0", "", nil, 400, "bad_request", "limit=\"0\": want a whole number from 1 to 1000"},
		{"GET", "/api/v1/runs?limit=abc", "", nil, 400, "bad_request", "limit=\"abc\""},
		{"GET", "/api/v1/runs?limit=1001", "", nil, 400, "bad_request", "limit"},
		{"GET", "/api/v1/runs?before=-1", "", nil, 400, "bad_request", "before=\"-1\""},
		{"GET", "/api/v1/runs?jobs=x", "", nil, 400, "bad_request", `unknown query parameter "jobs": use job, status, vm, before, limit`},
		{"GET", "/api/v1/runs?job=a&job=b", "", nil, 400, "bad_request", `"job" given 2 times`},
		{"GET", "/api/v1/runs?%zz", "", nil, 400, "bad_request", "bad query string"},
		{"GET", "/api/v1/vms?x=1", "", nil, 400, "bad_request", "takes none"},
		{"GET", "/api/v1/backups?before=yesterday", "", nil, 400, "bad_request", "before=\"yesterday\": want an RFC 3339 time"},
		{"GET", "/api/v1/backups?vm=", "", nil, 400, "bad_request", "query parameter vm: empty name"},
		{"GET", "/api/v1/runs/abc", "", nil, 400, "bad_request", `run ID "abc"`},
		{"GET", "/api/v1/runs/0/log", "", nil, 400, "bad_request", `run ID "0"`},
		{"GET", "/api/v1/runs/1/log?after=-5", "", nil, 400, "bad_request", "after=\"-5\""},
		{"GET", "/api/v1/runs/1/events", "", []string{"Last-Event-ID", "x"}, 400, "bad_request", "Last-Event-ID"},
		{"GET", "/api/v1/repositories/local/backups/xyz", "", nil, 400, "bad_request", `backup ID "xyz"`},
		{"DELETE", "/api/v1/serves/a%20b", "", nil, 400, "bad_request", `serve ID "a b"`},
		{"GET", "/api/v1/vms/a%01b", "", nil, 400, "bad_request", "control character"},
		{"POST", "/api/v1/jobs", `{"type":"backup"}`, nil, 400, "bad_request", `needs a "name"`},
		{"POST", "/api/v1/jobs", `{"name":7}`, nil, 400, "bad_request", `"name" must be a string`},
		{"POST", "/api/v1/jobs", `[1,2]`, nil, 400, "bad_request", "array"},
		{"POST", "/api/v1/jobs", `null`, nil, 400, "bad_request", "JSON object"},
		{"POST", "/api/v1/jobs", `{"name":"x"} {"name":"y"}`, nil, 400, "bad_request", "data after the JSON value"},
		{"POST", "/api/v1/jobs", `{"name":"x"`, nil, 400, "bad_request", "not valid JSON"},
		{"POST", "/api/v1/jobs", ``, nil, 400, "bad_request", "empty request body"},
		{"POST", "/api/v1/jobs", big, nil, 413, "too_large", "larger than 1048576 bytes"},
		{"POST", "/api/v1/jobs", `{"name":"x"}`, []string{"Content-Type", "text/yaml"}, 415, "unsupported_media_type", `"text/yaml"`},
		{"PUT", "/api/v1/jobs/a", `{"name":"b"}`, nil, 400, "bad_request", "cannot be renamed"},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","to":"/x","force":true}`, nil, 400, "bad_request", `unknown field "force"`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","to":7}`, nil, 400, "bad_request", `field "to" must be string, not number`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab"}`, nil, 400, "bad_request", `"to" (an absolute directory on the server), "libvirt" or "xapi" is required`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","to":"/x","format":"vmdk"}`, nil, 400, "bad_request", `format "vmdk"`},
		{"POST", "/api/v1/serves", `{"repository":"local","backup":"g"}`, nil, 400, "bad_request", `"backup": backup ID "g"`},
		{"POST", "/api/v1/serves", `{"backup":"ab"}`, nil, 400, "bad_request", `"repository": empty name`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","to":"/x","libvirt":{"connection":"k","pool":"p"}}`, nil, 400, "bad_request", `give one target: "to" (and "format"), "libvirt" or "xapi"`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","libvirt":{"pool":"p"}}`, nil, 400, "bad_request", `"libvirt.connection": empty name`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","libvirt":{"connection":"k"}}`, nil, 400, "bad_request", `"libvirt.pool": empty name`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","libvirt":{"connection":"k","pool":"p","uri":"qemu:///system"}}`, nil, 400, "bad_request", `unknown field "uri"`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","libvirt":{"connection":"k","pool":"p"},"xapi":{"connection":"x","sr":"s"}}`, nil, 400, "bad_request", `give one target`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","xapi":{"connection":"x"}}`, nil, 400, "bad_request", `"xapi.sr": empty name`},
		{"POST", "/api/v1/restore", `{"repository":"local","backup":"ab","xapi":{"sr":"s"}}`, nil, 400, "bad_request", `"xapi.connection": empty name`},
		{"GET", "/api/v1/vms/web1/results?before=0", "", nil, 400, "bad_request", `before="0"`},
		{"GET", "/api/v1/runs?status=done", "", nil, 400, "bad_request", `status="done": want one of running, succeeded, failed, cancelled, interrupted, skipped`},
		{"GET", "/api/v1/runs?vm=", "", nil, 400, "bad_request", "query parameter vm: empty name"},
		{"GET", "/api/v1/repositories/local/usage?since=last%20week", "", nil, 400, "bad_request", `since="last week": want an RFC 3339 time`},
		{"GET", "/api/v1/repositories/local/verifies?limit=0", "", nil, 400, "bad_request", "limit=\"0\""},
		{"POST", "/api/v1/repositories/local/prune-preview", `{"retention":{}}`, nil, 400, "bad_request", "the retention keeps nothing"},
		{"POST", "/api/v1/repositories/local/prune-preview", `{"retention":{"keep_last":-2}}`, nil, 400, "bad_request", "retention.keep_last is -2"},
		{"POST", "/api/v1/repositories/local/prune-preview", `{"retention":{"keep_lats":2}}`, nil, 400, "bad_request", `unknown field "keep_lats"`},
		{"POST", "/api/v1/repositories/local/prune-preview", `{"vms":[""],"retention":{"keep_last":2}}`, nil, 400, "bad_request", "vms[0]: empty name"},
		{"POST", "/api/v1/selection-preview", `{"vms":[]}`, nil, 400, "bad_request", `"vms" is empty`},
		{"POST", "/api/v1/selection-preview", `{"vms":[{"vms":["a"]}]}`, nil, 400, "bad_request", "vms[0].connection: empty name"},
		{"POST", "/api/v1/selection-preview", `{"vms":[{"connection":"lab","vms":["a",""]}]}`, nil, 400, "bad_request", "vms[0].vms[1]: empty name"},
		{"GET", "/api/v1/schedule-preview", "", nil, 400, "bad_request", "query parameter schedule: give the schedule"},
		{"GET", "/api/v1/schedule-preview?schedule=@daily&count=101", "", nil, 400, "bad_request", `count="101"`},
		{"GET", "/api/v1/nosuch", "", nil, 404, "not_found", "no such endpoint /api/v1/nosuch"},
		{"GET", "/", "", nil, 404, "not_found", "no such endpoint"},
		{"PATCH", "/api/v1/jobs/x", "", nil, 405, "method_not_allowed", "does not take PATCH"},
	} {
		t.Run(tc.method+" "+tc.path+" "+tc.msg, func(t *testing.T) {
			f.takeCalls()
			w := do(h, tc.method, tc.path, adminTok, tc.body, tc.hdr...)
			if w.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", w.Code, tc.status, w.Body)
			}
			code, msg := errCode(t, w)
			if code != tc.code || !strings.Contains(msg, tc.msg) {
				t.Errorf("error %s %q, want %s containing %q", code, msg, tc.code, tc.msg)
			}
			if c := f.takeCalls(); len(c) != 0 {
				t.Errorf("service called: %q", c)
			}
			if w.Header().Get("Cache-Control") != "no-store" || w.Header().Get("X-Request-ID") == "" {
				t.Errorf("headers %v", w.Header())
			}
			if tc.status == 405 {
				if a := w.Header().Get("Allow"); !strings.Contains(a, "PUT") || !strings.Contains(a, "DELETE") {
					t.Errorf("Allow %q", a)
				}
				return
			}
			if tc.status != 404 {
				apitest.ValidateRecorder(t, doc(t), tc.method, tc.path, w)
			}
		})
	}
}

// TestRequestLog: one log line per request with the token's name and the
// request ID, never the token's secret.
func TestRequestLog(t *testing.T) {
	f := newFake()
	var log logBuf
	h := newHandler(f, &log)
	w := do(h, "GET", "/api/v1/vms", adminTok, "", "X-Request-ID", "req-42")
	if w.Header().Get("X-Request-ID") != "req-42" {
		t.Errorf("X-Request-ID %q, want the client's", w.Header().Get("X-Request-ID"))
	}
	do(h, "GET", "/api/v1/vms", "vmsh_wrong_secret", "", "X-Request-ID", "bad id with spaces")
	do(h, "GET", "/api/v1/vms/a%0Aapi:%20forged", adminTok, "")
	f.fail["RunJob"] = fmt.Errorf("boom: %w", errs.ErrBusy)
	do(h, "POST", "/api/v1/jobs/x/run", operatorTok, "")
	got := log.String()
	if n := strings.Count(got, "\n"); n != 3 {
		t.Errorf("%d log lines, want 4 (a path must not break a line):\n%s", n+1, got)
	}
	for _, want := range []string{
		"api: GET /api/v1/vms 200", "token=a request=req-42",
		"api: GET /api/v1/vms 401", "token=-",
		"api: POST /api/v1/jobs/x/run 409", "token=o", ": boom: busy",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("log lacks %q:\n%s", want, got)
		}
	}
	for _, secret := range []string{adminTok, operatorTok, "vmsh_wrong_secret", "bad id with spaces"} {
		if strings.Contains(got, secret) {
			t.Errorf("log holds %q:\n%s", secret, got)
		}
	}
}
