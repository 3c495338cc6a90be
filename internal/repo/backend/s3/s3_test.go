package s3

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/backendtest"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3/s3test"
)

// fastRetry keeps fault tests quick.
var fastRetry = Retry{Attempts: 4, Base: time.Millisecond, Max: 5 * time.Millisecond}

// TestSuite runs the shared backend suite against a real S3 server: once
// with the defaults, once with small multipart thresholds and listing pages
// so that multipart uploads and pagination are exercised too.
func TestSuite(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{})
	srv.SetEnv(t)
	bucket := srv.Bucket(t)
	for _, tc := range []struct {
		name  string
		small bool
	}{{"defaults", false}, {"multipart-and-paging", true}} {
		t.Run(tc.name, func(t *testing.T) {
			n := 0
			backendtest.Run(t, func(t *testing.T) backend.Backend {
				n++
				cfg := Config{Endpoint: srv.Endpoint, Bucket: bucket, Prefix: fmt.Sprintf("%s/%d", tc.name, n)}
				if tc.small {
					cfg.MultipartThreshold, cfg.PartSize = 6<<20, 5<<20
				}
				b, err := Create(context.Background(), cfg)
				if err != nil {
					t.Fatal(err)
				}
				if tc.small {
					b.listPage = 7
				}
				return b
			})
		})
	}
}
