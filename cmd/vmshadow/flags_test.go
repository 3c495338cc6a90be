package main

import (
	"io"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/vmshadow/vmshadow/internal/report"
)

// badFlagValues lists, for every numeric and duration flag, values that
// must be refused with exit code 2 (to which TestBadFlagValues adds the
// values just outside each flag's range and a non-number). A numeric flag
// missing here fails TestFlagRanges: add its bad values when adding it.
var badFlagValues = map[string][]string{
	"nbd-connections":      {"-1", "0", "100000"},
	"xapi-nbd-connections": {"0", "-1", "17"},
	"memory":               {"0", "-1", "15", "1G"},
	"vcpus":                {"0", "-1", "4097"},
	"peer-timeout":         {"0s", "500ms", "2h", "-1s"},
	"freeze-timeout":       {"-5s", "0s", "0", "500ms", "24h"},
	"writer-timeout":       {"0s", "-1s", "2h"},
	"s3-connections":       {"-1", "0", "100000"},
	"to-s3-connections":    {"-1", "0", "100000"},
	"chunk-size":           {"0", "-1", "1000", "100000", "1073741824"},
	"cache":                {"-1", "9223372036854775807", "99999999999999999999"},
	"grace":                {"-1s", "-1h", "-24h", "87601h"},
	"keep-last":            {"-5", "-2"},
	"keep-hourly":          {"-5", "-2"},
	"keep-daily":           {"-5", "-2"},
	"keep-weekly":          {"-5", "-2"},
	"keep-monthly":         {"-5", "-2"},
	"keep-yearly":          {"-5", "-2"},
	"timeout":              {"0s", "-1s", "500ms", "25h"},
	"boot-timeout":         {"0s", "-1s", "500ms", "2h"},
}

// numericType matches the pflag types of numbers and durations: int,
// int64, uint8, float64, duration, count, intSlice, durationSlice, ...
var numericType = regexp.MustCompile(`(?i)int|float|duration|count`)

// commandFlag is one flag of one command.
type commandFlag struct {
	path []string // command words after "vmshadow"
	flag *pflag.Flag
}

// numericFlags walks the command tree and returns every numeric or
// duration flag of every command.
func numericFlags(t *testing.T) []commandFlag {
	t.Helper()
	root := newRoot(&app{out: report.New(false, io.Discard, io.Discard)})
	var out []commandFlag
	var walk func(c *cobra.Command, path []string)
	walk = func(c *cobra.Command, path []string) {
		c.LocalFlags().VisitAll(func(f *pflag.Flag) {
			if numericType.MatchString(f.Value.Type()) {
				out = append(out, commandFlag{slices.Clone(path), f})
			}
		})
		for _, sub := range c.Commands() {
			walk(sub, append(path, sub.Name()))
		}
	}
	walk(root, nil)
	if len(out) < 10 {
		t.Fatalf("found only %d numeric flags in the command tree: the walk is broken", len(out))
	}
	return out
}

// TestFlagRanges: every numeric and duration flag of every command is
// registered with a range (intFlag, durationFlag), shows it in --help, has a
// default inside it, and has bad values listed in badFlagValues.
func TestFlagRanges(t *testing.T) {
	for _, cf := range numericFlags(t) {
		name := strings.Join(append(cf.path, "--"+cf.flag.Name), " ")
		rv, ok := cf.flag.Value.(rangedValue)
		if !ok {
			t.Errorf("%s (%s) has no range: register it with intFlag or durationFlag", name, cf.flag.Value.Type())
			continue
		}
		if !strings.Contains(cf.flag.Usage, "("+rv.Range()+")") {
			t.Errorf("%s: --help does not show the range %s: %q", name, rv.Range(), cf.flag.Usage)
		}
		if err := rv.Set(cf.flag.DefValue); err != nil {
			t.Errorf("%s: default %s is refused: %v", name, cf.flag.DefValue, err)
		}
		if _, ok := badFlagValues[cf.flag.Name]; !ok {
			t.Errorf("%s: no bad values in badFlagValues", name)
		}
	}
}

// TestRangedValues: the bounds are inclusive, and a refused value leaves the
// flag as it was.
func TestRangedValues(t *testing.T) {
	n := 4
	iv := &intValue{p: &n, min: 1, max: 64}
	for _, s := range []string{"1", "64", " 7 "} {
		if err := iv.Set(s); err != nil {
			t.Errorf("Set(%q): %v", s, err)
		}
	}
	for _, s := range []string{"0", "65", "-1", "", "4x", "1e3", "99999999999999999999"} {
		if err := iv.Set(s); err == nil {
			t.Errorf("Set(%q) accepted: %d", s, n)
		}
	}
	if n != 7 {
		t.Errorf("value %d after refused values, want 7", n)
	}
	var d = durationValue{p: new(time.Duration), min: time.Second, max: time.Hour}
	for _, s := range []string{"1s", "1h", "59m59s"} {
		if err := d.Set(s); err != nil {
			t.Errorf("Set(%q): %v", s, err)
		}
	}
	for _, s := range []string{"999ms", "1h0m0.001s", "0", "-1s", "5", "soon"} {
		if err := d.Set(s); err == nil {
			t.Errorf("Set(%q) accepted: %v", s, *d.p)
		}
	}
	if got := d.OutOfRange(); !slices.Equal(got, []string{"999ms", "1h0m1s"}) {
		t.Errorf("OutOfRange() = %q", got)
	}
}

// TestBadFlagValues runs the binary with each bad value of each numeric
// and duration flag of each command: exit code 2, a usage error naming the
// flag and the value, before anything else is done, and no stack trace.
func TestBadFlagValues(t *testing.T) {
	runs := 0
	for _, cf := range numericFlags(t) {
		vals := slices.Clone(badFlagValues[cf.flag.Name])
		if rv, ok := cf.flag.Value.(rangedValue); ok {
			vals = append(vals, rv.OutOfRange()...)
		}
		vals = append(vals, "many")
		slices.Sort(vals)
		for _, v := range slices.Compact(vals) {
			args := append(slices.Clone(cf.path), "--"+cf.flag.Name+"="+v)
			r := vmshadow(t, nil, args...)
			runs++
			msg := r.errorMessage()
			if r.code != 2 || !strings.Contains(msg, `"--`+cf.flag.Name+`"`) || !strings.Contains(msg, `"`+v+`"`) {
				t.Errorf("vmshadow %s: exit %d, error %q; want exit 2 and an error naming the flag and the value", strings.Join(args, " "), r.code, msg)
			}
			if strings.Contains(r.stderr, "goroutine ") || strings.Contains(r.stderr, "panic") {
				t.Errorf("vmshadow %s: stack trace: %s", strings.Join(args, " "), r.stderr)
			}
		}
	}
	t.Logf("%d runs", runs)
}
