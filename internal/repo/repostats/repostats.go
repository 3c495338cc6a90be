// Package repostats owns a repository's statistics: how many backups, VMs,
// indexes and chunks it holds, how many bytes it stores, how many bytes of
// VM disks those stand for, and the deduplication factor between the two
// (what `vmshadow repo stats` prints and the server's metrics and API
// show).
//
// The figures, like restic's `stats` modes and Proxmox Backup Server's
// datastore summary, answer different questions:
//
//   - LogicalBytes (restic's "restore-size"): the sum over backups of the
//     sizes of their disks and files, what restoring every backup would
//     write;
//   - ReferencedBytes: the same without the all-zero chunks (which are
//     never stored), what the backups' data chunks cover;
//   - UniqueBytes (restic's "raw-data" before compression): the plaintext
//     of the distinct chunks the backups reference, each counted once;
//   - StoredBytes: the size of every blob in the storage (chunks,
//     indexes, manifests, config, key files, locks, quarantine), what the
//     repository costs;
//   - DedupFactor = LogicalBytes / StoredBytes, PBS's "deduplication
//     factor": how many bytes of VM disks each stored byte stands for,
//     counting deduplication across and within backups, zero chunks and
//     compression together. Two backups of the same disk make it about
//     twice that of one.
//
// Compute only reads and takes no lock: it runs while backups, prune and
// gc run. A manifest deleted between its listing and its reading
// (removed by prune) is skipped; the figures are then a mix of before and
// after, as any listing of a changing repository is.
package repostats

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Stats are a repository's statistics. Every count and byte figure is
// exact for the blobs that could be read; Unreadable* say how many could
// not.
type Stats struct {
	// Backups counts the backups whose manifest could be read;
	// UnreadableBackups those whose manifest is damaged (a manifest that
	// vanished while Compute ran, removed by prune, is not counted).
	Backups           int `json:"backups"`
	UnreadableBackups int `json:"unreadable_backups"`
	// VMs counts the distinct VMs of Backups.
	VMs int `json:"vms"`
	// Indexes and Chunks count the index and chunk blobs stored.
	Indexes int `json:"indexes"`
	Chunks  int `json:"chunks"`
	// UnreadableIndexes counts the distinct indexes readable manifests
	// name that could not be read (missing or damaged): their backups'
	// chunks are not in ReferencedBytes, UniqueBytes or ReferencedChunks.
	UnreadableIndexes int `json:"unreadable_indexes"`

	// StoredBytes is the size of every blob stored, the sum of the five
	// below.
	StoredBytes   int64 `json:"stored_bytes"`
	ChunkBytes    int64 `json:"chunk_bytes"`    // chunk blobs
	IndexBytes    int64 `json:"index_bytes"`    // index blobs
	ManifestBytes int64 `json:"manifest_bytes"` // backup manifests
	OtherBytes    int64 `json:"other_bytes"`    // config, key files, locks, quarantine, health and group records

	// LogicalBytes is the sum over backups of their disks' and files'
	// sizes: what restoring every backup would write.
	LogicalBytes int64 `json:"logical_bytes"`
	// ReferencedBytes is the sum over backups of the bytes their non-zero
	// chunks cover: LogicalBytes less the all-zero chunks (and less the
	// backups whose index is unreadable).
	ReferencedBytes int64 `json:"referenced_bytes"`
	// ReferencedChunks counts the distinct non-zero chunks the backups
	// reference, UniqueBytes is their plaintext size (each counted once),
	// and ReferencedChunkBytes the stored size of those of them that are
	// stored (a referenced chunk that is missing is not in it: run verify).
	ReferencedChunks     int   `json:"referenced_chunks"`
	UniqueBytes          int64 `json:"unique_bytes"`
	ReferencedChunkBytes int64 `json:"referenced_chunk_bytes"`
	// UnreferencedChunks and UnreferencedBytes are the stored chunks no
	// backup references and their stored size: what gc removes once they
	// are older than its grace period (chunks of a backup still running
	// are among them until its manifest is stored).
	UnreferencedChunks int   `json:"unreferenced_chunks"`
	UnreferencedBytes  int64 `json:"unreferenced_bytes"`

	// DedupFactor is LogicalBytes / StoredBytes (0 for an empty
	// repository): how many bytes of VM disks each stored byte stands for
	// (PBS's deduplication factor: deduplication, zero chunks and
	// compression together).
	DedupFactor float64 `json:"dedup_factor"`
	// CompressionFactor is UniqueBytes / ReferencedChunkBytes (0 without
	// chunks): the effect of compression alone (below 1 for incompressible
	// data, by the envelope of each chunk).
	CompressionFactor float64 `json:"compression_factor"`

	// PerVM has one entry per VM, by name.
	PerVM []VM `json:"per_vm"`
}

// VM is one VM's share of the backups.
type VM struct {
	VM           string    `json:"vm"`
	Backups      int       `json:"backups"`
	Newest       time.Time `json:"newest"` // the newest backup's snapshot time
	Oldest       time.Time `json:"oldest"`
	LogicalBytes int64     `json:"logical_bytes"`
}

// chunkSet is a set of chunk IDs keyed by their first 8 bytes: IDs are
// (keyed) SHA-256 or BLAKE3 hashes, uniformly spread, so two distinct
// chunks of a repository of N share a key with probability below
// N²/2⁶⁵ (3·10⁻⁸ for a million chunks), and would then be counted as one.
// An 8-byte key costs 20 to 40 bytes per chunk in a Go map (38 measured
// by BenchmarkCompute at a million chunks), against 84 for the whole
// 32-byte ID that gc and verify keep; statistics do not need gc's
// certainty.
type chunkSet map[uint64]struct{}

func chunkKey(id repo.ID) uint64 { return binary.LittleEndian.Uint64(id[:8]) }

// Compute computes r's statistics. It lists every blob once, reads every
// manifest once and every distinct index once (a few at a time), and keeps
// a set of the distinct referenced chunks: memory is 20 to 40 bytes per
// distinct chunk (see chunkSet), about 100 bytes per backup and per
// distinct index, and the indexes being read (at most indexWorkers, 32
// bytes per chunk of their disk, a few copies while one is decoded). It
// takes no lock (see the package comment). The error is for failures to
// list or read blobs (the storage failing) and cancellation, not for
// damaged or missing blobs, which are counted.
func Compute(ctx context.Context, r *repo.Repo) (*Stats, error) {
	be := r.Backend()
	s := &Stats{PerVM: []VM{}}

	// Manifests: only what the rest needs is kept.
	var ids []repo.ID
	err := be.List(ctx, backend.KindBackups, "", func(fi backend.Info) error {
		s.ManifestBytes += fi.Size
		if id, err := repo.ParseID(fi.Name); err == nil {
			ids = append(ids, id)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list backups: %w", err)
	}
	indexRefs := map[repo.ID]int64{} // index -> how many backups' disks name it
	vms := map[string]*VM{}
	err = each(ctx, ids, manifestWorkers, r.LoadManifest, func(m *repo.Manifest, err error) error {
		if err != nil {
			if !damaged(err) {
				return err
			}
			if !errors.Is(err, errs.ErrNotFound) {
				s.UnreadableBackups++
			}
			return nil
		}
		s.Backups++
		v := vms[m.VM]
		if v == nil {
			v = &VM{VM: m.VM, Newest: m.Time, Oldest: m.Time}
			vms[m.VM] = v
		}
		v.Backups++
		if m.Time.After(v.Newest) {
			v.Newest = m.Time
		}
		if m.Time.Before(v.Oldest) {
			v.Oldest = m.Time
		}
		for _, d := range m.Indexed() {
			s.LogicalBytes += d.Size
			v.LogicalBytes += d.Size
			xid, _ := repo.ParseID(d.Index) // checked by DecodeManifest
			indexRefs[xid]++
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.VMs = len(vms)
	for _, v := range vms {
		s.PerVM = append(s.PerVM, *v)
	}
	slices.SortFunc(s.PerVM, func(a, b VM) int { return cmp.Compare(a.VM, b.VM) })

	// Indexes: each distinct index is read once and its covered bytes
	// multiplied by the number of disks naming it.
	chunks := chunkSet{}
	xids := make([]repo.ID, 0, len(indexRefs))
	for xid := range indexRefs {
		xids = append(xids, xid)
	}
	slices.SortFunc(xids, func(a, b repo.ID) int { return cmp.Compare(string(a[:]), string(b[:])) })
	err = each(ctx, xids, indexWorkers, func(ctx context.Context, xid repo.ID) (indexed, error) {
		x, err := r.LoadIndex(ctx, xid)
		return indexed{xid, x}, err
	}, func(ix indexed, err error) error {
		if err != nil {
			if !damaged(err) {
				return err
			}
			s.UnreadableIndexes++
			return nil
		}
		x := ix.x
		var covered int64
		for i := range x.Len() {
			id := x.ID(i)
			if id.IsZero() {
				continue
			}
			_, n := x.Range(i)
			covered += n
			k := chunkKey(id)
			if _, ok := chunks[k]; !ok {
				chunks[k] = struct{}{}
				s.UniqueBytes += n
			}
		}
		s.ReferencedBytes += covered * indexRefs[ix.id]
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.ReferencedChunks = len(chunks)

	// Every blob's size, from the listings.
	err = be.List(ctx, backend.KindChunks, "", func(fi backend.Info) error {
		s.Chunks++
		s.ChunkBytes += fi.Size
		id, err := repo.ParseID(fi.Name)
		if _, ok := chunks[chunkKey(id)]; ok && err == nil {
			s.ReferencedChunkBytes += fi.Size
		} else {
			s.UnreferencedChunks++
			s.UnreferencedBytes += fi.Size
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list chunks: %w", err)
	}
	err = be.List(ctx, backend.KindIndexes, "", func(fi backend.Info) error {
		s.Indexes++
		s.IndexBytes += fi.Size
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list indexes: %w", err)
	}
	for _, k := range []backend.Kind{backend.KindConfig, backend.KindKeys, backend.KindLocks, backend.KindQuarantine, backend.KindHealth, backend.KindGroups} {
		err := be.List(ctx, k, "", func(fi backend.Info) error {
			s.OtherBytes += fi.Size
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", k, err)
		}
	}
	s.StoredBytes = s.ChunkBytes + s.IndexBytes + s.ManifestBytes + s.OtherBytes
	if s.StoredBytes > 0 {
		s.DedupFactor = float64(s.LogicalBytes) / float64(s.StoredBytes)
	}
	if s.ReferencedChunkBytes > 0 {
		s.CompressionFactor = float64(s.UniqueBytes) / float64(s.ReferencedChunkBytes)
	}
	return s, nil
}

// Blobs read at once: manifests are small; an index is 32 bytes per
// chunk of its disk (8 MiB for a TiB of 4 MiB chunks), and indexWorkers
// of them may be in memory at once.
const (
	manifestWorkers = 16
	indexWorkers    = 3
)

type indexed struct {
	id repo.ID
	x  *repo.Index
}

// each loads the blobs ids with up to workers loads in flight or loaded
// (object storage answers one request in tens of milliseconds) and hands
// every result to use, one at a time and in the order of ids, so that use
// needs no locking. It stops at use's first error, or when ctx ends, and
// returns that error.
func each[T any](ctx context.Context, ids []repo.ID, workers int, load func(context.Context, repo.ID) (T, error), use func(T, error) error) error {
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		v   T
		err error
	}
	pending := make(chan chan result, workers-1)
	go func() {
		defer close(pending)
		for _, id := range ids {
			ch := make(chan result, 1)
			select {
			case pending <- ch:
			case <-lctx.Done():
				return
			}
			go func() {
				v, err := load(lctx, id)
				ch <- result{v, err}
			}()
		}
	}()
	var err error
	for ch := range pending {
		r := <-ch
		if err == nil {
			err = ctx.Err()
		}
		if err == nil {
			err = use(r.v, r.err)
		}
		if err != nil {
			cancel() // drain: the loads still running end at once
		}
	}
	return err
}

// damaged reports whether err, from reading a manifest or an index, says
// the blob is damaged, missing or of a newer format (counted as
// unreadable) rather than that reading failed (the storage unreachable:
// then Compute fails, so that no one takes a damaged repository for an
// outage, or the other way round).
func damaged(err error) bool {
	return errors.Is(err, errs.ErrCorrupt) || errors.Is(err, errs.ErrNotFound) || errors.Is(err, errs.ErrUnsupported)
}
