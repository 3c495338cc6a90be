package metrics

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/repo/repostats"
)

// TestStatsCacheRefreshCoalesces: refreshes asked while a computation
// runs make it run exactly once more, and a read never waits for it.
func TestStatsCacheRefreshCoalesces(t *testing.T) {
	var calls atomic.Int32
	started := make(chan struct{}, 10)
	release := make(chan struct{})
	c := NewStatsCache(context.Background(), []string{"main"}, time.Hour, func(ctx context.Context, name string) (*repostats.Stats, error) {
		n := calls.Add(1)
		started <- struct{}{}
		<-release
		return &repostats.Stats{Backups: int(n)}, nil
	})
	c.Refresh("main")
	<-started
	for range 3 {
		c.Refresh("main")
	}
	c.Refresh("unknown") // ignored
	if s := c.Stats(); len(s) != 1 || s[0].Stats != nil {
		t.Fatalf("Stats during the first computation = %+v, want main without figures", s)
	}
	close(release)
	c.Wait()
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d computations, want 2 (the first, and one for the refreshes asked during it)", n)
	}
	if s, ok := c.Get("main"); !ok || s.Stats.Backups != 2 {
		t.Fatalf("Get = %+v, %v; want the second computation's figures", s, ok)
	}
	if _, ok := c.Get("unknown"); ok {
		t.Fatal("Get of an unknown repository succeeded")
	}
}

// TestStatsCacheMaxAge: a read computes what was never computed, and
// refreshes what is older than the maximum age, not what is younger.
func TestStatsCacheMaxAge(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC)
	counts := map[string]int{}
	c := NewStatsCache(context.Background(), []string{"a"}, 10*time.Minute, func(ctx context.Context, name string) (*repostats.Stats, error) {
		mu.Lock()
		defer mu.Unlock()
		counts[name]++
		return &repostats.Stats{Backups: counts[name]}, nil
	})
	c.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	get := func(name string) int {
		t.Helper()
		c.Wait()
		mu.Lock()
		defer mu.Unlock()
		return counts[name]
	}
	c.Stats()
	if n := get("a"); n != 1 {
		t.Fatalf("first read: %d computations, want 1", n)
	}
	advance(9 * time.Minute)
	c.Stats()
	if n := get("a"); n != 1 {
		t.Fatalf("read at 9 min: %d computations, want still 1", n)
	}
	advance(time.Minute)
	if s, _ := c.Get("a"); s.Stats.Backups != 1 {
		t.Fatalf("a stale read returned %+v, want the cached figures at once", s.Stats)
	}
	if n := get("a"); n != 2 {
		t.Fatalf("read at 10 min: %d computations, want 2", n)
	}
	c.SetRepositories([]string{"a", "b"})
	s := c.Stats()
	if len(s) != 2 || s[0].Repository != "a" || s[1].Repository != "b" || s[0].Stats.Backups != 2 {
		t.Fatalf("after adding b: %+v", s)
	}
	if n := get("b"); n != 1 {
		t.Fatalf("b computed %d times at its first read, want 1", n)
	}
	c.SetRepositories([]string{"b"})
	if s := c.Stats(); len(s) != 1 || s[0].Repository != "b" {
		t.Fatalf("after removing a: %+v", s)
	}
}

// TestStatsCacheStopped: once its context is cancelled, nothing more is
// computed.
func TestStatsCacheStopped(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var calls atomic.Int32
	c := NewStatsCache(ctx, []string{"a"}, time.Hour, func(ctx context.Context, name string) (*repostats.Stats, error) {
		calls.Add(1)
		return &repostats.Stats{}, nil
	})
	cancel()
	c.Refresh("a")
	c.Stats()
	c.Wait()
	if n := calls.Load(); n != 0 {
		t.Fatalf("%d computations after the cache was stopped", n)
	}
}
