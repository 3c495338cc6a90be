package errs

import (
	"context"
	"errors"
	"fmt"
	"testing"
)

func TestExitCode(t *testing.T) {
	tests := []struct {
		name string
		err  error
		code int
		cls  string
	}{
		{"nil", nil, 0, "error"},
		{"plain", errors.New("x"), 1, "error"},
		{"busy wrapped twice", fmt.Errorf("a: %w", fmt.Errorf("b: %w", ErrBusy)), 3, "busy"},
		{"cancelled", fmt.Errorf("read: %w", context.Canceled), 130, "interrupted"},
		{"deadline", fmt.Errorf("freeze: %w", context.DeadlineExceeded), 5, "time limit exceeded"},
		{"class wins over deadline", fmt.Errorf("%w: %w", ErrConsistency, context.DeadlineExceeded), 4, "consistency requirement not met"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ExitCode(tt.err); got != tt.code {
				t.Errorf("ExitCode = %d, want %d", got, tt.code)
			}
			if tt.err != nil {
				if got := ClassName(tt.err); got != tt.cls {
					t.Errorf("ClassName = %q, want %q", got, tt.cls)
				}
			}
		})
	}
}

func TestCodesUnique(t *testing.T) {
	seen := map[int]string{0: "success", 1: "general failure"}
	for _, c := range All {
		if prev, ok := seen[c.ExitCode()]; ok {
			t.Errorf("exit code %d used by %q and %q", c.ExitCode(), prev, c.Error())
		}
		seen[c.ExitCode()] = c.Error()
	}
}
