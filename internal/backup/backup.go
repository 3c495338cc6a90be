package backup

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"iter"
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// Disk is one disk of a backup job.
type Disk struct {
	Source Source
	// Base is the disk's index in the previous backup, which Unchanged
	// extents refer to. It must have the repository's chunk size; nil when
	// the plan has no Unchanged extents.
	Base *repo.Index
	// Checkpoint is recorded in the manifest (name of the dirty bitmap
	// started at this backup's snapshot instant); empty for images.
	Checkpoint string
}

// Job describes one backup: its disks and the manifest fields.
type Job struct {
	VM   string
	Tags []string
	// Time is the snapshot instant; zero means the start of Run.
	Time time.Time
	// Source, Mode, Reason, Consistency, SetID go into the manifest as
	// they are; Source defaults to "image" and Mode to "full".
	Source, Mode, Reason, Consistency, SetID string
	// Group names the consistency group this backup is a member of
	// (repo.Manifest.Group); the group record (repo.SaveGroup) is written
	// after every member's backup.
	Group string
	// Host is the host recorded in the manifest; default: this host.
	Host string
	// Origin marks a copy of a backup of another repository (see
	// repo.Manifest.Origin); empty for a backup made here.
	Origin string
	Disks  []Disk
	// Files describe the VM (repo.Manifest.Files; each at most
	// repo.MaxFileSize bytes): stored like disks, after them, in full,
	// counted in their own statistics only. Definition is
	// repo.Manifest.Definition.
	Files      []Source
	Definition string
}

// Options tune the pipeline. Zero values pick defaults.
type Options struct {
	Readers   int // concurrent source reads; default 4
	Workers   int // hash/compress/encrypt goroutines; default GOMAXPROCS
	Uploaders int // concurrent chunk stores; default 4
	// Meter, if set, counts bytes done (processed) and bytes read; its total
	// should be the sum of the disk sizes.
	Meter *progress.Meter
	// Storing, if set, is called once every chunk and index is stored,
	// right before the manifest is written: from then on the backup may
	// exist even if the process dies (a live backup notes it in its
	// journal). An error fails the backup before its manifest.
	Storing func() error
}

// DiskResult is what happened to one disk.
type DiskResult struct {
	Name  string
	Size  int64
	Index repo.ID
	Stats repo.Stats
}

// Result is a finished backup.
type Result struct {
	ID       repo.ID
	Manifest *repo.Manifest
	Disks    []DiskResult
	Stats    repo.Stats // totals
	Duration time.Duration
}

// Failure is the error of a backup that stored chunks before it failed: no
// manifest names them. After releasing its shared lock, the caller may take
// an exclusive lock and remove them with repo.DropChunks(ctx, f.Chunks(),
// f.Start) (so a backup that filled the storage does not make the next one
// fail too); otherwise the next backup of the same data reuses them, and gc
// removes them after its grace period.
type Failure struct {
	Err   error
	Start time.Time // when the backup started
	// Stored and Bytes count the chunks it stored and their stored size.
	Stored int64
	Bytes  int64
	disks  []*storedSet
}

func (f *Failure) Error() string { return f.Err.Error() }
func (f *Failure) Unwrap() error { return f.Err }

// Chunks yields the IDs of the chunks the failed backup stored.
func (f *Failure) Chunks() iter.Seq[repo.ID] {
	return func(yield func(repo.ID) bool) {
		for _, d := range f.disks {
			for i := range d.x.Len() {
				if d.bits[i/64].Load()&(1<<(i%64)) != 0 && !yield(d.x.ID(i)) {
					return
				}
			}
		}
	}
}

// storedSet marks the entries of one disk's index whose chunk this backup
// stored (one bit per entry, beside the 32 bytes of the index itself).
type storedSet struct {
	x    *repo.Index
	bits []atomic.Uint64
}

func (s *storedSet) set(i int) { s.bits[i/64].Or(1 << (i % 64)) }

// Run backs up the job's disks into r and returns the new backup. The
// caller holds a shared repository lock for the duration. On any error no
// manifest is written, so no backup exists; when chunks were already
// stored, the error is a *Failure that names them.
func Run(ctx context.Context, r *repo.Repo, job Job, o Options) (*Result, error) {
	start := time.Now()
	p, res, err := run(ctx, r, job, o, start)
	if err != nil && p != nil {
		f := &Failure{Err: err, Start: start, disks: p.stored}
		for _, d := range p.stored {
			for i := range d.bits {
				f.Stored += int64(bits.OnesCount64(d.bits[i].Load()))
			}
		}
		f.Bytes = p.bytesNew.Load()
		if f.Stored > 0 {
			return nil, f
		}
	}
	return res, err
}

func run(ctx context.Context, r *repo.Repo, job Job, o Options, start time.Time) (*pipeline, *Result, error) {
	if err := repo.ValidName("VM", job.VM); err != nil {
		return nil, nil, err
	}
	if job.Group != "" {
		if err := repo.ValidName("group", job.Group); err != nil {
			return nil, nil, err
		}
	}
	if len(job.Disks) == 0 {
		return nil, nil, fmt.Errorf("backup of %s has no disks: %w", job.VM, errs.ErrUsage)
	}
	seen := map[string]bool{}
	for _, d := range job.Disks {
		n := d.Source.Name()
		if err := repo.ValidName("disk", n); err != nil {
			return nil, nil, err
		}
		if seen[n] {
			return nil, nil, fmt.Errorf("disk %q given twice: %w", n, errs.ErrUsage)
		}
		seen[n] = true
		if d.Base != nil && d.Base.ChunkSize() != r.ChunkSize() {
			return nil, nil, fmt.Errorf("disk %s: base index has chunk size %d, the repository %d: read the disk in full (no base): %w",
				n, d.Base.ChunkSize(), r.ChunkSize(), errs.ErrUsage)
		}
	}
	seen = map[string]bool{}
	for _, f := range job.Files {
		n := f.Name()
		if err := repo.ValidName("file", n); err != nil {
			return nil, nil, err
		}
		if seen[n] {
			return nil, nil, fmt.Errorf("file %q given twice: %w", n, errs.ErrUsage)
		}
		seen[n] = true
		if f.Size() > repo.MaxFileSize {
			return nil, nil, fmt.Errorf("file %s of %s: %d bytes, more than the %d a backup stores beside its disks: %w", n, job.VM, f.Size(), repo.MaxFileSize, errs.ErrUsage)
		}
	}
	o.defaults()
	p := newPipeline(r, o)
	q, err := r.Quarantined(ctx)
	if err != nil {
		return nil, nil, err
	}
	p.quarantined = q
	res := &Result{}
	m := &repo.Manifest{VM: job.VM, Time: job.Time, Host: job.Host, Tags: job.Tags, Source: job.Source, Mode: job.Mode,
		Reason: job.Reason, Consistency: job.Consistency, SetID: job.SetID, Group: job.Group, Origin: job.Origin, Definition: job.Definition}
	if m.Host == "" {
		m.Host = hostname()
	}
	if m.Time.IsZero() {
		m.Time = start
	}
	m.Time = m.Time.UTC()
	if m.Source == "" {
		m.Source = "image"
	}
	if m.Mode == "" {
		m.Mode = "full"
	}
	indexes := make([]*repo.Index, len(job.Disks))
	for i, d := range job.Disks {
		x, st, err := p.disk(ctx, d)
		if r, ok := d.Source.(DoneSource); ok {
			r.Done()
		}
		if err != nil {
			return p, nil, fmt.Errorf("back up disk %s of %s: %w", d.Source.Name(), job.VM, err)
		}
		indexes[i] = x
		res.Disks = append(res.Disks, DiskResult{Name: d.Source.Name(), Size: d.Source.Size(), Stats: st})
		res.Stats.Add(st)
	}
	files := make([]repo.ManifestDisk, len(job.Files))
	fileIndexes := make([]*repo.Index, len(job.Files))
	for i, f := range job.Files {
		x, st, err := p.disk(ctx, Disk{Source: f})
		if err != nil {
			return p, nil, fmt.Errorf("back up file %s of %s: %w", f.Name(), job.VM, err)
		}
		fileIndexes[i] = x
		files[i] = repo.ManifestDisk{Name: f.Name(), Size: x.Size(), ChunkSize: x.ChunkSize(), Stats: st}
	}
	// Every chunk is stored (each Put is durable): now the indexes, then
	// the manifest.
	for i, x := range indexes {
		id, err := r.SaveIndex(ctx, x)
		if err != nil {
			return p, nil, err
		}
		res.Disks[i].Index = id
		d := job.Disks[i]
		m.Disks = append(m.Disks, repo.ManifestDisk{Name: d.Source.Name(), Size: x.Size(), ChunkSize: x.ChunkSize(),
			Index: id.String(), Checkpoint: d.Checkpoint, Stats: res.Disks[i].Stats})
	}
	for i, x := range fileIndexes {
		id, err := r.SaveIndex(ctx, x)
		if err != nil {
			return p, nil, err
		}
		files[i].Index = id.String()
	}
	if len(files) > 0 {
		m.Files = files
	}
	m.Stats = res.Stats
	m.DurationS = time.Since(start).Seconds()
	if o.Storing != nil {
		if err := o.Storing(); err != nil {
			return p, nil, err
		}
	}
	crashpoint.Hit("backup-manifest")
	id, err := r.SaveManifest(ctx, m)
	if err != nil {
		return p, nil, err
	}
	res.ID, res.Manifest, res.Duration = id, m, time.Since(start)
	return p, res, nil
}

func (o *Options) defaults() {
	if o.Readers <= 0 {
		o.Readers = 4
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if o.Uploaders <= 0 {
		o.Uploaders = 4
	}
}

// pipeline holds what lives across the disks of one backup: buffer pools
// and the set of chunks this backup already stored or found.
type pipeline struct {
	r      *repo.Repo
	o      Options
	cs     int64
	plain  chan []byte // free plaintext buffers; capacity bounds memory
	sealed chan []byte // free sealed buffers
	nPlain atomic.Int32
	nSeal  atomic.Int32
	known  knownSet
	// quarantined are chunks found damaged or missing (listed at the
	// start): never reused from a base index; their ranges are read again.
	quarantined map[repo.ID]time.Time
	stored      []*storedSet // per disk: the chunks this backup stored
	bytesNew    atomic.Int64 // their stored size
}

func newPipeline(r *repo.Repo, o Options) *pipeline {
	p := &pipeline{r: r, o: o, cs: r.ChunkSize()}
	p.plain = make(chan []byte, 2*o.Readers+2*o.Workers+2)
	p.sealed = make(chan []byte, o.Workers+o.Uploaders+1)
	p.known.max = 1 << 16
	return p
}

// getBuf takes a free buffer or makes one while fewer than the pool's
// capacity exist; otherwise it waits for one to be returned.
func getBuf(ctx context.Context, pool chan []byte, n *atomic.Int32, size int) ([]byte, error) {
	select {
	case b := <-pool:
		return b, nil
	default:
	}
	if int(n.Add(1)) <= cap(pool) {
		return make([]byte, size), nil
	}
	n.Add(-1)
	select {
	case b := <-pool:
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func putBuf(pool chan []byte, b []byte) {
	select {
	case pool <- b[:cap(b)]:
	default: // cannot happen: at most cap(pool) buffers exist
	}
}

// span is a range inside a chunk, relative to the chunk start.
type span struct{ off, n int64 }

type readJob struct {
	i     int
	off   int64
	n     int64
	spans []span // ranges to read; the rest of the chunk is zero
}

type hashJob struct {
	i    int
	off  int64
	buf  []byte // plaintext, len = chunk length
	read int64
}

type uploadJob struct {
	i      int
	id     repo.ID
	sealed []byte
	n      int64
}

type diskStats struct {
	read, bytesNew, chunksNew, reused, zero atomic.Int64
}

func (s *diskStats) stats() repo.Stats {
	return repo.Stats{BytesRead: s.read.Load(), BytesNew: s.bytesNew.Load(), ChunksNew: s.chunksNew.Load(),
		ChunksReused: s.reused.Load(), ChunksZero: s.zero.Load()}
}

// disk runs the pipeline over one disk and returns its index.
func (p *pipeline) disk(ctx context.Context, d Disk) (*repo.Index, repo.Stats, error) {
	src := d.Source
	size := src.Size()
	x, err := repo.NewIndex(size, p.cs)
	if err != nil {
		return nil, repo.Stats{}, err
	}
	var st diskStats
	ss := &storedSet{x: x, bits: make([]atomic.Uint64, (x.Len()+63)/64)}
	p.stored = append(p.stored, ss)
	g, ctx := errgroup.WithContext(ctx)
	reads := make(chan readJob, p.o.Readers)
	hashes := make(chan hashJob, p.o.Workers)
	uploads := make(chan uploadJob, p.o.Uploaders)
	meter := p.o.Meter

	g.Go(func() error {
		defer close(reads)
		return p.plan(ctx, d, x, &st, reads)
	})
	var readersWG sync.WaitGroup
	for range p.o.Readers {
		readersWG.Add(1)
		g.Go(func() error {
			defer readersWG.Done()
			for j := range reads {
				buf, err := getBuf(ctx, p.plain, &p.nPlain, int(p.cs))
				if err != nil {
					return err
				}
				buf = buf[:j.n]
				clearGaps(buf, j.spans)
				var nread int64
				for _, s := range j.spans {
					n, err := src.ReadAt(ctx, buf[s.off:s.off+s.n], j.off+s.off)
					if err == nil && int64(n) != s.n {
						err = fmt.Errorf("short read: %d of %d bytes", n, s.n)
					}
					if err != nil {
						putBuf(p.plain, buf)
						return fmt.Errorf("read %d bytes at offset %d: %w", s.n, j.off+s.off, err)
					}
					nread += s.n
				}
				meter.AddRead(nread)
				select {
				case hashes <- hashJob{i: j.i, off: j.off, buf: buf, read: nread}:
				case <-ctx.Done():
					putBuf(p.plain, buf)
					return ctx.Err()
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		readersWG.Wait()
		close(hashes)
		return nil
	})
	var workersWG sync.WaitGroup
	for range p.o.Workers {
		workersWG.Add(1)
		g.Go(func() error {
			defer workersWG.Done()
			for j := range hashes {
				if err := p.work(ctx, j, x, &st, uploads); err != nil {
					return err
				}
			}
			return nil
		})
	}
	g.Go(func() error {
		workersWG.Wait()
		close(uploads)
		return nil
	})
	for range p.o.Uploaders {
		g.Go(func() error {
			for u := range uploads {
				err := p.r.PutChunk(ctx, u.id, u.sealed)
				sealedLen := len(u.sealed)
				putBuf(p.sealed, u.sealed)
				if err != nil {
					return err
				}
				ss.set(u.i)
				p.bytesNew.Add(int64(sealedLen))
				st.bytesNew.Add(int64(sealedLen))
				st.chunksNew.Add(1)
				meter.Add(u.n)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, repo.Stats{}, err
	}
	if f, ok := src.(Finisher); ok {
		if err := f.Finish(ctx); err != nil {
			return nil, repo.Stats{}, err
		}
	}
	return x, st.stats(), nil
}

// work handles one chunk read from the source.
func (p *pipeline) work(ctx context.Context, j hashJob, x *repo.Index, st *diskStats, uploads chan<- uploadJob) error {
	st.read.Add(j.read)
	n := int64(len(j.buf))
	if isZero(j.buf) {
		putBuf(p.plain, j.buf)
		st.zero.Add(1)
		p.o.Meter.Add(n)
		return nil // the index entry stays zero
	}
	id := p.r.HashChunk(j.buf)
	x.Set(j.i, id)
	if !p.known.add(id) {
		putBuf(p.plain, j.buf)
		st.reused.Add(1)
		p.o.Meter.Add(n)
		return nil
	}
	have, err := p.r.HasChunk(ctx, id, len(j.buf))
	if err != nil {
		putBuf(p.plain, j.buf)
		return err
	}
	if have {
		putBuf(p.plain, j.buf)
		st.reused.Add(1)
		p.o.Meter.Add(n)
		return nil
	}
	sbuf, err := getBuf(ctx, p.sealed, &p.nSeal, int(p.cs)+repo.Overhead+int(p.cs)/64+64)
	if err != nil {
		putBuf(p.plain, j.buf)
		return err
	}
	sealed := p.r.SealChunk(sbuf[:0], id, j.buf)
	putBuf(p.plain, j.buf)
	select {
	case uploads <- uploadJob{i: j.i, id: id, sealed: sealed, n: n}:
		return nil
	case <-ctx.Done():
		putBuf(p.sealed, sealed)
		return ctx.Err()
	}
}

// clearGaps zeroes the parts of buf that the spans (sorted, not
// overlapping) do not cover: those are known to read as zeros and are not
// read. A chunk read whole is not cleared first.
func clearGaps(buf []byte, spans []span) {
	pos := int64(0)
	for _, s := range spans {
		clear(buf[pos:s.off])
		pos = s.off + s.n
	}
	clear(buf[pos:])
}

var zeroPage [64 << 10]byte

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroPage))
		if !bytes.Equal(b[:n], zeroPage[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// knownSet remembers chunk IDs this backup stored or found stored, so
// duplicates within a backup are neither looked up nor stored twice. It is
// bounded: when full it forgets everything (a later duplicate is then only
// looked up again).
type knownSet struct {
	mu  sync.Mutex
	m   map[repo.ID]struct{}
	max int
}

// add reports whether id was new to the set.
func (k *knownSet) add(id repo.ID) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.m[id]; ok {
		return false
	}
	if k.m == nil || len(k.m) >= k.max {
		k.m = make(map[repo.ID]struct{})
	}
	k.m[id] = struct{}{}
	return true
}

// errPlan marks an invalid extent plan from a source.
var errPlan = errors.New("invalid extent plan")
