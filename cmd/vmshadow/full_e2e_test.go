package main

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repo/repotest"
)

// randomImage writes size incompressible bytes.
func randomImage(t *testing.T, path string, size int64, seed uint64) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, seed))
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		if _, err := f.Write(buf[:min(int64(len(buf)), size-off)]); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCLIFullRepository: on a 64 MiB file system, a backup that does not
// fit fails with exit 11 and removes the chunks it stored, so the next
// (small) backup works; when another process holds the repository they
// stay (with a warning), and 'gc --grace 0s' reclaims them at once.
func TestCLIFullRepository(t *testing.T) {
	vmshadowBinary(t)
	mp := repotest.TinyTmpfs(t, 64<<20)
	r := filepath.Join(mp, "repo")
	src := t.TempDir()
	mustOK(t, vm(t, nil, "repo", "init", "--repo", r, "--encryption", "none"))
	for name, size := range map[string]int64{"8m": 8 << 20, "256m": 256 << 20, "4m": 4 << 20, "4m2": 4 << 20} {
		randomImage(t, filepath.Join(src, name), size, uint64(size)+uint64(len(name)))
	}
	backup := func(img string) runResult {
		return vm(t, nil, "backup", "--repo", r, "--vm", "db", "--disk", "sda="+filepath.Join(src, img), "--json")
	}
	mustOK(t, backup("8m"))
	res := backup("256m")
	if res.code != 11 {
		t.Fatalf("backup larger than the file system: exit %d, want 11: %s", res.code, res.stderr)
	}
	if !strings.Contains(res.stdout+res.stderr, "removed the") {
		t.Errorf("failed backup does not say it removed its chunks: %s %s", res.stdout, res.stderr)
	}
	mustOK(t, backup("4m"))

	// Another process holds the repository (a shared lock, as a restore
	// would): the failed backup cannot know whether that one reuses its
	// chunks, so they stay until gc --grace 0s.
	be, _ := local.Open(r)
	rp, err := repo.Open(context.Background(), be, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rp.Close()
	l, _, err := rp.Lock(context.Background(), false, "restore")
	if err != nil {
		t.Fatal(err)
	}
	res = backup("256m")
	if res.code != 11 || !strings.Contains(res.stdout+res.stderr, "gc --grace 0s") {
		t.Fatalf("failed backup with the repository held: exit %d: %s %s", res.code, res.stdout, res.stderr)
	}
	l.Unlock()
	// (Whether a 4 MiB backup would fit now depends on how much the
	// failed one's cancelled writes gave back: not asserted.)
	g := mustOK(t, vm(t, nil, "gc", "--repo", r, "--grace", "0s", "--json")).last(t)
	if g["chunks_deleted"].(float64) == 0 {
		t.Fatalf("gc --grace 0s deleted nothing: %v", g)
	}
	mustOK(t, backup("4m2"))
	if res := vm(t, nil, "verify", "--repo", r); res.code != 0 {
		t.Fatalf("verify: exit %d %s", res.code, res.stderr)
	}
	if res := vm(t, nil, "gc", "--repo", r, "--grace", "-1s"); res.code != 2 {
		t.Errorf("gc --grace -1s: exit %d, want 2", res.code)
	}
}

// TestCLIQuarantineAndKeyDamage: verify quarantines a damaged chunk, the
// next backup stores it again, and verify then reports the first backup
// whole again; a damaged key file with the right password exits 8.
func TestCLIQuarantineAndKeyDamage(t *testing.T) {
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	mustOK(t, vm(t, pwEnv, "repo", "init", "--repo", r))
	writeImage(t, filepath.Join(dir, "a.raw"), 8<<20, 0)
	backup := func() string {
		return mustOK(t, vm(t, pwEnv, "backup", "--repo", r, "--vm", "db", "--disk", "sda="+filepath.Join(dir, "a.raw"), "--json")).last(t)["backup_id"].(string)
	}
	id := backup()
	var chunk string
	filepath.Walk(filepath.Join(r, "chunks"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && chunk == "" {
			chunk = p
		}
		return nil
	})
	data, _ := os.ReadFile(chunk)
	data[len(data)/2] ^= 1
	os.WriteFile(chunk, data, 0o600)
	if res := vm(t, pwEnv, "verify", "--repo", r, "--json"); res.code != 8 || !strings.Contains(res.stdout, `"quarantined":true`) {
		t.Fatalf("verify of a damaged chunk: exit %d %s", res.code, res.stdout)
	}
	if _, err := os.Stat(filepath.Join(r, "quarantine", filepath.Base(chunk))); err != nil {
		t.Fatalf("damaged chunk not in quarantine/: %v", err)
	}
	backup()
	res := mustOK(t, vm(t, pwEnv, "verify", "--repo", r, "--json"))
	hb, _ := res.last(t)["healed_backups"].([]any)
	if !slices.Contains(hb, any(id)) {
		t.Fatalf("verify after the next backup: healed_backups %v lack %s", hb, id)
	}

	keys, _ := filepath.Glob(filepath.Join(r, "keys", "*"))
	k, _ := os.ReadFile(keys[0])
	k[len(k)/2] ^= 1
	os.WriteFile(keys[0], k, 0o600)
	res = vm(t, pwEnv, "backups", "--repo", r)
	if res.code != 8 || !strings.Contains(res.stderr, "damaged") || strings.Contains(res.stderr, "wrong password") {
		t.Fatalf("damaged key file, right password: exit %d %s", res.code, res.stderr)
	}
}
