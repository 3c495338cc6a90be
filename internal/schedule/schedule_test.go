package schedule

import (
	"strings"
	"testing"
	"time"
)

func mustZone(t *testing.T, name string) *time.Location {
	t.Helper()
	l, err := time.LoadLocation(name)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func mustParse(t *testing.T, spec string, loc *time.Location) *Schedule {
	t.Helper()
	s, err := Parse(spec, loc)
	if err != nil {
		t.Fatalf("Parse(%q): %v", spec, err)
	}
	return s
}

func TestParseErrors(t *testing.T) {
	for _, c := range []struct{ spec, want string }{
		{"0 25 * * *", `"0 25 * * *": hour 25 out of range 0-23`},
		{"60 * * * *", `"60 * * * *": minute 60 out of range 0-59`},
		{"61 0 * * * *", `"61 0 * * * *": second 61 out of range 0-59`},
		{"0 0 0 * *", `"0 0 0 * *": day-of-month 0 out of range 1-31`},
		{"0 0 * 13 *", `"0 0 * 13 *": month 13 out of range 1-12`},
		{"0 0 * * 8", `"0 0 * * 8": day-of-week 8 out of range 0-7`},
		{"0 0 * FOO *", `"0 0 * FOO *": month "FOO" is neither a number nor a name (JAN-DEC)`},
		{"x 0 * * *", `"x 0 * * *": minute "x" is not a number`},
		{"0 0 * *", `"0 0 * *": 4 fields; want 5`},
		{"0 0 * * * * *", `"0 0 * * * * *": 7 fields`},
		{"*/0 * * * *", `minute step "0" is not a positive number`},
		{"*/61 * * * *", `minute step 61 larger than the range 0-59`},
		{"0 5-3 * * *", `hour range 5-3: start after end`},
		{"0 1,,2 * * *", `hour "1,,2" has an empty list item`},
		{"0 0 31 2,4 *", `day-of-month 31 never occurs in month 2,4`},
		{"0 0 30 2 *", `day-of-month 30 never occurs in month 2`},
		{"@often", `unknown shortcut @often`},
		{"@daily 3", `@daily takes no argument`},
		{"@every", `@every needs a duration`},
		{"@every 500ms", `@every: 500ms is not a whole number of seconds of at least 1s`},
		{"@every soon", `@every: "soon" is not a duration`},
		{"CRON_TZ=Mars/Olympus 0 2 * * *", `unknown time zone "Mars/Olympus"`},
		{"TZ=UTC", `nothing after the time zone`},
		{"  ", `empty schedule`},
	} {
		_, err := Parse(c.spec, nil)
		if err == nil {
			t.Errorf("Parse(%q) succeeded; want error %q", c.spec, c.want)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("Parse(%q) = %q; want it to contain %q", c.spec, err, c.want)
		}
	}
}

func TestNextBasic(t *testing.T) {
	utc := time.UTC
	start := time.Date(2026, 12, 2, 17, 40, 12, 500, utc) // a Wednesday
	for _, c := range []struct {
		spec string
		want []string
	}{
		{"0 2 * * *", []string{"2026-12-03T02:00:00Z", "2026-12-04T02:00:00Z"}},
		{"@daily", []string{"2026-12-03T00:00:00Z", "2026-12-04T00:00:00Z"}},
		{"@hourly", []string{"2026-12-02T18:00:00Z", "2026-12-02T19:00:00Z"}},
		{"@weekly", []string{"2026-12-06T00:00:00Z", "2026-12-13T00:00:00Z"}},
		{"@monthly", []string{"2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"}},
		{"@yearly", []string{"2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"}},
		{"*/10 * * * * *", []string{"2026-12-02T17:40:20Z", "2026-12-02T17:40:30Z"}},
		{"@every 10s", []string{"2026-12-02T17:40:20Z", "2026-12-02T17:40:30Z"}},
		{"@every 1h", []string{"2026-12-02T18:00:00Z", "2026-12-02T19:00:00Z"}},
		{"30 8 * * mon-fri", []string{"2026-12-03T08:30:00Z", "2026-12-04T08:30:00Z", "2026-12-07T08:30:00Z"}},
		{"0 0 * * 7", []string{"2026-12-06T00:00:00Z"}},
		{"0 12 1 * SUN", []string{"2026-12-06T12:00:00Z", "2026-12-13T12:00:00Z"}}, // day 1 OR Sunday
		{"0 12 1,15 * *", []string{"2026-12-15T12:00:00Z", "2027-01-01T12:00:00Z"}},
		{"0 0 29 2 *", []string{"2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"}},
		{"15 3/6 * * *", []string{"2026-12-02T21:15:00Z", "2026-12-03T03:15:00Z"}},
		{"CRON_TZ=Europe/Berlin 0 2 * * *", []string{"2026-12-03T01:00:00Z"}},
	} {
		got := mustParse(t, c.spec, utc).NextN(start, len(c.want))
		var gs []string
		for _, g := range got {
			gs = append(gs, g.UTC().Format(time.RFC3339))
		}
		if strings.Join(gs, " ") != strings.Join(c.want, " ") {
			t.Errorf("%q after %s: got %v, want %v", c.spec, start.Format(time.RFC3339), gs, c.want)
		}
	}
}

// runs lists the run times of spec between from and to, formatted in the
// zone, to read the daylight saving behaviour.
func runs(t *testing.T, spec string, loc *time.Location, from, to time.Time) []string {
	t.Helper()
	s := mustParse(t, spec, loc)
	var out []string
	for tm := s.Next(from); !tm.IsZero() && tm.Before(to); tm = s.Next(tm) {
		out = append(out, tm.In(loc).Format("2006-01-02 15:04 MST"))
		if len(out) > 100 {
			t.Fatal("too many runs")
		}
	}
	return out
}

func TestDaylightSaving(t *testing.T) {
	ber := mustZone(t, "Europe/Berlin")
	ny := mustZone(t, "America/New_York")
	day := func(loc *time.Location, y int, m time.Month, d int) (time.Time, time.Time) {
		return time.Date(y, m, d-1, 0, 0, 0, 0, loc), time.Date(y, m, d+2, 0, 0, 0, 0, loc)
	}
	for _, c := range []struct {
		name string
		spec string
		loc  *time.Location
		y    int
		m    time.Month
		d    int
		want []string
	}{
		// Spring forward: 02:30 does not exist; a fixed-hour job runs at 03:00.
		{"berlin spring 02:30", "30 2 * * *", ber, 2026, time.March, 29,
			[]string{"2026-03-28 02:30 CET", "2026-03-29 03:00 CEST", "2026-03-30 02:30 CEST"}},
		{"new york spring 02:30", "30 2 * * *", ny, 2026, time.March, 8,
			[]string{"2026-03-07 02:30 EST", "2026-03-08 03:00 EDT", "2026-03-09 02:30 EDT"}},
		// Several gap times collapse into one run at the gap's end, and a
		// time right after the gap is not doubled.
		{"berlin spring every 20 min of hours 2-3", "0,20,40 2-3 * * *", ber, 2026, time.March, 29,
			[]string{"2026-03-28 02:00 CET", "2026-03-28 02:20 CET", "2026-03-28 02:40 CET", "2026-03-28 03:00 CET", "2026-03-28 03:20 CET", "2026-03-28 03:40 CET",
				"2026-03-29 03:00 CEST", "2026-03-29 03:20 CEST", "2026-03-29 03:40 CEST",
				"2026-03-30 02:00 CEST", "2026-03-30 02:20 CEST", "2026-03-30 02:40 CEST", "2026-03-30 03:00 CEST", "2026-03-30 03:20 CEST", "2026-03-30 03:40 CEST"}},
		// Fall back: the repeated time runs once, at its first occurrence.
		{"new york fall 01:30", "30 1 * * *", ny, 2026, time.November, 1,
			[]string{"2026-10-31 01:30 EDT", "2026-11-01 01:30 EDT", "2026-11-02 01:30 EST"}},
		{"berlin fall 02:30", "30 2 * * *", ber, 2026, time.October, 25,
			[]string{"2026-10-24 02:30 CEST", "2026-10-25 02:30 CEST", "2026-10-26 02:30 CET"}},
		{"berlin fall 01:30 (not repeated)", "30 1 * * *", ber, 2026, time.October, 25,
			[]string{"2026-10-24 01:30 CEST", "2026-10-25 01:30 CEST", "2026-10-26 01:30 CET"}},
	} {
		from, to := day(c.loc, c.y, c.m, c.d)
		got := runs(t, c.spec, c.loc, from, to)
		if strings.Join(got, ", ") != strings.Join(c.want, ", ") {
			t.Errorf("%s: %q\n got  %v\n want %v", c.name, c.spec, got, c.want)
		}
	}
}

// A schedule with `*` hours follows elapsed time: the gap hour is skipped
// and the repeated hour runs twice.
func TestDaylightSavingStarHour(t *testing.T) {
	ny := mustZone(t, "America/New_York")
	ber := mustZone(t, "Europe/Berlin")
	got := runs(t, "30 * * * *", ny, time.Date(2026, 11, 1, 0, 0, 0, 0, ny), time.Date(2026, 11, 1, 3, 0, 0, 0, ny))
	want := []string{"2026-11-01 00:30 EDT", "2026-11-01 01:30 EDT", "2026-11-01 01:30 EST", "2026-11-01 02:30 EST"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("new york fall hourly: got %v, want %v", got, want)
	}
	got = runs(t, "@hourly", ber, time.Date(2026, 3, 29, 0, 30, 0, 0, ber), time.Date(2026, 3, 29, 5, 0, 0, 0, ber))
	want = []string{"2026-03-29 01:00 CET", "2026-03-29 03:00 CEST", "2026-03-29 04:00 CEST"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("berlin spring hourly: got %v, want %v", got, want)
	}
	// Elapsed time: consecutive hourly runs are exactly one hour apart
	// through both transitions.
	for _, from := range []time.Time{time.Date(2026, 3, 28, 0, 0, 0, 0, ber), time.Date(2026, 10, 24, 0, 0, 0, 0, ber)} {
		ts := mustParse(t, "0 * * * *", ber).NextN(from, 72)
		for i := 1; i < len(ts); i++ {
			if d := ts[i].Sub(ts[i-1]); d != time.Hour {
				t.Fatalf("hourly from %s: %s to %s is %s", from, ts[i-1], ts[i], d)
			}
		}
	}
}

func TestNextStrictlyAfterAndInZone(t *testing.T) {
	ber := mustZone(t, "Europe/Berlin")
	s := mustParse(t, "0 2 * * *", ber)
	at := time.Date(2026, 6, 1, 2, 0, 0, 0, ber)
	if got := s.Next(at); !got.Equal(at.AddDate(0, 0, 1)) {
		t.Errorf("Next(run time) = %s, want the next day", got)
	}
	if got := s.Next(at.Add(-time.Nanosecond)); !got.Equal(at) {
		t.Errorf("Next(just before) = %s, want %s", got, at)
	}
	if got := s.Next(at); got.Location() != ber {
		t.Errorf("Next in %s, want Europe/Berlin", got.Location())
	}
	// The zone given to Parse is overridden by CRON_TZ.
	s = mustParse(t, "CRON_TZ=America/New_York 0 2 * * *", ber)
	if s.Location().String() != "America/New_York" {
		t.Errorf("location %s", s.Location())
	}
}

func TestMissed(t *testing.T) {
	s := mustParse(t, "0 2 * * *", time.UTC)
	last := time.Date(2026, 12, 1, 2, 0, 0, 0, time.UTC)
	if _, m := s.Missed(last, last.Add(23*time.Hour)); m {
		t.Error("missed before the next time came")
	}
	first, m := s.Missed(last, last.Add(72*time.Hour))
	if !m || !first.Equal(last.Add(24*time.Hour)) {
		t.Errorf("Missed after 3 days down = %s %v, want %s true", first, m, last.Add(24*time.Hour))
	}
	if _, m := s.Missed(last, last.Add(24*time.Hour)); !m {
		t.Error("the run time itself (now == next) not a miss")
	}
	if _, m := s.Missed(time.Time{}, last); m {
		t.Error("never ran counts as missed")
	}
}

func TestJitter(t *testing.T) {
	slot := time.Date(2026, 12, 2, 2, 0, 0, 0, time.UTC)
	max := 15 * time.Minute
	a := Jitter(max, "nightly", slot)
	if a != Jitter(max, "nightly", slot) {
		t.Error("not deterministic")
	}
	if Jitter(0, "nightly", slot) != 0 {
		t.Error("max 0 gives a delay")
	}
	seen := map[time.Duration]bool{}
	for i := range 200 {
		d := Jitter(max, "job"+string(rune('a'+i%26))+string(rune('a'+i/26)), slot)
		if d < 0 || d >= max {
			t.Fatalf("jitter %s out of [0, %s)", d, max)
		}
		seen[d/time.Minute] = true
	}
	if len(seen) < 12 {
		t.Errorf("200 jobs spread over only %d of 15 minutes", len(seen))
	}
	if Jitter(max, "nightly", slot) == Jitter(max, "nightly", slot.Add(24*time.Hour)) &&
		Jitter(max, "nightly", slot.Add(48*time.Hour)) == Jitter(max, "nightly", slot.Add(24*time.Hour)) {
		t.Error("the same delay every day")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"0 2 * * *", "*/10 * * * * *", "@every 10s", "@daily", "CRON_TZ=Europe/Berlin 30 2 * * *",
		"0 0 29 2 *", "0 0 31 * 1", "1-5/2,7 0 1 jan-mar sun", "0 25 * * *", "@every 0s", "TZ=America/New_York 30 1 * * 7"} {
		f.Add(s, int64(1795000000))
	}
	ber, _ := time.LoadLocation("Europe/Berlin")
	f.Fuzz(func(t *testing.T, spec string, unix int64) {
		s, err := Parse(spec, ber)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "\"") {
				t.Fatalf("error does not quote the expression: %v", err)
			}
			return
		}
		unix %= 1 << 40 // keep within years the zone data covers sensibly
		after := time.Unix(unix, 0)
		next := s.Next(after)
		if next.IsZero() {
			t.Fatalf("%q: no run after %s", spec, after)
		}
		if !next.After(after) {
			t.Fatalf("%q: Next(%s) = %s, not after", spec, after, next)
		}
	})
}

func BenchmarkNext(b *testing.B) {
	ber, _ := time.LoadLocation("Europe/Berlin")
	for _, spec := range []string{"30 2 * * *", "*/10 * * * * *", "0 0 29 2 *", "@every 10s"} {
		s, err := Parse(spec, ber)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(spec, func(b *testing.B) {
			t := time.Date(2026, 12, 2, 17, 0, 0, 0, time.UTC)
			for b.Loop() {
				if s.Next(t).IsZero() {
					b.Fatal("no next")
				}
			}
		})
	}
}
