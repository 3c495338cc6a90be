package qemu

import (
	"context"
	"fmt"
	"strings"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/nbdsource"
	"github.com/vmshadow/vmshadow/internal/tracking"
)

// Change tracking (tracking.Request) is a chain of persistent dirty
// bitmaps per repository, named Prefix-<set id>: the bitmap started at a
// backup's instant records every change since, and the next backup reads
// only what it marks. Bitmaps of other repositories (other prefixes) are
// never touched.

// checkpointState is the journal record of a rotation, per disk.
type checkpointState struct {
	New      string `json:"new"`                // bitmap added at the instant
	Previous string `json:"previous,omitempty"` // bitmap disabled at the instant, exported for the read
	// Done: the backup succeeded and its manifest is durable; the previous
	// bitmap is to be removed. Until then, Release merges the new bitmap
	// back into the previous one so no change is ever lost.
	Done bool `json:"done"`
	// Stale are the repository's other bitmaps on the disk (of a broken
	// chain): removed once the backup is stored, kept until then, so an
	// interrupted backup leaves the disk as it found it.
	Stale []string `json:"stale,omitempty"`
}

// planCheckpoint decides, per disk, whether the previous bitmap can be
// trusted, and notes this repository's stale bitmaps. It runs in Prepare,
// before anything is frozen, and removes nothing: a valid previous bitmap
// goes on through a --full backup too, so that if the backup is not
// stored the chain still continues from the last backup that was.
func (p *Provider) planCheckpoint(ctx context.Context, set *coord.Set, st *state) error {
	cp := p.opts.Tracking
	nodes, err := p.namedNodes(ctx)
	if err != nil {
		return err
	}
	byNode := map[string]namedNode{}
	for _, n := range nodes {
		byNode[n.NodeName] = n
	}
	for i := range st.Disks {
		d := &st.Disks[i]
		d.Checkpoint = &checkpointState{New: cp.Prefix + "-" + set.ID}
		prev, had := cp.Previous[d.Name]
		reason := cp.Reason(d.Name, d.Size)
		var found *bitmapInfo
		other := ""
		for _, b := range byNode[d.Node].DirtyBitmaps {
			if b.Name == prev.Checkpoint {
				b := b
				found = &b
			} else if strings.HasPrefix(b.Name, cp.Prefix+"-") {
				other = b.Name
			}
		}
		switch {
		case reason != "":
		case found == nil && other != "":
			reason = tracking.Pruned("checkpoint", other, prev.Checkpoint)
		case found == nil:
			reason = fmt.Sprintf("change-tracking bitmap %s is missing (QEMU was restarted and the disk could not keep it: a raw disk, or QEMU was killed before saving it; or it was removed)", prev.Checkpoint)
		case found.Inconsistent:
			reason = fmt.Sprintf("change-tracking bitmap %s is inconsistent (QEMU stopped without saving it)", prev.Checkpoint)
		case !found.Recording:
			reason = fmt.Sprintf("change-tracking bitmap %s was not recording", prev.Checkpoint)
		}
		d.FullReason = reason
		if found != nil && had && prev.Size == d.Size && !found.Inconsistent && found.Recording {
			d.Checkpoint.Previous = prev.Checkpoint // read from only when reason is ""
		}
		// The repository's other bitmaps on the disk are of no further
		// use (and slow the guest's writes down): they go once this
		// backup is stored.
		for _, b := range byNode[d.Node].DirtyBitmaps {
			if strings.HasPrefix(b.Name, cp.Prefix+"-") && b.Name != d.Checkpoint.Previous {
				d.Checkpoint.Stale = append(d.Checkpoint.Stale, b.Name)
			}
		}
	}
	return nil
}

// rotateActions are the transaction actions run at the instant: a new
// bitmap per disk starts, the previous one stops.
func rotateActions(st *state) []map[string]any {
	var acts []map[string]any
	for _, d := range st.Disks {
		if d.Checkpoint == nil {
			continue
		}
		acts = append(acts, map[string]any{"type": "block-dirty-bitmap-add", "data": map[string]any{
			"node": d.Node, "name": d.Checkpoint.New, "persistent": d.Persistent}})
		if d.Checkpoint.Previous != "" {
			acts = append(acts, map[string]any{"type": "block-dirty-bitmap-disable", "data": map[string]any{
				"node": d.Node, "name": d.Checkpoint.Previous}})
		}
	}
	return acts
}

// Complete records that the backup reading the set succeeded and
// its manifest is durable. When the set is released, the previous bitmaps
// are then removed (they are busy while exported) and the new ones kept;
// without this call, Release merges the new bitmaps back into the previous
// ones. Call it before deleting the set.
func (p *Provider) Complete(set *coord.Set, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("complete checkpoint: no state: %v", err)
	}
	for i := range st.Disks {
		if st.Disks[i].Checkpoint != nil {
			st.Disks[i].Checkpoint.Done = true
		}
	}
	return rec.Record(set, st)
}

// checkpoints finishes rotations: a completed one drops the previous
// bitmap; any other merges the new bitmap back into the previous one (and
// re-enables it), so the changes since the last good backup stay tracked.
func (r *releaser) checkpoints(ctx context.Context, st *state) {
	p := r.p
	nodes, err := p.namedNodes(ctx)
	if err != nil {
		r.errs = append(r.errs, err)
		return
	}
	has := map[string]bool{}
	for _, n := range nodes {
		for _, b := range n.DirtyBitmaps {
			has[n.NodeName+"/"+b.Name] = true
		}
	}
	for _, d := range st.Disks {
		cp := d.Checkpoint
		if cp == nil {
			continue
		}
		newOK, prevOK := has[d.Node+"/"+cp.New], cp.Previous != "" && has[d.Node+"/"+cp.Previous]
		var acts []map[string]any
		var what string
		if cp.Done {
			for _, b := range cp.Stale {
				if has[d.Node+"/"+b] {
					r.try("bitmap "+b+" (of a broken chain)", p.exec(ctx, "block-dirty-bitmap-remove", map[string]any{"node": d.Node, "name": b}, nil))
				}
			}
		}
		switch {
		case cp.Done && prevOK:
			acts = append(acts, bitmapAction("remove", d.Node, cp.Previous))
			what = "bitmap " + cp.Previous + " (superseded by " + cp.New + ")"
		case !cp.Done && prevOK:
			acts = append(acts, bitmapAction("enable", d.Node, cp.Previous))
			if newOK {
				acts = append(acts,
					map[string]any{"type": "block-dirty-bitmap-merge", "data": map[string]any{"node": d.Node, "target": cp.Previous, "bitmaps": []string{cp.New}}},
					bitmapAction("remove", d.Node, cp.New))
			}
			what = "bitmap " + cp.New + " (merged back into " + cp.Previous + ")"
		case !cp.Done && newOK:
			// No previous checkpoint: the next backup is full anyway, and
			// no manifest names the new bitmap.
			acts = append(acts, bitmapAction("remove", d.Node, cp.New))
			what = "bitmap " + cp.New
		}
		if len(acts) == 0 {
			continue
		}
		r.try(what, p.exec(ctx, "transaction", map[string]any{"actions": acts}, nil))
	}
}

func bitmapAction(op, node, name string) map[string]any {
	return map[string]any{"type": "block-dirty-bitmap-" + op, "data": map[string]any{"node": node, "name": name}}
}

// Idle is called once the set exists, before its shadow copies are read:
// the QMP socket is not held during the read; it is reopened for the
// release.
func (p *Provider) Idle() { p.Close() }

// Open opens a shadow copy of the set over QEMU's NBD server. With
// incremental, ranges the exported bitmap sh.Bitmap does not mark are
// unchanged; otherwise every allocated range is read.
func (p *Provider) Open(ctx context.Context, sh coord.Shadow, incremental bool, conns int) (tracking.Source, error) {
	return nbdsource.OpenShadow(ctx, sh, incremental, conns,
		"the shadow copy is broken if its diff area filled up or failed: give the set more scratch space with --scratch-dir")
}
