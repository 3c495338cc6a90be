// Package schedule owns the schedule syntax of the vmshadow server's jobs:
// parsing a cron expression, computing its next run times in a time zone
// (daylight saving time handled as documented below), a deterministic
// random delay, and telling whether a run was missed while the server was
// down.
//
// # Syntax
//
// A schedule is a cron expression of 5 fields
//
//	MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK
//
// or of 6 fields, with a leading SECOND field (0-59):
//
//	SECOND MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK
//
// Ranges: second 0-59, minute 0-59, hour 0-23, day-of-month 1-31, month
// 1-12 or JAN-DEC, day-of-week 0-7 or SUN-SAT (0 and 7 are Sunday); names
// are case-insensitive. Each field is a comma-separated list of `*`, `N`,
// `A-B`, `*/S`, `A-B/S` or `N/S` (N to the maximum, every S). With 5 fields
// the second is 0. As in Vixie cron, when both day-of-month and
// day-of-week are restricted (neither starts with `*`), a day matches when
// either matches; a day-of-month that never occurs (`0 0 31 2 *`) is an
// error.
//
// Shortcuts: `@yearly` and `@annually` (0 0 1 1 *), `@monthly` (0 0 1 * *),
// `@weekly` (0 0 * * 0), `@daily` and `@midnight` (0 0 * * *), `@hourly`
// (0 * * * *), and `@every DURATION` (Go duration syntax, whole seconds, at
// least 1s: `@every 10s`, `@every 1h30m`). `@every` runs at the multiples of
// the duration since 1970-01-01 00:00:00 UTC (`@every 1h` on the hour), so
// its times do not depend on when the server started. Sub-minute schedules
// need the 6-field form (`*/10 * * * * *`) or `@every`.
//
// Time zone: the expression may start with `CRON_TZ=ZONE ` or `TZ=ZONE `
// (an IANA name such as `Europe/Berlin`); otherwise the zone given to
// [Parse] applies (the server's `timezone` setting, default UTC). Zone data
// is embedded (time/tzdata), so /usr/share/zoneinfo is not needed.
//
// # Daylight saving time
//
// Cron fields are wall-clock times in the zone. Two cases differ:
//
//   - A schedule with a fixed hour (the hour field does not start with `*`,
//     such as `30 2 * * *`): a time that does not exist because the clocks
//     spring forward (02:30 on the last Sunday of March in Europe/Berlin,
//     the second Sunday of March in America/New_York) runs once, at the
//     first instant after the gap (03:00 local); several such times collapse
//     into that one run. A time that occurs twice because the clocks fall
//     back (02:30 on the last Sunday of October in Europe/Berlin, 01:30 on
//     the first Sunday of November in America/New_York) runs once, at its
//     first occurrence (summer time).
//   - A schedule whose hour field starts with `*` (`*/15 * * * *`,
//     `@hourly`): it follows elapsed time. Times in the spring gap do not
//     exist and are skipped (the job ran before the gap and runs after it);
//     times in the repeated autumn hour run at both occurrences.
//
// This is Vixie cron's behaviour, with the hour field alone deciding.
// `@every` ignores the zone.
//
// # Random delay and missed runs
//
// [Jitter] delays a run by a pseudo-random amount below a bound, derived
// from the job's name and the scheduled time, so a restarted server delays
// the same run by the same amount and jobs with the same schedule spread
// out. [Schedule.Missed] tells whether a scheduled time passed between the
// last run and now (the server was down), for the "run once at start"
// option.
package schedule

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"time"
	_ "time/tzdata" // zone data when /usr/share/zoneinfo is missing
)

// maxSearchDays bounds the search of [Schedule.Next]: every schedule that
// parses runs at least once in 8 years (Feb 29 with an unrestricted
// day-of-week, across a non-leap century year), so 9 years suffice.
const maxSearchDays = 9*366 + 2

// Schedule is a parsed schedule. The zero value is not valid; use [Parse].
type Schedule struct {
	spec  string
	loc   *time.Location
	every time.Duration // @every; the fields are unused then

	second, minute, hour uint64 // bit sets
	dom                  uint64
	month                uint64
	dow                  uint64 // bits 0-6, Sunday = 0
	domStar, dowStar     bool
	hourStar             bool
}

// String returns the expression as given to [Parse].
func (s *Schedule) String() string { return s.spec }

// Location is the time zone the schedule's fields are read in.
func (s *Schedule) Location() *time.Location { return s.loc }

// Every is the interval of an `@every` schedule, 0 for a cron expression.
func (s *Schedule) Every() time.Duration { return s.every }

type field struct {
	name     string
	min, max int
	names    map[string]int
}

var (
	fSecond = field{name: "second", min: 0, max: 59}
	fMinute = field{name: "minute", min: 0, max: 59}
	fHour   = field{name: "hour", min: 0, max: 23}
	fDom    = field{name: "day-of-month", min: 1, max: 31}
	fMonth  = field{name: "month", min: 1, max: 12, names: map[string]int{
		"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6,
		"jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12}}
	fDow = field{name: "day-of-week", min: 0, max: 7, names: map[string]int{
		"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}}
)

var shortcuts = map[string]string{
	"@yearly":   "0 0 1 1 *",
	"@annually": "0 0 1 1 *",
	"@monthly":  "0 0 1 * *",
	"@weekly":   "0 0 * * 0",
	"@daily":    "0 0 * * *",
	"@midnight": "0 0 * * *",
	"@hourly":   "0 * * * *",
}

// Parse parses a schedule expression (see the package documentation). loc is
// the time zone unless the expression names one with CRON_TZ= or TZ=; nil
// means UTC. Errors quote the expression and name the wrong field and value:
//
//	"0 25 * * *": hour 25 out of range 0-23
func Parse(spec string, loc *time.Location) (*Schedule, error) {
	if loc == nil {
		loc = time.UTC
	}
	errf := func(format string, a ...any) error {
		return fmt.Errorf("%q: %s", spec, fmt.Sprintf(format, a...))
	}
	expr := strings.TrimSpace(spec)
	if expr == "" {
		return nil, errf("empty schedule; give a cron expression such as \"0 2 * * *\" or a shortcut such as @daily")
	}
	for _, prefix := range []string{"CRON_TZ=", "TZ="} {
		if rest, ok := strings.CutPrefix(expr, prefix); ok {
			zone, tail, _ := strings.Cut(rest, " ")
			l, err := loadZone(zone)
			if err != nil {
				return nil, errf("unknown time zone %q: give an IANA name such as Europe/Berlin or UTC", zone)
			}
			loc = l
			expr = strings.TrimSpace(tail)
			if expr == "" {
				return nil, errf("nothing after the time zone")
			}
			break
		}
	}
	s := &Schedule{spec: spec, loc: loc}
	if strings.HasPrefix(expr, "@") {
		word, arg, _ := strings.Cut(expr, " ")
		word = strings.ToLower(word)
		arg = strings.TrimSpace(arg)
		if word == "@every" {
			if arg == "" {
				return nil, errf("@every needs a duration such as 10s, 15m or 1h30m")
			}
			d, err := time.ParseDuration(arg)
			if err != nil {
				return nil, errf("@every: %q is not a duration (examples: 10s, 15m, 1h30m)", arg)
			}
			if d < time.Second || d%time.Second != 0 {
				return nil, errf("@every: %s is not a whole number of seconds of at least 1s", arg)
			}
			s.every = d
			return s, nil
		}
		e, ok := shortcuts[word]
		if !ok {
			return nil, errf("unknown shortcut %s: use @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly or @every DURATION", word)
		}
		if arg != "" {
			return nil, errf("%s takes no argument, got %q", word, arg)
		}
		expr = e
	}
	fields := strings.Fields(expr)
	switch len(fields) {
	case 5:
		fields = append([]string{"0"}, fields...)
	case 6:
	default:
		return nil, errf("%d fields; want 5 (minute hour day-of-month month day-of-week) or 6 (with a leading second)", len(fields))
	}
	var err error
	set := func(dst *uint64, f field, text string) bool {
		if err != nil {
			return false
		}
		var star bool
		*dst, star, err = parseField(f, text)
		if err != nil {
			err = errf("%v", err)
		}
		return star
	}
	set(&s.second, fSecond, fields[0])
	set(&s.minute, fMinute, fields[1])
	s.hourStar = set(&s.hour, fHour, fields[2])
	s.domStar = set(&s.dom, fDom, fields[3])
	set(&s.month, fMonth, fields[4])
	s.dowStar = set(&s.dow, fDow, fields[5])
	if err != nil {
		return nil, err
	}
	if s.dow&(1<<7) != 0 {
		s.dow = s.dow&^(1<<7) | 1
	}
	// With the day-of-week unrestricted the day-of-month alone decides, so
	// it must occur in one of the months.
	if s.dowStar && !s.domOccurs() {
		return nil, errf("day-of-month %s never occurs in month %s", fields[3], fields[4])
	}
	return s, nil
}

func loadZone(name string) (*time.Location, error) {
	if name == "" || strings.ContainsAny(name, " \t") {
		return nil, fmt.Errorf("empty zone")
	}
	return time.LoadLocation(name)
}

var maxDays = [13]int{0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}

func (s *Schedule) domOccurs() bool {
	for m := 1; m <= 12; m++ {
		if s.month&(1<<m) == 0 {
			continue
		}
		for d := 1; d <= maxDays[m]; d++ {
			if s.dom&(1<<d) != 0 {
				return true
			}
		}
	}
	return false
}

// parseField parses one field into a bit set; star tells whether it starts
// with `*`.
func parseField(f field, text string) (bits uint64, star bool, err error) {
	star = strings.HasPrefix(text, "*")
	for part := range strings.SplitSeq(text, ",") {
		if part == "" {
			return 0, false, fmt.Errorf("%s %q has an empty list item", f.name, text)
		}
		rng, stepText, hasStep := strings.Cut(part, "/")
		lo, hi := f.min, f.max
		if f.name == "day-of-week" {
			hi = 6 // `*` covers Sunday once
		}
		switch {
		case rng == "*":
		case strings.Contains(rng, "-"):
			a, b, _ := strings.Cut(rng, "-")
			if lo, err = f.value(a); err != nil {
				return 0, false, err
			}
			if hi, err = f.value(b); err != nil {
				return 0, false, err
			}
			if lo > hi {
				return 0, false, fmt.Errorf("%s range %s: start after end", f.name, rng)
			}
		default:
			if lo, err = f.value(rng); err != nil {
				return 0, false, err
			}
			hi = lo
			if hasStep {
				hi = f.max
			}
		}
		step := 1
		if hasStep {
			n, e := strconv.Atoi(stepText)
			if e != nil || n < 1 {
				return 0, false, fmt.Errorf("%s step %q is not a positive number", f.name, stepText)
			}
			if n > f.max-f.min+1 {
				return 0, false, fmt.Errorf("%s step %d larger than the range %d-%d", f.name, n, f.min, f.max)
			}
			step = n
		}
		for v := lo; v <= hi; v += step {
			bits |= 1 << v
		}
	}
	return bits, star, nil
}

func (f field) value(text string) (int, error) {
	if v, ok := f.names[strings.ToLower(text)]; ok {
		return v, nil
	}
	n, err := strconv.Atoi(text)
	if err != nil {
		if f.names != nil {
			return 0, fmt.Errorf("%s %q is neither a number nor a name (%s)", f.name, text, f.nameList())
		}
		return 0, fmt.Errorf("%s %q is not a number", f.name, text)
	}
	if n < f.min || n > f.max {
		return 0, fmt.Errorf("%s %d out of range %d-%d", f.name, n, f.min, f.max)
	}
	return n, nil
}

func (f field) nameList() string {
	if f.name == "month" {
		return "JAN-DEC"
	}
	return "SUN-SAT"
}

// Next returns the first run time strictly after after, or the zero time if
// there is none within the search bound (which cannot happen for a
// schedule returned by [Parse]). The result is in the schedule's zone.
func (s *Schedule) Next(after time.Time) time.Time {
	if s.every > 0 {
		sec := int64(s.every / time.Second)
		u := after.Unix()
		n := u - u%sec
		if u < 0 && u%sec != 0 {
			n -= sec
		}
		n += sec
		return time.Unix(n, 0).In(time.UTC)
	}
	local := after.In(s.loc)
	// Start a day early: a fixed time in a gap moves forward to the gap's end.
	y, m, d := local.Date()
	day := time.Date(y, m, d-1, 0, 0, 0, 0, time.UTC)
	for i := 0; i < maxSearchDays; i++ {
		if s.dayMatches(day) {
			if t, ok := s.nextInDay(day, after); ok {
				return t
			}
		}
		day = day.AddDate(0, 0, 1)
	}
	return time.Time{}
}

// NextN returns the next n run times after after, in order (fewer only if
// the search bound is reached).
func (s *Schedule) NextN(after time.Time, n int) []time.Time {
	var out []time.Time
	for range n {
		t := s.Next(after)
		if t.IsZero() {
			break
		}
		out = append(out, t)
		after = t
	}
	return out
}

// Missed tells whether a run time passed after lastRun and not after now:
// the server was down (or busy) when it came. lastRun is the scheduled time
// of the last run (not its start, which a random delay moves); a zero
// lastRun (the job never ran) is never a miss. first is the earliest
// missed time; the server runs the job once for all missed times.
func (s *Schedule) Missed(lastRun, now time.Time) (first time.Time, missed bool) {
	if lastRun.IsZero() || !now.After(lastRun) {
		return time.Time{}, false
	}
	t := s.Next(lastRun)
	if t.IsZero() || t.After(now) {
		return time.Time{}, false
	}
	return t, true
}

// Jitter returns the random delay of the run of the job named key at the
// scheduled time slot: a value in [0, max), the same for the same key and
// slot (a hash of both), so a restarted server does not reshuffle delays.
// max <= 0 gives 0.
func Jitter(max time.Duration, key string, slot time.Time) time.Duration {
	if max <= 0 {
		return 0
	}
	h := sha256.New()
	h.Write([]byte(key))
	var b [9]byte
	binary.BigEndian.PutUint64(b[1:], uint64(slot.Unix()))
	h.Write(b[:])
	sum := h.Sum(nil)
	return time.Duration(binary.BigEndian.Uint64(sum[:8]) % uint64(max))
}

func (s *Schedule) dayMatches(day time.Time) bool {
	_, m, d := day.Date()
	if s.month&(1<<int(m)) == 0 {
		return false
	}
	domOK := s.dom&(1<<d) != 0
	dowOK := s.dow&(1<<int(day.Weekday())) != 0
	if !s.domStar && !s.dowStar {
		return domOK || dowOK
	}
	return domOK && dowOK
}

// nextInDay returns the earliest instant strictly after after among the
// day's wall-clock times (day is midnight of a civil date, in UTC).
func (s *Schedule) nextInDay(day time.Time, after time.Time) (time.Time, bool) {
	base := day.Unix() // wall time as if UTC
	offs := s.offsetsAround(base)
	minOff, maxOff := offs[0], offs[0]
	for _, o := range offs {
		minOff, maxOff = min(minOff, o), max(maxOff, o)
	}
	// Candidates are whole seconds; Unix() rounds down, so "strictly after
	// after" is "at least Unix()+1".
	afterU := after.Unix() + 1
	var best int64
	found := false
	for h := 0; h < 24; h++ {
		if s.hour&(1<<h) == 0 {
			continue
		}
		hb := base + int64(h)*3600
		if hb+3599-int64(minOff) < afterU {
			continue // every instant of this hour is too early
		}
		if found && hb-int64(maxOff) > best {
			break
		}
		for mi := 0; mi < 60; mi++ {
			if s.minute&(1<<mi) == 0 {
				continue
			}
			mb := hb + int64(mi)*60
			if mb+59-int64(minOff) < afterU {
				continue
			}
			if found && mb-int64(maxOff) > best {
				break
			}
			for se := 0; se < 60; se++ {
				if s.second&(1<<se) == 0 {
					continue
				}
				naive := mb + int64(se)
				if found && naive-int64(maxOff) > best {
					break
				}
				for _, u := range s.resolve(naive, offs) {
					if u >= afterU && (!found || u < best) {
						best, found = u, true
					}
				}
			}
		}
	}
	if !found {
		return time.Time{}, false
	}
	return time.Unix(best, 0).In(s.loc), true
}

// offsetsAround returns the distinct UTC offsets (seconds) the zone uses
// from two days before to two days after the naive time base.
func (s *Schedule) offsetsAround(base int64) []int {
	var offs []int
	t := time.Unix(base-2*86400, 0).In(s.loc)
	end := base + 3*86400
	for i := 0; i < 16; i++ {
		_, off := t.Zone()
		seen := false
		for _, o := range offs {
			seen = seen || o == off
		}
		if !seen {
			offs = append(offs, off)
		}
		_, zend := t.ZoneBounds()
		if zend.IsZero() || zend.Unix() > end {
			break
		}
		t = zend.In(s.loc)
	}
	return offs
}

// resolve returns the instants (Unix seconds) a wall-clock time (naive, as
// if UTC) runs at, following the daylight saving rules of the package
// documentation.
func (s *Schedule) resolve(naive int64, offs []int) []int64 {
	want := time.Unix(naive, 0).UTC()
	var valid []int64
	for _, o := range offs {
		u := naive - int64(o)
		if sameWall(time.Unix(u, 0).In(s.loc), want) {
			valid = append(valid, u)
		}
	}
	if len(valid) == 2 && valid[1] < valid[0] {
		valid[0], valid[1] = valid[1], valid[0]
	}
	if len(valid) > 0 {
		if s.hourStar {
			return valid
		}
		return valid[:1]
	}
	if s.hourStar {
		return nil // in a spring-forward gap: skipped
	}
	// In a gap: run at its end, the start of the zone period the wall time
	// lands in when read with the earlier offset.
	var end int64
	found := false
	for _, o := range offs {
		t := time.Unix(naive-int64(o), 0).In(s.loc)
		if !wallAfter(t, want) {
			continue
		}
		start, _ := t.ZoneBounds()
		if start.IsZero() {
			continue
		}
		if !found || start.Unix() < end {
			end, found = start.Unix(), true
		}
	}
	if !found {
		return nil
	}
	return []int64{end}
}

func sameWall(t, want time.Time) bool {
	y, m, d := t.Date()
	wy, wm, wd := want.Date()
	return y == wy && m == wm && d == wd && t.Hour() == want.Hour() && t.Minute() == want.Minute() && t.Second() == want.Second()
}

func wallAfter(t, want time.Time) bool {
	tw := time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), 0, time.UTC)
	return tw.After(want)
}
