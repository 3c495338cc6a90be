// Package state owns the vmshadow server's database: one SQLite file,
// STATE_DIR/server.db (the pure-Go driver modernc.org/sqlite, no cgo),
// holding the history of job runs (each run, each VM's result in it, their
// log lines), the API tokens (stored as SHA-256 hashes, never the
// token itself), and what the metrics read: run totals per job and status
// that outlive Expire, each repository's verify results, and each
// repository's usage over time (stored and logical bytes, bounded: see
// RecordUsage).
//
// The repository stays the source of truth for backups: the database can
// be deleted and the server still lists every backup; only run history
// and tokens are lost. The schema is versioned with SQLite's user_version
// and migrated forward when the file is opened; a file written by a newer
// vmshadow is refused rather than altered.
//
// A server killed mid-run leaves runs and VM results "running": at start
// MarkInterrupted turns them into "interrupted" and returns them, so that
// the server can recover their VMs' snapshot sets.
package state

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// FileName is the database's file in the state directory.
const FileName = "server.db"

// schemaVersion is the newest schema this vmshadow writes.
var schemaVersion = len(migrations)

// migrations[i] moves the schema from version i to i+1.
var migrations = []string{
	`CREATE TABLE runs (
		id INTEGER PRIMARY KEY,
		job TEXT NOT NULL,
		kind TEXT NOT NULL,
		trigger TEXT NOT NULL,
		status TEXT NOT NULL,
		started INTEGER NOT NULL,
		ended INTEGER,
		error TEXT NOT NULL DEFAULT ''
	);
	CREATE INDEX runs_job ON runs (job, id);
	CREATE TABLE run_vms (
		run INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
		vm TEXT NOT NULL,
		status TEXT NOT NULL,
		started INTEGER NOT NULL,
		ended INTEGER,
		backup_id TEXT NOT NULL DEFAULT '',
		mode TEXT NOT NULL DEFAULT '',
		consistency TEXT NOT NULL DEFAULT '',
		bytes_read INTEGER NOT NULL DEFAULT 0,
		bytes_new INTEGER NOT NULL DEFAULT 0,
		freeze_ms INTEGER NOT NULL DEFAULT 0,
		error TEXT NOT NULL DEFAULT '',
		PRIMARY KEY (run, vm)
	);
	CREATE INDEX run_vms_vm ON run_vms (vm, status, ended);
	CREATE TABLE log (
		id INTEGER PRIMARY KEY,
		run INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
		time INTEGER NOT NULL,
		level TEXT NOT NULL,
		vm TEXT NOT NULL DEFAULT '',
		message TEXT NOT NULL
	);
	CREATE INDEX log_run ON log (run, id);
	CREATE TABLE tokens (
		name TEXT PRIMARY KEY,
		role TEXT NOT NULL,
		hash TEXT NOT NULL UNIQUE,
		created INTEGER NOT NULL,
		last_used INTEGER,
		revoked INTEGER
	);`,
	// 1 -> 2: jobs' state across restarts; backups' last verification.
	`CREATE TABLE job_state (
		name TEXT PRIMARY KEY,
		enabled INTEGER,
		last_slot INTEGER
	);
	CREATE TABLE api_jobs (
		name TEXT PRIMARY KEY,
		spec TEXT NOT NULL
	);
	CREATE TABLE verified (
		repository TEXT NOT NULL,
		backup TEXT NOT NULL,
		time INTEGER NOT NULL,
		PRIMARY KEY (repository, backup)
	);`,
	// 2 -> 3: run totals that outlive Expire (the metrics' run counters,
	// kept by triggers, seeded from the runs already recorded), and the
	// results of verify runs (metrics.go).
	`CREATE TABLE run_totals (
		job TEXT NOT NULL,
		kind TEXT NOT NULL,
		status TEXT NOT NULL,
		count INTEGER NOT NULL,
		PRIMARY KEY (job, kind, status)
	);
	INSERT INTO run_totals (job, kind, status, count)
		SELECT job, kind, status, count(*) FROM runs WHERE status != 'running' GROUP BY job, kind, status;
	CREATE TRIGGER run_totals_insert AFTER INSERT ON runs WHEN new.status != 'running' BEGIN
		INSERT INTO run_totals (job, kind, status, count) VALUES (new.job, new.kind, new.status, 1)
			ON CONFLICT (job, kind, status) DO UPDATE SET count = count + 1;
	END;
	CREATE TRIGGER run_totals_end AFTER UPDATE OF status ON runs WHEN old.status = 'running' AND new.status != 'running' BEGIN
		INSERT INTO run_totals (job, kind, status, count) VALUES (new.job, new.kind, new.status, 1)
			ON CONFLICT (job, kind, status) DO UPDATE SET count = count + 1;
	END;
	CREATE TABLE verifies (
		id INTEGER PRIMARY KEY,
		repository TEXT NOT NULL,
		time INTEGER NOT NULL,
		run INTEGER,
		backups INTEGER NOT NULL,
		chunks INTEGER NOT NULL,
		problems INTEGER NOT NULL
	);
	CREATE INDEX verifies_repository ON verifies (repository, time);`,
	// 3 -> 4: each repository's usage over time (usage.go); backups'
	// results by backup ID (history.go).
	`CREATE TABLE repo_usage (
		repository TEXT NOT NULL,
		time INTEGER NOT NULL,
		stored INTEGER NOT NULL,
		logical INTEGER NOT NULL,
		backups INTEGER NOT NULL,
		PRIMARY KEY (repository, time)
	);
	CREATE INDEX run_vms_backup ON run_vms (backup_id);
	CREATE INDEX run_vms_history ON run_vms (vm, run);`,
}

// DB is the server's open database. It is safe for concurrent use.
type DB struct {
	db *sql.DB
}

// Open opens (creating it, 0600, in a 0700 directory) the database in
// dir and migrates its schema.
func Open(ctx context.Context, dir string) (*DB, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	}
	path := filepath.Join(dir, FileName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	f.Close()
	// WAL lets the API read while a job writes; busy_timeout makes a
	// writer wait for another instead of failing; foreign keys cascade
	// the deletion of old runs to their VMs and log.
	dsn := "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)"
	sdb, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	d := &DB{db: sdb}
	if err := d.migrate(ctx, path); err != nil {
		sdb.Close()
		return nil, err
	}
	return d, nil
}

func (d *DB) migrate(ctx context.Context, path string) error {
	var v int
	if err := d.db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return fmt.Errorf("%s is not a vmshadow server database (%v): move it away and start again: %w", path, err, errs.ErrCorrupt)
	}
	if v > schemaVersion {
		return fmt.Errorf("%s has schema version %d, newer than this vmshadow knows (%d): upgrade vmshadow: %w", path, v, schemaVersion, errs.ErrUnsupported)
	}
	for ; v < schemaVersion; v++ {
		tx, err := d.db.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("migrate %s: %w", path, err)
		}
		if _, err := tx.ExecContext(ctx, migrations[v]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate %s to schema version %d: %w", path, v+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", v+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migrate %s: %w", path, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migrate %s: %w", path, err)
		}
	}
	return nil
}

// Close closes the database.
func (d *DB) Close() error { return d.db.Close() }

// Statuses of runs and of VMs in a run.
const (
	Running     = "running"
	Succeeded   = "succeeded"
	Failed      = "failed"
	Cancelled   = "cancelled"
	Interrupted = "interrupted" // the server stopped during the run
	Skipped     = "skipped"     // the previous run was still going
)

func unix(t time.Time) int64 { return t.UnixMilli() }

func fromUnix(ms sql.NullInt64) time.Time {
	if !ms.Valid {
		return time.Time{}
	}
	return time.UnixMilli(ms.Int64).UTC()
}

// Run is one run of a job.
type Run struct {
	ID      int64     `json:"id"`
	Job     string    `json:"job"`
	Kind    string    `json:"kind"`    // the job's type: backup, verify, prune, gc, copy
	Trigger string    `json:"trigger"` // schedule, manual, catch-up
	Status  string    `json:"status"`
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended,omitzero"`
	Error   string    `json:"error,omitempty"`
}

// StartRun records a run of job that starts at at and returns its ID.
func (d *DB) StartRun(ctx context.Context, job, kind, trigger string, at time.Time) (int64, error) {
	res, err := d.db.ExecContext(ctx, "INSERT INTO runs (job, kind, trigger, status, started) VALUES (?, ?, ?, ?, ?)",
		job, kind, trigger, Running, unix(at))
	if err != nil {
		return 0, fmt.Errorf("record the start of a run of job %s: %w", job, err)
	}
	return res.LastInsertId()
}

// SkipRun records a run of job that did not take place (status
// Skipped) with the reason.
func (d *DB) SkipRun(ctx context.Context, job, kind, trigger, reason string, at time.Time) (int64, error) {
	res, err := d.db.ExecContext(ctx, "INSERT INTO runs (job, kind, trigger, status, started, ended, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
		job, kind, trigger, Skipped, unix(at), unix(at), reason)
	if err != nil {
		return 0, fmt.Errorf("record a skipped run of job %s: %w", job, err)
	}
	return res.LastInsertId()
}

// EndRun records the end of a running run. Ending a run that is not
// running (already ended, or marked interrupted) is errs.ErrNotFound.
func (d *DB) EndRun(ctx context.Context, id int64, status, errMsg string, at time.Time) error {
	res, err := d.db.ExecContext(ctx, "UPDATE runs SET status = ?, ended = ?, error = ? WHERE id = ? AND status = ?",
		status, unix(at), errMsg, id, Running)
	if err != nil {
		return fmt.Errorf("record the end of run %d: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("run %d is not running: %w", id, errs.ErrNotFound)
	}
	return nil
}

const runColumns = "id, job, kind, trigger, status, started, ended, error"

func scanRun(s interface{ Scan(...any) error }) (Run, error) {
	var r Run
	var started, ended sql.NullInt64
	err := s.Scan(&r.ID, &r.Job, &r.Kind, &r.Trigger, &r.Status, &started, &ended, &r.Error)
	r.Started, r.Ended = fromUnix(started), fromUnix(ended)
	return r, err
}

// GetRun returns run id, or errs.ErrNotFound.
func (d *DB) GetRun(ctx context.Context, id int64) (*Run, error) {
	r, err := scanRun(d.db.QueryRowContext(ctx, "SELECT "+runColumns+" FROM runs WHERE id = ?", id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("no run %d: %w", id, errs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read run %d: %w", id, err)
	}
	return &r, nil
}

// RunFilter selects runs: of one job (or all), with one status (or any),
// that backed up one VM (or any), with an ID below Before (0: any), at
// most Limit (default 100), newest first.
type RunFilter struct {
	Job    string
	Status string
	VM     string
	Before int64
	Limit  int
}

// Runs lists runs, newest first.
func (d *DB) Runs(ctx context.Context, f RunFilter) ([]Run, error) {
	if f.Limit <= 0 {
		f.Limit = 100
	}
	q := "SELECT " + runColumns + " FROM runs WHERE 1=1"
	var args []any
	if f.Job != "" {
		q += " AND job = ?"
		args = append(args, f.Job)
	}
	if f.Status != "" {
		q += " AND status = ?"
		args = append(args, f.Status)
	}
	if f.VM != "" {
		q += " AND id IN (SELECT run FROM run_vms WHERE vm = ?)"
		args = append(args, f.VM)
	}
	if f.Before > 0 {
		q += " AND id < ?"
		args = append(args, f.Before)
	}
	q += " ORDER BY id DESC LIMIT ?"
	args = append(args, f.Limit)
	rows, err := d.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list runs: %w", err)
	}
	defer rows.Close()
	out := []Run{}
	for rows.Next() {
		r, err := scanRun(rows)
		if err != nil {
			return nil, fmt.Errorf("list runs: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// MarkInterrupted turns every run and VM result still running (the server
// stopped during them) into Interrupted, ended at at, and returns those
// runs with their VMs, for the server to recover the VMs' snapshot sets.
func (d *DB) MarkInterrupted(ctx context.Context, at time.Time) ([]Run, map[int64][]string, error) {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, nil, err
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, "SELECT "+runColumns+" FROM runs WHERE status = ? ORDER BY id", Running)
	if err != nil {
		return nil, nil, fmt.Errorf("find interrupted runs: %w", err)
	}
	var runs []Run
	for rows.Next() {
		r, err := scanRun(rows)
		if err != nil {
			rows.Close()
			return nil, nil, err
		}
		r.Status, r.Ended, r.Error = Interrupted, at.UTC().Truncate(time.Millisecond), "the server stopped during the run"
		runs = append(runs, r)
	}
	rows.Close()
	vms := map[int64][]string{}
	for _, r := range runs {
		vr, err := tx.QueryContext(ctx, "SELECT vm FROM run_vms WHERE run = ? AND status = ? ORDER BY vm", r.ID, Running)
		if err != nil {
			return nil, nil, err
		}
		for vr.Next() {
			var vm string
			if err := vr.Scan(&vm); err != nil {
				vr.Close()
				return nil, nil, err
			}
			vms[r.ID] = append(vms[r.ID], vm)
		}
		vr.Close()
	}
	msg := "the server stopped during the run"
	if _, err := tx.ExecContext(ctx, "UPDATE run_vms SET status = ?, ended = ?, error = ? WHERE status = ?", Interrupted, unix(at), msg, Running); err != nil {
		return nil, nil, err
	}
	if _, err := tx.ExecContext(ctx, "UPDATE runs SET status = ?, ended = ?, error = ? WHERE status = ?", Interrupted, unix(at), msg, Running); err != nil {
		return nil, nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, nil, fmt.Errorf("mark interrupted runs: %w", err)
	}
	return runs, vms, nil
}

// VMResult is one VM's part of a run.
type VMResult struct {
	Run         int64     `json:"run"`
	VM          string    `json:"vm"`
	Status      string    `json:"status"`
	Started     time.Time `json:"started"`
	Ended       time.Time `json:"ended,omitzero"`
	BackupID    string    `json:"backup_id,omitempty"`
	Mode        string    `json:"mode,omitempty"`
	Consistency string    `json:"consistency,omitempty"`
	BytesRead   int64     `json:"bytes_read"`
	BytesNew    int64     `json:"bytes_new"`
	FreezeMS    int64     `json:"freeze_ms"`
	Error       string    `json:"error,omitempty"`
}

// StartVM records that run starts on vm.
func (d *DB) StartVM(ctx context.Context, run int64, vm string, at time.Time) error {
	if _, err := d.db.ExecContext(ctx, "INSERT INTO run_vms (run, vm, status, started) VALUES (?, ?, ?, ?)", run, vm, Running, unix(at)); err != nil {
		return fmt.Errorf("record the start of %s in run %d: %w", vm, run, err)
	}
	return nil
}

// EndVM records a VM's result (r.Run, r.VM name it; r.Ended is its end).
func (d *DB) EndVM(ctx context.Context, r VMResult) error {
	res, err := d.db.ExecContext(ctx, `UPDATE run_vms SET status = ?, ended = ?, backup_id = ?, mode = ?, consistency = ?,
		bytes_read = ?, bytes_new = ?, freeze_ms = ?, error = ? WHERE run = ? AND vm = ? AND status = ?`,
		r.Status, unix(r.Ended), r.BackupID, r.Mode, r.Consistency, r.BytesRead, r.BytesNew, r.FreezeMS, r.Error, r.Run, r.VM, Running)
	if err != nil {
		return fmt.Errorf("record the result of %s in run %d: %w", r.VM, r.Run, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("%s is not running in run %d: %w", r.VM, r.Run, errs.ErrNotFound)
	}
	return nil
}

const vmColumns = "run, vm, status, started, ended, backup_id, mode, consistency, bytes_read, bytes_new, freeze_ms, error"

func scanVM(s interface{ Scan(...any) error }) (VMResult, error) {
	var r VMResult
	var started, ended sql.NullInt64
	err := s.Scan(&r.Run, &r.VM, &r.Status, &started, &ended, &r.BackupID, &r.Mode, &r.Consistency, &r.BytesRead, &r.BytesNew, &r.FreezeMS, &r.Error)
	r.Started, r.Ended = fromUnix(started), fromUnix(ended)
	return r, err
}

func (d *DB) queryVMs(ctx context.Context, q string, args ...any) ([]VMResult, error) {
	rows, err := d.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []VMResult{}
	for rows.Next() {
		r, err := scanVM(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// VMs returns the VM results of a run, by VM name.
func (d *DB) VMs(ctx context.Context, run int64) ([]VMResult, error) {
	out, err := d.queryVMs(ctx, "SELECT "+vmColumns+" FROM run_vms WHERE run = ? ORDER BY vm", run)
	if err != nil {
		return nil, fmt.Errorf("read the VMs of run %d: %w", run, err)
	}
	return out, nil
}

// LastResults returns, per VM, its latest finished result and its latest
// successful one (what the VM list and the metrics show).
func (d *DB) LastResults(ctx context.Context) (last, lastSuccess map[string]VMResult, err error) {
	last, lastSuccess = map[string]VMResult{}, map[string]VMResult{}
	for _, q := range []struct {
		m     map[string]VMResult
		where string
		args  []any
	}{{last, "status NOT IN (?, ?)", []any{Running, Skipped}}, {lastSuccess, "status = ?", []any{Succeeded}}} {
		// The row of the greatest end time per VM (SQLite's bare-column
		// rule for max()).
		rows, err := d.queryVMs(ctx, "SELECT run, vm, status, started, max(ended), backup_id, mode, consistency, bytes_read, bytes_new, freeze_ms, error FROM run_vms WHERE "+q.where+" GROUP BY vm", q.args...)
		if err != nil {
			return nil, nil, fmt.Errorf("read the VMs' last results: %w", err)
		}
		for _, r := range rows {
			q.m[r.VM] = r
		}
	}
	return last, lastSuccess, nil
}

// LogLine is one line of a run's log.
type LogLine struct {
	ID      int64     `json:"id"`
	Time    time.Time `json:"time"`
	Level   string    `json:"level"` // info, warning, error
	VM      string    `json:"vm,omitempty"`
	Message string    `json:"message"`
}

// Log appends a line to run's log and returns its ID.
func (d *DB) Log(ctx context.Context, run int64, at time.Time, level, vm, msg string) (int64, error) {
	res, err := d.db.ExecContext(ctx, "INSERT INTO log (run, time, level, vm, message) VALUES (?, ?, ?, ?, ?)", run, unix(at), level, vm, msg)
	if err != nil {
		return 0, fmt.Errorf("log of run %d: %w", run, err)
	}
	return res.LastInsertId()
}

// LogLines returns run's log lines after line ID after (0: from the
// start), at most limit (default 1000), oldest first.
func (d *DB) LogLines(ctx context.Context, run, after int64, limit int) ([]LogLine, error) {
	if limit <= 0 {
		limit = 1000
	}
	rows, err := d.db.QueryContext(ctx, "SELECT id, time, level, vm, message FROM log WHERE run = ? AND id > ? ORDER BY id LIMIT ?", run, after, limit)
	if err != nil {
		return nil, fmt.Errorf("read the log of run %d: %w", run, err)
	}
	defer rows.Close()
	out := []LogLine{}
	for rows.Next() {
		var l LogLine
		var t sql.NullInt64
		if err := rows.Scan(&l.ID, &t, &l.Level, &l.VM, &l.Message); err != nil {
			return nil, err
		}
		l.Time = fromUnix(t)
		out = append(out, l)
	}
	return out, rows.Err()
}

// Expire deletes the runs that ended before cutoff, with their VM results
// and log lines, and returns how many runs went.
func (d *DB) Expire(ctx context.Context, cutoff time.Time) (int64, error) {
	res, err := d.db.ExecContext(ctx, "DELETE FROM runs WHERE ended IS NOT NULL AND ended < ?", unix(cutoff))
	if err != nil {
		return 0, fmt.Errorf("expire old runs: %w", err)
	}
	return res.RowsAffected()
}

// Roles of API tokens, from least to most allowed: viewers read; operators
// also run jobs, cancel runs and restore; admins also edit jobs and delete
// backups.
const (
	Viewer   = "viewer"
	Operator = "operator"
	Admin    = "admin"
)

var roleRank = map[string]int{Viewer: 1, Operator: 2, Admin: 3}

// Allows reports whether role may do what needs role need.
func Allows(role, need string) bool {
	return roleRank[role] > 0 && roleRank[role] >= roleRank[need]
}

// Token is an API token as stored: never the secret, which is shown once
// at creation.
type Token struct {
	Name     string    `json:"name"`
	Role     string    `json:"role"`
	Created  time.Time `json:"created"`
	LastUsed time.Time `json:"last_used,omitzero"`
	Revoked  time.Time `json:"revoked,omitzero"`
}

// tokenPrefix starts every token, so that one found in a file or a log
// is recognisable (and secret scanners can match it).
const tokenPrefix = "vmsh_"

func hashToken(secret string) string {
	h := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(h[:])
}

// CreateToken makes a token for name with role and returns its secret,
// the only time it is seen. A name already used (even revoked) is
// errs.ErrUsage.
func (d *DB) CreateToken(ctx context.Context, name, role string, at time.Time) (string, error) {
	if roleRank[role] == 0 {
		return "", fmt.Errorf("unknown role %q: use admin, operator or viewer: %w", role, errs.ErrUsage)
	}
	if name == "" || len(name) > 64 || strings.ContainsFunc(name, func(r rune) bool { return r < 0x21 || r > 0x7e }) {
		return "", fmt.Errorf("invalid token name %q: use 1-64 printable ASCII characters without spaces: %w", name, errs.ErrUsage)
	}
	var b [32]byte
	rand.Read(b[:])
	secret := tokenPrefix + hex.EncodeToString(b[:])
	_, err := d.db.ExecContext(ctx, "INSERT INTO tokens (name, role, hash, created) VALUES (?, ?, ?, ?)", name, role, hashToken(secret), unix(at))
	if err != nil {
		if strings.Contains(err.Error(), "UNIQUE") {
			return "", fmt.Errorf("a token named %q exists: choose another name (revoked names stay taken, so logs stay unambiguous): %w", name, errs.ErrUsage)
		}
		return "", fmt.Errorf("store token %s: %w", name, err)
	}
	return secret, nil
}

// Tokens lists every token, revoked ones included, by name.
func (d *DB) Tokens(ctx context.Context) ([]Token, error) {
	rows, err := d.db.QueryContext(ctx, "SELECT name, role, created, last_used, revoked FROM tokens ORDER BY name")
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	defer rows.Close()
	out := []Token{}
	for rows.Next() {
		var t Token
		var c, u, r sql.NullInt64
		if err := rows.Scan(&t.Name, &t.Role, &c, &u, &r); err != nil {
			return nil, err
		}
		t.Created, t.LastUsed, t.Revoked = fromUnix(c), fromUnix(u), fromUnix(r)
		out = append(out, t)
	}
	return out, rows.Err()
}

// RevokeToken revokes the token name: it authenticates no more. An
// unknown or already revoked name is errs.ErrNotFound.
func (d *DB) RevokeToken(ctx context.Context, name string, at time.Time) error {
	res, err := d.db.ExecContext(ctx, "UPDATE tokens SET revoked = ? WHERE name = ? AND revoked IS NULL", unix(at), name)
	if err != nil {
		return fmt.Errorf("revoke token %s: %w", name, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("no active token named %q (see 'vmshadow server token list'): %w", name, errs.ErrNotFound)
	}
	return nil
}

// Authenticate returns the active token whose secret this is, and records
// its use; an unknown or revoked secret is errs.ErrAuth. The lookup is by
// the secret's SHA-256 hash, so the time it takes tells nothing about
// the secret.
func (d *DB) Authenticate(ctx context.Context, secret string, at time.Time) (*Token, error) {
	if !strings.HasPrefix(secret, tokenPrefix) {
		return nil, fmt.Errorf("not a vmshadow API token: %w", errs.ErrAuth)
	}
	h := hashToken(secret)
	var t Token
	var c sql.NullInt64
	err := d.db.QueryRowContext(ctx, "SELECT name, role, created FROM tokens WHERE hash = ? AND revoked IS NULL", h).Scan(&t.Name, &t.Role, &c)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("unknown or revoked API token: %w", errs.ErrAuth)
	}
	if err != nil {
		return nil, fmt.Errorf("check API token: %w", err)
	}
	t.Created, t.LastUsed = fromUnix(c), at.UTC().Truncate(time.Millisecond)
	if _, err := d.db.ExecContext(ctx, "UPDATE tokens SET last_used = ? WHERE hash = ?", unix(at), h); err != nil {
		return nil, fmt.Errorf("record API token use: %w", err)
	}
	return &t, nil
}
