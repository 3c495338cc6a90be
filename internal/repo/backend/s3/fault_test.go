package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3/s3test"
)

// rig is a real S3 server, a bucket, and a fault proxy in front of it.
type rig struct {
	srv    *s3test.Server
	bucket string
	proxy  *s3test.FaultProxy
}

func newRig(t *testing.T) *rig {
	srv := s3test.Start(t, s3test.Options{})
	srv.SetEnv(t)
	return &rig{srv: srv, bucket: srv.Bucket(t), proxy: s3test.NewFaultProxy(t, srv.Endpoint)}
}

// config is a repository in the rig's bucket reached through the proxy.
func (r *rig) config(prefix string) Config {
	return Config{Endpoint: r.proxy.Endpoint(), Bucket: r.bucket, Prefix: prefix, Retry: fastRetry}
}

func (r *rig) create(t *testing.T, cfg Config) *Backend {
	t.Helper()
	b, err := Create(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Create %s: %v", cfg.URL(), err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// direct tells whether a key exists, asking the server itself.
func (r *rig) exists(t *testing.T, key string) bool {
	t.Helper()
	_, err := r.srv.Client(t).StatObject(context.Background(), r.bucket, key, minio.StatObjectOptions{})
	if err != nil && minio.ToErrorResponse(err).Code != "NoSuchKey" {
		t.Fatalf("stat %s on the server: %v", key, err)
	}
	return err == nil
}

func payload(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func chunk(name string) backend.Handle { return backend.Handle{Kind: backend.KindChunks, Name: name} }

// TestTransientFaultsRetried: each way a request can fail transiently,
// injected once, is retried; the blob is stored or read intact.
func TestTransientFaultsRetried(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	cfg := r.config("transient")
	cfg.StallTimeout = 2 * time.Second // the hang cases wait this long; shorter flakes under load
	b := r.create(t, cfg)
	data := payload(1, 3<<20+17)
	for _, tc := range []struct {
		name   string
		method string
		act    s3test.Action
	}{
		{"put-slowdown", "PUT", s3test.SlowDown},
		{"put-500", "PUT", s3test.ServerError},
		{"put-dropped-before-store", "PUT", s3test.DropRequest},
		{"put-answer-lost", "PUT", s3test.DropResponse},
		{"put-cut-mid-body", "PUT", s3test.CutUpload},
		{"put-hangs", "PUT", s3test.Hang},
		{"put-corrupted-on-the-way", "PUT", s3test.Corrupt},
		{"get-slowdown", "GET", s3test.SlowDown},
		{"get-cut-mid-body", "GET", s3test.CutDownload},
		{"get-answer-lost", "GET", s3test.DropResponse},
		{"get-hangs", "GET", s3test.Hang},
		{"head-500", "HEAD", s3test.ServerError},
		{"delete-dropped", "DELETE", s3test.DropRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := chunk("c" + strings.ReplaceAll(tc.name, "-", ""))
			if tc.method != "PUT" {
				if err := b.Put(ctx, h, data); err != nil {
					t.Fatal(err)
				}
			}
			before := b.Retries()
			ru := r.proxy.Add(&s3test.Rule{Method: tc.method, Contains: h.Name, From: 1, To: 1, Act: tc.act})
			defer r.proxy.Clear()
			var err error
			switch tc.method {
			case "PUT":
				err = b.Put(ctx, h, data)
			case "GET":
				var got []byte
				got, err = b.Get(ctx, h, 0, -1)
				if err == nil && !bytes.Equal(got, data) {
					t.Fatalf("Get after a %s returned %d wrong bytes", tc.name, len(got))
				}
			case "HEAD":
				var fi backend.Info
				fi, err = b.Stat(ctx, h)
				if err == nil && fi.Size != int64(len(data)) {
					t.Fatalf("Stat size %d", fi.Size)
				}
			case "DELETE":
				err = b.Delete(ctx, h)
			}
			if err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			if r.proxy.Hits(ru) != 1 {
				t.Fatalf("fault injected %d times, want 1", r.proxy.Hits(ru))
			}
			// net/http itself resends an idempotent request whose reused
			// connection closed before any answer: no retry of ours then.
			transportRetry := (tc.act == s3test.DropRequest || tc.act == s3test.DropResponse) && tc.method != "PUT"
			if got := b.Retries() - before; got != 1 && !(transportRetry && got == 0) {
				t.Errorf("%d retries, want 1", got)
			}
			key, _ := b.key(h)
			if tc.method == "DELETE" {
				if r.exists(t, key) {
					t.Fatal("blob still there after Delete")
				}
				return
			}
			got, err := r.srv.Client(t).GetObject(ctx, r.bucket, key, minio.GetObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer got.Close()
			var buf bytes.Buffer
			if _, err := buf.ReadFrom(got); err != nil || !bytes.Equal(buf.Bytes(), data) {
				t.Fatalf("stored object differs (%d bytes, %v)", buf.Len(), err)
			}
		})
	}
}

// TestThrottlingGivesUp: a store that keeps throttling gets Attempts tries
// with backoff, then a clear error; nothing is stored, and the next write
// works once the store recovers.
func TestThrottlingGivesUp(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	b := r.create(t, r.config("throttle"))
	h := chunk("throttled")
	ru := r.proxy.Add(&s3test.Rule{Method: "PUT", Contains: h.Name, From: 1, Act: s3test.SlowDown})
	start := time.Now()
	err := b.Put(ctx, h, []byte("data"))
	if err == nil {
		t.Fatal("Put succeeded against a store that always throttles")
	}
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "SlowDown") || !strings.Contains(err.Error(), "4 times") ||
		!strings.Contains(err.Error(), "chunks/throttled") || !strings.Contains(err.Error(), "throttling") {
		t.Fatalf("unclear error: %v", err)
	}
	if n := r.proxy.Hits(ru); n != fastRetry.Attempts {
		t.Errorf("%d attempts, want %d", n, fastRetry.Attempts)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("giving up took %s", time.Since(start))
	}
	key, _ := b.key(h)
	if r.exists(t, key) {
		t.Fatal("a throttled write left an object")
	}
	r.proxy.Clear()
	if err := b.Put(ctx, h, []byte("data")); err != nil {
		t.Fatalf("Put after the store recovered: %v", err)
	}
}

// TestPartialUploadNeverVisible: an upload cut mid-body every time leaves no
// object (not even a partial one) on the server, single PUT or multipart;
// an aborted multipart upload leaves no parts behind.
func TestPartialUploadNeverVisible(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	cfg := r.config("partial")
	cfg.MultipartThreshold, cfg.PartSize = 6<<20, 5<<20
	b := r.create(t, cfg)
	for _, tc := range []struct {
		name     string
		size     int
		contains string // which requests to cut
	}{
		{"single", 3 << 20, ""},
		{"multipart-part-2", 13 << 20, "partNumber=2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := chunk("partial" + strings.ReplaceAll(tc.name, "-", ""))
			key, _ := b.key(h)
			data := payload(2, tc.size)
			match := key
			if tc.contains != "" {
				match += "?" + tc.contains
			}
			r.proxy.Add(&s3test.Rule{Method: "PUT", Contains: match, From: 1, Act: s3test.CutUpload})
			err := b.Put(ctx, h, data)
			r.proxy.Clear()
			if err == nil {
				t.Fatal("Put succeeded although every upload was cut")
			}
			if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), h.String()) {
				t.Fatalf("unclear error: %v", err)
			}
			if r.exists(t, key) {
				t.Fatal("a cut upload left a visible object")
			}
			if _, err := b.Stat(ctx, h); !backend.IsNotExist(err) {
				t.Fatalf("Stat after a failed upload: %v", err)
			}
			var names []string
			b.List(ctx, backend.KindChunks, h.Name, func(fi backend.Info) error { names = append(names, fi.Name); return nil })
			if len(names) != 0 {
				t.Fatalf("List after a failed upload: %v", names)
			}
			for u := range r.srv.Client(t).ListIncompleteUploads(ctx, r.bucket, key, true) {
				t.Fatalf("incomplete upload left behind: %+v", u)
			}
			if err := b.Put(ctx, h, data); err != nil {
				t.Fatalf("Put once the network is fine: %v", err)
			}
			if got, err := b.Get(ctx, h, 0, -1); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("Get: %d bytes, %v", len(got), err)
			}
		})
	}
}

// TestMultipartUpload: large blobs go up in parts (the server's ETag of a
// multipart object ends in -<parts>) and read back intact.
func TestMultipartUpload(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	cfg := r.config("multipart")
	cfg.MultipartThreshold, cfg.PartSize = 6<<20, 5<<20
	b := r.create(t, cfg)
	for _, n := range []int{6 << 20, 6<<20 + 1, 15 << 20, 15<<20 + 3} {
		h := chunk(fmt.Sprintf("mp%d", n))
		data := payload(uint64(n), n)
		if err := b.Put(ctx, h, data); err != nil {
			t.Fatal(err)
		}
		key, _ := b.key(h)
		oi, err := r.srv.Client(t).StatObject(ctx, r.bucket, key, minio.StatObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		parts := (n + 5<<20 - 1) / (5 << 20)
		multipart := strings.HasSuffix(oi.ETag, fmt.Sprintf("-%d", parts))
		if multipart != (n > 6<<20) {
			t.Errorf("%d bytes: ETag %s (multipart %v), want multipart %v", n, oi.ETag, multipart, n > 6<<20)
		}
		if got, err := b.Get(ctx, h, 0, -1); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%d bytes: Get %d bytes, %v", n, len(got), err)
		}
		if got, err := b.Get(ctx, h, 5<<20-10, 20); err != nil || !bytes.Equal(got, data[5<<20-10:5<<20+10]) {
			t.Fatalf("%d bytes: ranged Get across a part boundary: %v", n, err)
		}
	}
}

// TestCleanTemp: gc's CleanTemp aborts incomplete multipart uploads older
// than its age under the repository prefix, and only those.
func TestCleanTemp(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	b := r.create(t, r.config("cleantemp"))
	core := minio.Core{Client: r.srv.Client(t)}
	if _, err := core.NewMultipartUpload(ctx, r.bucket, "cleantemp/chunks/ab/abandoned", minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := core.NewMultipartUpload(ctx, r.bucket, "elsewhere/x", minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if n, err := b.CleanTemp(ctx, time.Hour); err != nil || n != 0 {
		t.Fatalf("CleanTemp(1h) = %d, %v; want 0 (the upload is young)", n, err)
	}
	time.Sleep(1100 * time.Millisecond) // Initiated has whole seconds
	if n, err := b.CleanTemp(ctx, time.Millisecond); err != nil || n != 1 {
		t.Fatalf("CleanTemp(1ms) = %d, %v; want 1", n, err)
	}
	var left []string
	for u := range r.srv.Client(t).ListIncompleteUploads(ctx, r.bucket, "", true) {
		left = append(left, u.Key)
	}
	if fmt.Sprint(left) != "[elsewhere/x]" {
		t.Fatalf("incomplete uploads left: %v, want only the one outside the prefix", left)
	}
}

// TestCredentials: missing, wrong and profile credentials; no error shows a
// secret.
func TestCredentials(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{})
	srv.SetEnv(t)
	bucket := srv.Bucket(t)
	ctx := context.Background()
	cfg := Config{Endpoint: srv.Endpoint, Bucket: bucket, Retry: fastRetry}
	if _, err := Create(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, key, secret, want string
	}{
		{"none", "", "", "no S3 credentials"},
		{"wrong-secret", srv.AccessKey, "WRONGsecretWRONGsecret", "secret key does not match"},
		{"unknown-key", "NOSUCHKEYID", srv.SecretKey, "does not know the access key ID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("AWS_ACCESS_KEY_ID", tc.key)
			t.Setenv("AWS_SECRET_ACCESS_KEY", tc.secret)
			_, err := Open(ctx, cfg)
			if !errors.Is(err, errs.ErrAuth) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open: %v, want ErrAuth saying %q", err, tc.want)
			}
			for _, s := range []string{srv.SecretKey, "WRONGsecret"} {
				if strings.Contains(err.Error(), s) {
					t.Fatalf("error shows a secret: %v", err)
				}
			}
		})
	}
	t.Run("profile", func(t *testing.T) {
		dir := t.TempDir()
		f := filepath.Join(dir, "credentials")
		os.WriteFile(f, []byte("[default]\naws_access_key_id = NOPE\naws_secret_access_key = nope\n\n[backup]\naws_access_key_id = "+srv.AccessKey+"\naws_secret_access_key = "+srv.SecretKey+"\n"), 0o600)
		t.Setenv("AWS_ACCESS_KEY_ID", "")
		t.Setenv("AWS_SECRET_ACCESS_KEY", "")
		t.Setenv("AWS_SHARED_CREDENTIALS_FILE", f)
		t.Setenv("AWS_PROFILE", "backup")
		b, err := Create(ctx, Config{Endpoint: srv.Endpoint, Bucket: bucket, Prefix: "profile"})
		if err != nil {
			t.Fatalf("with AWS_PROFILE: %v", err)
		}
		b.Close()
		t.Setenv("AWS_PROFILE", "")
		if _, err := Open(ctx, cfg); !errors.Is(err, errs.ErrAuth) {
			t.Fatalf("default profile with a bad key: %v, want ErrAuth", err)
		}
	})
}

// TestBuckets: a missing bucket is a clear not-found error for Open and is
// created by Create; Create refuses prefixes that hold a repository or
// anything else.
func TestBuckets(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{})
	srv.SetEnv(t)
	ctx := context.Background()
	cfg := Config{Endpoint: srv.Endpoint, Bucket: "not-there-yet", Prefix: "repo", Retry: fastRetry}
	_, err := Open(ctx, cfg)
	if !errors.Is(err, errs.ErrNotFound) || !strings.Contains(err.Error(), `bucket "not-there-yet"`) || !strings.Contains(err.Error(), "repo init") {
		t.Fatalf("Open of a missing bucket: %v", err)
	}
	b, err := Create(ctx, cfg)
	if err != nil {
		t.Fatalf("Create in a missing bucket: %v", err)
	}
	if ok, err := srv.Client(t).BucketExists(ctx, "not-there-yet"); err != nil || !ok {
		t.Fatalf("bucket not created: %v", err)
	}
	if _, err := Open(ctx, cfg); !errors.Is(err, errs.ErrNotFound) || !strings.Contains(err.Error(), "not a vmshadow repository") {
		t.Fatalf("Open of an empty prefix: %v", err)
	}
	if err := b.Put(ctx, configHandle, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, cfg); err != nil {
		t.Fatalf("Open: %v", err)
	}
	if _, err := Create(ctx, cfg); !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "already holds a repository") {
		t.Fatalf("Create over a repository: %v", err)
	}
	if _, err := srv.Client(t).PutObject(ctx, "not-there-yet", "other/file", strings.NewReader("x"), 1, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg.Prefix = "other"
	if _, err := Create(ctx, cfg); !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "not empty") {
		t.Fatalf("Create in a used prefix: %v", err)
	}
	cfg.Prefix = "" // the bucket root holds both
	if _, err := Create(ctx, cfg); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("Create at the root of a used bucket: %v", err)
	}
}

// TestConsistencyProbe: Create refuses a store that serves a stale read.
func TestConsistencyProbe(t *testing.T) {
	r := newRig(t)
	for _, tc := range []struct {
		method, want string
	}{{"GET", "not found"}, {"GET", "older content"}} {
		t.Run(tc.want, func(t *testing.T) {
			prefix := "probe" + strings.ReplaceAll(tc.want, " ", "")
			if tc.want == "not found" {
				r.proxy.Add(&s3test.Rule{Method: "GET", Contains: "consistency-probe", From: 1, To: 1, Act: s3test.NotFound})
			} else {
				// The second write is acknowledged but not applied.
				r.proxy.Add(&s3test.Rule{Method: "PUT", Contains: "consistency-probe", From: 2, To: 2, Act: s3test.FakeOK})
			}
			defer r.proxy.Clear()
			_, err := Create(context.Background(), r.config(prefix))
			if !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Create on an inconsistent store: %v, want ErrUnsupported saying %q", err, tc.want)
			}
			if r.exists(t, prefix+"/config") {
				t.Fatal("config written")
			}
		})
	}
}

// TestStoreClock: a store whose clock is an hour ahead still gives object
// times on this host's clock, so gc's grace period is not cut short (or
// stretched) by the skew.
func TestStoreClock(t *testing.T) {
	r := newRig(t)
	r.proxy.SetSkew(time.Hour)
	ctx := context.Background()
	b := r.create(t, r.config("clock"))
	h := chunk("clock1")
	if err := b.Put(ctx, h, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if off := b.ClockOffset(); off < time.Hour-2*time.Second || off > time.Hour {
		t.Errorf("measured offset %s, want about 1h", off)
	}
	fi, err := b.Stat(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(fi.ModTime); d < -3*time.Second || d > 3*time.Second {
		t.Errorf("Stat ModTime is %s from now, want about now", d)
	}
	b.List(ctx, backend.KindChunks, "", func(fi backend.Info) error {
		if d := time.Since(fi.ModTime); d < -3*time.Second || d > 3*time.Second {
			t.Errorf("List ModTime is %s from now, want about now", d)
		}
		return nil
	})
	// An object written two hours ago (its file's mtime on the server) is
	// two hours old.
	old := time.Now().Add(-2 * time.Hour)
	key, _ := b.key(h)
	if err := os.Chtimes(filepath.Join(r.srv.Dir, r.bucket, key), old, old); err != nil {
		t.Fatal(err)
	}
	fi, err = b.Stat(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(fi.ModTime) - 2*time.Hour; d < -3*time.Second || d > 3*time.Second {
		t.Errorf("an object written 2h ago looks %s old", time.Since(fi.ModTime))
	}
}

// TestConnectionsBounded: no more requests are in flight than Connections,
// however many callers.
func TestConnectionsBounded(t *testing.T) {
	r := newRig(t)
	r.proxy.SetDelay(20 * time.Millisecond)
	cfg := r.config("bounded")
	cfg.Connections = 3
	b := r.create(t, cfg)
	r.proxy.MaxInflight() // count from here
	var wg sync.WaitGroup
	for i := range 24 {
		wg.Go(func() {
			h := chunk(fmt.Sprintf("bound%02d", i))
			if err := b.Put(context.Background(), h, payload(uint64(i), 100<<10)); err != nil {
				t.Error(err)
			}
			if _, err := b.Get(context.Background(), h, 0, -1); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	got := r.proxy.MaxInflight()
	if got > 3 || got < 2 {
		t.Fatalf("%d requests in flight at most, want 3 (the bound)", got)
	}
}

// TestUnreachable: a closed port is a connection error after the retries,
// saying so.
func TestUnreachable(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "x")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "y")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, err = Open(context.Background(), Config{Endpoint: addr, Bucket: "bucket", Region: "us-east-1", Retry: fastRetry})
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "is it running") {
		t.Fatalf("Open of a closed port: %v", err)
	}
}

// TestCancelledWhileRetrying: cancelling stops the retries at once.
func TestCancelledWhileRetrying(t *testing.T) {
	r := newRig(t)
	cfg := r.config("cancel")
	cfg.Retry = Retry{Attempts: 100, Base: 50 * time.Millisecond, Max: 50 * time.Millisecond}
	b := r.create(t, cfg)
	r.proxy.Add(&s3test.Rule{Method: "PUT", From: 1, Act: s3test.SlowDown})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := b.Put(ctx, chunk("cancel"), []byte("x"))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Put: %v, want the deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Put returned %s after it was cancelled", d)
	}
}

// TestErrorClasses: what the store answers becomes the right error class,
// with a message that says what to do.
func TestErrorClasses(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	b := r.create(t, r.config("classes"))
	h := chunk("classes")
	if err := b.Put(ctx, h, []byte("x")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		method, code string
		status       int
		classes      []error
		not          []error
		want         string
	}{
		{"PUT", "AccessDenied", 403, []error{errs.ErrAuth, backend.ErrReadOnly}, nil, "may only read"},
		{"DELETE", "AccessDenied", 403, []error{errs.ErrAuth, backend.ErrReadOnly}, nil, "may only read"},
		{"GET", "AccessDenied", 403, []error{errs.ErrAuth}, []error{backend.ErrReadOnly}, "bucket policy"},
		{"GET", "ExpiredToken", 400, []error{errs.ErrAuth}, nil, "AWS_SESSION_TOKEN"},
		{"GET", "RequestTimeTooSkewed", 403, []error{errs.ErrAuth}, nil, "clock"},
		{"PUT", "XMinioStorageFull", 507, []error{errs.ErrNoSpace}, nil, "full"},
		{"PUT", "QuotaExceeded", 403, []error{errs.ErrNoSpace}, nil, "quota"},
		{"GET", "NoSuchBucket", 404, []error{errs.ErrNotFound}, []error{backend.ErrNotExist}, "does not exist"},
		{"GET", "NoSuchKey", 404, []error{backend.ErrNotExist}, nil, "chunks/classes"},
		{"GET", "InvalidArgument", 400, nil, []error{errs.ErrAuth, errs.ErrConnect, backend.ErrNotExist}, "InvalidArgument (HTTP 400)"},
		{"GET", "InternalError", 500, []error{errs.ErrConnect}, nil, "4 times"},
	} {
		t.Run(tc.method+"-"+tc.code, func(t *testing.T) {
			ru := r.proxy.Add(&s3test.Rule{Method: tc.method, Contains: h.Name, From: 1, Act: s3test.Fail, Status: tc.status, Code: tc.code})
			defer r.proxy.Clear()
			var err error
			switch tc.method {
			case "PUT":
				err = b.Put(ctx, h, []byte("y"))
			case "DELETE":
				err = b.Delete(ctx, h)
			case "GET":
				_, err = b.Get(ctx, h, 0, -1)
			}
			if err == nil || r.proxy.Hits(ru) == 0 {
				t.Fatalf("no error (%d faults injected)", r.proxy.Hits(ru))
			}
			for _, c := range tc.classes {
				if !errors.Is(err, c) {
					t.Errorf("error %q is not %v", err, c)
				}
			}
			for _, c := range tc.not {
				if errors.Is(err, c) {
					t.Errorf("error %q is %v", err, c)
				}
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

// TestIntegrityModes: a store that verifies CRC32C headers gets them; one
// that ignores them (it accepts the probe's wrong checksum) gets signed
// payload hashes. Either way a body damaged on the way is refused and the
// retry stores it intact.
func TestIntegrityModes(t *testing.T) {
	r := newRig(t)
	ctx := context.Background()
	for _, ignores := range []bool{false, true} {
		t.Run(fmt.Sprintf("store-ignores-checksums=%v", ignores), func(t *testing.T) {
			if ignores {
				r.proxy.Add(&s3test.Rule{Method: "PUT", Contains: "checksum-probe", From: 1, Act: s3test.FakeOK})
			}
			b := r.create(t, r.config(fmt.Sprintf("integrity%v", ignores)))
			h := chunk("integrity")
			data := payload(9, 1<<20+5)
			corrupt := r.proxy.Add(&s3test.Rule{Method: "PUT", Contains: "/chunks/in/" + h.Name, From: 1, To: 1, Act: s3test.Corrupt})
			defer r.proxy.Clear()
			if err := b.Put(ctx, h, data); err != nil {
				t.Fatal(err)
			}
			if b.crc32c == ignores {
				t.Fatalf("crc32c mode %v", b.crc32c)
			}
			if r.proxy.Hits(corrupt) != 1 || b.Retries() != 1 {
				t.Fatalf("%d bodies damaged, %d retries; want 1 and 1", r.proxy.Hits(corrupt), b.Retries())
			}
			if got, err := b.Get(ctx, h, 0, -1); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("stored blob differs from what was written (%v)", err)
			}
		})
	}
}
