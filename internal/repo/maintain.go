package repo

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"maps"
	"runtime"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/retention"
)

// Affected names a backup (and disk) that a damaged blob breaks.
type Affected struct {
	Backup string    `json:"backup"`
	VM     string    `json:"vm,omitempty"`
	Time   time.Time `json:"time,omitzero"`
	Disk   string    `json:"disk,omitempty"`
}

// Problem is one damaged or missing blob found by Verify.
type Problem struct {
	Kind     string     `json:"kind"` // "manifest", "index", "chunk", "health" or "group"
	ID       string     `json:"id"`
	Error    string     `json:"error"`
	Missing  bool       `json:"missing"`
	Affected []Affected `json:"affected"`
	// Quarantined: the chunk is in the quarantine (moved aside by this or
	// an earlier read): the next backup of the same data stores it again
	// and heals the affected backups.
	Quarantined bool `json:"quarantined,omitempty"`
}

// Healed is a chunk that was quarantined (found damaged or missing) and
// has since been stored again by a later backup: the backups that
// reference it have that chunk back.
type Healed struct {
	ID          string     `json:"id"`
	Quarantined time.Time  `json:"quarantined"` // when it was moved aside
	Affected    []Affected `json:"affected"`
}

// VerifyOptions select what Verify checks.
type VerifyOptions struct {
	Backups  []ID // nil: every backup
	Workers  int  // parallel chunk reads; default 2 x GOMAXPROCS
	Progress func(done, total int64)
}

// VerifyResult is what Verify checked and found.
type VerifyResult struct {
	Backups      int       `json:"backups"`
	Groups       int       `json:"groups"` // group records checked
	Indexes      int       `json:"indexes"`
	Chunks       int       `json:"chunks"`
	BytesChecked int64     `json:"bytes_checked"` // stored bytes read
	Problems     []Problem `json:"problems"`
	// Healed lists quarantined chunks that are stored again and intact;
	// HealedBackups the backups that referenced one of them and have no
	// problem left: they are whole again.
	Healed        []Healed `json:"healed"`
	HealedBackups []string `json:"healed_backups"`
}

// Verify re-reads every manifest, index and chunk the selected backups
// reference, decrypts and re-hashes each, and reports every missing or
// damaged one with the backups it affects. A damaged chunk is moved to the
// quarantine and a missing one recorded there, so the next backup stores
// it again (see quarantineChunk); a quarantined chunk found stored again
// and intact is reported as healed. Memory grows with the number of
// distinct chunks (about 50 bytes each), not with their size. Hold a shared
// lock. The error is for failures to run (listing, cancellation), not for
// problems found.
func (r *Repo) Verify(ctx context.Context, o VerifyOptions) (*VerifyResult, error) {
	ids := o.Backups
	if ids == nil {
		var err error
		if ids, err = r.backupIDs(ctx, ""); err != nil {
			return nil, err
		}
	}
	res := &VerifyResult{Backups: len(ids), Problems: []Problem{}, Healed: []Healed{}, HealedBackups: []string{}}
	quarantined, err := r.Quarantined(ctx)
	if err != nil {
		return nil, err
	}
	type ref struct {
		backup ID
		m      *Manifest
		disk   string
	}
	indexRefs := map[ID][]ref{}
	loaded := map[ID]*Manifest{}
	for _, id := range ids {
		m, err := r.LoadManifest(ctx, id)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			res.Problems = append(res.Problems, Problem{Kind: "manifest", ID: id.String(), Error: err.Error(),
				Missing: errors.Is(err, errs.ErrNotFound), Affected: []Affected{{Backup: id.String()}}})
			continue
		}
		loaded[id] = m
		for _, d := range m.Indexed() {
			xid, _ := ParseID(d.Index) // checked by DecodeManifest
			indexRefs[xid] = append(indexRefs[xid], ref{id, m, d.Name})
		}
		// The health record (if any) must open: a damaged one is reported
		// (the next healthcheck of the backup replaces it).
		if _, err := r.LoadHealth(ctx, id); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			res.Problems = append(res.Problems, Problem{Kind: "health", ID: id.String(), Error: err.Error(),
				Affected: []Affected{{Backup: id.String(), VM: m.VM, Time: m.Time}}})
		}
	}
	if err := r.verifyGroups(ctx, o.Backups == nil, ids, loaded, res); err != nil {
		return nil, err
	}
	affected := func(refs []ref) []Affected {
		var a []Affected
		for _, rf := range refs {
			a = append(a, Affected{Backup: rf.backup.String(), VM: rf.m.VM, Time: rf.m.Time, Disk: rf.disk})
		}
		sort.Slice(a, func(i, j int) bool { return a[i].Backup+a[i].Disk < a[j].Backup+a[j].Disk })
		return a
	}
	chunks := map[ID]struct{}{}
	xids := sortedIDs(indexRefs)
	for _, xid := range xids {
		x, err := r.LoadIndex(ctx, xid)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			res.Problems = append(res.Problems, Problem{Kind: "index", ID: xid.String(), Error: err.Error(),
				Missing: errors.Is(err, errs.ErrNotFound), Affected: affected(indexRefs[xid])})
			delete(indexRefs, xid)
			continue
		}
		res.Indexes++
		for i := range x.Len() {
			if id := x.ID(i); !id.IsZero() {
				chunks[id] = struct{}{}
			}
		}
	}
	res.Chunks = len(chunks)

	// Check every chunk once, in parallel.
	workers := o.Workers
	if workers <= 0 {
		workers = 2 * runtime.GOMAXPROCS(0)
	}
	var (
		mu       sync.Mutex
		bad      = map[ID]error{}
		done     atomic.Int64
		checked  atomic.Int64
		work     = make(chan ID)
		g, gctx  = errgroup.WithContext(ctx)
		progress = o.Progress
	)
	g.Go(func() error {
		defer close(work)
		for id := range chunks {
			select {
			case work <- id:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range workers {
		g.Go(func() error {
			var buf []byte
			for id := range work {
				blob, err := r.be.Get(gctx, chunkHandle(id), 0, -1)
				if err == nil {
					checked.Add(int64(len(blob)))
					buf, err = r.OpenChunk(id, blob, buf)
				} else if backend.IsNotExist(err) {
					err = fmt.Errorf("chunk %s is missing: %w", id, errs.ErrNotFound)
				}
				if err != nil {
					if gctx.Err() != nil {
						return gctx.Err()
					}
					// Move it aside (or record it missing) so that no
					// backup deduplicates onto it.
					var qerr error
					if errors.Is(err, errs.ErrCorrupt) {
						qerr = r.quarantineChunk(gctx, id)
					} else if errors.Is(err, errs.ErrNotFound) {
						qerr = r.recordMissing(gctx, id)
					}
					if qerr != nil {
						err = fmt.Errorf("%w (could not quarantine it: %v)", err, qerr)
					}
					mu.Lock()
					bad[id] = err
					mu.Unlock()
				}
				if n := done.Add(1); progress != nil {
					progress(n, int64(len(chunks)))
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	res.BytesChecked = checked.Load()
	healed := map[ID]time.Time{}
	for id, t := range quarantined {
		if _, ok := chunks[id]; ok {
			if _, isBad := bad[id]; !isBad {
				healed[id] = t
			}
		}
	}
	if len(bad) == 0 && len(healed) == 0 {
		return res, nil
	}

	// Attribute damaged and healed chunks to the backups whose indexes
	// name them.
	chunkRefs := map[ID][]ref{}
	for _, xid := range sortedIDs(indexRefs) {
		x, err := r.LoadIndex(ctx, xid)
		if err != nil {
			return nil, fmt.Errorf("re-read index %s: %w", xid, err)
		}
		seen := map[ID]bool{}
		for i := range x.Len() {
			id := x.ID(i)
			_, isBad := bad[id]
			_, isHealed := healed[id]
			if (isBad || isHealed) && !seen[id] {
				seen[id] = true
				chunkRefs[id] = append(chunkRefs[id], indexRefs[xid]...)
			}
		}
	}
	for _, id := range sortedIDs(bad) {
		_, q := r.be.Stat(ctx, quarantineHandle(id))
		res.Problems = append(res.Problems, Problem{Kind: "chunk", ID: id.String(), Error: bad[id].Error(),
			Missing: errors.Is(bad[id], errs.ErrNotFound), Affected: affected(chunkRefs[id]), Quarantined: q == nil})
	}
	broken := map[string]bool{}
	for _, p := range res.Problems {
		for _, a := range p.Affected {
			broken[a.Backup] = true
		}
	}
	whole := map[string]bool{}
	for _, id := range sortedIDs(healed) {
		a := affected(chunkRefs[id])
		res.Healed = append(res.Healed, Healed{ID: id.String(), Quarantined: healed[id], Affected: a})
		for _, x := range a {
			if !broken[x.Backup] && !whole[x.Backup] {
				whole[x.Backup] = true
				res.HealedBackups = append(res.HealedBackups, x.Backup)
			}
		}
	}
	sort.Strings(res.HealedBackups)
	return res, nil
}

// verifyGroups checks the group records (all of them, or those that list
// one of the backups ids): each must open, and each member's backup must
// exist and belong to the group. A record with a missing member is a
// problem, never left out: the group backup cannot be restored whole.
func (r *Repo) verifyGroups(ctx context.Context, all bool, ids []ID, loaded map[ID]*Manifest, res *VerifyResult) error {
	gids, err := r.groupIDs(ctx, "")
	if err != nil {
		return err
	}
	selected := map[string]bool{}
	for _, id := range ids {
		selected[id.String()] = true
	}
	for _, gid := range gids {
		g, err := r.LoadGroup(ctx, gid)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if all {
				res.Groups++
				res.Problems = append(res.Problems, Problem{Kind: "group", ID: gid.String(), Error: err.Error(),
					Missing: errors.Is(err, errs.ErrNotFound), Affected: []Affected{}})
			}
			continue
		}
		if !all && !slices.ContainsFunc(g.Members, func(mb GroupMember) bool { return selected[mb.Backup] }) {
			continue
		}
		res.Groups++
		for _, mb := range g.Members {
			bid, _ := ParseID(mb.Backup) // checked by DecodeGroup
			var why string
			m, ok := loaded[bid]
			if !ok {
				if m, err = r.LoadManifest(ctx, bid); err != nil {
					switch {
					case ctx.Err() != nil:
						return ctx.Err()
					case errors.Is(err, errs.ErrNotFound):
						why = "is missing"
					case all:
						continue // damaged: reported as a manifest problem
					default:
						why = "cannot be read (" + err.Error() + ")"
					}
				}
			}
			switch {
			case why != "":
			case m.VM != mb.VM:
				why = "is of VM " + m.VM
			case m.Group != g.Name || m.SetID != g.SetID:
				why = fmt.Sprintf("belongs to group %q, snapshot set %q", m.Group, m.SetID)
			default:
				continue
			}
			res.Problems = append(res.Problems, Problem{Kind: "group", ID: gid.String(), Missing: why == "is missing",
				Error: fmt.Sprintf("group backup %s of group %s (%s): member backup %.8s of VM %s %s: the group backup is incomplete and cannot be restored whole (its other members can be restored alone)",
					gid.Short(), g.Name, g.Time.Format(time.RFC3339), mb.Backup, mb.VM, why),
				Affected: []Affected{{Backup: mb.Backup, VM: mb.VM, Time: g.Time}}})
		}
	}
	return nil
}

func sortedIDs[V any](m map[ID]V) []ID {
	ids := make([]ID, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return string(ids[i][:]) < string(ids[j][:]) })
	return ids
}

// GCOptions configure garbage collection.
type GCOptions struct {
	// Grace protects unreferenced blobs younger than this: they may belong
	// to a backup whose manifest is not written yet. Default DefaultGrace.
	Grace time.Duration
	// Immediate is grace 0: every unreferenced blob goes at once. The
	// exclusive lock gc holds is what makes it safe: no backup is running
	// (one whose lock went stale, its host cut off from the repository for
	// LockStale, cancels itself before it writes its manifest).
	Immediate bool
	DryRun    bool
}

// DefaultGrace is gc's default grace period.
const DefaultGrace = 24 * time.Hour

// GCResult counts what gc found and deleted.
type GCResult struct {
	Backups          int   `json:"backups"`
	ChunksReferenced int   `json:"chunks_referenced"`
	ChunksDeleted    int   `json:"chunks_deleted"`
	IndexesDeleted   int   `json:"indexes_deleted"`
	BytesDeleted     int64 `json:"bytes_deleted"`
	ChunksInGrace    int   `json:"chunks_in_grace"` // unreferenced but younger than the grace period
	IndexesInGrace   int   `json:"indexes_in_grace"`
	TempFilesRemoved int   `json:"temp_files_removed"`
	// QuarantineRemoved counts quarantined chunk copies removed: their
	// chunk is stored again, or no backup references it any more.
	QuarantineRemoved int `json:"quarantine_removed"`
	// HealthDeleted counts health records of backups that no longer exist
	// (removed by a prune interrupted between the two deletions, or by an
	// older vmshadow), deleted without grace: a record is only ever
	// written while its backup exists.
	HealthDeleted int  `json:"health_deleted"`
	DryRun        bool `json:"dry_run"`
}

// tempCleaner is implemented by backends that keep temporary files of
// interrupted writes (the local directory backend).
type tempCleaner interface {
	CleanTemp(ctx context.Context, age time.Duration) (int, error)
}

// GC deletes indexes and chunks that no manifest references and that are
// older than the grace period. It refuses to run when any manifest or
// referenced index cannot be read, since it could not know what those
// reference. Hold an exclusive lock; with DryRun it writes and deletes
// nothing, and a shared lock is enough (a preview of what gc would do).
func (r *Repo) GC(ctx context.Context, o GCOptions) (*GCResult, error) {
	if o.Immediate {
		o.Grace = 0
	} else if o.Grace == 0 {
		o.Grace = DefaultGrace
	}
	if o.Grace < 0 {
		return nil, fmt.Errorf("negative grace period %s: %w", o.Grace, errs.ErrUsage)
	}
	res := &GCResult{DryRun: o.DryRun}
	backups, bad, err := r.ListBackups(ctx)
	if err != nil {
		return nil, err
	}
	if len(bad) > 0 {
		id := sortedIDs(bad)[0]
		return nil, fmt.Errorf("gc stopped: manifest of backup %s cannot be read (%v); nothing was deleted. Run 'vmshadow verify' and remove or repair it: %w", id.Short(), bad[id], errs.ErrCorrupt)
	}
	res.Backups = len(backups)
	indexes := map[ID]struct{}{}
	for _, b := range backups {
		for _, d := range b.Indexed() {
			xid, _ := ParseID(d.Index)
			indexes[xid] = struct{}{}
		}
	}
	chunks := map[ID]struct{}{}
	for xid := range indexes {
		x, err := r.LoadIndex(ctx, xid)
		if err != nil {
			return nil, fmt.Errorf("gc stopped: %v; nothing was deleted. Run 'vmshadow verify': %w", err, errs.ErrCorrupt)
		}
		for i := range x.Len() {
			if id := x.ID(i); !id.IsZero() {
				chunks[id] = struct{}{}
			}
		}
	}
	res.ChunksReferenced = len(chunks)
	cutoff := time.Now().Add(-o.Grace)
	type victim struct {
		h    backend.Handle
		size int64
	}
	var victims []victim
	collect := func(kind backend.Kind, refs map[ID]struct{}, inGrace *int) error {
		return r.be.List(ctx, kind, "", func(fi backend.Info) error {
			id, err := ParseID(fi.Name)
			if err != nil {
				return nil // not ours
			}
			if _, ok := refs[id]; ok {
				return nil
			}
			if fi.ModTime.After(cutoff) {
				*inGrace++
				return nil
			}
			victims = append(victims, victim{backend.Handle{Kind: kind, Name: fi.Name}, fi.Size})
			return nil
		})
	}
	if err := collect(backend.KindIndexes, indexes, &res.IndexesInGrace); err != nil {
		return nil, fmt.Errorf("list indexes: %w", err)
	}
	if err := collect(backend.KindChunks, chunks, &res.ChunksInGrace); err != nil {
		return nil, fmt.Errorf("list chunks: %w", err)
	}
	// Quarantined copies go once their chunk is stored again (verify has
	// had the grace period to report the backups healed) or unreferenced.
	var quarantine []backend.Handle
	err = r.be.List(ctx, backend.KindQuarantine, "", func(fi backend.Info) error {
		if id, err := ParseID(fi.Name); err == nil && !fi.ModTime.After(cutoff) {
			if _, ok := chunks[id]; !ok {
				quarantine = append(quarantine, quarantineHandle(id))
			} else if _, err := r.be.Stat(ctx, chunkHandle(id)); err == nil {
				quarantine = append(quarantine, quarantineHandle(id))
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list quarantined chunks: %w", err)
	}
	res.QuarantineRemoved = len(quarantine)
	exist := map[string]bool{}
	for _, b := range backups {
		exist[b.ID.String()] = true
	}
	orphans, err := r.orphanHealth(ctx, exist)
	if err != nil {
		return nil, err
	}
	res.HealthDeleted = len(orphans)
	for _, fi := range orphans {
		res.BytesDeleted += fi.Size
		if o.DryRun {
			continue
		}
		if err := r.deleteHealth(ctx, fi.Name); err != nil {
			return res, err
		}
	}
	if !o.DryRun {
		for _, h := range quarantine {
			if err := r.be.Delete(ctx, h); err != nil && !backend.IsNotExist(err) {
				return res, fmt.Errorf("delete %s: %w", h, err)
			}
		}
	}
	for _, v := range victims {
		if v.h.Kind == backend.KindChunks {
			res.ChunksDeleted++
		} else {
			res.IndexesDeleted++
		}
		res.BytesDeleted += v.size
		if o.DryRun {
			continue
		}
		if err := r.be.Delete(ctx, v.h); err != nil && !backend.IsNotExist(err) {
			return res, fmt.Errorf("delete %s: %w", v.h, err)
		}
		crashpoint.Hit("gc-deleted")
	}
	if tc, ok := r.be.(tempCleaner); ok && !o.DryRun {
		n, err := tc.CleanTemp(ctx, o.Grace)
		res.TempFilesRemoved = n
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

// PruneOptions configure prune.
type PruneOptions struct {
	// VM, if set, prunes only this VM's backups that belong to no group
	// backup; Group, if set, only this group's group backups. With
	// neither, every VM's and every group's.
	VM     string
	Group  string
	Policy retention.Policy
	DryRun bool
}

// PruneDecision is prune's verdict on one backup, or on one group backup
// (Group set, ID the group record's, VM empty, Members its members'
// backups, all kept or removed with it).
type PruneDecision struct {
	ID      string        `json:"id"`
	VM      string        `json:"vm"`
	Group   string        `json:"group,omitempty"`
	Time    time.Time     `json:"time"`
	Keep    bool          `json:"keep"`
	Reasons []string      `json:"reasons"`
	Members []GroupMember `json:"members,omitempty"`
}

// Prune applies the keep policy to each VM's backups separately, and to
// each group's group backups separately, and deletes what it does not keep
// (unless DryRun): a backup's manifest, or a group backup's record and
// every member's manifest (DeleteGroup). A backup that a group record
// lists is not subject to its VM's rules: its group backup is kept or
// removed whole. Their chunks are freed by gc. Unreadable manifests are
// never deleted; while a group record cannot be read, backups whose
// manifest names a group are kept (they may be its members). Hold an
// exclusive lock; with DryRun it deletes nothing, and a shared lock is
// enough.
func (r *Repo) Prune(ctx context.Context, o PruneOptions) ([]PruneDecision, error) {
	if o.Policy.Empty() {
		return nil, fmt.Errorf("no keep policy given: prune would remove every backup; give at least one --keep-* option: %w", errs.ErrUsage)
	}
	if o.Group != "" {
		if err := ValidName("group", o.Group); err != nil {
			return nil, err
		}
	}
	backups, _, err := r.ListBackups(ctx)
	if err != nil {
		return nil, err
	}
	groups, badGroups, err := r.ScanGroups(ctx)
	if err != nil {
		return nil, err
	}
	member := map[string]bool{}
	for _, g := range groups {
		for _, mb := range g.Members {
			member[mb.Backup] = true
		}
	}
	var out []PruneDecision
	byVM := map[string][]retention.Item{}
	if o.VM != "" || o.Group == "" {
		for _, b := range backups {
			if o.VM != "" && b.VM != o.VM || member[b.ID.String()] {
				continue
			}
			if len(badGroups) > 0 && b.Group != "" {
				bid := sortedIDs(badGroups)[0]
				out = append(out, PruneDecision{ID: b.ID.String(), VM: b.VM, Time: b.Time, Keep: true,
					Reasons: []string{fmt.Sprintf("may be a member of group record %s, which cannot be read (run 'vmshadow verify')", bid.Short())}})
				continue
			}
			byVM[b.VM] = append(byVM[b.VM], retention.Item{ID: b.ID.String(), Time: b.Time})
		}
	}
	byName := map[string][]retention.Item{}
	members := map[string][]GroupMember{}
	if o.Group != "" || o.VM == "" {
		for _, g := range groups {
			if o.Group != "" && g.Name != o.Group {
				continue
			}
			byName[g.Name] = append(byName[g.Name], retention.Item{ID: g.ID.String(), Time: g.Time})
			members[g.ID.String()] = g.Members
		}
	}
	for _, vm := range slices.Sorted(maps.Keys(byVM)) {
		for _, d := range retention.Apply(byVM[vm], o.Policy) {
			out = append(out, PruneDecision{ID: d.ID, VM: vm, Time: d.Time, Keep: d.Keep, Reasons: d.Reasons})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(byName)) {
		for _, d := range retention.Apply(byName[name], o.Policy) {
			out = append(out, PruneDecision{ID: d.ID, Group: name, Time: d.Time, Keep: d.Keep, Reasons: d.Reasons, Members: members[d.ID]})
		}
	}
	if o.DryRun {
		return out, nil
	}
	for _, d := range out {
		if d.Keep {
			continue
		}
		if d.Group != "" {
			gid, _ := ParseID(d.ID)
			if _, err := r.DeleteGroup(ctx, gid); err != nil {
				return out, err
			}
			crashpoint.Hit("prune-removed")
			continue
		}
		if err := r.be.Delete(ctx, backend.Handle{Kind: backend.KindBackups, Name: d.ID}); err != nil && !backend.IsNotExist(err) {
			return out, fmt.Errorf("remove backup %s: %w", d.ID[:8], err)
		}
		if err := r.deleteHealth(ctx, d.ID); err != nil {
			return out, err
		}
		crashpoint.Hit("prune-removed")
	}
	return out, nil
}

// dropMargin widens the window of manifests DropChunks checks, for clock
// differences between this host and the store's timestamps.
const dropMargin = 15 * time.Minute

// DropChunks deletes the chunks ids, which a failed backup that started at
// since stored, unless a manifest written since then references them
// (another backup may have deduplicated onto them and finished) or they
// are quarantined (the failed backup stored a damaged chunk again: that
// heals older backups, so it stays). Chunks of manifests written before
// since cannot be among them: the failed backup stored only chunks that
// were absent. Hold an exclusive lock: it excludes backups still running,
// which might reuse them. It returns how many chunks it deleted.
func (r *Repo) DropChunks(ctx context.Context, ids iter.Seq[ID], since time.Time) (int, error) {
	keep, err := r.Quarantined(ctx)
	if err != nil {
		return 0, err
	}
	var recent []ID
	err = r.be.List(ctx, backend.KindBackups, "", func(fi backend.Info) error {
		if id, err := ParseID(fi.Name); err == nil && !fi.ModTime.Before(since.Add(-dropMargin)) {
			recent = append(recent, id)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("list backups: %w", err)
	}
	for _, bid := range recent {
		m, err := r.LoadManifest(ctx, bid)
		if err != nil {
			return 0, fmt.Errorf("nothing deleted: %w", err)
		}
		for _, d := range m.Indexed() {
			xid, _ := ParseID(d.Index)
			x, err := r.LoadIndex(ctx, xid)
			if err != nil {
				return 0, fmt.Errorf("nothing deleted: %w", err)
			}
			for i := range x.Len() {
				keep[x.ID(i)] = time.Time{}
			}
		}
	}
	n := 0
	for id := range ids {
		if _, ok := keep[id]; ok {
			continue
		}
		keep[id] = time.Time{} // a chunk stored at two entries is deleted once
		if err := r.be.Delete(ctx, chunkHandle(id)); err != nil && !backend.IsNotExist(err) {
			return n, fmt.Errorf("delete chunk %s: %w", id, err)
		}
		n++
	}
	if err := r.be.Sync(ctx); err != nil {
		return n, fmt.Errorf("sync deletions: %w", err)
	}
	return n, nil
}

// DeleteBackup removes backup id's manifest, as prune removes the backups
// its policy does not keep; gc frees its chunks later. The caller holds
// the exclusive lock. An unknown ID is errs.ErrNotFound. A member of a
// group backup is refused (ErrGroupMember, errs.ErrUsage) while its group
// record exists: a group backup is removed whole (DeleteGroup, prune).
func (r *Repo) DeleteBackup(ctx context.Context, id ID) error {
	m, err := r.LoadManifest(ctx, id)
	if errors.Is(err, errs.ErrNotFound) {
		return fmt.Errorf("backup %s: no such backup: %w", id.Short(), errs.ErrNotFound)
	}
	if err != nil {
		m = nil // a damaged manifest may be removed, unless a group lists it
	}
	g, err := r.memberOf(ctx, id, m)
	if err != nil {
		return fmt.Errorf("remove backup %s: %w", id.Short(), err)
	}
	if g != nil {
		vm := ""
		for _, mb := range g.Members {
			if mb.Backup == id.String() {
				vm = " of VM " + mb.VM
			}
		}
		return fmt.Errorf("backup %s%s is a member of group backup %s of group %s (%s): remove the group backup as a whole (vmshadow prune --group %s with --keep-* rules that do not keep it), not one member: %w",
			id.Short(), vm, g.ID.Short(), g.Name, g.Time.Format(time.RFC3339), g.Name, ErrGroupMember)
	}
	h := backend.Handle{Kind: backend.KindBackups, Name: id.String()}
	if err := r.be.Delete(ctx, h); err != nil {
		if backend.IsNotExist(err) {
			return fmt.Errorf("backup %s: no such backup: %w", id.Short(), errs.ErrNotFound)
		}
		return fmt.Errorf("remove backup %s: %w", id.Short(), err)
	}
	return r.deleteHealth(ctx, id.String())
}
