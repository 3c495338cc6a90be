package server

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
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
