package qga

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// fakeAgent serves one connection with handle, which gets each request
// (the 0xFF flush byte stripped) and writes raw replies.
func fakeAgent(t *testing.T, handle func(req map[string]any, w *bufio.Writer)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qga.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		br := bufio.NewReader(conn)
		bw := bufio.NewWriter(conn)
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			line = TrimSentinel(line)
			var req map[string]any
			if json.Unmarshal(line, &req) != nil {
				continue
			}
			handle(req, bw)
			bw.Flush()
		}
	}()
	return path
}

func syncReply(req map[string]any, w *bufio.Writer) bool {
	if req["execute"] != "guest-sync-delimited" {
		return false
	}
	id := req["arguments"].(map[string]any)["id"].(float64)
	w.WriteString("\xff")
	json.NewEncoder(w).Encode(map[string]any{"return": int64(id)})
	return true
}

func TestFreezeThawRoundTrip(t *testing.T) {
	frozen := false
	path := fakeAgent(t, func(req map[string]any, w *bufio.Writer) {
		if syncReply(req, w) {
			return
		}
		switch req["execute"] {
		case "guest-fsfreeze-freeze":
			frozen = true
			w.WriteString(`{"return": 2}` + "\n")
		case "guest-fsfreeze-thaw":
			frozen = false
			w.WriteString(`{"return": 2}` + "\n")
		case "guest-fsfreeze-status":
			if frozen {
				w.WriteString(`{"return": "frozen"}` + "\n")
			} else {
				w.WriteString(`{"return": "thawed"}` + "\n")
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n, err := c.Freeze(ctx, nil); err != nil || n != 2 {
		t.Fatalf("Freeze = %d, %v", n, err)
	}
	if s, err := c.FreezeStatus(ctx); err != nil || s != "frozen" {
		t.Fatalf("status = %q, %v", s, err)
	}
	if n, err := c.Thaw(ctx); err != nil || n != 2 {
		t.Fatalf("Thaw = %d, %v", n, err)
	}
	if s, _ := c.FreezeStatus(ctx); s != "thawed" {
		t.Fatalf("status after thaw = %q", s)
	}
}

func TestSyncDiscardsStaleData(t *testing.T) {
	first := true
	path := fakeAgent(t, func(req map[string]any, w *bufio.Writer) {
		if req["execute"] == "guest-sync-delimited" {
			if first {
				// garbage and a stale reply left by a previous client
				w.WriteString(`{"return": {"stale": true}}` + "\n" + `{"retu`)
				first = false
			}
			syncReply(req, w)
			return
		}
		w.WriteString(`{"return": {}}` + "\n")
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestSlowAgentIsResynced(t *testing.T) {
	old := SyncInterval
	SyncInterval = 100 * time.Millisecond
	defer func() { SyncInterval = old }()
	n := 0
	path := fakeAgent(t, func(req map[string]any, w *bufio.Writer) {
		if req["execute"] == "guest-sync-delimited" {
			n++
			if n < 3 {
				return // agent not up yet: request lost
			}
			syncReply(req, w)
			return
		}
		w.WriteString(`{"return": {}}` + "\n")
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n < 3 {
		t.Fatalf("synced after %d requests, want 3", n)
	}
}

func TestLateReplyAfterTimeoutIsNotMisattributed(t *testing.T) {
	hung := false
	path := fakeAgent(t, func(req map[string]any, w *bufio.Writer) {
		if req["execute"] == "guest-sync-delimited" && hung {
			// The agent answers in order: the hung freeze's late reply
			// comes before the reply to the resync.
			w.WriteString(`{"return": 7}` + "\n")
			hung = false
		}
		if syncReply(req, w) {
			return
		}
		switch req["execute"] {
		case "guest-fsfreeze-freeze":
			hung = true // no reply until the next request
		case "guest-fsfreeze-status":
			w.WriteString(`{"return": "frozen"}` + "\n")
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	short, cancel2 := context.WithTimeout(ctx, 200*time.Millisecond)
	_, err = c.Freeze(short, nil)
	cancel2()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("hanging freeze: err = %v, want deadline exceeded", err)
	}
	// The next command resyncs; the late "7" must not be taken as its reply.
	s, err := c.FreezeStatus(ctx)
	if err != nil || s != "frozen" {
		t.Fatalf("status = %q, %v", s, err)
	}
}

func TestErrorReply(t *testing.T) {
	path := fakeAgent(t, func(req map[string]any, w *bufio.Writer) {
		if syncReply(req, w) {
			return
		}
		w.WriteString(`{"error": {"class": "GenericError", "desc": "hook failed"}}` + "\n")
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.Freeze(ctx, nil)
	var ae *Error
	if !errors.As(err, &ae) || ae.Desc != "hook failed" {
		t.Fatalf("err = %v, want agent error", err)
	}
	// an error reply keeps the stream in sync
	if _, err := c.Freeze(ctx, nil); !errors.As(err, &ae) {
		t.Fatalf("second call: %v", err)
	}
}

func TestDialErrors(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	if _, err := Dial(ctx, filepath.Join(dir, "missing")); !errors.Is(err, errs.ErrConnect) {
		t.Errorf("missing socket: %v", err)
	}
	// a socket nobody answers on
	path := filepath.Join(dir, "silent.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	_, err = Dial(short, path)
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "did not answer") {
		t.Errorf("silent agent: %v", err)
	}
}

// FuzzReplies feeds arbitrary agent output (the guest is untrusted) to a
// synced client: it must return an error or a value, never panic or hang.
func FuzzReplies(f *testing.F) {
	f.Add([]byte(`{"return": 3}` + "\n"))
	f.Add([]byte(`{"error": {"class": "x", "desc": "y"}}` + "\n"))
	f.Add([]byte("\xff\xff{\"return\":\n"))
	f.Add([]byte(`{"return": "frozen"}` + "\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := net.Pipe()
		defer a.Close()
		c := &Client{conn: a, br: bufio.NewReader(a), insync: true, staleIDs: map[int64]bool{1: true}}
		go func() {
			br := bufio.NewReader(b)
			br.ReadBytes('\n')
			b.Write(data)
			b.Close()
		}()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		var n int
		c.Execute(ctx, "guest-fsfreeze-freeze", nil, &n)
	})
}
