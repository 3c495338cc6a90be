package backup_test

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/fault"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repo/repotest"
	"github.com/vmshadow/vmshadow/internal/repo/retention"
	"github.com/vmshadow/vmshadow/internal/restore"
)

func chunkPath(dir string, id repo.ID) string {
	s := id.String()
	return filepath.Join(dir, "chunks", s[:2], s)
}

// TestVerifyFindsDamage damages each kind of file in each way and checks
// that verify reports exactly that file with the backups it breaks.
func TestVerifyFindsDamage(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t, repo.EncryptionAESGCM)
	src := t.TempDir()
	a, b := filepath.Join(src, "a"), filepath.Join(src, "b")
	img := makeImage(t, a, 40*cs, 1)
	makeImage(t, b, 40*cs, 2)
	b1 := backupImages(t, r, "vm1", map[string]string{"sda": a}, backup.Options{})
	f, _ := os.OpenFile(a, os.O_WRONLY, 0)
	f.WriteAt([]byte("changed"), 0)
	f.Close()
	copy(img, "changed")
	b2 := backupImages(t, r, "vm1", map[string]string{"sda": a}, backup.Options{})
	b3 := backupImages(t, r, "vm2", map[string]string{"sdb": b}, backup.Options{})

	x1, _ := r.LoadIndex(ctx, b1.Disks[0].Index)
	x2, _ := r.LoadIndex(ctx, b2.Disks[0].Index)
	in2 := map[repo.ID]bool{}
	for i := range x2.Len() {
		in2[x2.ID(i)] = true
	}
	var shared repo.ID
	for i := x1.Len() - 1; i >= 0; i-- {
		if id := x1.ID(i); !id.IsZero() && in2[id] {
			shared = id
		}
	}
	if shared.IsZero() {
		t.Fatal("test images share no chunk")
	}
	both := []string{b1.ID.String(), b2.ID.String()}
	sort.Strings(both)

	type damage func(path string, data []byte) error
	flip := func(p string, d []byte) error { d[len(d)/2] ^= 0x40; return os.WriteFile(p, d, 0o600) }
	truncate := func(p string, d []byte) error { return os.WriteFile(p, d[:len(d)-7], 0o600) }
	remove := func(p string, d []byte) error { return os.Remove(p) }
	empty := func(p string, d []byte) error { return os.WriteFile(p, nil, 0o600) }
	cases := []struct {
		name    string
		path    string
		kind    string
		affects []string
		how     damage
		missing bool
	}{
		{"chunk bit flip", chunkPath(dir, shared), "chunk", both, flip, false},
		{"chunk truncated", chunkPath(dir, shared), "chunk", both, truncate, false},
		{"chunk empty", chunkPath(dir, shared), "chunk", both, empty, false},
		{"chunk missing", chunkPath(dir, shared), "chunk", both, remove, true},
		{"index bit flip", filepath.Join(dir, "indexes", b3.Disks[0].Index.String()), "index", []string{b3.ID.String()}, flip, false},
		{"index truncated", filepath.Join(dir, "indexes", b3.Disks[0].Index.String()), "index", []string{b3.ID.String()}, truncate, false},
		{"index missing", filepath.Join(dir, "indexes", b3.Disks[0].Index.String()), "index", []string{b3.ID.String()}, remove, true},
		{"manifest bit flip", filepath.Join(dir, "backups", b2.ID.String()), "manifest", []string{b2.ID.String()}, flip, false},
		{"manifest truncated", filepath.Join(dir, "backups", b2.ID.String()), "manifest", []string{b2.ID.String()}, truncate, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			orig, err := os.ReadFile(tc.path)
			if err != nil {
				t.Fatal(err)
			}
			defer os.WriteFile(tc.path, orig, 0o600)
			if err := tc.how(tc.path, append([]byte(nil), orig...)); err != nil {
				t.Fatal(err)
			}
			ids := []repo.ID{b1.ID, b2.ID, b3.ID}
			if tc.kind == "manifest" {
				ids = nil // all: manifests found by listing
			}
			vr, err := r.Verify(ctx, repo.VerifyOptions{Backups: ids})
			if err != nil {
				t.Fatal(err)
			}
			if len(vr.Problems) != 1 {
				t.Fatalf("%d problems, want 1: %+v", len(vr.Problems), vr.Problems)
			}
			p := vr.Problems[0]
			var got []string
			for _, a := range p.Affected {
				got = append(got, a.Backup)
			}
			if p.Kind != tc.kind || p.Missing != tc.missing || strings.Join(got, ",") != strings.Join(tc.affects, ",") {
				t.Errorf("problem %+v; want kind %s missing %v affecting %v", p, tc.kind, tc.missing, tc.affects)
			}
			if tc.kind == "chunk" && (p.ID != shared.String() || p.Affected[0].VM != "vm1" || p.Affected[0].Disk != "sda") {
				t.Errorf("chunk problem names %s %+v", p.ID, p.Affected[0])
			}
			// Restoring an affected backup fails clearly and leaves no file.
			if tc.kind == "chunk" {
				m, _ := r.LoadManifest(ctx, b1.ID)
				out := filepath.Join(t.TempDir(), "r")
				ts, _ := restore.Plan(m.Disks, out, "raw")
				_, err := restore.Run(ctx, r, m.Disks, ts, restore.Options{})
				if !errors.Is(err, errs.ErrCorrupt) && !errors.Is(err, errs.ErrNotFound) {
					t.Errorf("restore of damaged backup: %v", err)
				}
				if _, serr := os.Stat(out); serr == nil {
					t.Error("failed restore left its output file")
				}
			}
			// Verifying only the unaffected backup finds nothing.
			if tc.kind == "chunk" {
				vr, err := r.Verify(ctx, repo.VerifyOptions{Backups: []repo.ID{b3.ID}})
				if err != nil || len(vr.Problems) != 0 {
					t.Errorf("verify of unaffected backup: %v %+v", err, vr.Problems)
				}
			}
		})
	}
	vr, err := r.Verify(ctx, repo.VerifyOptions{})
	if err != nil || len(vr.Problems) != 0 || vr.Backups != 3 || vr.Chunks == 0 || vr.BytesChecked == 0 {
		t.Fatalf("verify of the repaired repository: %v %+v", err, vr)
	}
}

// TestFaults interrupts backups at each step with injected faults: no
// manifest is left, and the next backup and verify succeed.
func TestFaults(t *testing.T) {
	ctx := context.Background()
	src := filepath.Join(t.TempDir(), "img")
	img := makeImage(t, src, 30*cs, 4)
	cases := []struct {
		name  string
		setup func(f *fault.Backend)
		want  error
	}{
		{"5th chunk write fails", func(f *fault.Backend) {
			f.Add(fault.Rule{Op: fault.OpPut, Kind: backend.KindChunks, Nth: 5, Mode: fault.Fail})
		}, fault.ErrInjected},
		{"index write fails", func(f *fault.Backend) {
			f.Add(fault.Rule{Op: fault.OpPut, Kind: backend.KindIndexes, Mode: fault.Fail})
		}, fault.ErrInjected},
		{"manifest write fails", func(f *fault.Backend) {
			f.Add(fault.Rule{Op: fault.OpPut, Kind: backend.KindBackups, Mode: fault.Fail})
		}, fault.ErrInjected},
		{"chunk lookup fails", func(f *fault.Backend) {
			f.Add(fault.Rule{Op: fault.OpStat, Kind: backend.KindChunks, Nth: 3, Mode: fault.Fail})
		}, fault.ErrInjected},
		{"sync before the index fails", func(f *fault.Backend) {
			f.Add(fault.Rule{Op: fault.OpSync, Nth: 1, Mode: fault.Fail})
		}, fault.ErrInjected},
		{"disk full", func(f *fault.Backend) { f.SetSpace(200 << 10) }, errs.ErrNoSpace},
		{"read-only", func(f *fault.Backend) { f.SetReadOnly(true) }, backend.ErrReadOnly},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "repo")
			lb, _ := local.Create(dir)
			fb := fault.New(lb)
			r0, err := repo.Init(ctx, fb, repo.InitOptions{Password: []byte("pw"), KDF: testKDF, ChunkSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			r0.Close()
			r := openRepo(t, fb)
			tc.setup(fb)
			_, err = tryBackup(r, "vm", map[string]string{"sda": src}, backup.Options{})
			if !errors.Is(err, tc.want) {
				t.Fatalf("backup: %v, want %v", err, tc.want)
			}
			if n := countBackups(t, dir); n != 0 {
				t.Fatalf("%d manifests after a failed backup", n)
			}
			fb.Reset()
			res := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
			vr, err := r.Verify(ctx, repo.VerifyOptions{})
			if err != nil || len(vr.Problems) != 0 {
				t.Fatalf("verify after recovery: %v %+v", err, vr.Problems)
			}
			out := filepath.Join(t.TempDir(), "out")
			restoreDisk(t, r, res.ID, "sda", out)
			mustEqualFile(t, out, img)
		})
	}
	t.Run("corrupt read during restore", func(t *testing.T) {
		fb := fault.New(nil)
		dir := filepath.Join(t.TempDir(), "repo")
		lb, _ := local.Create(dir)
		fb.Backend = lb
		r0, _ := repo.Init(ctx, fb, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: cs})
		r0.Close()
		r := openRepo(t, fb)
		res := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
		fb.Add(fault.Rule{Op: fault.OpGet, Kind: backend.KindChunks, Nth: 3, Mode: fault.Corrupt})
		m, _ := r.LoadManifest(ctx, res.ID)
		out := filepath.Join(t.TempDir(), "out")
		ts, _ := restore.Plan(m.Disks, out, "raw")
		if _, err := restore.Run(ctx, r, m.Disks, ts, restore.Options{}); !errors.Is(err, errs.ErrCorrupt) {
			t.Fatalf("restore with a corrupted read: %v", err)
		}
		if _, err := os.Stat(out); err == nil {
			t.Error("failed restore left its output")
		}
	})
}

// TestTinyTmpfs fills a real file system: the backup fails with a no-space
// error, earlier backups stay intact, and a backup that fits works.
func TestTinyTmpfs(t *testing.T) {
	ctx := context.Background()
	mp := repotest.TinyTmpfs(t, 3<<20)
	dir := filepath.Join(mp, "repo")
	lb, err := local.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	r0, err := repo.Init(ctx, lb, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	r0.Close()
	r := openRepo(t, lb)
	srcDir := t.TempDir()
	small := filepath.Join(srcDir, "small")
	smallImg := makeImage(t, small, 4*cs, 8)
	first := backupImages(t, r, "vm", map[string]string{"sda": small}, backup.Options{})
	big := filepath.Join(srcDir, "big")
	f, _ := os.Create(big)
	buf := make([]byte, 8<<20)
	rand.Read(buf) // incompressible: 8 MiB cannot fit in 3 MiB
	f.Write(buf)
	f.Close()
	_, err = tryBackup(r, "vm", map[string]string{"sda": big}, backup.Options{})
	if !errors.Is(err, errs.ErrNoSpace) {
		t.Fatalf("backup to a full file system: %v, want ErrNoSpace", err)
	}
	if n := countBackups(t, dir); n != 1 {
		t.Fatalf("%d manifests, want the 1 from before", n)
	}
	vr, err := r.Verify(ctx, repo.VerifyOptions{})
	if err != nil || len(vr.Problems) != 0 {
		t.Fatalf("verify after ENOSPC: %v %+v", err, vr.Problems)
	}
	// Free the space the failed backup used (gc with no grace), then a
	// small backup works again.
	if _, err := r.GC(ctx, repo.GCOptions{Grace: time.Nanosecond}); err != nil {
		t.Fatal(err)
	}
	backupImages(t, r, "vm", map[string]string{"sda": small}, backup.Options{})
	out := filepath.Join(t.TempDir(), "out")
	restoreDisk(t, r, first.ID, "sda", out)
	mustEqualFile(t, out, smallImg)
}

// TestReadOnlyRepository: on a read-only mount backups fail clearly, and
// reading (verify, restore) works without taking a lock.
func TestReadOnlyRepository(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t, repo.EncryptionAESGCM)
	src := filepath.Join(t.TempDir(), "img")
	img := makeImage(t, src, 10*cs, 9)
	res := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
	ro := repotest.ReadOnlyDir(t, dir)
	lb, err := local.Open(ro)
	if err != nil {
		t.Fatal(err)
	}
	rr := openRepo(t, lb)
	if _, _, err := rr.Lock(ctx, false, "backup"); !errors.Is(err, backend.ErrReadOnly) {
		t.Fatalf("lock on read-only repository: %v", err)
	}
	makeImage(t, src, 10*cs, 10)
	if _, err := tryBackup(rr, "vm", map[string]string{"sda": src}, backup.Options{}); !errors.Is(err, backend.ErrReadOnly) {
		t.Fatalf("backup to read-only repository: %v", err)
	}
	vr, err := rr.Verify(ctx, repo.VerifyOptions{})
	if err != nil || len(vr.Problems) != 0 {
		t.Fatalf("verify on read-only repository: %v %+v", err, vr)
	}
	out := filepath.Join(t.TempDir(), "out")
	restoreDisk(t, rr, res.ID, "sda", out)
	mustEqualFile(t, out, img)
}

// TestPruneAndGCGrace: prune removes manifests by policy per VM; gc frees
// only what no remaining backup references, and only when older than the
// grace period.
func TestPruneAndGCGrace(t *testing.T) {
	ctx := context.Background()
	r, dir := newRepo(t, repo.EncryptionAESGCM)
	src := t.TempDir()
	base := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	var ids []repo.ID
	imgs := map[repo.ID][]byte{}
	for i := range 4 {
		p := filepath.Join(src, "img")
		img := makeImage(t, p, 20*cs, uint64(100+i))
		im, _ := imagefile.Open("sda", p)
		res, err := backup.Run(ctx, r, backup.Job{VM: "vm1", Time: base.Add(time.Duration(i) * 24 * time.Hour), Disks: []backup.Disk{{Source: im}}}, backup.Options{})
		im.Close()
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res.ID)
		imgs[res.ID] = img
	}
	p2 := filepath.Join(src, "other")
	makeImage(t, p2, 5*cs, 1)
	im, _ := imagefile.Open("sda", p2)
	other, err := backup.Run(ctx, r, backup.Job{VM: "vm2", Time: base, Disks: []backup.Disk{{Source: im}}}, backup.Options{})
	im.Close()
	if err != nil {
		t.Fatal(err)
	}

	pol := retention.Policy{Last: 2, Location: time.UTC}
	dry, err := r.Prune(ctx, repo.PruneOptions{Policy: pol, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if countBackups(t, dir) != 5 {
		t.Fatal("dry run removed backups")
	}
	keep := map[string]bool{}
	for _, d := range dry {
		keep[d.ID] = d.Keep
		if len(d.Reasons) == 0 {
			t.Errorf("decision without reasons: %+v", d)
		}
	}
	want := map[string]bool{ids[0].String(): false, ids[1].String(): false, ids[2].String(): true, ids[3].String(): true, other.ID.String(): true}
	for id, k := range want {
		if keep[id] != k {
			t.Errorf("backup %s keep=%v, want %v (per-VM policy)", id[:8], keep[id], k)
		}
	}
	if _, err := r.Prune(ctx, repo.PruneOptions{}); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("prune without policy: %v", err)
	}
	if _, err := r.Prune(ctx, repo.PruneOptions{Policy: pol}); err != nil {
		t.Fatal(err)
	}
	if countBackups(t, dir) != 3 {
		t.Fatalf("%d backups after prune, want 3", countBackups(t, dir))
	}

	// Chunks only the pruned backups used.
	used := map[repo.ID]bool{}
	for _, id := range []repo.ID{ids[2], ids[3], other.ID} {
		m, _ := r.LoadManifest(ctx, id)
		xid, _ := repo.ParseID(m.Disks[0].Index)
		x, _ := r.LoadIndex(ctx, xid)
		for i := range x.Len() {
			used[x.ID(i)] = true
		}
	}
	orphans := 0
	for _, id := range ids[:2] {
		m := mustManifestIndex(t, r, id, imgs)
		for i := range m.Len() {
			if c := m.ID(i); !c.IsZero() && !used[c] {
				used[c] = true // count once
				orphans++
			}
		}
	}
	if orphans == 0 {
		t.Fatal("pruned backups have no chunks of their own")
	}

	gr, err := r.GC(ctx, repo.GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if gr.ChunksDeleted != 0 || gr.ChunksInGrace != orphans || gr.IndexesInGrace != 2 {
		t.Fatalf("gc within grace: %+v, want nothing deleted and %d chunks in grace", gr, orphans)
	}
	// Age every blob by two days: now gc deletes exactly the orphans.
	old := time.Now().Add(-48 * time.Hour)
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			os.Chtimes(p, old, old)
		}
		return nil
	})
	gr, err = r.GC(ctx, repo.GCOptions{DryRun: true})
	if err != nil || gr.ChunksDeleted != orphans {
		t.Fatalf("gc dry run: %v %+v", err, gr)
	}
	gr, err = r.GC(ctx, repo.GCOptions{})
	if err != nil || gr.ChunksDeleted != orphans || gr.IndexesDeleted != 2 || gr.BytesDeleted == 0 {
		t.Fatalf("gc after grace: %v %+v, want %d chunks and 2 indexes deleted", err, gr, orphans)
	}
	vr, err := r.Verify(ctx, repo.VerifyOptions{})
	if err != nil || len(vr.Problems) != 0 || vr.Backups != 3 {
		t.Fatalf("verify after gc: %v %+v", err, vr)
	}
	out := filepath.Join(t.TempDir(), "out")
	restoreDisk(t, r, ids[3], "sda", out)
	mustEqualFile(t, out, imgs[ids[3]])
}

// mustManifestIndex returns the index of a pruned backup by re-deriving it
// from its image: the manifest is gone, so back the image up to memory of
// IDs only (hash every chunk).
func mustManifestIndex(t *testing.T, r *repo.Repo, id repo.ID, imgs map[repo.ID][]byte) *repo.Index {
	img := imgs[id]
	x, _ := repo.NewIndex(int64(len(img)), cs)
	for i := range x.Len() {
		off, n := x.Range(i)
		c := img[off : off+n]
		if !isZeroBytes(c) {
			x.Set(i, r.HashChunk(c))
		}
	}
	return x
}

func isZeroBytes(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
