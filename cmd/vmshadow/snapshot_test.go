package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/qga/qgatest"
)

// stateEnv returns a fresh state directory for one test, as environment.
func stateEnv(t *testing.T) (dir string, env []string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "vs")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir, []string{"VMSHADOW_STATE_DIR=" + dir}
}

// scratchOf is the diff area vmshadow uses with env: STATE_DIR/scratch.
func scratchOf(t testing.TB, env []string) string {
	t.Helper()
	for _, e := range env {
		if dir, ok := strings.CutPrefix(e, "VMSHADOW_STATE_DIR="); ok {
			return filepath.Join(dir, "scratch")
		}
	}
	t.Fatal("no VMSHADOW_STATE_DIR in the test's environment")
	return ""
}

// readNBD copies an NBD export to a raw file with qemu-img and returns it.
func readNBD(t *testing.T, uri string) ([]byte, error) {
	t.Helper()
	out := filepath.Join(t.TempDir(), fmt.Sprintf("nbd-%d.raw", time.Now().UnixNano()))
	if b, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("qemu-img convert %s: %v: %s", uri, err, b)
	}
	return os.ReadFile(out)
}

func shadows(t *testing.T, sum map[string]any) map[string]map[string]any {
	t.Helper()
	list, ok := sum["shadows"].([]any)
	if !ok {
		t.Fatalf("summary has no shadows: %v", sum)
	}
	m := map[string]map[string]any{}
	for _, s := range list {
		sh := s.(map[string]any)
		for _, k := range []string{"id", "disk", "node", "size", "nbd"} {
			if _, ok := sh[k]; !ok {
				t.Fatalf("shadow without %q: %v", k, sh)
			}
		}
		m[sh["disk"].(string)] = sh
	}
	return m
}

// TestSnapshotCapturesOneInstant, of a running VM and of a paused one
// (suspended, or stopped for maintenance): the shadow copies read as the
// disks were at the instant while the guest writes on, and delete gives
// back everything the set took.
func TestSnapshotCapturesOneInstant(t *testing.T) {
	t.Run("running", func(t *testing.T) { testSnapshotCapturesOneInstant(t, true) })
	t.Run("paused", func(t *testing.T) { testSnapshotCapturesOneInstant(t, false) })
}

func testSnapshotCapturesOneInstant(t *testing.T, running bool) {
	vm := qemutest.Start(t, qemutest.Options{Running: running, Disks: []qemutest.Disk{
		{ID: "vda"}, {ID: "vdb", Format: "raw", Size: 32 << 20}, {ID: "vdc", Legacy: true, Size: 48 << 20},
	}})
	if !running {
		vm.Pause()
	}
	_, env := stateEnv(t)
	for _, d := range vm.Disks {
		vm.Write(d.ID, 0x11, 0, 3<<20)
		vm.Write(d.ID, 0x12, 10<<20, 64<<10)
	}
	before := vm.Baseline(scratchOf(t, env))
	expected := map[string][]byte{}
	for _, d := range vm.Disks {
		b, err := os.ReadFile(vm.Snapshot(d.ID))
		if err != nil {
			t.Fatal(err)
		}
		expected[d.ID] = b
	}

	r := vmshadow(t, env, "snapshot", "create", "--qmp", vm.QMPPath)
	if r.code != 0 {
		t.Fatalf("create: exit %d: %s", r.code, r.errorMessage())
	}
	sum := r.summary(t)
	if sum["vm"] != "testvm" || sum["consistency"] != "crash" || sum["freeze_ms"] != 0.0 {
		t.Errorf("summary = %v", sum)
	}
	if _, err := time.Parse(time.RFC3339, fmt.Sprint(sum["created"])); err != nil {
		t.Errorf("created is not RFC 3339: %v", sum["created"])
	}
	setID := fmt.Sprint(sum["set_id"])
	sh := shadows(t, sum)
	if len(sh) != 3 {
		t.Fatalf("want 3 shadows, got %v", sh)
	}

	// Guest writes after the instant: over old data (24 MiB of it in all),
	// into holes, at the end.
	for _, d := range vm.Disks {
		vm.Write(d.ID, 0x22, 1<<20, 4<<20)
		vm.Write(d.ID, 0x23, d.Size-(1<<20), 1<<20)
	}
	vm.Write("vda", 0x24, 8<<20, 16<<20)
	for _, d := range vm.Disks {
		s := sh[d.ID]
		if int64(s["size"].(float64)) != d.Size {
			t.Errorf("%s: size %v, want %d", d.ID, s["size"], d.Size)
		}
		got, err := readNBD(t, s["nbd"].(string))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, expected[d.ID]) {
			t.Errorf("%s: shadow copy differs from the disk at the instant", d.ID)
		}
	}

	r = vmshadow(t, env, "snapshot", "list", "--qmp", vm.QMPPath)
	sets := r.summary(t)["sets"].([]any)
	if len(sets) != 1 || sets[0].(map[string]any)["set_id"] != setID {
		t.Fatalf("list = %v", sets)
	}

	r = vmshadow(t, env, "snapshot", "delete", "--qmp", vm.QMPPath, setID)
	if r.code != 0 {
		t.Fatalf("delete: exit %d: %s", r.code, r.errorMessage())
	}
	vm.AssertAsBefore(t, before)
	// The guest's writes went to the disks.
	for _, d := range vm.Disks {
		live, _ := os.ReadFile(vm.Snapshot(d.ID))
		if !bytes.Equal(live[1<<20:5<<20], bytes.Repeat([]byte{0x22}, 4<<20)) {
			t.Errorf("%s: guest write after the instant is missing from the disk", d.ID)
		}
	}
	r = vmshadow(t, env, "snapshot", "list", "--qmp", vm.QMPPath)
	if sets := r.summary(t)["sets"].([]any); len(sets) != 0 {
		t.Fatalf("list after delete = %v", sets)
	}
}

// hookScript writes a hook that logs "hook NAME PHASE SETID" to log and
// behaves as told for freeze: "ok", "fail", or "hang".
func hookScript(t *testing.T, name, log, freeze string) string {
	t.Helper()
	action := map[string]string{"ok": "exit 0", "fail": "echo 'database refused to pause' >&2; exit 3", "hang": "exec sleep 60"}[freeze]
	p := filepath.Join(t.TempDir(), name)
	script := fmt.Sprintf("#!/bin/sh\necho \"hook %s $1 $VMSHADOW_SET_ID $VMSHADOW_VM\" >> %s\nif [ \"$1\" = freeze ]; then %s; fi\nexit 0\n", name, log, action)
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func readLog(t *testing.T, path string) []string {
	t.Helper()
	b, _ := os.ReadFile(path)
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l != "" {
			f := strings.Fields(l)
			lines = append(lines, strings.Join(f[:min(3, len(f))], " "))
		}
	}
	return lines
}

func TestSnapshotWriters(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda"}, {ID: "vdb"}}})
	tests := []struct {
		name      string
		hook      string // "" for none, else freeze behaviour
		agent     string // "" for none, else ok/fail/hang
		args      []string
		code      int
		level     string
		log       []string
		warn      string
		errSubstr string
	}{
		{name: "agent", agent: "ok", code: 0, level: "filesystem",
			log: []string{"agent freeze", "agent thaw"}},
		{name: "hook and agent", hook: "ok", agent: "ok", code: 0, level: "application",
			log: []string{"hook db freeze", "agent freeze", "agent thaw", "hook db thaw"}},
		{name: "hook only", hook: "ok", code: 0, level: "application",
			log: []string{"hook db freeze", "hook db thaw"}},
		{name: "failing hook goes on", hook: "fail", agent: "ok", code: 0, level: "filesystem",
			log: []string{"hook db freeze", "agent freeze", "agent thaw", "hook db thaw"}, warn: "database refused to pause"},
		{name: "failing hook required", hook: "fail", agent: "ok", args: []string{"--require", "application"}, code: 4,
			log: []string{"hook db freeze", "hook db thaw"}, errSubstr: "database refused to pause"},
		{name: "failing agent goes on", agent: "fail", code: 0, level: "crash",
			log: []string{"agent freeze", "agent thaw"}, warn: "fsfreeze hook has failed"},
		{name: "failing agent required", agent: "fail", args: []string{"--require", "filesystem"}, code: 4,
			log: []string{"agent freeze", "agent thaw"}, errSubstr: "fsfreeze hook has failed"},
		{name: "hanging hook, writer limit", hook: "hang", args: []string{"--writer-timeout", "1s"}, code: 0, level: "crash",
			log: []string{"hook db freeze", "hook db thaw"}, warn: "did not finish in time"},
		{name: "hanging hook, freeze limit", hook: "hang", args: []string{"--freeze-timeout", "1s", "--writer-timeout", "30s"}, code: 5,
			log: []string{"hook db freeze", "hook db thaw"}, errSubstr: "freeze limit"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, env := stateEnv(t)
			log := filepath.Join(t.TempDir(), "writers.log")
			args := []string{"snapshot", "create", "--qmp", vm.QMPPath}
			if tt.hook != "" {
				args = append(args, "--hook", hookScript(t, "db", log, tt.hook))
			}
			if tt.agent != "" {
				b := map[string]qgatest.Behaviour{"ok": qgatest.OK, "fail": qgatest.FailFreeze, "hang": qgatest.HangFreeze}[tt.agent]
				ag := qgatest.Start(t, b, log)
				args = append(args, "--qga", ag.Path)
				defer func() {
					if ag.Frozen() {
						t.Errorf("guest left frozen")
					}
				}()
			}
			args = append(args, tt.args...)
			before := vm.Baseline(scratchOf(t, env))
			r := vmshadow(t, env, args...)
			if r.code != tt.code {
				t.Fatalf("exit %d, want %d: %s %v", r.code, tt.code, r.errorMessage(), r.warnings())
			}
			if got := readLog(t, log); strings.Join(got, ",") != strings.Join(tt.log, ",") {
				t.Errorf("writer calls = %q, want %q", got, tt.log)
			}
			if tt.errSubstr != "" && !strings.Contains(r.errorMessage(), tt.errSubstr) {
				t.Errorf("error %q does not mention %q", r.errorMessage(), tt.errSubstr)
			}
			if tt.warn != "" && !strings.Contains(strings.Join(r.warnings(), "\n"), tt.warn) {
				t.Errorf("warnings %q do not mention %q", r.warnings(), tt.warn)
			}
			if r.code != 0 {
				vm.AssertAsBefore(t, before)
				return
			}
			sum := r.summary(t)
			if sum["consistency"] != tt.level {
				t.Errorf("consistency = %v, want %s", sum["consistency"], tt.level)
			}
			if tt.hook != "" || tt.agent != "" {
				if ms := sum["freeze_ms"].(float64); ms <= 0 || ms > 10000 {
					t.Errorf("freeze_ms = %v", ms)
				}
			}
			if d := vmshadow(t, env, "snapshot", "delete", "--qmp", vm.QMPPath, fmt.Sprint(sum["set_id"])); d.code != 0 {
				t.Fatalf("delete: %s", d.errorMessage())
			}
			vm.AssertAsBefore(t, before)
		})
	}
}

// TestSnapshotHangingAgent: an agent that never answers its freeze cannot
// be thawed through the same connection; the set fails, and the guest is
// thawed through a new one before create returns, so nothing is left for
// recover.
func TestSnapshotHangingAgent(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda"}}})
	vm.Pause()
	state, env := stateEnv(t)
	ag := qgatest.Start(t, qgatest.HangFreeze, "")
	before := vm.Baseline(scratchOf(t, env))
	r := vmshadow(t, env, "snapshot", "create", "--qmp", vm.QMPPath, "--qga", ag.Path, "--writer-timeout", "1s")
	if r.code == 0 || !strings.Contains(r.errorMessage(), "guest-agent") {
		t.Fatalf("exit %d, error %q: want a failure naming the agent", r.code, r.errorMessage())
	}
	vm.AssertAsBefore(t, before)
	if ag.Frozen() {
		t.Fatal("the guest was left frozen: create must thaw it through a new connection")
	}
	if left, _ := filepath.Glob(filepath.Join(state, "journal", "*.json")); len(left) > 0 {
		t.Errorf("journal left: %v", left)
	}
	r = vmshadow(t, env, "snapshot", "create", "--qmp", vm.QMPPath)
	if r.code != 0 {
		t.Fatalf("create after the failure: exit %d: %s", r.code, r.errorMessage())
	}
	if d := vmshadow(t, env, "snapshot", "delete", "--qmp", vm.QMPPath, fmt.Sprint(r.summary(t)["set_id"])); d.code != 0 {
		t.Fatal(d.errorMessage())
	}
	vm.AssertAsBefore(t, before)
}

func TestSnapshotBusyAndBadInput(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda"}}})
	vm.Pause()
	empty := qemutest.Start(t, qemutest.Options{Name: "nodisks"})
	_, env := stateEnv(t)
	before := vm.Baseline(scratchOf(t, env))

	notQMP := filepath.Join(t.TempDir(), "x.sock")
	srv := exec.Command("python3", "-c", `
import socket,sys,time
s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(5)
while True:
    c,_=s.accept(); c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
`, notQMP)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Process.Kill()
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(notQMP); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	roFile := filepath.Join(t.TempDir(), "file")
	os.WriteFile(roFile, nil, 0o644)

	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"missing socket", []string{"snapshot", "create", "--qmp", "/nonexistent/qmp.sock"}, 10, "no such file"},
		{"not QMP", []string{"snapshot", "create", "--qmp", notQMP}, 10, "not a qmp socket"},
		{"no disks", []string{"snapshot", "create", "--qmp", empty.QMPPath}, 6, "nothing to snapshot"},
		{"scratch not a directory", []string{"snapshot", "create", "--qmp", vm.QMPPath, "--scratch-dir", roFile}, 2, "scratch dir"},
		{"bad level", []string{"snapshot", "create", "--qmp", vm.QMPPath, "--require", "total"}, 2, "consistency level"},
		{"hook not executable", []string{"snapshot", "create", "--qmp", vm.QMPPath, "--hook", roFile}, 2, "not an executable"},
		{"unknown set", []string{"snapshot", "delete", "--qmp", vm.QMPPath, "nosuchset"}, 6, "no snapshot set"},
		{"no qmp flag", []string{"snapshot", "create"}, 2, "qmp"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := vmshadow(t, env, tt.args...)
			if r.code != tt.code || !strings.Contains(strings.ToLower(r.errorMessage()), tt.want) {
				t.Fatalf("exit %d (want %d), error %q (want %q)", r.code, tt.code, r.errorMessage(), tt.want)
			}
			vm.AssertAsBefore(t, before)
		})
	}

	t.Run("busy", func(t *testing.T) {
		r := vmshadow(t, env, "snapshot", "create", "--qmp", vm.QMPPath)
		if r.code != 0 {
			t.Fatalf("create: %s", r.errorMessage())
		}
		during := vm.Baseline(scratchOf(t, env))
		r2 := vmshadow(t, env, "snapshot", "create", "--qmp", vm.QMPPath)
		if r2.code != 3 || !strings.Contains(r2.errorMessage(), "exists") {
			t.Fatalf("second create: exit %d, %q", r2.code, r2.errorMessage())
		}
		vm.AssertAsBefore(t, during)
		if d := vmshadow(t, env, "snapshot", "delete", "--qmp", vm.QMPPath, fmt.Sprint(r.summary(t)["set_id"])); d.code != 0 {
			t.Fatal(d.errorMessage())
		}
		vm.AssertAsBefore(t, before)
	})
}
