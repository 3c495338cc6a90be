package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/fault"
	"github.com/vmshadow/vmshadow/internal/repo/backend/mem"
)

// testKDF is cheap so tests run fast; the parameters are stored per key file.
var testKDF = &KDFParams{Name: "argon2id", Time: 1, MemoryKiB: 8 << 10, Threads: 1}

func pw(s string) func() ([]byte, error) { return func() ([]byte, error) { return []byte(s), nil } }

func newTestRepo(t testing.TB, enc string) (*Repo, *mem.Mem) {
	t.Helper()
	be := mem.New()
	r, err := Init(context.Background(), be, InitOptions{Encryption: enc, Password: []byte("secret"), KDF: testKDF, ChunkSize: MinChunkSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r, be
}

func randData(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestOpenPasswords(t *testing.T) {
	ctx := context.Background()
	r, be := newTestRepo(t, EncryptionAESGCM)
	if _, err := Open(ctx, be, pw("wrong")); !errors.Is(err, errs.ErrAuth) {
		t.Fatalf("wrong password: %v, want ErrAuth", err)
	}
	r2, err := Open(ctx, be, pw("secret"))
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if r2.Config().ID != r.Config().ID || !r2.Config().Encrypted() {
		t.Fatal("config differs")
	}
	// A chunk sealed by one handle opens with the other: same master keys.
	plain := randData(1, 5000)
	id := r.HashChunk(plain)
	if id != r2.HashChunk(plain) {
		t.Fatal("keyed hash differs between handles")
	}
	if err := r.PutChunk(ctx, id, r.SealChunk(nil, id, plain)); err != nil {
		t.Fatal(err)
	}
	got, err := r2.ReadChunk(ctx, id, nil)
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("ReadChunk: %v", err)
	}

	// passwd: new password works, old one does not, data still readable.
	if _, err := r2.ChangePassword(ctx, []byte("new secret"), testKDF); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, be, pw("secret")); !errors.Is(err, errs.ErrAuth) {
		t.Fatalf("old password after passwd: %v", err)
	}
	r3, err := Open(ctx, be, pw("new secret"))
	if err != nil {
		t.Fatal(err)
	}
	defer r3.Close()
	if got, err := r3.ReadChunk(ctx, id, nil); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("ReadChunk after passwd: %v", err)
	}
	n := 0
	be.List(ctx, backend.KindKeys, "", func(backend.Info) error { n++; return nil })
	if n != 1 {
		t.Fatalf("%d key files after passwd, want 1", n)
	}
}

func TestKeyedHash(t *testing.T) {
	a, _ := newTestRepo(t, EncryptionAESGCM)
	b, _ := newTestRepo(t, EncryptionAESGCM)
	n, _ := newTestRepo(t, EncryptionNone)
	p := []byte("same plaintext")
	if a.HashChunk(p) == b.HashChunk(p) {
		t.Fatal("two encrypted repositories give the same chunk name: names reveal plaintext hashes")
	}
	if n.HashChunk(p) != ID(sha256Sum(p)) {
		t.Fatal("unencrypted repository does not use plain SHA-256")
	}
}

func TestUnencrypted(t *testing.T) {
	ctx := context.Background()
	r, be := newTestRepo(t, EncryptionNone)
	called := false
	r2, err := Open(ctx, be, func() ([]byte, error) { called = true; return nil, errors.New("no") })
	if err != nil || called {
		t.Fatalf("open unencrypted: %v (password asked: %v)", err, called)
	}
	defer r2.Close()
	plain := bytes.Repeat([]byte("compressible "), 4000)
	id := r.HashChunk(plain)
	sealed := r.SealChunk(nil, id, plain)
	if len(sealed) >= len(plain)/4 {
		t.Errorf("compressible chunk stored in %d bytes", len(sealed))
	}
	r.PutChunk(ctx, id, sealed)
	if got, err := r2.ReadChunk(ctx, id, nil); err != nil || !bytes.Equal(got, plain) {
		t.Fatal(err)
	}
	// Incompressible data is stored raw.
	rnd := randData(2, 10000)
	if s := r.SealChunk(nil, r.HashChunk(rnd), rnd); s[5] != compNone || len(s) != headerLen+len(rnd) {
		t.Errorf("random chunk: compression %d, %d bytes", s[5], len(s))
	}
}

func TestChunkDamage(t *testing.T) {
	ctx := context.Background()
	for _, enc := range []string{EncryptionAESGCM, EncryptionNone} {
		t.Run(enc, func(t *testing.T) {
			r, be := newTestRepo(t, enc)
			plain := bytes.Repeat(randData(3, 1000), 20)
			id := r.HashChunk(plain)
			sealed := r.SealChunk(nil, id, plain)
			h := chunkHandle(id)
			other := r.HashChunk([]byte("other"))
			cases := map[string]func() error{
				"bit flip everywhere": func() error {
					for i := range len(sealed) * 8 {
						d := append([]byte(nil), sealed...)
						d[i/8] ^= 1 << (i % 8)
						if got, err := r.OpenChunk(id, d, nil); err == nil {
							// Only a flip of a bit that decoders ignore (an
							// unused zstd frame flag) may pass, and then the
							// verified plaintext must be the original.
							if !bytes.Equal(got, plain) {
								return errors.New("bit flip at " + itoa(i) + " returned wrong data")
							}
						} else if !errors.Is(err, errs.ErrCorrupt) && !errors.Is(err, errs.ErrUnsupported) {
							return err
						}
					}
					return nil
				},
				"every truncation": func() error {
					for n := range len(sealed) {
						if _, err := r.OpenChunk(id, append([]byte(nil), sealed[:n]...), nil); !errors.Is(err, errs.ErrCorrupt) {
							return errors.New("truncation to " + itoa(n) + ": " + errString(err))
						}
					}
					return nil
				},
				"stored under another name": func() error {
					be.Put(ctx, chunkHandle(other), sealed)
					_, err := r.ReadChunk(ctx, other, nil)
					if !errors.Is(err, errs.ErrCorrupt) {
						return errors.New("swapped chunk: " + errString(err))
					}
					return nil
				},
				"missing": func() error {
					be.Delete(ctx, h)
					if _, err := r.ReadChunk(ctx, id, nil); !errors.Is(err, errs.ErrNotFound) {
						return errors.New("missing chunk: " + errString(err))
					}
					return nil
				},
			}
			for name, fn := range cases {
				be.Put(ctx, h, sealed)
				if err := fn(); err != nil {
					t.Errorf("%s: %v", name, err)
				}
			}
		})
	}
}

func errString(err error) string {
	if err == nil {
		return "no error"
	}
	return err.Error()
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

func TestIndexAndManifest(t *testing.T) {
	ctx := context.Background()
	r, be := newTestRepo(t, EncryptionAESGCM)
	x, err := NewIndex(3*MinChunkSize+5, MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	if x.Len() != 4 {
		t.Fatalf("Len %d", x.Len())
	}
	if off, n := x.Range(3); off != 3*MinChunkSize || n != 5 {
		t.Fatalf("Range(3) = %d,%d", off, n)
	}
	x.Set(1, r.HashChunk([]byte("a")))
	xid, err := r.SaveIndex(ctx, x)
	if err != nil {
		t.Fatal(err)
	}
	y, err := r.LoadIndex(ctx, xid)
	if err != nil || !bytes.Equal(y.Encode(), x.Encode()) {
		t.Fatalf("index round trip: %v", err)
	}
	m := &Manifest{VM: "vm1", Time: time.Now().UTC(), Source: "image", Mode: "full",
		Disks: []ManifestDisk{{Name: "sda", Size: x.Size(), ChunkSize: x.ChunkSize(), Index: xid.String()}}}
	bid, err := r.SaveManifest(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	m2, err := r.LoadManifest(ctx, bid)
	if err != nil || m2.VM != "vm1" || m2.Disks[0].Index != xid.String() {
		t.Fatalf("manifest round trip: %v %+v", err, m2)
	}
	for _, p := range []string{bid.String()[:1], bid.String()[:8], strings.ToUpper(bid.String()[:8]), bid.String()} {
		if got, err := r.FindBackup(ctx, p); err != nil || got != bid {
			t.Errorf("FindBackup(%q) = %v, %v", p, got, err)
		}
	}
	if _, err := r.FindBackup(ctx, "zz"); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("FindBackup(zz): %v", err)
	}
	// Damage both blobs: loads fail with ErrCorrupt.
	for _, h := range []backend.Handle{{Kind: backend.KindIndexes, Name: xid.String()}, {Kind: backend.KindBackups, Name: bid.String()}} {
		d, _ := be.Get(ctx, h, 0, -1)
		d[len(d)/2] ^= 4
		be.Put(ctx, h, d)
	}
	if _, err := r.LoadIndex(ctx, xid); !errors.Is(err, errs.ErrCorrupt) {
		t.Errorf("damaged index: %v", err)
	}
	if _, err := r.LoadManifest(ctx, bid); !errors.Is(err, errs.ErrCorrupt) {
		t.Errorf("damaged manifest: %v", err)
	}
}

func TestConfigVersions(t *testing.T) {
	ctx := context.Background()
	_, be := newTestRepo(t, EncryptionAESGCM)
	raw, _ := be.Get(ctx, backend.Handle{Kind: backend.KindConfig, Name: "config"}, 0, -1)
	var c map[string]any
	json.Unmarshal(raw, &c)
	for _, tc := range []struct {
		v    any
		want error
	}{{2, errs.ErrUnsupported}, {0, errs.ErrCorrupt}, {"1", errs.ErrCorrupt}} {
		c["version"] = tc.v
		b, _ := json.Marshal(c)
		be.Put(ctx, backend.Handle{Kind: backend.KindConfig, Name: "config"}, b)
		_, err := Open(ctx, be, pw("secret"))
		if !errors.Is(err, tc.want) {
			t.Errorf("config version %v: %v, want %v", tc.v, err, tc.want)
		}
	}
	be.Delete(ctx, backend.Handle{Kind: backend.KindConfig, Name: "config"})
	if _, err := Open(ctx, be, pw("secret")); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("no config: %v", err)
	}
}

func TestLocks(t *testing.T) {
	ctx := context.Background()
	r, be := newTestRepo(t, EncryptionAESGCM)
	s1, _, err := r.Lock(ctx, false, "backup")
	if err != nil {
		t.Fatal(err)
	}
	s2, _, err := r.Lock(ctx, false, "backup")
	if err != nil {
		t.Fatal("two shared locks conflict:", err)
	}
	if _, _, err := r.Lock(ctx, true, "gc"); !errors.Is(err, errs.ErrBusy) || !strings.Contains(err.Error(), "backup") {
		t.Fatalf("exclusive over shared: %v", err)
	}
	s1.Unlock()
	s2.Unlock()
	x, _, err := r.Lock(ctx, true, "gc")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.Lock(ctx, false, "backup"); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("shared over exclusive: %v", err)
	}
	x.Unlock()
	x.Unlock()

	// A lock of a dead process on this host is stale at once.
	cmd := exec.Command("true")
	cmd.Run()
	dead := LockInfo{Version: 1, Exclusive: true, Op: "gc", Host: hostname(), PID: cmd.Process.Pid, Instance: pidInstance, Created: time.Now(), Refreshed: time.Now()}
	// The same PID in another PID namespace or boot is not judged.
	dead.Instance = "other-boot/pid:[1]"
	writeLock(t, r, "dead", dead)
	if _, _, err := r.Lock(ctx, false, "backup"); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("lock of a PID in another namespace: %v", err)
	}
	dead.Instance = pidInstance
	writeLock(t, r, "dead", dead)
	l, _, err := r.Lock(ctx, false, "backup")
	if err != nil {
		t.Fatalf("lock of a dead process blocks: %v", err)
	}
	l.Unlock()
	if _, err := be.Stat(ctx, backend.Handle{Kind: backend.KindLocks, Name: "dead"}); !backend.IsNotExist(err) {
		t.Error("stale lock not removed")
	}
	// A lock of another host is stale only after LockStale.
	other := LockInfo{Version: 1, Exclusive: true, Op: "gc", Host: "elsewhere", PID: os.Getpid(), Created: time.Now(), Refreshed: time.Now()}
	writeLock(t, r, "other", other)
	if _, _, err := r.Lock(ctx, false, "backup"); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("fresh lock of another host: %v", err)
	}
	other.Refreshed = time.Now().Add(-LockStale - time.Minute)
	writeLock(t, r, "other", other)
	l, _, err = r.Lock(ctx, false, "backup")
	if err != nil {
		t.Fatalf("old lock of another host blocks: %v", err)
	}
	l.Unlock()
	// An unreadable lock counts as exclusive until it is old.
	be.Put(ctx, backend.Handle{Kind: backend.KindLocks, Name: "garbage"}, []byte("garbage"))
	if _, _, err := r.Lock(ctx, false, "backup"); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("fresh unreadable lock: %v", err)
	}
	be.SetModTime(backend.Handle{Kind: backend.KindLocks, Name: "garbage"}, time.Now().Add(-2*LockStale))
	if l, _, err = r.Lock(ctx, false, "backup"); err != nil {
		t.Fatalf("old unreadable lock: %v", err)
	}
	l.Unlock()
}

func writeLock(t *testing.T, r *Repo, name string, li LockInfo) {
	t.Helper()
	p, _ := json.Marshal(li)
	if err := r.be.Put(context.Background(), backend.Handle{Kind: backend.KindLocks, Name: name}, r.codec.seal(nil, magicLock, name, p, false)); err != nil {
		t.Fatal(err)
	}
}

// lockNames lists the lock blobs.
func lockNames(t *testing.T, be backend.Backend) []backend.Info {
	t.Helper()
	var locks []backend.Info
	if err := be.List(context.Background(), backend.KindLocks, "", func(fi backend.Info) error { locks = append(locks, fi); return nil }); err != nil {
		t.Fatal(err)
	}
	return locks
}

func TestLockRefreshAndLoss(t *testing.T) {
	defer func(r, s time.Duration) { LockRefresh, LockStale = r, s }(LockRefresh, LockStale)
	LockRefresh, LockStale = 20*time.Millisecond, time.Second
	r, be := newTestRepo(t, EncryptionNone)
	l, lctx, err := r.Lock(context.Background(), false, "backup")
	if err != nil {
		t.Fatal(err)
	}
	first := lockNames(t, be)
	if len(first) != 1 {
		t.Fatalf("%d locks after Lock, want 1", len(first))
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		now := lockNames(t, be)
		if len(now) == 1 && now[0].Name != first[0].Name {
			if li, err := r.readLock(context.Background(), now[0]); err != nil || !li.Refreshed.After(li.Created) {
				t.Fatalf("refreshed lock %+v, %v: refresh time not later than creation", li, err)
			}
			break
		}
		// Two blobs: a refresh between writing the new one and removing
		// the old one; look again.
		if time.Now().After(deadline) {
			t.Fatal("lock not refreshed in 30 s (refresh every 20 ms)")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, fi := range lockNames(t, be) {
		be.Delete(context.Background(), backend.Handle{Kind: backend.KindLocks, Name: fi.Name})
	}
	select {
	case <-lctx.Done():
		if !errors.Is(context.Cause(lctx), errs.ErrBusy) {
			t.Errorf("cause %v", context.Cause(lctx))
		}
	case <-time.After(30 * time.Second): // refreshes every 20ms; generous for a loaded machine
		t.Error("removed lock did not cancel the operation")
	}
	l.Unlock()
	if n := len(lockNames(t, be)); n != 0 {
		t.Errorf("%d locks left after a lost lock was unlocked", n)
	}
}

// removeOnRefresh removes every lock blob but the one being written, once,
// when armed: another process removing the lock (thinking it stale) just as
// its holder refreshes it.
type removeOnRefresh struct {
	backend.Backend
	armed atomic.Bool
}

func (b *removeOnRefresh) Put(ctx context.Context, h backend.Handle, data []byte) error {
	if h.Kind == backend.KindLocks && b.armed.CompareAndSwap(true, false) {
		b.Backend.List(ctx, backend.KindLocks, "", func(fi backend.Info) error {
			return b.Backend.Delete(ctx, backend.Handle{Kind: backend.KindLocks, Name: fi.Name})
		})
	}
	return b.Backend.Put(ctx, h, data)
}

// TestLockRemovedDuringRefresh: a lock removed while its holder rewrites
// it is noticed, not resurrected (rewriting in place would bring it back
// fresh, and both processes would go on).
func TestLockRemovedDuringRefresh(t *testing.T) {
	defer func(r, s time.Duration) { LockRefresh, LockStale = r, s }(LockRefresh, LockStale)
	LockRefresh, LockStale = 20*time.Millisecond, time.Second
	be := &removeOnRefresh{Backend: mem.New()}
	r, err := Init(context.Background(), be, InitOptions{Encryption: EncryptionNone, ChunkSize: MinChunkSize})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	l, lctx, err := r.Lock(context.Background(), true, "prune")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Unlock()
	be.armed.Store(true)
	select {
	case <-lctx.Done():
		if !errors.Is(context.Cause(lctx), errs.ErrBusy) {
			t.Errorf("cause %v", context.Cause(lctx))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a lock removed during its refresh did not cancel the operation")
	}
	if n := len(lockNames(t, be)); n != 0 {
		t.Errorf("%d lock blobs left after the lock was lost, want 0", n)
	}
}

func TestInitFailures(t *testing.T) {
	ctx := context.Background()
	f := fault.New(mem.New())
	f.SetReadOnly(true)
	if _, err := Init(ctx, f, InitOptions{Password: []byte("x"), KDF: testKDF}); !errors.Is(err, backend.ErrReadOnly) {
		t.Errorf("init on read-only storage: %v", err)
	}
	if _, err := Init(ctx, mem.New(), InitOptions{KDF: testKDF}); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("init without password: %v", err)
	}
	if _, err := Init(ctx, mem.New(), InitOptions{Encryption: "rot13", Password: []byte("x"), KDF: testKDF}); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("init with unknown encryption: %v", err)
	}
	_, be := newTestRepo(t, EncryptionNone)
	if _, err := Init(ctx, be, InitOptions{Encryption: EncryptionNone}); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("init over a repository: %v", err)
	}
}

// TestLatestBackupSkipsCopies: a backup copied from another repository
// (Origin set) is never the previous backup of a live chain, even when it
// is the newest; a manifest with a malformed origin is corrupt.
func TestLatestBackupSkipsCopies(t *testing.T) {
	ctx := context.Background()
	r, _ := newTestRepo(t, EncryptionAESGCM)
	x, err := NewIndex(MinChunkSize, MinChunkSize)
	if err != nil {
		t.Fatal(err)
	}
	xid, err := r.SaveIndex(ctx, x)
	if err != nil {
		t.Fatal(err)
	}
	save := func(when time.Time, origin string) ID {
		t.Helper()
		m := &Manifest{VM: "vm1", Time: when, Source: "qemu", Mode: "full", Origin: origin,
			Disks: []ManifestDisk{{Name: "sda", Size: MinChunkSize, ChunkSize: MinChunkSize, Index: xid.String()}}}
		id, err := r.SaveManifest(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if _, err := r.LatestBackup(ctx, "vm1", nil); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("empty repository: %v, want ErrNotFound", err)
	}
	own := save(t0, "")
	save(t0.Add(time.Hour), strings.Repeat("ab", 32)) // a newer copy
	b, err := r.LatestBackup(ctx, "vm1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if b.ID != own {
		t.Fatalf("LatestBackup = %s (origin %q), want the repository's own backup %s", b.ID.Short(), b.Origin, own.Short())
	}
	if b.Identity() != own.String() {
		t.Fatalf("identity of an original = %s, want its ID", b.Identity())
	}
	m := &Manifest{Version: 1, VM: "vm1", Origin: "nothex",
		Disks: []ManifestDisk{{Name: "sda", Size: 1, ChunkSize: MinChunkSize, Index: xid.String()}}}
	if err := m.Check(); !errors.Is(err, errs.ErrCorrupt) {
		t.Fatalf("malformed origin: %v, want ErrCorrupt", err)
	}
}
