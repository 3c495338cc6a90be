package repo

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"golang.org/x/crypto/argon2"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// KDFParams are the Argon2id parameters that turn a password into the key
// encryption key (KEK) of one key file. They are stored in the key file.
type KDFParams struct {
	Name      string `json:"name"` // "argon2id"
	Time      uint32 `json:"time"`
	MemoryKiB uint32 `json:"memory_kib"`
	Threads   uint8  `json:"threads"`
	Salt      []byte `json:"salt"`
}

// DefaultKDF is what new key files use: Argon2id with 3 passes over 64 MiB
// and 4 lanes (RFC 9106's second recommended option), 32-byte random salt.
var DefaultKDF = KDFParams{Name: "argon2id", Time: 3, MemoryKiB: 64 << 10, Threads: 4}

// Limits accepted when reading a key file, so a hostile key file cannot make
// vmshadow allocate unbounded memory or spin for hours.
const (
	minKDFMemoryKiB = 8 << 10
	maxKDFMemoryKiB = 4 << 20
	maxKDFTime      = 64
)

func (p KDFParams) check() error {
	switch {
	case p.Name != "argon2id":
		return fmt.Errorf("key file uses unsupported KDF %q: %w", p.Name, errs.ErrUnsupported)
	case p.Time < 1 || p.Time > maxKDFTime:
		return fmt.Errorf("key file KDF time %d outside 1..%d: %w", p.Time, maxKDFTime, errs.ErrCorrupt)
	case p.MemoryKiB < minKDFMemoryKiB || p.MemoryKiB > maxKDFMemoryKiB:
		return fmt.Errorf("key file KDF memory %d KiB outside %d..%d: %w", p.MemoryKiB, minKDFMemoryKiB, maxKDFMemoryKiB, errs.ErrCorrupt)
	case p.Threads < 1:
		return fmt.Errorf("key file KDF threads 0: %w", errs.ErrCorrupt)
	case len(p.Salt) < 16 || len(p.Salt) > 64:
		return fmt.Errorf("key file salt of %d bytes (want 16..64): %w", len(p.Salt), errs.ErrCorrupt)
	}
	return nil
}

func (p KDFParams) derive(password []byte) []byte {
	return argon2.IDKey(password, p.Salt, p.Time, p.MemoryKiB, p.Threads, 32)
}

// masterKeys are the repository's random secrets, the same in every key file.
type masterKeys struct {
	RepoID  string `json:"repo_id"`
	Encrypt []byte `json:"encrypt"` // AES-256-GCM key for every sealed blob
	MAC     []byte `json:"mac"`     // HMAC-SHA256 key for chunk, index and backup IDs
}

func newMasterKeys(repoID string) *masterKeys {
	k := &masterKeys{RepoID: repoID, Encrypt: make([]byte, 32), MAC: make([]byte, 32)}
	rand.Read(k.Encrypt)
	rand.Read(k.MAC)
	return k
}

// keyFile is the JSON form of a key blob: the master keys sealed with
// AES-256-GCM under a KEK derived from one password.
type keyFile struct {
	Version int       `json:"version"`
	Created time.Time `json:"created"`
	Host    string    `json:"host,omitempty"`
	KDF     KDFParams `json:"kdf"`
	AEAD    string    `json:"aead"` // "aes-256-gcm"
	Nonce   []byte    `json:"nonce"`
	Data    []byte    `json:"data"`
	// Check is the hex SHA-256 of the key file's compact JSON encoding
	// without this field (json.Marshal of the other fields, in this
	// order). It is not secret and needs no password: it tells a damaged
	// key file from a wrong password, which AES-GCM alone cannot (both
	// fail authentication). Key files written before it have none.
	Check string `json:"check,omitempty"`
}

// checksum is what Check must be for kf.
func (kf keyFile) checksum() string {
	kf.Check = ""
	b, err := json.Marshal(kf)
	if err != nil {
		return "" // cannot happen: every field marshals
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

const keyFileVersion = 1

// keyAD is the associated data of the wrapped master keys.
const keyAD = "vmshadow key file v1"

func wrapKeys(k *masterKeys, password []byte, p KDFParams, host string) ([]byte, error) {
	p.Salt = make([]byte, 32)
	rand.Read(p.Salt)
	if err := p.check(); err != nil {
		return nil, err
	}
	plain, err := json.Marshal(k)
	if err != nil {
		return nil, err
	}
	aead := newGCM(p.derive(password))
	nonce := make([]byte, aead.NonceSize())
	rand.Read(nonce)
	kf := keyFile{Version: keyFileVersion, Created: time.Now().UTC(), Host: host, KDF: p,
		AEAD: EncryptionAESGCM, Nonce: nonce, Data: aead.Seal(nil, nonce, plain, []byte(keyAD))}
	kf.Check = kf.checksum()
	return json.MarshalIndent(kf, "", "  ")
}

// decodeKeyFile parses and checks a key blob without deriving anything. A
// key file that is not valid JSON, or whose checksum does not match, is
// errs.ErrCorrupt: it was damaged after it was written.
func decodeKeyFile(b []byte) (*keyFile, error) {
	var kf keyFile
	if err := json.Unmarshal(b, &kf); err != nil {
		return nil, fmt.Errorf("key file is damaged: not valid JSON (%v): %w", err, errs.ErrCorrupt)
	}
	if kf.Check != "" && kf.Check != kf.checksum() {
		return nil, fmt.Errorf("key file is damaged: its content does not match its checksum (it changed after it was written): %w", errs.ErrCorrupt)
	}
	if kf.Version > keyFileVersion {
		return nil, fmt.Errorf("key file version %d is newer than this vmshadow supports (%d): %w", kf.Version, keyFileVersion, errs.ErrUnsupported)
	}
	if kf.Version < 1 {
		return nil, fmt.Errorf("key file has invalid version %d: %w", kf.Version, errs.ErrCorrupt)
	}
	if kf.AEAD != EncryptionAESGCM {
		return nil, fmt.Errorf("key file uses unsupported cipher %q: %w", kf.AEAD, errs.ErrUnsupported)
	}
	if err := kf.KDF.check(); err != nil {
		return nil, err
	}
	if len(kf.Nonce) != 12 || len(kf.Data) < 16 {
		return nil, fmt.Errorf("key file has a malformed nonce or payload: %w", errs.ErrCorrupt)
	}
	return &kf, nil
}

// unwrap derives the KEK from password and opens the master keys. A wrong
// password is errs.ErrAuth. (A key file without a checksum that was
// damaged also fails so: the two cannot be told apart.)
func (kf *keyFile) unwrap(password []byte) (*masterKeys, error) {
	aead := newGCM(kf.KDF.derive(password))
	plain, err := aead.Open(nil, kf.Nonce, kf.Data, []byte(keyAD))
	if err != nil {
		if kf.Check == "" {
			return nil, fmt.Errorf("wrong password (or the key file, written without a checksum, is damaged): %w", errs.ErrAuth)
		}
		return nil, fmt.Errorf("wrong password: %w", errs.ErrAuth)
	}
	var k masterKeys
	if err := json.Unmarshal(plain, &k); err != nil || len(k.Encrypt) != 32 || len(k.MAC) != 32 {
		return nil, fmt.Errorf("key file decrypts to malformed master keys: %w", errs.ErrCorrupt)
	}
	return &k, nil
}

func newGCM(key []byte) cipher.AEAD {
	b, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // only on a key length other than 16/24/32, a programming error
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return g
}
