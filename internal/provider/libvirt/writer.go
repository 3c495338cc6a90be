package libvirt

import (
	"context"
	"fmt"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// WriterKind is the journal kind of FSFreeze (coord.WriterSpec.Kind).
const WriterKind = "libvirt-agent"

// FSFreeze is the guest-agent writer of a libvirt domain: libvirt owns the
// domain's qemu-ga channel, so the file systems are frozen and thawed
// through virDomainFSFreeze and virDomainFSThaw (qemu-ga runs the guest's
// fsfreeze hook first, and drives VSS on Windows). See the package doc for
// why not the QUIESCE flag.
type FSFreeze struct {
	uri, domain string
	mountpoints []string
	p           *Provider
}

// NewFSFreeze returns the writer for the domain (name or UUID) at uri.
// With mountpoints, only those file systems are frozen.
func NewFSFreeze(uri, domain string, mountpoints []string) *FSFreeze {
	if uri == "" {
		uri = DefaultURI
	}
	return &FSFreeze{uri: uri, domain: domain, mountpoints: mountpoints, p: New(Options{URI: uri, Domain: domain})}
}

// FromSpec rebuilds the writer from its journal record.
func FromSpec(s coord.WriterSpec) (coord.Writer, error) {
	if s.Kind != WriterKind {
		return nil, fmt.Errorf("writer kind %q is not %s", s.Kind, WriterKind)
	}
	return NewFSFreeze(s.Socket, s.Path, nil), nil
}

func (w *FSFreeze) Name() string       { return "guest-agent" }
func (w *FSFreeze) Level() coord.Level { return coord.Filesystem }

// Spec records the domain in Path and the URI in Socket.
func (w *FSFreeze) Spec() coord.WriterSpec {
	return coord.WriterSpec{Kind: WriterKind, Path: w.domain, Socket: w.uri}
}

// Close drops the connection.
func (w *FSFreeze) Close() error { return w.p.Close() }

func (w *FSFreeze) conn(ctx context.Context) (*golibvirt.Libvirt, golibvirt.Domain, error) {
	l, err := w.p.connect(ctx)
	if err != nil {
		return nil, golibvirt.Domain{}, err
	}
	if w.p.dom.Name == "" {
		dom, err := lookup(ctx, l, w.domain)
		if err != nil {
			return nil, golibvirt.Domain{}, err
		}
		w.p.dom = dom
	}
	return l, w.p.dom, nil
}

// Prepare checks that the domain has a guest agent channel and that the
// agent is connected.
func (w *FSFreeze) Prepare(ctx context.Context, _ coord.SetContext) error {
	l, dom, err := w.conn(ctx)
	if err != nil {
		return err
	}
	x, err := call(ctx, func() (string, error) { return l.DomainGetXMLDesc(dom, 0) })
	if err != nil {
		return fmt.Errorf("domain %s: get XML: %w", dom.Name, classify(err))
	}
	live, err := parseDomainXML(x)
	if err != nil {
		return err
	}
	switch present, connected := live.agentChannel(); {
	case !present:
		return fmt.Errorf("domain %s has no guest agent channel (add <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel> and install qemu-guest-agent in the guest): %w", dom.Name, errs.ErrUnsupported)
	case !connected:
		return fmt.Errorf("the guest agent of domain %s is not connected (qemu-guest-agent not running in the guest?): %w", dom.Name, errs.ErrConnect)
	}
	return nil
}

// Freeze freezes the guest's file systems (virDomainFSFreeze).
func (w *FSFreeze) Freeze(ctx context.Context) error {
	l, dom, err := w.conn(ctx)
	if err != nil {
		return err
	}
	_, err = call(ctx, func() (int32, error) { return l.DomainFsfreeze(dom, w.mountpoints, 0) })
	if err != nil {
		return fmt.Errorf("domain %s: freeze file systems: %w", dom.Name, classify(err))
	}
	return nil
}

// Thaw thaws the guest's file systems (virDomainFSThaw); it succeeds when
// nothing is frozen.
func (w *FSFreeze) Thaw(ctx context.Context) error {
	l, dom, err := w.conn(ctx)
	if err != nil {
		return err
	}
	_, err = call(ctx, func() (int32, error) { return l.DomainFsthaw(dom, w.mountpoints, 0) })
	if err != nil {
		return fmt.Errorf("domain %s: thaw file systems: %w", dom.Name, classify(err))
	}
	return nil
}

var (
	_ coord.Writer   = (*FSFreeze)(nil)
	_ coord.Provider = (*Provider)(nil)
)
