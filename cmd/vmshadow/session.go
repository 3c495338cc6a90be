package main

import (
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	"github.com/vmshadow/vmshadow/internal/writer"
)

// vmFlags are the flags that name a VM and the writers of its snapshot sets,
// shared by the snapshot, recover and backup commands.
type vmFlags struct {
	qmp           string
	qga           string
	hooks         []string
	guestHooks    []string
	freezeTimeout time.Duration
	writerTimeout time.Duration
	scratchDir    string
	require       string
	stateDir      string
}

// defaultStateDir is where journals live: VMSHADOW_STATE_DIR, else
// /var/lib/vmshadow for root, else $XDG_STATE_HOME/vmshadow.
func defaultStateDir() string {
	if d := os.Getenv("VMSHADOW_STATE_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/vmshadow"
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "vmshadow")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "state", "vmshadow")
}

// addVM adds --qmp and --state-dir.
func (f *vmFlags) addVM(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.qmp, "qmp", "", "the VM's QMP UNIX socket (required)")
	cmd.Flags().StringVar(&f.stateDir, "state-dir", defaultStateDir(), "directory of vmshadow's journals (env VMSHADOW_STATE_DIR)")
	cmd.MarkFlagRequired("qmp")
}

// addWriters adds the writer flags (--qga, --hook).
func (f *vmFlags) addWriters(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.qga, "qga", "", "the guest agent's UNIX socket: freeze the guest's file systems")
	cmd.Flags().StringArrayVar(&f.hooks, "hook", nil, "executable on this host called with freeze/thaw around the instant (repeatable, run in order, thawed in reverse)")
	cmd.Flags().StringArrayVar(&f.guestHooks, "guest-hook", nil, "program inside the guest run through the agent (--qga) with freeze/thaw, before the file systems freeze (repeatable)")
}

// addSet adds the flags of taking a set.
func (f *vmFlags) addSet(cmd *cobra.Command) {
	f.addWriters(cmd)
	cmd.Flags().DurationVar(&f.freezeTimeout, "freeze-timeout", coord.DefaultFreezeTimeout, "longest time from the first freeze to the last thaw")
	cmd.Flags().DurationVar(&f.writerTimeout, "writer-timeout", coord.DefaultWriterTimeout, "longest time for each writer call")
	cmd.Flags().StringVar(&f.scratchDir, "scratch-dir", "", "directory of the diff area (scratch files) and NBD socket (default STATE_DIR/scratch)")
	cmd.Flags().StringVar(&f.require, "require", "", "fail unless the set reaches this consistency: filesystem or application")
}

// coordinator builds the coordinator for the flags.
func (f *vmFlags) coordinator(a *app) (*coord.Coordinator, error) {
	if f.qmp == "" {
		return nil, errorf(errs.ErrUsage, "--qmp is required")
	}
	opts := coord.Options{FreezeTimeout: f.freezeTimeout, WriterTimeout: f.writerTimeout,
		Status: func(phase string) { a.out.Status(map[string]string{"phase": phase}, "") },
		Warn:   func(msg string) { a.out.Warn("%s", msg) },
	}
	if f.require != "" {
		lvl, err := coord.ParseLevel(f.require)
		if err != nil {
			return nil, err
		}
		opts.Require = lvl
	}
	scratch := f.scratchDir
	if scratch == "" {
		scratch = filepath.Join(f.stateDir, "scratch")
	}
	c := &coord.Coordinator{
		Provider: qemu.New(qemu.Options{QMPPath: f.qmp, ScratchDir: scratch, Warn: opts.Warn}),
		Journal:  &coord.Journal{Dir: filepath.Join(f.stateDir, "journal")},
		Rebuild:  writer.FromSpec,
		Options:  opts,
	}
	for _, h := range f.hooks {
		w, err := writer.NewHook(h)
		if err != nil {
			return nil, err
		}
		c.Writers = append(c.Writers, w)
	}
	if len(f.guestHooks) > 0 && f.qga == "" {
		return nil, errorf(errs.ErrUsage, "--guest-hook runs through the guest agent: give --qga too")
	}
	if f.qga != "" {
		ag := writer.NewAgent(f.qga, nil)
		ag.Warn = opts.Warn
		for _, g := range f.guestHooks {
			c.Writers = append(c.Writers, writer.NewGuestHook(ag, g))
		}
		c.Writers = append(c.Writers, ag) // file systems freeze last, thaw first
	}
	return c, nil
}
