package grouptest

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// journal records the writes of scripted targets in the order they end.
type journal struct {
	mu     sync.Mutex
	writes []string
}

func (j *journal) add(s string) {
	j.mu.Lock()
	j.writes = append(j.writes, s)
	j.mu.Unlock()
}

// scripted is a Target for the workload's own logic: fail decides the
// outcome of each attempt.
type scripted struct {
	name     string
	j        *journal
	attempts map[uint64]int
	fail     func(n uint64, attempt int) error
}

func (s *scripted) Name() string { return s.name }

func (s *scripted) Write(ctx context.Context, vm int, n uint64) error {
	if s.attempts == nil {
		s.attempts = map[uint64]int{}
	}
	s.attempts[n]++
	if s.fail != nil {
		if err := s.fail(n, s.attempts[n]); err != nil {
			return err
		}
	}
	s.j.add(fmt.Sprintf("%d:%d", vm, n))
	return nil
}

func TestWorkloadOrderAndBusy(t *testing.T) {
	j := &journal{}
	busy := &scripted{name: "b", j: j, fail: func(n uint64, attempt int) error {
		if n == 2 && attempt <= 3 {
			return fmt.Errorf("%w: frozen", ErrBusy)
		}
		return nil
	}}
	w := Start([]Target{&scripted{name: "a", j: j}, busy, &scripted{name: "c", j: j}}, Options{Retry: time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.WaitFor(ctx, 2, 4); err != nil {
		t.Fatal(err)
	}
	if err := w.Stop(); err != nil {
		t.Fatal(err)
	}
	got := w.Written()
	j.mu.Lock()
	writes := append([]string(nil), j.writes...)
	j.mu.Unlock()
	// Written is what the journal says: each write after the previous one.
	for i, s := range writes {
		want := fmt.Sprintf("%d:%d", i%3+1, i/3+1)
		if s != want {
			t.Fatalf("write %d is %s, want %s (all: %v)", i, s, want, writes)
		}
	}
	last := len(writes) - 1
	if want := []uint64{uint64(last/3 + 1), uint64((last + 2) / 3), uint64((last + 1) / 3)}; fmt.Sprint(got) != fmt.Sprint(want) || got[2] < 4 {
		t.Errorf("Written = %v, want %v after %d writes", got, want, len(writes))
	}
	if b := w.Busy(); b[1] != 3 || b[0] != 0 || b[2] != 0 {
		t.Errorf("Busy = %v, want [0 3 0]", b)
	}
}

func TestWorkloadFails(t *testing.T) {
	j := &journal{}
	broken := &scripted{name: "b", j: j, fail: func(n uint64, _ int) error {
		if n == 3 {
			return errors.New("dd: /dev/vdb: I/O error")
		}
		return nil
	}}
	w := Start([]Target{&scripted{name: "a", j: j}, broken}, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := w.WaitFor(ctx, 1, 10)
	if err == nil || !strings.Contains(err.Error(), "write record 3 to VM 2 (b): dd: /dev/vdb: I/O error") {
		t.Fatalf("WaitFor = %v", err)
	}
	if err := w.Stop(); err == nil || !strings.Contains(err.Error(), "I/O error") {
		t.Fatalf("Stop = %v", err)
	}
	if got := w.Written(); got[0] != 3 || got[1] != 2 {
		t.Errorf("Written = %v, want [3 2]", got)
	}

	// Busy for longer than the limit is a failure too.
	stuck := &scripted{name: "s", j: j, fail: func(uint64, int) error { return fmt.Errorf("%w: paused", ErrBusy) }}
	w = Start([]Target{stuck}, Options{Retry: time.Millisecond, BusyLimit: 50 * time.Millisecond})
	if err := w.WaitFor(ctx, 0, 1); err == nil || !strings.Contains(err.Error(), "busy for more than 50ms") {
		t.Fatalf("WaitFor = %v", err)
	}

	// A full log.
	w = Start([]Target{&scripted{name: "a", j: j}}, Options{Slots: 5})
	if err := w.WaitFor(ctx, 0, 6); err == nil || !strings.Contains(err.Error(), "the logs are full (5 records)") {
		t.Fatalf("WaitFor = %v", err)
	}
	if got := w.Written(); got[0] != 5 {
		t.Errorf("Written = %v, want [5]", got)
	}
}
