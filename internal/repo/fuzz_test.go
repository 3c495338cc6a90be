package repo

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// classified fails unless err is nil or wraps ErrCorrupt / ErrUnsupported:
// bad input must be reported as such.
func classified(t *testing.T, what string, err error) {
	if err != nil && !errors.Is(err, errs.ErrCorrupt) && !errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("%s: error without a class: %v", what, err)
	}
}

func FuzzDecodeConfig(f *testing.F) {
	_, be := newTestRepo(f, EncryptionAESGCM)
	raw, _ := be.Get(context.Background(), backend.Handle{Kind: backend.KindConfig, Name: "config"}, 0, -1)
	f.Add(raw)
	f.Add([]byte(`{"format":"vmshadow-repository","version":99}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, err := DecodeConfig(b)
		classified(t, "config", err)
	})
}

func FuzzDecodeKeyFile(f *testing.F) {
	r, be := newTestRepo(f, EncryptionAESGCM)
	_ = r
	be.List(context.Background(), backend.KindKeys, "", func(fi backend.Info) error {
		b, _ := be.Get(context.Background(), backend.Handle{Kind: backend.KindKeys, Name: fi.Name}, 0, -1)
		f.Add(b)
		return nil
	})
	f.Add([]byte(`{"version":1,"kdf":{"name":"argon2id","time":1,"memory_kib":999999999,"threads":1}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		kf, err := decodeKeyFile(b)
		classified(t, "key file", err)
		if err == nil && kf.KDF.MemoryKiB <= 64<<10 && kf.KDF.Time <= 2 {
			// Cheap enough to run: a wrong password must be ErrAuth or ErrCorrupt.
			_, err := kf.unwrap([]byte("fuzz"))
			if err != nil && !errors.Is(err, errs.ErrAuth) && !errors.Is(err, errs.ErrCorrupt) {
				t.Fatalf("unwrap: %v", err)
			}
		}
	})
}

// FuzzOpenBlob feeds arbitrary bytes to the sealed-blob decoder of every
// kind, with and without encryption, through the public readers.
func FuzzOpenBlob(f *testing.F) {
	enc, _ := newTestRepo(f, EncryptionAESGCM)
	plain, _ := newTestRepo(f, EncryptionNone)
	for _, r := range []*Repo{enc, plain} {
		p := bytes.Repeat([]byte("abc"), 10) // small: the minimizer is quadratic in the input length
		id := r.HashChunk(p)
		f.Add(r.SealChunk(nil, id, p), uint8(0))
		x, _ := NewIndex(MinChunkSize*2, MinChunkSize)
		f.Add(r.codec.seal(nil, magicIndex, "x", x.Encode(), true), uint8(1))
		f.Add(r.codec.seal(nil, magicManifest, "x", []byte(`{"version":1}`), true), uint8(2))
		f.Add(r.codec.seal(nil, magicLock, "x", []byte(`{"version":1}`), false), uint8(3))
		f.Add(r.codec.seal(nil, magicGroup, "x", []byte(`{"version":1,"name":"g"}`), true), uint8(4))
	}
	f.Fuzz(func(t *testing.T, b []byte, which uint8) {
		for _, r := range []*Repo{enc, plain} {
			magic := [][4]byte{magicChunk, magicIndex, magicManifest, magicLock, magicGroup}[which%5]
			max := []int{int(r.ChunkSize()), maxMetaPlain, maxManifestPlain, 1 << 20, maxGroupPlain}[which%5]
			p, err := r.codec.open(nil, magic, "x", append([]byte(nil), b...), max)
			classified(t, "blob", err)
			if err == nil {
				_, err = DecodeIndex(p)
				classified(t, "index", err)
				_, err = DecodeManifest(p)
				classified(t, "manifest", err)
				_, err = DecodeLock(p)
				classified(t, "lock", err)
				_, err = DecodeGroup(p)
				classified(t, "group", err)
			}
		}
	})
}

func FuzzDecodeIndex(f *testing.F) {
	x, _ := NewIndex(MinChunkSize*3+1, MinChunkSize)
	x.Set(2, ID{1, 2, 3})
	f.Add(x.Encode())
	e, _ := NewIndex(0, MinChunkSize)
	f.Add(e.Encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		x, err := DecodeIndex(b)
		classified(t, "index", err)
		if err == nil {
			if !bytes.Equal(x.Encode(), b) {
				t.Fatal("index does not re-encode to its input")
			}
			for i := range x.Len() {
				if _, n := x.Range(i); n <= 0 {
					t.Fatalf("entry %d covers %d bytes", i, n)
				}
			}
		}
	})
}

func FuzzDecodeManifest(f *testing.F) {
	m := Manifest{Version: 1, VM: "vm", Time: time.Now(), Source: "image", Mode: "full",
		Disks: []ManifestDisk{{Name: "d", Size: 10, ChunkSize: MinChunkSize, Index: ID{1}.String()}}}
	b, _ := json.Marshal(m)
	f.Add(b)
	f.Add([]byte(`{"version":2}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeManifest(b)
		classified(t, "manifest", err)
		if err == nil && m.Disk(m.Disks[0].Name) == nil {
			t.Fatal("decoded manifest lost its disk")
		}
	})
}

func FuzzDecodeGroup(f *testing.F) {
	g := Group{Version: 1, Name: "app", SetID: "s", Time: time.Now(), Consistency: "application", FreezeMS: 12,
		Members: []GroupMember{{VM: "db", Backup: ID{1}.String()}, {VM: "web", Backup: ID{2}.String()}}, Nonce: "n"}
	b, _ := json.Marshal(g)
	f.Add(b)
	f.Add([]byte(`{"version":2}`))
	f.Add([]byte(`{"version":1,"name":"a","set_id":"s","members":[{"vm":"a","backup":"x"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := DecodeGroup(b)
		classified(t, "group", err)
		if err != nil {
			return
		}
		// What decodes is what SaveGroup would accept, and round-trips.
		if g.check() != nil || len(g.Members) == 0 || g.Member(g.Members[0].VM) == nil {
			t.Fatalf("decoded group %+v does not hold up", g)
		}
		for _, m := range g.Members {
			if _, err := ParseID(m.Backup); err != nil {
				t.Fatalf("decoded member backup %q: %v", m.Backup, err)
			}
		}
		again, err := json.Marshal(g)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := DecodeGroup(again); err != nil {
			t.Fatalf("re-encoded group does not decode: %v", err)
		}
	})
}

func FuzzDecodeLock(f *testing.F) {
	b, _ := json.Marshal(LockInfo{Version: 1, Op: "backup"})
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		_, err := DecodeLock(b)
		classified(t, "lock", err)
	})
}
