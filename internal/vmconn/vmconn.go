// Package vmconn owns reaching a VM: a Target (a QEMU VM's QMP socket, a
// XenServer / XCP-ng pool's VM, a libvirt domain) and its Writers (guest
// agent, hook scripts) turned into the coordinator of its snapshot sets
// (Coordinator), for the CLI's flags and the server's connections alike,
// and listing the VMs a connection reaches (Lister).
package vmconn

import (
	"fmt"
	"path/filepath"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	libvirtprov "github.com/vmshadow/vmshadow/internal/provider/libvirt"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	xapiprov "github.com/vmshadow/vmshadow/internal/provider/xapi"
	"github.com/vmshadow/vmshadow/internal/writer"
	"github.com/vmshadow/vmshadow/internal/xapi"
)

// Target names one VM and how to reach it: exactly one of QMP, XAPI and
// Libvirt is set.
type Target struct {
	// QMP is a QEMU VM's QMP socket.
	QMP string
	// XAPI is the pool master of a XenServer / XCP-ng VM (VM names it).
	XAPI *xapi.Config
	// XAPIInsecure allows NBD without TLS; XAPINoPause does not pause a
	// running VM around VM.snapshot; HostConns bounds NBD connections
	// per pool host (see the XAPI provider's Options).
	XAPIInsecure bool
	XAPINoPause  bool
	HostConns    int
	// Libvirt is libvirt's connection URI (VM names the domain).
	Libvirt string
	// VM is the VM's name or UUID (XAPI, libvirt).
	VM string
}

// Writers are what freezes and thaws the VM's applications around the
// instant.
type Writers struct {
	// QGA is the QEMU guest agent's socket (QMP targets): the guest's
	// file systems freeze last and thaw first.
	QGA string
	// GuestAgent freezes through libvirt's guest agent channel (libvirt
	// targets).
	GuestAgent bool
	// Hooks are host executables called with freeze/thaw, in order.
	Hooks []string
	// GuestHooks are programs in the guest run through QGA.
	GuestHooks []string
}

// Options are where the journal and scratch files live and the set's
// limits.
type Options struct {
	// StateDir holds the journal (STATE_DIR/journal) and, unless
	// ScratchDir is set, the scratch files (STATE_DIR/scratch).
	StateDir   string
	ScratchDir string
	Coord      coord.Options
}

// Coordinator builds the coordinator of t's snapshot sets with writers w.
// Combinations a provider cannot honour are errs.ErrUsage.
func Coordinator(t Target, w Writers, o Options) (*coord.Coordinator, error) {
	n := 0
	for _, set := range []bool{t.QMP != "", t.XAPI != nil, t.Libvirt != ""} {
		if set {
			n++
		}
	}
	if n != 1 {
		return nil, fmt.Errorf("a VM is reached through exactly one of QMP, XAPI or libvirt (%d given): %w", n, errs.ErrUsage)
	}
	scratch := o.ScratchDir
	if scratch == "" {
		scratch = filepath.Join(o.StateDir, "scratch")
	}
	c := &coord.Coordinator{
		Journal: &coord.Journal{Dir: filepath.Join(o.StateDir, "journal")},
		Rebuild: RebuildWriter,
		Options: o.Coord,
	}
	warn := o.Coord.Warn
	switch {
	case t.Libvirt != "":
		if w.QGA != "" {
			return nil, fmt.Errorf("the QEMU guest agent socket is refused for a libvirt domain: libvirt owns the domain's guest agent channel; freeze through libvirt instead: %w", errs.ErrUsage)
		}
		if len(w.GuestHooks) > 0 {
			return nil, fmt.Errorf("guest hooks are refused for a libvirt domain: libvirt offers no guest-exec that leaves the domain untainted; use host hooks, or a fsfreeze hook script in the guest with the guest agent freeze: %w", errs.ErrUsage)
		}
		if t.VM == "" {
			return nil, fmt.Errorf("a libvirt domain needs its name or UUID: %w", errs.ErrUsage)
		}
		if _, _, err := libvirtprov.ParseURI(t.Libvirt); err != nil {
			return nil, err
		}
		c.Provider = libvirtprov.New(libvirtprov.Options{URI: t.Libvirt, Domain: t.VM, ScratchDir: scratch, Warn: warn})
	case t.XAPI != nil:
		if w.QGA != "" || len(w.GuestHooks) > 0 || w.GuestAgent {
			return nil, fmt.Errorf("the guest agent and guest hooks talk to the QEMU guest agent, which XenServer VMs do not run: use host hooks: %w", errs.ErrUsage)
		}
		if t.VM == "" {
			return nil, fmt.Errorf("a XenServer VM needs its name-label or UUID: %w", errs.ErrUsage)
		}
		c.Provider = xapiprov.New(xapiprov.Options{Pool: *t.XAPI, VM: t.VM, Insecure: t.XAPIInsecure, NoPause: t.XAPINoPause, HostConns: t.HostConns, Warn: warn})
	default:
		if w.GuestAgent {
			return nil, fmt.Errorf("the libvirt guest agent freeze is for libvirt domains; a QEMU VM's guest agent is reached through its socket: %w", errs.ErrUsage)
		}
		c.Provider = qemu.New(qemu.Options{QMPPath: t.QMP, ScratchDir: scratch, Warn: warn})
	}
	for _, h := range w.Hooks {
		hw, err := writer.NewHook(h)
		if err != nil {
			return nil, err
		}
		c.Writers = append(c.Writers, hw)
	}
	if len(w.GuestHooks) > 0 && w.QGA == "" {
		return nil, fmt.Errorf("guest hooks run through the guest agent: give its socket too: %w", errs.ErrUsage)
	}
	if w.QGA != "" {
		ag := writer.NewAgent(w.QGA, nil)
		ag.Warn = warn
		for _, g := range w.GuestHooks {
			c.Writers = append(c.Writers, writer.NewGuestHook(ag, g))
		}
		c.Writers = append(c.Writers, ag) // file systems freeze last, thaw first
	}
	if w.GuestAgent {
		c.Writers = append(c.Writers, libvirtprov.NewFSFreeze(t.Libvirt, t.VM, nil)) // file systems freeze last
	}
	return c, nil
}

// writerKinds rebuild, from a journal, the writers of a provider package
// (coord.WriterSpec.Kind to its FromSpec); other kinds are writer.FromSpec's.
var writerKinds = map[string]func(coord.WriterSpec) (coord.Writer, error){
	libvirtprov.WriterKind: libvirtprov.FromSpec,
}

// RebuildWriter is the coordinator's Rebuild: a journal's writer from its
// spec.
func RebuildWriter(s coord.WriterSpec) (coord.Writer, error) {
	if fn, ok := writerKinds[s.Kind]; ok {
		return fn(s)
	}
	return writer.FromSpec(s)
}
