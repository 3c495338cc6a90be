package repo

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/retention"
)

// TestHealthRecords: results are kept per backup (newest MaxHealthResults),
// sealed under the backup's name; verify reports a damaged record; prune
// and DeleteBackup delete a backup's record with it, gc deletes records of
// backups that no longer exist and keeps the others.
func TestHealthRecords(t *testing.T) {
	ctx := context.Background()
	r, be := newTestRepo(t, EncryptionAESGCM)
	x, err := NewIndex(MinChunkSize, MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	xid, err := r.SaveIndex(ctx, x)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	save := func(vm string, when time.Time) ID {
		t.Helper()
		id, err := r.SaveManifest(ctx, &Manifest{VM: vm, Time: when, Source: "image", Mode: "full",
			Disks: []ManifestDisk{{Name: "vda", Size: MinChunkSize, ChunkSize: MinChunkSize, Index: xid.String()}}})
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	old, mid, newest := save("vm1", t0), save("vm1", t0.Add(time.Hour)), save("vm1", t0.Add(2*time.Hour))
	other := save("vm2", t0)

	if rec, err := r.LoadHealth(ctx, old); err != nil || rec != nil {
		t.Fatalf("never checked: %v, %v; want no record and no error", rec, err)
	}
	exit1 := 1
	for i := range MaxHealthResults + 2 {
		res := HealthResult{Result: HealthPassed, Time: t0.Add(time.Duration(i) * time.Minute), AnswerS: float64(i), Boot: "defaults"}
		if i == MaxHealthResults+1 {
			res = HealthResult{Result: HealthFailed, Time: t0.Add(time.Duration(i) * time.Minute), Reason: "script exited 1", ScriptExit: &exit1}
		}
		if _, err := r.AddHealth(ctx, old, res); err != nil {
			t.Fatal(err)
		}
	}
	rec, err := r.LoadHealth(ctx, old)
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.Results) != MaxHealthResults || rec.Results[0].AnswerS != 2 {
		t.Fatalf("kept %d results, first answer_s %v; want %d, the oldest two dropped", len(rec.Results), rec.Results[0].AnswerS, MaxHealthResults)
	}
	if l := rec.Latest(); l.Result != HealthFailed || l.ScriptExit == nil || *l.ScriptExit != 1 {
		t.Fatalf("latest = %+v, want the failed one with script_exit 1", l)
	}
	if p := rec.LastPassed(); p == nil || p.AnswerS != float64(MaxHealthResults) {
		t.Fatalf("last passed = %+v, want answer_s %d", p, MaxHealthResults)
	}
	if _, err := r.AddHealth(ctx, mid, HealthResult{Result: HealthPassed, Time: t0}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.AddHealth(ctx, other, HealthResult{Result: HealthPassed, Time: t0}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.AddHealth(ctx, newest, HealthResult{Result: "fine"}); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("bad result word: %v, want ErrUsage", err)
	}
	var missing ID
	missing[0] = 1
	if _, err := r.AddHealth(ctx, missing, HealthResult{Result: HealthPassed}); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("record for a missing backup: %v, want ErrNotFound", err)
	}

	// A record moved to another backup's name fails authentication.
	blob, err := be.Get(ctx, healthHandle(mid), 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	if err := be.Put(ctx, healthHandle(newest), blob); err != nil {
		t.Fatal(err)
	}
	if _, err := r.LoadHealth(ctx, newest); err == nil {
		t.Fatal("a health record moved to another backup's name opened")
	}
	vr, err := r.Verify(ctx, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(vr.Problems) != 1 || vr.Problems[0].Kind != "health" || vr.Problems[0].ID != newest.String() {
		t.Fatalf("verify problems = %+v, want one damaged health record of %s", vr.Problems, newest.Short())
	}
	// The next check replaces a damaged record.
	if _, err := r.AddHealth(ctx, newest, HealthResult{Result: HealthPassed, Time: t0}); err != nil {
		t.Fatal(err)
	}
	if rec, err := r.LoadHealth(ctx, newest); err != nil || len(rec.Results) != 1 {
		t.Fatalf("replaced record: %+v, %v; want one result", rec, err)
	}

	// prune (keep the newest of vm1) deletes the records of old and mid.
	if _, err := r.Prune(ctx, PruneOptions{VM: "vm1", Policy: retention.Policy{Last: 1}}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []ID{old, mid} {
		if _, err := be.Stat(ctx, healthHandle(id)); !backend.IsNotExist(err) {
			t.Fatalf("health record of pruned backup %s: %v, want it deleted", id.Short(), err)
		}
	}
	// A record left behind (a prune interrupted between its deletions)
	// goes with gc; those of existing backups stay.
	if err := be.Put(ctx, healthHandle(old), blob); err != nil {
		t.Fatal(err)
	}
	gr, err := r.GC(ctx, GCOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if gr.HealthDeleted != 1 {
		t.Fatalf("gc dry run would delete %d health records, want 1", gr.HealthDeleted)
	}
	if _, err := be.Stat(ctx, healthHandle(old)); err != nil {
		t.Fatalf("dry run deleted the record: %v", err)
	}
	if gr, err = r.GC(ctx, GCOptions{}); err != nil || gr.HealthDeleted != 1 {
		t.Fatalf("gc: %+v, %v; want 1 health record deleted", gr, err)
	}
	if _, err := be.Stat(ctx, healthHandle(old)); !backend.IsNotExist(err) {
		t.Fatalf("orphan health record after gc: %v, want it deleted", err)
	}
	for _, id := range []ID{newest, other} {
		if rec, err := r.LoadHealth(ctx, id); err != nil || rec == nil {
			t.Fatalf("gc touched the health record of existing backup %s: %v, %v", id.Short(), rec, err)
		}
	}
	recs, bad, err := r.HealthRecords(ctx)
	if err != nil || len(bad) != 0 || len(recs) != 2 || recs[newest] == nil || recs[other] == nil {
		t.Fatalf("HealthRecords = %v, bad %v, %v; want the records of %s and %s", recs, bad, err, newest.Short(), other.Short())
	}
	// DeleteBackup takes the record with it.
	if err := r.DeleteBackup(ctx, other); err != nil {
		t.Fatal(err)
	}
	if _, err := be.Stat(ctx, healthHandle(other)); !backend.IsNotExist(err) {
		t.Fatalf("health record of deleted backup: %v, want it deleted", err)
	}
}
