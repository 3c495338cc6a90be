// Package imagefile owns raw disk images (files or block devices) as backup
// sources: concurrent positional reads, an extent plan from SEEK_DATA /
// SEEK_HOLE (holes are not read), and detection of an image whose size
// changes during the backup.
package imagefile

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/directio"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// Image is an open raw image. It implements backup.Source and
// backup.Finisher.
type Image struct {
	name string
	path string
	f    *os.File
	d    *directio.File // reads through f, and O_DIRECT where it can
	size int64
}

var (
	_ backup.Source   = (*Image)(nil)
	_ backup.Finisher = (*Image)(nil)
)

// Open opens the raw image at path as the disk called name. Only a regular
// file or a block device is a disk image: anything else (a directory, a
// character device such as /dev/zero, a FIFO, a socket) is errs.ErrUsage.
func Open(name, path string) (*Image, error) {
	st, err := os.Stat(path) // before opening: opening a FIFO would block
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("image %s does not exist: %w", path, errs.ErrNotFound)
		}
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	if err := checkType(path, st); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("image %s does not exist: %w", path, errs.ErrNotFound)
		}
		return nil, fmt.Errorf("open image: %w", err)
	}
	if st, err = f.Stat(); err != nil {
		err = fmt.Errorf("image %s: %w", path, err)
	} else {
		err = checkType(path, st) // the path may have been replaced since
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	size, err := f.Seek(0, io.SeekEnd) // works for block devices too
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("image %s has no size (%v): not a disk image: %w", path, err, errs.ErrUsage)
	}
	var magic [4]byte
	if n, _ := f.ReadAt(magic[:], 0); n == 4 && bytes.Equal(magic[:], []byte("QFI\xfb")) {
		f.Close()
		return nil, fmt.Errorf("%s is a qcow2 image, not raw: convert it first (qemu-img convert -O raw %s IMAGE.raw): %w", path, path, errs.ErrUnsupported)
	}
	return &Image{name: name, path: path, f: f, d: directio.New(f, os.O_RDONLY), size: size}, nil
}

// checkType accepts regular files and block devices.
func checkType(path string, st os.FileInfo) error {
	m := st.Mode()
	var what string
	switch {
	case m.IsRegular():
		return nil
	case m&os.ModeDevice != 0 && m&os.ModeCharDevice == 0:
		return nil // block device
	case m.IsDir():
		what = "a directory"
	case m&os.ModeCharDevice != 0:
		what = "a character device"
	case m&os.ModeNamedPipe != 0:
		what = "a named pipe"
	case m&os.ModeSocket != 0:
		what = "a socket"
	default:
		what = "not a regular file (" + m.Type().String() + ")"
		return fmt.Errorf("image %s is %s: a disk image is a raw image file or a block device: %w", path, what, errs.ErrUsage)
	}
	return fmt.Errorf("image %s is %s, not a disk image: give a raw image file or a block device: %w", path, what, errs.ErrUsage)
}

// Close closes the image.
func (im *Image) Close() error {
	err := im.d.Close()
	if cerr := im.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Name implements backup.Source.
func (im *Image) Name() string { return im.name }

// Size implements backup.Source: the size when the image was opened.
func (im *Image) Size() int64 { return im.size }

// ReadAt implements backup.Source. Reading past the end (the image shrank)
// is an error naming the image.
func (im *Image) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := im.d.ReadAt(p, off)
	if n == len(p) {
		return n, nil
	}
	if err == io.EOF || err == nil {
		return n, fmt.Errorf("image %s shrank during the backup (short read at offset %d; it had %d bytes at the start): %w", im.path, off+int64(n), im.size, io.ErrUnexpectedEOF)
	}
	return n, fmt.Errorf("read image %s at offset %d: %w", im.path, off, err)
}

// Finish implements backup.Finisher: the image must still have the size it
// had when opened.
func (im *Image) Finish(ctx context.Context) error {
	size, err := im.f.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("size of image %s: %w", im.path, err)
	}
	if size != im.size {
		return fmt.Errorf("image %s changed size during the backup (from %d to %d bytes): the backup would not be a consistent copy; back it up again when it is not in use", im.path, im.size, size)
	}
	return nil
}

// Extents implements backup.Source with SEEK_DATA/SEEK_HOLE: allocated
// ranges are Data, holes are Zero. On file systems without hole support
// the whole image is Data. It uses its own file descriptor, so it does not
// disturb reads.
func (im *Image) Extents(ctx context.Context) iter.Seq2[backup.Extent, error] {
	return func(yield func(backup.Extent, error) bool) {
		f, err := os.Open(im.path)
		if err != nil {
			yield(backup.Extent{}, fmt.Errorf("open image %s: %w", im.path, err))
			return
		}
		defer f.Close()
		fd := int(f.Fd())
		off := int64(0)
		for off < im.size {
			if err := ctx.Err(); err != nil {
				yield(backup.Extent{}, err)
				return
			}
			data, err := unix.Seek(fd, off, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) || err == nil && data >= im.size {
				yield(backup.Extent{Off: off, Len: im.size - off, Kind: backup.Zero}, nil)
				return
			}
			if err != nil {
				// No hole support (EINVAL) or anything else: read everything.
				yield(backup.Extent{Off: off, Len: im.size - off, Kind: backup.Data}, nil)
				return
			}
			if data > off && !yield(backup.Extent{Off: off, Len: data - off, Kind: backup.Zero}, nil) {
				return
			}
			hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
			if err != nil || hole > im.size {
				hole = im.size
			}
			if hole <= data { // the file changed under us: read the rest
				hole = im.size
			}
			if !yield(backup.Extent{Off: data, Len: hole - data, Kind: backup.Data}, nil) {
				return
			}
			off = hole
		}
	}
}
