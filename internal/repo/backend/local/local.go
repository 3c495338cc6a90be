// Package local owns the local-directory repository backend: one file per
// blob, written to a temporary file, fsynced, renamed into place and the
// directory fsynced, so a blob is either complete or absent after a crash.
//
// Layout under the root directory:
//
//	config               the config blob
//	keys/<name>          key blobs
//	chunks/<ab>/<name>   chunk blobs, fanned out by the first two name bytes
//	indexes/<name>       index blobs
//	backups/<name>       backup manifests
//	locks/<name>         locks
//	tmp/                 temporary files of writes in progress (never listed)
package local

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmshadow/vmshadow/internal/directio"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Local is a backend.Backend over a directory.
type Local struct {
	root string

	// dirty holds the directories whose entries Sync must make durable:
	// those this process renamed blobs into or created, and those of
	// blobs it found by Stat (a backup that reuses another process's
	// chunk depends on that chunk's directory entry being durable too).
	mu    sync.Mutex
	dirty map[string]bool
}

func (l *Local) markDirty(dirs ...string) {
	l.mu.Lock()
	if l.dirty == nil {
		l.dirty = map[string]bool{}
	}
	for _, d := range dirs {
		l.dirty[d] = true
	}
	l.mu.Unlock()
}

var _ backend.Backend = (*Local)(nil)

// Create makes the directory layout under root, which must not exist or be
// an empty directory, and returns the backend.
func Create(root string) (*Local, error) {
	if _, err := os.Stat(filepath.Join(root, "config")); err == nil {
		return nil, fmt.Errorf("%s already holds a repository (config exists): %w", root, errs.ErrUsage)
	}
	if ents, err := os.ReadDir(root); err == nil && len(ents) > 0 {
		return nil, fmt.Errorf("%s is not empty: create the repository in a new or empty directory: %w", root, errs.ErrUsage)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, wrapErr("create repository directory "+root, err)
	}
	for _, d := range []string{"keys", "chunks", "indexes", "backups", "locks", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, wrapErr("create "+d+" in "+root, err)
		}
	}
	if err := syncDir(root); err != nil {
		return nil, wrapErr("sync "+root, err)
	}
	return &Local{root: root}, nil
}

// Open returns the backend of an existing repository directory.
func Open(root string) (*Local, error) {
	st, err := os.Stat(filepath.Join(root, "config"))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s is not a vmshadow repository (no config; create one with 'vmshadow repo init'): %w", root, errs.ErrNotFound)
		}
		return nil, wrapErr("open repository "+root, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s/config is not a regular file: %w", root, errs.ErrCorrupt)
	}
	return &Local{root: root}, nil
}

// Location implements backend.Backend.
func (l *Local) Location() string { return l.root }

// Close implements backend.Backend.
func (l *Local) Close() error { return nil }

func (l *Local) path(h backend.Handle) (string, error) {
	p, err := h.Path()
	if err != nil {
		return "", err
	}
	return filepath.Join(l.root, filepath.FromSlash(p)), nil
}

// Put implements backend.Backend: temp file in tmp/, write (large blobs
// mostly with O_DIRECT, see package directio), fsync, rename.
// The directory entry is made durable by Sync, which fsyncs directories.
func (l *Local) Put(ctx context.Context, h backend.Handle, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	dst, err := l.path(h)
	if err != nil {
		return err
	}
	var rnd [12]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(l.root, "tmp", h.Name+"."+hex.EncodeToString(rnd[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrNotExist) {
		// tmp/ went missing (repository created by an older layout or
		// cleaned by hand): recreate it once.
		if err = os.MkdirAll(filepath.Dir(tmp), 0o700); err == nil {
			f, err = os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		}
	}
	if err != nil {
		return wrapErr("write "+h.String(), err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	w := directio.New(f, os.O_WRONLY)
	_, err = w.WriteAt(data, 0)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return wrapErr("write "+h.String(), err)
	}
	if err := f.Sync(); err != nil {
		return wrapErr("sync "+h.String(), err)
	}
	if err := f.Close(); err != nil {
		return wrapErr("close "+h.String(), err)
	}
	dir := filepath.Dir(dst)
	err = os.Rename(tmp, dst)
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(dir, 0o700); err == nil {
			l.markDirty(filepath.Dir(dir)) // the new directory's own entry
			err = os.Rename(tmp, dst)
		}
	}
	if err != nil {
		return wrapErr("rename "+h.String()+" into place", err)
	}
	l.markDirty(dir)
	ok = true
	return nil
}

// Sync implements backend.Backend: it fsyncs the directories this process
// renamed blobs into or created, and those of blobs it found by Stat, so
// those entries are durable. A backup syncs only what it touched, not every
// fan-out directory.
func (l *Local) Sync(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	l.mu.Lock()
	dirs := l.dirty
	l.dirty = nil
	l.mu.Unlock()
	for d := range dirs {
		if err := syncDir(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			l.markDirty(d) // keep it for the next try
			return wrapErr("sync directory "+d, err)
		}
	}
	return nil
}

// Get implements backend.Backend.
func (l *Local) Get(ctx context.Context, h backend.Handle, off, length int64) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p, err := l.path(h)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, wrapErr("read "+h.String(), err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, wrapErr("read "+h.String(), err)
	}
	size := st.Size()
	if off < 0 || off > size {
		return nil, fmt.Errorf("read %s: offset %d outside blob of %d bytes: %w", h, off, size, io.ErrUnexpectedEOF)
	}
	if length < 0 {
		length = size - off
	}
	if off+length > size {
		return nil, fmt.Errorf("read %s: range %d+%d past end of blob of %d bytes: %w", h, off, length, size, io.ErrUnexpectedEOF)
	}
	buf := make([]byte, length)
	d := directio.New(f, os.O_RDONLY) // chunks bypass the page cache
	n, err := d.ReadAt(buf, off)
	d.Close()
	if n == len(buf) {
		return buf, nil
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return nil, wrapErr("read "+h.String(), err)
}

// Stat implements backend.Backend.
func (l *Local) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	p, err := l.path(h)
	if err != nil {
		return backend.Info{}, err
	}
	st, err := os.Stat(p)
	if err != nil {
		return backend.Info{}, wrapErr("stat "+h.String(), err)
	}
	l.markDirty(filepath.Dir(p))
	return backend.Info{Name: h.Name, Size: st.Size(), ModTime: st.ModTime()}, nil
}

// Delete implements backend.Backend.
func (l *Local) Delete(ctx context.Context, h backend.Handle) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p, err := l.path(h)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil {
		return wrapErr("delete "+h.String(), err)
	}
	l.markDirty(filepath.Dir(p))
	return nil
}

// List implements backend.Backend. Directory entries are read in batches so
// a large chunk directory is never held in memory at once.
func (l *Local) List(ctx context.Context, kind backend.Kind, prefix string, fn func(backend.Info) error) error {
	if err := (backend.Handle{Kind: kind, Name: "x"}).Valid(); err != nil {
		return err
	}
	switch kind {
	case backend.KindConfig:
		st, err := os.Stat(filepath.Join(l.root, "config"))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return wrapErr("list config", err)
		}
		if strings.HasPrefix("config", prefix) {
			return fn(backend.Info{Name: "config", Size: st.Size(), ModTime: st.ModTime()})
		}
		return nil
	case backend.KindChunks:
		dir := filepath.Join(l.root, "chunks")
		if len(prefix) >= 2 {
			return l.listDir(ctx, filepath.Join(dir, prefix[:2]), prefix, fn)
		}
		return eachEntry(ctx, dir, func(e fs.DirEntry) error {
			if !e.IsDir() || len(e.Name()) != 2 {
				return nil
			}
			if !strings.HasPrefix(e.Name(), prefix) && e.Name() != "__" {
				return nil // only prefix is "" or one byte here
			}
			return l.listDir(ctx, filepath.Join(dir, e.Name()), prefix, fn)
		})
	}
	return l.listDir(ctx, filepath.Join(l.root, string(kind)), prefix, fn)
}

func (l *Local) listDir(ctx context.Context, dir, prefix string, fn func(backend.Info) error) error {
	return eachEntry(ctx, dir, func(e fs.DirEntry) error {
		name := e.Name()
		if !e.Type().IsRegular() || !strings.HasPrefix(name, prefix) {
			return nil
		}
		if (backend.Handle{Kind: backend.KindChunks, Name: name}).Valid() != nil {
			return nil // not a blob (editor backup, stray file)
		}
		st, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil // deleted while listing
		}
		if err != nil {
			return wrapErr("list "+dir, err)
		}
		return fn(backend.Info{Name: name, Size: st.Size(), ModTime: st.ModTime()})
	})
}

// eachEntry calls fn for the entries of dir, reading them in batches. A
// missing directory has no entries.
func eachEntry(ctx context.Context, dir string, fn func(fs.DirEntry) error) error {
	d, err := os.Open(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return wrapErr("list "+dir, err)
	}
	defer d.Close()
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		ents, err := d.ReadDir(1024)
		for _, e := range ents {
			if err := fn(e); err != nil {
				return err
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return wrapErr("list "+dir, err)
		}
	}
}

// CleanTemp removes temporary files of writes that were interrupted (by a
// crash or kill -9) and are older than age. It returns how many it removed.
// Garbage collection calls it under the exclusive lock.
func (l *Local) CleanTemp(ctx context.Context, age time.Duration) (int, error) {
	n := 0
	dir := filepath.Join(l.root, "tmp")
	cutoff := time.Now().Add(-age)
	var victims []string
	err := eachEntry(ctx, dir, func(e fs.DirEntry) error {
		st, err := e.Info()
		if err == nil && st.ModTime().Before(cutoff) {
			victims = append(victims, e.Name())
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	for _, v := range victims {
		if err := os.Remove(filepath.Join(dir, v)); err == nil {
			n++
		} else if !errors.Is(err, fs.ErrNotExist) {
			return n, wrapErr("remove temporary file "+v, err)
		}
	}
	return n, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return err
	}
	return nil
}

// wrapErr maps operating-system errors to the backend's error contract.
func wrapErr(what string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s: %w", what, backend.ErrNotExist)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("%s: storage full (%v): %w", what, err, errs.ErrNoSpace)
	case errors.Is(err, syscall.EROFS), errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("%s: %v: %w", what, err, backend.ErrReadOnly)
	}
	return fmt.Errorf("%s: %w", what, err)
}
