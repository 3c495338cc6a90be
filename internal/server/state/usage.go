package state

import (
	"context"
	"fmt"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Usage is a repository's size at one time: what it stores (after
// deduplication and compression) and what its backups hold (the sum of
// their disks' sizes).
type Usage struct {
	Time         time.Time `json:"time"`
	StoredBytes  int64     `json:"stored_bytes"`
	LogicalBytes int64     `json:"logical_bytes"`
	Backups      int64     `json:"backups"`
}

// How long usage points are kept: one per hour (the latest of the hour)
// for UsageHourlyFor, then one per day (the latest of the UTC day) until
// UsageKeep, then none. A repository has thus at most about
// 90×24 + 5×365 points, whatever the server records.
const (
	UsageHourlyFor = 90 * 24 * time.Hour
	UsageKeep      = 5 * 365 * 24 * time.Hour
)

// RecordUsage records repository's usage u and thins its history as of
// now: of the points younger than UsageHourlyFor only the latest of each
// hour stays, of the older ones the latest of each UTC day, and those
// older than UsageKeep go.
func (d *DB) RecordUsage(ctx context.Context, repository string, u Usage, now time.Time) error {
	if repository == "" {
		return fmt.Errorf("record a repository's usage: no repository named: %w", errs.ErrUsage)
	}
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("record the usage of repository %s: %w", repository, err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `INSERT INTO repo_usage (repository, time, stored, logical, backups) VALUES (?, ?, ?, ?, ?)
		ON CONFLICT (repository, time) DO UPDATE SET stored = excluded.stored, logical = excluded.logical, backups = excluded.backups`,
		repository, unix(u.Time), u.StoredBytes, u.LogicalBytes, u.Backups); err != nil {
		return fmt.Errorf("record the usage of repository %s: %w", repository, err)
	}
	hourly, keep := unix(now.Add(-UsageHourlyFor)), unix(now.Add(-UsageKeep))
	const hour, day = int64(time.Hour / time.Millisecond), int64(24 * time.Hour / time.Millisecond)
	for _, q := range []struct {
		sql  string
		args []any
	}{
		{"DELETE FROM repo_usage WHERE repository = ? AND time < ?", []any{repository, keep}},
		// A point with a later one in its bucket (its hour when recent,
		// its UTC day when older) goes: one pass, sorted by bucket.
		{`DELETE FROM repo_usage WHERE repository = ? AND time IN (SELECT time FROM (SELECT time, row_number() OVER (
			PARTITION BY CASE WHEN time >= ? THEN time / ? ELSE -1 - time / ? END ORDER BY time DESC) AS n
			FROM repo_usage WHERE repository = ?) WHERE n > 1)`,
			[]any{repository, hourly, hour, day, repository}},
	} {
		if _, err := tx.ExecContext(ctx, q.sql, q.args...); err != nil {
			return fmt.Errorf("thin the usage history of repository %s: %w", repository, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("record the usage of repository %s: %w", repository, err)
	}
	return nil
}

// UsageHistory returns repository's usage points at or after since,
// oldest first.
func (d *DB) UsageHistory(ctx context.Context, repository string, since time.Time) ([]Usage, error) {
	rows, err := d.db.QueryContext(ctx, "SELECT time, stored, logical, backups FROM repo_usage WHERE repository = ? AND time >= ? ORDER BY time",
		repository, unix(since))
	if err != nil {
		return nil, fmt.Errorf("read the usage history of repository %s: %w", repository, err)
	}
	defer rows.Close()
	out := []Usage{}
	for rows.Next() {
		var u Usage
		var t int64
		if err := rows.Scan(&t, &u.StoredBytes, &u.LogicalBytes, &u.Backups); err != nil {
			return nil, fmt.Errorf("read the usage history of repository %s: %w", repository, err)
		}
		u.Time = time.UnixMilli(t).UTC()
		out = append(out, u)
	}
	return out, rows.Err()
}
