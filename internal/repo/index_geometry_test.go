package repo

import (
	"errors"
	"math"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// TestNewIndexSizes: a size that cannot be indexed is an error, never a
// panic, whatever the number (a directory opened as a disk image reports
// math.MaxInt64 bytes).
func TestNewIndexSizes(t *testing.T) {
	for _, tc := range []struct {
		size, chunk int64
		class       *errs.Class // nil: accepted
	}{
		{0, MinChunkSize, nil},
		{1, MinChunkSize, nil},
		{MinChunkSize * 3, MinChunkSize, nil},
		{math.MaxInt64, MinChunkSize, errs.ErrUnsupported},
		{math.MaxInt64, MaxChunkSize, errs.ErrUnsupported},
		{math.MaxInt64 - MaxChunkSize + 2, MaxChunkSize, errs.ErrUnsupported},
		{1 << 62, DefaultChunkSize, errs.ErrUnsupported},
		{(maxMetaPlain-indexHeaderLen)/32*MinChunkSize + 1, MinChunkSize, errs.ErrUnsupported},
		{-1, MinChunkSize, errs.ErrUsage},
		{math.MinInt64, MinChunkSize, errs.ErrUsage},
		{1, 0, errs.ErrUsage},
		{1, MinChunkSize + 1, errs.ErrUsage},
	} {
		x, err := NewIndex(tc.size, tc.chunk)
		switch {
		case tc.class == nil && err != nil:
			t.Errorf("NewIndex(%d, %d): %v", tc.size, tc.chunk, err)
		case tc.class != nil && !errors.Is(err, tc.class):
			t.Errorf("NewIndex(%d, %d) = %v; want %v", tc.size, tc.chunk, err, tc.class)
		case tc.class == nil && int64(x.Len()) != (tc.size+tc.chunk-1)/tc.chunk:
			t.Errorf("NewIndex(%d, %d) has %d entries", tc.size, tc.chunk, x.Len())
		}
	}
}
