package restore

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vmshadow/vmshadow/internal/directio"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// rawFile writes a raw image to a new regular file (sparse) or a block
// device (zero ranges are zeroed explicitly).
type rawFile struct {
	f     *os.File
	w     *directio.File // writes through f, and O_DIRECT where it can
	path  string
	block bool
	zeros []byte
}

// CreateRaw creates the raw image path for a disk of size bytes. A regular
// file must not exist yet (a restore never overwrites a file); a block
// device must be at least size bytes.
func CreateRaw(path string, size int64) (ImageWriter, error) {
	st, err := os.Stat(path)
	switch {
	case err == nil && st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0:
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, fmt.Errorf("open block device %s: %w", path, err)
		}
		dsize, err := f.Seek(0, io.SeekEnd)
		if err != nil || dsize < size {
			f.Close()
			return nil, fmt.Errorf("block device %s has %d bytes, the disk needs %d: %w", path, dsize, size, errs.ErrNoSpace)
		}
		return &rawFile{f: f, w: directio.New(f, os.O_WRONLY), path: path, block: true}, nil
	case err == nil:
		return nil, fmt.Errorf("%s already exists: restore never overwrites a file; remove it or choose another path: %w", path, errs.ErrUsage)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("restore target %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("size %s to %d bytes: %w", path, size, mapNoSpace(err))
	}
	return &rawFile{f: f, w: directio.New(f, os.O_WRONLY), path: path}, nil
}

func (r *rawFile) WriteAt(p []byte, off int64) (int, error) {
	n, err := r.w.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("write %s: %w", r.path, mapNoSpace(err))
	}
	return n, nil
}

// WriteZeroes is only used for block devices; a new regular file already
// reads zeros where nothing was written.
func (r *rawFile) WriteZeroes(off, n int64) error {
	if !r.block {
		return nil
	}
	if unix.Fallocate(int(r.f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n) == nil {
		return nil
	}
	if r.zeros == nil {
		r.zeros = make([]byte, 1<<20)
	}
	for n > 0 {
		m := min(n, int64(len(r.zeros)))
		if _, err := r.f.WriteAt(r.zeros[:m], off); err != nil {
			return fmt.Errorf("zero %s at offset %d: %w", r.path, off, mapNoSpace(err))
		}
		off += m
		n -= m
	}
	return nil
}

func (r *rawFile) Close() error {
	if err := r.w.Close(); err != nil {
		r.f.Close()
		return fmt.Errorf("close %s: %w", r.path, err)
	}
	if err := r.f.Sync(); err != nil {
		r.f.Close()
		return fmt.Errorf("sync %s: %w", r.path, mapNoSpace(err))
	}
	return r.f.Close()
}

func mapNoSpace(err error) error {
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
		return fmt.Errorf("%v: %w", err, errs.ErrNoSpace)
	}
	return err
}
