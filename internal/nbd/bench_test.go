package nbd

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// Benchmarks of the read path. Run with e.g.
//
//	go test -run '^$' -bench . -benchtime 3x ./internal/nbd/
//
// BenchmarkReadQemuNBD reads a 1 GiB raw file served by qemu-nbd with 4 MiB
// requests over 1, 2 and 4 connections, and copies the same export with
// qemu-img convert and nbdcopy to null targets (the read floor to compare
// with); BenchmarkServerRead reads our own server with our client and with
// qemu-img convert.

const benchSize = 1 << 30

var (
	benchFileOnce sync.Once
	benchFile     string
)

// benchImage is a 1 GiB file of random data, made once per run and removed
// when the benchmark ends.
func benchImage(b testing.TB) string {
	benchFileOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nbdbench")
		if err != nil {
			b.Fatal(err)
		}
		benchFile = filepath.Join(dir, "bench.raw")
		f, err := os.Create(benchFile)
		if err != nil {
			b.Fatal(err)
		}
		rng := newRand(99)
		chunk := make([]byte, 4<<20)
		for off := 0; off < benchSize; off += len(chunk) {
			for i := 0; i < len(chunk); i += 8 {
				v := rng.Uint64()
				for j := range 8 {
					chunk[i+j] = byte(v >> (8 * j))
				}
			}
			if _, err := f.Write(chunk); err != nil {
				b.Fatal(err)
			}
		}
		f.Close()
	})
	return benchFile // removed by removeBenchImage, from TestMain
}

func removeBenchImage() {
	if benchFile != "" {
		os.RemoveAll(filepath.Dir(benchFile))
	}
}

// readWhole reads [0, size) with req-byte requests from workers goroutines.
func readWhole(ctx context.Context, r interface {
	ReadAt(context.Context, []byte, int64) (int, error)
}, size int64, req, workers int) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, req)
			for {
				off := next.Add(int64(req)) - int64(req)
				if off >= size {
					return
				}
				n := min(int64(req), size-off)
				if _, err := r.ReadAt(ctx, buf[:n], off); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	return <-errc
}

// benchQemuNBD serves the benchmark image with qemu-nbd. glibc's malloc in
// qemu-nbd otherwise hands out each large request buffer with a fresh
// mmap, and the page faults cap any client (qemu-img convert as well as
// ours) at about 200 MB/s on this kind of machine, depending on the heap's
// history: a fixed mmap threshold makes the figures stable.
func benchQemuNBD(b *testing.B) string {
	needCmd(b, "qemu-nbd")
	path := benchImage(b)
	b.Setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456")
	sock := qemuNBD(b, path, "--format=raw", "--read-only", "--shared=16")
	p, err := DialPool(context.Background(), Target{Network: "unix", Address: sock}, 1, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	if err := readWhole(context.Background(), p, benchSize, 4<<20, 4); err != nil { // warm up
		b.Fatal(err)
	}
	return sock
}

func BenchmarkReadQemuNBD(b *testing.B) {
	sock := benchQemuNBD(b)
	for _, conns := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("conns=%d", conns), func(b *testing.B) {
			ctx := context.Background()
			p, err := DialPool(ctx, Target{Network: "unix", Address: sock}, conns, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			if p.Conns() != conns {
				b.Fatalf("%d connections", p.Conns())
			}
			b.SetBytes(benchSize)
			b.ResetTimer()
			for range b.N {
				if err := readWhole(ctx, p, benchSize, 4<<20, 4*conns); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	// the read floor: the same export copied by QEMU's and libnbd's tools
	b.Run("qemu-img-convert", func(b *testing.B) {
		needCmd(b, "qemu-img")
		b.SetBytes(benchSize)
		for range b.N {
			run(b, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", unixURI(sock, ""), "null-co://")
		}
	})
	b.Run("nbdcopy", func(b *testing.B) {
		needCmd(b, "nbdcopy")
		b.SetBytes(benchSize)
		for range b.N {
			run(b, "nbdcopy", unixURI(sock, ""), "null:")
		}
	})
}

func BenchmarkServerRead(b *testing.B) {
	const size = 256 << 20
	m := newMemExport(size)
	rng := newRand(7)
	for i := 0; i < size; i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			m.data[i+j] = byte(v >> (8 * j))
		}
	}
	_, sock, _ := startServer(b, nil, map[string]Export{"d": m}, map[string]ExportOptions{"d": {ReadOnly: true}})
	for _, conns := range []int{1, 4} {
		b.Run(fmt.Sprintf("conns=%d", conns), func(b *testing.B) {
			ctx := context.Background()
			p, err := DialPool(ctx, Target{Network: "unix", Address: sock, Export: "d"}, conns, nil)
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			b.SetBytes(size)
			b.ResetTimer()
			for range b.N {
				if err := readWhole(ctx, p, size, 4<<20, 4*conns); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("qemu-img-convert", func(b *testing.B) {
		needCmd(b, "qemu-img")
		b.SetBytes(size)
		for range b.N {
			run(b, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", unixURI(sock, "d"), "null-co://")
		}
	})
}
