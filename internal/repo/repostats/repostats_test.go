package repostats_test

import (
	"context"
	"errors"
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

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/fault"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3/s3test"
	"github.com/vmshadow/vmshadow/internal/repo/repostats"
)

const cs = repo.MinChunkSize

var testKDF = &repo.KDFParams{Name: "argon2id", Time: 1, MemoryKiB: 8 << 10, Threads: 1}

func initRepo(t testing.TB, be backend.Backend) *repo.Repo {
	t.Helper()
	r, err := repo.Init(context.Background(), be, repo.InitOptions{Password: []byte("pw"), KDF: testKDF, ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

// Image layout: chunk entries random, random, text, zero, random, and a
// 1000-byte random tail: six entries, five of them stored.
const (
	imgSize   = 5*cs + 1000
	imgStored = 4*cs + 1000 // bytes of the non-zero entries
)

// writeImage writes the test image; first seeds entry 0 (so that two
// images share every chunk but the first when first differs).
func writeImage(t testing.TB, path string, first uint64) {
	t.Helper()
	img := make([]byte, imgSize)
	fill := func(b []byte, seed uint64) {
		r := rand.New(rand.NewPCG(seed, 99))
		for i := range b {
			b[i] = byte(r.Uint32())
		}
	}
	fill(img[:cs], first)
	fill(img[cs:2*cs], 2)
	for i := range cs {
		img[2*cs+i] = "compressible text "[i%18]
	}
	fill(img[4*cs:5*cs], 4)
	fill(img[5*cs:], 5)
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
}

func backupImage(t testing.TB, r *repo.Repo, vm, path string, at time.Time) repo.ID {
	t.Helper()
	im, err := imagefile.Open("sda", path)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	res, err := backup.Run(context.Background(), r, backup.Job{VM: vm, Time: at, Disks: []backup.Disk{{Source: im}}}, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return res.ID
}

func compute(t testing.TB, r *repo.Repo) *repostats.Stats {
	t.Helper()
	s, err := repostats.Compute(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// dirSizes sums the sizes of a local repository's files by the top-level
// name they live under (config, keys, chunks, indexes, backups, locks,
// quarantine), and counts them: what the figures must match, found
// without the backend.
func dirSizes(t testing.TB, root string) (bytes, files map[string]int64) {
	t.Helper()
	bytes, files = map[string]int64{}, map[string]int64{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		top, _, _ := strings.Cut(rel, string(filepath.Separator))
		if top == "tmp" {
			return nil
		}
		st, err := d.Info()
		if err != nil {
			return err
		}
		bytes[top] += st.Size()
		files[top]++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return bytes, files
}

func eq[T comparable](t *testing.T, what string, got, want T) {
	t.Helper()
	if got != want {
		t.Errorf("%s = %v, want %v", what, got, want)
	}
}

// checkStored checks the stored figures against the files of a local
// repository.
func checkStored(t *testing.T, s *repostats.Stats, root string) {
	t.Helper()
	b, n := dirSizes(t, root)
	eq(t, "Chunks", int64(s.Chunks), n["chunks"])
	eq(t, "Indexes", int64(s.Indexes), n["indexes"])
	eq(t, "ChunkBytes", s.ChunkBytes, b["chunks"])
	eq(t, "IndexBytes", s.IndexBytes, b["indexes"])
	eq(t, "ManifestBytes", s.ManifestBytes, b["backups"])
	eq(t, "OtherBytes", s.OtherBytes, b["config"]+b["keys"]+b["locks"]+b["quarantine"]+b["health"]+b["groups"])
	var total int64
	for _, v := range b {
		total += v
	}
	eq(t, "StoredBytes", s.StoredBytes, total)
	eq(t, "DedupFactor", s.DedupFactor, float64(s.LogicalBytes)/float64(total))
}

func TestComputeLocal(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	root := filepath.Join(dir, "repo")
	be, err := local.Create(root)
	if err != nil {
		t.Fatal(err)
	}
	r := initRepo(t, be)

	empty := compute(t, r)
	eq(t, "empty Backups", empty.Backups, 0)
	eq(t, "empty LogicalBytes", empty.LogicalBytes, 0)
	eq(t, "empty DedupFactor", empty.DedupFactor, 0.0)
	checkStored(t, empty, root)

	imgA, imgB := filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.raw")
	writeImage(t, imgA, 1)
	writeImage(t, imgB, 7)
	t0 := time.Date(2026, 11, 1, 3, 0, 0, 0, time.UTC)

	// One backup.
	backupImage(t, r, "alpha", imgA, t0)
	one := compute(t, r)
	eq(t, "Backups", one.Backups, 1)
	eq(t, "VMs", one.VMs, 1)
	eq(t, "LogicalBytes", one.LogicalBytes, int64(imgSize))
	eq(t, "ReferencedBytes", one.ReferencedBytes, int64(imgStored))
	eq(t, "UniqueBytes", one.UniqueBytes, int64(imgStored))
	eq(t, "ReferencedChunks", one.ReferencedChunks, 5)
	eq(t, "ReferencedChunkBytes", one.ReferencedChunkBytes, one.ChunkBytes)
	eq(t, "UnreferencedChunks", one.UnreferencedChunks, 0)
	checkStored(t, one, root)
	if one.CompressionFactor <= 1 {
		// A chunk of text compresses to almost nothing; the random ones
		// grow by their envelope only.
		t.Errorf("CompressionFactor = %v, want > 1 (one chunk of four is text)", one.CompressionFactor)
	}

	// The same data again: stored grows by one manifest only, logical
	// doubles, the factor about doubles.
	backupImage(t, r, "alpha", imgA, t0.Add(time.Hour))
	two := compute(t, r)
	eq(t, "Backups", two.Backups, 2)
	eq(t, "VMs", two.VMs, 1)
	eq(t, "LogicalBytes", two.LogicalBytes, 2*one.LogicalBytes)
	eq(t, "ReferencedBytes", two.ReferencedBytes, 2*one.ReferencedBytes)
	eq(t, "UniqueBytes", two.UniqueBytes, one.UniqueBytes)
	eq(t, "Chunks", two.Chunks, one.Chunks)
	eq(t, "ChunkBytes", two.ChunkBytes, one.ChunkBytes)
	eq(t, "Indexes", two.Indexes, 1) // the identical index is reused
	if grew := two.StoredBytes - one.StoredBytes; grew != two.ManifestBytes-one.ManifestBytes || grew > 2048 {
		t.Errorf("stored bytes grew by %d, want one manifest (%d bytes)", grew, two.ManifestBytes-one.ManifestBytes)
	}
	if f := two.DedupFactor / one.DedupFactor; f < 1.95 || f >= 2 {
		t.Errorf("dedup factor went from %.3f to %.3f (x%.3f), want about x2", one.DedupFactor, two.DedupFactor, f)
	}
	checkStored(t, two, root)

	// Another VM, sharing every chunk but the first.
	bID := backupImage(t, r, "beta", imgB, t0.Add(2*time.Hour))
	three := compute(t, r)
	eq(t, "Backups", three.Backups, 3)
	eq(t, "VMs", three.VMs, 2)
	eq(t, "LogicalBytes", three.LogicalBytes, 3*int64(imgSize))
	eq(t, "ReferencedBytes", three.ReferencedBytes, 3*int64(imgStored))
	eq(t, "UniqueBytes", three.UniqueBytes, int64(imgStored+cs))
	eq(t, "ReferencedChunks", three.ReferencedChunks, 6)
	eq(t, "Chunks", three.Chunks, 6)
	eq(t, "Indexes", three.Indexes, 2)
	checkStored(t, three, root)
	want := []repostats.VM{
		{VM: "alpha", Backups: 2, Newest: t0.Add(time.Hour), Oldest: t0, LogicalBytes: 2 * imgSize},
		{VM: "beta", Backups: 1, Newest: t0.Add(2 * time.Hour), Oldest: t0.Add(2 * time.Hour), LogicalBytes: imgSize},
	}
	if fmt.Sprint(three.PerVM) != fmt.Sprint(want) {
		t.Errorf("PerVM = %+v\nwant %+v", three.PerVM, want)
	}

	// A chunk no backup references (a failed backup's): unreferenced.
	orphan := make([]byte, 5000)
	for i := range orphan {
		orphan[i] = byte(i * 7)
	}
	oid := r.HashChunk(orphan)
	if err := r.PutChunk(ctx, oid, r.SealChunk(nil, oid, orphan)); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(root, "chunks", oid.String()[:2], oid.String()))
	if err != nil {
		t.Fatal(err)
	}
	four := compute(t, r)
	eq(t, "Chunks", four.Chunks, 7)
	eq(t, "UnreferencedChunks", four.UnreferencedChunks, 1)
	eq(t, "UnreferencedBytes", four.UnreferencedBytes, st.Size())
	eq(t, "ReferencedChunkBytes", four.ReferencedChunkBytes, three.ChunkBytes)
	checkStored(t, four, root)

	// beta's manifest damaged: its backup is unreadable, its own chunk
	// unreferenced; stored bytes still count the damaged blob.
	mpath := filepath.Join(root, "backups", bID.String())
	if err := os.WriteFile(mpath, []byte("damaged manifest"), 0o600); err != nil {
		t.Fatal(err)
	}
	five := compute(t, r)
	eq(t, "Backups", five.Backups, 2)
	eq(t, "UnreadableBackups", five.UnreadableBackups, 1)
	eq(t, "VMs", five.VMs, 1)
	eq(t, "LogicalBytes", five.LogicalBytes, 2*int64(imgSize))
	eq(t, "ReferencedChunks", five.ReferencedChunks, 5)
	eq(t, "UnreferencedChunks", five.UnreferencedChunks, 2)
	checkStored(t, five, root)

	// A vanished manifest (prune) is not unreadable; a missing index is.
	if err := os.Remove(mpath); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(root, "indexes")); err != nil {
		t.Fatal(err)
	}
	six := compute(t, r)
	eq(t, "Backups", six.Backups, 2)
	eq(t, "UnreadableBackups", six.UnreadableBackups, 0)
	eq(t, "UnreadableIndexes", six.UnreadableIndexes, 1)
	eq(t, "ReferencedBytes", six.ReferencedBytes, 0)
	eq(t, "LogicalBytes", six.LogicalBytes, 2*int64(imgSize))
	checkStored(t, six, root)

	// A group backup and a health record are stored bytes too.
	m, err := r.SaveManifest(ctx, &repo.Manifest{VM: "gamma", Time: t0, Source: "qemu", Mode: "full", Group: "app", SetID: "s",
		Disks: []repo.ManifestDisk{{Name: "sda", Size: cs, ChunkSize: cs, Index: oid.String()}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.SaveGroup(ctx, &repo.Group{Name: "app", SetID: "s", Time: t0, Members: []repo.GroupMember{{VM: "gamma", Backup: m.String()}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.AddHealth(ctx, m, repo.HealthResult{Result: repo.HealthPassed, Time: t0}); err != nil {
		t.Fatal(err)
	}
	seven := compute(t, r)
	if seven.OtherBytes <= six.OtherBytes {
		t.Errorf("OtherBytes %d with a group record and a health record, %d without", seven.OtherBytes, six.OtherBytes)
	}
	checkStored(t, seven, root)

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := repostats.Compute(cctx, r); err == nil {
		t.Error("Compute with a cancelled context succeeded")
	}
}

// TestComputeS3 checks the figures of a repository on a real S3 server
// (versitygw), the stored bytes against the bucket's own listing.
func TestComputeS3(t *testing.T) {
	if testing.Short() {
		t.Skip("starts an S3 server")
	}
	ctx := context.Background()
	srv := s3test.Start(t, s3test.Options{})
	srv.SetEnv(t)
	bucket := srv.Bucket(t)
	be, err := s3.Create(ctx, s3.Config{Endpoint: srv.Endpoint, Bucket: bucket, Prefix: "stats"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { be.Close() })
	r := initRepo(t, be)
	dir := t.TempDir()
	imgA, imgB := filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.raw")
	writeImage(t, imgA, 1)
	writeImage(t, imgB, 7)
	t0 := time.Date(2026, 11, 1, 3, 0, 0, 0, time.UTC)
	backupImage(t, r, "alpha", imgA, t0)
	backupImage(t, r, "alpha", imgA, t0.Add(time.Hour))
	backupImage(t, r, "beta", imgB, t0.Add(2*time.Hour))
	s := compute(t, r)
	eq(t, "Backups", s.Backups, 3)
	eq(t, "VMs", s.VMs, 2)
	eq(t, "LogicalBytes", s.LogicalBytes, 3*int64(imgSize))
	eq(t, "ReferencedBytes", s.ReferencedBytes, 3*int64(imgStored))
	eq(t, "UniqueBytes", s.UniqueBytes, int64(imgStored+cs))
	eq(t, "Chunks", s.Chunks, 6)
	eq(t, "Indexes", s.Indexes, 2)

	var total, chunkBytes int64
	for o := range srv.Client(t).ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: "stats/", Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		total += o.Size
		if strings.HasPrefix(o.Key, "stats/chunks/") {
			chunkBytes += o.Size
		}
	}
	eq(t, "ChunkBytes", s.ChunkBytes, chunkBytes)
	eq(t, "StoredBytes", s.StoredBytes, total)
	eq(t, "DedupFactor", s.DedupFactor, float64(s.LogicalBytes)/float64(total))

	// A group record on S3: stored under prefix/groups/, listed, found by
	// prefix, and counted.
	bs, _, err := r.ListBackups(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mid, err := r.SaveManifest(ctx, &repo.Manifest{VM: "gamma", Time: t0, Source: "qemu", Mode: "full", Group: "app", SetID: "s",
		Disks: bs[0].Disks})
	if err != nil {
		t.Fatal(err)
	}
	gid, err := r.SaveGroup(ctx, &repo.Group{Name: "app", SetID: "s", Time: t0, Members: []repo.GroupMember{{VM: "gamma", Backup: mid.String()}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Client(t).StatObject(ctx, bucket, "stats/groups/"+gid.String(), minio.StatObjectOptions{}); err != nil {
		t.Fatalf("group record object: %v", err)
	}
	if gs, err := r.ListGroups(ctx); err != nil || len(gs) != 1 || gs[0].ID != gid {
		t.Fatalf("ListGroups on S3: %v, %v", gs, err)
	}
	if id, err := r.FindGroup(ctx, gid.Short()); err != nil || id != gid {
		t.Fatalf("FindGroup on S3: %v, %v", id, err)
	}
	s = compute(t, r)
	total = 0
	for o := range srv.Client(t).ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: "stats/", Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		total += o.Size
	}
	eq(t, "StoredBytes with a group record", s.StoredBytes, total)
}

// slowBackend delays every Get of a manifest or index, as object storage
// does, and records how many were in flight at once per kind.
type slowBackend struct {
	backend.Backend
	mu           sync.Mutex
	now, maxSeen map[backend.Kind]int
}

func (b *slowBackend) Get(ctx context.Context, h backend.Handle, off, length int64) ([]byte, error) {
	if h.Kind == backend.KindBackups || h.Kind == backend.KindIndexes {
		b.mu.Lock()
		b.now[h.Kind]++
		b.maxSeen[h.Kind] = max(b.maxSeen[h.Kind], b.now[h.Kind])
		b.mu.Unlock()
		defer func() { b.mu.Lock(); b.now[h.Kind]--; b.mu.Unlock() }()
		time.Sleep(20 * time.Millisecond)
	}
	return b.Backend.Get(ctx, h, off, length)
}

// TestComputeReadsInParallel: manifests and indexes are read several at
// a time, within the bounds, and the figures are those of a sequential
// reading.
func TestComputeReadsInParallel(t *testing.T) {
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r := initRepo(t, be)
	t0 := time.Date(2026, 11, 1, 3, 0, 0, 0, time.UTC)
	for i := range 12 {
		img := filepath.Join(dir, fmt.Sprintf("%d.raw", i))
		writeImage(t, img, uint64(100+i%6)) // 6 distinct images, 6 distinct indexes
		backupImage(t, r, fmt.Sprintf("vm%d", i%4), img, t0.Add(time.Duration(i)*time.Minute))
	}
	want := compute(t, r)
	slow := &slowBackend{Backend: be, now: map[backend.Kind]int{}, maxSeen: map[backend.Kind]int{}}
	rs, err := repo.Open(context.Background(), slow, func() ([]byte, error) { return []byte("pw"), nil })
	if err != nil {
		t.Fatal(err)
	}
	defer rs.Close()
	got := compute(t, rs)
	if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
		t.Errorf("figures read in parallel differ:\n%+v\nwant %+v", got, want)
	}
	eq(t, "Backups", got.Backups, 12)
	eq(t, "Indexes", got.Indexes, 6)
	eq(t, "UniqueBytes", got.UniqueBytes, int64(imgStored+5*cs))
	if m := slow.maxSeen[backend.KindBackups]; m < 2 || m > 16 {
		t.Errorf("%d manifests read at once, want 2 to 16", m)
	}
	if m := slow.maxSeen[backend.KindIndexes]; m < 2 || m > 3 {
		t.Errorf("%d indexes read at once, want 2 to 3", m)
	}
}

// TestComputeStorageFails: a manifest or index the storage fails to
// return (not damaged: unreachable) fails Compute instead of being
// counted as unreadable.
func TestComputeStorageFails(t *testing.T) {
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r := initRepo(t, be)
	img := filepath.Join(dir, "a.raw")
	writeImage(t, img, 1)
	backupImage(t, r, "alpha", img, time.Now())
	for _, kind := range []backend.Kind{backend.KindBackups, backend.KindIndexes} {
		fb := fault.New(be)
		fb.Add(fault.Rule{Op: fault.OpGet, Kind: kind, Nth: 1})
		rf, err := repo.Open(context.Background(), fb, func() ([]byte, error) { return []byte("pw"), nil })
		if err != nil {
			t.Fatal(err)
		}
		s, err := repostats.Compute(context.Background(), rf)
		rf.Close()
		if !errors.Is(err, fault.ErrInjected) {
			t.Errorf("%s unreadable by the storage: Compute = %+v, %v; want the storage's error", kind, s, err)
		}
	}
}
