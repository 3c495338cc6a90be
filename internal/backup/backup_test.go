package backup_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
)

func TestRoundTripSparse(t *testing.T) {
	for _, enc := range []string{repo.EncryptionAESGCM, repo.EncryptionNone} {
		t.Run(enc, func(t *testing.T) {
			r, _ := newRepo(t, enc)
			dir := t.TempDir()
			for i, size := range []int64{0, 1, 4095, cs, cs + 1, 37*cs + 12345, 8 << 20} {
				name := fmt.Sprintf("d%d", i)
				src := filepath.Join(dir, name+".img")
				img := makeImage(t, src, size, uint64(i+1))
				meter := progress.NewMeter(size)
				res := backupImages(t, r, "vm1", map[string]string{name: src}, backup.Options{Meter: meter})
				d := res.Disks[0]
				if d.Size != size || res.Manifest.Disks[0].Size != size {
					t.Fatalf("%s: size %d in result", name, d.Size)
				}
				snap := progress.NewSampler(meter).Sample(time.Now())
				if snap.BytesDone != size {
					t.Errorf("%s: progress done %d of %d", name, snap.BytesDone, size)
				}
				if d.Stats.BytesRead > size || d.Stats.BytesRead < nonZeroBlocks(img)*4096-4096 && size > 4096 {
					t.Errorf("%s: read %d bytes of %d (nonzero blocks %d)", name, d.Stats.BytesRead, size, nonZeroBlocks(img))
				}
				out := filepath.Join(dir, name+".restored")
				rr := restoreDisk(t, r, res.ID, name, out)
				mustEqualFile(t, out, img)
				if !rr.Verified {
					t.Error("restore not verified")
				}
				// Sparse: the restored file allocates no more than the
				// source, and about its non-zero 4 KiB blocks.
				ra, sa := allocated(t, out), allocated(t, src)
				if ra > sa || ra > nonZeroBlocks(img)*4096+64<<10 {
					t.Errorf("%s: restored file allocates %d bytes; source %d, non-zero data %d", name, ra, sa, nonZeroBlocks(img)*4096)
				}
			}
		})
	}
}

func TestDedupAcrossBackupsAndVMs(t *testing.T) {
	r, _ := newRepo(t, repo.EncryptionAESGCM)
	dir := t.TempDir()
	src := filepath.Join(dir, "a.img")
	makeImage(t, src, 200*cs, 11)
	first := backupImages(t, r, "vm1", map[string]string{"sda": src}, backup.Options{})
	if first.Stats.ChunksNew == 0 || first.Stats.BytesNew == 0 {
		t.Fatalf("first backup stored nothing: %+v", first.Stats)
	}
	again := backupImages(t, r, "vm1", map[string]string{"sda": src}, backup.Options{})
	other := backupImages(t, r, "vm2", map[string]string{"disk0": src}, backup.Options{})
	for _, res := range []*backup.Result{again, other} {
		if res.Stats.ChunksNew != 0 || res.Stats.BytesNew != 0 {
			t.Errorf("identical image stored again: %+v", res.Stats)
		}
		if res.Stats.ChunksReused+res.Stats.ChunksZero != 200 {
			t.Errorf("reused %d + zero %d chunks, want 200", res.Stats.ChunksReused, res.Stats.ChunksZero)
		}
		if res.Disks[0].Index != first.Disks[0].Index {
			t.Error("identical disk got a different index")
		}
	}
	if again.ID == first.ID {
		t.Fatal("two backups share an ID")
	}
	// Within one image: 8 copies of the same chunk are stored once.
	dup := filepath.Join(dir, "dup.img")
	one := makeImage(t, filepath.Join(dir, "one.img"), cs, 99)
	var img []byte
	for range 8 {
		img = append(img, one...)
	}
	os.WriteFile(dup, img, 0o600)
	res := backupImages(t, r, "vm3", map[string]string{"sda": dup}, backup.Options{})
	if res.Stats.ChunksNew+res.Stats.ChunksReused != 8 || res.Stats.ChunksNew > 1 {
		t.Errorf("8 identical chunks: %+v", res.Stats)
	}
}

// TestIncrementalUnchanged feeds a base index and changed ranges (as the
// live backup does from a dirty bitmap): only chunks touching a change are
// read, and the result restores to the changed image.
func TestIncrementalUnchanged(t *testing.T) {
	r, _ := newRepo(t, repo.EncryptionAESGCM)
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.img")
	img := makeImage(t, src, 64*cs+100, 5)
	base := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
	baseIdx, err := r.LoadIndex(context.Background(), base.Disks[0].Index)
	if err != nil {
		t.Fatal(err)
	}
	changed := [][2]int64{{10, 5}, {3*cs - 1, 2}, {10 * cs, 3 * cs}, {40*cs + 7, 1}, {64 * cs, 100}}
	f, _ := os.OpenFile(src, os.O_WRONLY, 0)
	for i, c := range changed {
		b := make([]byte, c[1])
		for j := range b {
			b[j] = byte(i*31 + j + 1)
		}
		copy(img[c[0]:], b)
		f.WriteAt(b, c[0])
	}
	f.Close()
	// Chunks touched: 0, 2, 3, 10, 11, 12, 40, 64 (the 100-byte tail).
	wantRead := int64(7*cs + 100)
	im, err := imagefile.Open("sda", src)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	job := backup.Job{VM: "vm", Mode: "incremental", Disks: []backup.Disk{{Source: &changedSource{im, changed}, Base: baseIdx, Checkpoint: "vmshadow-1"}}}
	res, err := backup.Run(context.Background(), r, job, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Stats.BytesRead != wantRead {
		t.Errorf("incremental read %d bytes, want %d (changed ranges rounded to chunks)", res.Stats.BytesRead, wantRead)
	}
	if res.Manifest.Mode != "incremental" || res.Manifest.Disks[0].Checkpoint != "vmshadow-1" {
		t.Errorf("manifest fields: %+v", res.Manifest)
	}
	out := filepath.Join(dir, "restored")
	restoreDisk(t, r, res.ID, "sda", out)
	mustEqualFile(t, out, img)
	// Unchanged extents need a base.
	job.Disks[0].Base = nil
	if _, err := backup.Run(context.Background(), r, job, backup.Options{}); err == nil {
		t.Error("Unchanged extents without a base accepted")
	}
}

// resizingSource changes the image's size after its first read.
type resizingSource struct {
	*imagefile.Image
	path string
	size int64
	once sync.Once
}

func (s *resizingSource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	s.once.Do(func() { os.Truncate(s.path, s.size) })
	return s.Image.ReadAt(ctx, p, off)
}

func TestImageChangesSize(t *testing.T) {
	r, dir := newRepo(t, repo.EncryptionNone)
	for _, tc := range []struct {
		name string
		size int64
	}{{"grows", 100 * cs}, {"shrinks", 5 * cs}} {
		t.Run(tc.name, func(t *testing.T) {
			src := filepath.Join(t.TempDir(), "img")
			makeImage(t, src, 50*cs, 3)
			im, err := imagefile.Open("sda", src)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			s := &resizingSource{Image: im, path: src, size: tc.size}
			_, err = backup.Run(context.Background(), r, backup.Job{VM: "vm", Disks: []backup.Disk{{Source: s}}}, backup.Options{Readers: 1})
			if err == nil {
				t.Fatal("backup of an image that changed size succeeded")
			}
			if !strings.Contains(err.Error(), "changed size") && !strings.Contains(err.Error(), "shrank") {
				t.Errorf("unclear error: %v", err)
			}
			if n := countBackups(t, dir); n != 0 {
				t.Errorf("%d manifests after a failed backup", n)
			}
		})
	}
}

func countBackups(t testing.TB, repoDir string) int {
	ents, err := os.ReadDir(filepath.Join(repoDir, "backups"))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestConcurrentBackups(t *testing.T) {
	r, dir := newRepo(t, repo.EncryptionAESGCM)
	src := t.TempDir()
	imgs := make([][]byte, 4)
	paths := make([]string, 4)
	for i := range imgs {
		paths[i] = filepath.Join(src, fmt.Sprint(i))
		// Same seed for pairs: concurrent backups race to store the same chunks.
		imgs[i] = makeImage(t, paths[i], 60*cs, uint64(i/2))
	}
	var wg sync.WaitGroup
	ids := make([]repo.ID, 4)
	errc := make(chan error, 4)
	for i := range imgs {
		wg.Go(func() {
			be, err := local.Open(dir)
			if err != nil {
				errc <- err
				return
			}
			rr := openRepo(t, be)
			l, lctx, err := rr.Lock(context.Background(), false, "backup")
			if err != nil {
				errc <- err
				return
			}
			defer l.Unlock()
			job := backup.Job{VM: fmt.Sprintf("vm%d", i)}
			im, _ := imagefile.Open("sda", paths[i])
			defer im.Close()
			job.Disks = []backup.Disk{{Source: im}}
			res, err := backup.Run(lctx, rr, job, backup.Options{})
			if err != nil {
				errc <- err
				return
			}
			ids[i] = res.ID
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	vr, err := r.Verify(context.Background(), repo.VerifyOptions{})
	if err != nil || len(vr.Problems) != 0 || vr.Backups != 4 {
		t.Fatalf("verify after concurrent backups: %v %+v", err, vr)
	}
	for i, id := range ids {
		out := filepath.Join(src, fmt.Sprint(i, ".restored"))
		restoreDisk(t, r, id, "sda", out)
		mustEqualFile(t, out, imgs[i])
	}
}

func TestBadJobs(t *testing.T) {
	r, _ := newRepo(t, repo.EncryptionNone)
	src := filepath.Join(t.TempDir(), "x")
	makeImage(t, src, cs, 1)
	for _, tc := range []struct {
		vm    string
		paths map[string]string
	}{{"bad/vm", map[string]string{"sda": src}}, {"vm", map[string]string{"../x": src}}, {"vm", nil}} {
		if _, err := tryBackup(r, tc.vm, tc.paths, backup.Options{}); !errors.Is(err, errs.ErrUsage) {
			t.Errorf("vm %q disks %v: %v, want a usage error", tc.vm, tc.paths, err)
		}
	}
	if _, err := imagefile.Open("sda", filepath.Join(t.TempDir(), "missing")); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("missing image: %v", err)
	}
	q := filepath.Join(t.TempDir(), "q")
	os.WriteFile(q, []byte("QFI\xfb\x00\x00\x00\x03"), 0o600)
	if _, err := imagefile.Open("sda", q); !errors.Is(err, errs.ErrUnsupported) {
		t.Errorf("qcow2 image: %v", err)
	}
}

// TestStoringBeforeManifest: Options.Storing runs once, after every index
// and before the manifest (no backup exists yet when it runs); its error
// fails the backup with no manifest written.
func TestStoringBeforeManifest(t *testing.T) {
	r, _ := newRepo(t, repo.EncryptionNone)
	src := filepath.Join(t.TempDir(), "d.img")
	makeImage(t, src, 3*cs+7, 1)
	backups := func() int {
		t.Helper()
		b, _, err := r.ListBackups(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return len(b)
	}
	calls := 0
	res := backupImages(t, r, "vm1", map[string]string{"d": src}, backup.Options{Storing: func() error {
		calls++
		if n := backups(); n != 0 {
			t.Errorf("Storing called with %d backups already stored", n)
		}
		return nil
	}})
	if calls != 1 || backups() != 1 || res.ID.IsZero() {
		t.Fatalf("Storing called %d times, %d backups, id %v; want 1, 1, an id", calls, backups(), res.ID)
	}
	boom := errors.New("journal full")
	_, err := tryBackup(r, "vm1", map[string]string{"d": src}, backup.Options{Storing: func() error { return boom }})
	if !errors.Is(err, boom) {
		t.Fatalf("backup with a failing Storing: %v, want %v", err, boom)
	}
	if n := backups(); n != 1 {
		t.Fatalf("%d backups after a backup whose Storing failed, want 1", n)
	}
}
