package repo

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/retention"
)

// groupFixture stores manifests (one small disk each) into a test
// repository.
type groupFixture struct {
	t   *testing.T
	ctx context.Context
	r   *Repo
	be  backend.Backend
	xid ID
	t0  time.Time
}

func newGroupFixture(t *testing.T) *groupFixture {
	ctx := context.Background()
	r, be := newTestRepo(t, EncryptionAESGCM)
	x, err := NewIndex(MinChunkSize, MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	xid, err := r.SaveIndex(ctx, x)
	if err != nil {
		t.Fatal(err)
	}
	return &groupFixture{t, ctx, r, be, xid, time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

// backup stores a backup of vm at t0+h hours, a member of group (set set)
// when group is not empty.
func (f *groupFixture) backup(vm string, h int, group, set string) ID {
	f.t.Helper()
	id, err := f.r.SaveManifest(f.ctx, &Manifest{VM: vm, Time: f.t0.Add(time.Duration(h) * time.Hour), Source: "qemu", Mode: "full",
		Group: group, SetID: set, Consistency: "application",
		Disks: []ManifestDisk{{Name: "vda", Size: MinChunkSize, ChunkSize: MinChunkSize, Index: f.xid.String()}}})
	if err != nil {
		f.t.Fatal(err)
	}
	return id
}

// group backs up vms as members of group name at t0+h hours and stores
// the group record.
func (f *groupFixture) group(name string, h int, vms ...string) (ID, *Group) {
	f.t.Helper()
	set := fmt.Sprintf("set-%s-%d", name, h)
	g := &Group{Name: name, SetID: set, Time: f.t0.Add(time.Duration(h) * time.Hour), Consistency: "filesystem", FreezeMS: 42}
	for _, vm := range vms {
		g.Members = append(g.Members, GroupMember{VM: vm, Backup: f.backup(vm, h, name, set).String()})
	}
	id, err := f.r.SaveGroup(f.ctx, g)
	if err != nil {
		f.t.Fatal(err)
	}
	return id, g
}

func (f *groupFixture) exists(kind backend.Kind, id string) bool {
	_, err := f.be.Stat(f.ctx, backend.Handle{Kind: kind, Name: id})
	if err != nil && !backend.IsNotExist(err) {
		f.t.Fatal(err)
	}
	return err == nil
}

// TestGroupSaveLoadList: a group record round-trips, is sealed as a
// "groups" blob under its ID, lists sorted by time, and is found by any
// unambiguous prefix of its ID.
func TestGroupSaveLoadList(t *testing.T) {
	f := newGroupFixture(t)
	later, gl := f.group("app", 5, "db", "web")
	earlier, ge := f.group("app", 1, "db", "web")
	other, _ := f.group("cluster", 3, "n1")
	got, err := f.r.LoadGroup(f.ctx, later)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, gl) || got.Version != 1 || got.Nonce == "" || got.FreezeMS != 42 || got.Consistency != "filesystem" {
		t.Fatalf("loaded %+v, saved %+v", got, gl)
	}
	if !f.exists(backend.KindGroups, later.String()) {
		t.Fatal("no groups/ blob under the record's ID")
	}
	list, err := f.r.ListGroups(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []ID
	for _, e := range list {
		ids = append(ids, e.ID)
	}
	if !slices.Equal(ids, []ID{earlier, other, later}) {
		t.Fatalf("listed %v, want %v by time", ids, []ID{earlier, other, later})
	}
	if !reflect.DeepEqual(list[0].Group, ge) {
		t.Fatalf("listed %+v, want %+v", list[0].Group, ge)
	}
	for _, p := range []string{later.String(), later.Short(), strings.ToUpper(later.String()[:10])} {
		if id, err := f.r.FindGroup(f.ctx, p); err != nil || id != later {
			t.Fatalf("FindGroup(%s) = %s, %v", p, id.Short(), err)
		}
	}
	if _, err := f.r.FindGroup(f.ctx, "xyz"); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("FindGroup(xyz): %v, want a usage error", err)
	}
	// A backup ID is not a group backup ID.
	if _, err := f.r.FindGroup(f.ctx, gl.Members[0].Backup); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("FindGroup(member backup id): %v, want not found", err)
	}
	// 17 records: two share their first hex digit.
	for i := range 14 {
		f.group("many", 10+i, "m")
	}
	all, err := f.r.ListGroups(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[byte]bool{}
	for _, e := range all {
		d := e.ID.String()[0]
		if seen[d] {
			_, err := f.r.FindGroup(f.ctx, string(d))
			if !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "ambiguous") {
				t.Fatalf("FindGroup(%c): %v, want ambiguous", d, err)
			}
			return
		}
		seen[d] = true
	}
	t.Fatal("no two records share a first digit")
}

// TestSaveGroupValidation: SaveGroup refuses a record that names no
// members, a bad name, a missing backup, a backup of another VM, group or
// snapshot set, or a backup another group backup already lists; it stores
// nothing then.
func TestSaveGroupValidation(t *testing.T) {
	f := newGroupFixture(t)
	db := f.backup("db", 1, "app", "s1").String()
	web := f.backup("web", 1, "app", "s1").String()
	plain := f.backup("web", 2, "", "").String()
	otherSet := f.backup("web", 3, "app", "s2").String()
	otherGroup := f.backup("web", 4, "shop", "s1").String()
	_, taken := f.group("app", 9, "db")
	missing := ID{7}.String()
	ok := func() *Group {
		return &Group{Name: "app", SetID: "s1", Time: f.t0, Consistency: "crash", Members: []GroupMember{{"db", db}, {"web", web}}}
	}
	for _, tc := range []struct {
		name  string
		edit  func(*Group)
		class *errs.Class
		say   string
	}{
		{"no members", func(g *Group) { g.Members = nil }, errs.ErrUsage, "lists no members"},
		{"bad name", func(g *Group) { g.Name = "../x" }, errs.ErrUsage, "invalid group name"},
		{"no set id", func(g *Group) { g.SetID = "" }, errs.ErrUsage, "no set id"},
		{"short backup id", func(g *Group) { g.Members[0].Backup = db[:8] }, errs.ErrUsage, "64 hex digits"},
		{"vm twice", func(g *Group) { g.Members[1].VM = "db" }, errs.ErrUsage, "twice"},
		{"bad vm name", func(g *Group) { g.Members[1].VM = "-web" }, errs.ErrUsage, "invalid VM name"},
		{"missing backup", func(g *Group) { g.Members[1].Backup = missing }, errs.ErrNotFound, "not found"},
		{"backup of another vm", func(g *Group) { g.Members[1].Backup = db; g.Members[0].Backup = web }, errs.ErrUsage, "which is of VM"},
		{"backup of no group", func(g *Group) { g.Members[1].Backup = plain }, errs.ErrUsage, `belongs to group "", not "app"`},
		{"backup of another group", func(g *Group) { g.Members[1].Backup = otherGroup }, errs.ErrUsage, `belongs to group "shop"`},
		{"backup of another set", func(g *Group) { g.Members[1].Backup = otherSet }, errs.ErrUsage, "snapshot set"},
		{"backup in another record", func(g *Group) {
			g.SetID = taken.SetID
			g.Members = []GroupMember{{"db", taken.Members[0].Backup}}
		}, errs.ErrUsage, "already a member"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := ok()
			tc.edit(g)
			_, err := f.r.SaveGroup(f.ctx, g)
			if !errors.Is(err, tc.class) || !strings.Contains(err.Error(), tc.say) {
				t.Fatalf("got %v, want %v saying %q", err, tc.class, tc.say)
			}
			if list, _ := f.r.ListGroups(f.ctx); len(list) != 1 {
				t.Fatalf("%d group records stored, want only the one made before", len(list))
			}
		})
	}
	if _, err := f.r.SaveGroup(f.ctx, ok()); err != nil {
		t.Fatalf("valid record: %v", err)
	}
}

// TestVerifyGroups: verify reports a group record whose member backup is
// missing, one whose member belongs elsewhere, and a damaged record, as
// problems of kind "group"; intact group backups are no problem.
func TestVerifyGroups(t *testing.T) {
	f := newGroupFixture(t)
	intact, _ := f.group("app", 1, "db", "web")
	broken, gb := f.group("app", 2, "db", "web")
	res, err := f.r.Verify(f.ctx, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Problems) != 0 || res.Groups != 2 {
		t.Fatalf("intact repository: %d groups checked, problems %+v", res.Groups, res.Problems)
	}
	lost := gb.Members[1].Backup
	if err := f.be.Delete(f.ctx, backend.Handle{Kind: backend.KindBackups, Name: lost}); err != nil {
		t.Fatal(err)
	}
	res, err = f.r.Verify(f.ctx, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Problems) != 1 {
		t.Fatalf("problems %+v, want the group with a missing member", res.Problems)
	}
	p := res.Problems[0]
	if p.Kind != "group" || p.ID != broken.String() || !p.Missing || len(p.Affected) != 1 || p.Affected[0].Backup != lost || p.Affected[0].VM != "web" ||
		!strings.Contains(p.Error, "is missing") || !strings.Contains(p.Error, "group app") {
		t.Fatalf("problem %+v", p)
	}
	// Verifying only the intact group's members does not report the other.
	ig, _ := f.r.LoadGroup(f.ctx, intact)
	bid, _ := ParseID(ig.Members[0].Backup)
	if res, err := f.r.Verify(f.ctx, VerifyOptions{Backups: []ID{bid}}); err != nil || len(res.Problems) != 0 || res.Groups != 1 {
		t.Fatalf("verify of one intact member: %v, %d groups, %+v", err, res.Groups, res.Problems)
	}
	// Selecting the surviving member of the broken group reports it.
	bid, _ = ParseID(gb.Members[0].Backup)
	if res, err := f.r.Verify(f.ctx, VerifyOptions{Backups: []ID{bid}}); err != nil || len(res.Problems) != 1 || res.Problems[0].Kind != "group" {
		t.Fatalf("verify of the broken group's member: %v, %+v", err, res.Problems)
	}
	// A damaged record.
	h := backend.Handle{Kind: backend.KindGroups, Name: intact.String()}
	blob, _ := f.be.Get(f.ctx, h, 0, -1)
	blob[len(blob)-1] ^= 1
	if err := f.be.Put(f.ctx, h, blob); err != nil {
		t.Fatal(err)
	}
	res, err = f.r.Verify(f.ctx, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, p := range res.Problems {
		kinds = append(kinds, p.Kind+":"+p.ID[:8])
	}
	if len(res.Problems) != 2 || !slices.Contains(kinds, "group:"+intact.Short()) {
		t.Fatalf("problems %v, want the damaged record and the missing member", kinds)
	}
	if _, err := f.r.ListGroups(f.ctx); !errors.Is(err, errs.ErrCorrupt) || !strings.Contains(err.Error(), intact.Short()) {
		t.Fatalf("ListGroups with a damaged record: %v, want corrupt naming %s", err, intact.Short())
	}
}

// TestPruneGroups: group backups are kept or removed whole under the keep
// rules applied per group name; their members are not subject to their
// VM's rules; a member whose group record is missing is an ordinary
// backup; --dry-run removes nothing; --vm leaves groups alone and --group
// touches only that group.
func TestPruneGroups(t *testing.T) {
	f := newGroupFixture(t)
	a1 := f.backup("db", 0, "", "")
	g1, m1 := f.group("app", 1, "db", "web")
	a3 := f.backup("db", 3, "", "")
	g2, m2 := f.group("app", 4, "db", "web")
	s1, _ := f.group("shop", 2, "db")
	s2, _ := f.group("shop", 5, "db")
	// A member saved whose record never got written: an ordinary backup,
	// the newest of web.
	orphan := f.backup("web", 6, "app", "set-lost")
	pol := retention.Policy{Last: 1}

	dry, err := f.r.Prune(f.ctx, PruneOptions{Policy: pol, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	verdict := map[string]bool{}
	for _, d := range dry {
		verdict[d.ID] = d.Keep
		if d.Group != "" && (d.VM != "" || len(d.Members) == 0) {
			t.Fatalf("group decision %+v: want members, no VM", d)
		}
	}
	want := map[ID]bool{a1: false, a3: true, orphan: true, g1: false, g2: true, s1: false, s2: true}
	if len(dry) != len(want) {
		t.Fatalf("%d decisions %+v, want %d (members are decided with their group)", len(dry), dry, len(want))
	}
	for id, keep := range want {
		if k, ok := verdict[id.String()]; !ok || k != keep {
			t.Fatalf("%s: keep %v (decided %v), want %v; decisions %+v", id.Short(), k, ok, keep, dry)
		}
	}
	for _, id := range []ID{a1, g1} {
		if !f.exists(backend.KindBackups, a1.String()) || !f.exists(backend.KindGroups, g1.String()) {
			t.Fatalf("dry run removed %s", id.Short())
		}
	}

	// --vm db: only db's ungrouped backups; no group is touched.
	ds, err := f.r.Prune(f.ctx, PruneOptions{VM: "db", Policy: pol})
	if err != nil {
		t.Fatal(err)
	}
	if len(ds) != 2 || f.exists(backend.KindBackups, a1.String()) || !f.exists(backend.KindBackups, a3.String()) || !f.exists(backend.KindGroups, g1.String()) {
		t.Fatalf("prune --vm db: %+v", ds)
	}
	// --group shop: only shop's group backups.
	if _, err := f.r.Prune(f.ctx, PruneOptions{Group: "shop", Policy: pol}); err != nil {
		t.Fatal(err)
	}
	if f.exists(backend.KindGroups, s1.String()) || !f.exists(backend.KindGroups, s2.String()) || !f.exists(backend.KindGroups, g1.String()) {
		t.Fatal("prune --group shop did not remove only shop's older group backup")
	}
	// Everything: app's older group backup goes whole, record and members.
	if _, err := f.r.Prune(f.ctx, PruneOptions{Policy: pol}); err != nil {
		t.Fatal(err)
	}
	if f.exists(backend.KindGroups, g1.String()) {
		t.Fatal("group record of the removed group backup remains")
	}
	for _, mb := range m1.Members {
		if f.exists(backend.KindBackups, mb.Backup) {
			t.Fatalf("member %s of the removed group backup remains", mb.VM)
		}
	}
	for _, mb := range m2.Members {
		if !f.exists(backend.KindBackups, mb.Backup) {
			t.Fatalf("member %s of the kept group backup was removed by its VM's rules", mb.VM)
		}
	}
	if !f.exists(backend.KindBackups, a3.String()) || !f.exists(backend.KindBackups, orphan.String()) {
		t.Fatal("the newest ordinary backups were removed")
	}
	if res, err := f.r.Verify(f.ctx, VerifyOptions{}); err != nil || len(res.Problems) != 0 {
		t.Fatalf("verify after prune: %v, %+v", err, res.Problems)
	}
	if _, err := f.r.Prune(f.ctx, PruneOptions{Group: "-x", Policy: pol}); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("prune --group -x: %v, want a usage error", err)
	}
}

// TestPruneUnreadableGroup: while a group record cannot be read, backups
// whose manifest names a group are kept (they may be its members), and
// removing one alone is refused.
func TestPruneUnreadableGroup(t *testing.T) {
	f := newGroupFixture(t)
	g, gr := f.group("app", 1, "db")
	f.backup("db", 2, "", "")
	f.backup("db", 3, "", "")
	h := backend.Handle{Kind: backend.KindGroups, Name: g.String()}
	if err := f.be.Put(f.ctx, h, []byte("damaged")); err != nil {
		t.Fatal(err)
	}
	ds, err := f.r.Prune(f.ctx, PruneOptions{Policy: retention.Policy{Last: 1}})
	if err != nil {
		t.Fatal(err)
	}
	member := gr.Members[0].Backup
	if !f.exists(backend.KindBackups, member) {
		t.Fatalf("a backup that may belong to the unreadable group record was removed: %+v", ds)
	}
	bid, _ := ParseID(member)
	if err := f.r.DeleteBackup(f.ctx, bid); !errors.Is(err, errs.ErrCorrupt) || !strings.Contains(err.Error(), g.Short()) {
		t.Fatalf("DeleteBackup of a possible member: %v, want corrupt naming the record", err)
	}
}

// TestDeleteGroupMember: removing one member of a group backup is refused
// with an error naming the group and how to remove it; DeleteGroup removes
// the record and every member; once the record is gone a member is an
// ordinary backup and may be removed.
func TestDeleteGroupMember(t *testing.T) {
	f := newGroupFixture(t)
	g, gr := f.group("app", 1, "db", "web")
	bid, _ := ParseID(gr.Members[0].Backup)
	err := f.r.DeleteBackup(f.ctx, bid)
	if !errors.Is(err, ErrGroupMember) || !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "group app") ||
		!strings.Contains(err.Error(), g.Short()) || !strings.Contains(err.Error(), "prune --group app") {
		t.Fatalf("DeleteBackup of a member: %v", err)
	}
	if !f.exists(backend.KindBackups, bid.String()) {
		t.Fatal("the member was removed")
	}
	if _, err := f.r.AddHealth(f.ctx, bid, HealthResult{Result: HealthPassed, Time: f.t0}); err != nil {
		t.Fatal(err)
	}
	// The record goes first: a member left behind is an ordinary backup.
	if err := f.be.Delete(f.ctx, backend.Handle{Kind: backend.KindGroups, Name: g.String()}); err != nil {
		t.Fatal(err)
	}
	if err := f.r.DeleteBackup(f.ctx, bid); err != nil {
		t.Fatalf("DeleteBackup once the record is gone: %v", err)
	}
	g2, gr2 := f.group("app", 2, "db", "web")
	mid, _ := ParseID(gr2.Members[0].Backup)
	if _, err := f.r.AddHealth(f.ctx, mid, HealthResult{Result: HealthPassed, Time: f.t0}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.r.DeleteGroup(f.ctx, g2); err != nil {
		t.Fatal(err)
	}
	for _, mb := range gr2.Members {
		if f.exists(backend.KindBackups, mb.Backup) || f.exists(backend.KindHealth, mb.Backup) {
			t.Fatalf("member %s (or its health record) remains", mb.VM)
		}
	}
	if f.exists(backend.KindGroups, g2.String()) {
		t.Fatal("record remains")
	}
	if _, err := f.r.DeleteGroup(f.ctx, g2); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("DeleteGroup of a removed group: %v, want not found", err)
	}
}
