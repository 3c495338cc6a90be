// Package backendtest owns the test suite every repository backend must
// pass: Run(t, factory) checks the backend.Backend contract (atomic replace,
// ranged reads, listing by kind and prefix, not-found errors, name checks,
// concurrency, cancellation).
package backendtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Factory returns a new, empty backend for one subtest.
type Factory func(t *testing.T) backend.Backend

// Run runs the suite against backends made by factory. The backends of
// one Run may share storage (a bucket) as long as each is empty when made.
func Run(t *testing.T, factory Factory) {
	tests := []struct {
		name string
		fn   func(t *testing.T, b backend.Backend)
	}{
		{"PutGet", testPutGet},
		{"RangedGet", testRangedGet},
		{"NotFound", testNotFound},
		{"Replace", testReplace},
		{"Stat", testStat},
		{"List", testList},
		{"ListStops", testListStops},
		{"Delete", testDelete},
		{"InvalidHandles", testInvalid},
		{"NoAliasing", testNoAliasing},
		{"Cancelled", testCancelled},
		{"ConcurrentReplace", testConcurrentReplace},
		{"Large", testLarge},
		{"Consistency", testConsistency},
		{"Quarantine", testQuarantine},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := factory(t)
			defer b.Close()
			tc.fn(t, b)
		})
	}
}

func h(k backend.Kind, n string) backend.Handle { return backend.Handle{Kind: k, Name: n} }

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func mustPut(t *testing.T, b backend.Backend, hd backend.Handle, data []byte) {
	t.Helper()
	if err := b.Put(context.Background(), hd, data); err != nil {
		t.Fatalf("Put %s: %v", hd, err)
	}
}

func mustGet(t *testing.T, b backend.Backend, hd backend.Handle) []byte {
	t.Helper()
	d, err := b.Get(context.Background(), hd, 0, -1)
	if err != nil {
		t.Fatalf("Get %s: %v", hd, err)
	}
	return d
}

func testPutGet(t *testing.T, b backend.Backend) {
	r := rand.New(rand.NewPCG(1, 2))
	cases := map[backend.Handle][]byte{
		h(backend.KindConfig, "config"):     []byte(`{"v":1}`),
		h(backend.KindKeys, "k1"):           randBytes(r, 100),
		h(backend.KindChunks, "ab12"):       randBytes(r, 5000),
		h(backend.KindChunks, "a"):          randBytes(r, 1),
		h(backend.KindIndexes, "0f"):        randBytes(r, 64),
		h(backend.KindBackups, "ff00"):      {},
		h(backend.KindLocks, "lock_1-2"):    []byte("x"),
		h(backend.KindChunks, "00"+"ab"):    randBytes(r, 10),
		h(backend.KindBackups, "same-name"): []byte("backup"),
		h(backend.KindIndexes, "same-name"): []byte("index"),
	}
	for hd, d := range cases {
		mustPut(t, b, hd, d)
	}
	for hd, d := range cases {
		if got := mustGet(t, b, hd); !bytes.Equal(got, d) {
			t.Errorf("Get %s: got %d bytes, want %d equal bytes", hd, len(got), len(d))
		}
	}
}

func testRangedGet(t *testing.T, b backend.Backend) {
	data := randBytes(rand.New(rand.NewPCG(3, 4)), 1000)
	hd := h(backend.KindChunks, "range")
	mustPut(t, b, hd, data)
	for _, c := range []struct{ off, n int64 }{{0, 10}, {990, 10}, {500, -1}, {1000, 0}, {0, 1000}, {1000, -1}} {
		got, err := b.Get(context.Background(), hd, c.off, c.n)
		if err != nil {
			t.Fatalf("Get(%d,%d): %v", c.off, c.n, err)
		}
		end := c.off + c.n
		if c.n < 0 {
			end = 1000
		}
		if !bytes.Equal(got, data[c.off:end]) {
			t.Errorf("Get(%d,%d): wrong bytes", c.off, c.n)
		}
	}
	for _, c := range []struct{ off, n int64 }{{990, 11}, {1001, -1}, {-1, 5}, {2000, 1}} {
		got, err := b.Get(context.Background(), hd, c.off, c.n)
		if err == nil {
			t.Errorf("Get(%d,%d) past the end returned %d bytes and no error", c.off, c.n, len(got))
		} else if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("Get(%d,%d) past the end: error %v does not wrap io.ErrUnexpectedEOF", c.off, c.n, err)
		}
	}
}

func testNotFound(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	hd := h(backend.KindChunks, "missing")
	mustPut(t, b, h(backend.KindIndexes, "missing"), []byte("other kind"))
	if _, err := b.Get(ctx, hd, 0, -1); !backend.IsNotExist(err) || !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("Get of missing blob: %v, want ErrNotExist", err)
	}
	if _, err := b.Stat(ctx, hd); !backend.IsNotExist(err) {
		t.Errorf("Stat of missing blob: %v, want ErrNotExist", err)
	}
	if err := b.Delete(ctx, hd); err != nil && !backend.IsNotExist(err) {
		t.Errorf("Delete of missing blob: %v, want nil or ErrNotExist", err)
	}
	if _, err := b.Stat(ctx, hd); !backend.IsNotExist(err) {
		t.Errorf("Stat after Delete of missing blob: %v, want ErrNotExist", err)
	}
	if _, err := b.Stat(ctx, h(backend.KindIndexes, "missing")); err != nil {
		t.Errorf("Delete of a missing chunk touched the index of that name: %v", err)
	}
}

func testReplace(t *testing.T, b backend.Backend) {
	hd := h(backend.KindLocks, "l1")
	mustPut(t, b, hd, []byte("first version, longer"))
	mustPut(t, b, hd, []byte("second"))
	if got := mustGet(t, b, hd); string(got) != "second" {
		t.Fatalf("after replace got %q", got)
	}
	n := 0
	b.List(context.Background(), backend.KindLocks, "", func(backend.Info) error { n++; return nil })
	if n != 1 {
		t.Fatalf("after replace List shows %d blobs, want 1", n)
	}
}

func testStat(t *testing.T, b backend.Backend) {
	before := time.Now().Add(-2 * time.Second)
	hd := h(backend.KindBackups, "s1")
	mustPut(t, b, hd, make([]byte, 1234))
	fi, err := b.Stat(context.Background(), hd)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size != 1234 || fi.Name != "s1" {
		t.Errorf("Stat = %+v, want size 1234 name s1", fi)
	}
	if fi.ModTime.Before(before) || fi.ModTime.After(time.Now().Add(2*time.Second)) {
		t.Errorf("Stat mod time %v is not about now", fi.ModTime)
	}
}

func collect(t *testing.T, b backend.Backend, k backend.Kind, prefix string) []string {
	t.Helper()
	var names []string
	err := b.List(context.Background(), k, prefix, func(fi backend.Info) error {
		names = append(names, fi.Name)
		if fi.Size < 0 {
			t.Errorf("List %s: negative size", fi.Name)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("List %s %q: %v", k, prefix, err)
	}
	sort.Strings(names)
	return names
}

func testList(t *testing.T, b backend.Backend) {
	if got := collect(t, b, backend.KindChunks, ""); len(got) != 0 {
		t.Fatalf("empty backend lists %v", got)
	}
	var want []string
	for i := range 300 {
		n := fmt.Sprintf("%02x%04d", i%256, i)
		mustPut(t, b, h(backend.KindChunks, n), []byte{byte(i)})
		want = append(want, n)
	}
	mustPut(t, b, h(backend.KindChunks, "z"), []byte("short name"))
	if err := b.Sync(context.Background()); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	want = append(want, "z")
	mustPut(t, b, h(backend.KindIndexes, "0a0001"), []byte("index"))
	sort.Strings(want)
	if got := collect(t, b, backend.KindChunks, ""); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("List chunks: got %d names, want %d", len(got), len(want))
	}
	for _, p := range []string{"0", "0a", "0a0", "0a0010", "z", "zz", "q"} {
		var w []string
		for _, n := range want {
			if len(n) >= len(p) && n[:len(p)] == p {
				w = append(w, n)
			}
		}
		if got := collect(t, b, backend.KindChunks, p); fmt.Sprint(got) != fmt.Sprint(w) {
			t.Errorf("List chunks prefix %q: got %v, want %v", p, got, w)
		}
	}
	if got := collect(t, b, backend.KindIndexes, ""); fmt.Sprint(got) != "[0a0001]" {
		t.Errorf("List indexes: %v", got)
	}
}

func testListStops(t *testing.T, b backend.Backend) {
	for i := range 5 {
		mustPut(t, b, h(backend.KindBackups, fmt.Sprint(i)), nil)
	}
	stop := errors.New("stop")
	n := 0
	err := b.List(context.Background(), backend.KindBackups, "", func(backend.Info) error { n++; return stop })
	if !errors.Is(err, stop) || n != 1 {
		t.Errorf("List with failing callback: err %v after %d calls, want stop after 1", err, n)
	}
}

func testDelete(t *testing.T, b backend.Backend) {
	hd := h(backend.KindChunks, "dd01")
	mustPut(t, b, hd, []byte("x"))
	if err := b.Delete(context.Background(), hd); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stat(context.Background(), hd); !backend.IsNotExist(err) {
		t.Errorf("Stat after Delete: %v", err)
	}
	if got := collect(t, b, backend.KindChunks, ""); len(got) != 0 {
		t.Errorf("List after Delete: %v", got)
	}
}

func testInvalid(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	for _, hd := range []backend.Handle{
		h(backend.KindChunks, ""), h(backend.KindChunks, "../config"), h(backend.KindChunks, "a/b"),
		h(backend.KindChunks, "ABC"), h(backend.KindChunks, "."), h("other", "x"),
	} {
		if err := b.Put(ctx, hd, []byte("x")); err == nil {
			t.Errorf("Put %q accepted", hd)
		}
		if _, err := b.Get(ctx, hd, 0, -1); err == nil {
			t.Errorf("Get %q accepted", hd)
		}
	}
}

func testNoAliasing(t *testing.T, b backend.Backend) {
	hd := h(backend.KindChunks, "alias")
	d := []byte("original")
	mustPut(t, b, hd, d)
	copy(d, "CHANGED!")
	got := mustGet(t, b, hd)
	if string(got) != "original" {
		t.Fatalf("blob changed with caller's buffer: %q", got)
	}
	copy(got, "CHANGED!")
	if string(mustGet(t, b, hd)) != "original" {
		t.Fatal("blob changed with returned buffer")
	}
}

func testCancelled(t *testing.T, b backend.Backend) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.Put(ctx, h(backend.KindChunks, "cancelled"), []byte("x")); err == nil {
		t.Fatal("Put with cancelled context succeeded")
	}
	if _, err := b.Stat(context.Background(), h(backend.KindChunks, "cancelled")); !backend.IsNotExist(err) {
		t.Fatalf("cancelled Put left a blob: %v", err)
	}
}

// testConcurrentReplace checks atomicity: readers racing with writers see
// one complete version, never a mix or a part.
func testConcurrentReplace(t *testing.T, b backend.Backend) {
	hd := h(backend.KindLocks, "race")
	versions := make([][]byte, 4)
	for i := range versions {
		versions[i] = bytes.Repeat([]byte{byte('a' + i)}, 64<<10+i)
	}
	mustPut(t, b, hd, versions[0])
	var wg sync.WaitGroup
	errc := make(chan error, 100)
	for w := range 3 {
		wg.Go(func() {
			for i := range 10 {
				if err := b.Put(context.Background(), hd, versions[(w+i)%4]); err != nil {
					errc <- err
					return
				}
			}
		})
		wg.Go(func() {
			for range 20 {
				d, err := b.Get(context.Background(), hd, 0, -1)
				if err != nil {
					errc <- err
					return
				}
				ok := false
				for _, v := range versions {
					ok = ok || bytes.Equal(d, v)
				}
				if !ok {
					errc <- fmt.Errorf("reader saw a torn blob of %d bytes", len(d))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
}

func testLarge(t *testing.T, b backend.Backend) {
	d := randBytes(rand.New(rand.NewPCG(5, 6)), 9<<20)
	hd := h(backend.KindChunks, "big")
	mustPut(t, b, hd, d)
	if got := mustGet(t, b, hd); !bytes.Equal(got, d) {
		t.Fatal("9 MiB blob differs")
	}
	got, err := b.Get(context.Background(), hd, 8<<20, 4096)
	if err != nil || !bytes.Equal(got, d[8<<20:8<<20+4096]) {
		t.Fatalf("ranged read in large blob: %v", err)
	}
}

// testConsistency checks what the ordering rules and the locks need from
// the storage: a Put is seen at once by Get, Stat and List, a replacing Put
// at once by Get and Stat, a Delete at once by Stat, Get and List; with
// several writers at a time, as in a backup.
func testConsistency(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	r := rand.New(rand.NewPCG(7, 8))
	listed := func(k backend.Kind, name string) bool {
		found := false
		err := b.List(ctx, k, name, func(fi backend.Info) error {
			found = found || fi.Name == name
			return nil
		})
		if err != nil {
			t.Errorf("List %s %s: %v", k, name, err)
		}
		return found
	}
	var wg sync.WaitGroup
	errc := make(chan error, 64)
	for w := range 4 {
		v1, v2 := randBytes(r, 1000+w), randBytes(r, 3000+w)
		wg.Go(func() {
			for i := range 8 {
				hd := h(backend.KindLocks, fmt.Sprintf("cons%d-%d", w, i))
				if err := b.Put(ctx, hd, v1); err != nil {
					errc <- err
					return
				}
				if d, err := b.Get(ctx, hd, 0, -1); err != nil || !bytes.Equal(d, v1) {
					errc <- fmt.Errorf("right after Put, Get %s: %d bytes, %v", hd, len(d), err)
				}
				if !listed(hd.Kind, hd.Name) {
					errc <- fmt.Errorf("right after Put, List misses %s", hd)
				}
				if err := b.Put(ctx, hd, v2); err != nil {
					errc <- err
					return
				}
				if fi, err := b.Stat(ctx, hd); err != nil || fi.Size != int64(len(v2)) {
					errc <- fmt.Errorf("right after a replacing Put, Stat %s: %+v, %v", hd, fi, err)
				}
				if d, err := b.Get(ctx, hd, 0, -1); err != nil || !bytes.Equal(d, v2) {
					errc <- fmt.Errorf("right after a replacing Put, Get %s: %d bytes, %v", hd, len(d), err)
				}
				if err := b.Delete(ctx, hd); err != nil {
					errc <- err
					return
				}
				if _, err := b.Stat(ctx, hd); !backend.IsNotExist(err) {
					errc <- fmt.Errorf("right after Delete, Stat %s: %v", hd, err)
				}
				if _, err := b.Get(ctx, hd, 0, -1); !backend.IsNotExist(err) {
					errc <- fmt.Errorf("right after Delete, Get %s: %v", hd, err)
				}
				if listed(hd.Kind, hd.Name) {
					errc <- fmt.Errorf("right after Delete, List shows %s", hd)
				}
			}
		})
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
}

// testQuarantine: a chunk and its quarantined copy share a name but not a
// blob: listing, reading and deleting one leaves the other (the repository
// moves damaged chunks aside this way).
func testQuarantine(t *testing.T, b backend.Backend) {
	ctx := context.Background()
	name := "ab" + fmt.Sprintf("%062x", 7)
	c, q := h(backend.KindChunks, name), h(backend.KindQuarantine, name)
	mustPut(t, b, c, []byte("damaged chunk"))
	mustPut(t, b, q, mustGet(t, b, c))
	mustPut(t, b, h(backend.KindQuarantine, "cd"+name[2:]), nil) // a missing chunk's record
	if err := b.Delete(ctx, c); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Stat(ctx, c); !backend.IsNotExist(err) {
		t.Fatalf("chunk still there after moving it aside: %v", err)
	}
	if got := mustGet(t, b, q); string(got) != "damaged chunk" {
		t.Fatalf("quarantined copy: %q", got)
	}
	var names []string
	if err := b.List(ctx, backend.KindQuarantine, "", func(fi backend.Info) error { names = append(names, fi.Name); return nil }); err != nil {
		t.Fatal(err)
	}
	sort.Strings(names)
	if len(names) != 2 || names[0] != name {
		t.Fatalf("quarantine lists %v", names)
	}
	n := 0
	b.List(ctx, backend.KindChunks, "", func(backend.Info) error { n++; return nil })
	if n != 0 {
		t.Fatalf("%d chunks listed; the quarantine leaks into chunks", n)
	}
}
