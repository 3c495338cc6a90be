// Package restore owns getting disks back out of a backup: random access to
// a backup disk (DiskReader, also the basis of instant restore over NBD) and
// full restores: which disks (Select), their indexes checked against the
// manifest (LoadIndex), each written and verified into a Target and the
// target cleaned up after a failure (Run). Targets are raw files or block
// devices and qcow2 images (Files; the qcow2 writer plugs in through
// Formats), or new VDIs of a XenServer pool (internal/restore/xenpool).
package restore

import (
	"bytes"
	"context"
	"fmt"
	"runtime"

	"golang.org/x/sync/errgroup"

	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// ImageWriter receives a restored disk. Writes arrive in increasing offset
// order and never overlap; ranges not written must read as zeros (a new
// sparse file, a new qcow2 image). Close completes and syncs the image.
type ImageWriter interface {
	WriteAt(p []byte, off int64) (int, error)
	Close() error
}

// Aborter is implemented by writers that can discard an unfinished image:
// Run calls Abort instead of Close when a restore failed.
type Aborter interface {
	Abort()
}

// Zeroer is implemented by writers whose unwritten ranges do not read as
// zeros (block devices): zero ranges are then passed to WriteZeroes.
type Zeroer interface {
	WriteZeroes(off, n int64) error
}

// Format is an output image format for restore.
type Format struct {
	Ext    string // file name extension when restoring several disks to a directory
	Create func(path string, size int64) (ImageWriter, error)
}

// Formats maps --format names to output formats: "raw" (raw.go) and
// "qcow2" (qcow2.go).
var Formats = map[string]Format{
	"raw": {Ext: ".raw", Create: CreateRaw},
}

// Options tune a restore.
type Options struct {
	Workers int // parallel chunk fetch and decode; default 2 x GOMAXPROCS
	Meter   *progress.Meter
}

// Stats counts what a disk restore did.
type Stats struct {
	BytesWritten int64 `json:"bytes_written"` // data written (zero blocks are skipped)
	ChunksRead   int64 `json:"chunks_read"`   // chunks fetched and verified
	ChunksZero   int64 `json:"chunks_zero"`
}

// blockSize is the granularity of sparse writes: all-zero blocks inside a
// chunk are skipped, so the restored file is sparse where the disk was.
const blockSize = 4096

// Disk restores the disk with index x into w, fetching and verifying
// chunks in parallel and writing them in order. It does not close w.
func Disk(ctx context.Context, r *repo.Repo, x *repo.Index, w ImageWriter, o Options) (Stats, error) {
	workers := o.Workers
	if workers <= 0 {
		workers = 2 * runtime.GOMAXPROCS(0)
	}
	type result struct {
		data []byte
		err  error
	}
	type slot struct {
		i   int
		res chan result
	}
	var st Stats
	g, ctx := errgroup.WithContext(ctx)
	jobs := make(chan slot)
	order := make(chan slot, 2*workers) // bounds chunks decoded ahead of the writer
	free := make(chan []byte, 3*workers+1)
	g.Go(func() error {
		defer close(jobs)
		defer close(order)
		for i := range x.Len() {
			s := slot{i, make(chan result, 1)}
			if x.ID(i).IsZero() {
				s.res <- result{}
			} else {
				select {
				case jobs <- s:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			select {
			case order <- s:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	for range workers {
		g.Go(func() error {
			for s := range jobs {
				var buf []byte
				select {
				case buf = <-free:
				default:
				}
				data, err := r.ReadChunk(ctx, x.ID(s.i), buf)
				if err == nil {
					if _, n := x.Range(s.i); int64(len(data)) != n {
						err = fmt.Errorf("chunk %s holds %d bytes, the index expects %d", x.ID(s.i), len(data), n)
					}
				}
				s.res <- result{data, err}
				if err != nil {
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		z, _ := w.(Zeroer)
		for s := range order {
			var res result
			select {
			case res = <-s.res:
			case <-ctx.Done():
				return ctx.Err()
			}
			if res.err != nil {
				return res.err
			}
			off, n := x.Range(s.i)
			if res.data == nil {
				st.ChunksZero++
				if z != nil {
					if err := z.WriteZeroes(off, n); err != nil {
						return err
					}
				}
			} else {
				st.ChunksRead++
				wrote, err := writeSparse(w, z, res.data, off)
				st.BytesWritten += wrote
				if err != nil {
					return err
				}
				select {
				case free <- res.data:
				default:
				}
			}
			o.Meter.Add(n)
		}
		return nil
	})
	if err := g.Wait(); err != nil {
		return st, err
	}
	return st, nil
}

// writeSparse writes the non-zero blocks of data at off, coalescing runs;
// zero blocks are skipped (or zeroed through z when set).
func writeSparse(w ImageWriter, z Zeroer, data []byte, off int64) (int64, error) {
	var wrote int64
	flush := func(from, to int, zero bool) error {
		if from == to {
			return nil
		}
		if zero {
			if z != nil {
				return z.WriteZeroes(off+int64(from), int64(to-from))
			}
			return nil
		}
		if _, err := w.WriteAt(data[from:to], off+int64(from)); err != nil {
			return fmt.Errorf("write at offset %d: %w", off+int64(from), err)
		}
		wrote += int64(to - from)
		return nil
	}
	start, runZero := 0, false
	for b := 0; b < len(data); b += blockSize {
		e := min(b+blockSize, len(data))
		zero := isZero(data[b:e])
		if b == 0 {
			runZero = zero
		} else if zero != runZero {
			if err := flush(start, b, runZero); err != nil {
				return wrote, err
			}
			start, runZero = b, zero
		}
	}
	return wrote, flush(start, len(data), runZero)
}

var zeroBlock [blockSize]byte

// isZero reports whether b (at most blockSize bytes) is all zeros.
func isZero(b []byte) bool { return bytes.Equal(b, zeroBlock[:len(b)]) }
