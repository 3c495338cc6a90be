package metrics

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/repo/repostats"
)

// RepoStats is a repository's statistics as cached.
type RepoStats struct {
	Repository string
	// Stats are the latest computed (nil until the first computation
	// succeeds); Time is when they were.
	Stats *repostats.Stats
	Time  time.Time
	// Err is the latest refresh's error (nil when it succeeded): the
	// Stats shown are then those of an earlier one.
	Err error
}

// ComputeFunc computes a repository's statistics (the server opens the
// repository it names, with its key already unlocked, and calls
// repostats.Compute).
type ComputeFunc func(ctx context.Context, repository string) (*repostats.Stats, error)

// DefaultMaxAge is how old a StatsCache lets statistics get before it
// refreshes them at the next read, when no job did.
const DefaultMaxAge = time.Hour

// StatsCache keeps each repository's statistics, computed in the
// background so that a scrape or an API call never waits for them:
//
//   - the server calls Refresh(repository) after each job that changed the
//     repository (backup, prune, gc, copy, verify);
//   - Stats and Get return what is cached, and start a refresh of any
//     repository whose statistics are older than the maximum age (changes
//     made from elsewhere: the CLI, another host) or were never computed;
//   - a repository is computed by one goroutine at a time; a Refresh asked
//     while one runs makes it run once more when it ends (the job may have
//     changed the repository after the listing began), never more.
//
// Computing reads every manifest and index of the repository once (see
// repostats.Compute for its cost). It is safe for concurrent use.
type StatsCache struct {
	ctx     context.Context
	compute ComputeFunc
	maxAge  time.Duration
	now     func() time.Time

	mu      sync.Mutex
	entries map[string]*entry
	wg      sync.WaitGroup
}

type entry struct {
	RepoStats
	running bool // a computation is in flight
	again   bool // Refresh was asked during it
}

// NewStatsCache returns a cache of the statistics of the repositories
// names, computed by compute under ctx (cancel it when the server stops,
// then Wait for computations in flight), refreshed when older than maxAge
// (DefaultMaxAge if 0). Nothing is computed until the first Refresh or
// read.
func NewStatsCache(ctx context.Context, names []string, maxAge time.Duration, compute ComputeFunc) *StatsCache {
	if maxAge <= 0 {
		maxAge = DefaultMaxAge
	}
	c := &StatsCache{ctx: ctx, compute: compute, maxAge: maxAge, now: time.Now, entries: map[string]*entry{}}
	c.SetRepositories(names)
	return c
}

// SetRepositories replaces the set of repositories (after a configuration
// reload): new ones are computed at the next read, removed ones dropped.
func (c *StatsCache) SetRepositories(names []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	keep := map[string]*entry{}
	for _, n := range names {
		if e := c.entries[n]; e != nil {
			keep[n] = e
		} else {
			keep[n] = &entry{RepoStats: RepoStats{Repository: n}}
		}
	}
	c.entries = keep
}

// Refresh starts computing repository's statistics again (the job that
// just ended changed it). It does not wait.
func (c *StatsCache) Refresh(repository string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[repository]; e != nil {
		c.start(e)
	}
}

// start starts a computation of e, or asks the one running to run again.
// Hold c.mu.
func (c *StatsCache) start(e *entry) {
	if e.running {
		e.again = true
		return
	}
	if c.ctx.Err() != nil {
		return
	}
	e.running = true
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for {
			s, err := c.compute(c.ctx, e.Repository)
			at := c.now()
			c.mu.Lock()
			e.Err = err
			if err == nil {
				e.Stats, e.Time = s, at
			}
			if !e.again || c.ctx.Err() != nil {
				e.running, e.again = false, false
				c.mu.Unlock()
				return
			}
			e.again = false
			c.mu.Unlock()
		}
	}()
}

// stale starts refreshing e if its statistics are older than the
// maximum age. Hold c.mu.
func (c *StatsCache) stale(e *entry) {
	if e.running {
		return
	}
	if e.Stats == nil && e.Err == nil || c.now().Sub(e.Time) >= c.maxAge {
		c.start(e)
	}
}

// Stats returns every repository's cached statistics, by name, and starts
// refreshing those older than the maximum age. It never waits for a
// computation.
func (c *StatsCache) Stats() []RepoStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]RepoStats, 0, len(c.entries))
	for _, e := range c.entries {
		c.stale(e)
		out = append(out, e.RepoStats)
	}
	slices.SortFunc(out, func(a, b RepoStats) int {
		if a.Repository < b.Repository {
			return -1
		}
		if a.Repository > b.Repository {
			return 1
		}
		return 0
	})
	return out
}

// Get returns one repository's cached statistics (false: not a known
// repository), refreshing them when older than the maximum age.
func (c *StatsCache) Get(repository string) (RepoStats, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[repository]
	if e == nil {
		return RepoStats{}, false
	}
	c.stale(e)
	return e.RepoStats, true
}

// Wait waits until no computation is in flight (tests; shutdown, after
// cancelling the cache's context).
func (c *StatsCache) Wait() { c.wg.Wait() }
