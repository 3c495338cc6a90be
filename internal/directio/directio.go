// Package directio owns reading and writing large buffers with O_DIRECT:
// the kernel then moves the data between the caller's buffer and the disk
// without copying it through the page cache. On the machines measured
// (bench/notes.md) that copy and its writeback cost more CPU than
// compressing the data, and a backup or a restore does not fill the page
// cache with data nobody reads back soon.
//
// Only the 4 KiB-aligned middle of a large read or write goes through
// O_DIRECT; the unaligned head and tail, small requests, buffers whose
// memory is not aligned like the file offset, and file systems without
// O_DIRECT (tmpfs, some network file systems) go through the page cache.
// The kernel keeps the two paths coherent. O_DIRECT alone does not make
// data durable: writers fsync as before.
package directio

import (
	"os"
)

// MinSize is the smallest request that uses O_DIRECT: chunks and image
// ranges, not configs, keys or small indexes.
const MinSize = 256 << 10

// Align is the alignment O_DIRECT needs of the memory, the file offset
// and the length on every Linux file system that supports it.
const Align = 4096

// File reads or writes one file through two descriptors: the caller's,
// which goes through the page cache, and one opened with O_DIRECT. It is
// safe for concurrent calls on different ranges, like *os.File.
type File struct {
	buffered *os.File
	direct   *os.File // nil when the file system refuses O_DIRECT
}

// New returns a File for f, opened with the access mode flag (os.O_RDONLY,
// os.O_WRONLY or os.O_RDWR). It opens the same file a second time, through
// /proc/self/fd (so a path renamed or replaced in between does not
// matter), with that mode and O_DIRECT; where that fails every request
// goes through f. Close closes only that second descriptor, not f.
func New(f *os.File, flag int) *File {
	return &File{buffered: f, direct: openDirect(f, flag&(os.O_RDONLY|os.O_WRONLY|os.O_RDWR))}
}

// ReadAt reads len(p) bytes at off, like (*os.File).ReadAt.
func (d *File) ReadAt(p []byte, off int64) (int, error) {
	return d.do(p, off, (*os.File).ReadAt)
}

// WriteAt writes p at off, like (*os.File).WriteAt.
func (d *File) WriteAt(p []byte, off int64) (int, error) {
	return d.do(p, off, (*os.File).WriteAt)
}

func (d *File) do(p []byte, off int64, op func(*os.File, []byte, int64) (int, error)) (int, error) {
	head, mid := split(p, off, d.direct != nil)
	done := 0
	if mid > 0 {
		if n, err := op(d.buffered, p[:head], off); err != nil {
			return n, err
		}
		// After an error or a short count (a file system that refuses
		// the alignment, the end of the file, a full disk) the rest goes
		// through the page cache, which reports what is really the matter.
		n, _ := op(d.direct, p[head:head+mid], off+int64(head))
		done = head + n&^(Align-1)
	}
	n, err := op(d.buffered, p[done:], off+int64(done))
	return done + n, err
}

// Close closes the O_DIRECT descriptor.
func (d *File) Close() error {
	if d.direct == nil {
		return nil
	}
	return d.direct.Close()
}

// split returns how p, at off, divides into a head for the page cache and
// an aligned middle of mid bytes for O_DIRECT (mid 0: all through the page
// cache).
func split(p []byte, off int64, direct bool) (head, mid int) {
	if !direct || len(p) < MinSize || off < 0 || int(addr(p)%Align) != int(off%Align) {
		return 0, 0
	}
	head = int((Align - off%Align) % Align)
	mid = (len(p) - head) &^ (Align - 1)
	return head, mid
}
