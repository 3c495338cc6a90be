package state

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

func open(t *testing.T, dir string) *DB {
	t.Helper()
	d, err := Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

var t0 = time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC)

// TestRunsSurviveAKill: a run and its VMs recorded, the process gone
// without ending them (the database reopened), MarkInterrupted turns them
// interrupted and names the VMs to recover; history, results and logs
// read back.
func TestRunsSurviveAKill(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := open(t, dir)
	done, err := d.StartRun(ctx, "nightly", "backup", "schedule", t0)
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range []string{"web1", "db1"} {
		if err := d.StartVM(ctx, done, vm, t0); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.EndVM(ctx, VMResult{Run: done, VM: "web1", Status: Succeeded, Ended: t0.Add(time.Minute), BackupID: "abc", Mode: "full",
		Consistency: "filesystem", BytesRead: 100, BytesNew: 40, FreezeMS: 12}); err != nil {
		t.Fatal(err)
	}
	if err := d.EndVM(ctx, VMResult{Run: done, VM: "db1", Status: Failed, Ended: t0.Add(2 * time.Minute), Error: "boom"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Log(ctx, done, t0, "info", "web1", "backup abc stored"); err != nil {
		t.Fatal(err)
	}
	if err := d.EndRun(ctx, done, Failed, "1 of 2 VMs failed", t0.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := d.EndRun(ctx, done, Succeeded, "", t0); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("ending an ended run: %v, want ErrNotFound", err)
	}
	live, err := d.StartRun(ctx, "nightly", "backup", "manual", t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	d.StartVM(ctx, live, "web1", t0.Add(time.Hour))
	d.StartVM(ctx, live, "db1", t0.Add(time.Hour))
	d.EndVM(ctx, VMResult{Run: live, VM: "db1", Status: Succeeded, Ended: t0.Add(61 * time.Minute), BackupID: "def", Mode: "incremental"})
	d.Log(ctx, live, t0.Add(time.Hour), "info", "web1", "set created")
	d.Close() // killed: nothing ended

	d = open(t, dir)
	runs, vms, err := d.MarkInterrupted(ctx, t0.Add(2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 1 || runs[0].ID != live || runs[0].Status != Interrupted || len(vms[live]) != 1 || vms[live][0] != "web1" {
		t.Fatalf("MarkInterrupted = %+v, %v; want run %d with web1 to recover", runs, vms, live)
	}
	if again, _, _ := d.MarkInterrupted(ctx, t0.Add(3*time.Hour)); len(again) != 0 {
		t.Fatalf("a second MarkInterrupted found %+v", again)
	}
	r, err := d.GetRun(ctx, live)
	if err != nil || r.Status != Interrupted || !r.Ended.Equal(t0.Add(2*time.Hour)) || r.Trigger != "manual" {
		t.Fatalf("GetRun = %+v, %v", r, err)
	}
	list, err := d.Runs(ctx, RunFilter{Job: "nightly"})
	if err != nil || len(list) != 2 || list[0].ID != live || list[1].Status != Failed || list[1].Error != "1 of 2 VMs failed" {
		t.Fatalf("Runs = %+v, %v", list, err)
	}
	if list, _ := d.Runs(ctx, RunFilter{Before: live}); len(list) != 1 || list[0].ID != done {
		t.Fatalf("Runs before %d = %+v", live, list)
	}
	if list, _ := d.Runs(ctx, RunFilter{Job: "other"}); len(list) != 0 {
		t.Fatalf("Runs of another job = %+v", list)
	}
	got, err := d.VMs(ctx, done)
	if err != nil || len(got) != 2 || got[1].VM != "web1" || got[1].BackupID != "abc" || got[1].FreezeMS != 12 || got[0].Error != "boom" {
		t.Fatalf("VMs = %+v, %v", got, err)
	}
	last, ok, err := d.LastResults(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// web1: last interrupted (run 2), last success abc; db1: last and
	// last success def.
	if last["web1"].Status != Interrupted || ok["web1"].BackupID != "abc" || last["db1"].BackupID != "def" || ok["db1"].BackupID != "def" {
		t.Fatalf("LastResults: last %+v, success %+v", last, ok)
	}
	lines, err := d.LogLines(ctx, live, 0, 0)
	if err != nil || len(lines) != 1 || lines[0].Message != "set created" || lines[0].VM != "web1" {
		t.Fatalf("LogLines = %+v, %v", lines, err)
	}
	if more, _ := d.LogLines(ctx, live, lines[0].ID, 0); len(more) != 0 {
		t.Fatalf("LogLines after the last = %+v", more)
	}
	// Expiry takes a run with its VMs and log.
	if n, err := d.Expire(ctx, t0.Add(90*time.Minute)); err != nil || n != 1 {
		t.Fatalf("Expire = %d, %v; want the first run", n, err)
	}
	if got, _ := d.VMs(ctx, done); len(got) != 0 {
		t.Fatalf("VMs of an expired run = %+v", got)
	}
	if _, err := d.GetRun(ctx, done); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("GetRun of an expired run: %v", err)
	}
}

func TestTokens(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d := open(t, dir)
	secrets := map[string]string{}
	for _, c := range []struct{ name, role string }{{"ci", Operator}, {"grafana", Viewer}, {"ops", Admin}} {
		s, err := d.CreateToken(ctx, c.name, c.role, t0)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(s, "vmsh_") || len(s) != 5+64 {
			t.Fatalf("token %q", s)
		}
		secrets[c.name] = s
	}
	for _, c := range []struct {
		name, role string
	}{{"ci", Viewer}, {"", Viewer}, {"a b", Viewer}, {"x", "root"}} {
		if _, err := d.CreateToken(ctx, c.name, c.role, t0); !errors.Is(err, errs.ErrUsage) {
			t.Errorf("CreateToken(%q, %q): %v, want a usage error", c.name, c.role, err)
		}
	}
	tok, err := d.Authenticate(ctx, secrets["ci"], t0.Add(time.Minute))
	if err != nil || tok.Name != "ci" || tok.Role != Operator {
		t.Fatalf("Authenticate = %+v, %v", tok, err)
	}
	for _, bad := range []string{"", "vmsh_", secrets["ci"] + "0", "Bearer " + secrets["ci"], strings.ToUpper(secrets["ci"])} {
		if _, err := d.Authenticate(ctx, bad, t0); !errors.Is(err, errs.ErrAuth) {
			t.Errorf("Authenticate(%q): %v, want ErrAuth", bad, err)
		}
	}
	if err := d.RevokeToken(ctx, "ci", t0.Add(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := d.RevokeToken(ctx, "ci", t0); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("revoking twice: %v, want ErrNotFound", err)
	}
	if _, err := d.Authenticate(ctx, secrets["ci"], t0); !errors.Is(err, errs.ErrAuth) {
		t.Errorf("a revoked token authenticates: %v", err)
	}
	list, err := d.Tokens(ctx)
	if err != nil || len(list) != 3 || list[0].Name != "ci" || list[0].Revoked.IsZero() || !list[0].LastUsed.Equal(t0.Add(time.Minute)) || !list[1].Revoked.IsZero() {
		t.Fatalf("Tokens = %+v, %v", list, err)
	}
	// The secrets are nowhere in the file, their hashes are.
	d.Close()
	for _, f := range []string{FileName, FileName + "-wal"} {
		b, _ := os.ReadFile(filepath.Join(dir, f))
		for name, s := range secrets {
			if strings.Contains(string(b), s) {
				t.Errorf("%s holds the secret of token %s", f, name)
			}
		}
	}
	st, err := os.Stat(filepath.Join(dir, FileName))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("database file mode %v, %v; want 0600", st.Mode(), err)
	}
}

func TestRoles(t *testing.T) {
	for _, c := range []struct {
		role, need string
		ok         bool
	}{
		{Viewer, Viewer, true}, {Viewer, Operator, false}, {Viewer, Admin, false},
		{Operator, Viewer, true}, {Operator, Operator, true}, {Operator, Admin, false},
		{Admin, Admin, true}, {"", Viewer, false}, {"root", Viewer, false},
	} {
		if got := Allows(c.role, c.need); got != c.ok {
			t.Errorf("Allows(%q, %q) = %v", c.role, c.need, got)
		}
	}
}

// TestOpenRefuses: a database of a newer vmshadow, or a file that is not
// one, is refused with its class, and left as it was.
func TestOpenRefuses(t *testing.T) {
	ctx := context.Background()
	newer := t.TempDir()
	d := open(t, newer)
	if _, err := d.db.Exec("PRAGMA user_version = 99"); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if _, err := Open(ctx, newer); !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), "upgrade") {
		t.Errorf("newer schema: %v, want ErrUnsupported saying to upgrade", err)
	}
	junk := t.TempDir()
	garbage := []byte(strings.Repeat("not a database\n", 400))
	os.WriteFile(filepath.Join(junk, FileName), garbage, 0o600)
	if _, err := Open(ctx, junk); !errors.Is(err, errs.ErrCorrupt) {
		t.Errorf("garbage file: %v, want ErrCorrupt", err)
	}
	if b, _ := os.ReadFile(filepath.Join(junk, FileName)); string(b) != string(garbage) {
		t.Error("the garbage file was changed")
	}
}

// TestConcurrentWriters: jobs write runs and logs while the API reads.
func TestConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	d := open(t, t.TempDir())
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 25 {
				id, err := d.StartRun(ctx, "job", "backup", "schedule", t0)
				if err == nil {
					_, err = d.Log(ctx, id, t0, "info", "", "line")
				}
				if err == nil {
					err = d.EndRun(ctx, id, Succeeded, "", t0.Add(time.Duration(w*100+i)*time.Second))
				}
				if err == nil {
					_, err = d.Runs(ctx, RunFilter{Limit: 10})
				}
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	if list, _ := d.Runs(ctx, RunFilter{Limit: 1000}); len(list) != 100 {
		t.Fatalf("%d runs, want 100", len(list))
	}
}

// TestJobStateAndVerified: the kept enabled choice and last slot of a job
// survive reopening the database; verified backups are found by time.
func TestJobStateAndVerified(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	d, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	off := false
	slot := time.Date(2026, 12, 3, 1, 30, 0, 0, time.UTC)
	if err := d.SetJobEnabled(ctx, "nightly", &off); err != nil {
		t.Fatal(err)
	}
	if err := d.SetLastSlot(ctx, "nightly", slot); err != nil {
		t.Fatal(err)
	}
	if err := d.SetLastSlot(ctx, "weekly", slot.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := d.Verified(ctx, "local", []string{"aa", "bb"}, slot); err != nil {
		t.Fatal(err)
	}
	if err := d.Verified(ctx, "local", []string{"bb"}, slot.Add(48*time.Hour)); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if d, err = Open(ctx, dir); err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	st, err := d.JobStates(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := st["nightly"]; n.Enabled == nil || *n.Enabled || !n.LastSlot.Equal(slot) {
		t.Fatalf("nightly: %+v", n)
	}
	if w := st["weekly"]; w.Enabled != nil || !w.LastSlot.Equal(slot.Add(time.Hour)) {
		t.Fatalf("weekly: %+v", w)
	}
	if err := d.SetJobEnabled(ctx, "nightly", nil); err != nil {
		t.Fatal(err)
	}
	if st, _ = d.JobStates(ctx); st["nightly"].Enabled != nil || !st["nightly"].LastSlot.Equal(slot) {
		t.Fatalf("forgotten choice: %+v", st["nightly"])
	}
	if err := d.PutAPIJob(ctx, "api1", []byte(`{"name":"api1"}`)); err != nil {
		t.Fatal(err)
	}
	if err := d.PutAPIJob(ctx, "api1", []byte(`{"name":"api1","type":"gc"}`)); err != nil {
		t.Fatal(err)
	}
	if jobs, err := d.APIJobs(ctx); err != nil || len(jobs) != 1 || string(jobs["api1"]) != `{"name":"api1","type":"gc"}` {
		t.Fatalf("API jobs: %q %v", jobs, err)
	}
	if err := d.DeleteAPIJob(ctx, "nightly"); err != nil {
		t.Fatal(err)
	}
	if st, _ = d.JobStates(ctx); st["nightly"].Enabled != nil || !st["nightly"].LastSlot.IsZero() {
		t.Fatalf("state of a deleted job kept: %+v", st["nightly"])
	}
	v, err := d.VerifiedSince(ctx, "local", slot.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(v) != 1 || !v["bb"].Equal(slot.Add(48*time.Hour)) {
		t.Fatalf("verified since: %v", v)
	}
}
