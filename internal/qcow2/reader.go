package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// readerCacheTables is how many L2 tables a Reader keeps in memory.
const readerCacheTables = 8

// Reader reads the guest data of a qcow2 image. It supports versions 2 and 3
// without backing file, encryption, compressed clusters, external data file
// or extended L2 entries; Open or ReadAt report those as errs.ErrUnsupported
// and malformed metadata as errs.ErrCorrupt. It reads the active L1 table
// only (internal snapshots are ignored) and trusts, without checking, that
// refcounts are consistent (reading does not need them). It is safe for
// concurrent use.
type Reader struct {
	f           io.ReaderAt
	fileSize    int64
	size        int64
	clusterBits uint
	l2Bits      uint
	l1          []uint64
	zeroFlag    bool // version 3: L2 bit 0 means "reads as zeros"

	mu    sync.Mutex
	cache []*l2Table // at most readerCacheTables, LRU by used
	tick  uint64
	buf   []byte
}

// Open reads the header and L1 table of the qcow2 image in f, a file of
// fileSize bytes.
func Open(f io.ReaderAt, fileSize int64) (*Reader, error) {
	if fileSize < 0 {
		return nil, fmt.Errorf("qcow2: negative file size %d", fileSize)
	}
	hb := make([]byte, min(fileSize, headerLenV3))
	if err := readFull(f, hb, 0); err != nil {
		return nil, fmt.Errorf("qcow2: read header: %w", err)
	}
	h, err := parseHeader(hb)
	if err != nil {
		return nil, err
	}
	if h.backingFileOffset != 0 {
		return nil, fmt.Errorf("qcow2: image has a backing file; reading overlays is not supported: %w", errs.ErrUnsupported)
	}
	cs := int64(1) << h.clusterBits
	l1Bytes := int64(h.l1Size) * 8
	if h.l1TableOffset == 0 && h.l1Size != 0 || h.l1TableOffset > uint64(fileSize) || uint64(l1Bytes) > uint64(fileSize)-h.l1TableOffset {
		return nil, fmt.Errorf("qcow2: L1 table (%d entries at %#x) lies outside the %d-byte file: %w",
			h.l1Size, h.l1TableOffset, fileSize, errs.ErrCorrupt)
	}
	r := &Reader{
		f:           f,
		fileSize:    fileSize,
		size:        int64(h.size),
		clusterBits: uint(h.clusterBits),
		l2Bits:      uint(h.clusterBits) - 3,
		zeroFlag:    h.version >= 3,
		buf:         make([]byte, cs),
	}
	// Only the entries that map the virtual size matter.
	n := l1Entries(h.size, r.clusterBits)
	b := make([]byte, n*8)
	if err := readFull(f, b, int64(h.l1TableOffset)); err != nil {
		return nil, fmt.Errorf("qcow2: read L1 table at %#x: %w", h.l1TableOffset, err)
	}
	r.l1 = make([]uint64, n)
	for i := range r.l1 {
		e := binary.BigEndian.Uint64(b[i*8:])
		off := int64(e & offsetMask)
		if e&l1Reserved != 0 || off&(cs-1) != 0 || off != 0 && off > fileSize-cs {
			return nil, fmt.Errorf("qcow2: L1 entry %d (%#x) is malformed or points outside the file: %w", i, e, errs.ErrCorrupt)
		}
		r.l1[i] = e
	}
	return r, nil
}

// Size is the virtual size of the image.
func (r *Reader) Size() int64 { return r.size }

// ClusterSize is the image's cluster size in bytes.
func (r *Reader) ClusterSize() int { return 1 << r.clusterBits }

// ReadAt reads guest data at off, with io.ReaderAt semantics: it returns
// io.EOF when the read reaches the end of the virtual disk.
func (r *Reader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("qcow2: read at negative offset %d", off)
	}
	if off >= r.size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > r.size-off {
		p, eof = p[:r.size-off], io.EOF
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	cs := int64(1) << r.clusterBits
	for pos := 0; pos < len(p); {
		guest := off + int64(pos)
		in := guest & (cs - 1)
		n := int(min(cs-in, int64(len(p)-pos)))
		host, err := r.lookup(uint64(guest) >> r.clusterBits)
		if err != nil {
			return pos, err
		}
		// A data cluster may end beyond the end of the file; like QEMU,
		// read the missing part as zeros.
		avail := 0
		if host != 0 {
			avail = int(max(0, min(int64(n), r.fileSize-(host+in))))
		}
		if err := readFull(r.f, p[pos:pos+avail], host+in); err != nil {
			return pos, fmt.Errorf("qcow2: read guest offset %d from file offset %d: %w", guest, host+in, err)
		}
		clear(p[pos+avail : pos+n])
		pos += n
	}
	return len(p), eof
}

// lookup returns the host offset of a guest cluster, or 0 when it reads as
// zeros.
func (r *Reader) lookup(cluster uint64) (int64, error) {
	l1i, l2i := cluster>>r.l2Bits, cluster&(1<<r.l2Bits-1)
	l1e := r.l1[l1i]
	if l1e&offsetMask == 0 {
		return 0, nil
	}
	t, err := r.table(l1i, int64(l1e&offsetMask))
	if err != nil {
		return 0, err
	}
	e := t.entries[l2i]
	cs := int64(1) << r.clusterBits
	host := int64(e & offsetMask)
	switch {
	case e&flagCompressed != 0:
		return 0, fmt.Errorf("qcow2: guest cluster %d is compressed; compressed images are not supported (convert with 'qemu-img convert -O qcow2'): %w",
			cluster, errs.ErrUnsupported)
	case e&l2Reserved != 0 || host&(cs-1) != 0 || host >= r.fileSize || (e&flagZero != 0 && !r.zeroFlag):
		return 0, fmt.Errorf("qcow2: L2 entry for guest cluster %d (%#x) is malformed or points outside the file: %w", cluster, e, errs.ErrCorrupt)
	case e&flagZero != 0:
		return 0, nil
	}
	return host, nil
}

// table returns the L2 table at host offset off, from the cache or the file.
func (r *Reader) table(l1i uint64, off int64) (*l2Table, error) {
	r.tick++
	var t *l2Table
	for _, c := range r.cache {
		if c.index == l1i {
			c.used = r.tick
			return c, nil
		}
		if t == nil || c.used < t.used {
			t = c
		}
	}
	if len(r.cache) < readerCacheTables {
		t = &l2Table{entries: make([]uint64, 1<<r.l2Bits)}
		r.cache = append(r.cache, t)
	}
	t.index, t.used = ^uint64(0), r.tick // matches no L1 index until loaded
	if err := readFull(r.f, r.buf, off); err != nil {
		return nil, fmt.Errorf("qcow2: read L2 table at %#x: %w", off, err)
	}
	for i := range t.entries {
		t.entries[i] = binary.BigEndian.Uint64(r.buf[i*8:])
	}
	t.index = l1i
	return t, nil
}

// readFull reads len(p) bytes at off; a short read at the end of the file is
// corruption.
func readFull(f io.ReaderAt, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("file ends after %d of %d bytes at offset %d: %w", n, len(p), off, errs.ErrCorrupt)
	}
	return err
}
