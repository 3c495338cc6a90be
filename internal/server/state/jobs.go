package state

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// JobState is what the server keeps of a job across restarts: an
// enabled/disabled choice made through the API (nil: the configuration
// decides) and the scheduled time of its last scheduled run (for
// catch-up).
type JobState struct {
	Enabled  *bool
	LastSlot time.Time
}

// JobStates returns every job's kept state, by name.
func (d *DB) JobStates(ctx context.Context) (map[string]JobState, error) {
	rows, err := d.db.QueryContext(ctx, "SELECT name, enabled, last_slot FROM job_state")
	if err != nil {
		return nil, fmt.Errorf("read jobs' state: %w", err)
	}
	defer rows.Close()
	out := map[string]JobState{}
	for rows.Next() {
		var name string
		var en, slot sql.NullInt64
		if err := rows.Scan(&name, &en, &slot); err != nil {
			return nil, fmt.Errorf("read jobs' state: %w", err)
		}
		var st JobState
		if en.Valid {
			b := en.Int64 != 0
			st.Enabled = &b
		}
		st.LastSlot = fromUnix(slot)
		out[name] = st
	}
	return out, rows.Err()
}

// SetJobEnabled keeps an enabled/disabled choice for job (nil forgets it).
func (d *DB) SetJobEnabled(ctx context.Context, job string, enabled *bool) error {
	var v sql.NullInt64
	if enabled != nil {
		v = sql.NullInt64{Valid: true}
		if *enabled {
			v.Int64 = 1
		}
	}
	_, err := d.db.ExecContext(ctx, `INSERT INTO job_state (name, enabled) VALUES (?, ?)
		ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled`, job, v)
	if err != nil {
		return fmt.Errorf("keep job %s enabled=%v: %w", job, enabled, err)
	}
	return nil
}

// SetLastSlot records the scheduled time of job's latest scheduled run.
func (d *DB) SetLastSlot(ctx context.Context, job string, slot time.Time) error {
	_, err := d.db.ExecContext(ctx, `INSERT INTO job_state (name, last_slot) VALUES (?, ?)
		ON CONFLICT (name) DO UPDATE SET last_slot = excluded.last_slot`, job, unix(slot))
	if err != nil {
		return fmt.Errorf("record job %s's scheduled time: %w", job, err)
	}
	return nil
}

// Verified records that backups of repository were verified intact at at.
func (d *DB) Verified(ctx context.Context, repository string, backups []string, at time.Time) error {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("record verified backups: %w", err)
	}
	defer tx.Rollback()
	for _, b := range backups {
		if _, err := tx.ExecContext(ctx, `INSERT INTO verified (repository, backup, time) VALUES (?, ?, ?)
			ON CONFLICT (repository, backup) DO UPDATE SET time = excluded.time`, repository, b, unix(at)); err != nil {
			return fmt.Errorf("record verified backups: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("record verified backups: %w", err)
	}
	return nil
}

// VerifiedSince returns the backups of repository verified intact at or
// after since.
func (d *DB) VerifiedSince(ctx context.Context, repository string, since time.Time) (map[string]time.Time, error) {
	rows, err := d.db.QueryContext(ctx, "SELECT backup, time FROM verified WHERE repository = ? AND time >= ?", repository, unix(since))
	if err != nil {
		return nil, fmt.Errorf("read verified backups: %w", err)
	}
	defer rows.Close()
	out := map[string]time.Time{}
	for rows.Next() {
		var b string
		var t sql.NullInt64
		if err := rows.Scan(&b, &t); err != nil {
			return nil, fmt.Errorf("read verified backups: %w", err)
		}
		out[b] = fromUnix(t)
	}
	return out, rows.Err()
}

// APIJobs returns the jobs defined through the API: name to the job's
// settings as given (JSON).
func (d *DB) APIJobs(ctx context.Context) (map[string][]byte, error) {
	rows, err := d.db.QueryContext(ctx, "SELECT name, spec FROM api_jobs")
	if err != nil {
		return nil, fmt.Errorf("read the API's jobs: %w", err)
	}
	defer rows.Close()
	out := map[string][]byte{}
	for rows.Next() {
		var name, spec string
		if err := rows.Scan(&name, &spec); err != nil {
			return nil, fmt.Errorf("read the API's jobs: %w", err)
		}
		out[name] = []byte(spec)
	}
	return out, rows.Err()
}

// PutAPIJob stores (creates or replaces) a job defined through the API.
func (d *DB) PutAPIJob(ctx context.Context, name string, spec []byte) error {
	_, err := d.db.ExecContext(ctx, `INSERT INTO api_jobs (name, spec) VALUES (?, ?)
		ON CONFLICT (name) DO UPDATE SET spec = excluded.spec`, name, string(spec))
	if err != nil {
		return fmt.Errorf("store job %s: %w", name, err)
	}
	return nil
}

// DeleteAPIJob removes a job defined through the API, and its kept state.
func (d *DB) DeleteAPIJob(ctx context.Context, name string) error {
	if _, err := d.db.ExecContext(ctx, "DELETE FROM api_jobs WHERE name = ?", name); err != nil {
		return fmt.Errorf("delete job %s: %w", name, err)
	}
	if _, err := d.db.ExecContext(ctx, "DELETE FROM job_state WHERE name = ?", name); err != nil {
		return fmt.Errorf("delete job %s: %w", name, err)
	}
	return nil
}
