package livebackup

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// untracked is a provider that takes snapshot sets but has no change
// tracking (it does not implement Provider).
type untracked struct{ coord.Provider }

func (untracked) Kind() string { return "othervisor" }

// TestStartNeedsChangeTracking: a provider without change tracking is
// refused with a clear error before the VM is touched (no session opened:
// the embedded coord.Provider is nil, so any call into it would panic).
func TestStartNeedsChangeTracking(t *testing.T) {
	_, err := Start(context.Background(), nil, Options{Coordinator: &coord.Coordinator{Provider: untracked{}}})
	if !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), "othervisor") {
		t.Fatalf("Start with a provider without change tracking: %v, want ErrUnsupported naming the provider", err)
	}
}
