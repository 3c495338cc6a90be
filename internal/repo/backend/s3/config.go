package s3

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/minio/minio-go/v7/pkg/s3utils"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/redact"
)

// Addressing says how requests name the bucket.
type Addressing string

// The addressing styles.
const (
	// AddressingAuto uses virtual-host style for AWS, Google and Aliyun
	// endpoints and path style for everything else (MinIO, Ceph RGW,
	// Garage, versitygw, appliances), which is what those stores expect.
	AddressingAuto Addressing = "auto"
	// AddressingPath sends https://host/bucket/key.
	AddressingPath Addressing = "path"
	// AddressingVirtualHost sends https://bucket.host/key.
	AddressingVirtualHost Addressing = "virtual-host"
)

// ParseAddressing parses "auto", "path" or "virtual-host" ("" is auto).
func ParseAddressing(s string) (Addressing, error) {
	switch a := Addressing(s); a {
	case "", AddressingAuto:
		return AddressingAuto, nil
	case AddressingPath, AddressingVirtualHost:
		return a, nil
	}
	return "", fmt.Errorf("unknown S3 addressing %q (use auto, path or virtual-host): %w", s, errs.ErrUsage)
}

// Retry is the retry policy for transient failures: throttling (503
// SlowDown, 429), server errors (500, 502, 503, 504), timeouts and dropped
// connections. Attempt n (from 0) waits a random time up to
// min(Max, Base*2^n) first ("full jitter").
type Retry struct {
	Attempts int           // attempts in all, including the first; default 10
	Base     time.Duration // default 250 ms
	Max      time.Duration // default 20 s
}

// Config says where a repository lives on S3-compatible storage and how to
// talk to it. Credentials are not part of it: they come only from the
// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)
// or the shared AWS files (AWS_PROFILE, ~/.aws/credentials, ~/.aws/config).
type Config struct {
	Endpoint string // host or host:port
	Secure   bool   // https (else plain http)
	Bucket   string
	// Prefix is the key prefix the repository lives under ("" for the
	// bucket root): slash-separated segments, no leading or trailing slash.
	Prefix     string
	Addressing Addressing
	// Region defaults to $AWS_REGION, then $AWS_DEFAULT_REGION; when all
	// are empty the store is asked (GetBucketLocation).
	Region string
	// CAFile is a PEM file of extra certificate authorities to trust for
	// https (a private CA of an on-premises store).
	CAFile string
	// Connections bounds the requests in flight (uploads, downloads,
	// listings); default 16.
	Connections int
	// Objects larger than MultipartThreshold (default 128 MiB) are uploaded
	// in parts of PartSize (default 16 MiB, at least 5 MiB) in parallel.
	// Only a completed multipart upload becomes visible.
	MultipartThreshold int64
	PartSize           int64
	Retry              Retry
	// StallTimeout abandons (and retries) a request that made no progress,
	// sending or receiving, for this long; default 2 minutes.
	StallTimeout time.Duration

	// dial replaces the network dialer (tests: virtual-host names that
	// resolve to the test server).
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

const minPartSize = 5 << 20 // S3's minimum for every part but the last

func (c *Config) setDefaults() error {
	var err error
	if c.Addressing, err = ParseAddressing(string(c.Addressing)); err != nil {
		return err
	}
	if c.Connections <= 0 {
		c.Connections = 16
	}
	if c.PartSize == 0 {
		c.PartSize = 16 << 20
	}
	if c.PartSize < minPartSize {
		return fmt.Errorf("S3 part size %d is below the 5 MiB S3 minimum: %w", c.PartSize, errs.ErrUsage)
	}
	if c.MultipartThreshold <= 0 {
		c.MultipartThreshold = 128 << 20
	}
	if c.Retry.Attempts <= 0 {
		c.Retry.Attempts = 10
	}
	if c.Retry.Base <= 0 {
		c.Retry.Base = 250 * time.Millisecond
	}
	if c.Retry.Max <= 0 {
		c.Retry.Max = 20 * time.Second
	}
	if c.StallTimeout <= 0 {
		c.StallTimeout = 2 * time.Minute
	}
	if c.Endpoint == "" {
		return fmt.Errorf("S3 repository without an endpoint host: %w", errs.ErrUsage)
	}
	if err := s3utils.CheckValidBucketNameStrict(c.Bucket); err != nil {
		return fmt.Errorf("invalid S3 bucket name %q (%v): %w", c.Bucket, err, errs.ErrUsage)
	}
	return checkPrefix(c.Prefix)
}

// URL is the repository's location: s3:http(s)://endpoint/bucket[/prefix].
func (c Config) URL() string {
	scheme := "http"
	if c.Secure {
		scheme = "https"
	}
	u := "s3:" + scheme + "://" + c.Endpoint + "/" + c.Bucket
	if c.Prefix != "" {
		u += "/" + c.Prefix
	}
	return u
}

// IsURL reports whether a repository location names S3 storage.
func IsURL(s string) bool { return strings.HasPrefix(s, "s3:") }

// ParseURL parses a repository location of the form
//
//	s3:https://host[:port]/bucket[/prefix...]
//	s3:http://host[:port]/bucket[/prefix...]
//	s3:host[:port]/bucket[/prefix...]          (https)
//
// Credentials in the URL are refused before anything else (they would show
// in process listings and shell histories; no error repeats such a URL);
// so are query strings and fragments.
func ParseURL(s string) (Config, error) {
	var c Config
	rest, ok := strings.CutPrefix(s, "s3:")
	if !ok {
		return c, fmt.Errorf("S3 repository location must start with s3: (s3:https://host/bucket/prefix): %w", errs.ErrUsage)
	}
	if !strings.Contains(rest, "://") {
		rest = "https://" + rest
	}
	scheme, _, _ := strings.Cut(rest, "://")
	if strings.Contains(rest, "@") { // no bucket or prefix has one: user info
		return c, fmt.Errorf("credentials in the S3 repository URL are not accepted (they would be visible to every user of this host): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE: %w", errs.ErrUsage)
	}
	u, err := url.Parse(rest)
	if err != nil {
		return c, fmt.Errorf("invalid S3 repository URL %q: %v: %w", redact.URL(s), unwrapURLError(err), errs.ErrUsage)
	}
	switch scheme {
	case "https":
		c.Secure = true
	case "http":
	default:
		return c, fmt.Errorf("S3 repository URL %q: scheme must be http or https: %w", redact.URL(s), errs.ErrUsage)
	}
	if u.RawQuery != "" || u.Fragment != "" || strings.Contains(rest, "?") || strings.Contains(rest, "#") {
		return c, fmt.Errorf("S3 repository URL %q: no query string or fragment allowed (options are flags: --s3-ca, --s3-addressing): %w", redact.URL(s), errs.ErrUsage)
	}
	if u.Host == "" || u.Hostname() == "" {
		return c, fmt.Errorf("S3 repository URL %q has no host (s3:https://host/bucket/prefix): %w", redact.URL(s), errs.ErrUsage)
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n <= 0 || n > 65535 {
			return c, fmt.Errorf("S3 repository URL %q: invalid port %q: %w", redact.URL(s), p, errs.ErrUsage)
		}
	}
	c.Endpoint = u.Host
	path := strings.TrimPrefix(u.Path, "/")
	bucket, prefix, _ := strings.Cut(path, "/")
	if bucket == "" {
		return c, fmt.Errorf("S3 repository URL %q names no bucket (s3:https://host/bucket/prefix): %w", redact.URL(s), errs.ErrUsage)
	}
	c.Bucket = bucket
	c.Prefix = strings.TrimSuffix(prefix, "/")
	if err := s3utils.CheckValidBucketNameStrict(c.Bucket); err != nil {
		return c, fmt.Errorf("S3 repository URL %q: invalid bucket name %q (%v): %w", redact.URL(s), c.Bucket, err, errs.ErrUsage)
	}
	if err := checkPrefix(c.Prefix); err != nil {
		return c, fmt.Errorf("S3 repository URL %q: %w", redact.URL(s), err)
	}
	return c, nil
}

// unwrapURLError drops the URL that url.Parse repeats in its error.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// checkPrefix allows segments of [A-Za-z0-9._-], none "." or "..", joined
// by single slashes, at most 512 bytes.
func checkPrefix(p string) error {
	if p == "" {
		return nil
	}
	if len(p) > 512 {
		return fmt.Errorf("S3 key prefix longer than 512 bytes: %w", errs.ErrUsage)
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return fmt.Errorf("invalid S3 key prefix %q: empty, \".\" or \"..\" segment: %w", p, errs.ErrUsage)
		}
		for _, ch := range []byte(seg) {
			if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '.' || ch == '_' || ch == '-') {
				return fmt.Errorf("invalid S3 key prefix %q (allowed: letters, digits, . _ - and / between segments): %w", p, errs.ErrUsage)
			}
		}
	}
	return nil
}
