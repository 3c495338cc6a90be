package xapi

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"net"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/nbd"
	"github.com/vmshadow/vmshadow/internal/nbdsource"
	"github.com/vmshadow/vmshadow/internal/tracking"
	api "github.com/vmshadow/vmshadow/internal/xapi"
)

// Reading the shadow copies (Open): xapi-nbd closes every connection
// beyond 16 per host, counting all its clients (ocaml/nbd/lib/consts.ml,
// connection_limit, enforced in ocaml/nbd/src/main.ml). So a shadow copy
// connects only when the backup starts reading it and disconnects once it
// is read, all disks of the set share a budget of Options.HostConns
// connections per host, and a disk the server refuses more connections to
// is read with fewer.

// DefaultHostConns is the default budget of NBD connections per host: half
// of xapi-nbd's limit of 16, which other clients share.
const DefaultHostConns = 8

// Open opens a shadow copy of the set over the pool's NBD (TLS pinned to
// the certificate XAPI reports), reading with incremental only the blocks
// XAPI listed as changed since the previous checkpoint, and otherwise the
// blocks the VHD allocation table says hold data. The source connects on
// first use.
func (p *Provider) Open(ctx context.Context, sh coord.Shadow, incremental bool, conns int) (tracking.Source, error) {
	targets, err := p.NBDTargets(sh)
	if err != nil {
		return nil, err
	}
	o := nbdsource.Options{Name: sh.Disk, Conns: conns, AcceptFewer: true, Warn: p.opts.Warn,
		ServerErrorHint: "the pool's NBD server failed to read the snapshot VDI", AllocationOptional: true}
	if !incremental {
		// xapi-nbd reports no allocation: a full read would read every
		// byte; the VHD block allocation table says which blocks hold data
		// for the price of its head.
		o.Allocation = func(ctx context.Context) (iter.Seq2[nbd.Extent, error], error) {
			a, err := p.VHDAllocation(ctx, sh)
			if err != nil {
				return nil, err
			}
			return allocatedExtents(a), nil
		}
	}
	if incremental {
		cb, err := p.ChangedBlocks(sh)
		if err != nil {
			return nil, err
		}
		o.Changed = changedExtents(cb)
	}
	if p.budgets == nil {
		n := p.opts.HostConns
		if n <= 0 {
			n = DefaultHostConns
		}
		p.budgets = &budgets{n: n, by: map[string]chan struct{}{}}
	}
	l := &lazySource{o: o, targets: targets, size: sh.Size, budget: p.budgets.of(targets[0].Target.Address)}
	l.refresh = func(ctx context.Context) ([]NBDTarget, error) {
		// The session may have expired while earlier disks were read.
		if err := p.Reconnect(ctx); err != nil {
			return nil, err
		}
		return p.NBDTargets(sh)
	}
	return l, nil
}

// budgets are the connection budgets per host address.
type budgets struct {
	mu sync.Mutex
	n  int
	by map[string]chan struct{}
}

func (b *budgets) of(addr string) chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if b.by[host] == nil {
		b.by[host] = make(chan struct{}, b.n)
	}
	return b.by[host]
}

// lazySource is a shadow copy read over NBD that connects on first use,
// within its host's budget, and gives its connections back when Done.
type lazySource struct {
	o       nbdsource.Options
	targets []NBDTarget
	size    int64
	budget  chan struct{} // a token per connection held
	refresh func(context.Context) ([]NBDTarget, error)

	mu   sync.Mutex
	src  *nbdsource.Source
	err  error
	held int
	done bool
}

func (l *lazySource) open(ctx context.Context) (*nbdsource.Source, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.src != nil || l.err != nil {
		return l.src, l.err
	}
	if l.done {
		return nil, fmt.Errorf("disk %s: shadow copy read after it was done", l.o.Name)
	}
	// xapi-nbd counts a connection until it has noticed its close, so a
	// disk connecting just after another gave its connections back can be
	// refused while others' clients hold the rest: try again a few times
	// before failing.
	var src *nbdsource.Source
	var err error
	for wait := 250 * time.Millisecond; ; wait *= 2 {
		if src, err = l.connect(ctx); err == nil || l.err != nil || ctx.Err() != nil || wait > 4*time.Second {
			break
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
		}
	}
	if err != nil && l.err == nil {
		l.err = err
	}
	return src, l.err
}

// connect takes budget tokens and connects; l.mu held. A failure that
// may pass on a retry is returned with l.err unset.
func (l *lazySource) connect(ctx context.Context) (*nbdsource.Source, error) {
	// One token waits for the budget (a disk read earlier gives its
	// tokens back when done); the others are taken only if free.
	select {
	case l.budget <- struct{}{}:
		l.held = 1
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	for l.held < max(l.o.Conns, 1) {
		select {
		case l.budget <- struct{}{}:
			l.held++
			continue
		default:
		}
		break
	}
	if l.refresh != nil {
		ts, err := l.refresh(ctx)
		if err != nil {
			l.release()
			l.err = fmt.Errorf("disk %s: %w", l.o.Name, err)
			return nil, l.err
		}
		l.targets = ts
	}
	o := l.o
	o.Conns = l.held
	var errs []error
	for _, t := range l.targets {
		o.Target, o.TLS = &t.Target, t.TLS
		src, err := nbdsource.Open(ctx, o)
		if err == nil {
			if src.Size() != l.size {
				src.Close()
				l.err = fmt.Errorf("disk %s: the NBD export has %d bytes, XAPI says the snapshot VDI has %d", l.o.Name, src.Size(), l.size)
				break
			}
			l.src = src
			for l.held > src.Conns() { // refused connections give their tokens back
				<-l.budget
				l.held--
			}
			return src, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	l.release()
	if l.err != nil {
		return nil, l.err
	}
	return nil, fmt.Errorf("%w (xapi-nbd serves at most 16 connections per host to all clients together: if other backup tools are reading from this host, try again later)", errors.Join(errs...))
}

func (l *lazySource) release() {
	for ; l.held > 0; l.held-- {
		<-l.budget
	}
}

// Name implements backup.Source.
func (l *lazySource) Name() string { return l.o.Name }

// Size implements backup.Source: the snapshot VDI's size, checked against
// the export's when it connects.
func (l *lazySource) Size() int64 { return l.size }

// ReadAt implements backup.Source.
func (l *lazySource) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	src, err := l.open(ctx)
	if err != nil {
		return 0, err
	}
	return src.ReadAt(ctx, p, off)
}

// Extents implements backup.Source.
func (l *lazySource) Extents(ctx context.Context) iter.Seq2[backup.Extent, error] {
	return func(yield func(backup.Extent, error) bool) {
		src, err := l.open(ctx)
		if err != nil {
			yield(backup.Extent{}, err)
			return
		}
		for e, err := range src.Extents(ctx) {
			if !yield(e, err) {
				return
			}
		}
	}
}

// Done implements backup.DoneSource: the connections go, and their
// budget with them.
func (l *lazySource) Done() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.done = true
	if l.src != nil {
		l.src.Close()
		l.src = nil
	}
	l.release()
}

// Close implements tracking.Source.
func (l *lazySource) Close() error {
	l.Done()
	return nil
}

// allocatedExtents gives a VHD's block allocation as extents: holes that
// read as zeros where no block is allocated.
func allocatedExtents(a *api.VHDAllocation) iter.Seq2[nbd.Extent, error] {
	return func(yield func(nbd.Extent, error) bool) {
		for r := range a.Runs() {
			var flags uint32
			if !r.Changed {
				flags = nbd.StateHole | nbd.StateZero
			}
			if !yield(nbd.Extent{Offset: r.Off, Length: r.Len, Flags: flags}, nil) {
				return
			}
		}
	}
}

// changedExtents gives XAPI's changed blocks as extents flagged dirty.
func changedExtents(cb *api.ChangedBlocks) iter.Seq2[nbd.Extent, error] {
	return func(yield func(nbd.Extent, error) bool) {
		for r := range cb.Runs() {
			var flags uint32
			if r.Changed {
				flags = nbd.StateDirty
			}
			if !yield(nbd.Extent{Offset: r.Off, Length: r.Len, Flags: flags}, nil) {
				return
			}
		}
	}
}
