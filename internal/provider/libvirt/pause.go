package libvirt

import (
	"context"
	"fmt"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmshadow/vmshadow/internal/coord"
)

var _ coord.Pauser = (*Provider)(nil)

// Running implements coord.Pauser: whether the domain's state is running.
func (p *Provider) Running(ctx context.Context) (bool, error) {
	l, err := p.connect(ctx)
	if err != nil {
		return false, err
	}
	state, _, err := call2(ctx, func() (int32, int32, error) { return l.DomainGetState(p.dom, 0) })
	if err != nil {
		return false, fmt.Errorf("domain %s: get state: %w", p.dom.Name, classify(err))
	}
	return golibvirt.DomainState(state) == golibvirt.DomainRunning, nil
}

// Pause implements coord.Pauser with virDomainSuspend. When ctx ends
// first (the freeze window), it still waits, bounded, for libvirt to
// finish the suspend (settle): a suspend left running could pause the
// domain after Resume looked, and leave it paused with nothing recorded.
func (p *Provider) Pause(ctx context.Context) error {
	l, err := p.connect(ctx)
	if err != nil {
		return err
	}
	if err := settle(ctx, func() error { return l.DomainSuspend(p.dom) }); err != nil {
		return fmt.Errorf("domain %s: suspend: %w", p.dom.Name, classify(err))
	}
	return nil
}

// Resume implements coord.Pauser with virDomainResume; a domain that is
// not paused (it runs, or stopped) is left alone.
func (p *Provider) Resume(ctx context.Context) error {
	l, err := p.connect(ctx)
	if err != nil {
		return err
	}
	state, _, err := call2(ctx, func() (int32, int32, error) { return l.DomainGetState(p.dom, 0) })
	if err != nil {
		return fmt.Errorf("domain %s: get state: %w", p.dom.Name, classify(err))
	}
	if golibvirt.DomainState(state) != golibvirt.DomainPaused {
		return nil
	}
	if _, err := call(ctx, func() (struct{}, error) { return struct{}{}, l.DomainResume(p.dom) }); err != nil {
		return fmt.Errorf("domain %s: resume: %w", p.dom.Name, classify(err))
	}
	return nil
}
