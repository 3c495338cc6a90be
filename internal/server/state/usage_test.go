package state

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// TestUsageHistoryBounded records a repository's usage as a server
// would (every three hours for 100 days, every 20 minutes in the last
// two, a point six years old first) and checks what stays: one point per
// hour in the last 90 days, one per UTC day before, none older than five
// years, each the latest of its bucket; another repository's points are
// left alone.
func TestUsageHistoryBounded(t *testing.T) {
	ctx := context.Background()
	d := open(t, t.TempDir())
	now := t0
	rec := func(repo string, at time.Time, v int64) {
		t.Helper()
		if err := d.RecordUsage(ctx, repo, Usage{Time: at, StoredBytes: v, LogicalBytes: 10 * v, Backups: v % 7}, at); err != nil {
			t.Fatal(err)
		}
	}
	recorded := map[time.Time]int64{} // latest value per bucket start
	bucket := func(at time.Time) time.Time {
		if at.Before(now.Add(-UsageHourlyFor)) {
			return at.Truncate(24 * time.Hour)
		}
		return at.Truncate(time.Hour)
	}
	rec("main", now.Add(-6*365*24*time.Hour), 1)
	rec("other", now.Add(-100*24*time.Hour), 5)
	var v int64 = 100
	start := now.Add(-100 * 24 * time.Hour).Add(7 * time.Minute)
	for at := start; !at.After(now); {
		v++
		rec("main", at, v)
		recorded[bucket(at)] = v
		if now.Sub(at) > 48*time.Hour {
			at = at.Add(3 * time.Hour)
		} else {
			at = at.Add(20 * time.Minute)
		}
	}
	got, err := d.UsageHistory(ctx, "main", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(recorded) {
		t.Errorf("%d points kept, want %d (one per bucket)", len(got), len(recorded))
	}
	seen := map[time.Time]bool{}
	for i, u := range got {
		if i > 0 && !u.Time.After(got[i-1].Time) {
			t.Fatalf("points not oldest first: %v then %v", got[i-1].Time, u.Time)
		}
		if u.Time.Before(now.Add(-UsageKeep)) {
			t.Errorf("point of %v older than %v kept", u.Time, UsageKeep)
		}
		b := bucket(u.Time)
		if seen[b] {
			t.Errorf("two points in the bucket of %v", b)
		}
		seen[b] = true
		if want := recorded[b]; u.StoredBytes != want || u.LogicalBytes != 10*want || u.Backups != want%7 {
			t.Errorf("bucket %v keeps %+v, want the latest (stored %d)", b, u, want)
		}
	}
	// About 90×24 hourly points and 10 daily ones: far fewer than recorded.
	if n := len(got); n > 90*24+11 {
		t.Errorf("%d points kept: more than one per hour for 90 days and one per day before", n)
	}
	other, err := d.UsageHistory(ctx, "other", time.Time{})
	if err != nil || len(other) != 1 || other[0].StoredBytes != 5 {
		t.Fatalf("other repository's history: %+v %v", other, err)
	}
	since, err := d.UsageHistory(ctx, "main", now.Add(-time.Hour))
	if err != nil || len(since) != 1 || since[0].StoredBytes != v {
		t.Fatalf("history since an hour ago: %+v %v", since, err)
	}
	if err := d.RecordUsage(ctx, "", Usage{Time: now}, now); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("usage of no repository: %v", err)
	}
}
