package vmbackup_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/livebackup"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/fault"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/vmbackup"
)

// TestRun: one repository opened once serves a full backup, an
// incremental, a failed backup (its chunks removed, the change tracking
// kept) and the incremental after it, which reads every change since the
// last stored backup, on a real QEMU VM.
func TestRun(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda", Size: 16 << 20}}})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	loc, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	be := fault.New(loc)
	r, err := repo.Init(ctx, be, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: repo.MinChunkSize})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	c := &coord.Coordinator{Provider: qemu.New(qemu.Options{QMPPath: vm.QMPPath, ScratchDir: filepath.Join(dir, "scratch")}),
		Journal: &coord.Journal{Dir: filepath.Join(dir, "journal")}}
	var warnings []string
	run := func() (*vmbackup.Result, []livebackup.DiskPlan, int64, error) {
		var plans []livebackup.DiskPlan
		var total int64
		res, err := vmbackup.Run(ctx, r, vmbackup.Options{Live: livebackup.Options{Coordinator: c, VM: "vm1"},
			Plan: func(d livebackup.DiskPlan) { plans = append(plans, d) },
			Progress: func(m *progress.Meter) func() {
				total = progress.NewSampler(m).Sample(time.Now()).BytesTotal
				return func() {}
			},
			Warn: func(f string, a ...any) { warnings = append(warnings, fmt.Sprintf(f, a...)) }})
		return res, plans, total, err
	}
	chunks := func() int {
		n := 0
		if err := loc.List(ctx, backend.KindChunks, "", func(backend.Info) error { n++; return nil }); err != nil {
			t.Fatal(err)
		}
		return n
	}

	vm.Write("vda", 0x11, 0, 1<<20)
	res, plans, total, err := run()
	if err != nil {
		t.Fatal(err)
	}
	if res.Manifest.Mode != "full" || len(plans) != 1 || plans[0].Mode != "full" || total != 16<<20 || res.Live.Set == nil {
		t.Fatalf("first backup: mode %s, plans %+v, meter total %d", res.Manifest.Mode, plans, total)
	}

	vm.Write("vda", 0x22, 4<<20, 64<<10)
	res, plans, _, err = run()
	if err != nil {
		t.Fatal(err)
	}
	if res.Manifest.Mode != "incremental" || plans[0].Mode != "incremental" || res.Stats.BytesRead != repo.MinChunkSize {
		t.Fatalf("second backup: mode %s, plans %+v, read %d; want incremental reading one chunk", res.Manifest.Mode, plans, res.Stats.BytesRead)
	}

	// A backup that fails once its chunks are stored (its index cannot
	// be written): no backup, its chunks removed, a warning saying so.
	before := chunks()
	vm.Write("vda", 0x33, 8<<20, 64<<10)
	be.Add(fault.Rule{Op: fault.OpPut, Kind: backend.KindIndexes, Mode: fault.Fail})
	if _, _, _, err := run(); !errors.Is(err, fault.ErrInjected) {
		t.Fatalf("backup with failing index writes: %v, want the injected fault", err)
	}
	be.Reset()
	if got := chunks(); got != before {
		t.Errorf("%d chunks after the failed backup, %d before: its chunks were not removed", got, before)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "removed the 1 chunks") {
		t.Errorf("warnings %q, want one saying the failed backup's chunk was removed", warnings)
	}
	if list, _, err := r.ListBackups(ctx); err != nil || len(list) != 2 {
		t.Fatalf("backups after the failure: %d, %v; want the 2 stored", len(list), err)
	}

	// The next backup reads what changed since the last stored one: the
	// failed backup's change and a new one.
	vm.Write("vda", 0x44, 12<<20, 64<<10)
	res, _, _, err = run()
	if err != nil {
		t.Fatal(err)
	}
	if res.Manifest.Mode != "incremental" || res.Stats.BytesRead != 2*repo.MinChunkSize {
		t.Fatalf("backup after the failure: mode %s, read %d; want incremental reading two chunks", res.Manifest.Mode, res.Stats.BytesRead)
	}
	vr, err := r.Verify(ctx, repo.VerifyOptions{})
	if err != nil || len(vr.Problems) > 0 {
		t.Fatalf("verify: %+v, %v", vr, err)
	}
}
