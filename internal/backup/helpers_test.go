package backup_test

import (
	"bytes"
	"context"
	"iter"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/restore"
)

const cs = repo.MinChunkSize // 64 KiB chunks keep test images small

var testKDF = &repo.KDFParams{Name: "argon2id", Time: 1, MemoryKiB: 8 << 10, Threads: 1}

func newRepo(t testing.TB, enc string) (*repo.Repo, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "repo")
	be, err := local.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(context.Background(), be, repo.InitOptions{Encryption: enc, Password: []byte("pw"), KDF: testKDF, ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r, dir
}

func openRepo(t testing.TB, be backend.Backend) *repo.Repo {
	t.Helper()
	r, err := repo.Open(context.Background(), be, func() ([]byte, error) { return []byte("pw"), nil })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

// region kinds of a synthetic image
const (
	rRandom = iota
	rText
	rHole
	rZeroAllocated
	rDup
)

// makeImage writes a sparse image of random regions: random bytes,
// compressible text, holes, allocated zeros and copies of earlier data, at
// sizes from 1 byte to a few chunks, so chunk boundaries fall everywhere.
func makeImage(t testing.TB, path string, size int64, seed uint64) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	img := make([]byte, size)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < size; {
		n := min(size-off, 1+r.Int64N(3*cs))
		if r.IntN(3) == 0 {
			n = min(size-off, (1+r.Int64N(4))*cs) // whole, aligned-ish regions too
		}
		seg := img[off : off+n]
		kind := r.IntN(5)
		switch kind {
		case rRandom:
			for i := range seg {
				seg[i] = byte(r.Uint32())
			}
		case rText:
			for i := range seg {
				seg[i] = "the quick brown fox "[i%20]
			}
		case rDup:
			if off > n {
				src := r.Int64N(off - n)
				copy(seg, img[src:src+n])
			}
		}
		if kind != rHole {
			if _, err := f.WriteAt(seg, off); err != nil {
				t.Fatal(err)
			}
		}
		off += n
	}
	return img
}

func allocated(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func nonZeroBlocks(img []byte) int64 {
	var n int64
	for b := 0; b < len(img); b += 4096 {
		blk := img[b:min(b+4096, len(img))]
		if !bytes.Equal(blk, make([]byte, len(blk))) {
			n++
		}
	}
	return n
}

func backupImages(t testing.TB, r *repo.Repo, vm string, paths map[string]string, o backup.Options) *backup.Result {
	t.Helper()
	res, err := tryBackup(r, vm, paths, o)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func tryBackup(r *repo.Repo, vm string, paths map[string]string, o backup.Options) (*backup.Result, error) {
	job := backup.Job{VM: vm}
	for name, p := range paths {
		im, err := imagefile.Open(name, p)
		if err != nil {
			return nil, err
		}
		defer im.Close()
		job.Disks = append(job.Disks, backup.Disk{Source: im})
	}
	return backup.Run(context.Background(), r, job, o)
}

func restoreDisk(t testing.TB, r *repo.Repo, id repo.ID, disk, to string) restore.DiskResult {
	t.Helper()
	m, err := r.LoadManifest(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	sel, err := restore.Select(m, []string{disk})
	if err != nil {
		t.Fatal(err)
	}
	ts, err := restore.Plan(sel, to, "raw")
	if err != nil {
		t.Fatal(err)
	}
	out, err := restore.Run(context.Background(), r, sel, ts, restore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return out[0]
}

func mustEqualFile(t testing.TB, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < min(len(got), len(want)) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s differs from the source: %d vs %d bytes, first difference at %d", path, len(got), len(want), i)
	}
}

// changedSource is a synthetic incremental source: a file whose listed
// ranges changed since the base backup; everything else is Unchanged.
type changedSource struct {
	*imagefile.Image
	changed [][2]int64 // sorted, non-overlapping [off, len)
}

func (s *changedSource) Extents(ctx context.Context) iter.Seq2[backup.Extent, error] {
	return func(yield func(backup.Extent, error) bool) {
		pos := int64(0)
		for _, c := range s.changed {
			if c[0] > pos && !yield(backup.Extent{Off: pos, Len: c[0] - pos, Kind: backup.Unchanged}, nil) {
				return
			}
			if !yield(backup.Extent{Off: c[0], Len: c[1], Kind: backup.Data}, nil) {
				return
			}
			pos = c[0] + c[1]
		}
		if pos < s.Size() {
			yield(backup.Extent{Off: pos, Len: s.Size() - pos, Kind: backup.Unchanged}, nil)
		}
	}
}
