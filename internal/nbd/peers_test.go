package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// The client against real servers: qemu-nbd, nbdkit and QEMU's built-in
// NBD server. Data is compared byte for byte with the image files, extents
// with layouts the tests made.

const (
	KiB = int64(1) << 10
	MiB = int64(1) << 20
)

func TestQemuNBDRawReadOnly(t *testing.T) {
	needCmd(t, "qemu-nbd")
	layout := [][2]int64{{0, 64 * KiB}, {1 * MiB, 3 * MiB}, {5*MiB + 128*KiB, 5*MiB + 192*KiB}, {63 * MiB, 64 * MiB}}
	path, want := sparseFile(t, t.TempDir(), 64*MiB, 1, layout...)
	sock := qemuNBD(t, path, "--format=raw", "--read-only", "--shared=8", "--export-name=disk", "--description=test disk")
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, "disk"), &Options{MetaContexts: []string{ContextBaseAllocation}})
	if c.Size() != 64*MiB || !c.Flags().Has(FlagReadOnly) || !c.StructuredReplies() {
		t.Fatalf("size %d flags %v structured %v", c.Size(), c.Flags(), c.StructuredReplies())
	}
	if got := readAll(t, ctx, c, 4<<20); !bytes.Equal(got, want) {
		t.Fatal("data read through qemu-nbd differs from the file")
	}
	// odd sizes and offsets too
	for _, r := range [][2]int64{{512, 4096}, {1*MiB - 512, 8192}, {64*MiB - 1024, 1024}, {3 * MiB, 33 * MiB}} {
		buf := make([]byte, r[1])
		if _, err := c.ReadAt(ctx, buf, r[0]); err != nil || !bytes.Equal(buf, want[r[0]:r[0]+r[1]]) {
			t.Fatalf("read %d at %d: %v", r[1], r[0], err)
		}
	}
	got := collectExtents(t, ctx, c, ContextBaseAllocation)
	if exp := extentsOf(64*MiB, 0, StateHole|StateZero, layout...); !slices.Equal(got, exp) {
		t.Fatalf("base:allocation\n got %v\nwant %v", got, exp)
	}
	if _, err := c.WriteAt(ctx, []byte{1}, 0); !errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("write to read-only qemu-nbd export: %v", err)
	}
	list, err := List(ctx, Target{Network: "unix", Address: sock}, nil)
	if err != nil || len(list) != 1 || list[0] != (ExportInfo{"disk", "test disk"}) {
		t.Fatalf("List: %v %v", list, err)
	}
	// several connections: qemu-nbd allows it for read-only exports
	p, err := DialPool(ctx, Target{Network: "unix", Address: sock, Export: "disk"}, 4, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.Conns() != 4 {
		t.Fatalf("pool has %d connections, want 4", p.Conns())
	}
	if got := readAll(t, ctx, p, 1<<20); !bytes.Equal(got, want) {
		t.Fatal("data read through the pool differs")
	}
}

func TestQemuNBDTCP(t *testing.T) {
	needCmd(t, "qemu-nbd")
	path, want := sparseFile(t, t.TempDir(), 8*MiB, 2, [2]int64{0, 8 * MiB})
	port := freePort(t)
	startDaemon(t, "tcp", "127.0.0.1:"+itoa(port), "qemu-nbd", "--persistent", "--bind=127.0.0.1", "--port="+itoa(port), "--format=raw", "--read-only", path)
	c := dialT(t, "nbd://127.0.0.1:"+itoa(port), nil)
	if got := readAll(t, testCtx(t), c, 4<<20); !bytes.Equal(got, want) {
		t.Fatal("data read over TCP differs")
	}
}

func TestQemuNBDQcow2Writes(t *testing.T) {
	needCmd(t, "qemu-nbd", "qemu-img")
	img := filepath.Join(t.TempDir(), "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
	sock := qemuNBD(t, img, "--format=qcow2", "--cache=writeback")
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, ""), &Options{MetaContexts: []string{ContextBaseAllocation}})
	f := c.Flags()
	if f.Has(FlagReadOnly) || !f.Has(FlagSendFlush) || !f.Has(FlagSendTrim) || !f.Has(FlagSendWriteZeroes) {
		t.Fatalf("flags %v", f)
	}
	want := make([]byte, 32*MiB)
	rng := newRand(3)
	write := func(off int64, n int) {
		data := randBytes(rng, n)
		if _, err := c.WriteAt(ctx, data, off); err != nil {
			t.Fatalf("write %d at %d: %v", n, off, err)
		}
		copy(want[off:], data)
	}
	write(0, 64<<10)
	write(1*MiB, 2<<20)
	write(7*MiB+512, 1000) // sub-cluster and unaligned to 4 KiB: qemu-nbd's minimum block is 1
	write(20*MiB, 40<<20/4)
	if err := c.WriteZeroes(ctx, 1*MiB+64*KiB, 64*KiB, true); err != nil {
		t.Fatal(err)
	}
	clear(want[1*MiB+64*KiB : 1*MiB+128*KiB])
	if err := c.WriteZeroes(ctx, 2*MiB, 128*KiB, false); err != nil {
		t.Fatal(err)
	}
	clear(want[2*MiB : 2*MiB+128*KiB])
	if err := c.Trim(ctx, 25*MiB, 1*MiB); err != nil { // contents undefined afterwards: overwrite
		t.Fatal(err)
	}
	write(25*MiB, 1<<20)
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, ctx, c, 1<<20); !bytes.Equal(got, want) {
		t.Fatal("data read back through qemu-nbd differs from what was written")
	}
	// unwritten clusters are holes; written ones are data
	for _, e := range collectExtents(t, ctx, c, ContextBaseAllocation) {
		zero := !slices.ContainsFunc(want[e.Offset:e.End()], func(b byte) bool { return b != 0 })
		if e.Flags&StateZero != 0 && !zero {
			t.Fatalf("extent %v reported zero but holds data", e)
		}
	}
	c.Close()
	if got := imageContents(t, img, "qcow2"); !bytes.Equal(got, want) {
		t.Fatal("image contents after the writes differ")
	}
	run(t, "qemu-img", "check", "-U", img)
}

// TestQemuNBDDirtyBitmap checks qemu:dirty-bitmap extents exactly: a
// persistent bitmap added to a qcow2, writes made with qemu-io, served with
// qemu-nbd -B.
func TestQemuNBDDirtyBitmap(t *testing.T) {
	needCmd(t, "qemu-nbd", "qemu-img", "qemu-io")
	img := filepath.Join(t.TempDir(), "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x01 0 4M", img) // before the bitmap: not dirty
	run(t, "qemu-img", "bitmap", "--add", "--enable", "-g", "65536", img, "b0")
	run(t, "qemu-io", "-f", "qcow2",
		"-c", "write -P 0x11 1M 4k", // one granule
		"-c", "write -P 0x22 10M 128k", // two granules
		"-c", "write -P 0x33 20971620 10", // inside the granule at 20M
		"-c", "write -P 0x44 33550336 8192", // 32M-4k: across the granule boundary at 32M
		"-c", "write -z 40M 64k", // zeroing marks dirty too
		img)
	dirty := [][2]int64{{1 * MiB, 1*MiB + 64*KiB}, {10 * MiB, 10*MiB + 128*KiB}, {20 * MiB, 20*MiB + 64*KiB},
		{32*MiB - 64*KiB, 32*MiB + 64*KiB}, {40 * MiB, 40*MiB + 64*KiB}}
	want := imageContents(t, img, "qcow2")

	sock := qemuNBD(t, img, "--format=qcow2", "--read-only", "--shared=4", "--bitmap=b0", "--allocation-depth")
	ctx := testCtx(t)
	names, err := ListMetaContexts(ctx, Target{Network: "unix", Address: sock}, nil, "qemu:")
	if err != nil || !slices.Contains(names, ContextDirtyBitmap("b0")) || !slices.Contains(names, ContextAllocationDepth) {
		t.Fatalf("ListMetaContexts: %v, %v", names, err)
	}
	c := dialT(t, unixURI(sock, ""), &Options{MetaContexts: []string{ContextBaseAllocation, ContextDirtyBitmap("b0"), ContextAllocationDepth}})
	got := collectExtents(t, ctx, c, ContextDirtyBitmap("b0"))
	if exp := extentsOf(64*MiB, StateDirty, 0, dirty...); !slices.Equal(got, exp) {
		t.Fatalf("dirty extents\n got %v\nwant %v", got, exp)
	}
	// Allocation depth: 1 for clusters the qcow2 holds (including the zero
	// cluster), 0 for unallocated ones.
	allocated := [][2]int64{{0, 4 * MiB}, {10 * MiB, 10*MiB + 128*KiB}, {20 * MiB, 20*MiB + 64*KiB},
		{32*MiB - 64*KiB, 32*MiB + 64*KiB}, {40 * MiB, 40*MiB + 64*KiB}}
	if got, exp := collectExtents(t, ctx, c, ContextAllocationDepth), extentsOf(64*MiB, 1, 0, allocated...); !slices.Equal(got, exp) {
		t.Fatalf("allocation depth\n got %v\nwant %v", got, exp)
	}
	// read only the dirty extents, as an incremental backup does
	for e, err := range c.Extents(ctx, ContextDirtyBitmap("b0"), 0, c.Size()) {
		if err != nil {
			t.Fatal(err)
		}
		if e.Flags&StateDirty == 0 {
			continue
		}
		buf := make([]byte, e.Length)
		if _, err := c.ReadAt(ctx, buf, e.Offset); err != nil || !bytes.Equal(buf, want[e.Offset:e.End()]) {
			t.Fatalf("dirty extent %v: %v", e, err)
		}
	}
	if got := readAll(t, ctx, c, 4<<20); !bytes.Equal(got, want) {
		t.Fatal("data differs from the image")
	}
	if _, err := DialURI(ctx, unixURI(sock, ""), &Options{MetaContexts: []string{ContextDirtyBitmap("nope")}}); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("missing bitmap: %v", err)
	}
}

// TestQEMUBuiltinServer uses QEMU's own NBD server (nbd-server-start and
// block-export-add over QMP), with a dirty bitmap added over QMP and writes
// made with HMP qemu-io.
func TestQEMUBuiltinServer(t *testing.T) {
	needCmd(t, "qemu-system-x86_64", "qemu-img")
	dir := shortTempDir(t)
	img := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	q := startQEMU(t, "-machine", "none")
	q.cmd("blockdev-add", map[string]any{"driver": "qcow2", "node-name": "disk0",
		"file": map[string]any{"driver": "file", "filename": img}})
	q.hmp(`qemu-io disk0 "write -P 0x5a 0 1M"`, "ops/sec")
	q.cmd("block-dirty-bitmap-add", map[string]any{"node": "disk0", "name": "b1", "granularity": 65536})
	out := q.hmp(`qemu-io disk0 "write -P 0xa5 5M 100k"`, "ops/sec")
	if !strings.Contains(out, "wrote 102400/102400") {
		t.Fatalf("qemu-io: %s", out)
	}
	q.cmd("block-dirty-bitmap-disable", map[string]any{"node": "disk0", "name": "b1"}) // read-only exports need a frozen bitmap
	sock := filepath.Join(dir, "nbd.sock")
	q.cmd("nbd-server-start", map[string]any{"addr": map[string]any{"type": "unix", "data": map[string]any{"path": sock}}})
	q.cmd("block-export-add", map[string]any{"type": "nbd", "id": "e0", "node-name": "disk0", "name": "shadow",
		"writable": false, "bitmaps": []string{"b1"}})
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, "shadow"), &Options{MetaContexts: []string{ContextBaseAllocation, ContextDirtyBitmap("b1")}})
	want := make([]byte, 16*MiB)
	copy(want, bytes.Repeat([]byte{0x5a}, int(MiB)))
	copy(want[5*MiB:], bytes.Repeat([]byte{0xa5}, 100*1024))
	if got := readAll(t, ctx, c, 4<<20); !bytes.Equal(got, want) {
		t.Fatal("data read from QEMU's NBD server differs")
	}
	if got, exp := collectExtents(t, ctx, c, ContextDirtyBitmap("b1")), extentsOf(16*MiB, StateDirty, 0, [2]int64{5 * MiB, 5*MiB + 128*KiB}); !slices.Equal(got, exp) {
		t.Fatalf("dirty extents\n got %v\nwant %v", got, exp)
	}
	alloc := collectExtents(t, ctx, c, ContextBaseAllocation)
	if alloc[0].Flags != 0 || alloc[0].Length < MiB || alloc[len(alloc)-1].Flags&StateHole == 0 {
		t.Fatalf("base:allocation %v", alloc)
	}
}

func TestNbdkitMemoryWrites(t *testing.T) {
	sock := nbdkit(t, "memory", "size=64M")
	ctx := testCtx(t)
	tgt := Target{Network: "unix", Address: sock}
	p, err := DialPool(ctx, tgt, 4, &Options{MetaContexts: []string{ContextBaseAllocation}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.Conns() != 4 || !p.Flags().Has(FlagCanMultiConn) {
		t.Fatalf("pool: %d connections, flags %v", p.Conns(), p.Flags())
	}
	rng := newRand(4)
	want := make([]byte, 64*MiB)
	errc := make(chan error, 16)
	for i := range 16 { // concurrent writes over four connections
		data := randBytes(rng, 1<<20)
		copy(want[int64(i)*4*MiB:], data)
		go func() { _, err := p.WriteAt(ctx, data, int64(i)*4*MiB); errc <- err }()
	}
	for range 16 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteZeroes(ctx, 8*MiB, 1*MiB, true); err != nil {
		t.Fatal(err)
	}
	clear(want[8*MiB : 9*MiB])
	if got := readAll(t, ctx, p, 4<<20); !bytes.Equal(got, want) {
		t.Fatal("data read back from nbdkit memory differs")
	}
	var holes int64
	for e, err := range p.Extents(ctx, ContextBaseAllocation, 0, p.Size()) {
		if err != nil {
			t.Fatal(err)
		}
		if e.Flags&StateHole != 0 {
			holes += e.Length
			if slices.ContainsFunc(want[e.Offset:e.End()], func(b byte) bool { return b != 0 }) {
				t.Fatalf("hole %v holds data", e)
			}
		}
	}
	if holes < 48*MiB { // 16 MiB written, 1 MiB of it punched
		t.Fatalf("only %d bytes of holes", holes)
	}
}

// TestNbdkitPattern reads a large virtual disk whose every 8-byte word is
// its own offset: content checks at any offset without a reference file.
func TestNbdkitPattern(t *testing.T) {
	sock := nbdkit(t, "--read-only", "pattern", "size=8G")
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, ""), nil)
	for _, off := range []int64{0, 4096, 3*1024*MiB + 12345*8, 8*1024*MiB - 4*MiB} {
		buf := make([]byte, 4*MiB)
		if _, err := c.ReadAt(ctx, buf, off); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(buf); i += 8 {
			if v := binary.BigEndian.Uint64(buf[i:]); v != uint64(off)+uint64(i) {
				t.Fatalf("word at %d is %d", off+int64(i), v)
			}
		}
	}
}

func TestNbdkitSparseRandom(t *testing.T) {
	sock := nbdkit(t, "--read-only", "sparse-random", "size=256M", "seed=7", "percent=10", "runlength=262144")
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, ""), &Options{MetaContexts: []string{ContextBaseAllocation}})
	data := readAll(t, ctx, c, 4<<20)
	var dataBytes int64
	for e, err := range c.Extents(ctx, ContextBaseAllocation, 0, c.Size()) {
		if err != nil {
			t.Fatal(err)
		}
		if e.Flags&StateZero != 0 {
			if slices.ContainsFunc(data[e.Offset:e.End()], func(b byte) bool { return b != 0 }) {
				t.Fatalf("extent %v is reported zero but holds data", e)
			}
		} else {
			dataBytes += e.Length
		}
	}
	if pct := dataBytes * 100 / c.Size(); pct < 5 || pct > 20 {
		t.Fatalf("%d%% data, want about 10%%", pct)
	}
}

func TestNbdkitErrorsAndDelays(t *testing.T) {
	ctx := testCtx(t)
	t.Run("error filter", func(t *testing.T) {
		sock := nbdkit(t, "--filter=error", "memory", "size=1M", "error-pread=EIO", "error-pread-rate=100%")
		c := dialT(t, unixURI(sock, ""), nil)
		_, err := c.ReadAt(ctx, make([]byte, 4096), 0)
		var se *ServerError
		if !errors.As(err, &se) || se.Errno != EIO {
			t.Fatalf("read with injected EIO: %v", err)
		}
		if _, err := c.WriteAt(ctx, make([]byte, 4096), 0); err != nil {
			t.Fatalf("write after a read error: %v", err)
		}
	})
	t.Run("delay filter", func(t *testing.T) {
		sock := nbdkit(t, "--filter=delay", "memory", "size=1M", "rdelay=1")
		c := dialT(t, unixURI(sock, ""), nil)
		cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		defer cancel()
		start := time.Now()
		if _, err := c.ReadAt(cctx, make([]byte, 4096), 0); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("cancelled read: %v", err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Fatalf("cancelled read returned after %v", d)
		}
		if _, err := c.WriteAt(ctx, []byte("late"), 0); err != nil { // writes are not delayed
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		if _, err := c.ReadAt(ctx, buf, 0); err != nil || string(buf) != "late" {
			t.Fatalf("read after the abandoned one: %q, %v", buf, err)
		}
	})
	t.Run("block size policy", func(t *testing.T) {
		sock := nbdkit(t, "--filter=blocksize-policy", "memory", "size=8M",
			"blocksize-minimum=4096", "blocksize-preferred=65536", "blocksize-maximum=65536", "blocksize-error-policy=error")
		c := dialT(t, unixURI(sock, ""), nil)
		if bs := c.BlockSizes(); bs != (BlockSizes{4096, 65536, 65536}) {
			t.Fatalf("block sizes %+v", bs)
		}
		data := randBytes(newRand(5), 4<<20)
		if _, err := c.WriteAt(ctx, data, 4*MiB); err != nil { // split into 64 requests
			t.Fatal(err)
		}
		buf := make([]byte, 4<<20)
		if _, err := c.ReadAt(ctx, buf, 4*MiB); err != nil || !bytes.Equal(buf, data) {
			t.Fatalf("read back: %v", err)
		}
		if _, err := c.ReadAt(ctx, make([]byte, 512), 0); !errors.Is(err, errs.ErrUsage) {
			t.Fatalf("unaligned read: %v", err)
		}
	})
	t.Run("no structured replies", func(t *testing.T) {
		sock := nbdkit(t, "--no-sr", "pattern", "size=1M")
		c := dialT(t, unixURI(sock, ""), nil)
		if c.StructuredReplies() {
			t.Fatal("structured replies negotiated with --no-sr")
		}
		buf := make([]byte, 64*KiB)
		if _, err := c.ReadAt(ctx, buf, 64*KiB); err != nil || binary.BigEndian.Uint64(buf[8:]) != uint64(64*KiB+8) {
			t.Fatalf("read with simple replies: %v", err)
		}
	})
	t.Run("not fixed newstyle", func(t *testing.T) {
		sock := nbdkit(t, "--mask-handshake=0", "pattern", "size=1M")
		c := dialT(t, unixURI(sock, ""), nil)
		buf := make([]byte, 4096)
		if _, err := c.ReadAt(ctx, buf, 8192); err != nil || binary.BigEndian.Uint64(buf) != 8192 {
			t.Fatalf("read after NBD_OPT_EXPORT_NAME: %v", err)
		}
	})
	t.Run("server killed", func(t *testing.T) {
		needCmd(t, "nbdkit")
		sock := filepath.Join(shortTempDir(t), "k.sock")
		d := startDaemon(t, "unix", sock, "nbdkit", "--foreground", "--unix", sock, "--filter=delay", "memory", "size=1M", "rdelay=5")
		c := dialT(t, unixURI(sock, ""), nil)
		errc := make(chan error, 1)
		go func() { _, err := c.ReadAt(ctx, make([]byte, 4096), 0); errc <- err }()
		time.Sleep(200 * time.Millisecond)
		_ = d.cmd.Process.Signal(os.Kill)
		select {
		case err := <-errc:
			if !errors.Is(err, errs.ErrConnect) {
				t.Fatalf("read when the server died: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("read did not fail when the server died")
		}
	})
}

func TestQemuNBDTLS(t *testing.T) {
	needCmd(t, "qemu-nbd")
	p := testTLS(t)
	path, want := sparseFile(t, t.TempDir(), 2*MiB, 6, [2]int64{0, 2 * MiB})
	creds := "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir=" + p.dir
	port := freePort(t)
	startDaemon(t, "tcp", "127.0.0.1:"+itoa(port), "qemu-nbd", "--persistent", "--bind=127.0.0.1", "--port="+itoa(port),
		"--object", creds, "--tls-creds=tls0", "--format=raw", "--read-only", "--shared=8", path)
	checkTLSClient(t, "nbds://127.0.0.1:"+itoa(port)+"/", "nbd://127.0.0.1:"+itoa(port)+"/", want)
	sock := qemuNBD(t, path, "--object", creds, "--tls-creds=tls0", "--format=raw", "--read-only", "--shared=8")
	checkTLSClient(t, "nbds+unix:///?socket="+sock+"&tls-hostname=localhost", unixURI(sock, ""), want)
}

func TestNbdkitTLS(t *testing.T) {
	p := testTLS(t)
	sock := nbdkit(t, "--tls=require", "--tls-certificates="+p.dir, "pattern", "size=1M")
	want := make([]byte, MiB)
	for i := 0; i < len(want); i += 8 {
		binary.BigEndian.PutUint64(want[i:], uint64(i))
	}
	checkTLSClient(t, "nbds+unix:///?socket="+sock+"&tls-hostname=localhost", unixURI(sock, ""), want)
}
