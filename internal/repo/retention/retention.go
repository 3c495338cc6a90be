// Package retention owns the keep policy of prune: which backups of one VM
// to keep, with restic's semantics (also Proxmox Backup Server's): the
// newest N backups (last), and the newest backup of each of the N most
// recent hours, days, ISO weeks, months and years that have backups. Rules
// add up; a backup kept by several rules lists every reason.
package retention

import (
	"fmt"
	"sort"
	"time"
)

// Policy holds the counts of each rule. 0 disables a rule; -1 keeps every
// bucket of that rule.
type Policy struct {
	Last, Hourly, Daily, Weekly, Monthly, Yearly int
	// Location is the time zone buckets are computed in (default time.Local).
	Location *time.Location
}

// Empty reports whether the policy keeps nothing: prune refuses it.
func (p Policy) Empty() bool {
	return p.Last == 0 && p.Hourly == 0 && p.Daily == 0 && p.Weekly == 0 && p.Monthly == 0 && p.Yearly == 0
}

// Item is one backup.
type Item struct {
	ID   string
	Time time.Time
}

// Decision says what happens to one backup and why.
type Decision struct {
	Item
	Keep    bool
	Reasons []string // e.g. "last", "daily"; for removed backups, why not kept
}

type rule struct {
	name  string
	count int
	key   func(time.Time) string
	last  string
}

// Apply decides for every item. Items are ordered newest first in the
// result; ties in time are broken by ID, so the result is deterministic.
func Apply(items []Item, p Policy) []Decision {
	loc := p.Location
	if loc == nil {
		loc = time.Local
	}
	sorted := append([]Item(nil), items...)
	sort.SliceStable(sorted, func(i, j int) bool {
		if !sorted[i].Time.Equal(sorted[j].Time) {
			return sorted[i].Time.After(sorted[j].Time)
		}
		return sorted[i].ID > sorted[j].ID
	})
	n := 0
	rules := []*rule{
		{"last", p.Last, func(time.Time) string { n++; return fmt.Sprint(n) }, ""},
		{"hourly", p.Hourly, func(t time.Time) string { return t.In(loc).Format("2006-01-02 15") }, ""},
		{"daily", p.Daily, func(t time.Time) string { return t.In(loc).Format("2006-01-02") }, ""},
		{"weekly", p.Weekly, func(t time.Time) string {
			y, w := t.In(loc).ISOWeek()
			return fmt.Sprintf("%d-W%02d", y, w)
		}, ""},
		{"monthly", p.Monthly, func(t time.Time) string { return t.In(loc).Format("2006-01") }, ""},
		{"yearly", p.Yearly, func(t time.Time) string { return t.In(loc).Format("2006") }, ""},
	}
	out := make([]Decision, 0, len(sorted))
	for _, it := range sorted {
		d := Decision{Item: it}
		for _, r := range rules {
			if r.count == 0 {
				continue
			}
			k := r.key(it.Time)
			if k == r.last {
				continue
			}
			r.last = k
			d.Keep = true
			d.Reasons = append(d.Reasons, r.name)
			if r.count > 0 {
				r.count--
			}
		}
		if !d.Keep {
			d.Reasons = []string{"not selected by any keep rule"}
		}
		out = append(out, d)
	}
	return out
}
