package writer

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
)

func script(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "hook.sh")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestHookEnvironmentAndPhases(t *testing.T) {
	out := filepath.Join(t.TempDir(), "out")
	h, err := NewHook(script(t, `echo "$1 $VMSHADOW_PHASE $VMSHADOW_VM $VMSHADOW_SET_ID" >> `+out+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	h.Prepare(ctx, coord.SetContext{VM: "vm1", SetID: "abc"})
	if err := h.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	if got := string(b); got != "freeze freeze vm1 abc\nthaw thaw vm1 abc\n" {
		t.Fatalf("hook saw %q", got)
	}
}

// TestHookInGroup: in a set across several VMs the hook is told the group
// and its VMs.
func TestHookInGroup(t *testing.T) {
	out := filepath.Join(t.TempDir(), "out")
	h, err := NewHook(script(t, `echo "$VMSHADOW_GROUP [$VMSHADOW_VMS] $VMSHADOW_VM" >> `+out+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	h.Prepare(ctx, coord.SetContext{VM: "db", SetID: "abc", Group: &coord.GroupRef{Name: "shop", Members: []string{"db", "app 1"}}})
	if err := h.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(out); string(b) != "shop [db app 1] db\n" {
		t.Fatalf("hook saw %q", b)
	}
}

func TestHookGetsNoSecrets(t *testing.T) {
	t.Setenv("VMSHADOW_PASSWORD", "repo-secret")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "s3-secret")
	t.Setenv("SOME_SETTING", "kept")
	out := filepath.Join(t.TempDir(), "env")
	h, _ := NewHook(script(t, "env > "+out+"\n"))
	if err := h.Freeze(context.Background()); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	if strings.Contains(string(b), "secret") || !strings.Contains(string(b), "SOME_SETTING=kept") {
		t.Fatalf("hook environment:\n%s", b)
	}
}

func TestHookFailureCarriesOutput(t *testing.T) {
	h, _ := NewHook(script(t, "echo one; echo 'cannot lock tables' >&2; exit 3\n"))
	err := h.Freeze(context.Background())
	if err == nil || !strings.Contains(err.Error(), "cannot lock tables") || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("err = %v", err)
	}
}

func TestHookTimeoutKillsItsChildren(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	h, _ := NewHook(script(t, "sleep 60 & echo $! > "+pidFile+"\nwait\n"))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := h.Freeze(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("hook was not killed promptly")
	}
	b, _ := os.ReadFile(pidFile)
	pid := strings.TrimSpace(string(b))
	deadline := time.Now().Add(2 * time.Second)
	for {
		if _, err := os.Stat("/proc/" + pid); err != nil {
			break // the hook's child is gone too
		}
		st, _ := os.ReadFile("/proc/" + pid + "/stat")
		if strings.Contains(string(st), ") Z ") {
			break // zombie: killed, waiting for its reaper
		}
		if time.Now().After(deadline) {
			t.Fatalf("hook's child %s still running", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestNewHookRejects(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, []byte("x"), 0o644)
	for _, p := range []string{filepath.Join(dir, "missing"), plain, dir} {
		if _, err := NewHook(p); !errors.Is(err, errs.ErrUsage) {
			t.Errorf("NewHook(%s) = %v, want usage error", p, err)
		}
	}
}
