package repocopy_test

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repocopy"
)

// BenchmarkCopy copies a backup of a 64 MiB disk of random data between
// two local encrypted repositories with 4 MiB chunks (every chunk sent),
// reporting disk bytes per second and the peak heap.
func BenchmarkCopy(b *testing.B) {
	ctx := context.Background()
	const size = 64 << 20
	src, _ := newRepo(b, repo.InitOptions{Password: []byte("one")})
	path := filepath.Join(b.TempDir(), "disk.img")
	rnd := rand.New(rand.NewPCG(1, 2))
	img := make([]byte, size)
	for i := range img {
		img[i] = byte(rnd.Uint32())
	}
	if err := os.WriteFile(path, img, 0o600); err != nil {
		b.Fatal(err)
	}
	img = nil
	sid := backupImage(b, src, "vm1", path, time.Now())
	m, err := src.LoadManifest(ctx, sid)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(size)
	b.ResetTimer()
	var peak uint64
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		dst, _ := newRepo(b, repo.InitOptions{Password: []byte("two")})
		runtime.GC()
		done := make(chan struct{})
		go func() {
			var ms runtime.MemStats
			for {
				runtime.ReadMemStats(&ms)
				peak = max(peak, ms.HeapInuse)
				select {
				case <-done:
					return
				case <-time.After(20 * time.Millisecond):
				}
			}
		}()
		b.StartTimer()
		res, err := repocopy.Copy(ctx, src, dst, repo.Backup{ID: sid, Manifest: m}, backup.Options{})
		b.StopTimer()
		close(done)
		if err != nil || res.Stats.ChunksNew != size/repo.DefaultChunkSize {
			b.Fatalf("copy: %v", err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
}
