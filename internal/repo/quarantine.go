package repo

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Quarantine: a chunk that a read (verify, restore, any ReadChunk) found
// damaged is moved aside, from chunks/<id> to quarantine/<id>, so that the
// chunk is absent: the next backup that meets its content stores it again
// instead of deduplicating onto the damaged copy, and verify reports the
// backups that referenced it as healed. A chunk verify found missing gets
// an empty quarantine record, so that an incremental backup, which takes
// unchanged chunks from the previous index without looking at them, reads
// those ranges again. Quarantined copies are kept as evidence until gc
// removes them (once the chunk is stored again or no backup references it).

func quarantineHandle(id ID) backend.Handle {
	return backend.Handle{Kind: backend.KindQuarantine, Name: id.String()}
}

// quarantineChunk moves the damaged chunk id aside. It reads the chunk
// again first and does nothing when it now opens (it was replaced by a good
// copy, or the damage was in transit) or is gone (someone else moved it).
// The damaged bytes are kept as quarantine/<id>. Readers of the chunk
// between the move and its next backup find it missing.
//
// The re-read narrows, but does not close, one race: if between it and
// the delete another process moved the chunk aside too and a backup
// stored a good copy, the good copy is deleted. The backup that stored it
// then names a missing chunk, which verify reports and the next backup
// stores again; it needs two readers to find the same damage at once.
func (r *Repo) quarantineChunk(ctx context.Context, id ID) error {
	h := chunkHandle(id)
	blob, err := r.be.Get(ctx, h, 0, -1)
	if backend.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("re-read chunk %s: %w", id, err)
	}
	if _, err := r.OpenChunk(id, blob, nil); err == nil || !errors.Is(err, errs.ErrCorrupt) {
		return nil
	}
	if err := r.be.Put(ctx, quarantineHandle(id), blob); err != nil {
		return fmt.Errorf("keep damaged chunk %s in quarantine: %w", id, err)
	}
	if err := r.be.Sync(ctx); err != nil {
		return fmt.Errorf("sync quarantined chunk %s: %w", id, err)
	}
	if err := r.be.Delete(ctx, h); err != nil && !backend.IsNotExist(err) {
		return fmt.Errorf("move damaged chunk %s aside: %w", id, err)
	}
	return nil
}

// recordMissing records a chunk found missing in the quarantine (an empty
// blob), unless a record exists.
func (r *Repo) recordMissing(ctx context.Context, id ID) error {
	if _, err := r.be.Stat(ctx, quarantineHandle(id)); err == nil {
		return nil
	}
	if err := r.be.Put(ctx, quarantineHandle(id), nil); err != nil {
		return fmt.Errorf("record missing chunk %s in quarantine: %w", id, err)
	}
	return nil
}

// Quarantined lists the chunks in quarantine with the time each was put
// there. Backups read it once at their start: an incremental backup reads
// again the unchanged ranges whose base chunk is quarantined.
func (r *Repo) Quarantined(ctx context.Context) (map[ID]time.Time, error) {
	q := map[ID]time.Time{}
	err := r.be.List(ctx, backend.KindQuarantine, "", func(fi backend.Info) error {
		if id, err := ParseID(fi.Name); err == nil {
			q[id] = fi.ModTime
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list quarantined chunks: %w", err)
	}
	return q, nil
}

// quarantineNote is appended to the error of a damaged chunk read.
func (r *Repo) quarantineNote(ctx context.Context, id ID) string {
	if err := r.quarantineChunk(context.WithoutCancel(ctx), id); err != nil {
		return fmt.Sprintf(" (could not move it aside: %v; the next backup may reuse it until it is)", err)
	}
	return " (moved to the quarantine: the next backup of this data stores it again)"
}
