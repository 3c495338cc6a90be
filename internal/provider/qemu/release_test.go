package qemu_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/tracking"
)

// TestSetGivesBackEverything: sets of a running and of a paused VM (backups
// with change tracking, a plain snapshot set, a set left behind and
// recovered) give back everything they took, even when the guest rewrote
// 24 MiB while the set existed; recover reports only what it removed.
func TestSetGivesBackEverything(t *testing.T) {
	for _, running := range []bool{true, false} {
		name := map[bool]string{true: "running", false: "paused"}[running]
		t.Run(name, func(t *testing.T) {
			vm := qemutest.Start(t, qemutest.Options{Running: running, Disks: []qemutest.Disk{{ID: "vda"}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
			if !running {
				vm.Pause()
			}
			dir, _ := os.MkdirTemp("", "vsrel")
			defer os.RemoveAll(dir)
			r := &rig{t: t, vm: vm, journal: &coord.Journal{Dir: dir + "/j"}, scratch: dir + "/s"}
			vm.Write("vda", 1, 0, 32<<20)
			before := vm.Baseline(r.scratch)
			rewrite := func(*coord.Set) { vm.Write("vda", 2, 0, 24<<20) }

			// Three backups, each with the guest rewriting 24 MiB meanwhile.
			var prev map[string]tracking.Previous
			for i := 0; i < 3; i++ {
				set := r.set(&tracking.Request{Prefix: "vmshadow-repo1", Previous: prev}, true, rewrite)
				prev = map[string]tracking.Previous{}
				for _, sh := range set.Shadows {
					prev[sh.Disk] = tracking.Previous{Checkpoint: sh.Checkpoint, Size: sh.Size}
				}
				vm.AssertAsBefore(t, before.WithChains())
			}
			before = vm.Baseline(r.scratch).WithChains()
			// A failed backup, and a snapshot set without change tracking.
			r.set(&tracking.Request{Prefix: "vmshadow-repo1", Previous: prev}, false, rewrite)
			vm.AssertAsBefore(t, before)
			r.set(nil, false, rewrite)
			vm.AssertAsBefore(t, before)

			// A set left behind (its process died), then recovered.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			p := qemu.New(qemu.Options{QMPPath: vm.QMPPath, ScratchDir: r.scratch})
			s, err := (&coord.Coordinator{Provider: p, Journal: r.journal}).Open(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Create(ctx); err != nil {
				t.Fatal(err)
			}
			rewrite(nil)
			s.Close()
			var warnings []string
			p = qemu.New(qemu.Options{QMPPath: vm.QMPPath, ScratchDir: r.scratch, Warn: func(w string) { warnings = append(warnings, w) }})
			s, err = (&coord.Coordinator{Provider: p, Journal: r.journal}).Open(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			rep, err := s.Recover(ctx)
			if err != nil {
				t.Fatalf("recover: %v (%v)", err, rep)
			}
			if len(warnings) > 0 {
				t.Errorf("recover warned: %q", warnings)
			}
			var fdsets []struct {
				ID int `json:"fdset-id"`
			}
			vm.Exec("query-fdsets", nil, &fdsets)
			for _, what := range rep.Removed {
				for _, f := range fdsets {
					if what == fmt.Sprintf("fdset %d", f.ID) {
						t.Errorf("recover reports %q removed, but QEMU still has it", what)
					}
				}
				if strings.HasPrefix(what, "/") {
					if _, err := os.Stat(what); err == nil {
						t.Errorf("recover reports %q removed, but it exists", what)
					}
				}
			}
			if !strings.Contains(strings.Join(rep.Removed, " "), filepath.Join(r.scratch, "vmshadow-")) {
				t.Errorf("recover did not report the scratch files: %q", rep.Removed)
			}
			vm.AssertAsBefore(t, before)
		})
	}
}

// TestRecoverReportsOnlyVerified: a descriptor vmshadow passed is left in
// an fdset of a paused VM (QEMU closes it only while the VM runs): recover
// warns about it and does not report it removed; once the VM runs, recover
// removes it and says so.
func TestRecoverReportsOnlyVerified(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda"}}})
	vm.Pause()
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "vmshadow-x-0.cow"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var fdset struct {
		ID int `json:"fdset-id"`
	}
	if err := vm.QMP().ExecuteWithFile(ctx, "add-fd", map[string]any{"opaque": "vmshadow-x-0-tgt"}, &fdset, f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	recover := func() (coord.RecoverReport, []string) {
		t.Helper()
		var warnings []string
		p := qemu.New(qemu.Options{QMPPath: vm.QMPPath, ScratchDir: dir, Warn: func(w string) { warnings = append(warnings, w) }})
		s, err := (&coord.Coordinator{Provider: p, Journal: &coord.Journal{Dir: dir + "/j"}}).Open(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		rep, err := s.Recover(ctx)
		if err != nil {
			t.Fatalf("recover: %v", err)
		}
		return rep, warnings
	}
	name := fmt.Sprintf("fdset %d", fdset.ID)
	rep, warnings := recover()
	if slices.Contains(rep.Removed, name) {
		t.Errorf("recover on a paused VM reports %q removed; QEMU still has it", name)
	}
	if !strings.Contains(strings.Join(warnings, "\n"), name) {
		t.Errorf("recover did not warn about %s: %q", name, warnings)
	}
	vm.Exec("cont", nil, nil)
	rep, _ = recover()
	if !slices.Contains(rep.Removed, name) {
		t.Errorf("recover on the running VM: removed %q, want %q", rep.Removed, name)
	}
	var sets []any
	vm.Exec("query-fdsets", nil, &sets)
	if len(sets) != 0 {
		t.Errorf("fdsets left: %v", sets)
	}
}
