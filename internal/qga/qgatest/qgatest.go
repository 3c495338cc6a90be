// Package qgatest is a fake guest agent for failure-injection tests: it
// speaks the agent's protocol on a UNIX socket and freezes nothing. The real
// agent, in a real guest, is tested by internal/guestvm's tests.
package qgatest

import (
	"bufio"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qga"
)

// Behaviour selects how the fake agent answers guest-fsfreeze-freeze.
type Behaviour int

const (
	OK         Behaviour = iota // freezes, answers 1
	FailFreeze                  // answers an error (like a refusing fsfreeze hook)
	HangFreeze                  // never answers the freeze
)

// Agent is a running fake agent.
type Agent struct {
	Path string

	mu     sync.Mutex
	frozen bool
	log    *os.File
	b      Behaviour
}

// Start serves a fake agent; log, if not empty, is a file to which it
// appends "agent freeze" / "agent thaw" lines.
func Start(t testing.TB, b Behaviour, logPath string) *Agent {
	t.Helper()
	dir, err := os.MkdirTemp("", "qgat")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	a := &Agent{Path: filepath.Join(dir, "qga.sock"), b: b}
	if logPath != "" {
		a.log, err = os.OpenFile(logPath, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { a.log.Close() })
	}
	ln, err := net.Listen("unix", a.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go a.serve(conn)
		}
	}()
	return a
}

// Frozen reports whether the fake guest is frozen.
func (a *Agent) Frozen() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.frozen
}

// SetFrozen sets the fake guest's state (as if frozen by someone else).
func (a *Agent) SetFrozen(v bool) {
	a.mu.Lock()
	a.frozen = v
	a.mu.Unlock()
}

func (a *Agent) note(s string) {
	if a.log != nil {
		a.log.WriteString(s + "\n")
	}
}

func (a *Agent) serve(conn net.Conn) {
	defer conn.Close()
	br := bufio.NewReader(conn)
	w := bufio.NewWriter(conn)
	reply := func(v any) {
		json.NewEncoder(w).Encode(map[string]any{"return": v})
	}
	for {
		line, err := br.ReadBytes('\n')
		if err != nil {
			return
		}
		var req struct {
			Execute   string          `json:"execute"`
			Arguments json.RawMessage `json:"arguments"`
		}
		if json.Unmarshal(qga.TrimSentinel(line), &req) != nil {
			continue
		}
		a.mu.Lock()
		switch req.Execute {
		case "guest-sync-delimited":
			var args struct{ ID int64 }
			json.Unmarshal(req.Arguments, &args)
			w.WriteByte(0xFF)
			reply(args.ID)
		case "guest-info":
			// While frozen, qemu-ga disables every command but those of
			// its freeze allow-list (qga/main.c, ga_freeze_allowlist).
			cmds := []map[string]any{}
			for _, c := range []string{"guest-ping", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw", "guest-fsfreeze-status"} {
				allowed := c != "guest-fsfreeze-freeze" && c != "guest-fsfreeze-freeze-list"
				cmds = append(cmds, map[string]any{"name": c, "enabled": allowed || !a.frozen})
			}
			reply(map[string]any{"version": "fake", "supported_commands": cmds})
		case "guest-ping":
			reply(map[string]any{})
		case "guest-fsfreeze-status":
			if a.frozen {
				reply("frozen")
			} else {
				reply("thawed")
			}
		case "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list":
			a.note("agent freeze")
			switch a.b {
			case OK:
				a.frozen = true
				reply(1)
			case FailFreeze:
				json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"class": "GenericError", "desc": "fsfreeze hook has failed with status 1"}})
			case HangFreeze:
				a.frozen = true
				a.mu.Unlock()
				time.Sleep(time.Hour)
				return
			}
		case "guest-fsfreeze-thaw":
			a.note("agent thaw")
			n := 0
			if a.frozen {
				n = 1
			}
			a.frozen = false
			reply(n)
		default:
			json.NewEncoder(w).Encode(map[string]any{"error": map[string]string{"class": "CommandNotFound", "desc": "not supported by the fake"}})
		}
		a.mu.Unlock()
		w.Flush()
	}
}
