package restore

import (
	"container/list"
	"context"
	"fmt"
	"io"
	"sync"

	"github.com/vmshadow/vmshadow/internal/repo"
)

// DiskReader gives random access to one disk of a backup: reads fetch,
// decrypt, decompress and verify the chunks they touch, through a bounded
// cache of decoded chunks. Concurrent reads of one chunk fetch it once. It
// is safe for concurrent use and suits the 4-64 KiB random reads of an NBD
// export (vmshadow serve) as well as sequential reads.
type DiskReader struct {
	r   *repo.Repo
	x   *repo.Index
	max int

	mu       sync.Mutex
	lru      *list.List // of *cached, most recent first
	byID     map[repo.ID]*list.Element
	inflight map[repo.ID]*fetch
	fetched  [2]int64 // chunks and their plaintext bytes fetched from the repository
}

type cached struct {
	id   repo.ID
	data []byte
}

type fetch struct {
	done chan struct{}
	data []byte
	err  error
}

// NewDiskReader returns a reader over the disk with index x, caching at
// most cacheBytes of decoded chunks (at least one chunk).
func NewDiskReader(r *repo.Repo, x *repo.Index, cacheBytes int64) *DiskReader {
	n := int(cacheBytes / x.ChunkSize())
	if n < 1 {
		n = 1
	}
	return &DiskReader{r: r, x: x, max: n, lru: list.New(), byID: map[repo.ID]*list.Element{}, inflight: map[repo.ID]*fetch{}}
}

// Fetched returns how many chunks, and how many bytes of their plaintext,
// were read from the repository so far (cache hits not counted).
func (d *DiskReader) Fetched() (chunks, bytes int64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.fetched[0], d.fetched[1]
}

// Size is the disk size.
func (d *DiskReader) Size() int64 { return d.x.Size() }

// ReadAt implements io.ReaderAt: it reads len(p) bytes at off, or fewer
// with io.EOF at the end of the disk.
func (d *DiskReader) ReadAt(p []byte, off int64) (int, error) {
	return d.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt with a context for the chunk fetches.
func (d *DiskReader) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	size := d.x.Size()
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > size-off {
		p = p[:size-off]
	}
	cs := d.x.ChunkSize()
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		i := int(pos / cs)
		in := pos - int64(i)*cs
		id := d.x.ID(i)
		var m int
		if id.IsZero() {
			_, clen := d.x.Range(i)
			m = int(min(int64(len(p)-n), clen-in))
			clear(p[n : n+m])
		} else {
			data, err := d.chunk(ctx, id)
			if err != nil {
				return n, fmt.Errorf("read disk at offset %d: %w", pos, err)
			}
			if in >= int64(len(data)) {
				return n, fmt.Errorf("read disk at offset %d: chunk %s holds %d bytes, index expects more", pos, id, len(data))
			}
			m = copy(p[n:], data[in:])
		}
		n += m
	}
	if n < want {
		return n, io.EOF
	}
	return n, nil
}

// chunk returns a chunk's verified plaintext from the cache or the
// repository. The returned slice must not be modified.
func (d *DiskReader) chunk(ctx context.Context, id repo.ID) ([]byte, error) {
	d.mu.Lock()
	if e, ok := d.byID[id]; ok {
		d.lru.MoveToFront(e)
		d.mu.Unlock()
		return e.Value.(*cached).data, nil
	}
	if f, ok := d.inflight[id]; ok {
		d.mu.Unlock()
		select {
		case <-f.done:
			return f.data, f.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	f := &fetch{done: make(chan struct{})}
	d.inflight[id] = f
	d.mu.Unlock()

	f.data, f.err = d.r.ReadChunk(ctx, id, nil)

	d.mu.Lock()
	delete(d.inflight, id)
	if f.err == nil {
		d.fetched[0]++
		d.fetched[1] += int64(len(f.data))
		d.byID[id] = d.lru.PushFront(&cached{id, f.data})
		for d.lru.Len() > d.max {
			e := d.lru.Back()
			d.lru.Remove(e)
			delete(d.byID, e.Value.(*cached).id)
		}
	}
	d.mu.Unlock()
	close(f.done)
	return f.data, f.err
}
