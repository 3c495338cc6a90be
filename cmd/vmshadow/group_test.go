package main

import (
	"bytes"
	"context"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
)

// groupRepo is a repository with group backups made through Go (small
// image files backed up with backup.Run, Job.Group set, then SaveGroup),
// for the commands to work on.
type groupRepo struct {
	t    *testing.T
	dir  string
	path string
	r    *repo.Repo
	t0   time.Time
	// images holds each backup's disk contents, by backup ID and disk.
	images map[string]map[string][]byte
}

func newGroupRepo(t *testing.T) *groupRepo {
	dir := t.TempDir()
	g := &groupRepo{t: t, dir: dir, path: filepath.Join(dir, "repo"), t0: time.Date(2026, 4, 1, 10, 0, 0, 0, time.UTC),
		images: map[string]map[string][]byte{}}
	if r := vmshadow(t, nil, "repo", "init", "--repo", g.path, "--encryption", "none", "--chunk-size", "65536"); r.code != 0 {
		t.Fatalf("repo init: %s", r.errorMessage())
	}
	be, err := local.Open(g.path)
	if err != nil {
		t.Fatal(err)
	}
	g.r, err = repo.Open(context.Background(), be, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.r.Close(); be.Close() })
	return g
}

// backup backs up disks (name -> size) of vm with random contents (a
// zero hole in the middle) at t0+h hours, in group (set set) when group
// is not empty.
func (g *groupRepo) backup(vm string, h int, group, set string, disks map[string]int) repo.ID {
	g.t.Helper()
	job := backup.Job{VM: vm, Time: g.t0.Add(time.Duration(h) * time.Hour), Group: group, SetID: set, Consistency: "filesystem"}
	content := map[string][]byte{}
	for _, name := range slices.Sorted(maps.Keys(disks)) {
		rnd := rand.New(rand.NewPCG(uint64(h), uint64(len(vm)+len(name))))
		b := make([]byte, disks[name])
		for i := range b {
			b[i] = byte(rnd.Uint32())
		}
		clear(b[len(b)/3 : len(b)/2])
		p := filepath.Join(g.dir, vm+"-"+name+"-"+time.Duration(h).String()+".img")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			g.t.Fatal(err)
		}
		img, err := imagefile.Open(name, p)
		if err != nil {
			g.t.Fatal(err)
		}
		defer img.Close()
		job.Disks = append(job.Disks, backup.Disk{Source: img})
		content[name] = b
	}
	res, err := backup.Run(context.Background(), g.r, job, backup.Options{})
	if err != nil {
		g.t.Fatal(err)
	}
	g.images[res.ID.String()] = content
	return res.ID
}

// group backs up each VM of members as a member of group name at t0+h
// and stores the group record.
func (g *groupRepo) group(name string, h int, members map[string]map[string]int) (repo.ID, *repo.Group) {
	g.t.Helper()
	set := name + "-set-" + time.Duration(h).String()
	gr := &repo.Group{Name: name, SetID: set, Time: g.t0.Add(time.Duration(h) * time.Hour), Consistency: "filesystem", FreezeMS: int64(100 + h)}
	for _, vm := range []string{"db", "web", "cache"} {
		if d, ok := members[vm]; ok {
			gr.Members = append(gr.Members, repo.GroupMember{VM: vm, Backup: g.backup(vm, h, name, set, d).String()})
		}
	}
	id, err := g.r.SaveGroup(context.Background(), gr)
	if err != nil {
		g.t.Fatal(err)
	}
	return id, gr
}

// TestGroupCommands: backups --group/--groups list group backups, the
// per-VM listing shows a member's group, restore --group restores every
// member into DIR/VM/ byte for byte (and removes what it wrote when it
// fails), and prune keeps or removes group backups whole.
func TestGroupCommands(t *testing.T) {
	g := newGroupRepo(t)
	members := map[string]map[string]int{"db": {"sda": 300<<10 + 512, "sdb": 200 << 10}, "web": {"vda": 256 << 10}}
	oldWeb := g.backup("web", 0, "", "", map[string]int{"vda": 128 << 10})
	g1, gr1 := g.group("app", 1, members)
	g2, gr2 := g.group("app", 2, members)
	s1, _ := g.group("shop", 3, map[string]map[string]int{"cache": {"sdc": 64 << 10}})
	newDB := g.backup("db", 4, "", "", map[string]int{"sda": 100 << 10})
	// A member whose record was never written: an ordinary backup.
	lost := g.backup("web", 5, "app", "app-set-lost", map[string]int{"vda": 64 << 10})

	// backups --group app: app's two group backups, oldest first.
	out := vmshadow(t, nil, "backups", "--repo", g.path, "--group", "app")
	if out.code != 0 {
		t.Fatalf("backups --group app: %s", out.errorMessage())
	}
	list := out.summary(t)["groups"].([]any)
	if len(list) != 2 {
		t.Fatalf("backups --group app listed %d group backups, want 2: %v", len(list), list)
	}
	for i, want := range []struct {
		id repo.ID
		g  *repo.Group
	}{{g1, gr1}, {g2, gr2}} {
		e := list[i].(map[string]any)
		if e["id"] != want.id.String() || e["short_id"] != want.id.Short() || e["name"] != "app" || e["set_id"] != want.g.SetID ||
			e["consistency"] != "filesystem" || e["freeze_ms"] != float64(want.g.FreezeMS) || e["time"] != want.g.Time.Format(time.RFC3339) {
			t.Fatalf("group backup %d: %v, want %s %+v", i, e, want.id.Short(), want.g)
		}
		ms := e["members"].([]any)
		if len(ms) != len(want.g.Members) {
			t.Fatalf("group backup %d members %v", i, ms)
		}
		for j, m := range ms {
			m := m.(map[string]any)
			wm := want.g.Members[j]
			if m["vm"] != wm.VM || m["backup"] != wm.Backup || m["short_id"] != wm.Backup[:8] {
				t.Fatalf("member %v, want %+v", m, wm)
			}
		}
	}
	all := vmshadow(t, nil, "backups", "--repo", g.path, "--groups").summary(t)["groups"].([]any)
	var ids []string
	for _, e := range all {
		ids = append(ids, e.(map[string]any)["short_id"].(string))
	}
	if !slices.Equal(ids, []string{g1.Short(), g2.Short(), s1.Short()}) {
		t.Fatalf("backups --groups: %v", ids)
	}
	if r := vmshadow(t, nil, "backups", "--repo", g.path, "--group", "app", "--vm", "db"); r.code != 2 {
		t.Fatalf("backups --group --vm: exit %d, want 2", r.code)
	}
	if r := vmshadow(t, nil, "backups", "--repo", g.path, "--group", "../x"); r.code != 2 || !strings.Contains(r.errorMessage(), "group name") {
		t.Fatalf("backups --group ../x: exit %d %s, want 2", r.code, r.errorMessage())
	}
	// The per-VM listing shows each member's group and group backup.
	perVM := map[string]map[string]any{}
	for _, e := range vmshadow(t, nil, "backups", "--repo", g.path).summary(t)["backups"].([]any) {
		perVM[e.(map[string]any)["id"].(string)] = e.(map[string]any)
	}
	if e := perVM[gr2.Members[1].Backup]; e["group"] != "app" || e["group_backup"] != g2.String() {
		t.Fatalf("member in the per-VM listing: %v", e)
	}
	if e := perVM[lost.String()]; e["group"] != "app" || e["group_backup"] != nil {
		t.Fatalf("member without a record: %v, want its group and no group backup", e)
	}
	if e := perVM[newDB.String()]; e["group"] != nil {
		t.Fatalf("ordinary backup: %v, want no group", e)
	}

	// restore --group: every member into DIR/VM/, byte for byte.
	to := filepath.Join(g.dir, "restored", "g1")
	r := vmshadow(t, nil, "restore", "--repo", g.path, "--group", g1.Short(), "--to", to)
	if r.code != 0 {
		t.Fatalf("restore --group: exit %d: %s", r.code, r.errorMessage())
	}
	sum := r.summary(t)
	if sum["group_backup_id"] != g1.String() || sum["group"] != "app" || len(sum["members"].([]any)) != 2 {
		t.Fatalf("restore --group summary: %v", sum)
	}
	var files []string
	for _, mb := range gr1.Members {
		for disk, want := range g.images[mb.Backup] {
			p := filepath.Join(to, mb.VM, disk+".raw")
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b, want) {
				t.Fatalf("%s differs from disk %s of %s's backup %.8s", p, disk, mb.VM, mb.Backup)
			}
			files = append(files, mb.VM+"/"+disk+".raw")
		}
	}
	if got := listFiles(t, to); !slices.Equal(got, slices.Sorted(slices.Values(files))) {
		t.Fatalf("restore --group wrote %v, want %v", got, files)
	}
	q := filepath.Join(g.dir, "restored", "q")
	if r := vmshadow(t, nil, "restore", "--repo", g.path, "--group", g2.String(), "--to", q, "--format", "qcow2"); r.code != 0 {
		t.Fatalf("restore --group --format qcow2: %s", r.errorMessage())
	}
	if b, err := os.ReadFile(filepath.Join(q, "web", "vda.qcow2")); err != nil || !bytes.HasPrefix(b, []byte("QFI\xfb")) {
		t.Fatalf("qcow2 member: %v", err)
	}
	// Into a directory that already holds a member's directory: refused,
	// nothing written.
	if r := vmshadow(t, nil, "restore", "--repo", g.path, "--group", g1.Short(), "--to", to); r.code != 2 || !strings.Contains(r.errorMessage(), "exists") {
		t.Fatalf("restore --group over an earlier restore: exit %d %s, want 2", r.code, r.errorMessage())
	}
	for _, args := range [][]string{
		{"--group", g1.Short(), gr1.Members[0].Backup[:8], "--to", filepath.Join(g.dir, "x")},
		{"--group", g1.Short()},
		{"--group", g1.Short(), "--to", filepath.Join(g.dir, "x"), "--disk", "sda"},
		{"--group", gr1.Members[0].Backup[:8], "--to", filepath.Join(g.dir, "x")},
	} {
		r := vmshadow(t, nil, append([]string{"restore", "--repo", g.path}, args...)...)
		if r.code == 0 {
			t.Fatalf("restore %v succeeded", args)
		}
		if _, err := os.Stat(filepath.Join(g.dir, "x")); err == nil {
			t.Fatalf("restore %v (exit %d) left %s", args, r.code, filepath.Join(g.dir, "x"))
		}
	}

	// copy: the group backups follow their members.
	other := filepath.Join(g.dir, "other")
	if r := vmshadow(t, nil, "repo", "init", "--repo", other, "--encryption", "none"); r.code != 0 {
		t.Fatalf("repo init: %s", r.errorMessage())
	}
	cp := vmshadow(t, nil, "copy", "--from", g.path, "--to", other)
	if cp.code != 0 {
		t.Fatalf("copy: %s", cp.errorMessage())
	}
	var copied []string
	for _, c := range cp.summary(t)["groups_copied"].([]any) {
		copied = append(copied, c.(map[string]any)["short_id"].(string))
	}
	if !slices.Equal(copied, []string{g1.Short(), g2.Short(), s1.Short()}) {
		t.Fatalf("copy copied group backups %v", copied)
	}
	if n := len(vmshadow(t, nil, "backups", "--repo", other, "--groups").summary(t)["groups"].([]any)); n != 3 {
		t.Fatalf("the copy holds %d group backups, want 3", n)
	}
	if n := len(vmshadow(t, nil, "copy", "--from", g.path, "--to", other).summary(t)["groups_copied"].([]any)); n != 0 {
		t.Fatalf("a second copy copied %d group backups again", n)
	}

	// prune --dry-run: app's older group backup and web's older ordinary
	// backup would go; members are decided with their group.
	dry := vmshadow(t, nil, "prune", "--repo", g.path, "--keep-last", "1", "--dry-run")
	if dry.code != 0 {
		t.Fatalf("prune --dry-run: %s", dry.errorMessage())
	}
	ds := dry.summary(t)
	verdict := map[string]bool{}
	for _, d := range ds["backups"].([]any) {
		d := d.(map[string]any)
		verdict[d["id"].(string)] = d["keep"].(bool)
		if d["group"] != nil && len(d["members"].([]any)) == 0 {
			t.Fatalf("group decision without members: %v", d)
		}
	}
	want := map[string]bool{oldWeb.String(): false, lost.String(): true, newDB.String(): true, g1.String(): false, g2.String(): true, s1.String(): true}
	if len(verdict) != len(want) {
		t.Fatalf("prune --dry-run decided %v, want %v", verdict, want)
	}
	for id, keep := range want {
		if k, ok := verdict[id]; !ok || k != keep {
			t.Fatalf("prune --dry-run: %.8s keep=%v (decided %v), want %v", id, k, ok, keep)
		}
	}
	if ds["groups_removed"] != 1.0 || ds["removed"] != 3.0 || ds["groups_kept"] != 2.0 {
		t.Fatalf("prune --dry-run counts: %v", ds)
	}
	if n := len(vmshadow(t, nil, "backups", "--repo", g.path, "--groups").summary(t)["groups"].([]any)); n != 3 {
		t.Fatalf("dry run removed group backups: %d left", n)
	}

	// prune: the group backup goes whole, record and members.
	if r := vmshadow(t, nil, "prune", "--repo", g.path, "--keep-last", "1"); r.code != 0 {
		t.Fatalf("prune: %s", r.errorMessage())
	}
	left := vmshadow(t, nil, "backups", "--repo", g.path, "--group", "app").summary(t)["groups"].([]any)
	if len(left) != 1 || left[0].(map[string]any)["id"] != g2.String() {
		t.Fatalf("after prune, app's group backups: %v", left)
	}
	have := map[string]bool{}
	for _, e := range vmshadow(t, nil, "backups", "--repo", g.path).summary(t)["backups"].([]any) {
		have[e.(map[string]any)["id"].(string)] = true
	}
	for _, mb := range gr1.Members {
		if have[mb.Backup] {
			t.Fatalf("member %s of the removed group backup remains", mb.VM)
		}
	}
	for _, mb := range gr2.Members {
		if !have[mb.Backup] {
			t.Fatalf("member %s of the kept group backup was removed", mb.VM)
		}
	}
	if have[oldWeb.String()] || !have[newDB.String()] || !have[lost.String()] {
		t.Fatalf("ordinary backups after prune: %v", have)
	}
	if r := vmshadow(t, nil, "verify", "--repo", g.path); r.code != 0 {
		t.Fatalf("verify after prune: %s %v", r.errorMessage(), r.warnings())
	}

	// A member that cannot be read fails the group restore, which removes
	// every directory it created, the members restored before included.
	web := gr2.Members[1].Backup
	if err := os.WriteFile(filepath.Join(g.path, "backups", web), []byte("damaged"), 0o600); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(g.dir, "new", "deeper")
	if r := vmshadow(t, nil, "restore", "--repo", g.path, "--group", g2.Short(), "--to", bad); r.code != 8 {
		t.Fatalf("restore --group with a damaged member: exit %d %s, want 8", r.code, r.errorMessage())
	}
	if _, err := os.Stat(filepath.Join(g.dir, "new")); err == nil {
		t.Fatal("a failed group restore left the directory it created")
	}
	// verify reports the damaged member; backups --group still lists the
	// group backup.
	if r := vmshadow(t, nil, "verify", "--repo", g.path); r.code != 8 {
		t.Fatalf("verify with a damaged member: exit %d", r.code)
	}
}

// TestGroupRestoreCleanup: a group restore that fails on a later member
// (a damaged chunk) removes what it wrote for the members before it.
func TestGroupRestoreCleanup(t *testing.T) {
	g := newGroupRepo(t)
	gid, gr := g.group("app", 1, map[string]map[string]int{"db": {"sda": 192 << 10}, "web": {"vda": 192 << 10}})
	// Damage a chunk only web's disk has.
	web, err := repo.ParseID(gr.Members[1].Backup)
	if err != nil {
		t.Fatal(err)
	}
	m, err := g.r.LoadManifest(context.Background(), web)
	if err != nil {
		t.Fatal(err)
	}
	xid, _ := repo.ParseID(m.Disks[0].Index)
	x, err := g.r.LoadIndex(context.Background(), xid)
	if err != nil {
		t.Fatal(err)
	}
	c := x.ID(x.Len() - 1).String()
	p := filepath.Join(g.path, "chunks", c[:2], c)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 0xff
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	existing := filepath.Join(g.dir, "restored")
	if err := os.Mkdir(existing, 0o755); err != nil {
		t.Fatal(err)
	}
	r := vmshadow(t, nil, "restore", "--repo", g.path, "--group", gid.Short(), "--to", existing)
	if r.code != 8 || !strings.Contains(r.errorMessage(), "web") {
		t.Fatalf("restore --group with a damaged chunk of web: exit %d %s, want 8 naming web", r.code, r.errorMessage())
	}
	// The directory existed: it stays, empty; db's restored disk is gone.
	if got := listFiles(t, existing); len(got) != 0 {
		t.Fatalf("a failed group restore left %v", got)
	}
	if ents, _ := os.ReadDir(existing); len(ents) != 0 {
		t.Fatalf("a failed group restore left directories %v", ents)
	}
	// Into new directories: they go too (the chunk is quarantined now, so
	// missing).
	fresh := filepath.Join(g.dir, "fresh")
	if r := vmshadow(t, nil, "restore", "--repo", g.path, "--group", gid.Short(), "--to", filepath.Join(fresh, "a")); r.code == 0 {
		t.Fatal("restore --group with a missing chunk succeeded")
	}
	if _, err := os.Lstat(fresh); err == nil {
		t.Fatalf("a failed group restore left %s, which it created", fresh)
	}
}

// listFiles lists the regular files under dir, relative, sorted.
func listFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}
