package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/state"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// received is one POST as the receiver saw it.
type received struct {
	at     time.Time
	header http.Header
	body   []byte
	path   string
	method string
}

// receiver is a real HTTP server; answer decides each request's fate
// (n counts from 1). It records every request whose body it read.
type receiver struct {
	*httptest.Server
	mu     sync.Mutex
	got    []received
	answer func(n int, w http.ResponseWriter, r *http.Request)
	n      int
}

func newReceiver(t *testing.T, answer func(n int, w http.ResponseWriter, r *http.Request)) *receiver {
	rc := &receiver{answer: answer}
	rc.Server = httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(rc.Close)
	return rc
}

func (rc *receiver) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	rc.mu.Lock()
	rc.n++
	n := rc.n
	rc.got = append(rc.got, received{at: time.Now(), header: r.Header.Clone(), body: body, path: r.URL.Path, method: r.Method})
	rc.mu.Unlock()
	if rc.answer == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	rc.answer(n, w, r)
}

func (rc *receiver) requests() []received {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]received(nil), rc.got...)
}

// logger collects the notifier's log entries.
type logger struct {
	ch  chan Entry
	mu  sync.Mutex
	all []Entry
}

func newLogger() *logger { return &logger{ch: make(chan Entry, 10000)} }

func (l *logger) log(e Entry) {
	l.mu.Lock()
	l.all = append(l.all, e)
	l.mu.Unlock()
	l.ch <- e
}

func (l *logger) entries() []Entry {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Entry(nil), l.all...)
}

// wait returns the next entry whose message matches re, failing the test
// after 30 s.
func (l *logger) wait(t *testing.T, re string) Entry {
	t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.After(30 * time.Second)
	for {
		select {
		case e := <-l.ch:
			if rx.MatchString(e.Message) {
				return e
			}
		case <-deadline:
			t.Fatalf("no log entry matching %q; log:\n%s", re, entriesText(l.entries()))
		}
	}
}

func entriesText(es []Entry) string {
	var b strings.Builder
	for _, e := range es {
		fmt.Fprintf(&b, "%s %s\n", e.Level, e)
	}
	return b.String()
}

// fastOptions retry at once: the tests wait for events, not for time.
func fastOptions(l *logger) Options {
	return Options{Version: "1.2.3-test", Host: "backuphost", Log: l.log, Attempts: 5, FirstRetry: time.Millisecond, MaxRetryDelay: 20 * time.Millisecond}
}

func configure(t *testing.T, n *Notifier, jobs ...*config.Job) {
	t.Helper()
	if err := n.Configure(jobs); err != nil {
		t.Fatal(err)
	}
}

func job(name string, hooks ...config.Webhook) *config.Job {
	for i := range hooks {
		if hooks[i].Timeout == 0 {
			hooks[i].Timeout = 5 * time.Second
		}
		if hooks[i].On == nil {
			hooks[i].On = config.DefaultOn
		}
	}
	return &config.Job{Name: name, Type: config.Backup, Notify: hooks}
}

func failedRun(id int64) Event {
	start := time.Date(2026, 12, 3, 1, 30, 0, 0, time.UTC)
	return FromRun(
		state.Run{ID: id, Job: "nightly", Kind: "backup", Trigger: "schedule", Status: state.Failed, Started: start, Ended: start.Add(192 * time.Second), Error: "1 of 2 VMs failed"},
		[]state.VMResult{
			{Run: id, VM: "web1", Status: state.Succeeded, Started: start, Ended: start.Add(90 * time.Second), BackupID: "659a7fb2af476fae688d711213d91dc1550a37f0395a00a6f7bacb78ece3666b", Mode: "incremental", Consistency: "filesystem", BytesRead: 1 << 30, BytesNew: 12 << 20, FreezeMS: 840},
			{Run: id, VM: "db1", Status: state.Failed, Started: start, Ended: start.Add(192 * time.Second), Error: "freeze: guest agent did not answer within 60s\nsecond line"},
		})
}

func closeNow(t *testing.T, n *Notifier) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

var uuidRe = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// A failure, configured through a real configuration file with a secret
// file, arrives as a signed JSON POST with every documented header and
// field; a webhook that wants only successes gets nothing; the signature
// verifies with Verify and fails with another secret or another body.
func TestDeliveryPayloadAndSignature(t *testing.T) {
	rc := newReceiver(t, nil)
	onlySuccess := newReceiver(t, nil)
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "hook.secret")
	if err := os.WriteFile(secretFile, []byte("s3cr3t-key\nignored second line\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	y := fmt.Sprintf(`listen: [{address: unix:/run/vmshadow/api.sock}]
repositories:
  local: {location: /srv/repo, password_file: /p}
connections:
  lab: {type: qmp, sockets: [/run/qemu/*.qmp]}
notify:
  - url: %s/hooks/vmshadow
    secret_file: %s
  - url: %s/only-success
    on: [success]
jobs:
  - {name: nightly, type: backup, repository: local, vms: [{connection: lab}]}
`, rc.URL, secretFile, onlySuccess.URL)
	cfg, err := config.Parse("server.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	l := newLogger()
	n := New(fastOptions(l))
	configure(t, n, cfg.Jobs...)
	n.Send(failedRun(42))
	l.wait(t, `^delivered \(HTTP 204, attempt 1\)$`)
	closeNow(t, n)

	if got := onlySuccess.requests(); len(got) != 0 {
		t.Errorf("the success-only webhook got %d requests", len(got))
	}
	reqs := rc.requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests, want 1", len(reqs))
	}
	r := reqs[0]
	h := r.header
	for k, want := range map[string]string{
		"Content-Type": "application/json",
		"User-Agent":   "vmshadow/1.2.3-test",
		HeaderEvent:    "failure",
		HeaderAttempt:  "1",
	} {
		if got := h.Get(k); got != want {
			t.Errorf("%s: %q, want %q", k, got, want)
		}
	}
	if r.method != http.MethodPost || r.path != "/hooks/vmshadow" {
		t.Errorf("%s %s", r.method, r.path)
	}
	if !uuidRe.MatchString(h.Get(HeaderDelivery)) {
		t.Errorf("delivery id %q is not a UUID", h.Get(HeaderDelivery))
	}
	if err := Verify([]byte("s3cr3t-key"), h.Get(HeaderSignature), h.Get(HeaderTimestamp), r.body, time.Now(), DefaultMaxAge); err != nil {
		t.Errorf("signature: %v (headers %v)", err, h)
	}
	if err := Verify([]byte("other"), h.Get(HeaderSignature), h.Get(HeaderTimestamp), r.body, time.Now(), DefaultMaxAge); !errors.Is(err, ErrBadSignature) {
		t.Errorf("another secret: %v", err)
	}
	altered := []byte(strings.Replace(string(r.body), `"run_id":42`, `"run_id":43`, 1))
	if err := Verify([]byte("s3cr3t-key"), h.Get(HeaderSignature), h.Get(HeaderTimestamp), altered, time.Now(), DefaultMaxAge); !errors.Is(err, ErrBadSignature) {
		t.Errorf("altered body: %v", err)
	}
	if err := Verify([]byte("s3cr3t-key"), h.Get(HeaderSignature), h.Get(HeaderTimestamp), r.body, time.Now().Add(6*time.Minute), DefaultMaxAge); !errors.Is(err, ErrStale) {
		t.Errorf("replayed 6 minutes later: %v", err)
	}

	var got map[string]any
	if err := json.Unmarshal(r.body, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"event": "failure", "host": "backuphost", "job": "nightly", "job_type": "backup", "run_id": 42.0,
		"trigger": "schedule", "status": "failed", "started": "2026-12-03T01:30:00Z", "ended": "2026-12-03T01:33:12Z",
		"duration_seconds": 192.0, "error": "1 of 2 VMs failed",
		"text": "backup job nightly failed on backuphost (run 42, 3m12s): 1 of 2 VMs failed: db1: freeze: guest agent did not answer within 60s",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %#v, want %#v", k, got[k], v)
		}
	}
	vms, _ := got["vms"].([]any)
	if len(vms) != 2 {
		t.Fatalf("vms: %#v", got["vms"])
	}
	web1, _ := vms[0].(map[string]any)
	for k, v := range map[string]any{"vm": "web1", "status": "succeeded", "backup_id": "659a7fb2af476fae688d711213d91dc1550a37f0395a00a6f7bacb78ece3666b", "mode": "incremental",
		"consistency": "filesystem", "bytes_read": float64(1 << 30), "bytes_new": float64(12 << 20), "freeze_ms": 840.0,
		"started": "2026-12-03T01:30:00Z", "ended": "2026-12-03T01:31:30Z"} {
		if web1[k] != v {
			t.Errorf("vms[0].%s: %#v, want %#v", k, web1[k], v)
		}
	}
	if _, ok := web1["error"]; ok {
		t.Errorf("vms[0] has an error field: %v", web1)
	}
	db1, _ := vms[1].(map[string]any)
	if db1["vm"] != "db1" || db1["status"] != "failed" || db1["error"] != "freeze: guest agent did not answer within 60s\nsecond line" {
		t.Errorf("vms[1]: %v", db1)
	}
}

// A job without VMs sends "vms": [], not null; a success is sent only to
// webhooks that want it, unsigned without a secret; an unfinished run and
// a job without webhooks send nothing.
func TestEventsAndMatching(t *testing.T) {
	all := newReceiver(t, nil)
	l := newLogger()
	n := New(fastOptions(l))
	configure(t, n, job("gc-local", config.Webhook{URL: all.URL, On: config.Events}), job("silent"))
	start := time.Now().UTC().Truncate(time.Second)
	n.Send(FromRun(state.Run{ID: 7, Job: "gc-local", Kind: "gc", Status: state.Running, Started: start}, nil))
	n.Send(FromRun(state.Run{ID: 8, Job: "silent", Kind: "gc", Status: state.Failed, Started: start, Ended: start}, nil))
	n.Send(FromRun(state.Run{ID: 9, Job: "gc-local", Kind: "gc", Trigger: "manual", Status: state.Succeeded, Started: start, Ended: start.Add(time.Second)}, nil))
	l.wait(t, `^delivered`)
	closeNow(t, n)
	reqs := all.requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests, want 1", len(reqs))
	}
	if s := reqs[0].header.Get(HeaderSignature); s != "" {
		t.Errorf("signed without a secret: %q", s)
	}
	var ev Event
	if err := json.Unmarshal(reqs[0].body, &ev); err != nil {
		t.Fatal(err)
	}
	if ev.Event != "success" || ev.RunID != 9 || ev.Text != "gc job gc-local succeeded on backuphost (run 9, 1s)" {
		t.Errorf("event: %+v", ev)
	}
	if !strings.Contains(string(reqs[0].body), `"vms":[]`) {
		t.Errorf("vms not an empty list: %s", reqs[0].body)
	}
	for _, c := range []struct{ status, event string }{
		{state.Failed, "failure"}, {state.Succeeded, "success"}, {state.Interrupted, "interrupted"},
		{state.Cancelled, "cancelled"}, {state.Skipped, "skipped"}, {state.Running, ""},
	} {
		if got := EventFor(c.status); got != c.event {
			t.Errorf("EventFor(%s) = %q, want %q", c.status, got, c.event)
		}
	}
}

// 500, 503, 408, 429 and a connection closed without an answer are
// retried, with the same delivery ID and a fresh timestamp and
// signature; the receiver is told the attempt number.
func TestRetries(t *testing.T) {
	for _, c := range []struct {
		name string
		fail func(w http.ResponseWriter, r *http.Request)
		msg  string
	}{
		{"500", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(500) }, `HTTP 500`},
		{"503", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) }, `HTTP 503`},
		{"408", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(408) }, `HTTP 408`},
		{"429", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(429) }, `HTTP 429`},
		{"closed connection", func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				conn.Close()
			}
		}, `EOF`},
	} {
		t.Run(c.name, func(t *testing.T) {
			rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
				if n <= 2 {
					c.fail(w, r)
					return
				}
				w.WriteHeader(200)
			})
			l := newLogger()
			n := New(fastOptions(l))
			configure(t, n, job("nightly", config.Webhook{URL: rc.URL, Secret: config.Secret{Env: "NOTIFY_TEST_SECRET"}}))
			n.Send(failedRun(1))
			w := l.wait(t, `^attempt 1 of 5: `+c.msg+`.*; next attempt in`)
			if w.Level != Warning {
				t.Errorf("level %s", w.Level)
			}
			l.wait(t, `^attempt 2 of 5: `+c.msg)
			l.wait(t, `^delivered \(HTTP 200, attempt 3\)$`)
			closeNow(t, n)
			reqs := rc.requests()
			if len(reqs) != 3 {
				t.Fatalf("%d requests, want 3", len(reqs))
			}
			id := reqs[0].header.Get(HeaderDelivery)
			for i, r := range reqs {
				if r.header.Get(HeaderDelivery) != id {
					t.Errorf("attempt %d has delivery %s, attempt 1 %s", i+1, r.header.Get(HeaderDelivery), id)
				}
				if r.header.Get(HeaderAttempt) != fmt.Sprint(i+1) {
					t.Errorf("attempt %d says %s", i+1, r.header.Get(HeaderAttempt))
				}
				if err := Verify([]byte("t0p"), r.header.Get(HeaderSignature), r.header.Get(HeaderTimestamp), r.body, time.Now(), DefaultMaxAge); err != nil {
					t.Errorf("attempt %d: %v", i+1, err)
				}
			}
		})
	}
}

func init() { os.Setenv("NOTIFY_TEST_SECRET", "t0p") }

// 400, 401, 404, 410 and a redirect are not retried; the error entry says
// so. After the 5th failed attempt a retryable error gives up.
func TestNoRetry(t *testing.T) {
	for _, status := range []int{400, 401, 404, 410, 301} {
		t.Run(fmt.Sprint(status), func(t *testing.T) {
			rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
				if status == 301 {
					http.Redirect(w, r, "/elsewhere", status)
					return
				}
				w.WriteHeader(status)
			})
			l := newLogger()
			n := New(fastOptions(l))
			configure(t, n, job("nightly", config.Webhook{URL: rc.URL + "/hook"}))
			n.Send(failedRun(1))
			e := l.wait(t, fmt.Sprintf(`^not delivered: HTTP %d.*\(not retried\)$`, status))
			if e.Level != Error {
				t.Errorf("level %s", e.Level)
			}
			closeNow(t, n)
			if reqs := rc.requests(); len(reqs) != 1 || reqs[0].path != "/hook" {
				t.Errorf("%d requests (%+v), want 1 to /hook", len(reqs), reqs)
			}
		})
	}
	t.Run("gives up after 5", func(t *testing.T) {
		rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) { w.WriteHeader(502) })
		l := newLogger()
		n := New(fastOptions(l))
		configure(t, n, job("nightly", config.Webhook{URL: rc.URL}))
		n.Send(failedRun(1))
		l.wait(t, `^not delivered after 5 attempts: HTTP 502$`)
		closeNow(t, n)
		if reqs := rc.requests(); len(reqs) != 5 {
			t.Errorf("%d requests, want 5", len(reqs))
		}
	})
}

// Retry-After (seconds) makes the next attempt wait that long although
// the backoff would retry after 1 ms.
func TestRetryAfter(t *testing.T) {
	rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
		if n == 1 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(200)
	})
	l := newLogger()
	opts := fastOptions(l)
	opts.MaxRetryDelay = time.Minute
	n := New(opts)
	configure(t, n, job("nightly", config.Webhook{URL: rc.URL}))
	n.Send(failedRun(1))
	l.wait(t, `^attempt 1 of 5: HTTP 503; next attempt in 1s$`)
	l.wait(t, `^delivered`)
	closeNow(t, n)
	reqs := rc.requests()
	if len(reqs) != 2 {
		t.Fatalf("%d requests", len(reqs))
	}
	if gap := reqs[1].at.Sub(reqs[0].at); gap < time.Second {
		t.Errorf("second attempt %s after the first; Retry-After asked for 1s", gap)
	}

	now := time.Date(2026, 12, 3, 4, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"120":                           2 * time.Minute,
		" 5 ":                           5 * time.Second,
		"-3":                            0,
		"soon":                          0,
		"Thu, 03 Dec 2026 04:00:30 GMT": 30 * time.Second,
		"Thu, 03 Dec 2026 03:59:00 GMT": 0,
		"99999999999999999999":          0,
	} {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("Retry-After %q: %s, want %s", in, got, want)
		}
	}
	// Retry-After beyond the longest delay is cut to it.
	if d := n.delay(1, time.Hour); d != time.Minute {
		t.Errorf("delay with Retry-After 1h: %s, want the 1m maximum", d)
	}
}

// The default backoff: 40s, 80s, 160s, 320s (±10%), about 10 minutes in
// all over 5 attempts.
func TestDefaultBackoff(t *testing.T) {
	n := New(Options{})
	total := time.Duration(0)
	for attempt, base := range map[int]time.Duration{1: 40 * time.Second, 2: 80 * time.Second, 3: 160 * time.Second, 4: 320 * time.Second} {
		for range 50 {
			d := n.delay(attempt, 0)
			if d < base*9/10 || d > base*11/10 {
				t.Fatalf("delay after attempt %d: %s, want %s ±10%%", attempt, d, base)
			}
		}
		total += base
	}
	if total != 10*time.Minute || n.opts.Attempts != 5 {
		t.Errorf("total %s over %d attempts", total, n.opts.Attempts)
	}
	for range 50 {
		if d := n.delay(12, 0); d < 9*time.Minute || d > DefaultMaxRetryDelay {
			t.Fatalf("a late delay: %s, want 9m-10m (the maximum, -10%%)", d)
		}
	}
}

// A receiver that never answers: each attempt ends at the webhook's
// timeout and is retried; the log says so.
func TestTimeout(t *testing.T) {
	release := make(chan struct{})
	rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	defer close(release)
	l := newLogger()
	opts := fastOptions(l)
	opts.Attempts = 2
	n := New(opts)
	configure(t, n, job("nightly", config.Webhook{URL: rc.URL, Timeout: 300 * time.Millisecond}))
	start := time.Now()
	n.Send(failedRun(1))
	l.wait(t, `^attempt 1 of 2: no answer within 300ms; next attempt in`)
	l.wait(t, `^not delivered after 2 attempts: no answer within 300ms$`)
	if d := time.Since(start); d < 600*time.Millisecond {
		t.Errorf("two attempts that time out after 300ms ended after %s", d)
	}
	closeNow(t, n)
	if reqs := rc.requests(); len(reqs) != 2 {
		t.Errorf("%d requests, want 2", len(reqs))
	}
}

// With a receiver that hangs, Send never blocks: 50 events are taken
// before a deadline far shorter than one attempt's timeout; the queue
// keeps the newest 2 and drops the oldest with a warning each; once the
// receiver answers, exactly the 2 newest are delivered.
func TestQueueFullDoesNotBlock(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	active := 0
	var delivered []int64
	rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		active++
		mu.Unlock()
		defer func() { mu.Lock(); active--; mu.Unlock() }()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		var ev Event
		if err := json.NewDecoder(r.Body).Decode(&ev); err != nil {
			t.Error(err)
		}
		mu.Lock()
		delivered = append(delivered, ev.RunID)
		mu.Unlock()
	})
	l := newLogger()
	opts := fastOptions(l)
	opts.QueueSize = 2
	n := New(opts)
	configure(t, n, job("nightly", config.Webhook{URL: rc.URL, Timeout: time.Minute}))

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sent := make(chan struct{})
	go func() {
		for i := int64(1); i <= 50; i++ {
			n.Send(failedRun(i))
		}
		close(sent)
	}()
	select {
	case <-sent:
	case <-ctx.Done():
		t.Fatal("Send blocked: 50 events not taken within 5s while each attempt waits up to a minute")
	}

	dropped := map[int64]bool{}
	for len(dropped) < 48 {
		e := l.wait(t, `^dropped: the queue of this webhook is full`)
		if e.Level != Warning {
			t.Errorf("level %s", e.Level)
		}
		dropped[e.RunID] = true
	}
	for i := int64(1); i <= 48; i++ {
		if !dropped[i] {
			t.Errorf("run %d not dropped; dropped %v", i, dropped)
		}
	}
	// The dropped requests' handlers see their client gone; wait for them
	// to return so that only the 2 queued ones are answered.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		a := active
		mu.Unlock()
		if a <= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d requests still open at the receiver", a)
		}
	}
	close(release)
	l.wait(t, `^delivered`)
	l.wait(t, `^delivered`)
	closeNow(t, n)
	mu.Lock()
	defer mu.Unlock()
	if len(delivered) != 2 || delivered[0]+delivered[1] != 49+50 {
		t.Errorf("delivered runs %v, want 49 and 50", delivered)
	}
}

// Close makes a delivery waiting for its retry (due in an hour) try at
// once, and returns when it is delivered; an event sent after Close is
// logged, not sent.
func TestCloseFlushes(t *testing.T) {
	rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
		if n == 1 {
			w.WriteHeader(500)
		}
	})
	l := newLogger()
	opts := fastOptions(l)
	opts.FirstRetry, opts.MaxRetryDelay = time.Hour, time.Hour
	n := New(opts)
	configure(t, n, job("nightly", config.Webhook{URL: rc.URL}))
	n.Send(failedRun(1))
	l.wait(t, `^attempt 1 of 5: HTTP 500; next attempt in 5[0-9]m|^attempt 1 of 5: HTTP 500; next attempt in 1h`)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := n.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if ctx.Err() != nil {
		t.Fatal("Close returned at its deadline, not when the delivery was done")
	}
	if reqs := rc.requests(); len(reqs) != 2 {
		t.Errorf("%d requests, want 2", len(reqs))
	}
	l.wait(t, `^delivered \(HTTP 200, attempt 2\)$`)
	n.Send(failedRun(2))
	e := l.wait(t, `^not sent: the notifier is closed`)
	if e.RunID != 2 || e.Level != Error {
		t.Errorf("entry %+v", e)
	}
	if reqs := rc.requests(); len(reqs) != 2 {
		t.Errorf("%d requests after a Send after Close, want 2", len(reqs))
	}
}

// Close gives up at its deadline on a receiver that hangs, cancels the
// request, logs the delivery as abandoned and says so.
func TestCloseDeadline(t *testing.T) {
	rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	l := newLogger()
	n := New(fastOptions(l))
	configure(t, n, job("nightly", config.Webhook{URL: rc.URL, Timeout: time.Minute}))
	n.Send(failedRun(1))
	for deadline := time.Now().Add(30 * time.Second); len(rc.requests()) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no request")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := n.Close(ctx)
	if err == nil || !strings.Contains(err.Error(), "1 webhook deliveries abandoned") || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Close: %v", err)
	}
	e := l.wait(t, `^abandoned: the server stopped before it was delivered`)
	if e.Level != Error {
		t.Errorf("level %s", e.Level)
	}
}

// A receiver behind TLS with a private CA: delivered with ca naming the
// CA's PEM file; refused (certificate error, logged) without it.
func TestPrivateCA(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(202) }))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the handshake refused on purpose
	srv.StartTLS()
	defer srv.Close()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	pemData := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(caFile, pemData, 0o600); err != nil {
		t.Fatal(err)
	}
	l := newLogger()
	opts := fastOptions(l)
	opts.Attempts = 1
	n := New(opts)
	configure(t, n,
		job("with-ca", config.Webhook{URL: srv.URL + "/hook", CA: caFile}),
		job("without-ca", config.Webhook{URL: srv.URL + "/hook"}))
	n.Send(Event{Job: "with-ca", JobType: "verify", RunID: 1, Status: state.Failed})
	if e := l.wait(t, `^delivered|^not delivered`); !strings.HasPrefix(e.Message, "delivered (HTTP 202") {
		t.Errorf("with the CA: %s", e.Message)
	}
	n.Send(Event{Job: "without-ca", JobType: "verify", RunID: 2, Status: state.Failed})
	if e := l.wait(t, `^delivered|^not delivered`); !strings.Contains(e.Message, "certificate") {
		t.Errorf("without the CA: %s", e.Message)
	}
	closeNow(t, n)

	bad := filepath.Join(t.TempDir(), "bad.pem")
	os.WriteFile(bad, []byte("not a certificate"), 0o600)
	if _, err := FromConfig(job("j", config.Webhook{URL: srv.URL, CA: bad})); err == nil || !strings.Contains(err.Error(), "holds no PEM certificate") || !errors.Is(err, errs.ErrUsage) {
		t.Errorf("a CA file without a certificate: %v", err)
	}
}

// Secrets are read by Configure, not at each delivery: a secret file
// changed afterwards takes effect only at the next Configure (the
// reload). A missing, empty or unset secret is an error naming the file
// or variable and the job, and leaves the webhooks as they were.
func TestSecretsReadAtConfigure(t *testing.T) {
	rc := newReceiver(t, nil)
	dir := t.TempDir()
	file := filepath.Join(dir, "secret")
	os.WriteFile(file, []byte("first\r\n"), 0o600)
	l := newLogger()
	n := New(fastOptions(l))
	j := job("nightly", config.Webhook{URL: rc.URL, Secret: config.Secret{File: file}})
	configure(t, n, j)
	os.WriteFile(file, []byte("second\n"), 0o600)
	n.Send(failedRun(1))
	l.wait(t, `^delivered`)
	configure(t, n, j)
	n.Send(failedRun(2))
	l.wait(t, `^delivered`)
	reqs := rc.requests()
	if len(reqs) != 2 {
		t.Fatalf("%d requests", len(reqs))
	}
	for i, secret := range []string{"first", "second"} {
		h := reqs[i].header
		if err := Verify([]byte(secret), h.Get(HeaderSignature), h.Get(HeaderTimestamp), reqs[i].body, time.Now(), DefaultMaxAge); err != nil {
			t.Errorf("delivery %d with secret %q: %v", i+1, secret, err)
		}
	}

	os.Setenv("NOTIFY_EMPTY_SECRET", "")
	for _, c := range []struct {
		secret config.Secret
		want   string
	}{
		{config.Secret{File: filepath.Join(dir, "missing")}, "job broken: webhook " + rc.URL + " (line 0): secret_file: open " + filepath.Join(dir, "missing") + ": no such file or directory"},
		{config.Secret{File: writeFile(t, dir, "empty", "\nhunter2\n")}, "secret_file " + filepath.Join(dir, "empty") + ": the first line is empty: write the secret there"},
		{config.Secret{Env: "NOTIFY_UNSET_SECRET"}, "secret_env: the environment variable NOTIFY_UNSET_SECRET is not set"},
		{config.Secret{Env: "NOTIFY_EMPTY_SECRET"}, "secret_env: the environment variable NOTIFY_EMPTY_SECRET is empty"},
	} {
		err := n.Configure([]*config.Job{job("broken", config.Webhook{URL: rc.URL, Secret: c.secret})})
		if err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, errs.ErrUsage) || strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%+v: %v, want %q", c.secret, err, c.want)
		}
	}
	// The failed Configure calls kept the last good webhooks.
	n.Send(failedRun(3))
	l.wait(t, `^delivered`)
	closeNow(t, n)
	if reqs := rc.requests(); len(reqs) != 3 {
		t.Errorf("%d requests after failed reloads, want 3", len(reqs))
	}
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// No log entry holds the secret or the URL's path, whatever goes wrong:
// HTTP errors, a closed connection, a refused connection.
func TestLogsHideSecrets(t *testing.T) {
	const token = "T0KEN-in-the-path"
	rc := newReceiver(t, func(n int, w http.ResponseWriter, r *http.Request) {
		switch n {
		case 1:
			w.WriteHeader(500)
		case 2:
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
		default:
			http.Error(w, "bad "+token, 400)
		}
	})
	refused := httptest.NewServer(http.NotFoundHandler())
	refusedURL := refused.URL
	refused.Close()
	os.Setenv("NOTIFY_LOG_SECRET", "hunter2")
	l := newLogger()
	opts := fastOptions(l)
	opts.Attempts = 3
	n := New(opts)
	configure(t, n, job("nightly",
		config.Webhook{URL: rc.URL + "/services/" + token, Secret: config.Secret{Env: "NOTIFY_LOG_SECRET"}},
		config.Webhook{URL: refusedURL + "/services/" + token, Secret: config.Secret{Env: "NOTIFY_LOG_SECRET"}}))
	n.Send(failedRun(1))
	l.wait(t, `^not delivered`)
	l.wait(t, `^not delivered`)
	closeNow(t, n)
	es := l.entries()
	text := entriesText(es)
	if strings.Contains(text, token) || strings.Contains(text, "hunter2") || strings.Contains(text, "/services") {
		t.Errorf("the log shows a secret or the URL's path:\n%s", text)
	}
	for _, want := range []string{"HTTP 500", "EOF", "HTTP 400", "connection refused"} {
		if !strings.Contains(text, want) {
			t.Errorf("the log does not say %q:\n%s", want, text)
		}
	}
	if es[0].Webhook != rc.URL+"/…" && es[0].Webhook != refusedURL+"/…" {
		t.Errorf("webhook shown as %q", es[0].Webhook)
	}
}

// Sign and Verify by hand, as docs/notifications.md describes it.
func TestVerify(t *testing.T) {
	secret := []byte("It's a Secret to Everybody")
	body := []byte(`{"event":"failure"}`)
	now := time.Unix(1764730000, 0)
	ts := "1764730000"
	sig := Sign(secret, ts, body)
	// An independent implementation's answer: printf '%s' '1764730000.{"event":"failure"}' |
	// openssl dgst -sha256 -hmac "It's a Secret to Everybody" (and Python's hmac module).
	if want := "sha256=56cb950526363daad60c98357cc7823c891f48bb74b953b5cf0d88ec572edab8"; sig != want {
		t.Errorf("Sign: %s, want %s", sig, want)
	}
	for _, c := range []struct {
		name   string
		sig    string
		ts     string
		body   []byte
		now    time.Time
		secret []byte
		want   error
	}{
		{"good", sig, ts, body, now, secret, nil},
		{"upper-case hex and spaces", " SHA256=" + strings.ToUpper(sig[7:]) + " ", ts, body, now, secret, nil},
		{"4m59s late", sig, ts, body, now.Add(299 * time.Second), secret, nil},
		{"5m01s late", sig, ts, body, now.Add(301 * time.Second), secret, ErrStale},
		{"from the future", sig, ts, body, now.Add(-301 * time.Second), secret, ErrStale},
		{"other body", sig, ts, []byte(`{"event":"success"}`), now, secret, ErrBadSignature},
		{"other timestamp", sig, "1764730001", body, now, secret, ErrBadSignature},
		{"other secret", sig, ts, body, now, []byte("x"), ErrBadSignature},
		{"unsigned", "", ts, body, now, secret, ErrNoSignature},
		{"sha1", "sha1=" + sig[7:47], ts, body, now, secret, ErrBadHeader},
		{"short", sig[:70], ts, body, now, secret, ErrBadHeader},
		{"not hex", "sha256=" + strings.Repeat("g", 64), ts, body, now, secret, ErrBadHeader},
		{"no timestamp", sig, "", body, now, secret, ErrBadHeader},
		{"negative timestamp", sig, "-1764730000", body, now, secret, ErrBadHeader},
		{"huge timestamp", Sign(secret, "999999999999", body), "999999999999", body, now, secret, ErrStale},
	} {
		err := Verify(c.secret, c.sig, c.ts, c.body, c.now, DefaultMaxAge)
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		}
	}
}

func FuzzVerify(f *testing.F) {
	secret := []byte("fuzz-secret")
	body := []byte(`{"event":"failure","run_id":1}`)
	f.Add(Sign(secret, "1764730000", body), "1764730000", body)
	f.Add("sha256=", "0", []byte{})
	f.Add("SHA256="+strings.Repeat("A", 64), "00000000001764730000", body)
	f.Add("sha256==", "1e9", body)
	f.Add("=sha256", "+1764730000", body)
	now := time.Unix(1764730000, 0)
	f.Fuzz(func(t *testing.T, sig, ts string, body []byte) {
		err := Verify(secret, sig, ts, body, now, DefaultMaxAge)
		if err != nil {
			if !errors.Is(err, ErrNoSignature) && !errors.Is(err, ErrBadHeader) && !errors.Is(err, ErrBadSignature) && !errors.Is(err, ErrStale) {
				t.Fatalf("an error of no documented kind: %v", err)
			}
			return
		}
		// Accepted: the signature is ours, modulo case and spaces, and the
		// timestamp is digits within the window.
		if !strings.EqualFold(strings.TrimSpace(sig), Sign(secret, ts, body)) {
			t.Fatalf("accepted %q for timestamp %q", sig, ts)
		}
		v, perr := parseTimestamp(ts)
		if perr != nil || v < now.Unix()-300 || v > now.Unix()+300 {
			t.Fatalf("accepted timestamp %q", ts)
		}
	})
}

// docBlocks returns the fenced code blocks of lang in docs/notifications.md.
func docBlocks(t *testing.T, lang string) []string {
	t.Helper()
	doc, err := os.ReadFile("../../../docs/notifications.md")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range regexp.MustCompile("(?s)```"+lang+"\n(.*?)```").FindAllStringSubmatch(string(doc), -1) {
		out = append(out, m[1])
	}
	if len(out) == 0 {
		t.Fatalf("no %s example in docs/notifications.md", lang)
	}
	return out
}

// The reference's examples hold: its Python and shell verifications
// accept a real delivery and refuse it altered or stale, and its payload
// example has exactly the fields a real payload has.
func TestDocExamples(t *testing.T) {
	rc := newReceiver(t, nil)
	os.Setenv("NOTIFY_DOC_SECRET", "doc-secret")
	l := newLogger()
	n := New(fastOptions(l))
	configure(t, n, job("nightly", config.Webhook{URL: rc.URL, Secret: config.Secret{Env: "NOTIFY_DOC_SECRET"}}))
	n.Send(failedRun(1234))
	l.wait(t, `^delivered`)
	closeNow(t, n)
	r := rc.requests()[0]
	dir := t.TempDir()
	good := writeFile(t, dir, "body.json", string(r.body))
	altered := writeFile(t, dir, "altered.json", strings.Replace(string(r.body), `"failure"`, `"success"`, 1))
	ts, sig := r.header.Get(HeaderTimestamp), r.header.Get(HeaderSignature)
	stale := fmt.Sprint(time.Now().Unix() - 400)
	staleSig := Sign([]byte("doc-secret"), stale, r.body)

	t.Run("python", func(t *testing.T) {
		py := testutil.NeedCommand(t, "python3")
		script := writeFile(t, dir, "verify.py", docBlocks(t, "python")[0]+`
import json, os, sys
headers = {"X-Vmshadow-Timestamp": sys.argv[2], "X-Vmshadow-Signature": sys.argv[3]}
print(verify(os.environ["SECRET"].encode(), headers, open(sys.argv[1], "rb").read()))
`)
		for _, c := range []struct{ body, ts, sig, want string }{
			{good, ts, sig, "True"}, {altered, ts, sig, "False"}, {good, stale, staleSig, "False"}, {good, "1e9", sig, "False"},
		} {
			cmd := exec.Command(py, script, c.body, c.ts, c.sig)
			cmd.Env = append(os.Environ(), "SECRET=doc-secret")
			out, err := cmd.CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != c.want {
				t.Errorf("%s at %s: %s %v, want %s", filepath.Base(c.body), c.ts, out, err, c.want)
			}
		}
	})
	t.Run("shell", func(t *testing.T) {
		testutil.NeedCommand(t, "openssl")
		sh := testutil.NeedCommand(t, "sh")
		for _, c := range []struct{ body, ts, sig, want string }{
			{good, ts, sig, "valid"}, {altered, ts, sig, "INVALID"}, {good, stale, staleSig, "INVALID"},
		} {
			run := filepath.Join(dir, "run-"+filepath.Base(c.body)+c.ts)
			if err := os.MkdirAll(run, 0o700); err != nil {
				t.Fatal(err)
			}
			data, _ := os.ReadFile(c.body)
			writeFile(t, run, "body.json", string(data))
			cmd := exec.Command(sh, "-c", docBlocks(t, "sh")[0])
			cmd.Dir = run
			cmd.Env = append(os.Environ(), "SECRET=doc-secret", "TS="+c.ts, "SIG="+c.sig)
			out, err := cmd.CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != c.want {
				t.Errorf("%s at %s: %s %v, want %s", filepath.Base(c.body), c.ts, out, err, c.want)
			}
		}
	})
	t.Run("payload example", func(t *testing.T) {
		var doc, real map[string]any
		if err := json.Unmarshal([]byte(docBlocks(t, "json")[0]), &doc); err != nil {
			t.Fatalf("the example is not JSON: %v", err)
		}
		if err := json.Unmarshal(r.body, &real); err != nil {
			t.Fatal(err)
		}
		if a, b := keys(doc), keys(real); a != b {
			t.Errorf("the example's fields:\n%s\na payload's:\n%s", a, b)
		}
		if doc["text"] != strings.Replace(real["text"].(string), "backuphost", "backup1.example.net", 1) {
			t.Errorf("the example's text %q does not follow from its fields as a payload's does (%q)", doc["text"], real["text"])
		}
	})
}

// keys lists the field names of a payload, those of every VM merged.
func keys(m map[string]any) string {
	var top []string
	vm := map[string]bool{}
	for k, v := range m {
		top = append(top, k)
		if k == "vms" {
			for _, x := range v.([]any) {
				for vk := range x.(map[string]any) {
					vm[vk] = true
				}
			}
		}
	}
	var vms []string
	for k := range vm {
		vms = append(vms, k)
	}
	sort.Strings(top)
	sort.Strings(vms)
	return strings.Join(top, ",") + "\nvms: " + strings.Join(vms, ",")
}
