package main

import (
	"errors"
	"fmt"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// TestIsCobraUsage: cobra's own argument errors are usage errors; an error
// of vmshadow's that only contains the same words (EINVAL is "invalid
// argument") is not.
func TestIsCobraUsage(t *testing.T) {
	for _, s := range []string{
		`unknown command "frob" for "vmshadow"`,
		`accepts 1 arg(s), received 0`,
		`requires at least 1 arg(s), only received 0`,
		`required flag(s) "repo" not set`,
		`unknown flag: --bogus`,
	} {
		if !isCobraUsage(errors.New(s)) {
			t.Errorf("%q is not recognised as a usage error", s)
		}
	}
	for _, err := range []error{
		errors.New("read image /x at offset 0: read /x: invalid argument"),
		errors.New("NBD server: unknown command 7"),
		fmt.Errorf("accepts 1 arg(s) from the guest: %w", errs.ErrTimeout),
	} {
		if isCobraUsage(err) {
			t.Errorf("%q is taken for a usage error", err)
		}
	}
}
