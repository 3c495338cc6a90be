package writer

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/qga"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// killPidFile kills the process whose pid the hook wrote to path, at cleanup.
func killPidFile(t *testing.T, path string) {
	t.Cleanup(func() {
		b, err := os.ReadFile(path)
		if err != nil {
			return
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

// alive reports whether the process whose pid is in path still runs.
func alive(t *testing.T, path string) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("pid file: %v", err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return syscall.Kill(pid, 0) == nil
}

// TestHookWaitsHaveDeadlines is the rule "every peer wait has a deadline"
// for hooks: a hook that ignores SIGTERM, one that exits but leaves a
// process holding its output open, and one killed while such a process
// holds it. Each call ends within a bound.
func TestHookWaitsHaveDeadlines(t *testing.T) {
	tests := []struct {
		name    string
		body    string // $PIDS is a file for pids to kill at cleanup
		limit   time.Duration
		wantErr string // "" for success
		bound   time.Duration
		killed  bool // the hook's own process ($$) must be gone after the call
	}{
		{"ignores SIGTERM", "echo $$ > $PIDS; trap '' TERM; while :; do sleep 1; done\n", 500 * time.Millisecond, "did not finish in time, killed", 3 * time.Second, true},
		{"exits, output held open", "setsid sleep 1000 & echo $! > $PIDS; echo froze; exit 0\n", 20 * time.Second, "", hookOutputDelay + 2*time.Second, false},
		{"killed, output held open", "setsid sleep 1000 & echo $! > $PIDS; trap '' TERM; while :; do sleep 1; done\n", 500 * time.Millisecond, "did not finish in time, killed", hookOutputDelay + 2*time.Second, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pids := filepath.Join(t.TempDir(), "pids")
			killPidFile(t, pids)
			h, err := NewHook(script(t, "PIDS="+pids+"\n"+tt.body))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), tt.limit)
			defer cancel()
			start := time.Now()
			err = h.Freeze(ctx)
			d := time.Since(start)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
			if tt.wantErr != "" && !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err = %v, want context.DeadlineExceeded (a writer time limit)", err)
			}
			if d > tt.bound {
				t.Fatalf("took %s, want at most %s", d, tt.bound)
			}
			if tt.killed && alive(t, pids) {
				t.Fatal("the hook still runs")
			}
		})
	}
}

// stalledAgent is a guest agent socket that answers the sync and the
// commands before stallOn, then reads and answers nothing more.
func stalledAgent(t *testing.T, stallOn string) string {
	t.Helper()
	return testutil.ServeUnix(t, func(conn net.Conn) {
		br := bufio.NewReader(conn)
		stalled := stallOn == ""
		for {
			line, err := br.ReadBytes('\n')
			if err != nil {
				return
			}
			var req struct {
				Execute   string
				Arguments struct{ ID int64 }
			}
			json.Unmarshal(qga.TrimSentinel(line), &req)
			stalled = stalled || req.Execute == stallOn
			switch {
			case stalled:
			case req.Execute == "guest-sync-delimited":
				conn.Write([]byte("\xff{\"return\": " + strconv.FormatInt(req.Arguments.ID, 10) + "}\n"))
			case req.Execute == "guest-info":
				conn.Write([]byte(`{"return": {"version": "9", "supported_commands": [{"name": "guest-fsfreeze-freeze", "enabled": true}, {"name": "guest-fsfreeze-thaw", "enabled": true}]}}` + "\n"))
			case req.Execute == "guest-fsfreeze-status":
				conn.Write([]byte(`{"return": "thawed"}` + "\n"))
			default:
				conn.Write([]byte(`{"return": 1}` + "\n"))
			}
		}
	})
}

// TestAgentWaitsHaveDeadlines: the guest agent writer, given a writer time
// limit, ends every call on a stalled agent within it, with an error naming
// the socket.
func TestAgentWaitsHaveDeadlines(t *testing.T) {
	tests := []struct {
		name    string
		stallOn string
		call    func(a *Agent, ctx context.Context) error
	}{
		{"accept and stall: prepare", "", func(a *Agent, ctx context.Context) error { return a.Prepare(ctx, coord.SetContext{}) }},
		{"stall on guest-info: prepare", "guest-info", func(a *Agent, ctx context.Context) error { return a.Prepare(ctx, coord.SetContext{}) }},
		{"stall on freeze", "guest-fsfreeze-freeze", func(a *Agent, ctx context.Context) error { return a.Freeze(ctx) }},
		{"stall on thaw", "guest-fsfreeze-thaw", func(a *Agent, ctx context.Context) error { return a.Thaw(ctx) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := stalledAgent(t, tt.stallOn)
			a := NewAgent(path, nil)
			defer a.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
			defer cancel()
			start := time.Now()
			err := tt.call(a, ctx)
			// An agent that never answers is not there (errs.ErrConnect); one
			// that stops answering ran out of the writer's time limit.
			want := context.DeadlineExceeded
			if tt.stallOn == "" {
				want = errs.ErrConnect
			}
			if !errors.Is(err, want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("err = %v, want %v naming the socket", err, want)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("took %s", d)
			}
		})
	}
}
