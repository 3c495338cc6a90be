package repo

import (
	"encoding/hex"
	"fmt"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// ID names a chunk, index or backup: the (keyed, when encrypted) SHA-256 of
// its plaintext. The zero ID in an index means "all-zero chunk, not stored".
type ID [32]byte

// String is the lower-case hex form used as the blob name.
func (id ID) String() string { return hex.EncodeToString(id[:]) }

// Short is the first 8 hex digits, for display.
func (id ID) Short() string { return id.String()[:8] }

// IsZero reports whether id is the zero-chunk marker.
func (id ID) IsZero() bool { return id == ID{} }

// ParseID parses a full 64-digit hex ID.
func ParseID(s string) (ID, error) {
	var id ID
	if len(s) != 64 {
		return id, fmt.Errorf("invalid id %q: want 64 hex digits: %w", s, errs.ErrUsage)
	}
	if _, err := hex.Decode(id[:], []byte(s)); err != nil {
		return id, fmt.Errorf("invalid id %q: %w", s, errs.ErrUsage)
	}
	if id.String() != s {
		return id, fmt.Errorf("invalid id %q: use lower-case hex: %w", s, errs.ErrUsage)
	}
	return id, nil
}
