// Package fault owns a fault-injecting backend wrapper for tests: it makes
// the Nth call of an operation fail, truncates or corrupts what is written or
// read, runs out of space after a byte budget, or turns read-only.
package fault

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Op names a backend operation.
type Op string

// The operations rules can match.
const (
	OpPut    Op = "put"
	OpGet    Op = "get"
	OpStat   Op = "stat"
	OpList   Op = "list"
	OpDelete Op = "delete"
	OpSync   Op = "sync"
)

// Mode is what a rule does to a matching call.
type Mode int

const (
	// Fail returns ErrInjected without calling the inner backend.
	Fail Mode = iota
	// Truncate stores (Put) or returns (Get) only the first half of the data,
	// and reports success: silent damage that readers must detect.
	Truncate
	// Corrupt flips one bit in the middle of the data stored (Put) or
	// returned (Get), and reports success.
	Corrupt
)

// ErrInjected is returned by calls a Fail rule matched.
var ErrInjected = errors.New("injected fault")

// Rule selects calls and says what to do with them.
type Rule struct {
	Op   Op
	Kind backend.Kind // "" matches every kind
	// Nth is the 1-based number of the matching call to affect; 0 affects
	// every matching call.
	Nth  int
	Mode Mode

	seen int
}

// Backend wraps another backend and injects faults.
type Backend struct {
	backend.Backend

	mu       sync.Mutex
	rules    []*Rule
	readOnly bool
	space    int64 // bytes Put may still store; < 0 means unlimited
	calls    map[Op]int
}

// New wraps inner with no faults.
func New(inner backend.Backend) *Backend {
	return &Backend{Backend: inner, space: -1, calls: make(map[Op]int)}
}

// Add adds a rule.
func (b *Backend) Add(r Rule) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rules = append(b.rules, &r)
}

// Reset removes every rule, the space limit and read-only mode.
func (b *Backend) Reset() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rules, b.readOnly, b.space = nil, false, -1
}

// SetReadOnly makes every Put and Delete fail with backend.ErrReadOnly.
func (b *Backend) SetReadOnly(ro bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.readOnly = ro
}

// SetSpace lets Put store n more bytes; the Put that would exceed it fails
// with an error wrapping errs.ErrNoSpace and ENOSPC, storing nothing.
func (b *Backend) SetSpace(n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.space = n
}

// Calls returns how many calls of op were made.
func (b *Backend) Calls(op Op) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.calls[op]
}

// match counts the call and returns the rule that affects it, if any.
func (b *Backend) match(op Op, kind backend.Kind) *Rule {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls[op]++
	var hit *Rule
	for _, r := range b.rules {
		if r.Op != op || r.Kind != "" && r.Kind != kind {
			continue
		}
		r.seen++
		if hit == nil && (r.Nth == 0 || r.seen == r.Nth) {
			hit = r
		}
	}
	return hit
}

func damage(data []byte, m Mode) []byte {
	switch m {
	case Truncate:
		return append([]byte(nil), data[:len(data)/2]...)
	case Corrupt:
		d := append([]byte(nil), data...)
		if len(d) > 0 {
			d[len(d)/2] ^= 0x10
		}
		return d
	}
	return data
}

// Put implements backend.Backend.
func (b *Backend) Put(ctx context.Context, h backend.Handle, data []byte) error {
	r := b.match(OpPut, h.Kind)
	b.mu.Lock()
	ro := b.readOnly
	full := false
	if b.space >= 0 {
		if int64(len(data)) > b.space {
			full = true
		} else {
			b.space -= int64(len(data))
		}
	}
	b.mu.Unlock()
	switch {
	case ro:
		return fmt.Errorf("write %s: %v: %w", h, syscall.EROFS, backend.ErrReadOnly)
	case full:
		return fmt.Errorf("write %s: storage full (%w): %w", h, syscall.ENOSPC, errs.ErrNoSpace)
	case r != nil && r.Mode == Fail:
		return fmt.Errorf("write %s: %w", h, ErrInjected)
	case r != nil:
		data = damage(data, r.Mode)
	}
	return b.Backend.Put(ctx, h, data)
}

// Get implements backend.Backend.
func (b *Backend) Get(ctx context.Context, h backend.Handle, off, length int64) ([]byte, error) {
	r := b.match(OpGet, h.Kind)
	if r != nil && r.Mode == Fail {
		return nil, fmt.Errorf("read %s: %w", h, ErrInjected)
	}
	data, err := b.Backend.Get(ctx, h, off, length)
	if err != nil || r == nil {
		return data, err
	}
	return damage(data, r.Mode), nil
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	if r := b.match(OpStat, h.Kind); r != nil && r.Mode == Fail {
		return backend.Info{}, fmt.Errorf("stat %s: %w", h, ErrInjected)
	}
	return b.Backend.Stat(ctx, h)
}

// List implements backend.Backend.
func (b *Backend) List(ctx context.Context, kind backend.Kind, prefix string, fn func(backend.Info) error) error {
	if r := b.match(OpList, kind); r != nil && r.Mode == Fail {
		return fmt.Errorf("list %s: %w", kind, ErrInjected)
	}
	return b.Backend.List(ctx, kind, prefix, fn)
}

// Sync implements backend.Backend.
func (b *Backend) Sync(ctx context.Context) error {
	if r := b.match(OpSync, ""); r != nil && r.Mode == Fail {
		return fmt.Errorf("sync: %w", ErrInjected)
	}
	return b.Backend.Sync(ctx)
}

// Delete implements backend.Backend.
func (b *Backend) Delete(ctx context.Context, h backend.Handle) error {
	r := b.match(OpDelete, h.Kind)
	b.mu.Lock()
	ro := b.readOnly
	b.mu.Unlock()
	if ro {
		return fmt.Errorf("delete %s: %v: %w", h, syscall.EROFS, backend.ErrReadOnly)
	}
	if r != nil && r.Mode == Fail {
		return fmt.Errorf("delete %s: %w", h, ErrInjected)
	}
	return b.Backend.Delete(ctx, h)
}
