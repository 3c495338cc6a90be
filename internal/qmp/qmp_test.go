package qmp

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

const greeting = `{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "test"}, "capabilities": ["oob"]}}`

// fakeQEMU serves one QMP connection: it sends greet, then for each command
// calls handle, which returns the raw lines to send back.
func fakeQEMU(t *testing.T, greet string, handle func(cmd string, id json.RawMessage) []string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
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
		if greet != "" {
			conn.Write([]byte(greet + "\n"))
		}
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
			if req.Execute == "qmp_capabilities" {
				conn.Write([]byte(`{"return": {}, "id": ` + string(req.ID) + "}\n"))
				continue
			}
			for _, l := range handle(req.Execute, req.ID) {
				conn.Write([]byte(l + "\n"))
			}
		}
	}()
	return path
}

func TestExecuteAndEvents(t *testing.T) {
	path := fakeQEMU(t, greeting, func(cmd string, id json.RawMessage) []string {
		switch cmd {
		case "query-status":
			return []string{
				`{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}`,
				`{"return": {"status": "paused", "running": false}, "id": ` + string(id) + `}`,
			}
		case "bogus":
			return []string{`{"error": {"class": "CommandNotFound", "desc": "The command bogus has not been found"}, "id": ` + string(id) + `}`}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v := c.Version(); !v.AtLeast(7, 1) || v.AtLeast(7, 3) || v.String() != "7.2.0" {
		t.Errorf("version = %v", v)
	}
	sub := c.Subscribe(func(e Event) bool { return e.Name == "STOP" })
	defer sub.Close()
	var st struct{ Status string }
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil || st.Status != "paused" {
		t.Fatalf("query-status = %+v, %v", st, err)
	}
	ev, err := sub.Wait(ctx)
	if err != nil || ev.Name != "STOP" || ev.Timestamp.Unix() != 1 {
		t.Fatalf("event = %+v, %v", ev, err)
	}
	err = c.Execute(ctx, "bogus", nil, nil)
	if !IsCommandNotFound(err) {
		t.Fatalf("bogus: %v", err)
	}
}

func TestRepliesOutOfOrder(t *testing.T) {
	held := make(chan json.RawMessage, 1)
	path := fakeQEMU(t, greeting, func(cmd string, id json.RawMessage) []string {
		if cmd == "slow" {
			held <- id
			return nil
		}
		return []string{
			`{"return": "fast", "id": ` + string(id) + `}`,
			`{"return": "slow", "id": ` + string(<-held) + `}`,
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	slow := make(chan string)
	go func() {
		var s string
		c.Execute(ctx, "slow", nil, &s)
		slow <- s
	}()
	for len(held) == 0 {
		time.Sleep(time.Millisecond)
	}
	var f string
	if err := c.Execute(ctx, "fast", nil, &f); err != nil || f != "fast" {
		t.Fatalf("fast = %q, %v", f, err)
	}
	if s := <-slow; s != "slow" {
		t.Fatalf("slow = %q", s)
	}
}

func TestConnectionLossFailsPending(t *testing.T) {
	// A server that closes after the greeting and capabilities.
	dir := t.TempDir()
	p := filepath.Join(dir, "q.sock")
	ln, _ := net.Listen("unix", p)
	defer ln.Close()
	go func() {
		conn, _ := ln.Accept()
		conn.Write([]byte(greeting + "\n"))
		br := bufio.NewReader(conn)
		line, _ := br.ReadBytes('\n')
		var req struct{ ID json.RawMessage }
		json.Unmarshal(line, &req)
		conn.Write([]byte(`{"return": {}, "id": ` + string(req.ID) + "}\n"))
		br.ReadBytes('\n') // the next command
		conn.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Execute(ctx, "query-status", nil, nil)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("err = %v, want ErrClosed", err)
	}
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

func TestDialRejects(t *testing.T) {
	old := GreetingTimeout
	GreetingTimeout = 300 * time.Millisecond
	defer func() { GreetingTimeout = old }()
	ctx := context.Background()
	tests := []struct {
		name, greet, want string
	}{
		{"not QMP", `{"hello": 1}`, "not a QMP socket"},
		{"garbage", `SSH-2.0-OpenSSH`, "not a QMP socket"},
		{"silent", "", "no QMP greeting"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := fakeQEMU(t, tt.greet, func(string, json.RawMessage) []string { return nil })
			_, err := Dial(ctx, path)
			if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	if _, err := Dial(ctx, filepath.Join(t.TempDir(), "none")); !errors.Is(err, errs.ErrConnect) {
		t.Fatalf("missing socket: %v", err)
	}
}

// FuzzMessages feeds arbitrary bytes after a valid greeting: the client must
// fail or succeed, never panic or hang.
func FuzzMessages(f *testing.F) {
	f.Add([]byte(`{"return": {}, "id": "vmshadow-1"}` + "\n"))
	f.Add([]byte(`{"event": "X", "data": 1, "timestamp": {"seconds": 1}}` + "\n"))
	f.Add([]byte(`{"error": {"class": 1}, "id": "vmshadow-1"}` + "\n"))
	f.Add([]byte(`{"id": ["vmshadow-1"]}` + "\n{}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, b := net.Pipe()
		go func() {
			b.Write([]byte(greeting + "\n"))
			b.Write(data)
			b.Close()
		}()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		c, err := newClient(ctx, a, "fuzz")
		if err == nil {
			c.Close()
		}
		a.Close()
	})
}
