package qemu_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	"github.com/vmshadow/vmshadow/internal/qemutest"
)

// qmpTap is a scripted QMP peer between the provider and a real QEMU: it
// passes every message on (with the descriptors sent along) and calls
// check with each command before QEMU sees it. check runs on the tap's
// goroutine: it reports with t.Errorf, never t.Fatal.
func qmpTap(t *testing.T, target string, check func(cmd string, args map[string]any)) string {
	dir, err := os.MkdirTemp("", "vmshadow-tap")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "qmp")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.AcceptUnix()
			if err != nil {
				return
			}
			up, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: target, Net: "unix"})
			if err != nil {
				c.Close()
				t.Errorf("tap: %v", err)
				return
			}
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(c, up); c.Close() }()
			go func() { defer wg.Done(); defer up.Close(); tapCommands(t, c, up, check) }()
		}
	}()
	return path
}

func tapCommands(t *testing.T, c, up *net.UnixConn, check func(string, map[string]any)) {
	buf, oob := make([]byte, 64<<10), make([]byte, 256)
	var pending []byte
	var fds []int
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			msgs, _ := syscall.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				if r, err := syscall.ParseUnixRights(&m); err == nil {
					fds = append(fds, r...)
				}
			}
		}
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.IndexByte(pending, '\n')
			if i < 0 {
				break
			}
			line := pending[:i+1]
			var msg struct {
				Execute   string         `json:"execute"`
				Arguments map[string]any `json:"arguments"`
			}
			if json.Unmarshal(line, &msg) == nil && msg.Execute != "" {
				check(msg.Execute, msg.Arguments)
			}
			var rights []byte
			if len(fds) > 0 {
				rights = syscall.UnixRights(fds...)
			}
			if _, _, err := up.WriteMsgUnix(line, rights, nil); err != nil {
				return
			}
			for _, fd := range fds {
				syscall.Close(fd)
			}
			fds = nil
			pending = pending[i+1:]
		}
		if err != nil {
			return
		}
	}
}

// TestJournalBeforeQEMU: every command that creates something in QEMU
// (node, fdset, paused VM, device switched onto its filter, NBD server,
// export) reaches QEMU only once the journal names it, in the phase the
// step belongs to. A set taken through a tap, then deleted, gives back
// everything.
func TestJournalBeforeQEMU(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda"}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
	dir := t.TempDir()
	journal := &coord.Journal{Dir: filepath.Join(dir, "j")}
	scratch := filepath.Join(dir, "s")
	before := vm.Baseline(scratch)

	type record struct {
		Phase         coord.Phase     `json:"phase"`
		ProviderState json.RawMessage `json:"provider_state"`
	}
	load := func(what string) (record, map[string]any) {
		files, _ := filepath.Glob(filepath.Join(journal.Dir, "*.json"))
		var r record
		var st map[string]any
		if len(files) != 1 {
			t.Errorf("%s: journal files %v, want one record", what, files)
			return r, st
		}
		b, err := os.ReadFile(files[0])
		if err == nil {
			err = json.Unmarshal(b, &r)
		}
		if err != nil {
			t.Errorf("%s: journal: %v", what, err)
		}
		json.Unmarshal(r.ProviderState, &st)
		return r, st
	}
	named := func(st map[string]any, name string) bool {
		b, _ := json.Marshal(st)
		return bytes.Contains(b, []byte(`"`+name+`"`))
	}
	var mu sync.Mutex
	var seen []string
	check := func(cmd string, args map[string]any) {
		str := func(k string) string { s, _ := args[k].(string); return s }
		var want coord.Phase
		switch {
		case cmd == "blockdev-add" && str("driver") == "snapshot-access", cmd == "block-export-add",
			cmd == "getfd", cmd == "nbd-server-start":
			want = coord.PhaseThawed
		case cmd == "blockdev-add", cmd == "add-fd":
			want = coord.PhasePreparing
		case cmd == "stop", cmd == "qom-set" && strings.HasSuffix(str("value"), "-cbw"):
			want = coord.PhaseFreezing
		default:
			return // reads, and undoing what exists
		}
		mu.Lock()
		seen = append(seen, cmd)
		mu.Unlock()
		r, st := load(cmd)
		if r.Phase != want {
			t.Errorf("%s %v sent in phase %v, want %v", cmd, args, r.Phase, want)
		}
		ok := true
		switch cmd {
		case "blockdev-add":
			ok = named(st, str("node-name"))
		case "add-fd":
			ok = named(st, str("opaque"))
		case "block-export-add":
			ok = named(st, str("id"))
		case "getfd", "nbd-server-start":
			ok = st["nbd_server"] == true
		case "stop":
			ok = st["paused"] == true
		case "qom-set":
			ok = false
			disks, _ := st["disks"].([]any)
			for _, d := range disks {
				if d, _ := d.(map[string]any); d["cbw_node"] == str("value") {
					ok = d["inserted"] == true
				}
			}
		}
		if !ok {
			b, _ := json.Marshal(st)
			t.Errorf("%s %v sent to QEMU before the journal recorded it (journal: %s)", cmd, args, b)
		}
	}
	tap := qmpTap(t, vm.QMPPath, check)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	p := qemu.New(qemu.Options{QMPPath: tap, ScratchDir: scratch})
	s, err := (&coord.Coordinator{Provider: p, Journal: journal}).Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	for _, cmd := range []string{"blockdev-add", "add-fd", "stop", "qom-set", "getfd", "nbd-server-start", "block-export-add"} {
		if !slices.Contains(seen, cmd) {
			t.Errorf("no %s went through the tap (saw %v)", cmd, seen)
		}
	}
	mu.Unlock()
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	vm.AssertAsBefore(t, before)
}
