package repostats_test

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/mem"
	"github.com/vmshadow/vmshadow/internal/repo/repostats"
)

// BenchmarkCompute measures Compute on a repository whose backups
// reference a million distinct chunks (ten backups of a 32 GiB disk of
// 64 KiB chunks, each changing a tenth of the chunks of the one before),
// and reports the memory it allocates per distinct chunk. The chunk blobs
// themselves are not stored: listing them is the storage's speed, not
// Compute's.
func BenchmarkCompute(b *testing.B) {
	const entries = 1 << 19 // per disk
	ctx := context.Background()
	r, err := repo.Init(ctx, mem.New(), repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: cs})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	x, err := repo.NewIndex(entries*cs, cs)
	if err != nil {
		b.Fatal(err)
	}
	distinct := 0
	for n := range 10 {
		for i := range x.Len() {
			if n == 0 || rng.IntN(10) == 0 {
				var id repo.ID
				for j := 0; j < len(id); j += 8 {
					binary.LittleEndian.PutUint64(id[j:], rng.Uint64())
				}
				x.Set(i, id)
				distinct++
			}
		}
		xid, err := r.SaveIndex(ctx, x)
		if err != nil {
			b.Fatal(err)
		}
		m := &repo.Manifest{VM: "vm", Time: time.Unix(int64(n), 0), Source: "image", Mode: "full",
			Disks: []repo.ManifestDisk{{Name: "sda", Size: x.Size(), ChunkSize: cs, Index: xid.String()}}}
		if _, err := r.SaveManifest(ctx, m); err != nil {
			b.Fatal(err)
		}
	}
	runtime.GC()
	b.ReportAllocs()
	b.ResetTimer()
	var s *repostats.Stats
	for b.Loop() {
		if s, err = repostats.Compute(ctx, r); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if s.ReferencedChunks != distinct || s.Backups != 10 {
		b.Fatalf("counted %d chunks in %d backups, want %d in 10", s.ReferencedChunks, s.Backups, distinct)
	}
	// The live size of a chunk set as large as Compute's, and of one of
	// whole IDs (what gc and verify keep), apart from the indexes Compute
	// reads (a few at a time, 16 MiB each here).
	live := func(fill func()) float64 {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		fill()
		runtime.GC()
		runtime.ReadMemStats(&after)
		return float64(after.HeapAlloc-before.HeapAlloc) / float64(distinct)
	}
	var small map[uint64]struct{}
	var whole map[repo.ID]struct{}
	b.ReportMetric(live(func() {
		small = map[uint64]struct{}{}
		for i := range distinct {
			small[uint64(i)*0x9e3779b97f4a7c15] = struct{}{}
		}
	}), "set-B/chunk")
	b.ReportMetric(live(func() {
		whole = map[repo.ID]struct{}{}
		for i := range distinct {
			var id repo.ID
			binary.LittleEndian.PutUint64(id[:], uint64(i)*0x9e3779b97f4a7c15)
			whole[id] = struct{}{}
		}
	}), "wholeID-set-B/chunk")
	b.ReportMetric(float64(distinct), "chunks")
	runtime.KeepAlive(small)
	runtime.KeepAlive(whole)
}
