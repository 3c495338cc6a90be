// Package storage owns turning a repository's location into its storage
// backend: a local directory, or an s3:// URL with its connection
// settings, for the CLI's --repo and the server's repositories alike.
package storage

import (
	"context"
	"fmt"
	"os"
	"strconv"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3"
)

// Options are the settings of an S3 location; a directory takes none.
// Empty fields fall back to the environment: VMSHADOW_S3_CA,
// VMSHADOW_S3_ADDRESSING and VMSHADOW_S3_RETRIES.
type Options struct {
	// CAFile is the PEM file of the CA that signs the S3 server's
	// certificate.
	CAFile string
	// Addressing is "path", "virtual" or "" (auto).
	Addressing string
	// Connections bounds concurrent requests (0: the backend's default).
	Connections int
	// Create makes a new, empty repository location (repo init).
	Create bool
}

// IsS3 reports whether location is an S3 URL rather than a directory.
func IsS3(location string) bool { return s3.IsURL(location) }

// Open opens (or with o.Create, creates) the storage at location.
func Open(ctx context.Context, location string, o Options) (backend.Backend, error) {
	if !s3.IsURL(location) {
		if o.Create {
			return local.Create(location)
		}
		return local.Open(location)
	}
	cfg, err := s3.ParseURL(location)
	if err != nil {
		return nil, err
	}
	cfg.CAFile = or(o.CAFile, os.Getenv("VMSHADOW_S3_CA"))
	if cfg.Addressing, err = s3.ParseAddressing(or(o.Addressing, os.Getenv("VMSHADOW_S3_ADDRESSING"))); err != nil {
		return nil, err
	}
	cfg.Connections = o.Connections
	if v := os.Getenv("VMSHADOW_S3_RETRIES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("VMSHADOW_S3_RETRIES=%q: want the number of attempts per request, at least 1: %w", v, errs.ErrUsage)
		}
		cfg.Retry.Attempts = n
	}
	if o.Create {
		return s3.Create(ctx, cfg)
	}
	return s3.Open(ctx, cfg)
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
