// Package livebackup backs up a running VM (or several at one instant,
// StartGroup): it takes a snapshot set that
// rotates the VM's change tracking for the repository, opens each shadow
// copy as a backup source (only what changed since the repository's last
// backup of the VM, or everything allocated when the chain is broken),
// and, once the backup pipeline has stored it, completes the change
// tracking and releases the set. A backup that fails or is interrupted
// leaves the change tracking where the last stored backup left it, so no
// change is ever lost.
//
// It is hypervisor-neutral and imports no provider: the coordinator's
// provider implements Provider (change tracking and a way to read each
// shadow copy) itself; QEMU (dirty bitmaps) and XAPI (changed block
// tracking) do. All feed the same backup pipeline and the same repository
// format; the chain-break reasons common to all are in internal/tracking.
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
	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
	"github.com/vmshadow/vmshadow/internal/tracking"
)

// Provider is what a live backup needs from a hypervisor's provider
// besides the snapshot set itself (coord.Provider): change tracking and a
// way to read each shadow copy. The coordinator's provider implements it.
type Provider interface {
	// Kind is the provider's name, recorded as the backups' source ("qemu",
	// "xapi"); a chain continues only from a backup of the same kind.
	Kind() string
	// Track asks the next set (before Create) to rotate change tracking as
	// r says. The set's shadows then carry Checkpoint (this backup's
	// checkpoint, recorded in its manifest), and Bitmap (the previous
	// checkpoint the changes are relative to) or FullReason: r.Reason's
	// reason, or one of the provider's own.
	Track(r tracking.Request)
	// Idle is called once the set exists, before its shadow copies are read:
	// the provider may drop connections the read does not need.
	Idle()
	// Open opens a shadow copy of the set as a backup source. With
	// incremental, ranges that did not change since sh.Bitmap are
	// Unchanged; otherwise every allocated range is read.
	Open(ctx context.Context, sh coord.Shadow, incremental bool, conns int) (tracking.Source, error)
	// Complete records that the backup is stored (its manifest durable):
	// releasing the set then moves the chain on to this backup's
	// checkpoints. Without it, release merges the set's changes back, so
	// the chain stays where the last stored backup left it.
	Complete(set *coord.Set, rec coord.Recorder) error
}

// Describer is implemented by providers that store files describing the
// VM with each backup (its definition, firmware variables, TPM state, the
// checkpoint the set created): Describe is called once the set exists,
// before its shadow copies are read, and returns the kind of definition
// (repo.Manifest.Definition, "" for none) and the files (each at most
// repo.MaxFileSize bytes). An error fails the backup. The files of the
// previous backup come back to the provider through tracking.Request.Saved.
type Describer interface {
	Describe(ctx context.Context, set *coord.Set) (definition string, files []backup.Source, err error)
}

// Storer is implemented by providers whose release must know that the
// backup reading the set may have been stored although Complete was not
// recorded: the process died between writing the manifest and Complete.
// Release then keeps both the set's checkpoint and the base it would
// supersede, so whichever of the two the repository's latest backup names
// continues the chain (libvirt).
type Storer interface {
	// Storing records in the set's journal whether the backup's manifest
	// is being written (storing) or was not written after all.
	Storing(set *coord.Set, storing bool, rec coord.Recorder) error
}

// Options of a live backup.
type Options struct {
	// Coordinator has the provider, writers, journal and limits; its
	// Provider must implement Provider.
	Coordinator *coord.Coordinator
	// VM names the VM in the repository; default: Name of the VM the
	// provider identified, or the VM's own name.
	VM    string
	Name  func(coord.VMInfo) string
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
	p       Provider
	session *coord.Session
	sources []tracking.Source
	vm      string       // the VM's name in the repository
	prev    *repo.Backup // the previous backup of its chain, or nil
}

// BitmapPrefix names the repository's change tracking: its bitmaps in
// QEMU, its checkpoint VDIs in XAPI.
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
	bs, err := StartGroup(ctx, r, "", []Options{o})
	if err != nil {
		return nil, err
	}
	return bs[0], nil
}

// StartGroup is Start for several VMs at one instant: one snapshot set
// across all of them (coord.CreateGroup), each VM's backup incremental
// against its own chain, each Job naming the group. The caller backs up
// and finishes every Backup returned, in the order of opts. On error
// nothing is left: every set is released, every VM unlocked.
func StartGroup(ctx context.Context, r *repo.Repo, group string, opts []Options) ([]*Backup, error) {
	var bs []*Backup
	ok := false
	defer func() {
		if ok {
			return
		}
		for _, b := range bs {
			if b.Set != nil {
				b.Finish(ctx, false) // release the set, merging change tracking back
			} else {
				b.close()
			}
		}
	}()
	names := map[string]bool{}
	var sessions []*coord.Session
	for _, o := range opts {
		b, err := open(ctx, r, o)
		if err != nil {
			return nil, err
		}
		bs = append(bs, b)
		if names[b.vm] {
			return nil, fmt.Errorf("two VMs of the group are named %s in the repository: %w", b.vm, errs.ErrUsage)
		}
		names[b.vm] = true
		sessions = append(sessions, b.session)
	}
	sets, err := coord.CreateGroup(ctx, group, sessions)
	if err != nil {
		return nil, err
	}
	for i, b := range bs {
		b.Set = sets[i]
	}
	for _, b := range bs {
		if err := b.open(ctx, r, group); err != nil {
			return nil, err
		}
	}
	ok = true
	return bs, nil
}

// open locks the VM, names it in the repository, finds the previous
// backup of its chain and asks the provider to track changes from it.
func open(ctx context.Context, r *repo.Repo, o Options) (*Backup, error) {
	c := o.Coordinator
	p, ok := c.Provider.(Provider)
	if !ok {
		return nil, fmt.Errorf("%s VMs cannot be backed up: the provider has no change tracking: %w", c.Provider.Kind(), errs.ErrUnsupported)
	}
	c.Ephemeral = true
	s, err := c.Open(ctx)
	if err != nil {
		return nil, err
	}
	b := &Backup{o: o, p: p, session: s}
	vm := o.VM
	switch {
	case vm != "":
	case o.Name != nil:
		vm = o.Name(s.VM())
	default:
		vm = s.VM().Name
	}
	if err := repo.ValidName("vm", vm); err != nil {
		b.close()
		return nil, fmt.Errorf("%w (name the VM in the repository with --vm)", err)
	}
	b.vm = vm
	kind := p.Kind()
	b.prev, err = r.LatestBackup(ctx, vm, func(b *repo.Backup) bool { return b.Source == kind })
	switch {
	case errors.Is(err, errs.ErrNotFound):
		b.prev = nil
	case err != nil:
		b.close()
		return nil, fmt.Errorf("find the previous backup of %s: %w", vm, err)
	}
	req := request(BitmapPrefix(r), b.prev, o.Full)
	if prev := b.prev; prev != nil {
		req.Saved = func(ctx context.Context, name string) ([]byte, error) {
			return restore.ReadFile(ctx, r, prev.Manifest, name, 0)
		}
	}
	p.Track(req)
	return b, nil
}

// open builds the backup's job once its set exists: the VM's description
// and each shadow copy opened as a source, incremental where the chain
// allows.
func (b *Backup) open(ctx context.Context, r *repo.Repo, group string) error {
	p, set, prev, vm := b.p, b.Set, b.prev, b.vm
	var err error
	b.Job = backup.Job{VM: vm, Tags: b.o.Tags, Time: set.Created, Source: p.Kind(), Consistency: set.Consistency.String(), SetID: set.ID, Group: group}
	if set.Group != nil {
		b.Job.SetID = set.Group.SetID // the group's instant, shared by its members' backups
	}
	if d, ok := p.(Describer); ok {
		if b.Job.Definition, b.Job.Files, err = d.Describe(ctx, set); err != nil {
			return fmt.Errorf("describe %s: %w", vm, err)
		}
	}
	p.Idle()
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
				switch {
				case errors.Is(err, errs.ErrCorrupt) || errors.Is(err, errs.ErrNotFound):
					// A damaged or missing index must not fail every
					// backup from now on: read the disk in full.
					plan.Reason = fmt.Sprintf("the previous backup's index cannot be read (%v)", err)
				case err != nil:
					return fmt.Errorf("disk %s: load the previous backup's index: %w", sh.Disk, err)
				default:
					plan.Mode, plan.Reason = "incremental", ""
					incremental++
				}
			}
		}
		if plan.Mode != "incremental" {
			base = nil
			reasons = append(reasons, sh.Disk+": "+plan.Reason)
		}
		src, err := p.Open(ctx, sh, plan.Mode == "incremental", b.o.Conns)
		if err != nil {
			return err
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
	return nil
}

// Storing is backup.Options.Storing for b's job: the provider's journal
// record notes that the manifest may be stored from now on.
func (b *Backup) Storing() error {
	if st, ok := b.p.(Storer); ok {
		if err := st.Storing(b.Set, true, b.session); err != nil {
			return fmt.Errorf("note the backup's manifest in the journal: %w", err)
		}
	}
	return nil
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
		crashpoint.Hit("backup-stored") // the manifest is durable, the journal does not say so yet
		if err := b.p.Complete(b.Set, b.session); err != nil {
			return fmt.Errorf("record the backup's checkpoint: %w", err)
		}
		crashpoint.Hit("backup-completed")
	} else if st, ok := b.p.(Storer); ok {
		// Not stored after all (the manifest write failed): release
		// merges the set's changes back as for any failed backup.
		if err := st.Storing(b.Set, false, b.session); err != nil {
			return fmt.Errorf("note in the journal that the backup was not stored: %w", err)
		}
	}
	if _, err := b.session.Delete(ctx, b.Set.ID); err != nil {
		return fmt.Errorf("release snapshot set %s: %w", b.Set.ID, err)
	}
	return nil
}

// request is the change-tracking request of a backup whose previous
// backup of the chain is prev (nil: none): each disk's checkpoint and size
// from prev's manifest.
func request(prefix string, prev *repo.Backup, full bool) tracking.Request {
	t := tracking.Request{Prefix: prefix, Full: full, Previous: map[string]tracking.Previous{}}
	if prev != nil {
		for _, d := range prev.Manifest.Disks {
			if d.Checkpoint != "" {
				t.Previous[d.Name] = tracking.Previous{Checkpoint: d.Checkpoint, Size: d.Size}
			}
		}
	}
	return t
}

func (b *Backup) close() {
	for _, s := range b.sources {
		s.Close()
	}
	b.session.Close()
}
