package restore

import (
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
// unallocated. It is written under a temporary name (partial.go) and only
// appears under its path once Close has written its metadata; the
// temporary file of an interrupted restore is one QEMU refuses to open.
type qcow2File struct {
	part *partialFile
	w    *qcow2.Writer
	path string
}

// CreateQcow2 creates the qcow2 image path (which must not exist) for a disk
// of size bytes.
func CreateQcow2(path string, size int64) (ImageWriter, error) {
	if st, err := os.Stat(path); err == nil && st.Mode()&fs.ModeDevice != 0 {
		return nil, fmt.Errorf("%s is a device: restore to a device with --format raw: %w", path, errs.ErrUsage)
	}
	p, err := createPartial(path, os.O_RDWR)
	if err != nil {
		return nil, err
	}
	w, err := qcow2.Create(p.File, size, qcow2.Options{})
	if err != nil {
		p.abort()
		return nil, fmt.Errorf("create qcow2 image %s: %w", path, err)
	}
	return &qcow2File{part: p, w: w, path: path}, nil
}

func (q *qcow2File) WriteAt(p []byte, off int64) (int, error) {
	n, err := q.w.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("write %s: %w", q.path, err)
	}
	return n, nil
}

// Close finishes the image (metadata, header, fsync) and renames it to its
// path; on failure it removes it.
func (q *qcow2File) Close() error {
	if err := q.w.Close(); err != nil {
		q.part.abort()
		return fmt.Errorf("finish qcow2 image %s: %w", q.path, err)
	}
	return q.part.commit()
}

// Abort removes the unfinished image.
func (q *qcow2File) Abort() { q.part.abort() }
