package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repo/repostats"
	"github.com/vmshadow/vmshadow/internal/server/metrics"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

var t0 = time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC)

// scrape serves reg with the package's Handler on a real HTTP server,
// fetches /metrics and parses it with Prometheus' own text parser.
func scrape(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse the scrape: %v", err)
	}
	return fams
}

// value returns the value of the sample of family name whose labels are
// labels (name=value pairs), failing the test when there is none.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	f := fams[name]
	if f == nil {
		t.Errorf("no metric %s", name)
		return -1
	}
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for _, m := range f.Metric {
		got := map[string]string{}
		for _, l := range m.Label {
			got[l.GetName()] = l.GetValue()
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			continue
		}
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Counter != nil:
			return m.Counter.GetValue()
		}
	}
	t.Errorf("no sample of %s with labels %v", name, want)
	return -1
}

func near(a, b float64) bool { d := a - b; return d < 1e-6 && d > -1e-6 }

// fillState records two jobs' runs and a verify in a real SQLite file.
func fillState(t *testing.T, db *state.DB) {
	t.Helper()
	ctx := context.Background()
	vmRun := func(job string, start time.Time, results ...state.VMResult) {
		t.Helper()
		id, err := db.StartRun(ctx, job, "backup", "schedule", start)
		if err != nil {
			t.Fatal(err)
		}
		status := state.Succeeded
		for _, r := range results {
			if err := db.StartVM(ctx, id, r.VM, start); err != nil {
				t.Fatal(err)
			}
			r.Run = id
			if err := db.EndVM(ctx, r); err != nil {
				t.Fatal(err)
			}
			if r.Status != state.Succeeded {
				status = state.Failed
			}
		}
		if err := db.EndRun(ctx, id, status, "", start.Add(10*time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	vmRun("nightly", t0,
		state.VMResult{VM: "web1", Status: state.Succeeded, Ended: t0.Add(90 * time.Second), Consistency: "application", BytesRead: 1000, BytesNew: 400, FreezeMS: 1500},
		state.VMResult{VM: "db1", Status: state.Succeeded, Ended: t0.Add(2 * time.Minute), Consistency: "filesystem", BytesRead: 5000, BytesNew: 100, FreezeMS: 250})
	day := t0.Add(24 * time.Hour)
	vmRun("nightly", day,
		state.VMResult{VM: "web1", Status: state.Succeeded, Ended: day.Add(30 * time.Second), Consistency: "crash", BytesRead: 2000, BytesNew: 300},
		state.VMResult{VM: "db1", Status: state.Failed, Ended: day.Add(time.Minute), Error: "boom"})
	vmRun("offsite", t0.Add(time.Hour),
		state.VMResult{VM: "web1", Status: state.Succeeded, Ended: t0.Add(time.Hour + 45*time.Second), Consistency: "filesystem", BytesRead: 7, BytesNew: 7})
	if _, err := db.SkipRun(ctx, "nightly", "backup", "schedule", "the previous run is still going", day.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := db.RecordVerify(ctx, state.Verify{Repository: "main", Time: day.Add(2 * time.Hour), Backups: 2, Chunks: 6, Problems: 3}); err != nil {
		t.Fatal(err)
	}
}

const cs = repo.MinChunkSize

// makeRepo creates a local repository holding two backups of one image
// (of VM web1) and returns it with the image's size.
func makeRepo(t *testing.T) (*repo.Repo, int64) {
	t.Helper()
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(context.Background(), be, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	img := make([]byte, 3*cs+100)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range img[:2*cs] { // the third chunk is zeros
		img[i] = byte(rng.Uint32())
	}
	path := filepath.Join(dir, "a.raw")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		im, err := imagefile.Open("sda", path)
		if err != nil {
			t.Fatal(err)
		}
		_, err = backup.Run(context.Background(), r, backup.Job{VM: "web1", Time: t0.Add(time.Duration(i) * time.Hour), Disks: []backup.Disk{{Source: im}}}, backup.Options{})
		im.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	return r, int64(len(img))
}

// TestScrape registers the collector over a real state database and a
// real repository's cached statistics, scrapes it over HTTP and checks
// every metric's labels and value against what was recorded.
func TestScrape(t *testing.T) {
	ctx := context.Background()
	db, err := state.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	fillState(t, db)
	r, imgSize := makeRepo(t)
	cache := metrics.NewStatsCache(ctx, []string{"main"}, time.Hour, func(ctx context.Context, name string) (*repostats.Stats, error) {
		if name != "main" {
			return nil, fmt.Errorf("no repository %s", name)
		}
		return repostats.Compute(ctx, r)
	})
	cache.Refresh("main")
	cache.Wait()
	want, err := repostats.Compute(ctx, r)
	if err != nil {
		t.Fatal(err)
	}
	reg := metrics.NewRegistry(metrics.New(metrics.Options{Source: db, Repos: cache, Version: "1.2.3-test"}))
	fams := scrape(t, metrics.Handler(reg, nil))

	day := t0.Add(24 * time.Hour)
	sec := func(t time.Time) float64 { return float64(t.Unix()) }
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"vmshadow_vm_last_success_timestamp_seconds", []string{"job", "nightly", "vm", "web1"}, sec(day.Add(30 * time.Second))},
		{"vmshadow_vm_last_success_duration_seconds", []string{"job", "nightly", "vm", "web1"}, 30},
		{"vmshadow_vm_last_success_read_bytes", []string{"job", "nightly", "vm", "web1"}, 2000},
		{"vmshadow_vm_last_success_stored_bytes", []string{"job", "nightly", "vm", "web1"}, 300},
		{"vmshadow_vm_last_success_freeze_seconds", []string{"job", "nightly", "vm", "web1"}, 0},
		{"vmshadow_vm_last_success_consistency", []string{"job", "nightly", "vm", "web1"}, 1},
		// db1's last success is the first night's; its last result failed.
		{"vmshadow_vm_last_success_timestamp_seconds", []string{"job", "nightly", "vm", "db1"}, sec(t0.Add(2 * time.Minute))},
		{"vmshadow_vm_last_success_duration_seconds", []string{"job", "nightly", "vm", "db1"}, 120},
		{"vmshadow_vm_last_success_read_bytes", []string{"job", "nightly", "vm", "db1"}, 5000},
		{"vmshadow_vm_last_success_stored_bytes", []string{"job", "nightly", "vm", "db1"}, 100},
		{"vmshadow_vm_last_success_freeze_seconds", []string{"job", "nightly", "vm", "db1"}, 0.25},
		{"vmshadow_vm_last_success_consistency", []string{"job", "nightly", "vm", "db1"}, 2},
		{"vmshadow_vm_last_result_timestamp_seconds", []string{"job", "nightly", "vm", "db1"}, sec(day.Add(time.Minute))},
		{"vmshadow_vm_last_result_success", []string{"job", "nightly", "vm", "db1"}, 0},
		{"vmshadow_vm_last_result_timestamp_seconds", []string{"job", "nightly", "vm", "web1"}, sec(day.Add(30 * time.Second))},
		{"vmshadow_vm_last_result_success", []string{"job", "nightly", "vm", "web1"}, 1},
		// The same VM in another job.
		{"vmshadow_vm_last_success_timestamp_seconds", []string{"job", "offsite", "vm", "web1"}, sec(t0.Add(time.Hour + 45*time.Second))},
		{"vmshadow_vm_last_success_consistency", []string{"job", "offsite", "vm", "web1"}, 2},
		{"vmshadow_job_runs_total", []string{"job", "nightly", "kind", "backup", "result", "succeeded"}, 1},
		{"vmshadow_job_runs_total", []string{"job", "nightly", "kind", "backup", "result", "failed"}, 1},
		{"vmshadow_job_runs_total", []string{"job", "nightly", "kind", "backup", "result", "skipped"}, 1},
		{"vmshadow_job_runs_total", []string{"job", "offsite", "kind", "backup", "result", "succeeded"}, 1},
		{"vmshadow_repository_last_verify_timestamp_seconds", []string{"repository", "main"}, sec(day.Add(2 * time.Hour))},
		{"vmshadow_repository_last_verify_backups", []string{"repository", "main"}, 2},
		{"vmshadow_repository_last_verify_problems", []string{"repository", "main"}, 3},
		// Two backups of one image: logical twice the image, stored one copy.
		{"vmshadow_repository_logical_bytes", []string{"repository", "main"}, float64(2 * imgSize)},
		{"vmshadow_repository_unique_bytes", []string{"repository", "main"}, 2 * cs},
		{"vmshadow_repository_stored_bytes", []string{"repository", "main"}, float64(want.StoredBytes)},
		{"vmshadow_repository_unreferenced_bytes", []string{"repository", "main"}, 0},
		{"vmshadow_repository_deduplication_factor", []string{"repository", "main"}, float64(2*imgSize) / float64(want.StoredBytes)},
		{"vmshadow_repository_backups", []string{"repository", "main"}, 2},
		{"vmshadow_repository_unreadable_backups", []string{"repository", "main"}, 0},
		{"vmshadow_repository_chunks", []string{"repository", "main"}, 2},
		{"vmshadow_repository_stats_error", []string{"repository", "main"}, 0},
		{"vmshadow_repository_vm_backups", []string{"repository", "main", "vm", "web1"}, 2},
		{"vmshadow_repository_vm_newest_backup_timestamp_seconds", []string{"repository", "main", "vm", "web1"}, sec(t0.Add(time.Hour))},
		{"vmshadow_build_info", []string{"version", "1.2.3-test", "revision", buildRevision(fams), "goversion", goVersion(fams)}, 1},
	} {
		if got := value(t, fams, c.name, c.labels...); !near(got, c.want) {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	// Two copies of an image whose data chunks are two thirds of it: each
	// stored byte stands for about 2 x 3/2 bytes of disk.
	if f, about := value(t, fams, "vmshadow_repository_deduplication_factor", "repository", "main"), float64(2*imgSize)/(2*cs); f < 0.98*about || f >= about {
		t.Errorf("deduplication factor %v for two backups of the same data, want about %v", f, about)
	}
	if at := value(t, fams, "vmshadow_repository_stats_timestamp_seconds", "repository", "main"); time.Since(time.Unix(int64(at), 0)) > time.Minute {
		t.Errorf("stats timestamp %v is not about now", at)
	}
	if n := len(fams["vmshadow_vm_last_success_timestamp_seconds"].GetMetric()); n != 3 {
		t.Errorf("%d last-success series, want 3 (nightly web1, db1; offsite web1)", n)
	}
	if fams["vmshadow_job_runs_total"].GetType() != dto.MetricType_COUNTER {
		t.Errorf("vmshadow_job_runs_total is a %v, want a counter", fams["vmshadow_job_runs_total"].GetType())
	}
	if fams["go_goroutines"] == nil || fams["process_start_time_seconds"] == nil {
		t.Error("the Go and process collectors are not registered")
	}

	// Every vmshadow_ metric has help text and is documented, and every
	// documented metric is exposed (the docs cannot drift).
	doc := documented(t)
	var exposed []string
	for name, f := range fams {
		if !strings.HasPrefix(name, "vmshadow_") {
			continue
		}
		exposed = append(exposed, name)
		if f.GetHelp() == "" {
			t.Errorf("%s has no HELP text", name)
		}
	}
	sort.Strings(exposed)
	if fmt.Sprint(exposed) != fmt.Sprint(doc) {
		t.Errorf("exposed metrics %v\ndocumented in docs/metrics.md and the package comment: %v", exposed, doc)
	}
}

func buildRevision(fams map[string]*dto.MetricFamily) string { return buildLabel(fams, "revision") }
func goVersion(fams map[string]*dto.MetricFamily) string     { return buildLabel(fams, "goversion") }

func buildLabel(fams map[string]*dto.MetricFamily, name string) string {
	for _, m := range fams["vmshadow_build_info"].GetMetric() {
		for _, l := range m.Label {
			if l.GetName() == name {
				return l.GetValue()
			}
		}
	}
	return ""
}

// documented returns the metric names of docs/metrics.md's tables,
// checking that the package comment lists the same.
func documented(t *testing.T) []string {
	t.Helper()
	md, err := os.ReadFile("../../../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range regexp.MustCompile("(?m)^\\| `(vmshadow_[a-z_]+)` \\|").FindAllStringSubmatch(string(md), -1) {
		names = append(names, m[1])
	}
	src, err := os.ReadFile("metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	var pkg []string
	for _, m := range regexp.MustCompile(`(?m)^//\t(vmshadow_[a-z_]+) `).FindAllStringSubmatch(string(src), -1) {
		pkg = append(pkg, m[1])
	}
	sort.Strings(names)
	sort.Strings(pkg)
	if !slices.Equal(names, pkg) {
		t.Errorf("docs/metrics.md lists %v\nthe package comment %v", names, pkg)
	}
	return names
}

// TestScrapeDatabaseFails: with the database closed, the scrape still
// serves what does not need it, and the error is logged.
func TestScrapeDatabaseFails(t *testing.T) {
	ctx := context.Background()
	db, err := state.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fillState(t, db)
	db.Close()
	var log logBuf
	reg := metrics.NewRegistry(metrics.New(metrics.Options{Source: db, Version: "v"}))
	fams := scrape(t, metrics.Handler(reg, &log))
	if value(t, fams, "vmshadow_build_info", "version", "v", "revision", buildRevision(fams), "goversion", goVersion(fams)) != 1 {
		t.Error("build_info missing when the database fails")
	}
	if fams["vmshadow_vm_last_success_timestamp_seconds"] != nil || fams["vmshadow_job_runs_total"] != nil {
		t.Error("metrics from a closed database were served")
	}
	if !strings.Contains(log.String(), "closed") {
		t.Errorf("the database error was not logged: %q", log.String())
	}
}

type logBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuf) Println(v ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintln(&l.b, v...)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestStatsCacheErrorKeepsLastStats: a refresh that fails keeps the
// figures of the last one that worked and says so.
func TestStatsCacheErrorKeepsLastStats(t *testing.T) {
	ctx := context.Background()
	db, err := state.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	r, _ := makeRepo(t)
	fail := false
	cache := metrics.NewStatsCache(ctx, []string{"main"}, time.Hour, func(ctx context.Context, name string) (*repostats.Stats, error) {
		if fail {
			return nil, errors.New("storage unreachable")
		}
		return repostats.Compute(ctx, r)
	})
	cache.Refresh("main")
	cache.Wait()
	fail = true
	cache.Refresh("main")
	cache.Wait()
	got, ok := cache.Get("main")
	if !ok || got.Stats == nil || got.Stats.Backups != 2 || got.Err == nil {
		t.Fatalf("after a failed refresh: %+v, want the earlier stats and the error", got)
	}
	reg := metrics.NewRegistry(metrics.New(metrics.Options{Source: db, Repos: cache}))
	fams := scrape(t, metrics.Handler(reg, nil))
	if v := value(t, fams, "vmshadow_repository_stats_error", "repository", "main"); v != 1 {
		t.Errorf("stats_error = %v, want 1", v)
	}
	if v := value(t, fams, "vmshadow_repository_backups", "repository", "main"); v != 2 {
		t.Errorf("backups = %v, want the earlier 2", v)
	}
}

// TestJobsFilter: the per-job metrics of a job no longer configured are
// left out; the others stay.
func TestJobsFilter(t *testing.T) {
	ctx := context.Background()
	db, err := state.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	fillState(t, db)
	reg := metrics.NewRegistry(metrics.New(metrics.Options{Source: db, Jobs: func() []string { return []string{"offsite"} }}))
	fams := scrape(t, metrics.Handler(reg, nil))
	for _, name := range []string{"vmshadow_vm_last_success_timestamp_seconds", "vmshadow_vm_last_result_success", "vmshadow_job_runs_total"} {
		for _, m := range fams[name].GetMetric() {
			for _, l := range m.Label {
				if l.GetName() == "job" && l.GetValue() != "offsite" {
					t.Errorf("%s of job %s, which is not configured", name, l.GetValue())
				}
			}
		}
	}
	value(t, fams, "vmshadow_vm_last_success_timestamp_seconds", "job", "offsite", "vm", "web1")
	value(t, fams, "vmshadow_job_runs_total", "job", "offsite", "kind", "backup", "result", "succeeded")
	value(t, fams, "vmshadow_repository_last_verify_problems", "repository", "main")
}
