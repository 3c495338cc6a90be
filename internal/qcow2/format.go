// Package qcow2 owns vmshadow's qcow2 image code: a streaming Writer that
// produces a sparse version 3 qcow2 image from data written at any guest
// offset (used by `restore --format qcow2`, with no raw temporary file and no
// qemu-img in the data path), and a Reader for plain qcow2 images (no backing
// file, no compression, no encryption) used by tests and later by overlays.
//
// The format is QEMU's docs/interop/qcow2.txt. The Writer's file layout:
//
//	cluster 0              header (+ end of header extensions)
//	clusters 1..k          L1 table (fixed size, known from the virtual size)
//	then, in order of use  L2 tables and data clusters, never freed or moved
//	at Close               refcount blocks, then the refcount table
//
// Because host clusters are only ever appended, every cluster below the end
// of the file is referenced exactly once and has refcount 1; Close writes the
// refcount structures from that fact alone, with no per-cluster state.
package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"

	"github.com/vmshadow/vmshadow/internal/errs"
)

const (
	magic = 0x514649fb // "QFI\xfb"

	// DefaultClusterSize is the cluster size used when Options.ClusterSize is 0.
	DefaultClusterSize = 64 << 10
	minClusterBits     = 9  // 512 bytes, the format's minimum
	maxClusterBits     = 21 // 2 MiB, QEMU's implementation limit

	// maxL1Bytes is QEMU's limit on the L1 table size (QCOW_MAX_L1_SIZE).
	maxL1Bytes = 32 << 20
	// maxHostOffset: L1/L2 entries hold host offsets below 2^56 (64 PB).
	maxHostOffset = 1 << 56

	headerLenV3  = 104 // version 3 header without optional fields
	headerLenV2  = 72
	refcountBits = 16
	refcountOrd  = 4 // log2(refcountBits)

	// Incompatible feature bits we handle. The others (2: external data
	// file, 4: extended L2 entries, unknown ones) make an image unreadable.
	incDirty       = 1 << 0
	incCorrupt     = 1 << 1
	incCompression = 1 << 3

	// L1 and L2 entry bits.
	flagCopied     = 1 << 63 // refcount is exactly one
	flagCompressed = 1 << 62 // L2 only
	flagZero       = 1 << 0  // L2 only, version 3: cluster reads as zeros
	offsetMask     = 0x00ff_ffff_ffff_fe00
	l1Reserved     = 0x7f00_0000_0000_01ff // bits 0-8 and 56-62
	l2Reserved     = 0x3f00_0000_0000_01fe // bits 1-8 and 56-61 (standard clusters)
)

// header is the fixed part of a qcow2 header (versions 2 and 3).
type header struct {
	version               uint32
	backingFileOffset     uint64
	backingFileSize       uint32
	clusterBits           uint32
	size                  uint64
	cryptMethod           uint32
	l1Size                uint32
	l1TableOffset         uint64
	refcountTableOffset   uint64
	refcountTableClusters uint32
	nbSnapshots           uint32
	snapshotsOffset       uint64
	incompatible          uint64
	compatible            uint64
	autoclear             uint64
	refcountOrder         uint32
	headerLength          uint32
}

// marshal encodes a version 3 header followed by the end-of-extensions
// marker (8 zero bytes).
func (h *header) marshal() []byte {
	b := make([]byte, headerLenV3+8)
	be := binary.BigEndian
	be.PutUint32(b[0:], magic)
	be.PutUint32(b[4:], h.version)
	be.PutUint64(b[8:], h.backingFileOffset)
	be.PutUint32(b[16:], h.backingFileSize)
	be.PutUint32(b[20:], h.clusterBits)
	be.PutUint64(b[24:], h.size)
	be.PutUint32(b[32:], h.cryptMethod)
	be.PutUint32(b[36:], h.l1Size)
	be.PutUint64(b[40:], h.l1TableOffset)
	be.PutUint64(b[48:], h.refcountTableOffset)
	be.PutUint32(b[56:], h.refcountTableClusters)
	be.PutUint32(b[60:], h.nbSnapshots)
	be.PutUint64(b[64:], h.snapshotsOffset)
	be.PutUint64(b[72:], h.incompatible)
	be.PutUint64(b[80:], h.compatible)
	be.PutUint64(b[88:], h.autoclear)
	be.PutUint32(b[96:], h.refcountOrder)
	be.PutUint32(b[100:], h.headerLength)
	return b
}

// parseHeader decodes and validates the header in b, which holds at least the
// first headerLenV3 bytes of the file (or the whole file if shorter). It
// checks only what does not depend on the rest of the file.
func parseHeader(b []byte) (*header, error) {
	if len(b) < headerLenV2 {
		return nil, fmt.Errorf("qcow2: file of %d bytes is too short for a header: %w", len(b), errs.ErrCorrupt)
	}
	be := binary.BigEndian
	if m := be.Uint32(b[0:]); m != magic {
		return nil, fmt.Errorf("qcow2: bad magic %#08x, not a qcow2 image: %w", m, errs.ErrCorrupt)
	}
	h := &header{
		version:               be.Uint32(b[4:]),
		backingFileOffset:     be.Uint64(b[8:]),
		backingFileSize:       be.Uint32(b[16:]),
		clusterBits:           be.Uint32(b[20:]),
		size:                  be.Uint64(b[24:]),
		cryptMethod:           be.Uint32(b[32:]),
		l1Size:                be.Uint32(b[36:]),
		l1TableOffset:         be.Uint64(b[40:]),
		refcountTableOffset:   be.Uint64(b[48:]),
		refcountTableClusters: be.Uint32(b[56:]),
		nbSnapshots:           be.Uint32(b[60:]),
		snapshotsOffset:       be.Uint64(b[64:]),
		refcountOrder:         refcountOrd,
		headerLength:          headerLenV2,
	}
	switch h.version {
	case 2:
	case 3:
		if len(b) < headerLenV3 {
			return nil, fmt.Errorf("qcow2: file of %d bytes is too short for a version 3 header: %w", len(b), errs.ErrCorrupt)
		}
		h.incompatible = be.Uint64(b[72:])
		h.compatible = be.Uint64(b[80:])
		h.autoclear = be.Uint64(b[88:])
		h.refcountOrder = be.Uint32(b[96:])
		h.headerLength = be.Uint32(b[100:])
	default:
		return nil, fmt.Errorf("qcow2: version %d is not supported (only 2 and 3): %w", h.version, errs.ErrUnsupported)
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, fmt.Errorf("qcow2: cluster_bits %d out of range %d..%d: %w", h.clusterBits, minClusterBits, maxClusterBits, errs.ErrCorrupt)
	}
	cs := uint64(1) << h.clusterBits
	if h.version == 3 && (h.headerLength < headerLenV3 || h.headerLength%8 != 0 || uint64(h.headerLength) > cs) {
		return nil, fmt.Errorf("qcow2: bad header_length %d: %w", h.headerLength, errs.ErrCorrupt)
	}
	if h.refcountOrder > 6 {
		return nil, fmt.Errorf("qcow2: refcount_order %d is above 6: %w", h.refcountOrder, errs.ErrCorrupt)
	}
	if h.size > 1<<62 {
		return nil, fmt.Errorf("qcow2: virtual size %d is impossibly large: %w", h.size, errs.ErrCorrupt)
	}
	if h.l1TableOffset%cs != 0 || h.refcountTableOffset%cs != 0 {
		return nil, fmt.Errorf("qcow2: L1 table offset %#x or refcount table offset %#x not cluster aligned: %w",
			h.l1TableOffset, h.refcountTableOffset, errs.ErrCorrupt)
	}
	if uint64(h.l1Size)*8 > maxL1Bytes {
		return nil, fmt.Errorf("qcow2: L1 table of %d entries is above the 32 MiB limit: %w", h.l1Size, errs.ErrCorrupt)
	}
	if need := l1Entries(h.size, uint(h.clusterBits)); uint64(h.l1Size) < need {
		return nil, fmt.Errorf("qcow2: L1 table of %d entries cannot map virtual size %d (needs %d): %w",
			h.l1Size, h.size, need, errs.ErrCorrupt)
	}
	if h.cryptMethod != 0 {
		return nil, fmt.Errorf("qcow2: encrypted images (crypt_method %d) are not supported: %w", h.cryptMethod, errs.ErrUnsupported)
	}
	if h.incompatible&incCorrupt != 0 {
		return nil, fmt.Errorf("qcow2: image is marked corrupt or was never completed; check it with 'qemu-img check': %w", errs.ErrCorrupt)
	}
	if unk := h.incompatible &^ (incDirty | incCompression); unk != 0 {
		return nil, fmt.Errorf("qcow2: unsupported incompatible features %#x (external data file, extended L2 or unknown): %w", unk, errs.ErrUnsupported)
	}
	return h, nil
}

// l1Entries is the number of L1 entries needed to map size bytes.
func l1Entries(size uint64, clusterBits uint) uint64 {
	perL2 := uint64(1) << (2*clusterBits - 3) // bytes mapped by one L2 table
	return (size + perL2 - 1) / perL2
}

// ioError wraps an I/O error with what was being done, adding
// errs.ErrNoSpace when the file system is full.
func ioError(err error, format string, args ...any) error {
	what := fmt.Sprintf(format, args...)
	if errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("qcow2: %s: %w (%w)", what, err, errs.ErrNoSpace)
	}
	return fmt.Errorf("qcow2: %s: %w", what, err)
}
