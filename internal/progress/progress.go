// Package progress owns progress measurement for long operations (backup,
// restore, verify): a Meter counts bytes done against a total from any
// number of goroutines, and Report samples it periodically into Snapshots
// with rate and ETA, which the command prints as a terminal line or as
// NDJSON status objects.
package progress

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"
)

// Meter counts progress. It is safe for concurrent use.
type Meter struct {
	start time.Time
	total atomic.Int64
	done  atomic.Int64
	read  atomic.Int64
}

// NewMeter returns a meter for total bytes, starting now.
func NewMeter(total int64) *Meter {
	m := &Meter{start: time.Now()}
	m.total.Store(total)
	return m
}

// Add counts n more bytes done (processed, whether read or skipped).
func (m *Meter) Add(n int64) {
	if m != nil {
		m.done.Add(n)
	}
}

// AddRead counts n bytes actually read from the source.
func (m *Meter) AddRead(n int64) {
	if m != nil {
		m.read.Add(n)
	}
}

// Snapshot is the state of a meter at one moment.
type Snapshot struct {
	BytesDone  int64   `json:"bytes_done"`
	BytesTotal int64   `json:"bytes_total"`
	BytesRead  int64   `json:"bytes_read"`
	Percent    float64 `json:"percent"`
	Rate       float64 `json:"rate_bytes_per_s"` // over the last sampling interval
	ElapsedS   float64 `json:"elapsed_s"`
	ETAS       float64 `json:"eta_s"` // -1 when unknown
}

// Sampler computes rates between consecutive samples.
type Sampler struct {
	m        *Meter
	lastT    time.Time
	lastDone int64
	rate     float64
}

// NewSampler samples m.
func NewSampler(m *Meter) *Sampler { return &Sampler{m: m, lastT: m.start} }

// Sample returns the current snapshot. The rate is an exponentially weighted
// average of the per-interval rates, so the ETA does not jump.
func (s *Sampler) Sample(now time.Time) Snapshot {
	done, total := s.m.done.Load(), s.m.total.Load()
	dt := now.Sub(s.lastT).Seconds()
	if dt > 0 {
		r := float64(done-s.lastDone) / dt
		if s.rate == 0 {
			s.rate = r
		} else {
			s.rate = 0.7*s.rate + 0.3*r
		}
		s.lastT, s.lastDone = now, done
	}
	snap := Snapshot{BytesDone: done, BytesTotal: total, BytesRead: s.m.read.Load(), Rate: s.rate,
		ElapsedS: now.Sub(s.m.start).Seconds(), ETAS: -1}
	if total > 0 {
		snap.Percent = 100 * float64(done) / float64(total)
	}
	if s.rate > 0 && total >= done {
		snap.ETAS = float64(total-done) / s.rate
	}
	return snap
}

// Report calls fn with a snapshot every interval until ctx is done or the
// returned stop function is called; stop waits for the last call.
func Report(ctx context.Context, m *Meter, interval time.Duration, fn func(Snapshot)) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s := NewSampler(m)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				fn(s.Sample(now))
			}
		}
	}()
	return func() { cancel(); <-done }
}

// Line renders a snapshot for a terminal: "42.0% 1.2 GiB / 2.9 GiB 310 MiB/s ETA 0:06".
func Line(s Snapshot) string {
	eta := "--:--"
	if s.ETAS >= 0 {
		eta = Duration(s.ETAS)
	}
	return fmt.Sprintf("%5.1f%% %s / %s  %s/s  ETA %s", s.Percent, Bytes(s.BytesDone), Bytes(s.BytesTotal), Bytes(int64(s.Rate)), eta)
}

// Bytes formats n with a binary unit.
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// Duration formats seconds as h:mm:ss or m:ss.
func Duration(sec float64) string {
	d := int64(sec + 0.5)
	if d >= 3600 {
		return fmt.Sprintf("%d:%02d:%02d", d/3600, d/60%60, d%60)
	}
	return fmt.Sprintf("%d:%02d", d/60, d%60)
}
