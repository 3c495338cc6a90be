package retention

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func ts(s string) time.Time {
	t, err := time.Parse("2006-01-02 15:04", s)
	if err != nil {
		panic(err)
	}
	return t
}

func TestApply(t *testing.T) {
	// Backups of one VM, IDs named after their times for readability.
	times := []string{
		"2026-01-01 10:00", "2026-01-01 10:30", "2026-01-01 11:00", // same day, two in one hour
		"2026-01-02 09:00", "2026-01-05 09:00", // Monday of the next ISO week
		"2026-01-31 23:00", "2026-02-01 00:30",
		"2025-12-31 23:59", "2024-06-01 12:00",
	}
	var items []Item
	for _, s := range times {
		items = append(items, Item{ID: s, Time: ts(s)})
	}
	tests := []struct {
		name string
		p    Policy
		keep map[string]string // id -> reasons
	}{
		{"last 2", Policy{Last: 2}, map[string]string{
			"2026-02-01 00:30": "last", "2026-01-31 23:00": "last"}},
		{"hourly 3", Policy{Hourly: 3}, map[string]string{
			"2026-02-01 00:30": "hourly", "2026-01-31 23:00": "hourly", "2026-01-05 09:00": "hourly"}},
		{"daily 4 picks newest of each day", Policy{Daily: 4}, map[string]string{
			"2026-02-01 00:30": "daily", "2026-01-31 23:00": "daily", "2026-01-05 09:00": "daily", "2026-01-02 09:00": "daily"}},
		{"daily skips earlier same-day backups", Policy{Daily: 5}, map[string]string{
			"2026-02-01 00:30": "daily", "2026-01-31 23:00": "daily", "2026-01-05 09:00": "daily",
			"2026-01-02 09:00": "daily", "2026-01-01 11:00": "daily"}},
		{"weekly 3 (ISO weeks)", Policy{Weekly: 3}, map[string]string{
			// 2026-02-01 is a Sunday: ISO week 5 holds 01-31 and 02-01.
			"2026-02-01 00:30": "weekly", "2026-01-05 09:00": "weekly", "2026-01-02 09:00": "weekly"}},
		{"monthly 2 + yearly 3", Policy{Monthly: 2, Yearly: 3}, map[string]string{
			"2026-02-01 00:30": "monthly,yearly", "2026-01-31 23:00": "monthly",
			"2025-12-31 23:59": "yearly", "2024-06-01 12:00": "yearly"}},
		{"rules add up", Policy{Last: 1, Daily: 2}, map[string]string{
			"2026-02-01 00:30": "last,daily", "2026-01-31 23:00": "daily"}},
		{"unlimited yearly", Policy{Yearly: -1}, map[string]string{
			"2026-02-01 00:30": "yearly", "2025-12-31 23:59": "yearly", "2024-06-01 12:00": "yearly"}},
		{"more than exist keeps all", Policy{Last: 100}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.p.Location = time.UTC
			ds := Apply(items, tc.p)
			if len(ds) != len(items) {
				t.Fatalf("%d decisions for %d items", len(ds), len(items))
			}
			for i := 1; i < len(ds); i++ {
				if ds[i].Time.After(ds[i-1].Time) {
					t.Fatal("decisions not newest first")
				}
			}
			for _, d := range ds {
				want, keep := tc.keep[d.ID]
				if tc.keep == nil {
					keep, want = true, "last"
				}
				if d.Keep != keep {
					t.Errorf("%s: keep=%v, want %v (reasons %v)", d.ID, d.Keep, keep, d.Reasons)
					continue
				}
				if keep && strings.Join(d.Reasons, ",") != want {
					t.Errorf("%s: reasons %v, want %s", d.ID, d.Reasons, want)
				}
				if !keep && len(d.Reasons) == 0 {
					t.Errorf("%s removed without a reason", d.ID)
				}
			}
		})
	}
}

func TestEmpty(t *testing.T) {
	if !(Policy{}).Empty() || (Policy{Weekly: 1}).Empty() {
		t.Fatal("Empty wrong")
	}
	ds := Apply(nil, Policy{Last: 1})
	if len(ds) != 0 {
		t.Fatal(fmt.Sprint(ds))
	}
}
