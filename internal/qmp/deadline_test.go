package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// answerUntil greets, then answers the commands before the one named stall
// with an empty return, and from that one on reads and never answers.
func answerUntil(stall string, reply func(id json.RawMessage) string) func(net.Conn) {
	return func(conn net.Conn) {
		conn.Write([]byte(greeting + "\n"))
		br := bufio.NewReader(conn)
		stalled := false
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			json.Unmarshal(line, &req)
			if req.Execute == stall {
				stalled = true
			}
			if !stalled {
				conn.Write([]byte(reply(req.ID) + "\n"))
			}
		}
	}
}

func emptyReturn(id json.RawMessage) string { return `{"return": {}, "id": ` + string(id) + `}` }

// TestPeerWaitsHaveDeadlines is the rule "every peer wait has a deadline"
// for QMP: peers that accept and stall, greet and stall, stall on a command,
// answer garbage or answer something else forever. Each wait ends within a
// bound with an error of class errs.ErrConnect naming the socket.
func TestPeerWaitsHaveDeadlines(t *testing.T) {
	defer func(g, c time.Duration) { GreetingTimeout, CommandTimeout = g, c }(GreetingTimeout, CommandTimeout)
	GreetingTimeout, CommandTimeout = 300*time.Millisecond, 500*time.Millisecond
	tests := []struct {
		name  string
		serve func(net.Conn)
		dial  bool // the failure is Dial's
		want  string
	}{
		{"accept and stall", func(c net.Conn) { c.Read(make([]byte, 1)) }, true, "no QMP greeting"},
		{"greet and stall", answerUntil("qmp_capabilities", emptyReturn), true, "did not answer qmp_capabilities"},
		{"stall on a command", answerUntil("query-name", emptyReturn), false, "did not answer query-name"},
		{"answer garbage", answerUntil("", func(json.RawMessage) string { return "\x00\x01garbage" }), true, "bad message"},
		{"answer events only", func(c net.Conn) {
			go answerUntil("query-name", emptyReturn)(c)
			for {
				time.Sleep(20 * time.Millisecond)
				if _, err := c.Write([]byte(`{"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}` + "\n")); err != nil {
					return
				}
			}
		}, false, "did not answer query-name"},
		{"answer another id", answerUntil("", func(json.RawMessage) string { return `{"return": {}, "id": "someone-else"}` }), true, "did not answer qmp_capabilities"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := testutil.ServeUnix(t, tt.serve)
			start := time.Now()
			c, err := Dial(context.Background(), path)
			if err == nil {
				defer c.Close()
				if tt.dial {
					t.Fatal("Dial succeeded")
				}
				err = c.Execute(context.Background(), "query-name", nil, nil)
			}
			elapsed := time.Since(start)
			if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("err = %v, want errs.ErrConnect with %q and the socket", err, tt.want)
			}
			if elapsed > 3*time.Second {
				t.Fatalf("took %s", elapsed)
			}
			if c != nil {
				// A stalled peer fails every later command at once.
				start = time.Now()
				err := c.Execute(context.Background(), "query-status", nil, nil)
				if !errors.Is(err, ErrStalled) || time.Since(start) > 100*time.Millisecond {
					t.Fatalf("later command: %v after %s, want ErrStalled at once", err, time.Since(start))
				}
			}
		})
	}
}

// TestCancelledCommandStalls: a command abandoned by its caller whose reply
// never comes makes the peer stalled after CancelGrace, so commands queued
// behind it (cleanup after a signal) end too instead of waiting out
// CommandTimeout.
func TestCancelledCommandStalls(t *testing.T) {
	defer func(c, g time.Duration) { CommandTimeout, CancelGrace = c, g }(CommandTimeout, CancelGrace)
	CommandTimeout, CancelGrace = time.Hour, 300*time.Millisecond
	path := testutil.ServeUnix(t, answerUntil("stop", emptyReturn))
	c, err := Dial(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	if err := c.Execute(ctx, "stop", nil, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
	start := time.Now()
	err = c.Execute(context.Background(), "cont", nil, nil)
	if !errors.Is(err, ErrStalled) || !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "did not answer stop") {
		t.Fatalf("queued command: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("queued command took %s", d)
	}
}

// TestCancelledCommandAnsweredLate: a slow but live QEMU that answers a
// cancelled command within CancelGrace keeps its connection; a command
// whose caller's deadline passed leaves the connection alone.
func TestCancelledCommandAnsweredLate(t *testing.T) {
	defer func(g time.Duration) { CancelGrace = g }(CancelGrace)
	CancelGrace = 2 * time.Second
	path := testutil.ServeUnix(t, func(conn net.Conn) {
		conn.Write([]byte(greeting + "\n"))
		br := bufio.NewReader(conn)
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			json.Unmarshal(line, &req)
			if req.Execute == "stop" {
				time.Sleep(500 * time.Millisecond)
			}
			conn.Write([]byte(emptyReturn(req.ID) + "\n"))
		}
	})
	c, err := Dial(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if err := c.Execute(ctx, "stop", nil, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("abandoned: %v", err)
	}
	if err := c.Execute(context.Background(), "cont", nil, nil); err != nil {
		t.Fatalf("after a late reply: %v", err)
	}
	time.Sleep(CancelGrace + 200*time.Millisecond)
	if err := c.Execute(context.Background(), "query-status", nil, nil); err != nil {
		t.Fatalf("after the grace: %v", err)
	}
	dctx, dcancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer dcancel()
	if err := c.Execute(dctx, "stop", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("past its deadline: %v", err)
	}
	time.Sleep(CancelGrace + 200*time.Millisecond)
	if err := c.Execute(context.Background(), "query-status", nil, nil); err != nil {
		t.Fatalf("after a command past its deadline: %v", err)
	}
}
