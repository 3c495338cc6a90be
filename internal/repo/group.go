package repo

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Consistency groups: one snapshot set across several VMs is one group
// backup, stored as a group record (groups/<ID>, magic "vsGR", sealed and
// content-addressed like a manifest) naming one ordinary backup per
// member VM. Each member's manifest carries the group's name (Group) and
// the set's ID, so it is restorable alone and continues its own VM's
// chain. The record is written after every member's manifest: a member
// whose record never got written (the process died between) is an
// ordinary backup. A member listed by a record is not subject to its VM's
// keep rules: prune keeps or removes the group backup as a whole, and
// removing one member alone is refused while the record exists.

// magicGroup marks a sealed group record.
var magicGroup = [4]byte{'v', 's', 'G', 'R'}

// GroupVersion is the newest group record schema this vmshadow reads.
const GroupVersion = 1

// maxGroupPlain bounds a group record: a few hundred bytes per member.
const maxGroupPlain = 16 << 20

// Group is one group backup: the snapshot set of several VMs taken at one
// instant, one member backup per VM.
type Group struct {
	Version int    `json:"version"`
	Name    string `json:"name"`
	SetID   string `json:"set_id"`
	// Time is the group's snapshot instant.
	Time time.Time `json:"time"`
	// Consistency is the whole group's level (the lowest of its members).
	Consistency string `json:"consistency"`
	// FreezeMS is the group's freeze window in milliseconds.
	FreezeMS int64         `json:"freeze_ms"`
	Members  []GroupMember `json:"members"`
	// Origin is set on a record copied from another repository (vmshadow
	// copy): the ID of the original record where it was first stored.
	Origin string `json:"origin,omitempty"`
	// Nonce makes two otherwise identical records distinct.
	Nonce string `json:"nonce"`
}

// GroupMember is one VM of a group backup and its backup.
type GroupMember struct {
	VM     string `json:"vm"`
	Backup string `json:"backup"` // the member's backup ID (64 hex digits)
}

// GroupEntry is a stored group backup.
type GroupEntry struct {
	ID ID
	*Group
}

// Identity is what a group backup and its copies in other repositories
// share: its origin when it is a copy, else its own ID.
func (g *GroupEntry) Identity() string {
	if g.Origin != "" {
		return g.Origin
	}
	return g.ID.String()
}

// Check validates a group record's contents (errs.ErrCorrupt, or
// errs.ErrUnsupported for a newer version).
func (g *Group) Check() error {
	if g.Version > GroupVersion {
		return fmt.Errorf("group record version %d is newer than this vmshadow supports (%d): upgrade vmshadow: %w", g.Version, GroupVersion, errs.ErrUnsupported)
	}
	if g.Version < 1 {
		return fmt.Errorf("group record has invalid version %d: %w", g.Version, errs.ErrCorrupt)
	}
	if err := g.check(); err != nil {
		return fmt.Errorf("group record: %v: %w", err, errs.ErrCorrupt)
	}
	return nil
}

// check validates the fields, returning an error without a class: a
// record read is corrupt, a record to be saved is a usage error.
func (g *Group) check() error {
	if err := ValidName("group", g.Name); err != nil {
		return errors.New(strings.TrimSuffix(err.Error(), ": "+errs.ErrUsage.Error()))
	}
	if g.SetID == "" {
		return fmt.Errorf("group %s has no set id", g.Name)
	}
	if g.FreezeMS < 0 {
		return fmt.Errorf("group %s has a negative freeze window %d ms", g.Name, g.FreezeMS)
	}
	if g.Origin != "" {
		if _, err := ParseID(g.Origin); err != nil {
			return fmt.Errorf("group %s has invalid origin %q", g.Name, g.Origin)
		}
	}
	if len(g.Members) == 0 {
		return fmt.Errorf("group %s lists no members", g.Name)
	}
	vms, backups := map[string]bool{}, map[string]bool{}
	for _, m := range g.Members {
		if err := ValidName("VM", m.VM); err != nil {
			return fmt.Errorf("group %s: %s", g.Name, strings.TrimSuffix(err.Error(), ": "+errs.ErrUsage.Error()))
		}
		if _, err := ParseID(m.Backup); err != nil {
			return fmt.Errorf("group %s: member %s has invalid backup id %q (want the 64 hex digits of its backup ID)", g.Name, m.VM, m.Backup)
		}
		if vms[m.VM] {
			return fmt.Errorf("group %s lists VM %s twice", g.Name, m.VM)
		}
		if backups[m.Backup] {
			return fmt.Errorf("group %s lists backup %.8s twice", g.Name, m.Backup)
		}
		vms[m.VM], backups[m.Backup] = true, true
	}
	return nil
}

// Member returns the member of VM vm, or nil.
func (g *Group) Member(vm string) *GroupMember {
	for i := range g.Members {
		if g.Members[i].VM == vm {
			return &g.Members[i]
		}
	}
	return nil
}

// DecodeGroup parses and checks group record plaintext.
func DecodeGroup(b []byte) (*Group, error) {
	var g Group
	if err := json.Unmarshal(b, &g); err != nil {
		return nil, fmt.Errorf("group record is not valid JSON (%v): %w", err, errs.ErrCorrupt)
	}
	if err := g.Check(); err != nil {
		return nil, err
	}
	return &g, nil
}

func groupHandle(id ID) backend.Handle {
	return backend.Handle{Kind: backend.KindGroups, Name: id.String()}
}

// SaveGroup completes (version, nonce), checks and stores a group record,
// creating the group backup, and returns its ID. Every member's backup must
// exist, be of the member's VM, and carry the group's name and set ID in
// its manifest (errs.ErrUsage otherwise; errs.ErrNotFound for a missing
// member). The members' manifests are made durable before the record, and
// the record before SaveGroup returns. Hold a shared lock.
func (r *Repo) SaveGroup(ctx context.Context, g *Group) (ID, error) {
	g.Version = GroupVersion
	if g.Nonce == "" {
		var n [16]byte
		rand.Read(n[:])
		g.Nonce = fmt.Sprintf("%x", n)
	}
	if err := g.check(); err != nil {
		return ID{}, fmt.Errorf("invalid group record: %v: %w", err, errs.ErrUsage)
	}
	for _, mb := range g.Members {
		id, _ := ParseID(mb.Backup) // checked by Check
		m, err := r.LoadManifest(ctx, id)
		if err != nil {
			return ID{}, fmt.Errorf("group %s: member %s: %w", g.Name, mb.VM, err)
		}
		switch {
		case m.VM != mb.VM:
			return ID{}, fmt.Errorf("group %s: member %s names backup %s, which is of VM %s: %w", g.Name, mb.VM, id.Short(), m.VM, errs.ErrUsage)
		case m.Group != g.Name:
			return ID{}, fmt.Errorf("group %s: backup %s of member %s belongs to group %q, not %q (back it up with the group's name): %w", g.Name, id.Short(), mb.VM, m.Group, g.Name, errs.ErrUsage)
		case m.SetID != g.SetID:
			return ID{}, fmt.Errorf("group %s: backup %s of member %s comes from snapshot set %q, not the group's %q: %w", g.Name, id.Short(), mb.VM, m.SetID, g.SetID, errs.ErrUsage)
		}
	}
	existing, _, err := r.ScanGroups(ctx)
	if err != nil {
		return ID{}, err
	}
	for _, e := range existing {
		for _, mb := range g.Members {
			if e.Member(mb.VM) != nil && e.Member(mb.VM).Backup == mb.Backup {
				return ID{}, fmt.Errorf("group %s: backup %.8s of member %s is already a member of group backup %s of group %s: a backup belongs to one group backup: %w", g.Name, mb.Backup, mb.VM, e.ID.Short(), e.Name, errs.ErrUsage)
			}
		}
	}
	plain, err := json.Marshal(g)
	if err != nil {
		return ID{}, err
	}
	if len(plain) > maxGroupPlain {
		return ID{}, fmt.Errorf("group record of %d bytes exceeds the limit of %d bytes (too many members): %w", len(plain), maxGroupPlain, errs.ErrUsage)
	}
	if err := r.be.Sync(ctx); err != nil {
		return ID{}, fmt.Errorf("make member manifests durable before the group record: %w", err)
	}
	id := r.codec.hash(plain)
	h := groupHandle(id)
	if err := r.be.Put(ctx, h, r.codec.seal(nil, magicGroup, h.Name, plain, true)); err != nil {
		return id, fmt.Errorf("store group record %s of group %s: %w", id.Short(), g.Name, err)
	}
	if err := r.be.Sync(ctx); err != nil {
		return id, fmt.Errorf("make group record %s of group %s durable: %w", id.Short(), g.Name, err)
	}
	return id, nil
}

// LoadGroup fetches and verifies a group record. A missing one is
// errs.ErrNotFound, a damaged one errs.ErrCorrupt.
func (r *Repo) LoadGroup(ctx context.Context, id ID) (*Group, error) {
	h := groupHandle(id)
	blob, err := r.be.Get(ctx, h, 0, -1)
	if err != nil {
		if backend.IsNotExist(err) {
			return nil, fmt.Errorf("group backup %s not found: %w", id.Short(), errs.ErrNotFound)
		}
		return nil, fmt.Errorf("read group record %s: %w", id.Short(), err)
	}
	p, err := r.codec.open(nil, magicGroup, h.Name, blob, maxGroupPlain)
	if err != nil {
		return nil, fmt.Errorf("group record %s: %w", id.Short(), err)
	}
	if r.codec.hash(p) != id {
		return nil, fmt.Errorf("group record %s: content does not match its hash: %w", id.Short(), errs.ErrCorrupt)
	}
	g, err := DecodeGroup(p)
	if err != nil {
		return nil, fmt.Errorf("group record %s: %w", id.Short(), err)
	}
	return g, nil
}

func (r *Repo) groupIDs(ctx context.Context, prefix string) ([]ID, error) {
	return r.blobIDs(ctx, backend.KindGroups, "group records", prefix)
}

// ListGroups loads every group record, sorted by time (oldest first). A
// record that cannot be read is an error (errs.ErrCorrupt for damage)
// naming it: none is silently left out. ScanGroups returns them apart.
func (r *Repo) ListGroups(ctx context.Context) ([]GroupEntry, error) {
	list, bad, err := r.ScanGroups(ctx)
	if err != nil {
		return nil, err
	}
	if len(bad) > 0 {
		id := sortedIDs(bad)[0]
		return nil, fmt.Errorf("%d group records cannot be read (run 'vmshadow verify'), the first %s: %w", len(bad), id.Short(), bad[id])
	}
	return list, nil
}

// ScanGroups loads every group record, sorted by time (oldest first, then
// by ID); records that cannot be read are returned in bad, keyed by ID.
func (r *Repo) ScanGroups(ctx context.Context) (groups []GroupEntry, bad map[ID]error, err error) {
	ids, err := r.groupIDs(ctx, "")
	if err != nil {
		return nil, nil, err
	}
	return loadSorted(ctx, ids, func(id ID) (GroupEntry, time.Time, error) {
		g, err := r.LoadGroup(ctx, id)
		if err != nil {
			return GroupEntry{}, time.Time{}, err
		}
		return GroupEntry{ID: id, Group: g}, g.Time, nil
	})
}

// FindGroup resolves a group backup ID or an unambiguous prefix of one.
func (r *Repo) FindGroup(ctx context.Context, prefix string) (ID, error) {
	return r.findID(ctx, backend.KindGroups, "group backup", "vmshadow backups --groups", prefix)
}

// memberOf finds the group backup that lists backup id. It returns nil
// when none does. When a group record cannot be read and the backup's
// manifest names a group (m may be nil when it is not known), it fails:
// the backup may belong to that record.
func (r *Repo) memberOf(ctx context.Context, id ID, m *Manifest) (*GroupEntry, error) {
	groups, bad, err := r.ScanGroups(ctx)
	if err != nil {
		return nil, err
	}
	for i := range groups {
		for _, mb := range groups[i].Members {
			if mb.Backup == id.String() {
				return &groups[i], nil
			}
		}
	}
	if len(bad) > 0 && (m == nil || m.Group != "") {
		bid := sortedIDs(bad)[0]
		return nil, fmt.Errorf("backup %s may be a member of group record %s, which cannot be read (%v): run 'vmshadow verify': %w", id.Short(), bid.Short(), bad[bid], errs.ErrCorrupt)
	}
	return nil, nil
}

// ErrGroupMember is wrapped by the error of an attempt to remove one
// member of a group backup alone.
var ErrGroupMember = fmt.Errorf("a member of a group backup is not removed alone: %w", errs.ErrUsage)

// DeleteGroup removes a group backup as a whole: its record first (from
// then on its members are ordinary backups, so a removal interrupted there
// leaves nothing that refers to a missing backup), then each member's
// manifest and health record. gc frees their chunks later. Hold an
// exclusive lock. It returns the group's members.
func (r *Repo) DeleteGroup(ctx context.Context, id ID) (*Group, error) {
	g, err := r.LoadGroup(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := r.be.Delete(ctx, groupHandle(id)); err != nil && !backend.IsNotExist(err) {
		return g, fmt.Errorf("remove group record %s of group %s: %w", id.Short(), g.Name, err)
	}
	if err := r.be.Sync(ctx); err != nil {
		return g, fmt.Errorf("make the removal of group record %s durable: %w", id.Short(), err)
	}
	for _, mb := range g.Members {
		if err := r.be.Delete(ctx, backend.Handle{Kind: backend.KindBackups, Name: mb.Backup}); err != nil && !backend.IsNotExist(err) {
			return g, fmt.Errorf("group record %s of group %s removed; removing member backup %.8s of %s failed (it is an ordinary backup now): %w", id.Short(), g.Name, mb.Backup, mb.VM, err)
		}
		if err := r.deleteHealth(ctx, mb.Backup); err != nil {
			return g, err
		}
	}
	return g, nil
}
