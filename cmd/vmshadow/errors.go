package main

import (
	"fmt"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// usageError marks a command-line mistake found by cobra or by a command.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// errorf wraps a formatted message with an error class.
func errorf(class *errs.Class, format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), class)
}

// isCobraUsage recognises cobra's own argument errors, which it returns as
// plain errors, by how they begin (an error of vmshadow's that merely
// contains "invalid argument", an EINVAL, is not one).
func isCobraUsage(err error) bool {
	if errs.ExitCode(err) != 1 {
		return false
	}
	s := err.Error()
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand", "accepts ", "requires at least", "required flag", "invalid argument"} {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}
