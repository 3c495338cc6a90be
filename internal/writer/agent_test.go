package writer

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/qga/qgatest"
)

// TestAgentThawsAFrozenGuest: a guest left frozen (the process that froze
// it was killed) is thawed by an agent writer rebuilt from the journal,
// although the agent disables its freeze commands while frozen (as
// qemu-ga does); an agent that cannot freeze is refused before a set.
func TestAgentThawsAFrozenGuest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fake := qgatest.Start(t, qgatest.OK, "")
	fake.SetFrozen(true)
	w, err := FromSpec(NewAgent(fake.Path, nil).Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if err := w.Prepare(ctx, coord.SetContext{VM: "vm"}); err != nil {
		t.Fatalf("prepare to thaw a frozen guest: %v", err)
	}
	if err := w.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
	if fake.Frozen() {
		t.Fatal("the guest is still frozen")
	}
	// Thawed, the same agent can freeze; a second freeze of a frozen
	// guest is refused by Freeze, not by Prepare.
	if err := w.Prepare(ctx, coord.SetContext{VM: "vm"}); err != nil {
		t.Fatal(err)
	}
	if err := w.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.Freeze(ctx); err == nil || errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("freeze of a frozen guest: %v", err)
	}
}
