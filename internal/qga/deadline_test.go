package qga

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// TestPeerWaitsHaveDeadlines is the rule "every peer wait has a deadline"
// for the guest agent: agents that accept and stall, answer the sync and
// then stall, answer garbage forever, or stall mid-reply; called with a
// context that has no deadline, every wait still ends within a bound
// (CommandTimeout) with an error naming the socket.
func TestPeerWaitsHaveDeadlines(t *testing.T) {
	defer func(c, s time.Duration) { CommandTimeout, SyncInterval = c, s }(CommandTimeout, SyncInterval)
	CommandTimeout, SyncInterval = 700*time.Millisecond, 200*time.Millisecond
	garbage := func(map[string]any, *bufio.Writer) {}
	tests := []struct {
		name   string
		handle func(req map[string]any, w *bufio.Writer)
		raw    func(conn net.Conn) // instead of handle: the whole connection
		dial   bool                // Dial itself must fail
		want   string
		class  error
	}{
		{name: "accept and stall", raw: func(c net.Conn) { c.Read(make([]byte, 1<<16)); select {} }, dial: true, want: "did not answer", class: errs.ErrConnect},
		{name: "answer garbage", raw: func(c net.Conn) {
			for {
				if _, err := c.Write([]byte("{\"garbage\": \xff\xfe\n")); err != nil {
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
		}, dial: true, want: "did not answer", class: errs.ErrConnect},
		{name: "sync then stall", handle: func(req map[string]any, w *bufio.Writer) { syncReply(req, w) }, want: "no reply", class: context.DeadlineExceeded},
		{name: "stall mid-reply", handle: func(req map[string]any, w *bufio.Writer) {
			if !syncReply(req, w) {
				w.WriteString(`{"return": {"version": "9`)
			}
		}, want: "no reply", class: context.DeadlineExceeded},
		{name: "reply without return", handle: func(req map[string]any, w *bufio.Writer) {
			if !syncReply(req, w) {
				w.WriteString(`{"event": "x"}` + "\n")
				garbage(req, w)
			}
		}, want: "no reply", class: context.DeadlineExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var path string
			if tt.raw != nil {
				path = rawAgent(t, tt.raw)
			} else {
				path = fakeAgent(t, tt.handle)
			}
			start := time.Now()
			c, err := Dial(context.Background(), path)
			if err == nil {
				defer c.Close()
				if tt.dial {
					t.Fatal("Dial succeeded")
				}
				_, err = c.Info(context.Background())
			}
			if !errors.Is(err, tt.class) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("err = %v, want %v with %q and the socket", err, tt.class, tt.want)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("took %s", d)
			}
		})
	}
}

// TestCancelledCommandThenStall: after a command cancelled by a signal, an
// agent that never answers again fails the next command (the thaw of
// cleanup) within CancelGrace, and every later one at once, instead of
// waiting out the caller's writer time limit.
func TestCancelledCommandThenStall(t *testing.T) {
	defer func(g time.Duration) { CancelGrace = g }(CancelGrace)
	CancelGrace = 500 * time.Millisecond
	var stalled atomic.Bool
	path := fakeAgent(t, func(req map[string]any, w *bufio.Writer) {
		if req["execute"] == "guest-sync-delimited" && req["arguments"].(map[string]any)["id"] != nil {
			if !stalled.Load() {
				syncReply(req, w)
			}
		}
		if req["execute"] == "guest-fsfreeze-freeze" {
			stalled.Store(true)
		}
	})
	c, err := Dial(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	if _, err := c.Freeze(ctx, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled freeze: %v", err)
	}
	start := time.Now()
	wctx, wcancel := context.WithTimeout(context.Background(), time.Minute) // a writer time limit
	defer wcancel()
	_, err = c.Thaw(wctx)
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "hung") {
		t.Fatalf("thaw after cancel: %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("thaw after cancel took %s", d)
	}
	start = time.Now()
	if _, err := c.Thaw(wctx); !errors.Is(err, errs.ErrConnect) || time.Since(start) > 100*time.Millisecond {
		t.Fatalf("second thaw: %v after %s", err, time.Since(start))
	}
}

// rawAgent serves one connection with serve.
func rawAgent(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	path := t.TempDir() + "/qga.sock"
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
		serve(conn)
	}()
	return path
}
