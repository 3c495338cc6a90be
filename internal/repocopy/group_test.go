package repocopy_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repocopy"
)

// TestCopyGroups: a copied member keeps its group; a group record is
// copied once the target holds every member, with the members' target
// IDs and the original's ID as origin, and only once.
func TestCopyGroups(t *testing.T) {
	ctx := context.Background()
	src, _ := newRepo(t, repo.InitOptions{Password: []byte("a"), ChunkSize: 64 * kib})
	dst, _ := newRepo(t, repo.InitOptions{Password: []byte("b"), ChunkSize: 128 * kib})
	dir := t.TempDir()
	when := time.Date(2026, 6, 1, 2, 0, 0, 0, time.UTC)
	g := &repo.Group{Name: "app", SetID: "set-g", Time: when, Consistency: "application", FreezeMS: 7}
	byVM := map[string]repo.Backup{}
	for i, vm := range []string{"db", "web"} {
		p := filepath.Join(dir, vm+".img")
		writeImage(t, p, uint64(i+1))
		img, err := imagefile.Open("sda", p)
		if err != nil {
			t.Fatal(err)
		}
		res, err := backup.Run(ctx, src, backup.Job{VM: vm, Time: when, Source: "qemu", Group: "app", SetID: "set-g",
			Disks: []backup.Disk{{Source: img}}}, backup.Options{})
		img.Close()
		if err != nil {
			t.Fatal(err)
		}
		if res.Manifest.Group != "app" {
			t.Fatalf("member manifest has group %q", res.Manifest.Group)
		}
		g.Members = append(g.Members, repo.GroupMember{VM: vm, Backup: res.ID.String()})
		byVM[vm] = repo.Backup{ID: res.ID, Manifest: res.Manifest}
	}
	gid, err := src.SaveGroup(ctx, g)
	if err != nil {
		t.Fatal(err)
	}
	// Only db copied: the group is not.
	if _, err := repocopy.Copy(ctx, src, dst, byVM["db"], backup.Options{}); err != nil {
		t.Fatal(err)
	}
	copied, skipped, err := repocopy.CopyGroups(ctx, src, dst)
	if err != nil || len(copied) != 0 || len(skipped) != 0 {
		t.Fatalf("with a member missing in the target: copied %v, skipped %v, %v", copied, skipped, err)
	}
	if _, err := repocopy.Copy(ctx, src, dst, byVM["web"], backup.Options{}); err != nil {
		t.Fatal(err)
	}
	copied, skipped, err = repocopy.CopyGroups(ctx, src, dst)
	if err != nil || len(copied) != 1 || len(skipped) != 0 {
		t.Fatalf("copied %v, skipped %v, %v", copied, skipped, err)
	}
	list, err := dst.ListGroups(ctx)
	if err != nil || len(list) != 1 {
		t.Fatalf("target groups %v, %v", list, err)
	}
	tg := list[0]
	if tg.Origin != gid.String() || tg.Name != "app" || tg.SetID != "set-g" || !tg.Time.Equal(when) || tg.FreezeMS != 7 || tg.Consistency != "application" {
		t.Fatalf("target group %+v", tg.Group)
	}
	have, _, err := dst.ListBackups(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, mb := range tg.Members {
		var found bool
		for _, b := range have {
			if b.ID.String() == mb.Backup && b.VM == mb.VM && b.Group == "app" && b.Origin == byVM[mb.VM].ID.String() {
				found = true
			}
		}
		if !found {
			t.Fatalf("target member %s names %.8s, not the copy of %s", mb.VM, mb.Backup, byVM[mb.VM].ID.Short())
		}
	}
	if copied, _, err := repocopy.CopyGroups(ctx, src, dst); err != nil || len(copied) != 0 {
		t.Fatalf("second copy: copied %v, %v", copied, err)
	}
	if res, err := dst.Verify(ctx, repo.VerifyOptions{}); err != nil || len(res.Problems) != 0 || res.Groups != 1 {
		t.Fatalf("verify of the target: %v, %+v", err, res)
	}
}
