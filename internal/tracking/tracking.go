// Package tracking is the hypervisor-neutral vocabulary of change tracking
// for incremental backups: the request a live backup makes of a provider
// (Request: which repository's chain, and what each disk is compared
// against), the reasons common to every hypervisor why a disk's chain is
// broken and the disk is read in full, and the open shadow copy a provider
// hands back (Source).
//
// Providers (internal/provider/...) import it to implement the
// change-tracking interface internal/livebackup defines; livebackup builds
// Requests from the repository. Reasons that depend on how a hypervisor
// tracks changes (a bitmap missing, CBT turned off) stay with its provider.
package tracking

import (
	"context"
	"fmt"

	"github.com/vmshadow/vmshadow/internal/backup"
)

// Request asks the next snapshot set to rotate change tracking for one
// repository. Each repository keeps its own chain of checkpoints, named
// Prefix-<set id>; the checkpoint started at a backup's instant records
// every change since, and the next backup reads only what it marks.
// Checkpoints of other repositories (other prefixes) are never touched.
type Request struct {
	// Prefix names the repository's checkpoints, "vmshadow-<repo id>".
	Prefix string
	// Previous is, per disk name, the checkpoint of the repository's last
	// backup of the VM. A disk without one is read in full.
	Previous map[string]Previous
	// Full reads every disk in full (the chain still rotates).
	Full bool
	// Saved, if set, reads a file the provider stored with that last
	// backup (see livebackup.Describer), e.g. a checkpoint's definition
	// to put back where the hypervisor lost it; errs.ErrNotFound when the
	// backup has no such file.
	Saved func(ctx context.Context, name string) ([]byte, error)
}

// Previous is one disk's checkpoint from the repository's last backup.
type Previous struct {
	// Checkpoint is what the provider recorded at that backup's instant
	// (a bitmap name, a snapshot VDI UUID, ...).
	Checkpoint string
	// Size is the disk's size then.
	Size int64
}

// Reason says why disk (of size bytes now) must be read in full for a
// reason common to every provider: --full, the first backup, a disk added
// or resized since the last backup. "" means the chain holds as far as the
// request can tell; the provider then checks its own tracking against
// r.Previous[disk].Checkpoint.
func (r *Request) Reason(disk string, size int64) string {
	prev, had := r.Previous[disk]
	switch {
	case r.Full:
		return "full backup requested (--full)"
	case !had || prev.Checkpoint == "":
		if len(r.Previous) == 0 {
			return "first backup of this VM into this repository"
		}
		return "disk added since the last backup"
	case prev.Size != size:
		return fmt.Sprintf("disk resized from %d to %d bytes since the last backup", prev.Size, size)
	}
	return ""
}

// Pruned is the reason when the disk tracks changes since checkpoint other
// of the repository's chain, but the repository's latest backup has
// checkpoint latest: the backup of other was pruned or deleted. noun says
// what a checkpoint is ("checkpoint", "checkpoint VDI").
func Pruned(noun, other, latest string) string {
	return fmt.Sprintf("the disk tracks changes since %s %s, whose backup is no longer in the repository (pruned or deleted); the latest backup there has checkpoint %s", noun, other, latest)
}

// Source is an open shadow copy, read as a backup source and closed once
// the backup has read it.
type Source interface {
	backup.Source
	Close() error
}
