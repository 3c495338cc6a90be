package state

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
)

// What the web interface's pages read beyond the runs: a repository's
// verify history with its findings, the run results of given backups.

// VerifyFilter selects a repository's verifies: with an ID below Before
// (0: any), at most Limit (default 100), newest first.
type VerifyFilter struct {
	Repository string
	Before     int64
	Limit      int
}

// Verifies lists a repository's verifies, newest first.
func (d *DB) Verifies(ctx context.Context, f VerifyFilter) ([]Verify, error) {
	if f.Limit <= 0 {
		f.Limit = 100
	}
	q := "SELECT " + verifyColumns + " FROM verifies WHERE repository = ?"
	args := []any{f.Repository}
	if f.Before > 0 {
		q += " AND id < ?"
		args = append(args, f.Before)
	}
	rows, err := d.db.QueryContext(ctx, q+" ORDER BY id DESC LIMIT ?", append(args, f.Limit)...)
	if err != nil {
		return nil, fmt.Errorf("list the verifies of repository %s: %w", f.Repository, err)
	}
	defer rows.Close()
	out := []Verify{}
	for rows.Next() {
		v, err := scanVerify(rows)
		if err != nil {
			return nil, fmt.Errorf("list the verifies of repository %s: %w", f.Repository, err)
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// LogLinesAt returns run's log lines of one level (a verify's findings
// are its error lines), oldest first, at most limit, and how many there
// are in all.
func (d *DB) LogLinesAt(ctx context.Context, run int64, level string, limit int) ([]LogLine, int, error) {
	var total int
	if err := d.db.QueryRowContext(ctx, "SELECT count(*) FROM log WHERE run = ? AND level = ?", run, level).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("read the log of run %d: %w", run, err)
	}
	rows, err := d.db.QueryContext(ctx, "SELECT id, time, level, vm, message FROM log WHERE run = ? AND level = ? ORDER BY id LIMIT ?", run, level, limit)
	if err != nil {
		return nil, 0, fmt.Errorf("read the log of run %d: %w", run, err)
	}
	defer rows.Close()
	out := []LogLine{}
	for rows.Next() {
		var l LogLine
		var t sql.NullInt64
		if err := rows.Scan(&l.ID, &t, &l.Level, &l.VM, &l.Message); err != nil {
			return nil, 0, fmt.Errorf("read the log of run %d: %w", run, err)
		}
		l.Time = fromUnix(t)
		out = append(out, l)
	}
	return out, total, rows.Err()
}

// BackupResults returns the run result that stored each of the backups
// ids (full IDs), by backup ID; a backup no run of this server stored
// (the CLI's, a copy's) is absent.
func (d *DB) BackupResults(ctx context.Context, ids []string) (map[string]VMResult, error) {
	out := map[string]VMResult{}
	for len(ids) > 0 {
		n := min(len(ids), 500)
		part := ids[:n]
		ids = ids[n:]
		args := make([]any, len(part))
		for i, id := range part {
			args[i] = id
		}
		rs, err := d.queryVMs(ctx, "SELECT "+vmColumns+" FROM run_vms WHERE backup_id IN (?"+strings.Repeat(", ?", len(part)-1)+")", args...)
		if err != nil {
			return nil, fmt.Errorf("read the results of backups: %w", err)
		}
		for _, r := range rs {
			out[r.BackupID] = r
		}
	}
	return out, nil
}

// VMResults returns vm's results in runs with an ID below before (0:
// any), newest first, at most limit (default 100): its history, failed
// and cancelled tries included.
func (d *DB) VMResults(ctx context.Context, vm string, before int64, limit int) ([]VMResult, error) {
	if limit <= 0 {
		limit = 100
	}
	q := "SELECT " + vmColumns + " FROM run_vms WHERE vm = ?"
	args := []any{vm}
	if before > 0 {
		q += " AND run < ?"
		args = append(args, before)
	}
	out, err := d.queryVMs(ctx, q+" ORDER BY run DESC LIMIT ?", append(args, limit)...)
	if err != nil {
		return nil, fmt.Errorf("read the results of VM %s: %w", vm, err)
	}
	return out, nil
}
