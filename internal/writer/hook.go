// Package writer owns vmshadow's writers, the parties that make data
// consistent and hold it while the snapshot set is committed: the guest
// agent (file systems, and on Windows guests VSS itself) and hook
// executables on the host (applications). They implement coord.Writer.
package writer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// Hook is an executable called as "PATH freeze" and "PATH thaw", like
// qemu-ga's fsfreeze-hook. It gets the set in its environment:
// VMSHADOW_VM, VMSHADOW_SET_ID and VMSHADOW_PHASE (freeze or thaw), and
// in a set across several VMs VMSHADOW_GROUP and VMSHADOW_VMS (the
// members' names, space-separated; VMSHADOW_VM is the first). Exit
// status 0 is success; anything else, or running past the time limit (the
// hook's process group is then killed), is a failure that carries the
// last lines of its output.
type Hook struct {
	path string
	set  coord.SetContext
}

// NewHook checks that path names an executable file and returns its writer.
func NewHook(path string) (*Hook, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("hook %s: %w: %w", path, err, errs.ErrUsage)
	}
	st, err := os.Stat(abs)
	if err != nil {
		return nil, fmt.Errorf("hook %s: %w: %w", path, err, errs.ErrUsage)
	}
	if !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		return nil, fmt.Errorf("hook %s is not an executable file (chmod +x it): %w", path, errs.ErrUsage)
	}
	return &Hook{path: abs}, nil
}

func (h *Hook) Name() string           { return "hook:" + h.path }
func (h *Hook) Level() coord.Level     { return coord.Application }
func (h *Hook) Spec() coord.WriterSpec { return coord.WriterSpec{Kind: "hook", Path: h.path} }
func (h *Hook) Close() error           { return nil }

// Prepare records the set; the executable was checked by NewHook.
func (h *Hook) Prepare(_ context.Context, set coord.SetContext) error {
	h.set = set
	return nil
}

func (h *Hook) Freeze(ctx context.Context) error { return h.run(ctx, "freeze") }
func (h *Hook) Thaw(ctx context.Context) error   { return h.run(ctx, "thaw") }

// secretEnv names environment variables that hold secrets vmshadow uses;
// hooks do not inherit them.
var secretEnv = map[string]bool{
	"VMSHADOW_PASSWORD": true, "VMSHADOW_NEW_PASSWORD": true, "VMSHADOW_XAPI_PASSWORD": true,
	"AWS_SECRET_ACCESS_KEY": true, "AWS_SESSION_TOKEN": true,
}

// hookEnv is env without vmshadow's secrets.
func hookEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		if !secretEnv[name] {
			out = append(out, kv)
		}
	}
	return out
}

// maxHookOutput bounds what is kept of a hook's output.
const maxHookOutput = 64 << 10

func (h *Hook) run(ctx context.Context, phase string) error {
	cmd := exec.Command(h.path, phase)
	cmd.Env = append(hookEnv(os.Environ()), "VMSHADOW_VM="+h.set.VM, "VMSHADOW_SET_ID="+h.set.SetID, "VMSHADOW_PHASE="+phase)
	if h.set.Group != nil {
		// A set across several VMs: the hook runs once for all of them.
		cmd.Env = append(cmd.Env, "VMSHADOW_GROUP="+h.set.Group.Name, "VMSHADOW_VMS="+strings.Join(h.set.Group.Members, " "))
	}
	var out tailBuffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// A process the hook left behind (a daemon it started, in a session
	// of its own) may hold the hook's output open: Wait gives up on the
	// output this long after the hook exited.
	cmd.WaitDelay = hookOutputDelay
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("run %s %s: %w", h.path, phase, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, exec.ErrWaitDelay) { // ErrWaitDelay: exit status 0, output left open
			return fmt.Errorf("%s %s: %v%s", h.path, phase, err, out.describe())
		}
		return nil
	case <-ctx.Done():
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-done:
		case <-time.After(hookOutputDelay + 5*time.Second): // a process that SIGKILL does not end (uninterruptible I/O)
		}
		return fmt.Errorf("%s %s did not finish in time, killed: %w%s", h.path, phase, ctx.Err(), out.describe())
	}
}

// hookOutputDelay is how long a hook's output may stay open after it exited.
const hookOutputDelay = 2 * time.Second

// tailBuffer keeps the last maxHookOutput bytes written to it. It is safe
// for concurrent use: a process left behind may still write to it.
type tailBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > maxHookOutput {
		t.b = t.b[len(t.b)-maxHookOutput:]
	}
	return len(p), nil
}

// describe returns the last lines of output, for an error message.
func (t *tailBuffer) describe() string {
	t.mu.Lock()
	s := strings.TrimSpace(string(bytes.ToValidUTF8(t.b, []byte("?"))))
	t.mu.Unlock()
	if s == "" {
		return ""
	}
	lines := strings.Split(s, "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return ": " + strings.Join(lines, " | ")
}

var _ coord.Writer = (*Hook)(nil)
