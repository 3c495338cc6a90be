// Package mem owns the in-memory repository backend, for tests and for
// fault injection on top of it.
package mem

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

type blob struct {
	data []byte
	mod  time.Time
}

// Mem is a backend.Backend holding blobs in memory.
type Mem struct {
	mu    sync.RWMutex
	blobs map[backend.Handle]blob
}

var _ backend.Backend = (*Mem)(nil)

// New returns an empty in-memory backend.
func New() *Mem { return &Mem{blobs: make(map[backend.Handle]blob)} }

// Location implements backend.Backend.
func (m *Mem) Location() string { return "memory" }

// Close implements backend.Backend.
func (m *Mem) Close() error { return nil }

// Put implements backend.Backend.
func (m *Mem) Put(ctx context.Context, h backend.Handle, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := h.Valid(); err != nil {
		return err
	}
	cp := append([]byte(nil), data...)
	m.mu.Lock()
	m.blobs[h] = blob{data: cp, mod: time.Now()}
	m.mu.Unlock()
	return nil
}

// Sync implements backend.Backend: memory has nothing to sync.
func (m *Mem) Sync(ctx context.Context) error { return ctx.Err() }

// Get implements backend.Backend.
func (m *Mem) Get(ctx context.Context, h backend.Handle, off, length int64) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := h.Valid(); err != nil {
		return nil, err
	}
	m.mu.RLock()
	b, ok := m.blobs[h]
	m.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("read %s: %w", h, backend.ErrNotExist)
	}
	size := int64(len(b.data))
	if off < 0 || off > size {
		return nil, fmt.Errorf("read %s: offset %d outside blob of %d bytes: %w", h, off, size, io.ErrUnexpectedEOF)
	}
	if length < 0 {
		length = size - off
	}
	if off+length > size {
		return nil, fmt.Errorf("read %s: range %d+%d past end of blob of %d bytes: %w", h, off, length, size, io.ErrUnexpectedEOF)
	}
	return append([]byte(nil), b.data[off:off+length]...), nil
}

// Stat implements backend.Backend.
func (m *Mem) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	if err := h.Valid(); err != nil {
		return backend.Info{}, err
	}
	m.mu.RLock()
	b, ok := m.blobs[h]
	m.mu.RUnlock()
	if !ok {
		return backend.Info{}, fmt.Errorf("stat %s: %w", h, backend.ErrNotExist)
	}
	return backend.Info{Name: h.Name, Size: int64(len(b.data)), ModTime: b.mod}, nil
}

// List implements backend.Backend. It snapshots the matching names first so
// fn may call back into the backend.
func (m *Mem) List(ctx context.Context, kind backend.Kind, prefix string, fn func(backend.Info) error) error {
	if err := (backend.Handle{Kind: kind, Name: "x"}).Valid(); err != nil {
		return err
	}
	var infos []backend.Info
	m.mu.RLock()
	for h, b := range m.blobs {
		if h.Kind == kind && strings.HasPrefix(h.Name, prefix) {
			infos = append(infos, backend.Info{Name: h.Name, Size: int64(len(b.data)), ModTime: b.mod})
		}
	}
	m.mu.RUnlock()
	for _, i := range infos {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(i); err != nil {
			return err
		}
	}
	return nil
}

// Delete implements backend.Backend.
func (m *Mem) Delete(ctx context.Context, h backend.Handle) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := h.Valid(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.blobs[h]; !ok {
		return fmt.Errorf("delete %s: %w", h, backend.ErrNotExist)
	}
	delete(m.blobs, h)
	return nil
}

// SetModTime changes a blob's modification time, for tests of grace periods.
func (m *Mem) SetModTime(h backend.Handle, t time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.blobs[h]
	if !ok {
		return fmt.Errorf("set mod time of %s: %w", h, backend.ErrNotExist)
	}
	b.mod = t
	m.blobs[h] = b
	return nil
}
