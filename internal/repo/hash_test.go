package repo

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend/mem"
)

// The keyed BLAKE3 IDs must stay those of the BLAKE3 specification
// whichever implementation computes them: the official test vectors
// (test_vectors.json: key "whats the Elvish word for friend", input bytes
// i % 251).
func TestBLAKE3KeyedKnownAnswers(t *testing.T) {
	c := newCodec(&masterKeys{Encrypt: make([]byte, 32), MAC: []byte("whats the Elvish word for friend")}, HashBLAKE3Keyed)
	defer c.close()
	for _, tc := range []struct {
		n    int
		want string
	}{
		{0, "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26"},
		{1, "6d7878dfff2f485635d39013278ae14f1454b8c0a3a2d34bc1ab38228a80c95b"},
		{1024, "75c46f6f3d9eb4f55ecaaee480db732e6c2105546f1e675003687c31719c7ba4"},
		{102400, "1c35d1a5811083fd7119f5d5d1ba027b4d01c0c6c49fb6ff2cf75393ea5db4a7"}, // the SIMD paths
	} {
		in := make([]byte, tc.n)
		for i := range in {
			in[i] = byte(i % 251)
		}
		if got := c.hash(in); hex.EncodeToString(got[:]) != tc.want {
			t.Errorf("keyed BLAKE3 of %d bytes = %x, want %s", tc.n, got, tc.want)
		}
	}
}

// Both keyed hashes give IDs that depend on the key and the content;
// HMAC-SHA256 IDs are those of crypto/hmac (repositories made before
// BLAKE3 keep their IDs).
func TestChunkHashes(t *testing.T) {
	mac := randData(1, 32)
	p := randData(2, 3<<20+17) // several SIMD batches and a partial block
	hm := newCodec(&masterKeys{Encrypt: make([]byte, 32), MAC: mac}, HashHMACSHA256)
	defer hm.close()
	m := hmac.New(sha256.New, mac)
	m.Write(p)
	if got := hm.hash(p); hex.EncodeToString(got[:]) != hex.EncodeToString(m.Sum(nil)) {
		t.Fatal("hmac-sha256 ID differs from crypto/hmac")
	}
	b3 := newCodec(&masterKeys{Encrypt: make([]byte, 32), MAC: mac}, HashBLAKE3Keyed)
	defer b3.close()
	other := newCodec(&masterKeys{Encrypt: make([]byte, 32), MAC: randData(3, 32)}, HashBLAKE3Keyed)
	defer other.close()
	id := b3.hash(p)
	if id == hm.hash(p) || id == other.hash(p) {
		t.Fatal("keyed BLAKE3 ID equals the HMAC ID or the ID under another key")
	}
	q := append([]byte{}, p...)
	q[len(q)/2] ^= 1
	if b3.hash(q) == id {
		t.Fatal("a one-bit change keeps the ID")
	}
	for range 3 { // pooled hashers are reset
		if b3.hash(p) != id {
			t.Fatal("ID not stable")
		}
	}
}

func TestInitChunkHash(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		enc, hash, want string
	}{
		{EncryptionAESGCM, "", HashBLAKE3Keyed},
		{EncryptionAESGCM, HashHMACSHA256, HashHMACSHA256}, // as repositories made before BLAKE3
		{EncryptionNone, "", HashSHA256},
	} {
		be := mem.New()
		r, err := Init(ctx, be, InitOptions{Encryption: tc.enc, ChunkHash: tc.hash, Password: []byte("pw"), KDF: testKDF, ChunkSize: MinChunkSize})
		if err != nil {
			t.Fatal(err)
		}
		if r.Config().ChunkHash != tc.want {
			t.Fatalf("%s/%q: chunk hash %s, want %s", tc.enc, tc.hash, r.Config().ChunkHash, tc.want)
		}
		p := randData(4, MinChunkSize)
		id := r.HashChunk(p)
		if err := r.PutChunk(ctx, id, r.SealChunk(nil, id, p)); err != nil {
			t.Fatal(err)
		}
		r.Close()
		// Reopened, the repository hashes alike and reads the chunk back.
		r2, err := Open(ctx, be, pw("pw"))
		if err != nil {
			t.Fatal(err)
		}
		if r2.HashChunk(p) != id {
			t.Fatalf("%s: reopened repository hashes differently", tc.want)
		}
		if got, err := r2.ReadChunk(ctx, id, nil); err != nil || string(got) != string(p) {
			t.Fatalf("%s: read back: %v", tc.want, err)
		}
		r2.Close()
	}
	_, err := Init(ctx, mem.New(), InitOptions{Encryption: EncryptionNone, ChunkHash: HashBLAKE3Keyed})
	if !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("unencrypted with a keyed hash: %v, want ErrUsage", err)
	}
	_, err = Init(ctx, mem.New(), InitOptions{ChunkHash: "md5", Password: []byte("pw"), KDF: testKDF})
	if !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("unknown chunk hash: %v, want ErrUsage", err)
	}
}
