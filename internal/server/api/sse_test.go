package api_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/api/apitest"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// streamServer is a real HTTP server on loopback around the handler.
func streamServer(t *testing.T, f *fake, log *logBuf, heartbeat time.Duration) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(api.New(f, api.Options{Heartbeat: heartbeat, Logf: log.logf}))
	t.Cleanup(srv.Close)
	return srv
}

// frames reads an event stream and sends each frame (its lines joined by
// "\n", without the blank line) on the returned channel, closed at EOF.
func frames(body io.Reader) <-chan string {
	ch := make(chan string, 16)
	go func() {
		defer close(ch)
		br := bufio.NewReader(body)
		var cur []string
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			l = strings.TrimSuffix(l, "\n")
			if l == "" {
				ch <- strings.Join(cur, "\n")
				cur = nil
				continue
			}
			cur = append(cur, l)
		}
	}()
	return ch
}

func next(t *testing.T, ch <-chan string) string {
	t.Helper()
	select {
	case f, ok := <-ch:
		if !ok {
			t.Fatal("the stream ended early")
		}
		return f
	case <-time.After(10 * time.Second):
		t.Fatal("no frame within 10 s (not flushed?)")
	}
	return ""
}

func get(t *testing.T, ctx context.Context, url string, hdr ...string) *http.Response {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+viewerTok)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// TestEvents: each event is one frame, flushed as it comes; idle
// streams get heartbeats; log events carry id:; the stream ends after the
// "end" event although the service's channel stays open; and the whole
// stream is valid against the OpenAPI document's event schemas.
func TestEvents(t *testing.T) {
	f := newFake()
	f.events = make(chan api.Event)
	var log logBuf
	srv := streamServer(t, f, &log, time.Hour) // no heartbeat flushes for it
	resp := get(t, context.Background(), srv.URL+"/api/v1/runs/8/events")
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" || resp.Header.Get("Cache-Control") != "no-store" {
		t.Fatalf("status %d, headers %v", resp.StatusCode, resp.Header)
	}
	var body strings.Builder
	ch := frames(io.TeeReader(resp.Body, &body))

	f.events <- api.Event{Type: "progress", Data: api.Progress{VM: "web1", Phase: "reading", Done: 10, Total: 100, Rate: 5}}
	if got, want := next(t, ch), `event: progress`+"\n"+`data: {"vm":"web1","phase":"reading","done":10,"total":100,"rate_bytes_per_s":5}`; got != want {
		t.Errorf("frame %q, want %q", got, want)
	}
	f.events <- api.Event{Type: "log", Data: state.LogLine{ID: 5, Time: t0, Level: "info", VM: "web1", Message: "frozen\nin 12 ms"}}
	got := next(t, ch)
	for got == ": heartbeat" {
		got = next(t, ch)
	}
	if want := "event: log\nid: 5\n" + `data: {"id":5,"time":"2026-12-01T01:30:00Z","level":"info","vm":"web1","message":"frozen\nin 12 ms"}`; got != want {
		t.Errorf("frame %q, want %q", got, want)
	}
	// Lines without an ID (0): each sent, without an id: line.
	for i := 0; i < 2; i++ {
		f.events <- api.Event{Type: "log", Data: state.LogLine{Time: t0, Level: "warning", Message: "no id"}}
		if got, want := next(t, ch), "event: log\n"+`data: {"id":0,"time":"2026-12-01T01:30:00Z","level":"warning","message":"no id"}`; got != want {
			t.Errorf("frame %q, want %q", got, want)
		}
	}
	f.events <- api.Event{Type: "vm", Data: state.VMResult{Run: 8, VM: "web1", Status: state.Succeeded, Started: t0, Ended: t0, BytesRead: 1, BytesNew: 1}}
	f.events <- api.Event{Type: "end", Data: state.Run{ID: 8, Job: "nightly", Kind: "backup", Trigger: "manual", Status: state.Succeeded, Started: t0, Ended: t0}}
	// The stream ends after "end" without the channel being closed.
	var rest []string
	timeout := time.After(10 * time.Second)
collect:
	for {
		select {
		case fr, ok := <-ch:
			if !ok {
				break collect
			}
			if fr != ": heartbeat" {
				rest = append(rest, strings.SplitN(fr, "\n", 2)[0])
			}
		case <-timeout:
			t.Fatalf("the stream did not end 10 s after the end event (frames after the log: %q)", rest)
		}
	}
	if strings.Join(rest, ",") != "event: vm,event: end" {
		t.Errorf("frames after the log: %q, want the vm and end events, then the end of the stream", rest)
	}
	evs, err := apitest.ParseEvents([]byte(body.String()))
	if err != nil || len(evs) != 6 {
		t.Errorf("parsed %d events (%v), want 6", len(evs), err)
	}
	// The stream without the ID-less lines is valid against the document
	// (which requires log events to carry their ID, for resuming).
	withIDs := strings.ReplaceAll(body.String(), "event: log\n"+`data: {"id":0,"time":"2026-12-01T01:30:00Z","level":"warning","message":"no id"}`+"\n\n", "")
	apitest.ValidateResponse(t, doc(t), "GET", "/api/v1/runs/8/events", resp, []byte(withIDs))
	if err := apitest.CheckEvent(doc(t), watchOp(t), evs[2]); err == nil || !strings.Contains(err.Error(), "without an id") {
		t.Errorf("a log event without its line ID passes the document check: %v", err)
	}
}

func watchOp(t *testing.T) *openapi3.Operation {
	_, item, _, _ := apitest.Find(doc(t), "/api/v1/runs/1/events")
	return item.Get
}

// TestEventsHeartbeat: an idle stream gets a comment every heartbeat.
func TestEventsHeartbeat(t *testing.T) {
	f := newFake()
	f.events = make(chan api.Event)
	var log logBuf
	srv := streamServer(t, f, &log, 20*time.Millisecond)
	resp := get(t, context.Background(), srv.URL+"/api/v1/runs/8/events")
	defer resp.Body.Close()
	ch := frames(resp.Body)
	for i := 0; i < 3; i++ {
		if got := next(t, ch); got != ": heartbeat" {
			t.Fatalf("frame %q, want the heartbeat", got)
		}
	}
	f.events <- api.Event{Type: "end", Data: state.Run{ID: 8}}
}

// TestEventsClientLeaves: a client that goes away cancels the Watch and
// ends the handler.
func TestEventsClientLeaves(t *testing.T) {
	f := newFake()
	f.events = make(chan api.Event, 1)
	var log logBuf
	srv := streamServer(t, f, &log, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	resp := get(t, ctx, srv.URL+"/api/v1/runs/8/events")
	defer resp.Body.Close()
	ch := frames(resp.Body)
	f.events <- api.Event{Type: "progress", Data: api.Progress{Phase: "reading"}}
	next(t, ch)
	watchCtx := <-f.watchCtx
	if watchCtx.Err() != nil {
		t.Fatal("the Watch context is done while the client is there")
	}
	cancel()
	select {
	case <-watchCtx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the Watch context is not cancelled 10 s after the client left")
	}
	// The handler returned: its request line is logged.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(log.String(), "api: GET /api/v1/runs/8/events 200") {
		if time.Now().After(deadline) {
			t.Fatalf("the handler did not return; log:\n%s", log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestEventsResume: with Last-Event-ID the log lines after it come first,
// then the live events, without repeating a line.
func TestEventsResume(t *testing.T) {
	f := newFake()
	f.events = make(chan api.Event, 8)
	for i := int64(1); i <= 4; i++ {
		f.logLines = append(f.logLines, state.LogLine{ID: i, Time: t0, Level: "info", Message: fmt.Sprint("line ", i)})
	}
	// Already in the backlog: line 3 and 4; new: 5.
	f.events <- api.Event{Type: "log", Data: &f.logLines[2]}
	f.events <- api.Event{Type: "log", Data: state.LogLine{ID: 5, Time: t0, Level: "info", Message: "line 5"}}
	f.events <- api.Event{Type: "end", Data: state.Run{ID: 8, Job: "j", Kind: "backup", Trigger: "manual", Status: state.Failed, Started: t0, Ended: t0, Error: "x"}}
	var log logBuf
	srv := streamServer(t, f, &log, time.Hour)
	resp := get(t, context.Background(), srv.URL+"/api/v1/runs/8/events", "Last-Event-ID", "2")
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	evs, err := apitest.ParseEvents(body)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range evs {
		ids = append(ids, e.Type+e.ID)
	}
	if got := strings.Join(ids, ","); got != "log3,log4,log5,end" {
		t.Errorf("events %s, want log3,log4,log5,end", got)
	}
	if calls := strings.Join(f.takeCalls(), " "); calls != "Watch(8) RunLog(8,2,10000)" {
		t.Errorf("calls %s", calls)
	}
	apitest.ValidateResponse(t, doc(t), "GET", "/api/v1/runs/8/events", resp, body)
}

// TestEventsErrors: a run the service does not know is a JSON 404 before
// any stream; a channel closed without "end" ends the stream.
func TestEventsErrors(t *testing.T) {
	f := newFake()
	var log logBuf
	srv := streamServer(t, f, &log, time.Hour)
	f.fail["Watch"] = fmt.Errorf("no run 99: %w", errs.ErrNotFound)
	resp := get(t, context.Background(), srv.URL+"/api/v1/runs/99/events")
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 404 || resp.Header.Get("Content-Type") != "application/json" || !strings.Contains(string(body), `"not_found"`) {
		t.Errorf("status %d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	apitest.ValidateResponse(t, doc(t), "GET", "/api/v1/runs/99/events", resp, body)

	delete(f.fail, "Watch")
	f.events = make(chan api.Event, 1)
	f.events <- api.Event{Type: "progress", Data: api.Progress{Phase: "reading"}}
	close(f.events)
	resp = get(t, context.Background(), srv.URL+"/api/v1/runs/8/events")
	done := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(resp.Body)
		done <- b
	}()
	select {
	case b := <-done:
		if !strings.HasPrefix(string(b), "event: progress\n") {
			t.Errorf("stream %q", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stream did not end when the service closed its channel")
	}
	resp.Body.Close()
}
