package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

func counts(t *testing.T, d *DB) string {
	t.Helper()
	c, err := d.RunCounts(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprint(c)
}

// TestRunCountsOutliveExpire: every way a run ends is counted once (end,
// skip, interrupted by a restart), a run still running is not, and
// Expire deleting the runs leaves the totals.
func TestRunCountsOutliveExpire(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := open(t, dir)
	for i, st := range []string{Succeeded, Succeeded, Failed} {
		id, err := d.StartRun(ctx, "nightly", "backup", "schedule", t0.Add(time.Duration(i)*time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if err := d.EndRun(ctx, id, st, "", t0.Add(time.Duration(i)*time.Hour+time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.SkipRun(ctx, "nightly", "backup", "schedule", "the previous run is still going", t0.Add(4*time.Hour)); err != nil {
		t.Fatal(err)
	}
	v, _ := d.StartRun(ctx, "weekly-verify", "verify", "manual", t0.Add(5*time.Hour))
	d.EndRun(ctx, v, Succeeded, "", t0.Add(6*time.Hour))
	d.EndRun(ctx, v, Failed, "", t0.Add(6*time.Hour)) // refused: not running, not counted
	if _, err := d.StartRun(ctx, "nightly", "backup", "manual", t0.Add(7*time.Hour)); err != nil {
		t.Fatal(err)
	}
	want := "[{nightly backup failed 1} {nightly backup skipped 1} {nightly backup succeeded 2} {weekly-verify verify succeeded 1}]"
	if got := counts(t, d); got != want {
		t.Fatalf("RunCounts = %s\nwant %s", got, want)
	}
	d.Close()
	d = open(t, dir)
	if _, _, err := d.MarkInterrupted(ctx, t0.Add(8*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if n, err := d.Expire(ctx, t0.Add(24*time.Hour)); err != nil || n != 6 {
		t.Fatalf("Expire = %d, %v; want 6 runs", n, err)
	}
	want = "[{nightly backup failed 1} {nightly backup interrupted 1} {nightly backup skipped 1} {nightly backup succeeded 2} {weekly-verify verify succeeded 1}]"
	if got := counts(t, d); got != want {
		t.Fatalf("RunCounts after restart and Expire = %s\nwant %s", got, want)
	}
}

// TestMigrateSeedsRunTotals: a schema-1 database with runs opened by this
// version gets totals counting them.
func TestMigrateSeedsRunTotals(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	raw, err := sql.Open("sqlite", "file:"+filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{migrations[0], "PRAGMA user_version = 1",
		"INSERT INTO runs (job, kind, trigger, status, started, ended) VALUES ('a', 'backup', 'schedule', 'succeeded', 1, 2)",
		"INSERT INTO runs (job, kind, trigger, status, started, ended) VALUES ('a', 'backup', 'schedule', 'succeeded', 3, 4)",
		"INSERT INTO runs (job, kind, trigger, status, started) VALUES ('a', 'backup', 'schedule', 'running', 5)",
		"INSERT INTO runs (job, kind, trigger, status, started, ended) VALUES ('b', 'gc', 'manual', 'failed', 6, 7)"} {
		if _, err := raw.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	raw.Close()
	d := open(t, dir)
	if got, want := counts(t, d), "[{a backup succeeded 2} {b gc failed 1}]"; got != want {
		t.Fatalf("RunCounts after migration = %s, want %s", got, want)
	}
	if _, _, err := d.MarkInterrupted(ctx, t0); err != nil {
		t.Fatal(err)
	}
	if got, want := counts(t, d), "[{a backup interrupted 1} {a backup succeeded 2} {b gc failed 1}]"; got != want {
		t.Fatalf("RunCounts after MarkInterrupted = %s, want %s", got, want)
	}
}

// TestLastResultsByJob: one VM in two jobs has a result in each; the last
// result and the last success differ when the newest run failed.
func TestLastResultsByJob(t *testing.T) {
	ctx := context.Background()
	d := open(t, t.TempDir())
	vmRun := func(job string, at time.Time, status string, read int64) {
		t.Helper()
		id, err := d.StartRun(ctx, job, "backup", "schedule", at)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.StartVM(ctx, id, "web1", at); err != nil {
			t.Fatal(err)
		}
		if err := d.EndVM(ctx, VMResult{Run: id, VM: "web1", Status: status, Ended: at.Add(time.Minute), BytesRead: read, Consistency: "filesystem"}); err != nil {
			t.Fatal(err)
		}
		d.EndRun(ctx, id, status, "", at.Add(time.Minute))
	}
	vmRun("local", t0, Succeeded, 10)
	vmRun("local", t0.Add(time.Hour), Succeeded, 20)
	vmRun("local", t0.Add(2*time.Hour), Failed, 0)
	vmRun("offsite", t0.Add(30*time.Minute), Succeeded, 30)
	// A run still going is no result.
	id, _ := d.StartRun(ctx, "offsite", "backup", "manual", t0.Add(3*time.Hour))
	d.StartVM(ctx, id, "web1", t0.Add(3*time.Hour))

	last, ok, err := d.LastResultsByJob(ctx)
	if err != nil {
		t.Fatal(err)
	}
	show := func(rs []JobVMResult) string {
		s := ""
		for _, r := range rs {
			s += fmt.Sprintf("%s/%s %s %s %d; ", r.Job, r.VM, r.Status, r.Ended.Format("15:04"), r.BytesRead)
		}
		return s
	}
	if got, want := show(last), "local/web1 failed 05:01 0; offsite/web1 succeeded 03:31 30; "; got != want {
		t.Errorf("last = %s\nwant %s", got, want)
	}
	if got, want := show(ok), "local/web1 succeeded 04:01 20; offsite/web1 succeeded 03:31 30; "; got != want {
		t.Errorf("last success = %s\nwant %s", got, want)
	}
}

func TestVerifies(t *testing.T) {
	ctx := context.Background()
	d := open(t, t.TempDir())
	if _, err := d.LastVerify(ctx, "main"); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("LastVerify of a repository never verified: %v, want ErrNotFound", err)
	}
	if err := d.RecordVerify(ctx, Verify{Time: t0}); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("RecordVerify without a repository: %v, want ErrUsage", err)
	}
	for _, v := range []Verify{
		{Repository: "main", Time: t0, Backups: 3, Chunks: 30, Problems: 0},
		{Repository: "main", Time: t0.Add(48 * time.Hour), Run: 7, Backups: 4, Chunks: 41, Problems: 2},
		{Repository: "offsite", Time: t0.Add(time.Hour), Backups: 9, Chunks: 90},
	} {
		if err := d.RecordVerify(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	v, err := d.LastVerify(ctx, "main")
	if err != nil {
		t.Fatal(err)
	}
	if want := (Verify{ID: 2, Repository: "main", Time: t0.Add(48 * time.Hour), Run: 7, Backups: 4, Chunks: 41, Problems: 2}); *v != want {
		t.Errorf("LastVerify = %+v, want %+v", *v, want)
	}
	all, err := d.LastVerifies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(all), fmt.Sprint([]Verify{*v, {ID: 3, Repository: "offsite", Time: t0.Add(time.Hour), Backups: 9, Chunks: 90}}); got != want {
		t.Errorf("LastVerifies = %s\nwant %s", got, want)
	}
	// The history of one repository, newest first, by pages.
	page, err := d.Verifies(ctx, VerifyFilter{Repository: "main", Limit: 1})
	if err != nil || len(page) != 1 || page[0] != *v {
		t.Fatalf("first page of main's verifies: %+v %v", page, err)
	}
	page, err = d.Verifies(ctx, VerifyFilter{Repository: "main", Before: page[0].ID})
	if err != nil || len(page) != 1 || page[0].ID != 1 || page[0].Backups != 3 {
		t.Fatalf("second page of main's verifies: %+v %v", page, err)
	}
}

// TestFindingsAndBackupResults: a run's lines of one level with their
// total; the results that stored given backups.
func TestFindingsAndBackupResults(t *testing.T) {
	ctx := context.Background()
	d := open(t, t.TempDir())
	run, err := d.StartRun(ctx, "check", "verify", "manual", t0)
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range []string{"info", "error", "error", "warning", "error"} {
		if _, err := d.Log(ctx, run, t0, l, "", fmt.Sprintf("line %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	lines, total, err := d.LogLinesAt(ctx, run, "error", 2)
	if err != nil || total != 3 || len(lines) != 2 || lines[0].Message != "line 1" || lines[1].Message != "line 2" {
		t.Fatalf("error lines: %+v total %d %v", lines, total, err)
	}
	b, err := d.StartRun(ctx, "nightly", "backup", "manual", t0)
	if err != nil {
		t.Fatal(err)
	}
	for i, vm := range []string{"web1", "db1"} {
		if err := d.StartVM(ctx, b, vm, t0); err != nil {
			t.Fatal(err)
		}
		if err := d.EndVM(ctx, VMResult{Run: b, VM: vm, Status: Succeeded, Ended: t0.Add(time.Minute), BackupID: fmt.Sprintf("%064d", i+1), FreezeMS: int64(100 * (i + 1))}); err != nil {
			t.Fatal(err)
		}
	}
	res, err := d.BackupResults(ctx, []string{fmt.Sprintf("%064d", 2), fmt.Sprintf("%064d", 9)})
	if err != nil || len(res) != 1 || res[fmt.Sprintf("%064d", 2)].FreezeMS != 200 || res[fmt.Sprintf("%064d", 2)].Run != b {
		t.Fatalf("results of backups 2 and 9: %+v %v", res, err)
	}
	// A VM's results, newest first, by pages.
	if _, err := d.StartRun(ctx, "nightly", "backup", "manual", t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := d.StartVM(ctx, b+1, "db1", t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := d.EndVM(ctx, VMResult{Run: b + 1, VM: "db1", Status: Failed, Ended: t0.Add(2 * time.Hour), Error: "qmp: connection refused"}); err != nil {
		t.Fatal(err)
	}
	hist, err := d.VMResults(ctx, "db1", 0, 1)
	if err != nil || len(hist) != 1 || hist[0].Run != b+1 || hist[0].Status != Failed || hist[0].Error != "qmp: connection refused" {
		t.Fatalf("db1's newest result: %+v %v", hist, err)
	}
	if hist, err = d.VMResults(ctx, "db1", hist[0].Run, 10); err != nil || len(hist) != 1 || hist[0].Run != b || hist[0].FreezeMS != 200 {
		t.Fatalf("db1's older results: %+v %v", hist, err)
	}
	// The runs that backed up a VM, with a status.
	if _, err := d.SkipRun(ctx, "nightly", "backup", "schedule", "still running", t0); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		f    RunFilter
		want string
	}{
		{RunFilter{VM: "db1"}, fmt.Sprint([]int64{b + 1, b})},
		{RunFilter{Status: Skipped}, "[4]"},
		{RunFilter{Status: Running, Job: "check"}, fmt.Sprint([]int64{run})},
		{RunFilter{Status: Running, VM: "web1"}, fmt.Sprint([]int64{b})},
		{RunFilter{VM: "nosuch"}, "[]"},
	} {
		rs, err := d.Runs(ctx, c.f)
		var ids []int64
		for _, r := range rs {
			ids = append(ids, r.ID)
		}
		if err != nil || fmt.Sprint(ids) != c.want {
			t.Errorf("Runs(%+v) = %v %v, want %s", c.f, ids, err, c.want)
		}
	}
}
