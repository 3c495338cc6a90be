package main

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3/s3test"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// These tests run the vmshadow binary against repositories on a real S3
// server (versitygw, started by the tests), optionally through a proxy that
// injects network and store faults.

// s3Rig is an S3 server and the environment that reaches it.
type s3Rig struct {
	t      *testing.T
	srv    *s3test.Server
	proxy  *s3test.FaultProxy
	bucket string
	env    []string
}

func newS3Rig(t *testing.T) *s3Rig {
	t.Helper()
	testutil.SkipShort(t)
	srv := s3test.Start(t, s3test.Options{})
	_, env := stateEnv(t)
	return &s3Rig{t: t, srv: srv, proxy: s3test.NewFaultProxy(t, srv.Endpoint), bucket: "vmshadow-e2e",
		env: append(append(env, srv.Env()...), "VMSHADOW_PASSWORD=s3 test password")}
}

// url names a repository in the rig's bucket, through the proxy or not.
func (s *s3Rig) url(prefix string, viaProxy bool) string {
	ep := s.srv.Endpoint
	if viaProxy {
		ep = s.proxy.Endpoint()
	}
	return "s3:http://" + ep + "/" + s.bucket + "/" + prefix
}

// run runs vmshadow --json and checks that nothing it printed holds the
// secret key.
func (s *s3Rig) run(extraEnv []string, args ...string) result {
	s.t.Helper()
	res := vmshadow(s.t, append(append([]string{}, s.env...), extraEnv...), args...)
	if strings.Contains(res.stderr, s.srv.SecretKey) || strings.Contains(fmt.Sprint(res.msgs), s.srv.SecretKey) {
		s.t.Fatalf("vmshadow %v printed the S3 secret key", args)
	}
	return res
}

func (s *s3Rig) ok(args ...string) map[string]any {
	s.t.Helper()
	res := s.run(nil, args...)
	if res.code != 0 {
		s.t.Fatalf("vmshadow %v: exit %d: %s %s", args, res.code, res.errorMessage(), res.stderr)
	}
	return res.summary(s.t)
}

// age sets the modification time of every object under prefix (the
// server's files) to d ago: the store's own timestamps, as gc sees them.
func (s *s3Rig) age(prefix string, d time.Duration) int {
	s.t.Helper()
	old := time.Now().Add(-d)
	n := 0
	root := filepath.Join(s.srv.Dir, s.bucket, prefix)
	filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() {
			os.Chtimes(p, old, old)
			n++
		}
		return nil
	})
	return n
}

// image writes a raw disk image with random data at the given MiB offsets
// (1 MiB each) and returns its content.
func s3Image(t *testing.T, path string, size int64, seed uint64, mibs ...int64) []byte {
	t.Helper()
	img := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, seed))
	for _, m := range mibs {
		for i := m << 20; i < min((m+1)<<20, size); i++ {
			img[i] = byte(r.Uint32())
		}
	}
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	return img
}

func (s *s3Rig) restoreCompare(repo, id string, want map[string][]byte) {
	s.t.Helper()
	dir := filepath.Join(s.t.TempDir(), "restore")
	to := dir
	if len(want) == 1 { // one disk: --to is the file
		os.Mkdir(dir, 0o700)
		for disk := range want {
			to = filepath.Join(dir, disk+".raw")
		}
	}
	s.ok("restore", "--repo", repo, id, "--to", to)
	for disk, w := range want {
		got, err := os.ReadFile(filepath.Join(dir, disk+".raw"))
		if err != nil {
			s.t.Fatal(err)
		}
		if !bytes.Equal(got, w) {
			s.t.Fatalf("backup %s, disk %s: restored image differs", id, disk)
		}
	}
}

// TestS3RepositoryCycle: repo init (creating the bucket), backups of image
// files, listing, verify, restore bit-identical, prune, and gc whose grace
// period goes by the store's object timestamps.
func TestS3RepositoryCycle(t *testing.T) {
	s := newS3Rig(t)
	repo := s.url("cycle", false)
	dir := t.TempDir()
	init := s.ok("repo", "init", "--repo", repo)
	if init["repository"] != repo {
		t.Fatalf("init summary %v", init)
	}
	if ok, err := s.srv.Client(t).BucketExists(context.Background(), s.bucket); err != nil || !ok {
		t.Fatalf("repo init did not create the bucket: %v", err)
	}
	if res := s.run(nil, "repo", "init", "--repo", repo); res.code != 2 || !strings.Contains(res.errorMessage(), "already holds a repository") {
		t.Fatalf("second init: exit %d %s", res.code, res.errorMessage())
	}

	a := s3Image(t, filepath.Join(dir, "a.raw"), 24<<20, 1, 0, 1, 5, 9, 10, 17, 23)
	b := s3Image(t, filepath.Join(dir, "b.raw"), 9<<20+4097, 2, 0, 4, 9)
	b1 := s.ok("backup", "--repo", repo, "--vm", "web1", "--disk", "sda="+filepath.Join(dir, "a.raw"), "--disk", "sdb="+filepath.Join(dir, "b.raw"))
	id1 := b1["backup_id"].(string)
	// Change one chunk of a, back up again: one new chunk.
	a2 := append([]byte(nil), a...)
	copy(a2[17<<20:], bytes.Repeat([]byte("changed "), 1024))
	os.WriteFile(filepath.Join(dir, "a.raw"), a2, 0o600)
	b2 := s.ok("backup", "--repo", repo, "--vm", "web1", "--disk", "sda="+filepath.Join(dir, "a.raw"))
	if num(b2["chunks_new"]) != 1 || num(b2["chunks_reused"]) == 0 {
		t.Errorf("second backup: %v new, %v reused chunks; want 1 new", b2["chunks_new"], b2["chunks_reused"])
	}
	id2 := b2["backup_id"].(string)
	// Another VM with the same data deduplicates against the first.
	b3 := s.ok("backup", "--repo", repo, "--vm", "db1", "--disk", "sdb="+filepath.Join(dir, "b.raw"))
	if num(b3["chunks_new"]) != 0 {
		t.Errorf("backup of identical data stored %v chunks", b3["chunks_new"])
	}
	id3 := b3["backup_id"].(string)

	if bs := s.ok("backups", "--repo", repo)["backups"].([]any); len(bs) != 3 {
		t.Fatalf("%d backups listed, want 3", len(bs))
	}
	if v := s.ok("verify", "--repo", repo); num(v["problems"]) != 0 {
		t.Fatalf("verify: %v", v)
	}
	s.restoreCompare(repo, id1, map[string][]byte{"sda": a, "sdb": b})
	s.restoreCompare(repo, id2, map[string][]byte{"sda": a2})

	// Prune keeps the last backup of each VM: id1 goes.
	pr := s.ok("prune", "--repo", repo, "--keep-last", "1")
	if num(pr["removed"]) != 1 || num(pr["kept"]) != 2 {
		t.Fatalf("prune: %v", pr)
	}
	// gc: what only id1 used (the index of its sda, the old chunk; its sdb
	// index is db1's too) is young, so within the default grace period
	// nothing goes.
	g := s.ok("gc", "--repo", repo)
	if num(g["chunks_deleted"]) != 0 || num(g["indexes_deleted"]) != 0 || num(g["chunks_in_grace"]) != 1 || num(g["indexes_in_grace"]) != 1 {
		t.Fatalf("gc within grace: %v", g)
	}
	// Two days later by the store's clock (the objects' timestamps), with
	// one young unreferenced chunk (a backup in flight): the old garbage
	// goes, the young chunk stays.
	if n := s.age("cycle", 48*time.Hour); n < 10 {
		t.Fatalf("aged %d objects", n)
	}
	young := "cycle/chunks/ee/" + strings.Repeat("ee", 32)
	if _, err := s.srv.Client(t).PutObject(context.Background(), s.bucket, young, strings.NewReader("in flight"), 9, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	g = s.ok("gc", "--repo", repo)
	if num(g["chunks_deleted"]) != 1 || num(g["indexes_deleted"]) != 1 || num(g["chunks_in_grace"]) != 1 {
		t.Fatalf("gc after two days: %v", g)
	}
	if _, err := s.srv.Client(t).StatObject(context.Background(), s.bucket, young, minio.StatObjectOptions{}); err != nil {
		t.Fatalf("gc removed a young chunk: %v", err)
	}
	if v := s.ok("verify", "--repo", repo); num(v["problems"]) != 0 {
		t.Fatalf("verify after gc: %v", v)
	}
	s.restoreCompare(repo, id2, map[string][]byte{"sda": a2})
	s.restoreCompare(repo, id3, map[string][]byte{"sdb": b})

	// Bad input and wrong credentials: clear errors, stable exit codes.
	for _, tc := range []struct {
		env  []string
		repo string
		code int
		want string
	}{
		{[]string{"AWS_SECRET_ACCESS_KEY=wrong-secret-key"}, repo, 7, "secret key does not match"},
		{[]string{"AWS_ACCESS_KEY_ID=", "AWS_SECRET_ACCESS_KEY="}, repo, 7, "no S3 credentials"},
		{nil, s.url("nothing-here", false), 6, "not a vmshadow repository"},
		{nil, "s3:http://" + s.srv.Endpoint + "/no-such-bucket/x", 6, `bucket "no-such-bucket"`},
		{nil, "s3:http://key:secret@" + s.srv.Endpoint + "/b/x", 2, "credentials in the S3 repository URL"},
	} {
		res := s.run(tc.env, "backups", "--repo", tc.repo)
		if res.code != tc.code || !strings.Contains(res.errorMessage(), tc.want) {
			t.Errorf("backups --repo %s with %v: exit %d %q, want %d saying %q", tc.repo, tc.env, res.code, res.errorMessage(), tc.code, tc.want)
		}
		if strings.Contains(res.errorMessage(), "wrong-secret-key") || strings.Contains(res.errorMessage(), ":secret@") {
			t.Errorf("error shows a secret: %s", res.errorMessage())
		}
	}
}

// TestS3ConcurrentBackups: three hosts' backups run into one repository at
// once (shared locks), deduplicating against each other; gc meanwhile is
// refused (busy); all three restore bit-identical.
func TestS3ConcurrentBackups(t *testing.T) {
	s := newS3Rig(t)
	repo := s.url("concurrent", true)
	s.ok("repo", "init", "--repo", repo, "--encryption", "none")
	dir := t.TempDir()
	common := []int64{0, 1, 2, 3, 8, 9}
	images := map[string][]byte{}
	for i, vm := range []string{"vm0", "vm1", "vm2"} {
		own := []int64{int64(12 + i), int64(16 + i)}
		img := s3Image(t, filepath.Join(dir, vm+".raw"), 20<<20, 100, common...)
		own0 := s3Image(t, filepath.Join(dir, vm+".own"), 20<<20, uint64(200+i), own...)
		for _, m := range own {
			copy(img[m<<20:(m+1)<<20], own0[m<<20:(m+1)<<20])
		}
		os.WriteFile(filepath.Join(dir, vm+".raw"), img, 0o600)
		images[vm] = img
	}
	// Every backup stops before storing its index until all three are
	// there: then they surely overlap.
	hold := s.proxy.Add(&s3test.Rule{Method: "PUT", Contains: "/indexes/", From: 1, Act: s3test.Hold})
	var wg sync.WaitGroup
	results := map[string]result{}
	var mu sync.Mutex
	for vm := range images {
		wg.Go(func() {
			res := vmshadow(t, s.env, "backup", "--repo", repo, "--vm", vm, "--disk", "sda="+filepath.Join(dir, vm+".raw"))
			mu.Lock()
			results[vm] = res
			mu.Unlock()
		})
	}
	deadline := time.Now().Add(2 * time.Minute)
	for s.proxy.Hits(hold) < 3 {
		if time.Now().After(deadline) {
			s.proxy.Release()
			wg.Wait()
			t.Fatalf("the backups did not all reach their index: %v", results)
		}
		time.Sleep(20 * time.Millisecond)
	}
	g := s.run(nil, "gc", "--repo", repo)
	s.proxy.Clear()
	s.proxy.Release()
	wg.Wait()
	if g.code != 3 || !strings.Contains(g.errorMessage(), "locked") {
		t.Errorf("gc during backups: exit %d %q, want 3 (busy)", g.code, g.errorMessage())
	}
	var newChunks int64
	ids := map[string]string{}
	for vm, res := range results {
		if res.code != 0 {
			t.Fatalf("backup of %s: exit %d: %s", vm, res.code, res.errorMessage())
		}
		sum := res.summary(t)
		newChunks += num(sum["chunks_new"])
		ids[vm] = sum["backup_id"].(string)
	}
	// 5 chunks per image: 2 common (0-3, 8-9 MiB) and 2 own, 1 zero. The
	// common ones may be stored by each racing backup (same name, same
	// content), never lost.
	if newChunks < 2+3*2 || newChunks > 3*4 {
		t.Errorf("%d chunks stored by three backups, want 8 to 12", newChunks)
	}
	var stored int
	filepath.WalkDir(filepath.Join(s.srv.Dir, s.bucket, "concurrent", "chunks"), func(p string, e fs.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() {
			stored++
		}
		return nil
	})
	if stored != 8 {
		t.Errorf("%d chunk objects in the bucket, want 8 (deduplicated)", stored)
	}
	if v := s.ok("verify", "--repo", repo); num(v["problems"]) != 0 || num(v["backups"]) != 3 {
		t.Fatalf("verify: %v", v)
	}
	for vm, id := range ids {
		s.restoreCompare(repo, id, map[string][]byte{"sda": images[vm]})
	}
	if v := s.ok("gc", "--repo", repo); num(v["chunks_deleted"]) != 0 {
		t.Fatalf("gc after the backups: %v", v)
	}
}

// TestS3BackupFaults: a backup through a network that cuts uploads and
// downloads and a store that throttles completes (retries); a store that
// keeps throttling fails the backup with a clear error and no backup; the
// next backup works and everything verifies.
func TestS3BackupFaults(t *testing.T) {
	s := newS3Rig(t)
	repo := s.url("faults", true)
	s.ok("repo", "init", "--repo", repo)
	dir := t.TempDir()
	img := s3Image(t, filepath.Join(dir, "a.raw"), 32<<20, 3, 0, 4, 8, 12, 16, 20, 24, 28)
	for _, r := range []*s3test.Rule{
		{Method: "PUT", Contains: "/chunks/", From: 2, To: 2, Act: s3test.CutUpload},
		{Method: "PUT", Contains: "/chunks/", From: 4, To: 5, Act: s3test.SlowDown},
		{Method: "PUT", Contains: "/chunks/", From: 7, To: 7, Act: s3test.DropResponse},
		{Method: "HEAD", Contains: "/chunks/", From: 3, To: 3, Act: s3test.ServerError},
		{Method: "PUT", Contains: "/indexes/", From: 1, To: 1, Act: s3test.CutUpload},
		{Method: "PUT", Contains: "/backups/", From: 1, To: 1, Act: s3test.SlowDown},
	} {
		s.proxy.Add(r)
	}
	sum := s.ok("backup", "--repo", repo, "--vm", "web1", "--disk", "sda="+filepath.Join(dir, "a.raw"))
	id := sum["backup_id"].(string)
	s.proxy.Clear()
	for _, r := range []*s3test.Rule{
		{Method: "GET", Contains: "/chunks/", From: 2, To: 2, Act: s3test.CutDownload},
		{Method: "GET", Contains: "/chunks/", From: 5, To: 5, Act: s3test.SlowDown},
		{Method: "GET", Contains: "/indexes/", From: 1, To: 1, Act: s3test.CutDownload},
	} {
		s.proxy.Add(r)
	}
	s.restoreCompare(repo, id, map[string][]byte{"sda": img})
	s.proxy.Clear()

	// A store that throttles every chunk upload: the backup gives up
	// after its retries, says why, and leaves no backup.
	img2 := s3Image(t, filepath.Join(dir, "b.raw"), 8<<20, 4, 0, 4)
	s.proxy.Add(&s3test.Rule{Method: "PUT", Contains: "/chunks/", From: 1, Act: s3test.SlowDown})
	res := s.run([]string{"VMSHADOW_S3_RETRIES=3"}, "backup", "--repo", repo, "--vm", "web2", "--disk", "sda="+filepath.Join(dir, "b.raw"))
	if res.code != 10 || !strings.Contains(res.errorMessage(), "SlowDown") || !strings.Contains(res.errorMessage(), "3 times") {
		t.Fatalf("backup into a throttling store: exit %d %q, want 10 saying SlowDown after 3 tries", res.code, res.errorMessage())
	}
	s.proxy.Clear()
	if bs := s.ok("backups", "--repo", repo)["backups"].([]any); len(bs) != 1 {
		t.Fatalf("%d backups after the failed one, want 1", len(bs))
	}
	sum = s.ok("backup", "--repo", repo, "--vm", "web2", "--disk", "sda="+filepath.Join(dir, "b.raw"))
	s.restoreCompare(repo, sum["backup_id"].(string), map[string][]byte{"sda": img2})
	if v := s.ok("verify", "--repo", repo); num(v["problems"]) != 0 || num(v["backups"]) != 2 {
		t.Fatalf("verify: %v", v)
	}
	if res := s.run(nil, "backups", "--repo", repo, "--s3-addressing", "dns"); res.code != 2 {
		t.Errorf("--s3-addressing dns: exit %d", res.code)
	}

	// Read-only credentials (the store refuses every write): listing,
	// verify and restore work without a lock, with a warning; a backup
	// fails saying why.
	for _, m := range []string{"PUT", "DELETE", "POST"} {
		s.proxy.Add(&s3test.Rule{Method: m, From: 1, Act: s3test.Fail, Status: 403, Code: "AccessDenied"})
	}
	res = s.run(nil, "backups", "--repo", repo)
	if res.code != 0 || !strings.Contains(fmt.Sprint(res.warnings()), "read-only") {
		t.Fatalf("backups with read-only credentials: exit %d %q, warnings %v", res.code, res.errorMessage(), res.warnings())
	}
	s.ok("verify", "--repo", repo)
	s.restoreCompare(repo, id, map[string][]byte{"sda": img})
	res = s.run(nil, "backup", "--repo", repo, "--vm", "web3", "--disk", "sda="+filepath.Join(dir, "b.raw"))
	if res.code != 7 || !strings.Contains(res.errorMessage(), "may only read") {
		t.Fatalf("backup with read-only credentials: exit %d %q, want 7", res.code, res.errorMessage())
	}
}

// TestS3LiveBackup: a running QEMU VM backed up into S3 (full, then
// incremental after guest writes), each backup restored bit-identical.
func TestS3LiveBackup(t *testing.T) {
	s := newS3Rig(t)
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{
		{ID: "vda", Size: 64 << 20}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
	r := &liveRig{t: t, vm: vm, env: s.env, repo: s.url("live", false), rng: rand.New(rand.NewPCG(3, 5))}
	s.ok("repo", "init", "--repo", r.repo)
	vm.Write("vda", 0x5a, 0, 24<<20)
	vm.Write("vdb", 0xa5, 8<<20, 8<<20)
	want := r.expected()
	sum := r.backup()
	if sum["mode"] != "full" {
		t.Fatalf("first backup: mode %v", sum["mode"])
	}
	ids := []string{sum["backup_id"].(string)}
	wants := []map[string][]byte{want}
	touched := map[int64]bool{}
	r.scatter("vda", 5, touched)
	want = r.expected()
	sum = r.backup()
	if sum["mode"] != "incremental" {
		t.Fatalf("second backup: mode %v (%v)", sum["mode"], sum["reason"])
	}
	if d := diskSummaries(t, sum)["vda"]; num(d["bytes_read"]) != int64(len(touched))*testChunk {
		t.Errorf("incremental read %d bytes, want %d", num(d["bytes_read"]), len(touched)*testChunk)
	}
	ids = append(ids, sum["backup_id"].(string))
	wants = append(wants, want)
	for i, id := range ids {
		r.restoreCompare(id, wants[i])
	}
	if res := r.run("verify", "--repo", r.repo); res.code != 0 {
		t.Fatalf("verify: %s", res.errorMessage())
	}
}

// TestS3TLS: an https store with a private CA is reached with --s3-ca or
// VMSHADOW_S3_CA, and refused without, saying how to fix it.
func TestS3TLS(t *testing.T) {
	testutil.SkipShort(t)
	srv := s3test.Start(t, s3test.Options{TLS: true})
	_, env := stateEnv(t)
	env = append(append(env, srv.Env()...), "VMSHADOW_PASSWORD=tls")
	repo := "s3:https://" + srv.Endpoint + "/tls-bucket/repo"
	res := vmshadow(t, env, "repo", "init", "--repo", repo)
	if res.code != 10 || !strings.Contains(res.errorMessage(), "--s3-ca") {
		t.Fatalf("init without the CA: exit %d %q, want 10 naming --s3-ca", res.code, res.errorMessage())
	}
	if res := vmshadow(t, env, "repo", "init", "--repo", repo, "--s3-ca", srv.CAFile); res.code != 0 {
		t.Fatalf("init with --s3-ca: exit %d %q", res.code, res.errorMessage())
	}
	dir := t.TempDir()
	img := s3Image(t, filepath.Join(dir, "a.raw"), 6<<20, 5, 0, 5)
	withCA := append(env, "VMSHADOW_S3_CA="+srv.CAFile)
	res = vmshadow(t, withCA, "backup", "--repo", repo, "--vm", "tls", "--disk", "sda="+filepath.Join(dir, "a.raw"))
	if res.code != 0 {
		t.Fatalf("backup with VMSHADOW_S3_CA: exit %d %q", res.code, res.errorMessage())
	}
	out := filepath.Join(dir, "out.raw")
	if res := vmshadow(t, withCA, "restore", "--repo", repo, res.summary(t)["backup_id"].(string), "--to", out); res.code != 0 {
		t.Fatalf("restore: exit %d %q", res.code, res.errorMessage())
	}
	if got, _ := os.ReadFile(out); !bytes.Equal(got, img) {
		t.Fatal("restored image differs")
	}
}
