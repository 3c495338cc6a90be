package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// What the metrics (package internal/server/metrics) and the repository
// status read.

// RunCount is how many runs of a job ended with a status.
type RunCount struct {
	Job    string `json:"job"`
	Kind   string `json:"kind"`
	Status string `json:"status"`
	Count  int64  `json:"count"`
}

// RunCounts returns, per job, kind and status, how many runs ended (or
// were skipped) since the database was created: totals kept by triggers
// as runs end, which Expire does not lower, so that they are counters.
// Runs still running are not counted. Ordered by job, kind, status.
func (d *DB) RunCounts(ctx context.Context) ([]RunCount, error) {
	rows, err := d.db.QueryContext(ctx, "SELECT job, kind, status, count FROM run_totals ORDER BY job, kind, status")
	if err != nil {
		return nil, fmt.Errorf("count runs: %w", err)
	}
	defer rows.Close()
	out := []RunCount{}
	for rows.Next() {
		var c RunCount
		if err := rows.Scan(&c.Job, &c.Kind, &c.Status, &c.Count); err != nil {
			return nil, fmt.Errorf("count runs: %w", err)
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// JobVMResult is a VM's result with the job of its run.
type JobVMResult struct {
	Job string `json:"job"`
	VMResult
}

// LastResultsByJob is LastResults per job and VM: for each VM of each job,
// its latest finished result (not running, not skipped) and its latest
// successful one, ordered by job and VM. A VM that two jobs back up (to two
// repositories, say) has a result in each.
func (d *DB) LastResultsByJob(ctx context.Context) (last, lastSuccess []JobVMResult, err error) {
	for _, q := range []struct {
		out   *[]JobVMResult
		where string
		args  []any
	}{{&last, "v.status NOT IN (?, ?)", []any{Running, Skipped}}, {&lastSuccess, "v.status = ?", []any{Succeeded}}} {
		// The row of the greatest end time per job and VM (SQLite's
		// bare-column rule for max()).
		rows, err := d.db.QueryContext(ctx, `SELECT r.job, v.run, v.vm, v.status, v.started, max(v.ended), v.backup_id, v.mode, v.consistency,
			v.bytes_read, v.bytes_new, v.freeze_ms, v.error FROM run_vms v JOIN runs r ON r.id = v.run
			WHERE `+q.where+` GROUP BY r.job, v.vm ORDER BY r.job, v.vm`, q.args...)
		if err != nil {
			return nil, nil, fmt.Errorf("read the VMs' last results by job: %w", err)
		}
		*q.out = []JobVMResult{}
		for rows.Next() {
			var r JobVMResult
			var started, ended sql.NullInt64
			if err := rows.Scan(&r.Job, &r.Run, &r.VM, &r.Status, &started, &ended, &r.BackupID, &r.Mode, &r.Consistency,
				&r.BytesRead, &r.BytesNew, &r.FreezeMS, &r.Error); err != nil {
				rows.Close()
				return nil, nil, fmt.Errorf("read the VMs' last results by job: %w", err)
			}
			r.Started, r.Ended = fromUnix(started), fromUnix(ended)
			*q.out = append(*q.out, r)
		}
		err = rows.Err()
		rows.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("read the VMs' last results by job: %w", err)
		}
	}
	return last, lastSuccess, nil
}

// Verify is the result of one verify of a repository.
type Verify struct {
	ID         int64     `json:"id,omitempty"` // its record's ID (set when read)
	Repository string    `json:"repository"`   // the repository's name in the server's configuration
	Time       time.Time `json:"time"`         // when the verify ended
	Run        int64     `json:"run,omitempty"`
	Backups    int64     `json:"backups"`  // backups checked
	Chunks     int64     `json:"chunks"`   // chunks checked
	Problems   int64     `json:"problems"` // damaged or missing blobs found
}

// RecordVerify records a verify's result (v.Run may be 0: a verify that
// was not a job's run).
func (d *DB) RecordVerify(ctx context.Context, v Verify) error {
	if v.Repository == "" {
		return fmt.Errorf("record a verify: no repository named: %w", errs.ErrUsage)
	}
	var run sql.NullInt64
	if v.Run != 0 {
		run = sql.NullInt64{Int64: v.Run, Valid: true}
	}
	if _, err := d.db.ExecContext(ctx, "INSERT INTO verifies (repository, time, run, backups, chunks, problems) VALUES (?, ?, ?, ?, ?, ?)",
		v.Repository, unix(v.Time), run, v.Backups, v.Chunks, v.Problems); err != nil {
		return fmt.Errorf("record the verify of repository %s: %w", v.Repository, err)
	}
	return nil
}

const verifyColumns = "id, repository, time, run, backups, chunks, problems"

func scanVerify(s interface{ Scan(...any) error }) (Verify, error) {
	var v Verify
	var t, run sql.NullInt64
	err := s.Scan(&v.ID, &v.Repository, &t, &run, &v.Backups, &v.Chunks, &v.Problems)
	v.Time, v.Run = fromUnix(t), run.Int64
	return v, err
}

// LastVerify returns the latest verify of repository, or errs.ErrNotFound
// when it was never verified.
func (d *DB) LastVerify(ctx context.Context, repository string) (*Verify, error) {
	v, err := scanVerify(d.db.QueryRowContext(ctx, "SELECT "+verifyColumns+" FROM verifies WHERE repository = ? ORDER BY time DESC, id DESC LIMIT 1", repository))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("repository %s was never verified: %w", repository, errs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read the last verify of repository %s: %w", repository, err)
	}
	return &v, nil
}

// LastVerifies returns the latest verify of every repository ever
// verified, by repository name.
func (d *DB) LastVerifies(ctx context.Context) ([]Verify, error) {
	rows, err := d.db.QueryContext(ctx, `SELECT id, repository, max(time), run, backups, chunks, problems FROM verifies
		GROUP BY repository ORDER BY repository`)
	if err != nil {
		return nil, fmt.Errorf("read the last verifies: %w", err)
	}
	defer rows.Close()
	out := []Verify{}
	for rows.Next() {
		v, err := scanVerify(rows)
		if err != nil {
			return nil, fmt.Errorf("read the last verifies: %w", err)
		}
		out = append(out, v)
	}
	return out, rows.Err()
}
