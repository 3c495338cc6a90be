package qcow2

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"slices"
	"sync"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// File is what a Writer needs from the image file. *os.File opened
// read-write implements it (L2 tables evicted from the cache are read back).
// Create truncates it to zero length, and the Writer relies on a region it
// never wrote reading back as zeros (a hole or beyond the end of the file).
type File interface {
	io.ReaderAt
	io.WriterAt
	Truncate(size int64) error
	Sync() error
}

// Options tune a new image. The zero value gives QEMU's defaults.
type Options struct {
	// ClusterSize in bytes: a power of two from 512 to 2 MiB. 0 means
	// DefaultClusterSize (64 KiB). It is both the allocation unit (a write
	// of one non-zero byte allocates a whole cluster) and the size of one
	// L2 table, which maps ClusterSize/8 clusters.
	ClusterSize int
	// L2CacheTables is how many L2 tables the Writer keeps in memory
	// (0 means DefaultL2CacheTables). Memory used is about
	// L2CacheTables*ClusterSize plus the L1 table (8 bytes per
	// ClusterSize*ClusterSize/8 bytes of virtual size). Writes in increasing
	// offset order need only one; writes jumping between more regions than
	// this re-read evicted tables from the file.
	L2CacheTables int
}

// DefaultL2CacheTables is the L2 cache size used when Options.L2CacheTables is 0.
const DefaultL2CacheTables = 16

// Writer writes a new qcow2 image. WriteAt and Close are safe for concurrent
// use; calls are serialized by an internal mutex.
//
// After any error from WriteAt or Close the Writer is unusable and the image
// incomplete: later calls return the first error. An incomplete image (Close
// not called or failed) carries a header with the corrupt bit set and no
// refcount table, so QEMU refuses to open it rather than misreading it; the
// caller should remove it.
type Writer struct {
	mu          sync.Mutex
	f           File
	size        int64 // virtual size
	clusterBits uint
	l2Bits      uint     // log2 of entries per L2 table
	l1          []uint64 // the whole L1 table, in memory until Close
	l1Offset    int64
	next        int64 // host offset of the next cluster to allocate (the end of the image)

	cache    []*l2Table // at most cacheCap tables
	cacheCap int
	last     *l2Table // most recently used, the fast path for sequential writes
	tick     uint64   // LRU clock
	buf      []byte   // one cluster of scratch space
	zeros    []byte   // one cluster of zeros
	err      error    // first failure; sticky
	closed   bool
}

// l2Table is one cached L2 table.
type l2Table struct {
	index   uint64   // its L1 index
	host    int64    // its offset in the file
	entries []uint64 // decoded entries, clusterSize/8 of them
	dirty   bool     // differs from the file
	used    uint64   // LRU tick of the last use
}

// Create starts a new qcow2 image of virtualSize bytes (a multiple of 512)
// in f, truncating f first. Nothing is allocated for the guest data until
// it is written; Close completes the image.
func Create(f File, virtualSize int64, opts Options) (*Writer, error) {
	cs := opts.ClusterSize
	if cs == 0 {
		cs = DefaultClusterSize
	}
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
		return nil, fmt.Errorf("qcow2: cluster size %d is not a power of two from 512 to 2097152: %w", opts.ClusterSize, errs.ErrUsage)
	}
	cacheCap := opts.L2CacheTables
	if cacheCap == 0 {
		cacheCap = DefaultL2CacheTables
	}
	if cacheCap < 0 {
		return nil, fmt.Errorf("qcow2: L2 cache size %d is negative: %w", opts.L2CacheTables, errs.ErrUsage)
	}
	if virtualSize < 0 || virtualSize%512 != 0 {
		return nil, fmt.Errorf("qcow2: virtual size %d is not a non-negative multiple of 512 bytes: %w", virtualSize, errs.ErrUsage)
	}
	clusterBits := uint(bits.TrailingZeros(uint(cs)))
	n := l1Entries(uint64(virtualSize), clusterBits)
	if n*8 > maxL1Bytes {
		return nil, fmt.Errorf("qcow2: virtual size %d needs an L1 table above QEMU's 32 MiB limit with %d-byte clusters; use larger clusters: %w",
			virtualSize, cs, errs.ErrUnsupported)
	}
	// The L1 table follows the header; an empty disk has none (offset 0,
	// as QEMU writes it: an unused cluster would be a leak).
	l1Clusters := (int64(n)*8 + int64(cs) - 1) / int64(cs)
	l1Offset := int64(cs)
	if n == 0 {
		l1Offset = 0
	}
	w := &Writer{
		f:           f,
		size:        virtualSize,
		clusterBits: clusterBits,
		l2Bits:      clusterBits - 3,
		l1:          make([]uint64, n),
		l1Offset:    l1Offset,
		next:        int64(cs) * (1 + l1Clusters),
		cacheCap:    cacheCap,
		buf:         make([]byte, cs),
		zeros:       make([]byte, cs),
	}
	if err := f.Truncate(0); err != nil {
		return nil, ioError(err, "truncate image file")
	}
	// A provisional header: marked corrupt and without a refcount table, so
	// that an image whose Close never ran is refused by QEMU instead of
	// being probed as raw or read with missing metadata.
	h := w.header()
	h.incompatible = incCorrupt
	if _, err := f.WriteAt(h.marshal(), 0); err != nil {
		return nil, ioError(err, "write provisional header")
	}
	return w, nil
}

// Size is the virtual size of the image.
func (w *Writer) Size() int64 { return w.size }

// ClusterSize is the image's cluster size in bytes.
func (w *Writer) ClusterSize() int { return 1 << w.clusterBits }

func (w *Writer) header() *header {
	return &header{
		version:       3,
		clusterBits:   uint32(w.clusterBits),
		size:          uint64(w.size),
		l1Size:        uint32(len(w.l1)),
		l1TableOffset: uint64(w.l1Offset),
		refcountOrder: refcountOrd,
		headerLength:  headerLenV3,
	}
}

// WriteAt writes p at guest offset off. off and len(p) need no alignment:
// the parts of a newly allocated cluster that p does not cover read as
// zeros. Clusters that are unallocated and would receive only zeros stay
// unallocated (sparse); clusters already allocated are overwritten in place.
// Writing beyond the virtual size is an error. It returns len(p) or an error.
func (w *Writer) WriteAt(p []byte, off int64) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.usable(); err != nil {
		return 0, err
	}
	if off < 0 || off > w.size || int64(len(p)) > w.size-off {
		return 0, fmt.Errorf("qcow2: write of %d bytes at offset %d is outside the virtual size %d", len(p), off, w.size)
	}
	if err := w.write(p, off); err != nil {
		w.err = err
		return 0, err
	}
	return len(p), nil
}

func (w *Writer) usable() error {
	if w.closed {
		return errors.New("qcow2: writer is closed")
	}
	if w.err != nil {
		return fmt.Errorf("qcow2: image is incomplete after an earlier error: %w", w.err)
	}
	return nil
}

func (w *Writer) write(p []byte, off int64) error {
	cs := int64(1) << w.clusterBits
	// run is the pending contiguous piece: p[runStart:runEnd] goes to the
	// host offset runHost. Consecutive clusters allocated in order are
	// contiguous in the file too, so sequential writes become one WriteAt.
	var runHost int64
	runStart, runEnd := 0, 0
	flush := func() error {
		if runEnd == runStart {
			return nil
		}
		if _, err := w.f.WriteAt(p[runStart:runEnd], runHost); err != nil {
			return ioError(err, "write %d bytes of guest data at file offset %d", runEnd-runStart, runHost)
		}
		runStart = runEnd
		return nil
	}
	for pos := 0; pos < len(p); {
		guest := off + int64(pos)
		in := guest & (cs - 1)
		n := int(min(cs-in, int64(len(p)-pos)))
		chunk := p[pos : pos+n]
		cluster := uint64(guest) >> w.clusterBits
		l1i, l2i := cluster>>w.l2Bits, cluster&(1<<w.l2Bits-1)

		t, err := w.table(l1i, false)
		if err != nil {
			return err
		}
		var host int64
		if t != nil {
			host = int64(t.entries[l2i] & offsetMask)
		}
		if host == 0 {
			if bytes.Equal(chunk, w.zeros[:n]) {
				// Stays unallocated and reads as zeros.
				if err := flush(); err != nil {
					return err
				}
				pos += n
				runStart, runEnd = pos, pos
				continue
			}
			if t, err = w.table(l1i, true); err != nil {
				return err
			}
			if host, err = w.alloc(); err != nil {
				return err
			}
			t.entries[l2i] = uint64(host) | flagCopied
			t.dirty = true
		}
		target := host + in
		if runEnd != runStart && runHost+int64(runEnd-runStart) == target {
			runEnd += n
		} else {
			if err := flush(); err != nil {
				return err
			}
			runHost, runStart, runEnd = target, pos, pos+n
		}
		pos += n
	}
	return flush()
}

// alloc reserves the next host cluster at the end of the image.
func (w *Writer) alloc() (int64, error) {
	off := w.next
	if off+int64(len(w.buf)) > maxHostOffset {
		return 0, fmt.Errorf("qcow2: image file would grow beyond 64 PB: %w", errs.ErrUnsupported)
	}
	w.next += int64(len(w.buf))
	return off, nil
}

// table returns the L2 table for L1 index l1i, loading it into the cache.
// When it does not exist yet it returns nil, or with create allocates it.
func (w *Writer) table(l1i uint64, create bool) (*l2Table, error) {
	w.tick++
	if t := w.last; t != nil && t.index == l1i {
		t.used = w.tick
		return t, nil
	}
	for _, t := range w.cache {
		if t.index == l1i {
			t.used = w.tick
			w.last = t
			return t, nil
		}
	}
	entry := w.l1[l1i]
	if entry == 0 && !create {
		return nil, nil
	}
	t, err := w.freeSlot()
	if err != nil {
		return nil, err
	}
	t.index, t.used = l1i, w.tick
	if entry == 0 {
		if t.host, err = w.alloc(); err != nil {
			return nil, err
		}
		w.l1[l1i] = uint64(t.host) | flagCopied
		clear(t.entries)
		t.dirty = true
	} else {
		t.host = int64(entry & offsetMask)
		if _, err := w.f.ReadAt(w.buf, t.host); err != nil {
			return nil, ioError(err, "read back L2 table at file offset %d", t.host)
		}
		for i := range t.entries {
			t.entries[i] = binary.BigEndian.Uint64(w.buf[i*8:])
		}
		t.dirty = false
	}
	w.last = t
	return t, nil
}

// freeSlot returns a cache slot to fill: a new one while the cache is not
// full, else the least recently used table, written back first if dirty.
func (w *Writer) freeSlot() (*l2Table, error) {
	if len(w.cache) < w.cacheCap {
		t := &l2Table{entries: make([]uint64, 1<<w.l2Bits)}
		w.cache = append(w.cache, t)
		return t, nil
	}
	lru := w.cache[0]
	for _, t := range w.cache[1:] {
		if t.used < lru.used {
			lru = t
		}
	}
	if err := w.writeTable(lru); err != nil {
		return nil, err
	}
	if w.last == lru {
		w.last = nil
	}
	return lru, nil
}

// writeTable writes t to the file if it is dirty.
func (w *Writer) writeTable(t *l2Table) error {
	if !t.dirty {
		return nil
	}
	for i, e := range t.entries {
		binary.BigEndian.PutUint64(w.buf[i*8:], e)
	}
	if _, err := w.f.WriteAt(w.buf, t.host); err != nil {
		return ioError(err, "write L2 table at file offset %d", t.host)
	}
	t.dirty = false
	return nil
}

// Close completes the image: it writes the cached L2 tables, the L1 table,
// the refcount blocks and table, syncs, then writes the final header and
// syncs again, so a valid header never points at missing metadata. It does
// not close the file. It returns an error if an earlier WriteAt failed.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.usable(); err != nil {
		return err
	}
	if err := w.finish(); err != nil {
		w.err = err
		return err
	}
	w.closed = true
	w.cache, w.last, w.l1 = nil, nil, nil
	return nil
}

func (w *Writer) finish() error {
	// L2 tables in file order, for sequential I/O.
	slices.SortFunc(w.cache, func(a, b *l2Table) int { return cmp.Compare(a.host, b.host) })
	for _, t := range w.cache {
		if err := w.writeTable(t); err != nil {
			return err
		}
	}
	if err := w.writeL1(); err != nil {
		return err
	}
	reftable, err := w.writeRefcounts()
	if err != nil {
		return err
	}
	if err := w.f.Sync(); err != nil {
		return ioError(err, "sync image metadata")
	}
	h := w.header()
	h.refcountTableOffset = uint64(reftable.off)
	h.refcountTableClusters = uint32(reftable.clusters)
	if _, err := w.f.WriteAt(h.marshal(), 0); err != nil {
		return ioError(err, "write header")
	}
	if err := w.f.Sync(); err != nil {
		return ioError(err, "sync header")
	}
	return nil
}

// writeL1 writes the L1 table in pieces of at most one MiB.
func (w *Writer) writeL1() error {
	const piece = 1 << 17 // entries
	b := make([]byte, 8*min(piece, len(w.l1)))
	for i := 0; i < len(w.l1); i += piece {
		es := w.l1[i:min(i+piece, len(w.l1))]
		for j, e := range es {
			binary.BigEndian.PutUint64(b[j*8:], e)
		}
		off := w.l1Offset + int64(i)*8
		if _, err := w.f.WriteAt(b[:len(es)*8], off); err != nil {
			return ioError(err, "write L1 table at file offset %d", off)
		}
	}
	return nil
}

type extent struct{ off, clusters int64 }

// writeRefcounts appends the refcount blocks and then the refcount table at
// the end of the image. Every cluster up to the new end of the image,
// including the refcount structures themselves, has refcount 1. It returns
// where the table is.
func (w *Writer) writeRefcounts() (extent, error) {
	cs := int64(len(w.buf))
	used := w.next / cs
	perBlock := cs * 8 / refcountBits // refcounts per block
	// Find the smallest block and table counts that cover themselves too.
	var blocks, tableClusters, total int64
	for {
		total = used + blocks + tableClusters
		nb := (total + perBlock - 1) / perBlock
		nt := (nb*8 + cs - 1) / cs
		if nb == blocks && nt == tableClusters {
			break
		}
		blocks, tableClusters = nb, nt
	}
	if total*cs > maxHostOffset {
		return extent{}, fmt.Errorf("qcow2: image file would grow beyond 64 PB: %w", errs.ErrUnsupported)
	}
	first := w.next
	table := extent{off: first + blocks*cs, clusters: tableClusters}

	block := w.buf
	for j := range perBlock {
		binary.BigEndian.PutUint16(block[j*2:], 1)
	}
	for i := range blocks {
		if i == blocks-1 { // refcount 0 for the clusters beyond the end
			clear(block[(total-i*perBlock)*2:])
		}
		off := first + i*cs
		if _, err := w.f.WriteAt(block, off); err != nil {
			return extent{}, ioError(err, "write refcount block at file offset %d", off)
		}
	}
	tb := make([]byte, tableClusters*cs)
	for i := range blocks {
		binary.BigEndian.PutUint64(tb[i*8:], uint64(first+i*cs))
	}
	if _, err := w.f.WriteAt(tb, table.off); err != nil {
		return extent{}, ioError(err, "write refcount table at file offset %d", table.off)
	}
	w.next = table.off + tableClusters*cs
	return table, nil
}
