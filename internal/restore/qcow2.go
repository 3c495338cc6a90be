package restore

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/qcow2"
)

func init() {
	Formats["qcow2"] = Format{Ext: ".qcow2", Create: CreateQcow2}
}

// qcow2File is a qcow2 image being restored: all-zero clusters stay
// unallocated, and the image is only valid once Close has written its
// metadata (an interrupted restore leaves a file QEMU refuses to open).
type qcow2File struct {
	f    *os.File
	w    *qcow2.Writer
	path string
}

// CreateQcow2 creates the qcow2 image path (which must not exist) for a disk
// of size bytes.
func CreateQcow2(path string, size int64) (ImageWriter, error) {
	if st, err := os.Stat(path); err == nil {
		if st.Mode()&fs.ModeDevice != 0 {
			return nil, fmt.Errorf("%s is a device: restore to a device with --format raw: %w", path, errs.ErrUsage)
		}
		return nil, fmt.Errorf("%s already exists: restore never overwrites a file; remove it or choose another path: %w", path, errs.ErrUsage)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("restore target %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	w, err := qcow2.Create(f, size, qcow2.Options{})
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create qcow2 image %s: %w", path, err)
	}
	return &qcow2File{f: f, w: w, path: path}, nil
}

func (q *qcow2File) WriteAt(p []byte, off int64) (int, error) {
	n, err := q.w.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("write %s: %w", q.path, err)
	}
	return n, nil
}

// Close finishes the image (metadata, header, fsync) and closes the file.
func (q *qcow2File) Close() error {
	err := q.w.Close()
	if cerr := q.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("finish qcow2 image %s: %w", q.path, err)
	}
	return nil
}
