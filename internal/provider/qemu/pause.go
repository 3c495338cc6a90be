package qemu

import (
	"context"
	"fmt"

	"github.com/vmshadow/vmshadow/internal/coord"
)

var _ coord.Pauser = (*Provider)(nil)

// Running implements coord.Pauser: whether the VM's CPUs run
// (query-status).
func (p *Provider) Running(ctx context.Context) (bool, error) {
	var status struct {
		Running bool `json:"running"`
	}
	if err := p.exec(ctx, "query-status", nil, &status); err != nil {
		return false, err
	}
	return status.Running, nil
}

// Pause implements coord.Pauser with QMP's stop.
func (p *Provider) Pause(ctx context.Context) error {
	if err := p.exec(ctx, "stop", nil, nil); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	return nil
}

// Resume implements coord.Pauser with QMP's cont, which is no error on a
// VM that runs.
func (p *Provider) Resume(ctx context.Context) error {
	if err := p.exec(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("cont: %w", err)
	}
	return nil
}
