package grouptest

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrBusy is wrapped by a Target's error when the VM cannot take a write
// right now (file systems frozen, VM paused, agent in use): the Workload
// tries the same write again.
var ErrBusy = errors.New("VM busy")

// Target is one VM of the Workload.
type Target interface {
	// Name names the VM in messages.
	Name() string
	// Write writes Record(vm, n) at Offset(n) of the VM's log disk and
	// returns once the write is done in the VM's disk (a snapshot taken
	// afterwards holds it). An error wrapping ErrBusy means "try again".
	Write(ctx context.Context, vm int, n uint64) error
}

// Options tune a Workload.
type Options struct {
	// Slots is the log's capacity in records: the workload fails rather
	// than write past it. Default 16384 (8 MiB logs).
	Slots uint64
	// Retry is the pause before writing again to a busy VM (default 100 ms).
	Retry time.Duration
	// BusyLimit is how long a VM may stay busy for one write before the
	// workload fails (default 5 minutes: a backup holds the agent while it
	// runs).
	BusyLimit time.Duration
}

// Workload writes n = 1, 2, ... to each target in turn, each write only
// after the previous one is done, until Stop or a failure.
type Workload struct {
	targets []Target
	opts    Options
	cancel  context.CancelFunc
	done    chan struct{}

	mu      sync.Mutex
	changed chan struct{} // closed and replaced on every progress
	written []uint64      // per target, the last record whose write is done
	busy    []int         // per target, writes that found it busy
	err     error
}

// Start starts the workload on targets, in order.
func Start(targets []Target, opts Options) *Workload {
	if opts.Slots == 0 {
		opts.Slots = 16384
	}
	if opts.Retry == 0 {
		opts.Retry = 100 * time.Millisecond
	}
	if opts.BusyLimit == 0 {
		opts.BusyLimit = 5 * time.Minute
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &Workload{
		targets: targets, opts: opts, cancel: cancel, done: make(chan struct{}),
		changed: make(chan struct{}), written: make([]uint64, len(targets)), busy: make([]int, len(targets)),
	}
	go w.run(ctx)
	return w
}

func (w *Workload) run(ctx context.Context) {
	defer close(w.done)
	err := w.loop(ctx)
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		err = nil // stopped
	}
	w.mu.Lock()
	w.err = err
	close(w.changed)
	w.changed = make(chan struct{})
	w.mu.Unlock()
}

func (w *Workload) loop(ctx context.Context) error {
	if len(w.targets) == 0 {
		return errors.New("workload: no VMs")
	}
	for n := uint64(1); ; n++ {
		if n > w.opts.Slots {
			return fmt.Errorf("workload: the logs are full (%d records): give more Slots and a larger log disk", w.opts.Slots)
		}
		for i, t := range w.targets {
			if err := w.write(ctx, i, t, n); err != nil {
				return err
			}
			w.mu.Lock()
			w.written[i] = n
			close(w.changed)
			w.changed = make(chan struct{})
			w.mu.Unlock()
		}
	}
}

// write writes record n to target i, again while it is busy.
func (w *Workload) write(ctx context.Context, i int, t Target, n uint64) error {
	start := time.Now()
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		err := t.Write(ctx, i+1, n)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !errors.Is(err, ErrBusy) {
			return fmt.Errorf("workload: write record %d to VM %d (%s): %w", n, i+1, t.Name(), err)
		}
		w.mu.Lock()
		w.busy[i]++
		w.mu.Unlock()
		if time.Since(start) > w.opts.BusyLimit {
			return fmt.Errorf("workload: VM %d (%s) was busy for more than %v writing record %d: %w", i+1, t.Name(), w.opts.BusyLimit, n, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(w.opts.Retry):
		}
	}
}

// Written returns, per VM, the last record whose write is done: a snapshot
// of a VM taken after this call holds at least that record.
func (w *Workload) Written() []uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]uint64(nil), w.written...)
}

// Busy returns, per VM, how many write attempts found the VM busy.
func (w *Workload) Busy() []int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]int(nil), w.busy...)
}

// Err is the workload's failure, if it stopped on one.
func (w *Workload) Err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// WaitFor waits until VM vm (0-based) has record n written. It fails when
// the workload stopped first or ctx ends.
func (w *Workload) WaitFor(ctx context.Context, vm int, n uint64) error {
	if vm < 0 || vm >= len(w.targets) {
		return fmt.Errorf("workload: no VM %d (there are %d)", vm, len(w.targets))
	}
	for {
		w.mu.Lock()
		got, changed, err := w.written[vm], w.changed, w.err
		w.mu.Unlock()
		if got >= n {
			return nil
		}
		select {
		case <-w.done:
			if w.Written()[vm] >= n {
				return nil
			}
			if err == nil {
				err = w.Err()
			}
			if err == nil {
				err = errors.New("workload stopped")
			}
			return fmt.Errorf("waiting for record %d on VM %d (%s), at %d: %w", n, vm+1, w.targets[vm].Name(), got, err)
		case <-ctx.Done():
			return fmt.Errorf("waiting for record %d on VM %d (%s), at %d: %w", n, vm+1, w.targets[vm].Name(), got, ctx.Err())
		case <-changed:
		}
	}
}

// Stop stops the workload (a write in progress is abandoned) and returns
// its failure, if any.
func (w *Workload) Stop() error {
	w.cancel()
	<-w.done
	return w.Err()
}
