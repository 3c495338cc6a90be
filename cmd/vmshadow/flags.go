package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// Every numeric and duration flag is registered with intFlag or
// durationFlag: its value is checked against a range when the command line
// is parsed, so a bad value is a usage error (exit code 2) naming the flag
// before anything runs, and --help shows the range. TestFlagRanges fails for
// a numeric flag registered any other way.

// rangedValue is a flag value with a range.
type rangedValue interface {
	pflag.Value
	// Range is the allowed values as --help shows them, "1..64".
	Range() string
	// OutOfRange returns values just outside the range (for tests).
	OutOfRange() []string
}

// intValue is an int flag's value within [min, max], and check if set.
type intValue struct {
	p        *int
	min, max int
	check    func(int) error
}

func (v *intValue) String() string { return strconv.Itoa(*v.p) }
func (v *intValue) Type() string   { return "int" }
func (v *intValue) Range() string  { return fmt.Sprintf("%d..%d", v.min, v.max) }

func (v *intValue) Set(s string) error {
	n, err := strconv.ParseInt(strings.TrimSpace(s), 0, 64)
	if err != nil {
		return fmt.Errorf("not a whole number (allowed: %s)", v.Range())
	}
	if n < int64(v.min) || n > int64(v.max) {
		return fmt.Errorf("out of range (allowed: %s)", v.Range())
	}
	if v.check != nil {
		if err := v.check(int(n)); err != nil {
			return err
		}
	}
	*v.p = int(n)
	return nil
}

func (v *intValue) OutOfRange() []string {
	return []string{strconv.Itoa(v.min - 1), strconv.Itoa(v.max + 1)}
}

// intFlag registers an int flag whose values are min..max (and pass check,
// when given); the range is added to usage.
func intFlag(fs *pflag.FlagSet, p *int, name string, def, min, max int, usage string, check ...func(int) error) {
	*p = def
	v := &intValue{p: p, min: min, max: max}
	if len(check) > 0 {
		v.check = check[0]
	}
	fs.Var(v, name, usage+" ("+v.Range()+")")
}

// durationValue is a duration flag's value within [min, max].
type durationValue struct {
	p        *time.Duration
	min, max time.Duration
}

func (v *durationValue) String() string { return shortDuration(*v.p) }
func (v *durationValue) Type() string   { return "duration" }
func (v *durationValue) Range() string {
	return shortDuration(v.min) + ".." + shortDuration(v.max)
}

func (v *durationValue) Set(s string) error {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("not a duration such as 30s, 5m or 1h30m (allowed: %s)", v.Range())
	}
	if d < v.min || d > v.max {
		return fmt.Errorf("out of range (allowed: %s)", v.Range())
	}
	*v.p = d
	return nil
}

func (v *durationValue) OutOfRange() []string {
	return []string{shortDuration(v.min - time.Millisecond), shortDuration(v.max + time.Second)}
}

// durationFlag registers a duration flag whose values are min..max; the
// range is added to usage.
func durationFlag(fs *pflag.FlagSet, p *time.Duration, name string, def, min, max time.Duration, usage string) {
	*p = def
	v := &durationValue{p: p, min: min, max: max}
	fs.Var(v, name, usage+" ("+v.Range()+")")
}

// shortDuration is d without zero minutes and seconds: 1h, 24h, 1m30s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
