package repocopy_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repocopy"
	"github.com/vmshadow/vmshadow/internal/restore"
)

var testKDF = &repo.KDFParams{Name: "argon2id", Time: 1, MemoryKiB: 8 << 10, Threads: 1}

const kib = 1 << 10

func newRepo(t testing.TB, o repo.InitOptions) (*repo.Repo, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "repo")
	be, err := local.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	o.KDF = testKDF
	r, err := repo.Init(context.Background(), be, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r, dir
}

// writeImage writes a 1 MiB + 5 KiB image (the last chunk is short):
// random data with a zero hole at 256..512 KiB.
func writeImage(t *testing.T, path string, seed uint64) []byte {
	t.Helper()
	rnd := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, 1<<20+5*kib)
	for i := range b {
		b[i] = byte(rnd.Uint32())
	}
	clear(b[256*kib : 512*kib])
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

func backupImage(t testing.TB, r *repo.Repo, vm, path string, when time.Time) repo.ID {
	t.Helper()
	img, err := imagefile.Open("sda", path)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	res, err := backup.Run(context.Background(), r, backup.Job{VM: vm, Tags: []string{"t1"}, Time: when, Source: "qemu",
		Mode: "full", Reason: "first backup", Consistency: "application", SetID: "set1",
		Disks: []backup.Disk{{Source: img, Checkpoint: "vmshadow-src-1"}}}, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return res.ID
}

// readDisk restores a backup's disk into memory.
func readDisk(t *testing.T, r *repo.Repo, id repo.ID, disk string) []byte {
	t.Helper()
	ctx := context.Background()
	m, err := r.LoadManifest(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	xid, _ := repo.ParseID(m.Disk(disk).Index)
	x, err := r.LoadIndex(ctx, xid)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, x.Size())
	if _, err := restore.NewDiskReader(r, x, 1<<20).ReadAtContext(ctx, b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func verifyClean(t *testing.T, r *repo.Repo) *repo.VerifyResult {
	t.Helper()
	v, err := r.Verify(context.Background(), repo.VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Problems) > 0 {
		t.Fatalf("target verify found problems: %+v", v.Problems)
	}
	return v
}

func copyAll(t *testing.T, src, dst *repo.Repo, sel repocopy.Selection) ([]*backup.Result, *repocopy.Plan) {
	t.Helper()
	ctx := context.Background()
	p, err := repocopy.Select(ctx, src, dst, sel)
	if err != nil {
		t.Fatal(err)
	}
	var out []*backup.Result
	for _, b := range p.Copy {
		res, err := repocopy.Copy(ctx, src, dst, b, backup.Options{})
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, res)
	}
	return out, p
}

// TestCopyBetweenRepositories copies between repositories with different
// passwords, chunk-ID schemes, encryption and chunk sizes: the copy
// restores bit-identical to the original, keeps its fields but not its
// checkpoints, records its origin, verifies clean, and a second run
// copies nothing.
func TestCopyBetweenRepositories(t *testing.T) {
	cases := []struct {
		name     string
		src, dst repo.InitOptions
	}{
		{"blake3-to-hmac", repo.InitOptions{Password: []byte("one"), ChunkSize: 64 * kib},
			repo.InitOptions{Password: []byte("two"), ChunkHash: repo.HashHMACSHA256, ChunkSize: 64 * kib}},
		{"encrypted-128k-to-plain-64k", repo.InitOptions{Password: []byte("one"), ChunkSize: 128 * kib},
			repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: 64 * kib}},
		{"plain-64k-to-encrypted-256k", repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: 64 * kib},
			repo.InitOptions{Password: []byte("two"), ChunkSize: 256 * kib}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			src, _ := newRepo(t, c.src)
			dst, _ := newRepo(t, c.dst)
			path := filepath.Join(t.TempDir(), "disk.img")
			want := writeImage(t, path, 1)
			when := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
			sid := backupImage(t, src, "vm1", path, when)

			res, p := copyAll(t, src, dst, repocopy.Selection{})
			if len(res) != 1 || len(p.Present) != 0 {
				t.Fatalf("copied %d, present %d; want 1 copied", len(res), len(p.Present))
			}
			if got := readDisk(t, dst, res[0].ID, "sda"); !bytes.Equal(got, want) {
				t.Fatal("the copy does not restore to the original image")
			}
			m, err := dst.LoadManifest(ctx, res[0].ID)
			if err != nil {
				t.Fatal(err)
			}
			if m.Origin != sid.String() || m.VM != "vm1" || !m.Time.Equal(when) || m.Source != "qemu" || m.Mode != "full" ||
				m.Consistency != "application" || m.SetID != "set1" || len(m.Tags) != 1 || m.Tags[0] != "t1" || m.Reason != "first backup" {
				t.Fatalf("copied manifest %+v does not keep the original's fields with origin %s", m, sid)
			}
			if m.Disks[0].Checkpoint != "" {
				t.Fatalf("copy kept checkpoint %q of the source's chain", m.Disks[0].Checkpoint)
			}
			if m.Disks[0].ChunkSize != dst.ChunkSize() {
				t.Fatalf("copy's chunk size %d, want the target's %d", m.Disks[0].ChunkSize, dst.ChunkSize())
			}
			// 16 data chunks of 64 KiB minus the 4 of the hole, plus the 5 KiB tail.
			if res[0].Stats.BytesRead != int64(len(want)-256*kib) {
				t.Fatalf("read %d bytes from the source, want %d (zero chunks are not read)", res[0].Stats.BytesRead, len(want)-256*kib)
			}
			verifyClean(t, dst)

			again, p := copyAll(t, src, dst, repocopy.Selection{})
			if len(again) != 0 || p.Present[sid] != res[0].ID {
				t.Fatalf("rerun copied %d backups, present %v; want nothing copied and %s present as %s", len(again), p.Present, sid.Short(), res[0].ID.Short())
			}
			// Copying back finds the original.
			back, p := copyAll(t, dst, src, repocopy.Selection{})
			if len(back) != 0 || p.Present[res[0].ID] != sid {
				t.Fatalf("copy back copied %d backups; want none (the original is there)", len(back))
			}
			// A copy of the copy keeps the first origin.
			third, _ := newRepo(t, repo.InitOptions{Password: []byte("three"), ChunkSize: 64 * kib})
			res3, _ := copyAll(t, dst, third, repocopy.Selection{})
			if len(res3) != 1 || res3[0].Manifest.Origin != sid.String() {
				t.Fatalf("copy of a copy: %d copied, origin %q; want the original's %s", len(res3), res3[0].Manifest.Origin, sid)
			}
			if _, err := dst.LatestBackup(ctx, "vm1", nil); !errors.Is(err, errs.ErrNotFound) {
				t.Fatalf("LatestBackup in the target found %v; a copy must not continue a chain", err)
			}
		})
	}
}

// TestCopyIncrementalSendsOnlyNewChunks: the second backup changes three
// chunks; copying it sends those three and finds the rest in the target.
func TestCopyIncrementalSendsOnlyNewChunks(t *testing.T) {
	src, _ := newRepo(t, repo.InitOptions{Password: []byte("one"), ChunkSize: 64 * kib})
	dst, _ := newRepo(t, repo.InitOptions{Password: []byte("two"), ChunkSize: 64 * kib})
	path := filepath.Join(t.TempDir(), "disk.img")
	img := writeImage(t, path, 2)
	t0 := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	backupImage(t, src, "vm1", path, t0)
	res, _ := copyAll(t, src, dst, repocopy.Selection{})
	if len(res) != 1 || res[0].Stats.ChunksNew != 13 {
		t.Fatalf("first copy: %d backups, %+v; want 13 chunks sent", len(res), res[0].Stats)
	}
	for _, off := range []int{0, 600 * kib, 1 << 20} {
		img[off] ^= 0xff
	}
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	sid2 := backupImage(t, src, "vm1", path, t0.Add(time.Hour))
	res, p := copyAll(t, src, dst, repocopy.Selection{})
	if len(res) != 1 || len(p.Present) != 1 {
		t.Fatalf("second copy: %d copied, %d present; want 1 and 1", len(res), len(p.Present))
	}
	if s := res[0].Stats; s.ChunksNew != 3 || s.ChunksReused != 10 || s.ChunksZero != 4 {
		t.Fatalf("second copy sent %d chunks, found %d, %d zero; want 3 sent, 10 present, 4 zero", s.ChunksNew, s.ChunksReused, s.ChunksZero)
	}
	if res[0].Manifest.Origin != sid2.String() {
		t.Fatal("copied the wrong backup")
	}
	if got := readDisk(t, dst, res[0].ID, "sda"); !bytes.Equal(got, img) {
		t.Fatal("the copy of the incremental does not restore to the image")
	}
	verifyClean(t, dst)
}

// TestCopySelection: --vm and named backups (prefixes) select; a named
// backup of another VM and the same repository twice are usage errors.
func TestCopySelection(t *testing.T) {
	ctx := context.Background()
	src, _ := newRepo(t, repo.InitOptions{Password: []byte("one"), ChunkSize: 64 * kib})
	dst, _ := newRepo(t, repo.InitOptions{Password: []byte("two"), ChunkSize: 64 * kib})
	path := filepath.Join(t.TempDir(), "disk.img")
	writeImage(t, path, 3)
	t0 := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	a1 := backupImage(t, src, "a", path, t0)
	b1 := backupImage(t, src, "b", path, t0.Add(time.Minute))
	a2 := backupImage(t, src, "a", path, t0.Add(2*time.Minute))

	p, err := repocopy.Select(ctx, src, dst, repocopy.Selection{VM: "b"})
	if err != nil || len(p.Copy) != 1 || p.Copy[0].ID != b1 {
		t.Fatalf("--vm b: %v, %+v; want only %s", err, p, b1.Short())
	}
	p, err = repocopy.Select(ctx, src, dst, repocopy.Selection{Backups: []string{a2.String()[:10], a1.Short(), a1.String()}})
	if err != nil || len(p.Copy) != 2 || p.Copy[0].ID != a1 || p.Copy[1].ID != a2 {
		t.Fatalf("named backups: %v, %+v; want %s then %s", err, p, a1.Short(), a2.Short())
	}
	if _, err := repocopy.Select(ctx, src, dst, repocopy.Selection{VM: "b", Backups: []string{a1.Short()}}); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("backup of another VM: %v, want ErrUsage", err)
	}
	if _, err := repocopy.Select(ctx, src, dst, repocopy.Selection{Backups: []string{"ffffffffffff"}}); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("unknown backup: %v, want ErrNotFound", err)
	}
	if _, err := repocopy.Select(ctx, src, src, repocopy.Selection{}); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("same repository: %v, want ErrUsage", err)
	}
}

// TestCopyDamagedSourceChunk: a source chunk that fails verification
// fails the copy as corrupt data; the target has no backup, verifies
// clean, and the failure names the chunks it stored.
func TestCopyDamagedSourceChunk(t *testing.T) {
	ctx := context.Background()
	src, srcDir := newRepo(t, repo.InitOptions{Password: []byte("one"), ChunkSize: 64 * kib})
	dst, _ := newRepo(t, repo.InitOptions{Password: []byte("two"), ChunkSize: 64 * kib})
	path := filepath.Join(t.TempDir(), "disk.img")
	writeImage(t, path, 4)
	sid := backupImage(t, src, "vm1", path, time.Now())
	m, _ := src.LoadManifest(ctx, sid)
	xid, _ := repo.ParseID(m.Disks[0].Index)
	x, _ := src.LoadIndex(ctx, xid)
	// Damage the last chunk so that earlier ones are already stored.
	hp, err := backend.Handle{Kind: backend.KindChunks, Name: x.ID(x.Len() - 1).String()}.Path()
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(srcDir, filepath.FromSlash(hp))
	blob, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	blob[len(blob)-1] ^= 1
	if err := os.WriteFile(f, blob, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = repocopy.Copy(ctx, src, dst, repo.Backup{ID: sid, Manifest: m}, backup.Options{Readers: 1, Workers: 1, Uploaders: 1})
	if !errors.Is(err, errs.ErrCorrupt) {
		t.Fatalf("copy of a damaged backup: %v, want ErrCorrupt", err)
	}
	var fail *backup.Failure
	if !errors.As(err, &fail) || fail.Stored == 0 {
		t.Fatalf("the failure does not name the chunks it stored: %v", err)
	}
	if n, derr := dst.DropChunks(ctx, fail.Chunks(), fail.Start); derr != nil || int64(n) != fail.Stored {
		t.Fatalf("dropping the %d stored chunks: %d, %v", fail.Stored, n, derr)
	}
	bs, _, err := dst.ListBackups(ctx)
	if err != nil || len(bs) != 0 {
		t.Fatalf("target after a failed copy: %d backups, %v; want none", len(bs), err)
	}
	verifyClean(t, dst)
}

// TestCopyKeepsFiles: a backup's VM definition files travel with it.
func TestCopyKeepsFiles(t *testing.T) {
	ctx := context.Background()
	src, _ := newRepo(t, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: 64 * kib})
	dst, _ := newRepo(t, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: 256 * kib})
	disk := writeImage(t, filepath.Join(t.TempDir(), "img"), 7)
	nvram := disk[:200*kib]
	domain := []byte("<domain><name>vm1</name></domain>")
	res, err := backup.Run(ctx, src, backup.Job{VM: "vm1", Definition: repo.DefinitionLibvirt,
		Disks: []backup.Disk{{Source: backup.Bytes("vda", disk)}},
		Files: []backup.Source{backup.Bytes(repo.FileDomainXML, domain), backup.Bytes(repo.FileNVRAM, nvram)}}, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	out, _ := copyAll(t, src, dst, repocopy.Selection{})
	if len(out) != 1 {
		t.Fatalf("copied %d backups, want 1", len(out))
	}
	m := out[0].Manifest
	if m.Origin != res.ID.String() || m.Definition != repo.DefinitionLibvirt || len(m.Files) != 2 {
		t.Fatalf("copy: origin %s, definition %q, files %+v", m.Origin, m.Definition, m.Files)
	}
	for name, want := range map[string][]byte{repo.FileDomainXML: domain, repo.FileNVRAM: nvram} {
		got, err := restore.ReadFile(ctx, dst, m, name, 0)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("copied %s: %d bytes, %v; want the %d of the source", name, len(got), err, len(want))
		}
	}
	if !bytes.Equal(readDisk(t, dst, out[0].ID, "vda"), disk) {
		t.Error("copied disk differs")
	}
	verifyClean(t, dst)
}
