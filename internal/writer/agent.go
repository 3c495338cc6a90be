package writer

import (
	"context"
	"fmt"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/qga"
)

// Agent freezes the guest's file systems through qemu-ga
// (guest-fsfreeze-freeze; the agent runs the guest's own fsfreeze hook
// first, and on Windows drives VSS, so guest applications take part too).
type Agent struct {
	path        string
	mountpoints []string
	// Warn, if set, is told of things worth knowing that are not failures
	// (no file system was frozen).
	Warn func(string)

	c *qga.Client
}

// NewAgent returns the writer for the agent socket at path. With
// mountpoints, only those file systems are frozen.
func NewAgent(path string, mountpoints []string) *Agent {
	return &Agent{path: path, mountpoints: mountpoints}
}

func (a *Agent) Name() string           { return "guest-agent" }
func (a *Agent) Level() coord.Level     { return coord.Filesystem }
func (a *Agent) Spec() coord.WriterSpec { return coord.WriterSpec{Kind: "agent", Path: a.path} }

// Close drops the agent connection.
func (a *Agent) Close() error {
	if a.c == nil {
		return nil
	}
	err := a.c.Close()
	a.c = nil
	return err
}

func (a *Agent) client(ctx context.Context) (*qga.Client, error) {
	if a.c == nil {
		c, err := qga.Dial(ctx, a.path)
		if err != nil {
			return nil, err
		}
		a.c = c
	}
	return a.c, nil
}

// Prepare connects to the agent and checks that it can freeze.
func (a *Agent) Prepare(ctx context.Context, _ coord.SetContext) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	info, err := c.Info(ctx)
	if err != nil {
		return fmt.Errorf("guest-info: %w", err)
	}
	cmd := "guest-fsfreeze-freeze"
	if len(a.mountpoints) > 0 {
		cmd = "guest-fsfreeze-freeze-list"
	}
	if !info.Supports(cmd) || !info.Supports("guest-fsfreeze-thaw") {
		return fmt.Errorf("the guest agent (version %s) does not offer %s (disabled with --blacklist/-b?): %w", info.Version, cmd, errs.ErrUnsupported)
	}
	return nil
}

// Freeze freezes the guest's file systems.
func (a *Agent) Freeze(ctx context.Context) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	if st, err := c.FreezeStatus(ctx); err != nil {
		return err
	} else if st == "frozen" {
		return fmt.Errorf("the guest's file systems are already frozen (by another tool, or by a vmshadow that was killed: run 'vmshadow recover --qga %s')", a.path)
	}
	n, err := c.Freeze(ctx, a.mountpoints)
	if err != nil {
		return err
	}
	if n == 0 && a.Warn != nil {
		a.Warn("the guest agent froze no file system (the guest has no mounted block-device file system)")
	}
	return nil
}

// Thaw thaws the guest's file systems. It reconnects if the connection was
// lost (a freeze that timed out), and succeeds when nothing is frozen.
func (a *Agent) Thaw(ctx context.Context) error {
	c, err := a.client(ctx)
	if err != nil {
		return err
	}
	if _, err := c.Thaw(ctx); err != nil {
		// The agent refuses a thaw when nothing is frozen on some
		// versions; what matters is the state afterwards.
		if st, serr := c.FreezeStatus(ctx); serr == nil && st == "thawed" {
			return nil
		}
		return err
	}
	return nil
}

// Frozen reports whether the guest's file systems are frozen now.
func (a *Agent) Frozen(ctx context.Context) (bool, error) {
	c, err := a.client(ctx)
	if err != nil {
		return false, err
	}
	st, err := c.FreezeStatus(ctx)
	return st == "frozen", err
}

var (
	_ coord.Writer         = (*Agent)(nil)
	_ coord.FrozenReporter = (*Agent)(nil)
)

// FromSpec rebuilds a writer from its journal description.
func FromSpec(s coord.WriterSpec) (coord.Writer, error) {
	switch s.Kind {
	case "agent":
		return NewAgent(s.Path, nil), nil
	case "hook":
		return NewHook(s.Path)
	}
	return nil, fmt.Errorf("unknown writer kind %q in journal", s.Kind)
}
