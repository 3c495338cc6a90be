// Package repocopy copies backups from one repository to another (the
// offsite copy of the 3-2-1 rule: vmshadow copy). The repositories may have
// different passwords, chunk-ID schemes and chunk sizes, and live on
// different storage (local, S3): a chunk's ID in the target differs from
// its ID in the source, so a copy reads each disk of a backup from the
// source as a restore does (every chunk decrypted and verified against its
// hash) and feeds it to the backup pipeline of internal/backup as an
// ordinary backup source: chunks are re-hashed under the target's key,
// stored only when the target lacks them, then the indexes, and the
// manifest last. A copy that fails leaves no manifest in the target (only
// chunks, named by the *backup.Failure it returns, which the caller may
// reclaim as after a failed backup).
//
// A copy keeps the original's VM, time, host, tags, source, mode, reason, group,
// consistency and set ID, and records the original's ID as its Origin; it
// drops the disks' checkpoints, which name the source repository's change
// tracking. Backups are identified across repositories by
// repo.Backup.Identity (the origin, or the ID of an original), so a backup
// the target already holds, as a copy or as the original, is skipped.
// Group records follow their members (CopyGroups): a group backup is
// copied once the target holds every member.
package repocopy

import (
	"context"
	"errors"
	"fmt"
	"iter"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// Selection says which backups of the source to copy.
type Selection struct {
	// VM, if set, selects only backups of this VM.
	VM string
	// Backups, if set, are backup IDs or unambiguous prefixes in the
	// source; otherwise every backup (of VM) is a candidate.
	Backups []string
}

// Plan is the outcome of Select.
type Plan struct {
	// Copy are the backups to copy, oldest first.
	Copy []repo.Backup
	// Present are selected backups the target already holds (as a copy or
	// as the original), keyed by their ID in the source, with the ID of
	// the target's backup.
	Present map[repo.ID]repo.ID
	// Skipped are those backups, oldest first.
	Skipped []repo.Backup
	// Damaged are the source's backups whose manifest cannot be read
	// (only when no backups were named): they cannot be copied.
	Damaged map[repo.ID]error
}

// Select lists the backups of src that dst lacks, within sel.
func Select(ctx context.Context, src, dst *repo.Repo, sel Selection) (*Plan, error) {
	if src.Config().ID == dst.Config().ID {
		return nil, fmt.Errorf("the source and the target are the same repository (%s): copy to another repository: %w", src.Config().ID[:8], errs.ErrUsage)
	}
	if sel.VM != "" {
		if err := repo.ValidName("VM", sel.VM); err != nil {
			return nil, err
		}
	}
	p := &Plan{Present: map[repo.ID]repo.ID{}, Damaged: map[repo.ID]error{}}
	var cands []repo.Backup
	if len(sel.Backups) > 0 {
		seen := map[repo.ID]bool{}
		for _, s := range sel.Backups {
			id, err := src.FindBackup(ctx, s)
			if err != nil {
				return nil, fmt.Errorf("source: %w", err)
			}
			if seen[id] {
				continue
			}
			seen[id] = true
			m, err := src.LoadManifest(ctx, id)
			if err != nil {
				return nil, fmt.Errorf("source: %w", err)
			}
			if sel.VM != "" && m.VM != sel.VM {
				return nil, fmt.Errorf("backup %s is of VM %s, not %s: drop --vm or name a backup of %s: %w", id.Short(), m.VM, sel.VM, sel.VM, errs.ErrUsage)
			}
			cands = append(cands, repo.Backup{ID: id, Manifest: m})
		}
		sortBackups(cands)
	} else {
		all, bad, err := src.ListBackups(ctx)
		if err != nil {
			return nil, fmt.Errorf("source: %w", err)
		}
		p.Damaged = bad
		for _, b := range all {
			if sel.VM == "" || b.VM == sel.VM {
				cands = append(cands, b)
			}
		}
	}
	// Unreadable manifests of the target cannot be matched: their backups
	// would be copied again, which is harmless (the chunks are there).
	have, _, err := dst.ListBackups(ctx)
	if err != nil {
		return nil, fmt.Errorf("target: %w", err)
	}
	ident := map[string]repo.ID{}
	for i := range have {
		ident[have[i].Identity()] = have[i].ID
		ident[have[i].ID.String()] = have[i].ID // the original itself (a copy back)
	}
	for i := range cands {
		if tid, ok := ident[cands[i].Identity()]; ok {
			p.Present[cands[i].ID] = tid
			p.Skipped = append(p.Skipped, cands[i])
			continue
		}
		p.Copy = append(p.Copy, cands[i])
	}
	return p, nil
}

func sortBackups(b []repo.Backup) {
	for i := 1; i < len(b); i++ {
		for j := i; j > 0 && less(b[j], b[j-1]); j-- {
			b[j], b[j-1] = b[j-1], b[j]
		}
	}
}

func less(a, b repo.Backup) bool {
	if !a.Time.Equal(b.Time) {
		return a.Time.Before(b.Time)
	}
	return a.ID.String() < b.ID.String()
}

// Size is the sum of the backup's disk sizes (what Copy processes).
func Size(b repo.Backup) int64 {
	var n int64
	for _, d := range b.Disks {
		n += d.Size
	}
	return n
}

// Copy copies one backup of src into dst under the caller's shared locks
// on both, and returns the target's backup: its Stats count what the copy
// read from the source (BytesRead), the chunks it sent (ChunksNew,
// BytesNew) and those the target already held (ChunksReused). A chunk of
// the source that fails verification is errs.ErrCorrupt (a missing one
// errs.ErrNotFound); on any error no manifest is written, and the error is
// a *backup.Failure when chunks were already stored.
func Copy(ctx context.Context, src, dst *repo.Repo, b repo.Backup, o backup.Options) (*backup.Result, error) {
	origin := b.Identity()
	job := backup.Job{VM: b.VM, Tags: b.Tags, Time: b.Time, Source: b.Source, Mode: b.Mode, Reason: b.Reason,
		Consistency: b.Consistency, SetID: b.SetID, Group: b.Group, Host: b.Host, Origin: origin, Definition: b.Definition}
	// Decoded source chunks cached per disk. When the target's chunks are
	// smaller than the source's, the readers read several target chunks
	// of one source chunk at once: a chunk per reader keeps each source
	// chunk fetched once. Otherwise every source chunk is read by one
	// read, and the cache holds the one chunk it must.
	cache := src.ChunkSize()
	if src.ChunkSize() > dst.ChunkSize() {
		cache *= int64(max(o.Readers, 4) + 1)
	}
	for i, d := range b.Indexed() {
		xid, err := repo.ParseID(d.Index)
		if err != nil {
			return nil, fmt.Errorf("backup %s disk %s: %w", b.ID.Short(), d.Name, errs.ErrCorrupt)
		}
		x, err := src.LoadIndex(ctx, xid)
		if err != nil {
			return nil, fmt.Errorf("source backup %s disk %s: %w", b.ID.Short(), d.Name, err)
		}
		if x.Size() != d.Size {
			return nil, fmt.Errorf("source backup %s disk %s: the manifest says %d bytes, its index %d: %w", b.ID.Short(), d.Name, d.Size, x.Size(), errs.ErrCorrupt)
		}
		ds := &diskSource{name: d.Name, x: x, rd: restore.NewDiskReader(src, x, cache)}
		if i >= len(b.Disks) {
			job.Files = append(job.Files, ds)
			continue
		}
		// No checkpoint: it names the source repository's change tracking.
		job.Disks = append(job.Disks, backup.Disk{Source: ds})
	}
	res, err := backup.Run(ctx, dst, job, o)
	if err != nil {
		return nil, fmt.Errorf("copy backup %s of %s: %w", b.ID.Short(), b.VM, err)
	}
	return res, nil
}

// diskSource reads one disk of a source backup for the backup pipeline:
// all-zero chunks are Zero extents (not read), the rest is Data read
// through a restore.DiskReader (fetched, decrypted, verified).
type diskSource struct {
	name string
	x    *repo.Index
	rd   *restore.DiskReader
}

func (s *diskSource) Name() string { return s.name }
func (s *diskSource) Size() int64  { return s.x.Size() }

func (s *diskSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := s.rd.ReadAtContext(ctx, p, off)
	if err != nil {
		return n, fmt.Errorf("source: %w", err)
	}
	return n, nil
}

func (s *diskSource) Extents(ctx context.Context) iter.Seq2[backup.Extent, error] {
	return func(yield func(backup.Extent, error) bool) {
		n := s.x.Len()
		for i := 0; i < n; {
			zero := s.x.ID(i).IsZero()
			j := i + 1
			for j < n && s.x.ID(j).IsZero() == zero {
				j++
			}
			off, _ := s.x.Range(i)
			end, l := s.x.Range(j - 1)
			k := backup.Data
			if zero {
				k = backup.Zero
			}
			if !yield(backup.Extent{Off: off, Len: end + l - off, Kind: k}, nil) {
				return
			}
			i = j
		}
	}
}

// Done drops the cache of decoded chunks once the disk is read (its
// chunks are stored, no index or manifest yet: a kill here is a kill
// mid-copy, the crashpoint "copy-disk-done").
func (s *diskSource) Done() {
	s.rd = nil
	crashpoint.Hit("copy-disk-done")
}

// CopiedGroup is a group backup CopyGroups stored in the target.
type CopiedGroup struct {
	SourceID repo.ID
	TargetID repo.ID
	*repo.Group
}

// CopyGroups copies the source's group records whose every member the
// target holds (copied now or before, as a copy or as the original) and
// whose group backup the target lacks: each is stored in the target with
// its members' target backup IDs and, as Origin, the original record's ID
// (a group backup and its copies share repo.GroupEntry.Identity). Call it
// after copying the backups, under the caller's shared locks. A record the
// target refuses (a member there lacks the group's name, as a copy made
// by a vmshadow without groups does) is skipped and named in skipped; a
// source record that cannot be read is skipped too. The error is for
// failures to read or store.
func CopyGroups(ctx context.Context, src, dst *repo.Repo) (copied []CopiedGroup, skipped []error, err error) {
	groups, bad, err := src.ScanGroups(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("source: %w", err)
	}
	for id, e := range bad {
		skipped = append(skipped, fmt.Errorf("source group record %s cannot be read, not copied: %w", id.Short(), e))
	}
	if len(groups) == 0 {
		return nil, skipped, nil
	}
	have, _, err := dst.ScanGroups(ctx)
	if err != nil {
		return nil, skipped, fmt.Errorf("target: %w", err)
	}
	haveGroup := map[string]bool{}
	for i := range have {
		haveGroup[have[i].Identity()] = true
		haveGroup[have[i].ID.String()] = true
	}
	srcBackups, _, err := src.ListBackups(ctx)
	if err != nil {
		return nil, skipped, fmt.Errorf("source: %w", err)
	}
	srcIdent := map[string]string{}
	for i := range srcBackups {
		srcIdent[srcBackups[i].ID.String()] = srcBackups[i].Identity()
	}
	dstBackups, _, err := dst.ListBackups(ctx)
	if err != nil {
		return nil, skipped, fmt.Errorf("target: %w", err)
	}
	inDst := map[string]repo.ID{}
	for i := range dstBackups {
		inDst[dstBackups[i].Identity()] = dstBackups[i].ID
		inDst[dstBackups[i].ID.String()] = dstBackups[i].ID
	}
	for i := range groups {
		ge := &groups[i]
		if haveGroup[ge.Identity()] {
			continue
		}
		g := *ge.Group
		g.Members = nil
		g.Origin, g.Nonce = ge.Identity(), ""
		for _, mb := range ge.Members {
			ident, ok := srcIdent[mb.Backup]
			if !ok {
				break // missing in the source: verify reports it
			}
			tid, ok := inDst[ident]
			if !ok {
				break // not copied (yet)
			}
			g.Members = append(g.Members, repo.GroupMember{VM: mb.VM, Backup: tid.String()})
		}
		if len(g.Members) != len(ge.Members) {
			continue
		}
		tid, err := dst.SaveGroup(ctx, &g)
		if errors.Is(err, errs.ErrUsage) {
			skipped = append(skipped, fmt.Errorf("group backup %s of group %s not copied: %w", ge.ID.Short(), ge.Name, err))
			continue
		}
		if err != nil {
			return copied, skipped, fmt.Errorf("copy group backup %s of group %s: %w", ge.ID.Short(), ge.Name, err)
		}
		copied = append(copied, CopiedGroup{SourceID: ge.ID, TargetID: tid, Group: &g})
	}
	return copied, skipped, nil
}
