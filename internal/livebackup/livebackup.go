// Package livebackup backs up a running VM: it takes a snapshot set that
// rotates the VM's change tracking for the repository, opens each shadow
// copy as a backup source (only what changed since the repository's last
// backup of the VM, or everything allocated when the chain is broken),
// and, once the backup pipeline has stored it, completes the change
// tracking and releases the set. A backup that fails or is interrupted
// merges the change tracking back, so no change is ever lost.
//
// The VM is locked for the whole backup, and the set is ephemeral: if the
// process dies, the next backup (or recover) finds and undoes it.
package livebackup

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/nbdsource"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// Options of a live backup.
type Options struct {
	// Coordinator has the writers, journal and limits; its Provider is
	// Provider.
	Coordinator *coord.Coordinator
	Provider    *qemu.Provider
	// VM names the VM in the repository; default: the VM's own name.
	VM    string
	Tags  []string
	Full  bool // read every disk in full
	Conns int  // NBD connections per disk
	Warn  func(string)
}

// DiskPlan says how one disk is read.
type DiskPlan struct {
	Name   string `json:"name"`
	Mode   string `json:"mode"`             // full or incremental
	Reason string `json:"reason,omitempty"` // why full
}

// Backup is a live backup in progress: the set exists and Job reads it.
type Backup struct {
	Job   backup.Job
	Set   *coord.Set
	Disks []DiskPlan

	o       Options
	session *coord.Session
	sources []*nbdsource.Source
}

// BitmapPrefix names the repository's change-tracking bitmaps in QEMU.
func BitmapPrefix(r *repo.Repo) string {
	id := r.Config().ID
	if len(id) > 16 {
		id = id[:16]
	}
	return "vmshadow-" + id
}

// Start locks the VM, finds the previous backup of its chain in r, takes
// the snapshot set and opens the shadow copies. The caller runs
// backup.Run(ctx, r, b.Job, ...) and then must call Finish.
func Start(ctx context.Context, r *repo.Repo, o Options) (*Backup, error) {
	c := o.Coordinator
	c.Ephemeral = true
	s, err := c.Open(ctx)
	if err != nil {
		return nil, err
	}
	b := &Backup{o: o, session: s}
	ok := false
	defer func() {
		if ok {
			return
		}
		if b.Set != nil {
			b.Finish(ctx, false) // release the set, merging change tracking back
			return
		}
		b.close()
	}()
	vm := o.VM
	if vm == "" {
		vm = s.VM().Name
	}
	if err := repo.ValidName("vm", vm); err != nil {
		return nil, fmt.Errorf("%w (name the VM in the repository with --vm)", err)
	}
	cp := &qemu.Checkpoint{Prefix: BitmapPrefix(r), Full: o.Full, Previous: map[string]qemu.Previous{}}
	prev, err := r.LatestBackup(ctx, vm, func(b *repo.Backup) bool { return b.Source == "qemu" })
	switch {
	case errors.Is(err, errs.ErrNotFound):
		prev = nil
	case err != nil:
		return nil, fmt.Errorf("find the previous backup of %s: %w", vm, err)
	default:
		for _, d := range prev.Disks {
			if d.Checkpoint != "" {
				cp.Previous[d.Name] = qemu.Previous{Bitmap: d.Checkpoint, Size: d.Size}
			}
		}
	}
	o.Provider.SetCheckpoint(cp)
	set, err := s.Create(ctx)
	if err != nil {
		return nil, err
	}
	b.Set = set
	o.Provider.Close() // do not hold the QMP socket during the read; reopened for Finish
	b.Job = backup.Job{VM: vm, Tags: o.Tags, Time: set.Created, Source: "qemu", Consistency: set.Consistency.String(), SetID: set.ID}
	var reasons []string
	incremental := 0
	for _, sh := range set.Shadows {
		plan := DiskPlan{Name: sh.Disk, Mode: "full", Reason: sh.FullReason}
		var base *repo.Index
		if sh.Bitmap != "" {
			pd := prev.Disk(sh.Disk)
			if pd == nil || pd.ChunkSize != r.ChunkSize() {
				plan.Reason = "the previous backup has no usable index for this disk"
			} else {
				id, err := repo.ParseID(pd.Index)
				if err == nil {
					base, err = r.LoadIndex(ctx, id)
				}
				if err != nil {
					return nil, fmt.Errorf("disk %s: load the previous backup's index: %w", sh.Disk, err)
				}
				plan.Mode, plan.Reason = "incremental", ""
				incremental++
			}
		}
		bitmap := ""
		if plan.Mode == "incremental" {
			bitmap = sh.Bitmap
		} else {
			base = nil
			reasons = append(reasons, sh.Disk+": "+plan.Reason)
		}
		src, err := nbdsource.Open(ctx, nbdsource.Options{Name: sh.Disk, URI: sh.NBD, Bitmap: bitmap, Conns: o.Conns})
		if err != nil {
			return nil, err
		}
		b.sources = append(b.sources, src)
		b.Job.Disks = append(b.Job.Disks, backup.Disk{Source: src, Base: base, Checkpoint: sh.Checkpoint})
		b.Disks = append(b.Disks, plan)
	}
	b.Job.Mode = "full"
	if incremental > 0 {
		b.Job.Mode = "incremental"
	}
	b.Job.Reason = strings.Join(reasons, "; ")
	ok = true
	return b, nil
}

// Finish ends the backup. With a stored backup (stored == true) the change
// tracking moves on to this backup's checkpoint; otherwise it is merged
// back. Either way the set is released and the VM unlocked. A failure here
// after a stored backup does not undo the backup: the set stays in the
// journal and the next backup or recover releases it.
func (b *Backup) Finish(ctx context.Context, stored bool) error {
	defer b.close()
	ctx = context.WithoutCancel(ctx)
	for _, s := range b.sources {
		s.Close()
	}
	b.sources = nil
	if stored {
		if err := b.o.Provider.CompleteCheckpoint(b.Set, func() error { return b.session.Save(b.Set) }); err != nil {
			return fmt.Errorf("record the backup's checkpoint: %w", err)
		}
	}
	if _, err := b.session.Delete(ctx, b.Set.ID); err != nil {
		return fmt.Errorf("release snapshot set %s: %w", b.Set.ID, err)
	}
	return nil
}

func (b *Backup) close() {
	for _, s := range b.sources {
		s.Close()
	}
	b.session.Close()
}
