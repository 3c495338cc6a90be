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
	if !info.Supports("guest-fsfreeze-thaw") {
		return fmt.Errorf("the guest agent (version %s) does not offer guest-fsfreeze-thaw (disabled with --blacklist/-b?): %w", info.Version, errs.ErrUnsupported)
	}
	if !info.Supports(cmd) {
		// While the guest is frozen the agent disables every command but
		// a few, the thaw among them (qga/main.c, ga_freeze_allowlist): a
		// guest left frozen must still be thawed (Freeze refuses to
		// freeze it again).
		if st, err := c.FreezeStatus(ctx); err == nil && st == "frozen" {
			return nil
		}
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
	case "guest-hook":
		g := NewGuestHook(NewAgent(s.Socket, nil), s.Path)
		g.own = true
		return g, nil
	}
	return nil, fmt.Errorf("unknown writer kind %q in journal", s.Kind)
}

// GuestHook is an executable inside the guest that the guest agent runs
// (guest-exec) as "PATH freeze" and "PATH thaw", with VMSHADOW_VM,
// VMSHADOW_SET_ID and VMSHADOW_PHASE in its environment: an application
// writer that needs no configuration of the agent itself. It shares the
// agent writer's connection (the agent serves one client). Exit status 0 is
// success; a call that runs past its time limit fails, but the program goes
// on in the guest (the agent cannot kill it).
type GuestHook struct {
	agent *Agent
	path  string
	own   bool // the agent was made for this hook (rebuilt from a journal)
	set   coord.SetContext
}

// NewGuestHook returns the writer for the guest program path, run through agent.
func NewGuestHook(agent *Agent, path string) *GuestHook {
	return &GuestHook{agent: agent, path: path}
}

func (g *GuestHook) Name() string       { return "guest-hook:" + g.path }
func (g *GuestHook) Level() coord.Level { return coord.Application }
func (g *GuestHook) Spec() coord.WriterSpec {
	return coord.WriterSpec{Kind: "guest-hook", Path: g.path, Socket: g.agent.path}
}

// Close drops the agent connection if the hook owns it.
func (g *GuestHook) Close() error {
	if g.own {
		return g.agent.Close()
	}
	return nil
}

// Prepare checks that the agent can run programs.
func (g *GuestHook) Prepare(ctx context.Context, set coord.SetContext) error {
	g.set = set
	c, err := g.agent.client(ctx)
	if err != nil {
		return err
	}
	info, err := c.Info(ctx)
	if err != nil {
		return fmt.Errorf("guest-info: %w", err)
	}
	if !info.Supports("guest-exec") || !info.Supports("guest-exec-status") {
		return fmt.Errorf("the guest agent (version %s) does not allow guest-exec, which guest hooks need (see its --allow-rpcs/--block-rpcs): %w", info.Version, errs.ErrUnsupported)
	}
	return nil
}

func (g *GuestHook) Freeze(ctx context.Context) error { return g.run(ctx, "freeze") }
func (g *GuestHook) Thaw(ctx context.Context) error   { return g.run(ctx, "thaw") }

func (g *GuestHook) run(ctx context.Context, phase string) error {
	c, err := g.agent.client(ctx)
	if err != nil {
		return err
	}
	res, err := c.Exec(ctx, g.path, []string{phase},
		[]string{"VMSHADOW_VM=" + g.set.VM, "VMSHADOW_SET_ID=" + g.set.SetID, "VMSHADOW_PHASE=" + phase}, nil)
	if err != nil {
		return fmt.Errorf("run %s %s in the guest: %w", g.path, phase, err)
	}
	if res.ExitCode != 0 || res.Signal != 0 {
		var out tailBuffer
		out.Write(res.Stdout)
		out.Write(res.Stderr)
		return fmt.Errorf("%s %s in the guest: exit status %d%s", g.path, phase, res.ExitCode, out.describe())
	}
	return nil
}

var _ coord.Writer = (*GuestHook)(nil)
