package repo

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"

	"github.com/vmshadow/vmshadow/internal/repo/backend/mem"
)

// Chunk-level costs, each next to the raw primitive it is built on (what the
// CPU can do), for a 4 MiB chunk: "usr" is system files (the first 4 MiB of
// the files under /usr/lib, in name order: executables, libraries, text),
// "mixed" half random and half a repeated sentence, "random" incompressible.
// Run with
//
//	go test -run '^$' -bench . -benchtime 20x ./internal/repo/

func benchData(tb testing.TB, kind string) []byte {
	const n = DefaultChunkSize
	switch kind {
	case "usr":
		b := make([]byte, 0, n)
		filepath.WalkDir("/usr/lib", func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() || len(b) == n {
				return nil
			}
			f, err := os.ReadFile(p)
			if err == nil {
				b = append(b, f[:min(len(f), n-len(b))]...)
			}
			if len(b) == n {
				return fs.SkipAll
			}
			return nil
		})
		if len(b) < n {
			tb.Skip("less than 4 MiB of files under /usr/lib")
		}
		return b
	case "mixed":
		b := randData(42, n)
		for i := n / 2; i < n; i++ {
			b[i] = "vmshadow backs up disks; "[i%25]
		}
		return b
	}
	return randData(42, n)
}

var kinds = []string{"usr", "mixed", "random"}

// benchRepo is a repository with the default chunk size, which the
// benchmarks' data fills (newTestRepo's is the smallest).
func benchRepo(b *testing.B) *Repo {
	r, err := Init(context.Background(), mem.New(), InitOptions{Encryption: EncryptionAESGCM, Password: []byte("secret"), KDF: testKDF})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(r.Close)
	return r
}

// BenchmarkRawSHA256 is SHA-256 (SHA-NI where the CPU has it).
func BenchmarkRawSHA256(b *testing.B) {
	p := benchData(b, "random")
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		sha256.Sum256(p)
	}
}

// BenchmarkRawBLAKE3Keyed is keyed BLAKE3 (AVX-512 or AVX2 where the CPU
// has it), one goroutine.
func BenchmarkRawBLAKE3Keyed(b *testing.B) {
	p := benchData(b, "random")
	h, _ := blake3.NewKeyed(make([]byte, 32))
	var sum [32]byte
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		h.Reset()
		h.Write(p)
		h.Sum(sum[:0])
	}
}

// BenchmarkChunkHash is the chunk ID of each kind of repository.
func BenchmarkChunkHash(b *testing.B) {
	for _, hash := range []string{HashBLAKE3Keyed, HashHMACSHA256} {
		b.Run(hash, func(b *testing.B) {
			be := mem.New()
			r, err := Init(context.Background(), be, InitOptions{ChunkHash: hash, Password: []byte("pw"), KDF: testKDF})
			if err != nil {
				b.Fatal(err)
			}
			defer r.Close()
			p := benchData(b, "random")
			b.SetBytes(int64(len(p)))
			b.ReportAllocs()
			for b.Loop() {
				r.HashChunk(p)
			}
		})
	}
}

func BenchmarkRawAESGCM(b *testing.B) {
	blk, _ := aes.NewCipher(make([]byte, 32))
	g, _ := cipher.NewGCM(blk)
	p := benchData(b, "random")
	dst := make([]byte, 0, len(p)+16)
	nonce := make([]byte, 12)
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		g.Seal(dst[:0], nonce, p, nil)
	}
}

// BenchmarkRawZstd is zstd on one core at the fastest level (about zstd
// level 1) and at the default (about level 3, what vmshadow writes);
// the compressed size per input byte is reported as ratio.
func BenchmarkRawZstd(b *testing.B) {
	for _, level := range []zstd.EncoderLevel{zstd.SpeedFastest, zstd.SpeedDefault} {
		for _, kind := range kinds {
			b.Run(level.String()+"/"+kind, func(b *testing.B) {
				enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(1),
					zstd.WithEncoderCRC(false), zstd.WithLowerEncoderMem(true))
				p := benchData(b, kind)
				dst := make([]byte, 0, len(p)*2)
				b.SetBytes(int64(len(p)))
				for b.Loop() {
					dst = enc.EncodeAll(p, dst[:0])
				}
				b.ReportMetric(float64(len(dst))/float64(len(p)), "ratio")
			})
		}
	}
}

// BenchmarkSealChunk is compress (kept only if it shrinks) + encrypt.
func BenchmarkSealChunk(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			r := benchRepo(b)
			p := benchData(b, kind)
			id := r.HashChunk(p)
			dst := make([]byte, 0, len(p)+Overhead+len(p)/64+64)
			b.SetBytes(int64(len(p)))
			b.ReportAllocs()
			for b.Loop() {
				dst = r.SealChunk(dst[:0], id, p)
			}
		})
	}
}

// BenchmarkOpenChunk is decrypt + decompress + verify the hash.
func BenchmarkOpenChunk(b *testing.B) {
	for _, kind := range kinds {
		b.Run(kind, func(b *testing.B) {
			r := benchRepo(b)
			p := benchData(b, kind)
			id := r.HashChunk(p)
			sealed := r.SealChunk(nil, id, p)
			blob := make([]byte, len(sealed))
			out := make([]byte, 0, len(p))
			b.SetBytes(int64(len(p)))
			b.ReportAllocs()
			for b.Loop() {
				copy(blob, sealed)
				var err error
				if out, err = r.OpenChunk(id, blob, out); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
