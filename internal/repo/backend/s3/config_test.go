package s3

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3/s3test"
)

func TestParseURL(t *testing.T) {
	for _, tc := range []struct {
		in                       string
		endpoint, bucket, prefix string
		secure                   bool
		err                      string
	}{
		{in: "s3:https://s3.example.net/bucket/prefix", endpoint: "s3.example.net", bucket: "bucket", prefix: "prefix", secure: true},
		{in: "s3:http://127.0.0.1:7070/bucket", endpoint: "127.0.0.1:7070", bucket: "bucket"},
		{in: "s3:http://127.0.0.1:7070/bucket/", endpoint: "127.0.0.1:7070", bucket: "bucket"},
		{in: "s3:s3.amazonaws.com/my.bucket/a/b-c/d_e.f/", endpoint: "s3.amazonaws.com", bucket: "my.bucket", prefix: "a/b-c/d_e.f", secure: true},
		{in: "s3:https://[::1]:9000/bkt/x", endpoint: "[::1]:9000", bucket: "bkt", prefix: "x", secure: true},
		{in: "s3:https://AKIA:secret@host/bucket", err: "credentials in the S3 repository URL"},
		{in: "s3:https://user@host/bucket", err: "credentials in the S3 repository URL"},
		{in: "s3:ftp://host/bucket", err: "scheme must be http or https"},
		{in: "s3:https://host", err: "names no bucket"},
		{in: "s3:https://host/", err: "names no bucket"},
		{in: "s3:https:///bucket", err: "has no host"},
		{in: "s3:https://host:0/bucket", err: "invalid port"},
		{in: "s3:https://host:99999/bucket", err: "invalid port"},
		{in: "s3:https://host/Bucket", err: "invalid bucket name"},
		{in: "s3:https://host/b", err: "invalid bucket name"},
		{in: "s3:https://host/bucket/a//b", err: "empty"},
		{in: "s3:https://host/bucket/a/../b", err: `".."`},
		{in: "s3:https://host/bucket/a/./b", err: `"."`},
		{in: "s3:https://host/bucket/a b", err: "invalid S3 key prefix"},
		{in: "s3:https://host/bucket/x?versioning=1", err: "no query string"},
		{in: "s3:https://host/bucket/x#frag", err: "no query string"},
		{in: "s3:http://127.0.0.1:7391/bkt?X-Amz-Credential=secret", err: "no query string"},
		{in: "s3:http://127.0.0.1:7391/bkt#secret", err: "no query string"},
		{in: "s3:ftp://host/bucket?secret", err: "scheme must be http or https"},
		{in: "s3:https://host:99999/bucket?secret", err: "no query string"},
		{in: "s3:https://host/bucket/x%zz?secret", err: "invalid URL escape"},
		{in: "s3:https:///bucket?secret", err: "no query string"},
		{in: "/srv/repo", err: "must start with s3:"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			c, err := ParseURL(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errors.Is(err, errs.ErrUsage) {
					t.Fatalf("ParseURL(%q) = %+v, %v; want usage error saying %q", tc.in, c, err, tc.err)
				}
				if strings.Contains(err.Error(), "secret") && !strings.Contains(err.Error(), "AWS_SECRET") {
					t.Fatalf("error repeats the secret: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseURL(%q): %v", tc.in, err)
			}
			if c.Endpoint != tc.endpoint || c.Bucket != tc.bucket || c.Prefix != tc.prefix || c.Secure != tc.secure {
				t.Fatalf("ParseURL(%q) = %+v", tc.in, c)
			}
			if back, err := ParseURL(c.URL()); err != nil || back.URL() != c.URL() {
				t.Fatalf("URL() %q does not round-trip: %v", c.URL(), err)
			}
		})
	}
}

func FuzzParseURL(f *testing.F) {
	for _, s := range []string{"s3:https://h/b/p", "s3:http://1.2.3.4:5/bkt", "s3:h/bb", "s3:https://u:p@h/b", "s3:", "s3:https://h/b/%2e%2e/x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseURL(s)
		if err != nil {
			if strings.Contains(s, "@") && strings.Contains(err.Error(), "@") {
				t.Fatalf("error repeats a URL with credentials: %v", err)
			}
			return
		}
		if err := c.setDefaults(); err != nil {
			t.Fatalf("ParseURL(%q) accepted a config that does not validate: %v", s, err)
		}
		if strings.Contains(c.Prefix, "..") && strings.Contains("/"+c.Prefix+"/", "/../") {
			t.Fatalf("prefix escapes: %q", c.Prefix)
		}
		back, err := ParseURL(c.URL())
		if err != nil || back.URL() != c.URL() || back.Secure != c.Secure || back.Prefix != c.Prefix {
			t.Fatalf("ParseURL(%q) = %+v, does not round-trip through %q: %+v %v", s, c, c.URL(), back, err)
		}
	})
}

// TestTLS: https with a private CA works with the CA file and fails
// clearly without it; https to a plain-HTTP store says so.
func TestTLS(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{TLS: true})
	srv.SetEnv(t)
	ctx := context.Background()
	cfg := Config{Endpoint: srv.Endpoint, Secure: true, Bucket: "tls-bucket", Retry: fastRetry}
	_, err := Create(ctx, cfg)
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "unknown authority") || !strings.Contains(err.Error(), "--s3-ca") {
		t.Fatalf("without the CA: %v", err)
	}
	cfg.CAFile = srv.CAFile
	b, err := Create(ctx, cfg)
	if err != nil {
		t.Fatalf("with the CA: %v", err)
	}
	h := backend.Handle{Kind: backend.KindChunks, Name: "tls"}
	if err := b.Put(ctx, h, []byte("over tls")); err != nil {
		t.Fatal(err)
	}
	if d, err := b.Get(ctx, h, 0, -1); err != nil || string(d) != "over tls" {
		t.Fatalf("Get: %q %v", d, err)
	}
	cfg.CAFile = "/nonexistent/ca.pem"
	if _, err := Open(ctx, cfg); !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "CA") {
		t.Fatalf("missing CA file: %v", err)
	}
	plain := s3test.Start(t, s3test.Options{})
	t.Setenv("AWS_ACCESS_KEY_ID", plain.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", plain.SecretKey)
	_, err = Open(ctx, Config{Endpoint: plain.Endpoint, Secure: true, Bucket: "any-bucket", Retry: fastRetry})
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "s3:http://") {
		t.Fatalf("https to a plain HTTP store: %v", err)
	}
}

// TestAddressing: virtual-host style sends the bucket in the host name
// (bucket.domain), path style in the path; both reach the same objects.
func TestAddressing(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{VirtualDomain: "s3.test"})
	srv.SetEnv(t)
	bucket := srv.Bucket(t)
	port := srv.Endpoint[strings.LastIndex(srv.Endpoint, ":"):]
	var mu sync.Mutex
	var dialed []string
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		dialed = append(dialed, addr)
		mu.Unlock()
		return (&net.Dialer{}).DialContext(ctx, network, srv.Endpoint)
	}
	ctx := context.Background()
	h := backend.Handle{Kind: backend.KindBackups, Name: "addr"}
	for _, tc := range []struct {
		addressing Addressing
		host       string
	}{
		{AddressingVirtualHost, bucket + ".s3.test" + port},
		{AddressingPath, "s3.test" + port},
		{AddressingAuto, "s3.test" + port}, // not AWS: path style
	} {
		t.Run(string(tc.addressing), func(t *testing.T) {
			mu.Lock()
			dialed = nil
			mu.Unlock()
			cfg := Config{Endpoint: "s3.test" + port, Bucket: bucket, Prefix: string(tc.addressing), Addressing: tc.addressing, Region: "us-east-1", dial: dial}
			b, err := Create(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			if err := b.Put(ctx, h, []byte(tc.addressing)); err != nil {
				t.Fatal(err)
			}
			if d, err := b.Get(ctx, h, 0, -1); err != nil || string(d) != string(tc.addressing) {
				t.Fatalf("Get: %q %v", d, err)
			}
			mu.Lock()
			defer mu.Unlock()
			for _, a := range dialed {
				if a != tc.host {
					t.Fatalf("dialed %s, want only %s", a, tc.host)
				}
			}
			if len(dialed) == 0 {
				t.Fatal("nothing dialed")
			}
		})
	}
	if _, err := ParseAddressing("dns"); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("ParseAddressing(dns): %v", err)
	}
}
