package backup_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repo/backend/mem"
)

// BenchmarkPipeline backs up a 256 MiB mixed image (random, text, holes,
// allocated zeros, duplicates) with 4 MiB chunks into a fresh encrypted
// repository each iteration: in memory (CPU cost of the pipeline) and in a
// local directory (with fsync). MB/s is image bytes per second.
func BenchmarkPipeline(b *testing.B) {
	src := filepath.Join(b.TempDir(), "img")
	const size = 256 << 20
	makeImage(b, src, size, 77)
	for _, where := range []string{"mem", "local"} {
		b.Run(where, func(b *testing.B) {
			b.SetBytes(size)
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				var r *repo.Repo
				var err error
				opts := repo.InitOptions{Password: []byte("pw"), KDF: testKDF}
				if where == "mem" {
					r, err = repo.Init(context.Background(), mem.New(), opts)
				} else {
					be, _ := local.Create(filepath.Join(b.TempDir(), "repo"))
					r, err = repo.Init(context.Background(), be, opts)
				}
				if err != nil {
					b.Fatal(err)
				}
				im, _ := imagefile.Open("sda", src)
				b.StartTimer()
				if _, err := backup.Run(context.Background(), r, backup.Job{VM: "vm", Disks: []backup.Disk{{Source: im}}}, backup.Options{}); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				im.Close()
				r.Close()
				b.StartTimer()
			}
		})
	}
}
