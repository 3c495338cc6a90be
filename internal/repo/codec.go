package repo

import (
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Sealed blob layout (chunks, indexes, manifests, locks), little-endian:
//
//	0   4  magic: "vsCK" chunk, "vsIX" index, "vsMF" manifest, "vsLK" lock, "vsHC" health record, "vsGR" group record
//	4   1  blob format version (1)
//	5   1  compression: 0 none, 1 zstd
//	6   1  encryption: 0 none, 1 AES-256-GCM
//	7   1  reserved, 0
//	8   4  plaintext length
//	12 12  GCM nonce (encrypted only)
//	..     payload: the (compressed) plaintext; encrypted: its GCM ciphertext
//	       followed by the 16-byte tag, with associated data = bytes 0..11 of
//	       the header followed by the blob's name (its hex ID), so a blob moved
//	       to another name or kind fails authentication.
const (
	headerLen    = 12
	nonceLen     = 12
	tagLen       = 16
	blobVersion  = 1
	compNone     = 0
	compZstd     = 1
	encNone      = 0
	encAESGCM    = 1
	maxMetaPlain = 1 << 30 // indexes: 1 GiB (an index of a 128 TiB disk)
	// maxManifestPlain bounds a manifest: JSON of a few hundred bytes per
	// disk.
	maxManifestPlain = 16 << 20
	// openPrealloc is the most open reserves for a compressed blob's
	// plaintext before decompressing: beyond it the output grows as
	// decompression produces it, so a damaged header claiming a large
	// plaintext costs nothing (see open).
	openPrealloc = 1 << 20
)

// Blob magics.
var (
	magicChunk    = [4]byte{'v', 's', 'C', 'K'}
	magicIndex    = [4]byte{'v', 's', 'I', 'X'}
	magicManifest = [4]byte{'v', 's', 'M', 'F'}
	magicLock     = [4]byte{'v', 's', 'L', 'K'}
)

// Overhead is the most a sealed chunk can exceed its plaintext by.
const Overhead = headerLen + nonceLen + tagLen

// codec hashes, compresses and encrypts blobs. It is safe for concurrent use.
type codec struct {
	aead    cipher.AEAD // nil when not encrypted
	encKey  []byte      // the AEAD key, kept to re-wrap under a new password
	macKey  []byte      // nil when not encrypted: plain SHA-256
	hashers sync.Pool   // of hash.Hash: the repository's chunk hash
	enc     *zstd.Encoder
	sampler *zstd.Encoder // fastest level, for compressible
	chunkD  *zstd.Decoder
	metaD   *zstd.Decoder
}

// CompressionLevel is the zstd level new blobs are written with. The
// default level compresses file-system data about 4% smaller than the
// fastest at a similar speed on this kind of data (see bench/).
var CompressionLevel = zstd.SpeedDefault

// newCodec makes the codec of a repository with keys k (nil when not
// encrypted) and the config's chunk hash (checked by DecodeConfig).
func newCodec(k *masterKeys, chunkHash string) *codec {
	c := &codec{}
	if k != nil {
		c.aead = newGCM(k.Encrypt)
		c.encKey = k.Encrypt
		c.macKey = k.MAC
	}
	switch {
	case c.macKey == nil:
		c.hashers.New = func() any { return sha256.New() }
	case chunkHash == HashBLAKE3Keyed:
		c.hashers.New = func() any {
			h, err := blake3.NewKeyed(c.macKey)
			if err != nil {
				panic(err) // only for a key that is not 32 bytes; keys are checked when loaded
			}
			return h
		}
	default:
		c.hashers.New = func() any { return hmac.New(sha256.New, c.macKey) }
	}
	n := runtime.GOMAXPROCS(0)
	var err error
	c.enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(CompressionLevel), zstd.WithEncoderConcurrency(n),
		zstd.WithEncoderCRC(false), zstd.WithZeroFrames(true), zstd.WithLowerEncoderMem(true))
	if err != nil {
		panic(err) // only on invalid options
	}
	c.sampler, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(n),
		zstd.WithEncoderCRC(false), zstd.WithLowerEncoderMem(true), zstd.WithWindowSize(zstd.MinWindowSize))
	if err != nil {
		panic(err)
	}
	c.chunkD, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(n), zstd.WithDecoderMaxMemory(MaxChunkSize),
		zstd.IgnoreChecksum(true))
	if err != nil {
		panic(err)
	}
	c.metaD, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxMetaPlain),
		zstd.IgnoreChecksum(true))
	if err != nil {
		panic(err)
	}
	return c
}

func (c *codec) close() {
	c.enc.Close()
	c.sampler.Close()
	c.chunkD.Close()
	c.metaD.Close()
}

// hash returns the ID of plaintext p: keyed BLAKE3 or HMAC-SHA256 (as the
// config says) under the MAC key when the repository is encrypted, SHA-256
// otherwise.
func (c *codec) hash(p []byte) ID {
	h := c.hashers.Get().(hash.Hash)
	h.Reset()
	h.Write(p)
	var id ID
	h.Sum(id[:0])
	c.hashers.Put(h)
	return id
}

// seal appends the sealed form of plain to dst[:0] (which must not overlap
// plain) and returns it. With compress, zstd is tried and kept only if it
// shrinks the data.
func (c *codec) seal(dst []byte, magic [4]byte, name string, plain []byte, compress bool) []byte {
	hdr := headerLen
	if c.aead != nil {
		hdr += nonceLen
	}
	need := hdr + len(plain) + tagLen
	if cap(dst) < need {
		dst = make([]byte, hdr, need+len(plain)/64+64)
	}
	dst = dst[:hdr]
	copy(dst, magic[:])
	dst[4] = blobVersion
	dst[5] = compNone
	dst[6] = encNone
	dst[7] = 0
	binary.LittleEndian.PutUint32(dst[8:12], uint32(len(plain)))
	if compress && len(plain) > 0 && c.compressible(plain) {
		dst = c.enc.EncodeAll(plain, dst)
		if len(dst)-hdr < len(plain) {
			dst[5] = compZstd
		} else {
			dst = dst[:hdr]
		}
	}
	if c.aead == nil {
		if dst[5] == compNone {
			dst = append(dst, plain...)
		}
		return dst
	}
	dst[6] = encAESGCM
	nonce := dst[headerLen:hdr]
	rand.Read(nonce)
	ad := make([]byte, 0, headerLen+len(name))
	ad = append(append(ad, dst[:headerLen]...), name...)
	payload := dst[hdr:] // compressed, sealed in place
	if dst[5] == compNone {
		payload = plain // sealed straight into dst: no copy first
	}
	out := c.aead.Seal(dst[hdr:hdr], nonce, payload, ad)
	return dst[:hdr+len(out)]
}

// Sampling: before compressing a large plaintext, compressible compresses
// sampleCount samples of sampleLen bytes spread over it with the fastest
// zstd level; when they shrink by less than 2%, the data is taken as
// incompressible (already compressed or encrypted) and stored as is. This
// spares the full compression attempt (the most expensive step of a backup)
// on random data, at the cost of about 1% of one attempt on the rest.
const (
	sampleLen   = 8 << 10
	sampleCount = 4
)

func (c *codec) compressible(p []byte) bool {
	if len(p) < 4*sampleCount*sampleLen {
		return true
	}
	var in, out int
	buf := make([]byte, 0, sampleLen+64)
	step := len(p) / sampleCount
	for i := range sampleCount {
		s := p[i*step : i*step+sampleLen]
		in += len(s)
		out += len(c.sampler.EncodeAll(s, buf[:0]))
	}
	return out < in-in/50
}

// open checks and decodes a sealed blob into dst[:0] (reused when large
// enough) and returns the plaintext. The caller checks the plaintext's hash.
// blob may be modified. Every malformed input is errs.ErrCorrupt (or
// errs.ErrUnsupported for a newer blob version), never a panic.
func (c *codec) open(dst []byte, magic [4]byte, name string, blob []byte, maxPlain int) ([]byte, error) {
	if len(blob) < headerLen {
		return nil, fmt.Errorf("truncated: %d bytes, shorter than the %d-byte header: %w", len(blob), headerLen, errs.ErrCorrupt)
	}
	if [4]byte(blob[:4]) != magic {
		return nil, fmt.Errorf("wrong magic %q, want %q: %w", blob[:4], magic[:], errs.ErrCorrupt)
	}
	switch {
	case blob[4] > blobVersion:
		return nil, fmt.Errorf("blob format version %d is newer than this vmshadow supports (%d): %w", blob[4], blobVersion, errs.ErrUnsupported)
	case blob[4] < 1:
		return nil, fmt.Errorf("invalid blob format version 0: %w", errs.ErrCorrupt)
	case blob[5] != compNone && blob[5] != compZstd:
		return nil, fmt.Errorf("unknown compression %d: %w", blob[5], errs.ErrCorrupt)
	case blob[7] != 0:
		return nil, fmt.Errorf("reserved header byte is %d: %w", blob[7], errs.ErrCorrupt)
	}
	plainLen := int(binary.LittleEndian.Uint32(blob[8:12]))
	if plainLen > maxPlain {
		return nil, fmt.Errorf("plaintext length %d exceeds the limit %d: %w", plainLen, maxPlain, errs.ErrCorrupt)
	}
	payload := blob[headerLen:]
	switch {
	case c.aead == nil && blob[6] != encNone:
		return nil, fmt.Errorf("blob is encrypted but the repository is not: %w", errs.ErrCorrupt)
	case c.aead != nil && blob[6] != encAESGCM:
		return nil, fmt.Errorf("blob is not encrypted but the repository is: %w", errs.ErrCorrupt)
	case c.aead != nil:
		if len(payload) < nonceLen+tagLen {
			return nil, fmt.Errorf("truncated: %d bytes: %w", len(blob), errs.ErrCorrupt)
		}
		nonce := payload[:nonceLen]
		ad := make([]byte, 0, headerLen+len(name))
		ad = append(append(ad, blob[:headerLen]...), name...)
		p, err := c.aead.Open(payload[nonceLen:nonceLen], nonce, payload[nonceLen:], ad)
		if err != nil {
			return nil, fmt.Errorf("authentication failed (damaged, truncated, or stored under another name): %w", errs.ErrCorrupt)
		}
		payload = p
	}
	if blob[5] == compNone {
		if len(payload) != plainLen {
			return nil, fmt.Errorf("payload of %d bytes, header says %d: %w", len(payload), plainLen, errs.ErrCorrupt)
		}
		return append(dst[:0], payload...), nil
	}
	// Memory stays bounded by what the blob really holds, not by what its
	// header claims: the frame's own content size must agree with the
	// header, and only up to openPrealloc (or a chunk, at most the
	// repository's chunk size) is reserved up front; the decoder grows the
	// output as it decodes (by no more than the rest of the input can
	// produce) and stops at maxPlain.
	var fh zstd.Header
	if err := fh.Decode(payload); err != nil {
		return nil, fmt.Errorf("decompress: frame header: %v: %w", err, errs.ErrCorrupt)
	}
	if fh.HasFCS && fh.FrameContentSize != uint64(plainLen) {
		return nil, fmt.Errorf("compressed frame holds %d bytes, header says %d: %w", fh.FrameContentSize, plainLen, errs.ErrCorrupt)
	}
	if cap(dst) < plainLen {
		reserve := openPrealloc
		if magic == magicChunk {
			reserve = maxPlain
		}
		dst = make([]byte, 0, min(plainLen, reserve))
	}
	d := c.chunkD
	if maxPlain > MaxChunkSize {
		d = c.metaD
	}
	out, err := d.DecodeAll(payload, dst[:0])
	if err != nil {
		return nil, fmt.Errorf("decompress: %v: %w", err, errs.ErrCorrupt)
	}
	if len(out) != plainLen {
		return nil, fmt.Errorf("decompressed to %d bytes, header says %d: %w", len(out), plainLen, errs.ErrCorrupt)
	}
	return out, nil
}
