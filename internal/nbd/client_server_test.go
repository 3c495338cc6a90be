package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Our client against our server, in process, over real sockets.

func TestClientServerReadWrite(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	m := newMemExport(8<<20 + 4096) // not a multiple of the block size
	m.fill(rng, 0, 3, 4, 100, 128)
	_, sock, tcp := startServer(t, nil, map[string]Export{"disk": m}, nil)

	for _, uri := range []string{unixURI(sock, "disk"), "nbd://" + tcp + "/disk"} {
		t.Run(uri[:5], func(t *testing.T) {
			ctx := testCtx(t)
			c := dialT(t, uri, &Options{MetaContexts: []string{ContextBaseAllocation}})
			if c.Size() != m.Size() {
				t.Fatalf("size %d, want %d", c.Size(), m.Size())
			}
			want := FlagHasFlags | FlagCanMultiConn | FlagSendDF | FlagSendWriteZeroes | FlagSendFlush | FlagSendFUA | FlagSendTrim
			if c.Flags() != want {
				t.Fatalf("flags %v, want %v", c.Flags(), want)
			}
			if !c.StructuredReplies() || !slices.Equal(c.MetaContexts(), []string{ContextBaseAllocation}) {
				t.Fatalf("structured %v contexts %v", c.StructuredReplies(), c.MetaContexts())
			}
			got := make([]byte, c.Size())
			if n, err := c.ReadAt(ctx, got, 0); err != nil || n != len(got) {
				t.Fatalf("ReadAt: %d, %v", n, err)
			}
			if !bytes.Equal(got, m.snapshot()) {
				t.Fatal("data read differs from the export")
			}
			// a read across the end returns what there is and io.EOF
			buf := make([]byte, 8192)
			if n, err := c.ReadAt(ctx, buf, c.Size()-4096); n != 4096 || err != io.EOF {
				t.Fatalf("read across the end: %d, %v; want 4096, EOF", n, err)
			}
			if n, err := c.ReadAt(ctx, buf, c.Size()); n != 0 || err != io.EOF {
				t.Fatalf("read at the end: %d, %v; want 0, EOF", n, err)
			}
			// write, read back
			data := randBytes(rng, 3*memBlock+512)
			if n, err := c.WriteAt(ctx, data, 10*memBlock-512); err != nil || n != len(data) {
				t.Fatalf("WriteAt: %d, %v", n, err)
			}
			back := make([]byte, len(data))
			if _, err := c.ReadAt(ctx, back, 10*memBlock-512); err != nil || !bytes.Equal(back, data) {
				t.Fatalf("read back after write: %v (equal %v)", err, bytes.Equal(back, data))
			}
			if err := c.Flush(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
	if n := m.flushCount(); n != 2 {
		t.Errorf("export saw %d flushes, want 2", n)
	}
}

func TestClientServerZeroTrimBlockStatus(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	m := newMemExport(64 * memBlock)
	m.fill(rng, 0, 1, 2, 3, 10, 11, 40, 63)
	_, sock, _ := startServer(t, nil, map[string]Export{"": m}, nil)
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, ""), &Options{MetaContexts: []string{ContextBaseAllocation}})

	if err := c.WriteZeroes(ctx, 1*memBlock, 2*memBlock, true); err != nil { // punches blocks 1, 2
		t.Fatal(err)
	}
	if err := c.WriteZeroes(ctx, 10*memBlock, memBlock, false); err != nil { // zeroes, stays allocated
		t.Fatal(err)
	}
	if err := c.Trim(ctx, 63*memBlock, memBlock); err != nil {
		t.Fatal(err)
	}
	const H = StateHole | StateZero
	want := []Extent{
		{0, memBlock, 0}, {memBlock, 2 * memBlock, H}, {3 * memBlock, memBlock, 0},
		{4 * memBlock, 6 * memBlock, H}, {10 * memBlock, 2 * memBlock, 0},
		{12 * memBlock, 28 * memBlock, H}, {40 * memBlock, memBlock, 0}, {41 * memBlock, 23 * memBlock, H},
	}
	var got []Extent
	for e, err := range c.Extents(ctx, ContextBaseAllocation, 0, c.Size()) {
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, e)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("extents\n got %v\nwant %v", got, want)
	}
	// a sub-range, unaligned to the export's blocks
	exts, err := c.BlockStatus(ctx, ContextBaseAllocation, memBlock/2, 2*memBlock)
	if err != nil {
		t.Fatal(err)
	}
	if want := []Extent{{memBlock / 2, memBlock / 2, 0}, {memBlock, memBlock + memBlock/2, H}}; !slices.Equal(exts, want) {
		t.Fatalf("BlockStatus sub-range: %v, want %v", exts, want)
	}
	zero := make([]byte, memBlock)
	buf := make([]byte, memBlock)
	for _, b := range []int64{1, 2, 10, 63} {
		if _, err := c.ReadAt(ctx, buf, b*memBlock); err != nil || !bytes.Equal(buf, zero) {
			t.Fatalf("block %d not zero after zeroing (err %v)", b, err)
		}
	}
	if _, err := c.BlockStatus(ctx, "qemu:dirty-bitmap:x", 0, 4096); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("block status of an unselected context: %v, want a usage error", err)
	}
}

func TestClientServerConcurrent(t *testing.T) {
	const size = 16 << 20
	m := newMemExport(size)
	_, sock, _ := startServer(t, nil, map[string]Export{"d": m}, nil)
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, "d"), nil)
	var wg sync.WaitGroup
	errc := make(chan error, 64)
	for g := range 32 { // each goroutine owns a 512 KiB region
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			base := int64(g) * (size / 32)
			for i := range 20 {
				off := base + int64(rng.IntN(size/32/4096-16))*4096
				data := randBytes(rng, 4096*(1+rng.IntN(16)))
				if _, err := c.WriteAt(ctx, data, off); err != nil {
					errc <- err
					return
				}
				back := make([]byte, len(data))
				if _, err := c.ReadAt(ctx, back, off); err != nil {
					errc <- err
					return
				}
				if !bytes.Equal(back, data) {
					errc <- fmt.Errorf("goroutine %d round %d: data read back differs", g, i)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
}

func TestClientServerSplitsToMaxBlockSize(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	m := newMemExport(4 << 20)
	m.fill(rng, slices.Collect(func(yield func(int64) bool) {
		for i := int64(0); i < 64; i++ {
			if !yield(i) {
				return
			}
		}
	})...)
	_, sock, _ := startServer(t, &ServerOptions{MaxBlockSize: 64 << 10}, map[string]Export{"d": m}, nil)
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, "d"), nil)
	if bs := c.BlockSizes(); bs != (BlockSizes{1, 4096, 64 << 10}) {
		t.Fatalf("block sizes %+v", bs)
	}
	got := make([]byte, 4<<20)
	if _, err := c.ReadAt(ctx, got, 0); err != nil { // 64 requests of 64 KiB
		t.Fatal(err)
	}
	if !bytes.Equal(got, m.snapshot()) {
		t.Fatal("data differs")
	}
	data := randBytes(rng, 1<<20)
	if _, err := c.WriteAt(ctx, data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(m.snapshot()[1<<20:2<<20], data) {
		t.Fatal("written data differs")
	}
}

func TestClientServerReadOnly(t *testing.T) {
	m := newMemExport(1 << 20)
	_, sock, _ := startServer(t, nil, map[string]Export{"ro": m}, map[string]ExportOptions{"ro": {ReadOnly: true}})
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, "ro"), nil)
	if !c.Flags().Has(FlagReadOnly) || c.Flags().Has(FlagSendFlush) || c.Flags().Has(FlagSendTrim) {
		t.Fatalf("flags %v", c.Flags())
	}
	if _, err := c.WriteAt(ctx, make([]byte, 512), 0); !errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("write to read-only export: %v", err)
	}
	// make the client send the write anyway: the server must refuse it
	c.flags &^= FlagReadOnly
	_, err := c.WriteAt(ctx, []byte("x"), 0)
	var se *ServerError
	if !errors.As(err, &se) || se.Errno != EPERM {
		t.Fatalf("server accepted a write to a read-only export or failed oddly: %v", err)
	}
	if err := c.WriteZeroes(ctx, 0, 4096, false); !errors.Is(err, EPERM) {
		t.Fatalf("write zeroes to read-only export: %v", err)
	}
	// the connection is still usable
	if _, err := c.ReadAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
}

func TestClientServerErrors(t *testing.T) {
	m := newMemExport(1 << 20)
	m.readErr, m.readErrOff = fmt.Errorf("disk on fire: %w", errs.ErrNoSpace), 300<<10
	s, sock, _ := startServer(t, nil, map[string]Export{"d": m}, nil)
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, "d"), nil)
	_, err := c.ReadAt(ctx, make([]byte, 64<<10), 256<<10)
	var se *ServerError
	if !errors.As(err, &se) || se.Errno != ENOSPC || !errors.Is(err, errs.ErrNoSpace) || se.Offset != 256<<10 || se.Length != 64<<10 {
		t.Fatalf("read error: %#v", err)
	}
	if want := "disk on fire"; !bytes.Contains([]byte(se.Message), []byte(want)) {
		t.Fatalf("message %q lacks %q", se.Message, want)
	}
	if _, err := c.ReadAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatalf("connection unusable after a server error: %v", err)
	}

	// unknown export
	_, err = DialURI(ctx, unixURI(sock, "nope"), nil)
	var oe *OptionError
	if !errors.As(err, &oe) || !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("dial unknown export: %v", err)
	}
	// a meta context the server does not have
	_, err = DialURI(ctx, unixURI(sock, "d"), &Options{MetaContexts: []string{ContextDirtyBitmap("b0")}})
	if !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("dial with a missing dirty bitmap: %v", err)
	}
	// TLS asked for, server has none
	_, err = DialURI(ctx, "nbds+unix:///d?socket="+sock+"&tls-hostname=localhost", &Options{TLSConfig: testTLS(t).clientConfig()})
	if !errors.As(err, &oe) || oe.Option != "NBD_OPT_STARTTLS" {
		t.Fatalf("TLS against a plain server: %v", err)
	}

	exports, err := List(ctx, Target{Network: "unix", Address: sock}, nil)
	if err != nil || len(exports) != 1 || exports[0].Name != "d" {
		t.Fatalf("List: %v, %v", exports, err)
	}
	ctxs, err := ListMetaContexts(ctx, Target{Network: "unix", Address: sock, Export: "d"}, nil)
	if err != nil || !slices.Equal(ctxs, []string{ContextBaseAllocation}) {
		t.Fatalf("ListMetaContexts: %v, %v", ctxs, err)
	}
	_ = s
}

func TestClientCancel(t *testing.T) {
	m := newMemExport(1 << 20)
	m.readDelay = 3 * time.Second
	_, sock, _ := startServer(t, nil, map[string]Export{"d": m}, nil)
	c := dialT(t, unixURI(sock, "d"), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.ReadAt(ctx, make([]byte, 64<<10), 0)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled read: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("cancelled read returned after %v", d)
	}
	// The abandoned reply arrives later and is discarded; the connection is
	// still usable.
	m.mu.Lock()
	m.readDelay = 0
	m.mu.Unlock()
	if _, err := c.ReadAt(testCtx(t), make([]byte, 4096), 0); err != nil {
		t.Fatalf("read after a cancelled read: %v", err)
	}
}

func TestServerShutdownFinishesInFlight(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	m := newMemExport(1 << 20)
	m.fill(rng, 0, 1)
	m.readDelay = 300 * time.Millisecond
	s, sock, _ := startServer(t, nil, map[string]Export{"d": m}, nil)
	c := dialT(t, unixURI(sock, "d"), nil)
	ctx := testCtx(t)
	errc := make(chan error, 4)
	bufs := make([][]byte, 4)
	for i := range bufs {
		bufs[i] = make([]byte, 32<<10)
		go func() { _, err := c.ReadAt(ctx, bufs[i], int64(i)*32<<10); errc <- err }()
	}
	time.Sleep(100 * time.Millisecond) // requests are in the server
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	for range bufs {
		if err := <-errc; err != nil {
			t.Fatalf("request in flight at shutdown failed: %v", err)
		}
	}
	if !bytes.Equal(slices.Concat(bufs...), m.snapshot()[:128<<10]) {
		t.Fatal("data of requests in flight at shutdown differs")
	}
	if _, err := c.ReadAt(ctx, make([]byte, 4096), 0); !errors.Is(err, errs.ErrConnect) {
		t.Fatalf("read after server shutdown: %v, want a connection error", err)
	}
	if _, err := DialURI(ctx, unixURI(sock, "d"), nil); err == nil {
		t.Fatal("dial after shutdown succeeded")
	}
}

func TestClientCloseFailsLaterCalls(t *testing.T) {
	m := newMemExport(1 << 20)
	_, sock, _ := startServer(t, nil, map[string]Export{"d": m}, nil)
	c := dialT(t, unixURI(sock, "d"), nil)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(testCtx(t), make([]byte, 512), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestPool(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	m := newMemExport(8 << 20)
	for b := int64(0); b < 128; b += 3 {
		m.fill(rng, b)
	}
	_, sock, _ := startServer(t, nil, map[string]Export{"d": m}, nil)
	ctx := testCtx(t)
	tgt, _ := ParseURI(unixURI(sock, "d"))
	p, err := DialPool(ctx, tgt, 4, &Options{MetaContexts: []string{ContextBaseAllocation}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.Conns() != 4 {
		t.Fatalf("%d connections, want 4 (server advertises multi-conn)", p.Conns())
	}
	got := make([]byte, p.Size())
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.ReadAt(ctx, got[i<<20:(i+1)<<20], int64(i)<<20); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if !bytes.Equal(got, m.snapshot()) {
		t.Fatal("pool read differs")
	}
	var n int
	for e, err := range p.Extents(ctx, ContextBaseAllocation, 0, p.Size()) {
		if err != nil {
			t.Fatal(err)
		}
		n++
		if e.Flags == 0 && e.Length != memBlock {
			t.Fatalf("data extent %v, want one block", e)
		}
	}
	if n != 2*43 { // blocks 0, 3, ..., 126 hold data, the rest are holes
		t.Fatalf("%d extents, want %d", n, 2*43)
	}
}
