// Package repo owns the vmshadow repository format and its operations: the
// config and password-wrapped keys, content-addressed chunks (keyed hash,
// zstd, AES-256-GCM), per-disk fixed-chunk indexes, backup manifests, group
// records (a consistency group's backup across several VMs), locks, and the
// maintenance operations verify, prune and gc. Storage is a
// backend.Backend. The byte layouts are documented in
// docs/repository-format.md.
//
// Ordering rules every writer follows: chunks are stored (durably) before
// the index that names them, indexes before the manifest that names them;
// a backup exists once its manifest does. Readers go the other way.
package repo

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Repo is an open repository. It is safe for concurrent use.
type Repo struct {
	be      backend.Backend
	cfg     Config
	keyName string // key blob the password opened; "" when not encrypted
	codec   *codec
}

// InitOptions configure a new repository.
type InitOptions struct {
	// Encryption is EncryptionAESGCM (default) or EncryptionNone.
	Encryption string
	// ChunkSize defaults to DefaultChunkSize.
	ChunkSize int
	// Password is required when encrypted.
	Password []byte
	// KDF overrides DefaultKDF (tests use cheaper parameters).
	KDF *KDFParams
	// ChunkHash is the keyed hash of an encrypted repository:
	// HashBLAKE3Keyed (default) or HashHMACSHA256 (what repositories
	// created before BLAKE3 use). Unencrypted repositories use HashSHA256.
	ChunkHash string
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}

// Init creates a repository in an empty backend.
func Init(ctx context.Context, be backend.Backend, o InitOptions) (*Repo, error) {
	if _, err := be.Stat(ctx, backend.Handle{Kind: backend.KindConfig, Name: "config"}); err == nil {
		return nil, fmt.Errorf("%s already holds a repository: %w", be.Location(), errs.ErrUsage)
	}
	if o.Encryption == "" {
		o.Encryption = EncryptionAESGCM
	}
	if o.ChunkSize == 0 {
		o.ChunkSize = DefaultChunkSize
	}
	var rid ID
	rand.Read(rid[:])
	cfg := Config{Format: formatName, Version: FormatVersion, ID: rid.String(), Created: time.Now().UTC(),
		ChunkSize: o.ChunkSize, Encryption: o.Encryption, ChunkHash: HashSHA256, Compression: CompressionZstd}
	if o.Encryption == EncryptionAESGCM {
		cfg.ChunkHash = HashBLAKE3Keyed
		if o.ChunkHash != "" {
			cfg.ChunkHash = o.ChunkHash
		}
	} else if o.ChunkHash != "" && o.ChunkHash != HashSHA256 {
		return nil, fmt.Errorf("an unencrypted repository uses chunk hash %s, not %s: %w", HashSHA256, o.ChunkHash, errs.ErrUsage)
	}
	raw, err := cfg.encode()
	if err != nil {
		return nil, err
	}
	if _, err := DecodeConfig(raw); err != nil {
		return nil, fmt.Errorf("invalid repository options: %v: %w", err, errs.ErrUsage)
	}
	r := &Repo{be: be, cfg: cfg}
	var keys *masterKeys
	if cfg.Encrypted() {
		if len(o.Password) == 0 {
			return nil, fmt.Errorf("an encrypted repository needs a password: %w", errs.ErrUsage)
		}
		keys = newMasterKeys(cfg.ID)
		kdf := DefaultKDF
		if o.KDF != nil {
			kdf = *o.KDF
		}
		name, err := r.putKey(ctx, keys, o.Password, kdf)
		if err != nil {
			return nil, err
		}
		r.keyName = name
	}
	// The config goes last: a repository exists once its config does.
	if err := be.Sync(ctx); err != nil {
		return nil, fmt.Errorf("sync key file: %w", err)
	}
	if err := be.Put(ctx, backend.Handle{Kind: backend.KindConfig, Name: "config"}, raw); err != nil {
		return nil, fmt.Errorf("write repository config: %w", err)
	}
	if err := be.Sync(ctx); err != nil {
		return nil, fmt.Errorf("sync repository config: %w", err)
	}
	r.codec = newCodec(keys, cfg.ChunkHash)
	return r, nil
}

func (r *Repo) putKey(ctx context.Context, k *masterKeys, password []byte, kdf KDFParams) (string, error) {
	blob, err := wrapKeys(k, password, kdf, hostname())
	if err != nil {
		return "", err
	}
	var n ID
	rand.Read(n[:])
	name := n.String()
	if err := r.be.Put(ctx, backend.Handle{Kind: backend.KindKeys, Name: name}, blob); err != nil {
		return "", fmt.Errorf("write key file: %w", err)
	}
	return name, nil
}

// Open opens an existing repository. password is called only when the
// repository is encrypted. A password that opens no key file is errs.ErrAuth
// when every key file is intact; when one is damaged (its checksum does not
// match) or unreadable, it is that error's class (errs.ErrCorrupt for
// damage), since whether the password was right for it cannot be known. A
// repository of a newer format is errs.ErrUnsupported.
func Open(ctx context.Context, be backend.Backend, password func() ([]byte, error)) (*Repo, error) {
	raw, err := be.Get(ctx, backend.Handle{Kind: backend.KindConfig, Name: "config"}, 0, -1)
	if err != nil {
		if backend.IsNotExist(err) {
			return nil, fmt.Errorf("%s is not a vmshadow repository (no config; create one with 'vmshadow repo init'): %w", be.Location(), errs.ErrNotFound)
		}
		return nil, fmt.Errorf("read repository config: %w", err)
	}
	cfg, err := DecodeConfig(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", be.Location(), err)
	}
	r := &Repo{be: be, cfg: cfg}
	if !cfg.Encrypted() {
		r.codec = newCodec(nil, cfg.ChunkHash)
		return r, nil
	}
	pw, err := password()
	if err != nil {
		return nil, err
	}
	var names []string
	err = be.List(ctx, backend.KindKeys, "", func(fi backend.Info) error {
		names = append(names, fi.Name)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list key files: %w", err)
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("repository %s has no key files: %w", be.Location(), errs.ErrCorrupt)
	}
	sort.Strings(names)
	var errList []error
	legacy := 0 // key files without a checksum the password did not open
	for _, n := range names {
		b, err := be.Get(ctx, backend.Handle{Kind: backend.KindKeys, Name: n}, 0, -1)
		if err != nil {
			errList = append(errList, fmt.Errorf("key file %s: %w", n, err))
			continue
		}
		kf, err := decodeKeyFile(b)
		if err != nil {
			errList = append(errList, fmt.Errorf("key file %s: %w", n, err))
			continue
		}
		keys, err := kf.unwrap(pw)
		if errors.Is(err, errs.ErrAuth) {
			if kf.Check == "" {
				legacy++
			}
			continue
		}
		if err != nil {
			errList = append(errList, fmt.Errorf("key file %s: %w", n, err))
			continue
		}
		if keys.RepoID != cfg.ID {
			errList = append(errList, fmt.Errorf("key file %s belongs to repository %s, not %s: %w", n, keys.RepoID, cfg.ID, errs.ErrCorrupt))
			continue
		}
		r.keyName = n
		r.codec = newCodec(keys, cfg.ChunkHash)
		return r, nil
	}
	if len(errList) > 0 {
		// Whether the password is right for a damaged key file cannot be
		// known: say so, and report the damage (not a wrong password).
		others := ""
		if k := len(names) - len(errList); k > 0 {
			others = fmt.Sprintf("; the password opens none of the other %d key files", k)
		}
		return nil, fmt.Errorf("cannot open repository %s: %d of its %d key files cannot be used%s; whether the password is right for the damaged ones cannot be told. Restore keys/ from a copy, or use the password of another key file: %w",
			be.Location(), len(errList), len(names), others, errors.Join(errList...))
	}
	if legacy > 0 {
		return nil, fmt.Errorf("wrong password for repository %s (it opens none of its %d key files; %d of them were written without a checksum, so damage to those would look the same): %w", be.Location(), len(names), legacy, errs.ErrAuth)
	}
	return nil, fmt.Errorf("wrong password for repository %s (it opens none of its %d key files): %w", be.Location(), len(names), errs.ErrAuth)
}

// Close releases the repository's resources (not the backend).
func (r *Repo) Close() { r.codec.close() }

// Config returns the repository config.
func (r *Repo) Config() Config { return r.cfg }

// Backend returns the storage backend.
func (r *Repo) Backend() backend.Backend { return r.be }

// ChunkSize is the chunk size new backups use.
func (r *Repo) ChunkSize() int64 { return int64(r.cfg.ChunkSize) }

// ChangePassword wraps the master keys under a new password in a new key
// file, makes it durable, then deletes every other key file: the one the
// repository was opened with, and any an interrupted ChangePassword left
// (a repository has one password; each key file is one password). Hold an
// exclusive lock. It returns the new key file's name.
func (r *Repo) ChangePassword(ctx context.Context, newPassword []byte, kdf *KDFParams) (string, error) {
	if !r.cfg.Encrypted() {
		return "", fmt.Errorf("repository is not encrypted: it has no password: %w", errs.ErrUsage)
	}
	if len(newPassword) == 0 {
		return "", fmt.Errorf("the new password is empty: %w", errs.ErrUsage)
	}
	p := DefaultKDF
	if kdf != nil {
		p = *kdf
	}
	keys := &masterKeys{RepoID: r.cfg.ID, Encrypt: r.codec.encKey, MAC: r.codec.macKey}
	name, err := r.putKey(ctx, keys, newPassword, p)
	if err != nil {
		return "", err
	}
	// The new key file must survive a crash before the old one goes.
	if err := r.be.Sync(ctx); err != nil {
		return "", fmt.Errorf("sync new key file: %w", err)
	}
	crashpoint.Hit("passwd-key-written")
	var old []string
	err = r.be.List(ctx, backend.KindKeys, "", func(fi backend.Info) error {
		if fi.Name != name {
			old = append(old, fi.Name)
		}
		return nil
	})
	if err != nil {
		return name, fmt.Errorf("new key file %s written, but listing the old key files failed (old passwords still work until they are removed; run repo passwd again): %w", name, err)
	}
	for _, n := range old {
		if err := r.be.Delete(ctx, backend.Handle{Kind: backend.KindKeys, Name: n}); err != nil && !backend.IsNotExist(err) {
			return name, fmt.Errorf("new key file %s written, but removing the old key file %s failed (its password still works until it is removed; run repo passwd again): %w", name, n, err)
		}
	}
	r.keyName = name
	return name, nil
}

func chunkHandle(id ID) backend.Handle {
	return backend.Handle{Kind: backend.KindChunks, Name: id.String()}
}

// HashChunk returns the ID of a chunk's plaintext.
func (r *Repo) HashChunk(plain []byte) ID { return r.codec.hash(plain) }

// SealChunk compresses (when it helps) and encrypts a chunk for storage,
// reusing dst (which must not overlap plain) when large enough. id must be
// HashChunk(plain).
func (r *Repo) SealChunk(dst []byte, id ID, plain []byte) []byte {
	return r.codec.seal(dst, magicChunk, id.String(), plain, true)
}

// PutChunk stores a sealed chunk durably.
func (r *Repo) PutChunk(ctx context.Context, id ID, sealed []byte) error {
	if err := r.be.Put(ctx, chunkHandle(id), sealed); err != nil {
		return fmt.Errorf("store chunk %s: %w", id, err)
	}
	return nil
}

// HasChunk reports whether the chunk id, whose plaintext is plainLen bytes,
// is stored, as far as its size tells: a backup reuses a stored chunk
// without reading it. A blob whose size no sealed chunk of plainLen bytes
// can have (empty, shorter than the envelope, longer than the plaintext
// stored uncompressed) counts as absent, so that the backup stores it
// again; so does a chunk in quarantine (it was moved aside). Damage that
// keeps the size plausible (a flipped byte, a compressed chunk cut short)
// is not noticed here: a read (verify, restore) finds it and quarantines
// the chunk.
func (r *Repo) HasChunk(ctx context.Context, id ID, plainLen int) (bool, error) {
	fi, err := r.be.Stat(ctx, chunkHandle(id))
	if backend.IsNotExist(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up chunk %s: %w", id, err)
	}
	lo, hi := r.sealedBounds(plainLen)
	return fi.Size >= lo && fi.Size <= hi, nil
}

// sealedBounds is the range of sizes a sealed chunk of plainLen bytes can
// have: the envelope plus at least one byte of payload, at most the
// plaintext stored as is (compression is kept only when it makes the
// payload smaller).
func (r *Repo) sealedBounds(plainLen int) (lo, hi int64) {
	env := int64(headerLen)
	if r.cfg.Encrypted() {
		env += nonceLen + tagLen
	}
	lo = env + 1
	if plainLen == 0 {
		lo = env
	}
	return lo, env + int64(plainLen)
}

// ReadChunk fetches, decrypts, decompresses and verifies a chunk, returning
// its plaintext in dst's storage when large enough. A chunk whose content
// does not hash to its ID is errs.ErrCorrupt, and is moved to the
// quarantine (see quarantineChunk) so the next backup stores it again; a
// missing one is errs.ErrNotFound.
func (r *Repo) ReadChunk(ctx context.Context, id ID, dst []byte) ([]byte, error) {
	blob, err := r.be.Get(ctx, chunkHandle(id), 0, -1)
	if err != nil {
		if backend.IsNotExist(err) {
			return nil, fmt.Errorf("chunk %s is missing: %w", id, errs.ErrNotFound)
		}
		return nil, fmt.Errorf("read chunk %s: %w", id, err)
	}
	p, err := r.OpenChunk(id, blob, dst)
	if errors.Is(err, errs.ErrCorrupt) {
		return nil, fmt.Errorf("%w%s", err, r.quarantineNote(ctx, id))
	}
	return p, err
}

// OpenChunk decodes and verifies a sealed chunk (as stored under id).
func (r *Repo) OpenChunk(id ID, blob, dst []byte) ([]byte, error) {
	p, err := r.codec.open(dst, magicChunk, id.String(), blob, r.cfg.ChunkSize)
	if err != nil {
		return nil, fmt.Errorf("chunk %s: %w", id, err)
	}
	if r.codec.hash(p) != id {
		return nil, fmt.Errorf("chunk %s: content does not match its hash: %w", id, errs.ErrCorrupt)
	}
	return p, nil
}

// SaveIndex stores an index (if an identical one is not stored yet) and
// returns its ID. Store its chunks first: SaveIndex makes every blob stored
// before it durable before it stores the index.
func (r *Repo) SaveIndex(ctx context.Context, x *Index) (ID, error) {
	if err := r.be.Sync(ctx); err != nil {
		return ID{}, fmt.Errorf("make chunks durable before their index: %w", err)
	}
	plain := x.Encode()
	id := r.codec.hash(plain)
	h := backend.Handle{Kind: backend.KindIndexes, Name: id.String()}
	// An identical index (the same disk content backed up before) is
	// reused only when it reads back intact: indexes are small, and a
	// damaged one must not be what the new manifest names.
	if _, err := r.LoadIndex(ctx, id); err == nil {
		return id, nil
	}
	if err := r.be.Put(ctx, h, r.codec.seal(nil, magicIndex, h.Name, plain, true)); err != nil {
		return id, fmt.Errorf("store index %s: %w", id, err)
	}
	return id, nil
}

// LoadIndex fetches and verifies an index.
func (r *Repo) LoadIndex(ctx context.Context, id ID) (*Index, error) {
	h := backend.Handle{Kind: backend.KindIndexes, Name: id.String()}
	blob, err := r.be.Get(ctx, h, 0, -1)
	if err != nil {
		if backend.IsNotExist(err) {
			return nil, fmt.Errorf("index %s is missing: %w", id, errs.ErrNotFound)
		}
		return nil, fmt.Errorf("read index %s: %w", id, err)
	}
	p, err := r.codec.open(nil, magicIndex, h.Name, blob, maxMetaPlain)
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", id, err)
	}
	if r.codec.hash(p) != id {
		return nil, fmt.Errorf("index %s: content does not match its hash: %w", id, errs.ErrCorrupt)
	}
	x, err := DecodeIndex(p)
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", id, err)
	}
	return x, nil
}

// SaveManifest completes (version, nonce), checks and stores a manifest,
// creating the backup, and returns the backup ID. Store its indexes first:
// SaveManifest makes every blob stored before it durable, stores the
// manifest, and makes it durable before returning.
func (r *Repo) SaveManifest(ctx context.Context, m *Manifest) (ID, error) {
	if err := r.be.Sync(ctx); err != nil {
		return ID{}, fmt.Errorf("make indexes durable before the manifest: %w", err)
	}
	m.Version = 1
	if len(m.Files) > 0 {
		m.Version = 2
	}
	if m.Nonce == "" {
		var n [16]byte
		rand.Read(n[:])
		m.Nonce = fmt.Sprintf("%x", n)
	}
	if err := m.Check(); err != nil {
		return ID{}, err
	}
	plain, err := json.Marshal(m)
	if err != nil {
		return ID{}, err
	}
	if len(plain) > maxManifestPlain {
		return ID{}, fmt.Errorf("manifest of %d bytes exceeds the limit of %d bytes (too many disks): %w", len(plain), maxManifestPlain, errs.ErrUsage)
	}
	id := r.codec.hash(plain)
	h := backend.Handle{Kind: backend.KindBackups, Name: id.String()}
	if err := r.be.Put(ctx, h, r.codec.seal(nil, magicManifest, h.Name, plain, true)); err != nil {
		return id, fmt.Errorf("store manifest of backup %s: %w", id.Short(), err)
	}
	if err := r.be.Sync(ctx); err != nil {
		return id, fmt.Errorf("make manifest of backup %s durable: %w", id.Short(), err)
	}
	return id, nil
}

// LoadManifest fetches and verifies a backup's manifest.
func (r *Repo) LoadManifest(ctx context.Context, id ID) (*Manifest, error) {
	h := backend.Handle{Kind: backend.KindBackups, Name: id.String()}
	blob, err := r.be.Get(ctx, h, 0, -1)
	if err != nil {
		if backend.IsNotExist(err) {
			return nil, fmt.Errorf("backup %s not found: %w", id.Short(), errs.ErrNotFound)
		}
		return nil, fmt.Errorf("read manifest of backup %s: %w", id.Short(), err)
	}
	p, err := r.codec.open(nil, magicManifest, h.Name, blob, maxManifestPlain)
	if err != nil {
		return nil, fmt.Errorf("manifest of backup %s: %w", id.Short(), err)
	}
	if r.codec.hash(p) != id {
		return nil, fmt.Errorf("manifest of backup %s: content does not match its hash: %w", id.Short(), errs.ErrCorrupt)
	}
	m, err := DecodeManifest(p)
	if err != nil {
		return nil, fmt.Errorf("manifest of backup %s: %w", id.Short(), err)
	}
	return m, nil
}

// Backup is a stored backup.
type Backup struct {
	ID ID
	*Manifest
}

// Identity is what a backup and its copies in other repositories share:
// its origin when it is a copy, else its own ID.
func (b *Backup) Identity() string {
	if b.Origin != "" {
		return b.Origin
	}
	return b.ID.String()
}

// ListBackups loads every manifest, sorted by time (oldest first). Manifests
// that cannot be read are returned in bad, keyed by backup ID.
func (r *Repo) ListBackups(ctx context.Context) (backups []Backup, bad map[ID]error, err error) {
	ids, err := r.backupIDs(ctx, "")
	if err != nil {
		return nil, nil, err
	}
	return loadSorted(ctx, ids, func(id ID) (Backup, time.Time, error) {
		m, err := r.LoadManifest(ctx, id)
		if err != nil {
			return Backup{}, time.Time{}, err
		}
		return Backup{ID: id, Manifest: m}, m.Time, nil
	})
}

// loadSorted loads each of ids with load, sorted by the time load gives
// (oldest first, then by ID); those that cannot be read are returned in
// bad, keyed by ID.
func loadSorted[E any](ctx context.Context, ids []ID, load func(ID) (E, time.Time, error)) (list []E, bad map[ID]error, err error) {
	type entry struct {
		e    E
		id   ID
		when time.Time
	}
	var es []entry
	bad = map[ID]error{}
	for _, id := range ids {
		e, when, err := load(id)
		if err != nil {
			if ctx.Err() != nil {
				return nil, nil, ctx.Err()
			}
			bad[id] = err
			continue
		}
		es = append(es, entry{e, id, when})
	}
	sort.SliceStable(es, func(i, j int) bool {
		if !es[i].when.Equal(es[j].when) {
			return es[i].when.Before(es[j].when)
		}
		return es[i].id.String() < es[j].id.String()
	})
	for _, e := range es {
		list = append(list, e.e)
	}
	return list, bad, nil
}

// BackupIDs lists the IDs of the stored backups (their manifests are not
// read).
func (r *Repo) BackupIDs(ctx context.Context) ([]ID, error) { return r.backupIDs(ctx, "") }

func (r *Repo) backupIDs(ctx context.Context, prefix string) ([]ID, error) {
	return r.blobIDs(ctx, backend.KindBackups, "backups", prefix)
}

// blobIDs lists the IDs of kind's blobs whose names start with prefix
// (what names them in an error).
func (r *Repo) blobIDs(ctx context.Context, kind backend.Kind, what, prefix string) ([]ID, error) {
	var ids []ID
	err := r.be.List(ctx, kind, prefix, func(fi backend.Info) error {
		if id, err := ParseID(fi.Name); err == nil {
			ids = append(ids, id)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", what, err)
	}
	return ids, nil
}

// FindBackup resolves a backup ID or an unambiguous prefix of one.
func (r *Repo) FindBackup(ctx context.Context, prefix string) (ID, error) {
	return r.findID(ctx, backend.KindBackups, "backup", "vmshadow backups", prefix)
}

// findID resolves an ID or an unambiguous prefix of one among kind's
// blobs; what names them in errors, list is the command that lists them.
func (r *Repo) findID(ctx context.Context, kind backend.Kind, what, list, prefix string) (ID, error) {
	p := strings.ToLower(prefix)
	if p == "" || len(p) > 64 || strings.Trim(p, "0123456789abcdef") != "" {
		return ID{}, fmt.Errorf("invalid %s id %q: want hex digits: %w", what, prefix, errs.ErrUsage)
	}
	ids, err := r.blobIDs(ctx, kind, what+"s", p)
	if err != nil {
		return ID{}, err
	}
	switch len(ids) {
	case 0:
		return ID{}, fmt.Errorf("%s %s not found (list them with '%s'): %w", what, prefix, list, errs.ErrNotFound)
	case 1:
		return ids[0], nil
	}
	var s []string
	for _, id := range ids {
		s = append(s, id.Short())
	}
	sort.Strings(s)
	return ID{}, fmt.Errorf("%s id prefix %q is ambiguous (matches %s): give more digits: %w", what, prefix, strings.Join(s, ", "), errs.ErrUsage)
}

// LatestBackup returns the newest backup of vm made in this repository
// (copies from another repository, which have an Origin, are skipped: their
// change tracking belongs to the other repository's chain) for which match
// (if not nil) returns true, or errs.ErrNotFound. A live incremental backup
// uses it to find the previous backup of its chain.
func (r *Repo) LatestBackup(ctx context.Context, vm string, match func(*Backup) bool) (*Backup, error) {
	backups, _, err := r.ListBackups(ctx)
	if err != nil {
		return nil, err
	}
	for i := len(backups) - 1; i >= 0; i-- {
		b := &backups[i]
		if b.VM == vm && b.Origin == "" && (match == nil || match(b)) {
			return b, nil
		}
	}
	return nil, fmt.Errorf("no backup of VM %q: %w", vm, errs.ErrNotFound)
}
