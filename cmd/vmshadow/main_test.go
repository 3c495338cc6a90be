package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vmshadow/vmshadow/internal/libvirttest"
)

// bin is the vmshadow binary the end-to-end tests run, built by TestMain.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vmshadow-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "vmshadow")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build vmshadow: %v\n%s", err, out)
		os.Exit(1)
	}
	code := libvirttest.Main(m) // stops a libvirtd the libvirt tests started
	os.RemoveAll(dir)
	os.Exit(code)
}

// result is one run of the binary with --json.
type result struct {
	code   int
	msgs   []map[string]any
	stderr string
}

func (r result) summary(t testing.TB) map[string]any {
	t.Helper()
	if len(r.msgs) == 0 {
		t.Fatalf("no output (exit %d, stderr %s)", r.code, r.stderr)
	}
	last := r.msgs[len(r.msgs)-1]
	if last["message_type"] != "summary" {
		t.Fatalf("last message is not a summary: %v (exit %d)", last, r.code)
	}
	return last
}

func (r result) errorMessage() string {
	for _, m := range r.msgs {
		if m["message_type"] == "error" {
			return fmt.Sprint(m["message"])
		}
	}
	return ""
}

func (r result) warnings() []string {
	var w []string
	for _, m := range r.msgs {
		if m["message_type"] == "warning" {
			w = append(w, fmt.Sprint(m["message"]))
		}
	}
	return w
}

// vmshadow runs the binary with --json and the given environment additions.
func vmshadow(t testing.TB, env []string, args ...string) result {
	t.Helper()
	_, wait := startVmshadow(t, env, args...)
	return wait()
}

// startVmshadow starts the binary with --json; wait collects its result:
// the exit code (128+N for a process ended by signal N) and the JSON
// lines. Every line must be a JSON object with a message_type, except
// the last one of a process ended by a signal (it may die mid-line).
func startVmshadow(t testing.TB, env []string, args ...string) (*exec.Cmd, func() result) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"--json"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Start(); err != nil {
		t.Fatalf("run vmshadow: %v", err)
	}
	return cmd, func() result {
		t.Helper()
		cmd.Wait()
		r := result{stderr: errOut.String(), code: cmd.ProcessState.ExitCode()}
		ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
		if ws.Signaled() {
			r.code = 128 + int(ws.Signal())
		}
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		for i, line := range lines {
			if line == "" {
				continue
			}
			var m map[string]any
			err := json.Unmarshal([]byte(line), &m)
			if err == nil && m["message_type"] == nil {
				err = errors.New("no message_type")
			}
			switch {
			case err == nil:
				r.msgs = append(r.msgs, m)
			case ws.Signaled() && i == len(lines)-1:
			default:
				t.Fatalf("vmshadow printed a line that is not a JSON message (%v): %q", err, line)
			}
		}
		return r
	}
}
