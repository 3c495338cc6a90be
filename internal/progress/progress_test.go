package progress

import (
	"context"
	"sync"
	"testing"
	"time"
)

func TestSampler(t *testing.T) {
	m := NewMeter(1000)
	s := NewSampler(m)
	t0 := m.start
	m.Add(100)
	m.AddRead(40)
	a := s.Sample(t0.Add(time.Second))
	if a.BytesDone != 100 || a.BytesRead != 40 || a.Rate != 100 || a.Percent != 10 || a.ETAS != 9 {
		t.Fatalf("first sample %+v", a)
	}
	m.Add(300)
	b := s.Sample(t0.Add(2 * time.Second))
	// EWMA: 0.7*100 + 0.3*300 = 160 B/s; 600 left -> 3.75 s.
	if b.Rate != 160 || b.ETAS != 3.75 || b.ElapsedS != 2 {
		t.Fatalf("second sample %+v", b)
	}
	if l := Line(b); l != " 40.0% 400 B / 1000 B  160 B/s  ETA 0:04" {
		t.Fatalf("Line = %q", l)
	}
}

func TestFormat(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 3 << 30: "3.0 GiB", 1536 << 20: "1.5 GiB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
	if Duration(3725) != "1:02:05" || Duration(65) != "1:05" {
		t.Errorf("Duration: %s %s", Duration(3725), Duration(65))
	}
}

func TestReport(t *testing.T) {
	m := NewMeter(10)
	var mu sync.Mutex
	var n int
	stop := Report(context.Background(), m, 5*time.Millisecond, func(Snapshot) { mu.Lock(); n++; mu.Unlock() })
	time.Sleep(50 * time.Millisecond)
	stop()
	mu.Lock()
	got := n
	mu.Unlock()
	time.Sleep(20 * time.Millisecond)
	if got == 0 || n != got {
		t.Fatalf("reports: %d then %d after stop", got, n)
	}
	var nilMeter *Meter
	nilMeter.Add(1) // a nil meter is a no-op
}
