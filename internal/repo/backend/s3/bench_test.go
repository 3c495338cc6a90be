package s3

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3/s3test"
)

// BenchmarkPut stores 4 MiB chunks from 4 goroutines (the backup
// pipeline's uploaders) into S3 on loopback and, for comparison, into a
// local directory. bench/s3-vs-local.sh measures whole backups.
func BenchmarkPut(b *testing.B) {
	srv := s3test.Start(b, s3test.Options{})
	for _, kv := range srv.Env() {
		k, v, _ := cut(kv)
		b.Setenv(k, v)
	}
	bucket := srv.Bucket(b)
	data := payload(1, 4<<20)
	var runs atomic.Int64
	targets := map[string]func(b *testing.B) backend.Backend{
		"s3": func(b *testing.B) backend.Backend {
			be, err := Create(context.Background(), Config{Endpoint: srv.Endpoint, Bucket: bucket, Prefix: fmt.Sprintf("bench%d", runs.Add(1))})
			if err != nil {
				b.Fatal(err)
			}
			return be
		},
		"local": func(b *testing.B) backend.Backend {
			be, err := local.Create(filepath.Join(b.TempDir(), "repo"))
			if err != nil {
				b.Fatal(err)
			}
			return be
		},
	}
	for _, name := range []string{"local", "s3"} {
		b.Run(name, func(b *testing.B) {
			be := targets[name](b)
			defer be.Close()
			var n atomic.Int64
			srv0 := srv.CPUTime()
			b.SetBytes(int64(len(data)))
			b.SetParallelism(2) // 2 x GOMAXPROCS(2) = 4 uploaders
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					h := backend.Handle{Kind: backend.KindChunks, Name: fmt.Sprintf("%064x", n.Add(1))}
					if err := be.Put(context.Background(), h, data); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			if name == "s3" {
				gb := float64(b.N) * float64(len(data)) / 1e9
				b.ReportMetric((srv.CPUTime()-srv0).Seconds()/gb, "server-cpu-s/GB")
			}
		})
	}
}

func cut(kv string) (string, string, bool) {
	for i := range kv {
		if kv[i] == '=' {
			return kv[:i], kv[i+1:], true
		}
	}
	return kv, "", false
}
