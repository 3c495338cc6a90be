package repo

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// FormatVersion is the repository format this vmshadow writes and the newest
// it reads. A repository whose config says a higher version is refused with
// errs.ErrUnsupported; see docs/repository-format.md.
const FormatVersion = 1

// formatName marks a vmshadow repository config.
const formatName = "vmshadow-repository"

// Encryption and hash names as stored in the config.
const (
	EncryptionNone   = "none"
	EncryptionAESGCM = "aes-256-gcm"
	HashSHA256       = "sha256"
	HashHMACSHA256   = "hmac-sha256"
	HashBLAKE3Keyed  = "blake3-keyed" // BLAKE3 in keyed mode under the MAC key (new encrypted repositories)
	CompressionZstd  = "zstd"
)

// Chunk size limits. The default is 4 MiB.
const (
	DefaultChunkSize = 4 << 20
	MinChunkSize     = 64 << 10
	MaxChunkSize     = 64 << 20
)

// Config is the repository's plaintext description, stored as the "config"
// blob. It is readable without a password so that vmshadow knows whether to
// ask for one; key files bind themselves to its ID.
type Config struct {
	Format      string    `json:"format"`
	Version     int       `json:"version"`
	ID          string    `json:"id"`
	Created     time.Time `json:"created"`
	ChunkSize   int       `json:"chunk_size"`
	Encryption  string    `json:"encryption"`
	ChunkHash   string    `json:"chunk_hash"`
	Compression string    `json:"compression"`
}

// Encrypted reports whether the repository encrypts its blobs.
func (c Config) Encrypted() bool { return c.Encryption != EncryptionNone }

func (c Config) encode() ([]byte, error) { return json.MarshalIndent(c, "", "  ") }

// DecodeConfig parses and checks a config blob. A config of a newer format
// version is errs.ErrUnsupported; anything malformed is errs.ErrCorrupt.
func DecodeConfig(b []byte) (Config, error) {
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("repository config is not valid JSON (%v): %w", err, errs.ErrCorrupt)
	}
	if c.Format != formatName {
		return c, fmt.Errorf("repository config has format %q, want %q: not a vmshadow repository: %w", c.Format, formatName, errs.ErrCorrupt)
	}
	if c.Version > FormatVersion {
		return c, fmt.Errorf("repository format version %d is newer than this vmshadow supports (%d): upgrade vmshadow: %w", c.Version, FormatVersion, errs.ErrUnsupported)
	}
	if c.Version < 1 {
		return c, fmt.Errorf("repository config has invalid format version %d: %w", c.Version, errs.ErrCorrupt)
	}
	if _, err := ParseID(c.ID); err != nil {
		return c, fmt.Errorf("repository config has invalid id %q: %w", c.ID, errs.ErrCorrupt)
	}
	if c.ChunkSize < MinChunkSize || c.ChunkSize > MaxChunkSize || c.ChunkSize&(c.ChunkSize-1) != 0 {
		return c, fmt.Errorf("repository config has invalid chunk size %d (want a power of two from %d to %d): %w", c.ChunkSize, MinChunkSize, MaxChunkSize, errs.ErrCorrupt)
	}
	switch {
	case c.Encryption == EncryptionNone && c.ChunkHash == HashSHA256:
	case c.Encryption == EncryptionAESGCM && (c.ChunkHash == HashHMACSHA256 || c.ChunkHash == HashBLAKE3Keyed):
	default:
		return c, fmt.Errorf("repository config has unsupported encryption %q with chunk hash %q: %w", c.Encryption, c.ChunkHash, errs.ErrUnsupported)
	}
	if c.Compression != CompressionZstd {
		return c, fmt.Errorf("repository config has unsupported compression %q: %w", c.Compression, errs.ErrUnsupported)
	}
	return c, nil
}
