// Package instant serves a backed-up disk as an NBD export read on demand
// from the repository (instant restore: a VM boots from it at once, or a
// user mounts it), optionally writable through a local overlay that keeps
// every write and never changes the repository. NewServer assembles the
// NBD server of a backup's disks, which `vmshadow serve` listens with.
package instant

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/vmshadow/vmshadow/internal/nbd"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// Disk is one backed-up disk as an nbd.Export. It reports the zero chunks
// of its index as holes, so clients (qemu-img convert, a mirror job) skip
// them.
type Disk struct {
	r *restore.DiskReader
	x *repo.Index
}

// NewDisk returns the export of the disk with index x, caching at most
// cacheBytes of decoded chunks.
func NewDisk(r *repo.Repo, x *repo.Index, cacheBytes int64) *Disk {
	return &Disk{r: restore.NewDiskReader(r, x, cacheBytes), x: x}
}

// Fetched returns the chunks and bytes read from the repository so far.
func (d *Disk) Fetched() (chunks, bytes int64) { return d.r.Fetched() }

// Size implements nbd.Export.
func (d *Disk) Size() int64 { return d.x.Size() }

// ReadAt implements nbd.Export; every chunk is verified against its hash.
func (d *Disk) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := d.r.ReadAtContext(ctx, p, off)
	if errors.Is(err, io.EOF) && n == len(p) {
		err = nil
	}
	return n, err
}

// Extents implements nbd.ExtentReporter from the index.
func (d *Disk) Extents(_ context.Context, off, length int64) ([]nbd.Extent, error) {
	var out []nbd.Extent
	cs := d.x.ChunkSize()
	end := min(off+length, d.x.Size())
	for pos := off; pos < end; {
		i := int(pos / cs)
		cOff, cLen := d.x.Range(i)
		e := nbd.Extent{Offset: pos, Length: min(cOff+cLen, end) - pos}
		if d.x.ID(i).IsZero() {
			e.Flags = nbd.StateHole | nbd.StateZero
		}
		if k := len(out) - 1; k >= 0 && out[k].Flags == e.Flags {
			out[k].Length += e.Length
		} else {
			out = append(out, e)
		}
		pos = e.Offset + e.Length
		if len(out) >= 1024 {
			break // enough for one reply; the client asks for the rest
		}
	}
	return out, nil
}

// Base is what an overlay reads unwritten blocks from.
type Base interface {
	Size() int64
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
	Extents(ctx context.Context, off, length int64) ([]nbd.Extent, error)
}

// Overlay makes a Base writable: written blocks go to a sparse local file,
// tracked in memory at Block granularity (2 MiB of bitmap per TiB of disk),
// and are read from there; everything else is read from the base. Partial
// writes into a block not yet written read the rest of it from the base
// first. It is safe for concurrent use.
type Overlay struct {
	base Base
	f    *os.File

	mu    sync.RWMutex
	dirty []uint64
}

// Block is the overlay's granularity.
const Block = 64 << 10

// NewOverlay creates an overlay over base in a new file at path (which must
// not exist). Remove the file after Close: its data is meaningless without
// the in-memory block map. The file is locked (flock) while it is open, so
// RemoveStaleOverlays leaves it alone.
func NewOverlay(base Base, path string) (*Overlay, error) {
	f, err := createLocked(path)
	if err != nil {
		return nil, fmt.Errorf("create overlay: %w", err)
	}
	if err := f.Truncate(base.Size()); err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("create overlay: %w", err)
	}
	blocks := (base.Size() + Block - 1) / Block
	return &Overlay{base: base, f: f, dirty: make([]uint64, (blocks+63)/64)}, nil
}

// Close closes the overlay file.
func (o *Overlay) Close() error { return o.f.Close() }

func (o *Overlay) isDirty(b int64) bool { return o.dirty[b/64]&(1<<(b%64)) != 0 }
func (o *Overlay) setDirty(b int64)     { o.dirty[b/64] |= 1 << (b % 64) }

// Size implements nbd.Export.
func (o *Overlay) Size() int64 { return o.base.Size() }

// ReadAt implements nbd.Export.
func (o *Overlay) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		b := pos / Block
		dirty := o.isDirty(b)
		// Extend over following blocks of the same kind.
		end := min((b+1)*Block, off+int64(len(p)))
		for end < off+int64(len(p)) && o.isDirty(end/Block) == dirty {
			end = min(end+Block, off+int64(len(p)))
		}
		part := p[done : done+int(end-pos)]
		var err error
		if dirty {
			_, err = o.f.ReadAt(part, pos)
		} else {
			_, err = o.base.ReadAt(ctx, part, pos)
		}
		if err != nil {
			return done, err
		}
		done += len(part)
	}
	return done, nil
}

// WriteAt implements nbd.Writer.
func (o *Overlay) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	done := 0
	var blk []byte
	for done < len(p) {
		pos := off + int64(done)
		b := pos / Block
		bStart := b * Block
		bEnd := min(bStart+Block, o.Size())
		n := int(min(bEnd, off+int64(len(p))) - pos)
		if !o.isDirty(b) && (pos != bStart || pos+int64(n) != bEnd) {
			// Partial write into a fresh block: start from the base.
			if blk == nil {
				blk = make([]byte, Block)
			}
			cur := blk[:bEnd-bStart]
			if _, err := o.base.ReadAt(ctx, cur, bStart); err != nil {
				return done, err
			}
			copy(cur[pos-bStart:], p[done:done+n])
			if _, err := o.f.WriteAt(cur, bStart); err != nil {
				return done, fmt.Errorf("write overlay: %w", err)
			}
		} else if _, err := o.f.WriteAt(p[done:done+n], pos); err != nil {
			return done, fmt.Errorf("write overlay: %w", err)
		}
		o.setDirty(b)
		done += n
	}
	return done, nil
}

// Flush implements nbd.Flusher.
func (o *Overlay) Flush(context.Context) error { return o.f.Sync() }

// Extents implements nbd.ExtentReporter: written blocks are data.
func (o *Overlay) Extents(ctx context.Context, off, length int64) ([]nbd.Extent, error) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	end := min(off+length, o.Size())
	b := off / Block
	if o.isDirty(b) {
		pos := off
		for pos < end && o.isDirty(pos/Block) {
			pos = min((pos/Block+1)*Block, end)
		}
		return []nbd.Extent{{Offset: off, Length: pos - off}}, nil
	}
	// Up to the next written block, the base knows.
	stop := end
	for pos := (b + 1) * Block; pos < end; pos += Block {
		if o.isDirty(pos / Block) {
			stop = pos
			break
		}
	}
	return o.base.Extents(ctx, off, stop-off)
}
