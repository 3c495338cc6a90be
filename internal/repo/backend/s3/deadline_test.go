package s3

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3/s3test"
)

// TestStalledServerGivesUp is the rule "every peer wait has a deadline" for
// S3: a store that takes every request and never answers fails each call
// within attempts x StallTimeout (plus backoff), with errs.ErrConnect and an
// error naming the endpoint, even with a context that has no deadline.
func TestStalledServerGivesUp(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	cfg := r.config("stalled")
	cfg.StallTimeout = time.Second
	b := r.create(t, cfg)
	h := chunk("stalled")
	if err := b.Put(ctx, h, []byte("data")); err != nil {
		t.Fatal(err)
	}
	bound := time.Duration(fastRetry.Attempts)*cfg.StallTimeout + 5*time.Second
	for _, tc := range []struct {
		name, method string
		call         func() error
	}{
		{"put", "PUT", func() error { return b.Put(ctx, chunk("new"), []byte("data")) }},
		{"get", "GET", func() error { _, err := b.Get(ctx, h, 0, -1); return err }},
		{"stat", "HEAD", func() error { _, err := b.Stat(ctx, h); return err }},
		{"list", "GET", func() error {
			return b.List(ctx, backend.KindChunks, "", func(backend.Info) error { return nil })
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ru := r.proxy.Add(&s3test.Rule{Method: tc.method, From: 1, Act: s3test.Hang})
			defer r.proxy.Clear()
			start := time.Now()
			err := tc.call()
			if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), r.proxy.Endpoint()) {
				t.Fatalf("err = %v, want errs.ErrConnect naming the endpoint", err)
			}
			if d := time.Since(start); d > bound {
				t.Errorf("gave up after %s, want at most %s", d, bound)
			}
			if n := r.proxy.Hits(ru); n != fastRetry.Attempts {
				t.Errorf("%d attempts, want %d", n, fastRetry.Attempts)
			}
		})
	}
}
