package xapi

import (
	"context"
	"fmt"
	"slices"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/tracking"
	api "github.com/vmshadow/vmshadow/internal/xapi"
)

// Change tracking (tracking.Request) is a chain of checkpoints per
// repository: per disk, the snapshot VDI of its last stored backup, reduced
// to CBT metadata by VDI.data_destroy and tagged vmshadow-chain=<Prefix>.
// The next backup lists the blocks changed between that checkpoint and its
// own snapshot, and its snapshot becomes the new checkpoint once the backup
// is stored.

// Track sets the change-tracking request of the next set (before Create;
// the backup learns the VM's name from Identify first).
func (p *Provider) Track(r tracking.Request) { p.opts.Tracking = &r }

// planTracking decides, per disk, whether the previous checkpoint can be
// trusted, turns CBT on where it is off, and removes the repository's
// checkpoints that are of no further use. It runs in Prepare.
func (p *Provider) planTracking(ctx context.Context, st *state) error {
	t := p.opts.Tracking
	c := p.c
	for i := range st.Disks {
		d := &st.Disks[i]
		ref, err := c.VDIByUUID(ctx, d.VDI)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		live, err := c.VDIRecord(ctx, ref)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.Name, err)
		}
		prev := t.Previous[d.Name]
		other := ""
		chain := p.chainVDIs(ctx, live)
		for _, u := range chain {
			if u != prev.Checkpoint {
				other = u
			}
		}
		reason := t.Reason(d.Name, d.Size)
		switch {
		case reason != "":
		case !live.CBTEnabled:
			reason = fmt.Sprintf("changed block tracking is off on VDI %s (disabled, or the disk was moved by storage migration); it is turned on again for the next backup", d.VDI)
		default:
			reason = p.checkPrevious(ctx, ref, prev.Checkpoint, other)
		}
		d.FullReason = reason
		if reason == "" {
			d.Previous, d.Base = prev.Checkpoint, prev.Checkpoint
		}
		d.CBT = live.CBTEnabled
		if !live.CBTEnabled {
			err := c.Call(ctx, "VDI.enable_cbt", nil, ref)
			switch {
			case err == nil:
				d.CBT = true
			case api.IsCode(err, "LICENCE_RESTRICTION") && t.Full:
				p.warn("disk %s: changed block tracking is not licensed on this pool: every backup reads the whole disk", d.Name)
			case api.IsCode(err, "LICENCE_RESTRICTION"):
				return fmt.Errorf("disk %s: changed block tracking (CBT), which incremental backups need, is not licensed on pool %s (%v): license the pool, or back up in full every time with --full: %w",
					d.Name, c.Host(), err, errs.ErrUnsupported)
			default:
				return fmt.Errorf("disk %s: turn on changed block tracking: %w", d.Name, err)
			}
		}
		// The repository's other checkpoints on the disk are of no use; nor
		// is the last backup's when it cannot be compared with (after a
		// storage migration it is no longer a snapshot of the disk's VDI).
		stale := chain
		if reason != "" && prev.Checkpoint != "" && !slices.Contains(chain, prev.Checkpoint) && p.isChainVDI(ctx, prev.Checkpoint) {
			stale = append(stale, prev.Checkpoint)
		}
		for _, u := range stale {
			if u == d.Previous {
				continue
			}
			if err := p.destroyVDI(ctx, u); err != nil {
				return fmt.Errorf("disk %s: remove stale checkpoint VDI %s: %w", d.Name, u, err)
			}
		}
	}
	return nil
}

// chainVDIs lists the UUIDs of the repository's checkpoints on a disk:
// its snapshot VDIs tagged with the prefix.
func (p *Provider) chainVDIs(ctx context.Context, live api.VDI) []string {
	var out []string
	for _, sref := range live.Snapshots {
		s, err := p.c.VDIRecord(ctx, sref)
		if err == nil && s.OtherConfig[keyChain] == p.opts.Tracking.Prefix {
			out = append(out, s.UUID)
		}
	}
	return out
}

// isChainVDI reports whether the VDI exists and is one of the repository's
// checkpoints.
func (p *Provider) isChainVDI(ctx context.Context, uuid string) bool {
	ref, err := p.c.VDIByUUID(ctx, uuid)
	if err != nil {
		return false
	}
	r, err := p.c.VDIRecord(ctx, ref)
	return err == nil && r.OtherConfig[keyChain] == p.opts.Tracking.Prefix
}

// checkPrevious says why the previous checkpoint cannot be compared with,
// or "" when it can.
func (p *Provider) checkPrevious(ctx context.Context, live, checkpoint, other string) string {
	ref, err := p.c.VDIByUUID(ctx, checkpoint)
	switch {
	case api.IsGone(err) && other != "":
		return tracking.Pruned("checkpoint VDI", other, checkpoint)
	case api.IsGone(err):
		return fmt.Sprintf("the last backup's checkpoint VDI %s is gone from the pool (deleted, or the disk was moved by storage migration)", checkpoint)
	case err != nil:
		return fmt.Sprintf("the last backup's checkpoint VDI %s cannot be read (%v)", checkpoint, err)
	}
	r, err := p.c.VDIRecord(ctx, ref)
	switch {
	case err != nil:
		return fmt.Sprintf("the last backup's checkpoint VDI %s cannot be read (%v)", checkpoint, err)
	case r.SnapshotOf != live:
		return fmt.Sprintf("the last backup's checkpoint VDI %s is not a snapshot of this disk's VDI (the disk was replaced or moved)", checkpoint)
	case !r.CBTEnabled:
		return fmt.Sprintf("the last backup's checkpoint VDI %s has no changed block tracking metadata", checkpoint)
	}
	return ""
}

// Complete records that the backup reading the set succeeded and
// its manifest is durable: when the set is released, its snapshot VDIs keep
// their CBT metadata as the new checkpoints and the previous checkpoints
// go. Without this call Release destroys the new snapshot VDIs and the
// previous checkpoints stay. Call it before deleting the set.
func (p *Provider) Complete(set *coord.Set, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("complete change tracking: no state: %v", err)
	}
	st.Done = true
	return rec.Record(set, st)
}

// destroyVDI destroys a VDI by UUID; one already gone is no error.
func (p *Provider) destroyVDI(ctx context.Context, uuid string) error {
	ref, err := p.c.VDIByUUID(ctx, uuid)
	if api.IsGone(err) {
		return nil
	}
	if err != nil {
		return err
	}
	_, err = p.c.RunAsync(ctx, "VDI.destroy", nil, ref)
	if api.IsGone(err) {
		return nil
	}
	return err
}
