// Package backend owns the storage interface under a vmshadow repository:
// named blobs grouped by kind, with no file-system semantics in the contract,
// so that a local directory, memory and S3-compatible object storage all fit.
// The implementations live in subpackages (local, mem, fault, s3) and are all
// held to the shared suite in backendtest.
package backend

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Kind groups the blobs of a repository. Every blob has exactly one kind.
type Kind string

// The kinds of blob a repository holds.
const (
	KindConfig  Kind = "config"  // the single repository config blob, named "config"
	KindKeys    Kind = "keys"    // password-wrapped master keys, one blob per password
	KindChunks  Kind = "chunks"  // content-addressed data chunks
	KindIndexes Kind = "indexes" // per-disk chunk indexes
	KindBackups Kind = "backups" // backup manifests: a backup exists once its manifest does
	KindLocks   Kind = "locks"   // repository locks
	// KindQuarantine holds chunks found damaged, moved aside under their
	// chunk's name (so that a backup stores the chunk again instead of
	// reusing it); an empty blob records a chunk found missing.
	KindQuarantine Kind = "quarantine"
	// KindHealth holds the health check results of a backup, one blob per
	// backup named by its ID (repo.HealthRecord).
	KindHealth Kind = "health"
	// KindGroups holds group records: one blob per group backup (a
	// consistency group's snapshot set across several VMs), named by its
	// ID (repo.Group).
	KindGroups Kind = "groups"
)

// Kinds lists every kind.
var Kinds = []Kind{KindConfig, KindKeys, KindChunks, KindIndexes, KindBackups, KindLocks, KindQuarantine, KindHealth, KindGroups}

// Handle names one blob.
type Handle struct {
	Kind Kind
	Name string
}

func (h Handle) String() string { return string(h.Kind) + "/" + h.Name }

// Path is where the blob lives under a repository's root, with "/"
// separators, in the layout every storage backend shares
// (docs/repository-format.md): "config", "chunks/<ab>/<name>" (fanned out
// by the name's first two bytes, see Fanout), "<kind>/<name>" for the
// rest. It fails for an invalid handle, and for a config blob not named
// "config".
func (h Handle) Path() (string, error) {
	if err := h.Valid(); err != nil {
		return "", err
	}
	switch h.Kind {
	case KindConfig:
		if h.Name != "config" {
			return "", fmt.Errorf("config blob must be named \"config\", not %q: %w", h.Name, errs.ErrUsage)
		}
		return "config", nil
	case KindChunks:
		return "chunks/" + Fanout(h.Name) + "/" + h.Name, nil
	}
	return string(h.Kind) + "/" + h.Name, nil
}

// Fanout is the directory under chunks/ that holds the chunk called name.
func Fanout(name string) string {
	if len(name) < 2 {
		return "__"
	}
	return name[:2]
}

// Valid checks that the kind is known and the name is a non-empty string of
// [0-9a-z_-] of at most 128 bytes. Backends must refuse invalid handles, so
// that no name can escape its kind (no "/", no "..").
func (h Handle) Valid() error {
	ok := false
	for _, k := range Kinds {
		if h.Kind == k {
			ok = true
		}
	}
	if !ok {
		return fmt.Errorf("invalid blob kind %q: %w", h.Kind, errs.ErrUsage)
	}
	if h.Name == "" || len(h.Name) > 128 {
		return fmt.Errorf("invalid blob name %q (empty or too long): %w", h.Name, errs.ErrUsage)
	}
	for _, c := range []byte(h.Name) {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c == '_' || c == '-') {
			return fmt.Errorf("invalid blob name %q (allowed: 0-9 a-z _ -): %w", h.Name, errs.ErrUsage)
		}
	}
	return nil
}

// Info describes a stored blob.
type Info struct {
	Name string
	Size int64
	// ModTime is when the blob was last written (the object's own timestamp,
	// never its access time), on this host's clock: a backend whose
	// timestamps come from another clock (an object store's) converts them
	// by the offset it measured, so that time.Since(ModTime) is the blob's
	// age. Garbage collection compares that with its grace period.
	ModTime time.Time
}

// Backend stores named blobs. Implementations must be safe for concurrent use.
//
// Consistency: once Put returns, every reader (any process, any host) sees
// the new blob in Get, Stat and List; once Delete returns, none sees it.
// The ordering rules and the locks depend on this (see
// docs/repository-format.md); backendtest checks it.
//
// Errors: an operation on a blob that does not exist returns an error for
// which errors.Is(err, ErrNotExist) holds (and errors.Is(err,
// errs.ErrNotFound)). A write refused because the storage is full wraps
// errs.ErrNoSpace; a write refused because the storage is read-only wraps
// ErrReadOnly. Transient failures (a dropped connection, a throttling
// store) are retried by the backend itself: an error returned is final for
// that call. Every error names the blob, and none contains a credential.
type Backend interface {
	// Location describes where the repository lives, for messages.
	Location() string

	// Put stores data under h, replacing any blob of that name. It is
	// atomic: readers, during the Put and after a crash, see the old blob,
	// no blob, or the complete new blob, never a part. When Put returns nil
	// the blob's content is durable and the blob is visible to every reader;
	// that the blob survives a crash (rather than vanishing whole) is
	// guaranteed after the next Sync. Put never keeps a reference to data
	// after it returns.
	Put(ctx context.Context, h Handle, data []byte) error

	// Sync makes every blob this process stored, deleted or found with
	// Stat (such as a chunk another writer stored, which a backup reuses)
	// survive a crash. Writers call it at their ordering points: before
	// storing an index that names chunks, before storing a manifest, before
	// deleting a key file whose replacement was just stored. Object stores
	// whose Put is durable on return implement it as a no-op. (It lets the
	// local backend sync only the directories it touched, once per batch,
	// instead of once per blob.)
	Sync(ctx context.Context) error

	// Get returns length bytes of the blob from offset off; length < 0 means
	// to the end. A range past the end of the blob is an error wrapping
	// io.ErrUnexpectedEOF, never a short result.
	Get(ctx context.Context, h Handle, off, length int64) ([]byte, error)

	// Stat returns the blob's size and modification time.
	Stat(ctx context.Context, h Handle) (Info, error)

	// List calls fn for every blob of kind whose name starts with prefix, in
	// no particular order, without materialising the whole listing. A blob
	// being written concurrently may or may not be listed; an incomplete blob
	// never is. If fn returns an error, List stops and returns it.
	List(ctx context.Context, kind Kind, prefix string, fn func(Info) error) error

	// Delete removes the blob. Deleting a blob that does not exist either
	// returns nil or an error wrapping ErrNotExist (object stores answer a
	// DELETE of a missing key with success, and checking first would cost
	// a request and still race): callers treat both as done.
	Delete(ctx context.Context, h Handle) error

	// Close releases resources. The backend must not be used afterwards.
	Close() error
}

// ErrNotExist is wrapped by errors about blobs that do not exist.
var ErrNotExist = fmt.Errorf("blob does not exist: %w", errs.ErrNotFound)

// ErrReadOnly is wrapped by errors about writes to read-only storage.
var ErrReadOnly = errors.New("repository storage is read-only (check permissions and mount options)")

// IsNotExist reports whether err says a blob does not exist.
func IsNotExist(err error) bool { return errors.Is(err, ErrNotExist) }
