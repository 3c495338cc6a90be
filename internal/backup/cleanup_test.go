package backup_test

import (
	"context"
	"errors"
	"path/filepath"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/fault"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
)

func countChunks(t *testing.T, be backend.Backend) int {
	t.Helper()
	n := 0
	if err := be.List(context.Background(), backend.KindChunks, "", func(backend.Info) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestFailedBackupCleanup: a failed backup names the chunks it stored;
// DropChunks removes them, except those a backup written since then uses
// (it deduplicated onto them) and quarantined ones it stored again.
func TestFailedBackupCleanup(t *testing.T) {
	ctx := context.Background()
	src := t.TempDir()
	a, b := filepath.Join(src, "a"), filepath.Join(src, "b")
	imgA := makeImage(t, a, 24*cs, 21)
	makeImage(t, b, 24*cs, 22)
	setup := func(t *testing.T) (*repo.Repo, *fault.Backend) {
		lb, err := local.Create(filepath.Join(t.TempDir(), "repo"))
		if err != nil {
			t.Fatal(err)
		}
		fb := fault.New(lb)
		r0, err := repo.Init(ctx, fb, repo.InitOptions{Password: []byte("pw"), KDF: testKDF, ChunkSize: cs})
		if err != nil {
			t.Fatal(err)
		}
		r0.Close()
		return openRepo(t, fb), fb
	}
	fail := func(t *testing.T, r *repo.Repo, fb *fault.Backend, img string) *backup.Failure {
		t.Helper()
		fb.Add(fault.Rule{Op: fault.OpPut, Kind: backend.KindBackups, Mode: fault.Fail})
		_, err := tryBackup(r, "vm", map[string]string{"sda": img}, backup.Options{})
		fb.Reset()
		var f *backup.Failure
		if !errors.As(err, &f) || !errors.Is(err, fault.ErrInjected) || f.Stored == 0 || f.Bytes == 0 {
			t.Fatalf("failed backup: %v (%+v), want a *backup.Failure naming the chunks it stored", err, f)
		}
		return f
	}

	t.Run("alone", func(t *testing.T) {
		r, fb := setup(t)
		backupImages(t, r, "vm", map[string]string{"sda": b}, backup.Options{})
		before := countChunks(t, fb)
		f := fail(t, r, fb, a)
		if n := countChunks(t, fb); int64(n-before) != f.Stored {
			t.Fatalf("failure names %d stored chunks, the repository gained %d", f.Stored, n-before)
		}
		n, err := r.DropChunks(ctx, f.Chunks(), f.Start)
		if err != nil || int64(n) != f.Stored {
			t.Fatalf("DropChunks: %d, %v; want %d", n, err, f.Stored)
		}
		if n := countChunks(t, fb); n != before {
			t.Fatalf("%d chunks after the cleanup, want the %d from before", n, before)
		}
		if vr, err := r.Verify(ctx, repo.VerifyOptions{}); err != nil || len(vr.Problems) != 0 {
			t.Fatalf("verify: %v %+v", err, vr)
		}
	})
	t.Run("reused by a backup written since", func(t *testing.T) {
		r, fb := setup(t)
		f := fail(t, r, fb, a)
		// A backup of the same data finishes before the failed one's
		// cleanup: it deduplicated onto every chunk the failed one stored.
		res := backupImages(t, r, "vm", map[string]string{"sda": a}, backup.Options{})
		if res.Stats.ChunksNew != 0 {
			t.Fatalf("second backup stored %d chunks, want to reuse all", res.Stats.ChunksNew)
		}
		n, err := r.DropChunks(ctx, f.Chunks(), f.Start)
		if err != nil || n != 0 {
			t.Fatalf("DropChunks: deleted %d, %v; want none (a backup uses them)", n, err)
		}
		restoreDisk(t, r, res.ID, "sda", filepath.Join(t.TempDir(), "out"))
	})
	t.Run("heals a quarantined chunk", func(t *testing.T) {
		r, fb := setup(t)
		b1 := backupImages(t, r, "vm", map[string]string{"sda": a}, backup.Options{})
		x, _ := r.LoadIndex(ctx, b1.Disks[0].Index)
		var victim repo.ID
		for i := range x.Len() {
			if !x.ID(i).IsZero() {
				victim = x.ID(i)
				break
			}
		}
		h := backend.Handle{Kind: backend.KindChunks, Name: victim.String()}
		blob, _ := fb.Get(ctx, h, 0, -1)
		blob[len(blob)/2] ^= 1
		fb.Put(ctx, h, blob)
		if vr, err := r.Verify(ctx, repo.VerifyOptions{}); err != nil || len(vr.Problems) != 1 {
			t.Fatalf("verify of the damaged chunk: %v %+v", err, vr)
		}
		f := fail(t, r, fb, a)
		if f.Stored != 1 {
			t.Fatalf("failed backup stored %d chunks, want the quarantined one", f.Stored)
		}
		if n, err := r.DropChunks(ctx, f.Chunks(), f.Start); err != nil || n != 0 {
			t.Fatalf("DropChunks: deleted %d, %v; want to keep the healing chunk", n, err)
		}
		out := filepath.Join(t.TempDir(), "out")
		restoreDisk(t, r, b1.ID, "sda", out)
		mustEqualFile(t, out, imgA)
		// gc keeps the quarantined copy for the grace period (verify
		// reports the heal meanwhile), and removes it with grace 0.
		g, err := r.GC(ctx, repo.GCOptions{})
		if err != nil || g.QuarantineRemoved != 0 {
			t.Fatalf("gc within grace: %v %+v", err, g)
		}
		if g, err = r.GC(ctx, repo.GCOptions{Immediate: true}); err != nil || g.QuarantineRemoved != 1 {
			t.Fatalf("gc --grace 0s: %v %+v", err, g)
		}
		if q, err := r.Quarantined(ctx); err != nil || len(q) != 0 {
			t.Fatalf("quarantine after gc: %v %v", q, err)
		}
	})
}
