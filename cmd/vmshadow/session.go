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
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/vmconn"
)

// vmFlags are the flags that name a VM and the writers of its snapshot sets,
// shared by the snapshot, recover and backup commands. A VM is a QEMU VM
// behind a QMP socket (--qmp), a XenServer / XCP-ng VM of a pool (--xapi
// and --vm), or a libvirt domain (--libvirt and --vm).
type vmFlags struct {
	// qmps, vms and qgas are the repeatable --qmp, --vm and --qga: several
	// VMs make one set across all of them (a consistency group, --group);
	// members() turns them into one vmFlags per VM with qmp, vm and qga
	// set.
	qmps          []string
	vms           []string
	qgas          []string
	group         string
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
	cmd.Flags().StringArrayVar(&f.qmps, "qmp", nil, "the QEMU VM's QMP UNIX socket (or --xapi and --vm); repeat for several VMs")
	f.x.register(cmd, "xapi", "the XenServer / XCP-ng pool master, https://HOST (with --vm)")
	f.addLibvirt(cmd)
	cmd.Flags().StringArrayVar(&f.vms, "vm", nil, "with --xapi: the VM's name-label or UUID; with --libvirt: the domain's name or UUID; repeat for several VMs")
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
	cmd.Flags().StringArrayVar(&f.qgas, "qga", nil, "the guest agent's UNIX socket: freeze the guest's file systems; with several --qmp, one --qga per --qmp in the same order")
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
	cmd.Flags().StringVar(&f.group, "group", "", "with several VMs (--qmp or --vm repeated): take one set across all of them, at one instant, and name the group NAME")
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

// members expands the flags into one vmFlags per VM, with qmp, vm and
// qga set: each --qmp (with the --qga at the same position), then each
// --vm of --libvirt or --xapi. With one VM the flags are taken as given
// (coordinator names what does not fit). Several VMs need --group when
// sets are created (group); host hooks then run once for the set (they
// go with the first VM), and guest hooks are refused.
func (f *vmFlags) members(group bool) ([]vmFlags, error) {
	first := func(v []string) string {
		if len(v) > 0 {
			return v[0]
		}
		return ""
	}
	if f.group != "" {
		if err := repo.ValidName("group", f.group); err != nil {
			return nil, fmt.Errorf("--group: %w", err)
		}
	}
	if len(f.qmps)+len(f.vms) <= 1 {
		if len(f.qgas) > 1 {
			return nil, errorf(errs.ErrUsage, "--qga is given %d times for one VM", len(f.qgas))
		}
		m := *f
		m.qmp, m.vm, m.qga = first(f.qmps), first(f.vms), first(f.qgas)
		return []vmFlags{m}, nil
	}
	switch {
	case f.group == "" && len(f.qmps) > 0 && (f.libvirt != "" || f.x.url != ""):
		return nil, errorf(errs.ErrUsage, "give one of --qmp SOCKET (a QEMU VM), --xapi URL (a XenServer / XCP-ng VM) or --libvirt URI (a libvirt domain), not both (VMs of different hypervisors make one set only as a group: --group NAME)")
	case group && f.group == "":
		return nil, errorf(errs.ErrUsage, "several VMs (%d) make one snapshot set across all of them: name the group with --group NAME", len(f.qmps)+len(f.vms))
	case group && f.noPause:
		return nil, errorf(errs.ErrUsage, "--xapi-no-pause is refused in a group: its VMs' disks must be captured at one instant")
	case len(f.qgas) > 0 && len(f.qgas) != len(f.qmps):
		return nil, errorf(errs.ErrUsage, "give one --qga per --qmp, in the same order (%d --qmp, %d --qga)", len(f.qmps), len(f.qgas))
	case len(f.guestHooks) > 0:
		return nil, errorf(errs.ErrUsage, "--guest-hook is for a set of one VM; in a group, freeze the guests' applications with --hook on this host, or with the guests' own fsfreeze hooks")
	case len(f.vms) > 0 && f.libvirt == "" && f.x.url == "":
		return nil, errorf(errs.ErrUsage, "--vm names a libvirt domain or a XenServer VM: give --libvirt URI or --xapi URL with it")
	case f.libvirt != "" && f.x.url != "":
		return nil, errorf(errs.ErrUsage, "the VMs given with --vm are reached through one of --libvirt or --xapi, not both")
	case len(f.vms) == 0 && (f.libvirt != "" || f.x.url != ""):
		return nil, errorf(errs.ErrUsage, "--libvirt and --xapi need the VMs they reach: --vm NAME|UUID")
	}
	for _, list := range [][]string{f.qmps, f.vms} {
		seen := map[string]bool{}
		for _, v := range list {
			if seen[v] {
				return nil, errorf(errs.ErrUsage, "VM %s is given twice", v)
			}
			seen[v] = true
		}
	}
	var ms []vmFlags
	for i, q := range f.qmps {
		m := *f
		m.qmp, m.vm, m.libvirt, m.x.url, m.guestAgent = q, "", "", "", false
		if len(f.qgas) > 0 {
			m.qga = f.qgas[i]
		}
		ms = append(ms, m)
	}
	for _, v := range f.vms {
		m := *f
		m.qmp, m.vm, m.qga = "", v, ""
		ms = append(ms, m)
	}
	for i := range ms {
		if i > 0 {
			ms[i].hooks = nil // host hooks run once for the set
		}
	}
	return ms, nil
}

// session builds the coordinator of the one VM the flags name and opens
// its session: locked for commands that change the VM, or not (Inspect)
// for those that only read its state while another process may hold the
// lock.
func (f *vmFlags) session(ctx context.Context, a *app, locked bool) (*coord.Session, error) {
	ss, err := f.sessions(ctx, a, locked, false)
	if err != nil {
		return nil, err
	}
	if len(ss) > 1 {
		for _, s := range ss {
			s.Close()
		}
		return nil, errorf(errs.ErrUsage, "this command works on one VM; %d were given", len(ss))
	}
	return ss[0], nil
}

// sessions opens a session per VM the flags name (members), in order; on
// error none stays open.
func (f *vmFlags) sessions(ctx context.Context, a *app, locked, group bool) ([]*coord.Session, error) {
	ms, err := f.members(group)
	if err != nil {
		return nil, err
	}
	var cs []*coord.Coordinator
	for i := range ms {
		c, err := ms[i].coordinator(a)
		if err != nil {
			return nil, err
		}
		cs = append(cs, c)
	}
	var ss []*coord.Session
	for _, c := range cs {
		var s *coord.Session
		if locked {
			s, err = c.Open(ctx)
		} else {
			s, err = c.Inspect(ctx)
		}
		if err != nil {
			for _, s := range ss {
				s.Close()
			}
			return nil, err
		}
		ss = append(ss, s)
	}
	return ss, nil
}
