package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
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
	code := m.Run()
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
	cmd := exec.Command(bin, append([]string{"--json"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &errOut
	err := cmd.Run()
	r := result{stderr: errOut.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
		if r.code == -1 {
			r.code = 137 // killed
		}
	} else if err != nil {
		t.Fatalf("run vmshadow: %v", err)
	}
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("vmshadow printed a line that is not JSON: %q", line)
		}
		if _, ok := m["message_type"]; !ok {
			t.Fatalf("JSON line without message_type: %q", line)
		}
		r.msgs = append(r.msgs, m)
	}
	return r
}
