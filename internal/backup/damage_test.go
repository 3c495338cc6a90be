package backup_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3/s3test"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// The rule "exit 0 of a backup means restorable", checked by damaging each
// kind of repository file in each way and backing up the same data again.
//
// A backup reuses a stored chunk after looking only at its size (reading
// it would cost a full read of every duplicate). So it notices a missing
// or empty chunk, and one longer than its plaintext stored as is (bytes
// appended to an uncompressed chunk); it cannot notice damage that keeps
// the size plausible: a flipped byte, a chunk cut short, another chunk's
// file in its place, bytes appended to a compressed chunk. Those are found
// by the first read (verify, restore), which moves the chunk to the
// quarantine; every backup after that stores it again. An incremental
// backup takes unchanged chunks from the previous index without looking
// at them, so it re-reads only quarantined ones. README "Verify" says the
// same; this table keeps the two honest.

type chunkDamage struct {
	name string
	do   func(t *testing.T, be backend.Backend, h, other backend.Handle)
}

func rewrite(t *testing.T, be backend.Backend, h backend.Handle, f func([]byte) []byte) {
	t.Helper()
	ctx := context.Background()
	b, err := be.Get(ctx, h, 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	if err := be.Put(ctx, h, f(b)); err != nil {
		t.Fatal(err)
	}
}

var chunkDamages = []chunkDamage{
	{"flip", func(t *testing.T, be backend.Backend, h, _ backend.Handle) {
		rewrite(t, be, h, func(b []byte) []byte { b[len(b)/2] ^= 0x01; return b })
	}},
	{"truncate", func(t *testing.T, be backend.Backend, h, _ backend.Handle) {
		rewrite(t, be, h, func(b []byte) []byte { return b[:len(b)/2] })
	}},
	{"replace", func(t *testing.T, be backend.Backend, h, other backend.Handle) {
		o, err := be.Get(context.Background(), other, 0, -1)
		if err != nil {
			t.Fatal(err)
		}
		rewrite(t, be, h, func([]byte) []byte { return o })
	}},
	{"append", func(t *testing.T, be backend.Backend, h, _ backend.Handle) {
		rewrite(t, be, h, func(b []byte) []byte { return append(b, "appended bytes!!"...) })
	}},
	{"empty", func(t *testing.T, be backend.Backend, h, _ backend.Handle) {
		rewrite(t, be, h, func([]byte) []byte { return nil })
	}},
	{"missing", func(t *testing.T, be backend.Backend, h, _ backend.Handle) {
		if err := be.Delete(context.Background(), h); err != nil {
			t.Fatal(err)
		}
	}},
}

// noticed says which damage a backup of the same data notices by itself
// (and so stores the chunk again), by damage and by whether the chunk is
// stored compressed.
func noticed(damage string, compressed bool) bool {
	switch damage {
	case "empty", "missing":
		return true
	case "append":
		return !compressed
	}
	return false
}

type backendMaker func(t *testing.T) backend.Backend

func damageBackends(t *testing.T) map[string]backendMaker {
	m := map[string]backendMaker{
		"local": func(t *testing.T) backend.Backend {
			be, err := local.Create(filepath.Join(t.TempDir(), "repo"))
			if err != nil {
				t.Fatal(err)
			}
			return be
		},
	}
	if !testing.Short() {
		srv := s3test.Start(t, s3test.Options{})
		srv.SetEnv(t)
		bucket := srv.Bucket(t)
		n := 0
		m["s3"] = func(t *testing.T) backend.Backend {
			n++
			be, err := s3.Create(context.Background(), s3.Config{Endpoint: srv.Endpoint, Bucket: bucket, Prefix: fmt.Sprintf("damage-%d", n)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { be.Close() })
			return be
		}
	}
	return m
}

// damageImage writes 4 chunks: 0 and 2 random (stored as is), 1 and 3
// compressible text, all different.
func damageImage(t *testing.T, path string) []byte {
	img := make([]byte, 4*cs)
	r := rand.New(rand.NewPCG(11, 12))
	for i := range 4 {
		c := img[i*cs : (i+1)*cs]
		for j := range c {
			if i%2 == 0 {
				c[j] = byte(r.Uint32())
			} else {
				c[j] = fmt.Sprintf("chunk %d line %07d\n", i, j/21)[j%21]
			}
		}
	}
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	return img
}

func tryRestore(r *repo.Repo, id repo.ID, to string) error {
	ctx := context.Background()
	m, err := r.LoadManifest(ctx, id)
	if err != nil {
		return err
	}
	sel, err := restore.Select(m, []string{"sda"})
	if err != nil {
		return err
	}
	ts, err := restore.Plan(sel, to, "raw")
	if err != nil {
		return err
	}
	_, err = restore.Run(ctx, r, sel, ts, restore.Options{})
	return err
}

func mustRestore(t *testing.T, r *repo.Repo, id repo.ID, want []byte) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out")
	if err := tryRestore(r, id, out); err != nil {
		t.Fatalf("restore of backup %s: %v", id.Short(), err)
	}
	mustEqualFile(t, out, want)
}

func mustVerifyHealed(t *testing.T, r *repo.Repo, chunk repo.ID, backups ...repo.ID) {
	t.Helper()
	vr, err := r.Verify(context.Background(), repo.VerifyOptions{})
	if err != nil || len(vr.Problems) != 0 {
		t.Fatalf("verify after the repair: %v %+v", err, vr)
	}
	if len(vr.Healed) != 1 || vr.Healed[0].ID != chunk.String() {
		t.Fatalf("verify reports healed %+v, want chunk %s", vr.Healed, chunk.Short())
	}
	for _, b := range backups {
		if !slices.Contains(vr.HealedBackups, b.String()) {
			t.Errorf("verify's healed backups %v lack %s", vr.HealedBackups, b.Short())
		}
	}
}

// TestBackupAfterDamage is the rule's test; with -short only on local
// storage (S3 needs the versitygw server).
func TestBackupAfterDamage(t *testing.T) {
	ctx := context.Background()
	src := filepath.Join(t.TempDir(), "img")
	img := damageImage(t, src)
	for bname, mk := range damageBackends(t) {
		setup := func(t *testing.T) (*repo.Repo, backend.Backend, *backup.Result, *repo.Index) {
			be := mk(t)
			r0, err := repo.Init(ctx, be, repo.InitOptions{Password: []byte("pw"), KDF: testKDF, ChunkSize: cs})
			if err != nil {
				t.Fatal(err)
			}
			r0.Close()
			r := openRepo(t, be)
			b1 := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
			x, err := r.LoadIndex(ctx, b1.Disks[0].Index)
			if err != nil {
				t.Fatal(err)
			}
			return r, be, b1, x
		}
		for _, d := range chunkDamages {
			for _, compressed := range []bool{false, true} {
				entry := 0
				if compressed {
					entry = 1
				}
				name := fmt.Sprintf("%s/%s/compressed=%v", bname, d.name, compressed)
				damage := func(t *testing.T, be backend.Backend, x *repo.Index) repo.ID {
					target := x.ID(entry)
					d.do(t, be, backend.Handle{Kind: backend.KindChunks, Name: target.String()},
						backend.Handle{Kind: backend.KindChunks, Name: x.ID(entry + 2).String()})
					return target
				}
				// The same data backed up again, at once.
				t.Run(name+"/backup", func(t *testing.T) {
					r, be, _, x := setup(t)
					target := damage(t, be, x)
					b2 := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
					if noticed(d.name, compressed) {
						if b2.Stats.ChunksNew != 1 {
							t.Errorf("backup stored %d chunks, want the damaged one again", b2.Stats.ChunksNew)
						}
						mustRestore(t, r, b2.ID, img)
						return
					}
					// Not noticed: the restore finds the damage and
					// moves the chunk aside; the next backup heals.
					err := tryRestore(r, b2.ID, filepath.Join(t.TempDir(), "out"))
					if !errors.Is(err, errs.ErrCorrupt) {
						t.Fatalf("restore over %s damage the backup cannot notice: %v, want ErrCorrupt (if the backup notices it now, update noticed and README)", d.name, err)
					}
					b3 := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
					if b3.Stats.ChunksNew != 1 {
						t.Errorf("backup after the restore quarantined the chunk stored %d chunks, want 1", b3.Stats.ChunksNew)
					}
					mustRestore(t, r, b3.ID, img)
					mustRestore(t, r, b2.ID, img)
					mustVerifyHealed(t, r, target, b2.ID, b3.ID)
				})
				// verify first: it finds and quarantines the chunk, so a
				// full backup stores it again.
				t.Run(name+"/verify-backup", func(t *testing.T) {
					r, be, b1, x := setup(t)
					target := damage(t, be, x)
					vr, err := r.Verify(ctx, repo.VerifyOptions{})
					if err != nil || len(vr.Problems) != 1 || vr.Problems[0].ID != target.String() || !vr.Problems[0].Quarantined {
						t.Fatalf("verify of the damaged chunk: %v %+v", err, vr)
					}
					b2 := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
					mustRestore(t, r, b2.ID, img)
					mustRestore(t, r, b1.ID, img)
					mustVerifyHealed(t, r, target, b1.ID, b2.ID)
				})
				// verify first, then an incremental backup in which
				// nothing changed: it reads the quarantined chunk's range
				// again instead of taking the chunk from the base index.
				t.Run(name+"/verify-incremental", func(t *testing.T) {
					r, be, b1, x := setup(t)
					damage(t, be, x)
					if _, err := r.Verify(ctx, repo.VerifyOptions{}); err != nil {
						t.Fatal(err)
					}
					im, err := imagefile.Open("sda", src)
					if err != nil {
						t.Fatal(err)
					}
					defer im.Close()
					job := backup.Job{VM: "vm", Mode: "incremental", Disks: []backup.Disk{{Source: &changedSource{im, nil}, Base: x}}}
					b2, err := backup.Run(ctx, r, job, backup.Options{})
					if err != nil {
						t.Fatal(err)
					}
					if b2.Stats.BytesRead != cs || b2.Stats.ChunksNew != 1 {
						t.Errorf("incremental read %d bytes and stored %d chunks, want the quarantined chunk's %d and 1", b2.Stats.BytesRead, b2.Stats.ChunksNew, cs)
					}
					mustRestore(t, r, b2.ID, img)
					mustRestore(t, r, b1.ID, img)
				})
			}
		}
		// A damaged index identical to the new backup's: the backup
		// stores its index again instead of naming the damaged one.
		for _, d := range chunkDamages {
			if d.name == "replace" {
				continue
			}
			t.Run(bname+"/index/"+d.name, func(t *testing.T) {
				r, be, b1, _ := setup(t)
				h := backend.Handle{Kind: backend.KindIndexes, Name: b1.Disks[0].Index.String()}
				d.do(t, be, h, h)
				b2 := backupImages(t, r, "vm", map[string]string{"sda": src}, backup.Options{})
				if b2.Disks[0].Index != b1.Disks[0].Index {
					t.Fatal("same data, different index")
				}
				mustRestore(t, r, b2.ID, img)
				mustRestore(t, r, b1.ID, img)
			})
		}
	}
}
