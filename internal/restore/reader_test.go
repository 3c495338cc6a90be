package restore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/restore"
)

const cs = repo.MinChunkSize

// setup backs up an image of random data, text and holes and returns the
// repository, the disk's index and the image bytes.
func setup(t testing.TB, size int64) (*repo.Repo, *repo.Index, []byte, string) {
	t.Helper()
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(context.Background(), be, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	rng := rand.New(rand.NewPCG(1, 2))
	img := make([]byte, size)
	for off := int64(0); off < size; off += cs / 2 {
		seg := img[off:min(off+cs/2, size)]
		switch rng.IntN(3) {
		case 0:
			for i := range seg {
				seg[i] = byte(rng.Uint32())
			}
		case 1:
			for i := range seg {
				seg[i] = "abc"[i%3]
			}
		}
	}
	p := filepath.Join(dir, "img")
	os.WriteFile(p, img, 0o600)
	im, err := imagefile.Open("sda", p)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	res, err := backup.Run(context.Background(), r, backup.Job{VM: "vm", Disks: []backup.Disk{{Source: im}}}, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	x, err := r.LoadIndex(context.Background(), res.Disks[0].Index)
	if err != nil {
		t.Fatal(err)
	}
	return r, x, img, filepath.Join(dir, "repo")
}

func TestDiskReaderRandomConcurrent(t *testing.T) {
	size := int64(40*cs + 999)
	r, x, img, _ := setup(t, size)
	d := restore.NewDiskReader(r, x, 3*cs) // small cache: evictions happen
	if d.Size() != size {
		t.Fatalf("Size %d", d.Size())
	}
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			for range 300 {
				n := 4096 << rng.IntN(5) // 4k..64k
				off := rng.Int64N(size)
				buf := make([]byte, n)
				got, err := d.ReadAt(buf, off)
				want := min(int64(n), size-off)
				if int64(got) != want || (int64(n) > want && err != io.EOF) || (int64(n) == want && err != nil) {
					errc <- errors.New("ReadAt count/error wrong")
					return
				}
				if !bytes.Equal(buf[:got], img[off:off+int64(got)]) {
					errc <- errors.New("ReadAt returned wrong bytes")
					return
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	// Whole-disk read through io.SectionReader.
	all, err := io.ReadAll(io.NewSectionReader(d, 0, size))
	if err != nil || !bytes.Equal(all, img) {
		t.Fatalf("sequential read: %v", err)
	}
	if n, err := d.ReadAt(make([]byte, 10), size); n != 0 || err != io.EOF {
		t.Fatalf("read at end: %d %v", n, err)
	}
}

func TestDiskReaderDetectsDamage(t *testing.T) {
	r, x, _, dir := setup(t, 8*cs)
	var id repo.ID
	for i := range x.Len() {
		if !x.ID(i).IsZero() {
			id = x.ID(i)
			break
		}
	}
	p := filepath.Join(dir, "chunks", id.String()[:2], id.String())
	b, _ := os.ReadFile(p)
	b[len(b)/2] ^= 2
	os.WriteFile(p, b, 0o600)
	d := restore.NewDiskReader(r, x, 64<<20)
	_, err := io.ReadAll(io.NewSectionReader(d, 0, x.Size()))
	if !errors.Is(err, errs.ErrCorrupt) {
		t.Fatalf("reading a damaged chunk: %v, want ErrCorrupt", err)
	}
}

func TestPlanNaming(t *testing.T) {
	m := &repo.Manifest{Disks: []repo.ManifestDisk{{Name: "sda"}, {Name: "sdb"}}}
	plan := func(names []string, to, format string) (*restore.Files, error) {
		sel, err := restore.Select(m, names)
		if err != nil {
			return nil, err
		}
		return restore.Plan(sel, to, format)
	}
	ts, err := plan(nil, "/out", "raw")
	if err != nil || len(ts.Disks) != 2 || ts.Disks[0].Path != "/out/sda.raw" || ts.Disks[1].Path != "/out/sdb.raw" {
		t.Fatalf("several disks: %v %+v", err, ts)
	}
	ts, err = plan([]string{"sdb"}, "/out/b.img", "raw")
	if err != nil || len(ts.Disks) != 1 || ts.Disks[0].Path != "/out/b.img" {
		t.Fatalf("one disk: %v %+v", err, ts)
	}
	if _, err := plan([]string{"sdc"}, "/x", "raw"); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("unknown disk: %v", err)
	}
	if _, err := plan([]string{"sda", "sda"}, "/x", "raw"); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("disk twice: %v", err)
	}
	if _, err := plan(nil, "/x", "vmdk"); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("unknown format: %v", err)
	}
	if _, err := plan(nil, t.TempDir(), "raw"); err != nil {
		t.Errorf("existing directory for several disks: %v", err)
	}
	if _, err := plan([]string{"sda"}, t.TempDir(), "raw"); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("directory as single-disk target: %v", err)
	}
}

// orderedWriter checks the ImageWriter contract: increasing, non-overlapping writes.
type orderedWriter struct {
	buf  []byte
	next int64
	bad  bool
}

func (w *orderedWriter) WriteAt(p []byte, off int64) (int, error) {
	if off < w.next {
		w.bad = true
	}
	copy(w.buf[off:], p)
	w.next = off + int64(len(p))
	return len(p), nil
}

func (w *orderedWriter) Close() error { return nil }

func TestDiskToWriterInOrder(t *testing.T) {
	r, x, img, _ := setup(t, 30*cs+5)
	w := &orderedWriter{buf: make([]byte, len(img))}
	st, err := restore.Disk(context.Background(), r, x, w, restore.Options{Workers: 6})
	if err != nil {
		t.Fatal(err)
	}
	if w.bad {
		t.Error("writes out of order")
	}
	if !bytes.Equal(w.buf, img) {
		t.Error("restored bytes differ")
	}
	if st.ChunksRead+st.ChunksZero != int64(x.Len()) || st.BytesWritten > int64(len(img)) {
		t.Errorf("stats %+v", st)
	}
}

// BenchmarkDiskReaderRandom4K: random 4 KiB reads over a cached working
// set, the access pattern of a VM booting from `vmshadow serve`.
func BenchmarkDiskReaderRandom4K(b *testing.B) {
	size := int64(64 * cs)
	r, x, _, _ := setup(b, size)
	d := restore.NewDiskReader(r, x, size)
	b.SetBytes(4096)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(3, 4))
		buf := make([]byte, 4096)
		for pb.Next() {
			d.ReadAt(buf, rng.Int64N(size/4096)*4096)
		}
	})
}

// TestDiskReaderFetched: Fetched counts each chunk read from the
// repository once (a chunk two places of the disk share once too), not
// the cache hits, and no zero chunk.
func TestDiskReaderFetched(t *testing.T) {
	r, x, img, _ := setup(t, 6*cs)
	d := restore.NewDiskReader(r, x, 64<<20)
	want := map[repo.ID]int64{} // chunk -> plaintext bytes
	p := make([]byte, 4096)
	for round := 0; round < 2; round++ {
		for off := int64(0); off < int64(len(img)); off += cs / 3 {
			if _, err := d.ReadAt(p, off); err != nil && err != io.EOF {
				t.Fatal(err)
			}
			for i := int(off / cs); i <= int(min(off+int64(len(p)), int64(len(img))-1)/cs); i++ {
				if !x.ID(i).IsZero() {
					_, l := x.Range(i)
					want[x.ID(i)] = l
				}
			}
		}
	}
	var wantBytes int64
	for _, l := range want {
		wantBytes += l
	}
	chunks, bytes := d.Fetched()
	if chunks != int64(len(want)) || bytes != wantBytes || chunks == 0 {
		t.Errorf("Fetched() = %d chunks, %d bytes; want %d, %d", chunks, bytes, len(want), wantBytes)
	}
}
