package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/livebackup"
	"github.com/vmshadow/vmshadow/internal/nbd"
	libvirtprov "github.com/vmshadow/vmshadow/internal/provider/libvirt"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	xapiprov "github.com/vmshadow/vmshadow/internal/provider/xapi"
	"github.com/vmshadow/vmshadow/internal/qga"
	"github.com/vmshadow/vmshadow/internal/qmp"
	"github.com/vmshadow/vmshadow/internal/vmconn"
)

// vmFlags are the flags that name a VM and the writers of its snapshot sets,
// shared by the snapshot, recover and backup commands. A VM is a QEMU VM
// behind a QMP socket (--qmp), a XenServer / XCP-ng VM of a pool (--xapi
// and --vm), or a libvirt domain (--libvirt and --vm).
type vmFlags struct {
	qmp           string
	x             xapiFlags
	libvirt       string // --libvirt: libvirt's connection URI
	vm            string // with --xapi: the VM's name-label or UUID; with --libvirt: the domain's name or UUID
	qga           string
	guestAgent    bool // --guest-agent: freeze through libvirt (--libvirt)
	hooks         []string
	guestHooks    []string
	freezeTimeout time.Duration
	writerTimeout time.Duration
	scratchDir    string
	require       string
	stateDir      string
	noPause       bool // --xapi-no-pause
	hostConns     int  // --xapi-nbd-connections (backup)
	peerTimeout   time.Duration
}

// defaultPeerTimeout bounds each wait on a peer (a QMP command, a guest
// agent call outside writer calls, an NBD handshake, an NBD server sending
// nothing while reads wait).
const defaultPeerTimeout = 60 * time.Second

// addPeer adds --peer-timeout.
func (f *vmFlags) addPeer(cmd *cobra.Command) {
	durationFlag(cmd.Flags(), &f.peerTimeout, "peer-timeout", defaultPeerTimeout, time.Second, time.Hour, "longest wait for QEMU (each QMP command), the guest agent, or an NBD server to answer")
}

// applyPeerTimeout sets --peer-timeout (range-checked as it was parsed) as
// the limit of every peer client.
func (f *vmFlags) applyPeerTimeout() {
	if f.peerTimeout == 0 { // a command without --peer-timeout
		f.peerTimeout = defaultPeerTimeout
	}
	qmp.CommandTimeout = f.peerTimeout
	qga.CommandTimeout = f.peerTimeout
	nbd.DefaultHandshakeTimeout = f.peerTimeout
	nbd.DefaultIdleTimeout = f.peerTimeout
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

// addVM adds --qmp, the XAPI flags (--xapi, --vm, ...) and --state-dir.
func (f *vmFlags) addVM(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.qmp, "qmp", "", "the QEMU VM's QMP UNIX socket (or --xapi and --vm)")
	f.x.register(cmd, "xapi", "the XenServer / XCP-ng pool master, https://HOST (with --vm)")
	f.addLibvirt(cmd)
	cmd.Flags().StringVar(&f.vm, "vm", "", "with --xapi: the VM's name-label or UUID; with --libvirt: the domain's name or UUID")
	cmd.Flags().StringVar(&f.stateDir, "state-dir", defaultStateDir(), "directory of vmshadow's journals (env VMSHADOW_STATE_DIR)")
	f.addPeer(cmd)
}

// addLibvirt adds --libvirt.
func (f *vmFlags) addLibvirt(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.libvirt, "libvirt", "", "libvirt's connection URI, usually qemu:///system: a libvirt domain (with --vm NAME|UUID)")
}

// addWriters adds the writer flags (--qga, --hook, --guest-agent).
func (f *vmFlags) addWriters(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&f.guestAgent, "guest-agent", false, "with --libvirt: freeze the guest's file systems through libvirt's guest agent channel (virDomainFSFreeze)")
	cmd.Flags().StringVar(&f.qga, "qga", "", "the guest agent's UNIX socket: freeze the guest's file systems")
	cmd.Flags().StringArrayVar(&f.hooks, "hook", nil, "executable on this host called with freeze/thaw around the instant (repeatable, run in order, thawed in reverse)")
	cmd.Flags().StringArrayVar(&f.guestHooks, "guest-hook", nil, "program inside the guest run through the agent (--qga) with freeze/thaw, before the file systems freeze (repeatable)")
}

// addSet adds the flags of taking a set.
func (f *vmFlags) addSet(cmd *cobra.Command) {
	f.addWriters(cmd)
	durationFlag(cmd.Flags(), &f.freezeTimeout, "freeze-timeout", coord.DefaultFreezeTimeout, time.Second, 10*time.Minute, "longest time from the first freeze to the last thaw")
	durationFlag(cmd.Flags(), &f.writerTimeout, "writer-timeout", coord.DefaultWriterTimeout, time.Second, time.Hour, "longest time for each writer call")
	cmd.Flags().StringVar(&f.scratchDir, "scratch-dir", "", "directory of the diff area (scratch files) and NBD socket (default STATE_DIR/scratch)")
	cmd.Flags().StringVar(&f.require, "require", "", "fail unless the set reaches this consistency: filesystem or application")
	cmd.Flags().BoolVar(&f.noPause, "xapi-no-pause", false, "with --xapi: do not pause a running VM with several disks around VM.snapshot (XAPI then snapshots its disks one after another, not at one instant)")
}

// The providers coordinator builds back up live too: each is its own
// change tracking (livebackup.Provider).
var (
	_ livebackup.Provider = (*qemu.Provider)(nil)
	_ livebackup.Provider = (*xapiprov.Provider)(nil)
	_ livebackup.Provider = (*libvirtprov.Provider)(nil)
)

// coordinator builds the coordinator for the flags: the one place that
// maps the flags to a vmconn target. The flag-specific refusals come
// first, so their messages name the flags.
func (f *vmFlags) coordinator(a *app) (*coord.Coordinator, error) {
	n := 0
	for _, v := range []string{f.qmp, f.x.url, f.libvirt} {
		if v != "" {
			n++
		}
	}
	switch {
	case n > 1:
		return nil, errorf(errs.ErrUsage, "give one of --qmp SOCKET (a QEMU VM), --xapi URL (a XenServer / XCP-ng VM) or --libvirt URI (a libvirt domain), not %s", map[bool]string{true: "both", false: "all three"}[n == 2])
	case n == 0:
		return nil, errorf(errs.ErrUsage, "--qmp is required (or --xapi URL --vm NAME|UUID for a XenServer / XCP-ng VM, or --libvirt qemu:///system --vm NAME|UUID for a libvirt domain)")
	case f.guestAgent && f.libvirt == "":
		return nil, errorf(errs.ErrUsage, "--guest-agent freezes through libvirt: it goes with --libvirt (with --qmp use --qga SOCKET)")
	case f.libvirt != "" && f.qga != "":
		return nil, errorf(errs.ErrUsage, "--qga is refused with --libvirt: libvirt owns the domain's guest agent channel; use --guest-agent to freeze through libvirt")
	case f.libvirt != "" && len(f.guestHooks) > 0:
		return nil, errorf(errs.ErrUsage, "--guest-hook is refused with --libvirt: libvirt offers no guest-exec that leaves the domain untainted; use --hook, or a fsfreeze hook script in the guest with --guest-agent")
	case f.libvirt != "" && f.vm == "":
		return nil, errorf(errs.ErrUsage, "--vm NAME|UUID (the domain) is required with --libvirt")
	case f.x.url != "" && (f.qga != "" || len(f.guestHooks) > 0):
		return nil, errorf(errs.ErrUsage, "--qga and --guest-hook talk to the QEMU guest agent, which XenServer VMs do not run: use --hook")
	case f.x.url != "" && f.vm == "":
		return nil, errorf(errs.ErrUsage, "--vm NAME|UUID is required with --xapi")
	case len(f.guestHooks) > 0 && f.qga == "":
		return nil, errorf(errs.ErrUsage, "--guest-hook runs through the guest agent: give --qga too")
	}
	f.applyPeerTimeout()
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
	t := vmconn.Target{QMP: f.qmp, Libvirt: f.libvirt, VM: f.vm, XAPIInsecure: f.x.insecure, XAPINoPause: f.noPause, HostConns: f.hostConns}
	switch {
	case f.libvirt != "":
		if _, _, err := libvirtprov.ParseURI(f.libvirt); err != nil {
			return nil, fmt.Errorf("--libvirt: %w", err)
		}
	case f.x.url != "":
		cfg, err := f.x.config(a)
		if err != nil {
			return nil, err
		}
		t.XAPI = &cfg
	}
	w := vmconn.Writers{QGA: f.qga, GuestAgent: f.guestAgent, Hooks: f.hooks, GuestHooks: f.guestHooks}
	return vmconn.Coordinator(t, w, vmconn.Options{StateDir: f.stateDir, ScratchDir: f.scratchDir, Coord: opts})
}

// session builds the coordinator and opens its session: locked for
// commands that change the VM, or not (Inspect) for those that only read
// its state while another process may hold the lock.
func (f *vmFlags) session(ctx context.Context, a *app, locked bool) (*coord.Session, error) {
	c, err := f.coordinator(a)
	if err != nil {
		return nil, err
	}
	if locked {
		return c.Open(ctx)
	}
	return c.Inspect(ctx)
}
