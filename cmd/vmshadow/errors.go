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
// plain errors.
func isCobraUsage(err error) bool {
	s := err.Error()
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand", "accepts ", "requires at least", "required flag", "invalid argument"} {
		if strings.Contains(s, p) {
			return true
		}
	}
	return false
}
