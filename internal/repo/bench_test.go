package repo

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// Chunk-level costs, each next to the raw primitive it is built on, for a
// 4 MiB chunk of mixed content (half random, half text) and of random data.

func benchData(kind string) []byte {
	const n = DefaultChunkSize
	b := randData(42, n)
	if kind == "mixed" {
		for i := n / 2; i < n; i++ {
			b[i] = "vmshadow backs up disks; "[i%25]
		}
	}
	return b
}

func benchRepo(b *testing.B) *Repo {
	r, _ := newTestRepo(b, EncryptionAESGCM)
	return r
}

func BenchmarkRawSHA256(b *testing.B) {
	p := benchData("random")
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		sha256.Sum256(p)
	}
}

func BenchmarkChunkHash(b *testing.B) {
	r := benchRepo(b)
	p := benchData("random")
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		r.HashChunk(p)
	}
}

func BenchmarkRawAESGCM(b *testing.B) {
	blk, _ := aes.NewCipher(make([]byte, 32))
	g, _ := cipher.NewGCM(blk)
	p := benchData("random")
	dst := make([]byte, 0, len(p)+16)
	nonce := make([]byte, 12)
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		g.Seal(dst[:0], nonce, p, nil)
	}
}

func BenchmarkRawZstdFastest(b *testing.B) {
	for _, kind := range []string{"mixed", "random"} {
		b.Run(kind, func(b *testing.B) {
			enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
			p := benchData(kind)
			dst := make([]byte, 0, len(p)*2)
			b.SetBytes(int64(len(p)))
			for b.Loop() {
				enc.EncodeAll(p, dst[:0])
			}
		})
	}
}

// BenchmarkSealChunk is compress (kept only if it shrinks) + encrypt.
func BenchmarkSealChunk(b *testing.B) {
	for _, kind := range []string{"mixed", "random"} {
		b.Run(kind, func(b *testing.B) {
			r := benchRepo(b)
			p := benchData(kind)
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
	for _, kind := range []string{"mixed", "random"} {
		b.Run(kind, func(b *testing.B) {
			r := benchRepo(b)
			p := benchData(kind)
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
