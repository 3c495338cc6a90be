package server

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// TestDeleteGroupMember: the API's deletion of one member of a group
// backup is refused, naming the group and how to remove it; once the
// group record is gone the member is an ordinary backup and goes.
func TestDeleteGroupMember(t *testing.T) {
	ctx := context.Background()
	g := newRig(t, nil, "  - {name: only, type: gc, repository: main}\n")
	r, release, err := g.s.repository(ctx, "main")
	if err != nil {
		t.Fatal(err)
	}
	x, err := repo.NewIndex(repo.MinChunkSize, repo.MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	xid, err := r.SaveIndex(ctx, x)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	grp := &repo.Group{Name: "app", SetID: "set1", Time: t0, Consistency: "filesystem"}
	for _, vm := range []string{"db", "web"} {
		id, err := r.SaveManifest(ctx, &repo.Manifest{VM: vm, Time: t0, Source: "qemu", Mode: "full", Group: "app", SetID: "set1",
			Disks: []repo.ManifestDisk{{Name: "vda", Size: repo.MinChunkSize, ChunkSize: repo.MinChunkSize, Index: xid.String()}}})
		if err != nil {
			t.Fatal(err)
		}
		grp.Members = append(grp.Members, repo.GroupMember{VM: vm, Backup: id.String()})
	}
	gid, err := r.SaveGroup(ctx, grp)
	if err != nil {
		t.Fatal(err)
	}
	release()
	member := grp.Members[0].Backup
	err = g.s.DeleteBackup(ctx, "main", member[:8])
	if !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "group app") || !strings.Contains(err.Error(), gid.Short()) {
		t.Fatalf("DELETE of a group member: %v, want a usage error naming group app and %s", err, gid.Short())
	}
	if _, err := g.s.Backup(ctx, "main", member); err != nil {
		t.Fatalf("the member is gone after a refused delete: %v", err)
	}
	r, release, err = g.s.repository(ctx, "main")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Backend().Delete(ctx, backend.Handle{Kind: backend.KindGroups, Name: gid.String()}); err != nil {
		t.Fatal(err)
	}
	release()
	if err := g.s.DeleteBackup(ctx, "main", member); err != nil {
		t.Fatalf("DELETE once the group record is gone: %v", err)
	}
	if _, err := g.s.Backup(ctx, "main", member); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("deleted member: %v, want not found", err)
	}
}

// TestGroupJob: a backup job naming a group backs its VMs up at one
// instant, as one group backup (one set: every member shares its set ID),
// records each VM's result, and its retention keeps or removes group
// backups whole; a VM of the group that cannot be found fails the run
// without backing up the others.
func TestGroupJob(t *testing.T) {
	hookLog := filepath.Join(t.TempDir(), "hook.log")
	hook := filepath.Join(t.TempDir(), "hook.sh")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\necho \"$1 $VMSHADOW_GROUP $VMSHADOW_VMS\" >> "+hookLog+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	g := newRig(t, []string{"db", "app"}, `  - name: shop
    type: backup
    repository: main
    vms: [{connection: lab, vms: [db, app]}]
    group: shop
    writers: {hooks: [`+hook+`]}
    retention: {keep_last: 1}
  - name: broken
    type: backup
    repository: main
    vms: [{connection: lab, vms: [db, gone]}]
    group: broken
`)
	ctx := context.Background()
	var last []state.VMResult
	for i := 0; i < 2; i++ {
		r, err := g.s.RunJob(ctx, "shop")
		if err != nil {
			t.Fatal(err)
		}
		end, vms := g.waitRun(t, r.ID)
		if end.Status != state.Succeeded || len(vms) != 2 {
			t.Fatalf("run %d: %+v %+v", i, end, vms)
		}
		for _, v := range vms {
			if v.Status != state.Succeeded || v.BackupID == "" {
				t.Fatalf("run %d VM %s: %+v", i, v.VM, v)
			}
		}
		last = vms
	}
	// The host hook runs once per group set, not once per VM.
	if b, _ := os.ReadFile(hookLog); strings.Count(string(b), "freeze shop") != 2 || strings.Count(string(b), "thaw shop") != 2 {
		t.Errorf("hook calls over two runs:\n%s", b)
	}
	r, release, err := g.s.repository(ctx, "main")
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	groups, err := r.ListGroups(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// keep_last 1: the first group backup went whole, members included.
	if len(groups) != 1 || groups[0].Name != "shop" || len(groups[0].Members) != 2 {
		t.Fatalf("group backups after retention: %+v", groups)
	}
	setIDs := map[string]bool{}
	ids := map[string]bool{}
	for _, b := range g.backups(t, "main") {
		setIDs[b.SetID] = true
		ids[b.ID.String()] = true
		if b.Group != "shop" {
			t.Errorf("backup %s of %s: group %q", b.ID.Short(), b.VM, b.Group)
		}
	}
	if len(ids) != 2 || len(setIDs) != 1 || !setIDs[groups[0].SetID] {
		t.Fatalf("backups left: %d with set IDs %v, want the 2 members of set %s", len(ids), setIDs, groups[0].SetID)
	}
	for _, v := range last {
		if !ids[v.BackupID] {
			t.Errorf("VM %s's result names backup %s, not a member left", v.VM, v.BackupID)
		}
	}

	run, err := g.s.RunJob(ctx, "broken")
	if err != nil {
		t.Fatal(err)
	}
	if end, _ := g.waitRun(t, run.ID); end.Status != state.Failed || !strings.Contains(end.Error, "gone") {
		t.Fatalf("a group missing a VM: %+v", end)
	}
	if n := len(g.backups(t, "main")); n != 2 {
		t.Errorf("%d backups after the broken group's run, want 2 (nothing backed up)", n)
	}
}
