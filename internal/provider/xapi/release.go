package xapi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	api "github.com/vmshadow/vmshadow/internal/xapi"
)

// Release implements coord.Provider. It waits for (or cancels) a snapshot
// still being taken, unpauses the VM if the set paused it, destroys the
// set's snapshot VDIs, then the snapshot VM, and after a stored backup
// only then the data of the snapshot VDIs kept as the new checkpoints (CBT
// metadata) and the previous checkpoints. Objects already gone are skipped.
//
// When it recovers (a nil set, or a set left by another process), it also
// removes any other vmshadow snapshot of the VM. A process releasing its
// own set does not: the pool is shared, and another backup host may be
// working on the VM (its snapshot is what made this set fail as busy).
func (p *Provider) Release(ctx context.Context, set *coord.Set) ([]string, error) {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil {
		return nil, err
	}
	if err := p.Reconnect(ctx); err != nil {
		return nil, err
	}
	r := &releaser{p: p}
	if st == nil && set != nil {
		// Prepare did not get to journal the state: only the snapshot name
		// is known, and nothing was created yet unless a killed process
		// got further than its journal says.
		st = &state{Snapshot: Prefix + set.ID}
	}
	if st != nil {
		r.state(ctx, st)
	}
	if set == nil || set.PID != os.Getpid() {
		r.leftovers(ctx)
	}
	return r.removed, errors.Join(r.errs...)
}

type releaser struct {
	p       *Provider
	removed []string
	errs    []error
}

func (r *releaser) try(what string, err error) {
	switch {
	case err == nil:
		r.removed = append(r.removed, what)
	case api.IsGone(err):
	default:
		r.errs = append(r.errs, fmt.Errorf("remove %s: %w", what, err))
	}
}

func (r *releaser) state(ctx context.Context, st *state) {
	c := r.p.c
	if st.Task != "" {
		// A snapshot may still be in the making: stop it, and wait until
		// the pool says it ended, so that what it made can be removed. The
		// task record goes too.
		switch status, err := c.TaskStatus(ctx, st.Task); {
		case err != nil || status == "":
		case status == "pending" || status == "cancelling":
			c.CancelTask(ctx, st.Task)
			wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			c.WaitTask(wctx, "VM.snapshot", st.Task) // destroys the task
			cancel()
		default:
			r.try("task "+st.Task, c.Call(ctx, "task.destroy", nil, st.Task))
		}
	}
	if st.Paused {
		// A process killed while the VM was paused for the snapshot.
		if ref, err := c.VMByUUID(ctx, st.VM); err == nil {
			err := c.Call(ctx, "VM.unpause", nil, ref)
			if !api.IsCode(err, "VM_BAD_POWER_STATE") {
				r.try("pause of VM "+st.VM, err)
			}
		}
	}
	snap, err := r.findSnapshot(ctx, st)
	if err != nil {
		r.errs = append(r.errs, err)
		return
	}
	vdis := map[string]string{} // disk name -> snapshot VDI UUID
	disks := map[string]diskState{}
	for _, d := range st.Disks {
		disks[d.Name] = d
		if d.SnapshotVDI != "" {
			vdis[d.Name] = d.SnapshotVDI
		}
	}
	if snap != "" {
		// The snapshot's disks, in case the process was killed before it
		// journaled them.
		if s, err := c.VMRecord(ctx, snap); err == nil {
			for _, vref := range s.VBDs {
				if b, err := c.VBDRecord(ctx, vref); err == nil && b.Type == "Disk" && !api.IsNull(b.VDI) {
					if d, err := c.VDIRecord(ctx, b.VDI); err == nil && vdis[DiskName(b.Userdevice)] == "" {
						vdis[DiskName(b.Userdevice)] = d.UUID
					}
				}
			}
		}
	}
	names := make([]string, 0, len(vdis))
	for n := range vdis {
		names = append(names, n)
	}
	sort.Strings(names)
	keep := func(n string) bool { return st.Done && st.Prefix != "" && disks[n].CBT }
	// Snapshot VDIs destroyed outright go first: VDI.destroy refuses only
	// attached VBDs, and a process killed after it leaves nothing behind.
	for _, n := range names {
		if !keep(n) {
			r.try("snapshot VDI "+vdis[n], r.p.destroyVDI(ctx, vdis[n]))
		}
	}
	// Then the snapshot VM, which keeps its VDIs (xapi_vm_helpers.ml
	// destroy removes only its VBDs): VDI.data_destroy waits up to 4 s for
	// every VBD of the VDI to go, attached or not, and fails with
	// VDI_IN_USE (xapi_vdi.ml, wait_for_vbds_to_be_unplugged_and_destroyed),
	// so the snapshot's own VBDs must be gone first. The VDIs whose data
	// goes next are all in the journal (Done comes after Expose recorded
	// them), so a process killed here leaves them to the next release.
	if snap != "" {
		_, err := c.RunAsync(ctx, "VM.destroy", nil, snap)
		r.try("snapshot "+st.Snapshot, err)
	}
	for _, n := range names {
		if keep(n) {
			u := vdis[n]
			r.try("data of snapshot VDI "+u+" (its changed block tracking metadata kept as checkpoint)", r.dataDestroy(ctx, u))
		}
	}
	if st.Done {
		for _, d := range st.Disks {
			if d.Previous != "" && d.Previous != vdis[d.Name] {
				r.try("checkpoint VDI "+d.Previous+" (superseded)", r.p.destroyVDI(ctx, d.Previous))
			}
		}
	}
}

// findSnapshot finds the set's snapshot VM by UUID, else by name among the
// VM's snapshots; "" when there is none.
func (r *releaser) findSnapshot(ctx context.Context, st *state) (string, error) {
	c := r.p.c
	if st.SnapshotUUID != "" {
		ref, err := c.VMByUUID(ctx, st.SnapshotUUID)
		if api.IsGone(err) {
			return "", nil
		}
		return ref, err
	}
	refs, err := c.VMsByName(ctx, st.Snapshot)
	if err != nil {
		return "", fmt.Errorf("find snapshot %s: %w", st.Snapshot, err)
	}
	for _, ref := range refs {
		s, err := c.VMRecord(ctx, ref)
		if err == nil && s.IsASnapshot && s.SnapshotOf == r.p.vmRef {
			return ref, nil
		}
	}
	return "", nil
}

// dataDestroy frees a snapshot VDI's data and keeps its CBT metadata. A
// VDI that lost its CBT metadata meanwhile (CBT turned off) is destroyed:
// the next backup finds its checkpoint gone and reads in full.
func (r *releaser) dataDestroy(ctx context.Context, uuid string) error {
	ref, err := r.p.c.VDIByUUID(ctx, uuid)
	if err != nil {
		return err
	}
	_, err = r.p.c.RunAsync(ctx, "VDI.data_destroy", nil, ref)
	if api.IsCode(err, "VDI_NO_CBT_METADATA") {
		r.p.warn("snapshot VDI %s lost its changed block tracking metadata: destroyed; the next backup of its disk reads it in full", uuid)
		return r.p.destroyVDI(ctx, uuid)
	}
	return err
}

// leftovers removes vmshadow snapshots and tagged snapshot VDIs with data
// that no journal accounts for.
func (r *releaser) leftovers(ctx context.Context) {
	p := r.p
	if err := p.scan(ctx); err != nil {
		r.errs = append(r.errs, err)
		return
	}
	lo, err := p.findLeftovers(ctx)
	if err != nil {
		r.errs = append(r.errs, err)
		return
	}
	for _, l := range lo {
		for i, v := range l.vdis {
			_, err := p.c.RunAsync(ctx, "VDI.destroy", nil, v)
			r.try("snapshot VDI "+l.labels[i], err)
		}
		if l.vm != "" {
			_, err := p.c.RunAsync(ctx, "VM.destroy", nil, l.vm)
			r.try(l.what, err)
		}
	}
	if err := p.scan(ctx); err != nil {
		r.errs = append(r.errs, err)
	}
}
