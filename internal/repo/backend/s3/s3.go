// Package s3 owns the repository backend on S3-compatible object storage
// (AWS S3, MinIO, Ceph RGW, Garage, Wasabi, Backblaze B2, versitygw): one
// object per blob, under a key prefix, in the local directory's layout:
//
//	<prefix>/config
//	<prefix>/keys/<name>
//	<prefix>/chunks/<first two bytes of name>/<name>
//	<prefix>/indexes/<name>
//	<prefix>/backups/<name>
//	<prefix>/locks/<name>
//
// Every blob is written by one PUT (atomic: readers see the old object, none
// or the new one) or, above the multipart threshold, by a multipart upload
// that becomes visible only when completed and is aborted on failure. A PUT
// that returns is durable, so Sync is a no-op. Transient failures (503
// SlowDown, 500, timeouts, dropped connections) are retried with backoff;
// requests in flight are bounded. Object timestamps are the store's, given
// on this host's clock (see Info.ModTime).
//
// The store must be strongly consistent (read-after-write, list-after-write,
// read-after-delete), as AWS S3, MinIO, Ceph RGW within one zone and
// versitygw are: docs/repository-format.md says why and how it is checked.
//
// Credentials come only from the environment (AWS_ACCESS_KEY_ID,
// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or the shared AWS files
// (AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE); never from
// the URL or the command line, and they never appear in errors.
package s3

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Backend is a backend.Backend on an S3 bucket.
type Backend struct {
	cfg     Config
	core    *minio.Core
	tr      *http.Transport
	clock   *clock
	base    string        // key prefix with a trailing slash, or ""
	slots   chan struct{} // connection slots: bounds requests in flight
	retries atomic.Int64
	// listPage is how many keys one listing request asks for.
	listPage int
	// crc32c: the store verifies CRC32C checksum headers (see checksums).
	checksumOnce sync.Once
	crc32c       bool
}

var _ backend.Backend = (*Backend)(nil)

// maxBlob bounds what one Get returns (repository blobs are at most about
// 1 GiB), so a bogus Content-Length cannot make us allocate without limit.
const maxBlob = 4 << 30

// credentialChain is where credentials come from: the environment, then the
// shared AWS files. Nothing else (no instance metadata, no URL, no flags).
func credentialChain() *credentials.Credentials {
	return credentials.NewChainCredentials([]credentials.Provider{
		&credentials.EnvAWS{},
		&credentials.FileAWSCredentials{},
	})
}

func newBackend(cfg Config) (*Backend, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if cfg.Region == "" {
		cfg.Region = os.Getenv("AWS_REGION")
	}
	if cfg.Region == "" {
		cfg.Region = os.Getenv("AWS_DEFAULT_REGION")
	}
	creds := credentialChain()
	v, err := creds.GetWithContext(&credentials.CredContext{Client: http.DefaultClient})
	if err != nil || v.AccessKeyID == "" || v.SecretAccessKey == "" {
		return nil, fmt.Errorf("no S3 credentials for %s: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), or AWS_PROFILE naming a profile in ~/.aws/credentials or ~/.aws/config: %w",
			cfg.URL(), errs.ErrAuth)
	}
	tr, err := newTransport(cfg)
	if err != nil {
		return nil, err
	}
	lookup := minio.BucketLookupAuto
	switch cfg.Addressing {
	case AddressingPath:
		lookup = minio.BucketLookupPath
	case AddressingVirtualHost:
		lookup = minio.BucketLookupDNS
	}
	clk := &clock{}
	core, err := minio.NewCore(cfg.Endpoint, &minio.Options{
		Creds:        creds,
		Secure:       cfg.Secure,
		Transport:    clockTransport{tr, clk},
		Region:       cfg.Region,
		BucketLookup: lookup,
		MaxRetries:   1, // retries are ours (do), with a longer backoff
	})
	if err != nil {
		return nil, fmt.Errorf("S3 repository %s: %v: %w", cfg.URL(), err, errs.ErrUsage)
	}
	core.SetAppInfo("vmshadow", "")
	b := &Backend{cfg: cfg, core: core, tr: tr, clock: clk, slots: make(chan struct{}, cfg.Connections), listPage: 1000}
	if cfg.Prefix != "" {
		b.base = cfg.Prefix + "/"
	}
	return b, nil
}

// probe lists at most one key under the prefix: it checks the bucket, the
// credentials and the connection in one request. It returns whether the
// prefix holds any object.
func (b *Backend) probe(ctx context.Context) (bool, error) {
	used := false
	err := b.do(ctx, "open "+b.Location(), false, func(ctx context.Context, w *watchdog) error {
		for o := range b.core.ListObjectsIter(ctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: b.base, Recursive: true, MaxKeys: 1, FetchOwner: new(false)}) {
			if o.Err != nil {
				return o.Err
			}
			used = true
			break
		}
		return ctx.Err()
	})
	return used, err
}

// Open returns the backend of an existing repository.
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	b, err := newBackend(cfg)
	if err != nil {
		return nil, err
	}
	if _, err := b.probe(ctx); err != nil {
		b.Close()
		return nil, err
	}
	if _, err := b.Stat(ctx, configHandle); err != nil {
		b.Close()
		if backend.IsNotExist(err) {
			return nil, fmt.Errorf("%s is not a vmshadow repository (no config; create one with 'vmshadow repo init'): %w", b.Location(), errs.ErrNotFound)
		}
		return nil, err
	}
	return b, nil
}

// Create returns the backend for a new repository: it creates the bucket if
// it does not exist (in the configured region) and refuses a prefix that
// already holds objects.
func Create(ctx context.Context, cfg Config) (*Backend, error) {
	b, err := newBackend(cfg)
	if err != nil {
		return nil, err
	}
	used, err := b.probe(ctx)
	if errors.Is(err, errs.ErrNotFound) {
		err = b.makeBucket(ctx)
		if err == nil {
			used, err = b.probe(ctx)
		}
	}
	if err != nil {
		b.Close()
		return nil, err
	}
	if used {
		_, serr := b.Stat(ctx, configHandle)
		b.Close()
		if serr == nil {
			return nil, fmt.Errorf("%s already holds a repository (config exists): %w", b.Location(), errs.ErrUsage)
		}
		return nil, fmt.Errorf("%s is not empty: create the repository under a new or empty prefix (s3:.../bucket/prefix): %w", b.Location(), errs.ErrUsage)
	}
	if err := b.checkConsistency(ctx); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// checkConsistency writes, reads, lists, replaces and deletes a probe
// object under the prefix and refuses a store that does not show its own
// writes at once: the ordering rules and the locks need read-after-write,
// list-after-write and read-after-delete consistency. One probe cannot
// prove a store consistent, but it catches stores (or caches in front of
// them) that are plainly not.
func (b *Backend) checkConsistency(ctx context.Context) error {
	var rnd [8]byte
	rand.Read(rnd[:])
	key := b.base + "consistency-probe-" + hex.EncodeToString(rnd[:])
	defer b.do(context.WithoutCancel(ctx), "remove consistency probe", true, func(ctx context.Context, w *watchdog) error {
		return b.core.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{})
	})
	refuse := func(what string) error {
		return fmt.Errorf("%s does not show its own writes at once (%s): vmshadow needs read-after-write, list-after-write and read-after-delete consistency (see docs/repository-format.md): %w",
			b.Location(), what, errs.ErrUnsupported)
	}
	get := func() (string, error) {
		var got []byte
		err := b.do(ctx, "read consistency probe", false, func(ctx context.Context, w *watchdog) error {
			body, _, _, err := b.core.GetObject(ctx, b.cfg.Bucket, key, minio.GetObjectOptions{})
			if err != nil {
				return err
			}
			defer body.Close()
			got, err = io.ReadAll(io.LimitReader(w.reader(body), 1<<10))
			return err
		})
		return string(got), err
	}
	listed := func() (bool, error) {
		found := false
		err := b.do(ctx, "list consistency probe", false, func(ctx context.Context, w *watchdog) error {
			found = false
			for o := range b.core.ListObjectsIter(ctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: key, Recursive: true, MaxKeys: 10, FetchOwner: new(false)}) {
				if o.Err != nil {
					return o.Err
				}
				found = found || o.Key == key
			}
			return ctx.Err()
		})
		return found, err
	}
	for _, v := range []string{"first", "second version"} {
		if err := b.putObject(ctx, "write consistency probe", key, []byte(v)); err != nil {
			return err
		}
		got, err := get()
		if backend.IsNotExist(err) {
			return refuse("an object just written is not found")
		}
		if err != nil {
			return err
		}
		if got != v {
			return refuse("a read right after a write returns older content")
		}
		found, err := listed()
		if err != nil {
			return err
		}
		if !found {
			return refuse("a listing right after a write misses the object")
		}
	}
	if err := b.do(ctx, "delete consistency probe", true, func(ctx context.Context, w *watchdog) error {
		return b.core.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{})
	}); err != nil {
		return err
	}
	if _, err := get(); !backend.IsNotExist(err) {
		if err != nil {
			return err
		}
		return refuse("an object just deleted can still be read")
	}
	found, err := listed()
	if err != nil {
		return err
	}
	if found {
		return refuse("a listing right after a delete still shows the object")
	}
	return nil
}

func (b *Backend) makeBucket(ctx context.Context) error {
	taken := false
	err := b.do(ctx, "create bucket "+b.cfg.Bucket, true, func(ctx context.Context, w *watchdog) error {
		err := b.core.MakeBucket(ctx, b.cfg.Bucket, minio.MakeBucketOptions{Region: b.cfg.Region})
		switch minio.ToErrorResponse(err).Code {
		case "BucketAlreadyOwnedByYou":
			return nil // another host was quicker
		case "BucketAlreadyExists":
			taken = true
			return nil
		}
		return err
	})
	switch {
	case taken:
		return fmt.Errorf("bucket %q belongs to another account: choose another bucket name: %w", b.cfg.Bucket, errs.ErrUsage)
	case errors.Is(err, errs.ErrAuth):
		return fmt.Errorf("bucket %q does not exist at %s and these credentials may not create it: create it (aws s3 mb, mc mb, or the store's console) and try again: %w",
			b.cfg.Bucket, b.cfg.Endpoint, errs.ErrAuth)
	}
	return err
}

var configHandle = backend.Handle{Kind: backend.KindConfig, Name: "config"}

// Location implements backend.Backend: s3:http(s)://endpoint/bucket/prefix.
func (b *Backend) Location() string { return b.cfg.URL() }

// Retries is how many attempts were repeated because of transient failures.
func (b *Backend) Retries() int64 { return b.retries.Load() }

// ClockOffset is how far the store's clock is ahead of this host's, as
// measured from response Date headers (to about a second).
func (b *Backend) ClockOffset() time.Duration { return b.clock.Offset() }

// Close implements backend.Backend.
func (b *Backend) Close() error {
	b.tr.CloseIdleConnections()
	return nil
}

func (b *Backend) key(h backend.Handle) (string, error) {
	p, err := h.Path()
	if err != nil {
		return "", err
	}
	return b.base + p, nil
}

// Put implements backend.Backend. The store checks the body against a
// CRC32C header or the signed SHA-256 (see checksums), so it refuses a body
// damaged on the way and the retry stores it intact.
func (b *Backend) Put(ctx context.Context, h backend.Handle, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	key, err := b.key(h)
	if err != nil {
		return err
	}
	if int64(len(data)) > b.cfg.MultipartThreshold {
		return b.putMultipart(ctx, h, key, data)
	}
	return b.putObject(ctx, "write "+h.String(), key, data)
}

// putObject stores data under key with one PUT.
func (b *Backend) putObject(ctx context.Context, what, key string, data []byte) error {
	opts := minio.PutObjectOptions{ContentType: "application/octet-stream", DisableContentSha256: true}
	sha := ""
	if b.checksums(ctx) {
		opts.UserMetadata = map[string]string{crc32cHeader: crc32c(data)}
	} else {
		sum := sha256.Sum256(data)
		sha = hex.EncodeToString(sum[:])
	}
	return b.do(ctx, what, true, func(ctx context.Context, w *watchdog) error {
		_, err := b.core.PutObject(ctx, b.cfg.Bucket, key, w.reader(bytes.NewReader(data)), int64(len(data)), "", sha, opts)
		return err
	})
}

const crc32cHeader = "x-amz-checksum-crc32c"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc32c(data []byte) string {
	return base64.StdEncoding.EncodeToString(binary.BigEndian.AppendUint32(nil, crc32.Checksum(data, castagnoli)))
}

// checksums reports whether the store verifies an x-amz-checksum-crc32c
// header (AWS S3, MinIO and versitygw do; older stores ignore it).
// Every Put makes the store check what it received: with a CRC32C header
// where the store verifies it (a hardware CRC on both sides), else with the
// payload's SHA-256 in the request signature, which every store verifies
// but which costs a SHA-256 pass on each side. The first Put of the process
// finds out with a probe: an object whose header is deliberately wrong must
// be refused (BadDigest). Any other outcome means signed payloads.
func (b *Backend) checksums(ctx context.Context) bool {
	b.checksumOnce.Do(func() {
		var rnd [8]byte
		rand.Read(rnd[:])
		key := b.base + "checksum-probe-" + hex.EncodeToString(rnd[:])
		body := "vmshadow checksum probe"
		wrong := crc32c([]byte(body + "!"))
		refused, stored := false, false
		b.do(ctx, "probe checksum support", true, func(ctx context.Context, w *watchdog) error {
			_, err := b.core.PutObject(ctx, b.cfg.Bucket, key, strings.NewReader(body), int64(len(body)), "", "",
				minio.PutObjectOptions{DisableContentSha256: true, UserMetadata: map[string]string{crc32cHeader: wrong}})
			if er := minio.ToErrorResponse(err); er.Code == "BadDigest" || er.Code == "XAmzContentChecksumMismatch" {
				refused = true
				return nil
			}
			stored = err == nil
			return err
		})
		if stored {
			b.do(context.WithoutCancel(ctx), "remove checksum probe", true, func(ctx context.Context, w *watchdog) error {
				return b.core.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{})
			})
		}
		b.crc32c = refused
	})
	return b.crc32c
}

// putMultipart uploads data in parts, in parallel within the connection
// bound, and completes the upload; on any failure the upload is aborted so
// no parts are left behind (gc's CleanTemp removes those of a killed
// process). Nothing is visible before the completion.
func (b *Backend) putMultipart(ctx context.Context, h backend.Handle, key string, data []byte) (err error) {
	what := "write " + h.String()
	opts := minio.PutObjectOptions{ContentType: "application/octet-stream"}
	var id string
	err = b.do(ctx, what+" (start multipart upload)", true, func(ctx context.Context, w *watchdog) error {
		var err error
		id, err = b.core.NewMultipartUpload(ctx, b.cfg.Bucket, key, opts)
		return err
	})
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			b.do(actx, what+" (abort multipart upload)", true, func(ctx context.Context, w *watchdog) error {
				err := b.core.AbortMultipartUpload(ctx, b.cfg.Bucket, key, id)
				if minio.ToErrorResponse(err).Code == "NoSuchUpload" {
					return nil
				}
				return err
			})
		}
	}()
	n := (int64(len(data)) + b.cfg.PartSize - 1) / b.cfg.PartSize
	parts := make([]minio.CompletePart, n)
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var once sync.Once
	var perr error
	for i := range n {
		part := data[i*b.cfg.PartSize : min((i+1)*b.cfg.PartSize, int64(len(data)))]
		sum := sha256.Sum256(part)
		wg.Go(func() {
			err := b.do(pctx, fmt.Sprintf("%s (part %d of %d)", what, i+1, n), true, func(ctx context.Context, w *watchdog) error {
				p, err := b.core.PutObjectPart(ctx, b.cfg.Bucket, key, id, int(i+1), w.reader(bytes.NewReader(part)), int64(len(part)),
					minio.PutObjectPartOptions{Sha256Hex: hex.EncodeToString(sum[:]), DisableContentSha256: true})
				parts[i] = minio.CompletePart{PartNumber: int(i + 1), ETag: p.ETag}
				return err
			})
			if err != nil {
				once.Do(func() { perr = err; cancel() })
			}
		})
	}
	wg.Wait()
	if perr != nil {
		return perr
	}
	tries := 0
	return b.do(ctx, what+" (complete multipart upload)", true, func(ctx context.Context, w *watchdog) error {
		tries++
		_, err := b.core.CompleteMultipartUpload(ctx, b.cfg.Bucket, key, id, parts, opts)
		if err != nil && tries > 1 && minio.ToErrorResponse(err).Code == "NoSuchUpload" {
			// An earlier attempt completed it and its answer was lost:
			// the object is there if it has the full size.
			if oi, serr := b.core.StatObject(ctx, b.cfg.Bucket, key, minio.StatObjectOptions{}); serr == nil && oi.Size == int64(len(data)) {
				return nil
			}
		}
		return err
	})
}

// Sync implements backend.Backend: a PUT that returned is durable and
// visible, so there is nothing to do.
func (b *Backend) Sync(ctx context.Context) error { return ctx.Err() }

// Get implements backend.Backend with one GET (ranged unless the whole
// blob is asked for), read in full within the attempt: a connection that
// drops mid-body is retried from the start, so the result is always one
// version of the blob.
func (b *Backend) Get(ctx context.Context, h backend.Handle, off, length int64) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	key, err := b.key(h)
	if err != nil {
		return nil, err
	}
	if off < 0 {
		return nil, fmt.Errorf("read %s: negative offset %d: %w", h, off, io.ErrUnexpectedEOF)
	}
	pastEnd := func(size int64) error {
		return fmt.Errorf("read %s: range %d+%d past end of blob of %d bytes: %w", h, off, length, size, io.ErrUnexpectedEOF)
	}
	if length == 0 {
		fi, err := b.Stat(ctx, h)
		if err != nil {
			return nil, err
		}
		if off > fi.Size {
			return nil, pastEnd(fi.Size)
		}
		return []byte{}, nil
	}
	var out []byte
	var final error       // a range error: not retried
	invalidRange := false // 416: the offset is at or past the end
	err = b.do(ctx, "read "+h.String(), false, func(ctx context.Context, w *watchdog) error {
		var opts minio.GetObjectOptions
		switch {
		case length > 0:
			opts.SetRange(off, off+length-1)
		case off > 0:
			opts.SetRange(off, 0)
		}
		body, oi, hdr, err := b.core.GetObject(ctx, b.cfg.Bucket, key, opts)
		if er := minio.ToErrorResponse(err); er.Code == "InvalidRange" || er.StatusCode == http.StatusRequestedRangeNotSatisfiable {
			invalidRange = true
			return nil
		}
		if err != nil {
			return err
		}
		defer body.Close()
		n := oi.Size
		if n < 0 || n > maxBlob {
			return fmt.Errorf("response of %d bytes: %w", n, errs.ErrCorrupt)
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(w.reader(body), buf); err != nil {
			return fmt.Errorf("%w after %d bytes of %d: %v", errShortBody, len(buf), n, err)
		}
		ranged := hdr.Get("Content-Range") != ""
		total := n
		if ranged {
			total = parseTotal(hdr.Get("Content-Range"))
		}
		if !ranged && opts.Header().Get("Range") != "" {
			// The store ignored the range and sent the whole blob.
			if off > total || length > 0 && off+length > total {
				final = pastEnd(total)
				return nil
			}
			buf = buf[off:]
			if length > 0 {
				buf = buf[:length]
			}
		} else if length > 0 && int64(len(buf)) != length {
			final = pastEnd(total)
			return nil
		}
		out = buf
		return nil
	})
	switch {
	case err != nil:
		return nil, err
	case final != nil:
		return nil, final
	case invalidRange:
		// At the end, with length < 0, the answer is empty.
		fi, err := b.Stat(ctx, h)
		if err != nil {
			return nil, err
		}
		if length < 0 && off == fi.Size {
			return []byte{}, nil
		}
		return nil, pastEnd(fi.Size)
	}
	return out, nil
}

// parseTotal returns the total size from "bytes a-b/total", or -1.
func parseTotal(cr string) int64 {
	_, total, ok := strings.Cut(cr, "/")
	if !ok {
		return -1
	}
	n, err := strconv.ParseInt(total, 10, 64)
	if err != nil {
		return -1
	}
	return n
}

// Stat implements backend.Backend. ModTime is the object's Last-Modified,
// converted to this host's clock.
func (b *Backend) Stat(ctx context.Context, h backend.Handle) (backend.Info, error) {
	key, err := b.key(h)
	if err != nil {
		return backend.Info{}, err
	}
	var oi minio.ObjectInfo
	err = b.do(ctx, "stat "+h.String(), false, func(ctx context.Context, w *watchdog) error {
		var err error
		oi, err = b.core.StatObject(ctx, b.cfg.Bucket, key, minio.StatObjectOptions{})
		return err
	})
	if err != nil {
		return backend.Info{}, err
	}
	return backend.Info{Name: h.Name, Size: oi.Size, ModTime: b.clock.local(oi.LastModified)}, nil
}

// Delete implements backend.Backend. S3 answers a DELETE of a missing key
// with success, so deleting a missing blob returns nil (the contract allows
// it).
func (b *Backend) Delete(ctx context.Context, h backend.Handle) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	key, err := b.key(h)
	if err != nil {
		return err
	}
	return b.do(ctx, "delete "+h.String(), true, func(ctx context.Context, w *watchdog) error {
		return b.core.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{})
	})
}

// List implements backend.Backend: ListObjectsV2 pages of up to 1000 keys,
// each page fetched (and retried) when the previous one is consumed.
func (b *Backend) List(ctx context.Context, kind backend.Kind, prefix string, fn func(backend.Info) error) error {
	if err := (backend.Handle{Kind: kind, Name: "x"}).Valid(); err != nil {
		return err
	}
	if prefix != "" && (backend.Handle{Kind: kind, Name: prefix}).Valid() != nil {
		return nil // no name can start with it
	}
	var listings []string
	switch kind {
	case backend.KindConfig:
		if !strings.HasPrefix("config", prefix) {
			return nil
		}
		listings = []string{b.base + "config"}
	case backend.KindChunks:
		if len(prefix) >= 2 {
			listings = []string{b.base + "chunks/" + prefix[:2] + "/" + prefix}
		} else {
			listings = []string{b.base + "chunks/" + prefix}
			if prefix != "" && prefix != "_" {
				listings = append(listings, b.base+"chunks/__/"+prefix) // names shorter than 2 bytes
			}
		}
	default:
		listings = []string{b.base + string(kind) + "/" + prefix}
	}
	for _, lp := range listings {
		if err := b.list(ctx, kind, lp, prefix, fn); err != nil {
			return err
		}
	}
	return nil
}

func (b *Backend) list(ctx context.Context, kind backend.Kind, keyPrefix, prefix string, fn func(backend.Info) error) error {
	after := ""
	page := make([]minio.ObjectInfo, 0, b.listPage)
	for {
		// One attempt fetches up to listPage keys after the last one seen
		// (usually one request), holding a connection slot; fn runs after
		// the slot is released, so it may call the backend.
		err := b.do(ctx, "list "+string(kind), false, func(ctx context.Context, w *watchdog) error {
			page = page[:0]
			opts := minio.ListObjectsOptions{Prefix: keyPrefix, Recursive: true, MaxKeys: b.listPage, StartAfter: after, FetchOwner: new(false)}
			for o := range b.core.ListObjectsIter(ctx, b.cfg.Bucket, opts) {
				if o.Err != nil {
					return o.Err
				}
				w.poke()
				page = append(page, o)
				if len(page) == b.listPage {
					break
				}
			}
			return ctx.Err() // the iterator ends silently when cancelled
		})
		if err != nil {
			return err
		}
		for _, o := range page {
			name, ok := b.nameOf(kind, o.Key)
			if !ok || !strings.HasPrefix(name, prefix) {
				continue // not a blob (a stray object, a directory marker)
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := fn(backend.Info{Name: name, Size: o.Size, ModTime: b.clock.local(o.LastModified)}); err != nil {
				return err
			}
		}
		if len(page) < b.listPage {
			return nil
		}
		after = page[len(page)-1].Key
	}
}

// nameOf returns the blob name of key if key is exactly where a blob of
// kind with that name is stored.
func (b *Backend) nameOf(kind backend.Kind, key string) (string, bool) {
	rest, ok := strings.CutPrefix(key, b.base)
	if !ok {
		return "", false
	}
	if kind == backend.KindConfig {
		return "config", rest == "config"
	}
	rest, ok = strings.CutPrefix(rest, string(kind)+"/")
	if !ok {
		return "", false
	}
	name := rest
	if kind == backend.KindChunks {
		fan, n, ok := strings.Cut(rest, "/")
		if !ok || fan != backend.Fanout(n) {
			return "", false
		}
		name = n
	}
	if (backend.Handle{Kind: kind, Name: name}).Valid() != nil {
		return "", false
	}
	return name, true
}

// CleanTemp aborts multipart uploads under the repository prefix that were
// started more than age ago and never completed (a process killed while
// uploading a large blob): their parts are invisible but take space. It
// returns how many it aborted. gc calls it under the exclusive lock.
func (b *Backend) CleanTemp(ctx context.Context, age time.Duration) (int, error) {
	cutoff := time.Now().Add(-age)
	n := 0
	keyMarker, idMarker := "", ""
	for {
		var res minio.ListMultipartUploadsResult
		err := b.do(ctx, "list incomplete uploads", false, func(ctx context.Context, w *watchdog) error {
			var err error
			res, err = b.core.ListMultipartUploads(ctx, b.cfg.Bucket, b.base, keyMarker, idMarker, "", 1000)
			return err
		})
		if err != nil {
			return n, err
		}
		for _, u := range res.Uploads {
			if !b.clock.local(u.Initiated).Before(cutoff) {
				continue
			}
			err := b.do(ctx, "abort incomplete upload of "+u.Key, true, func(ctx context.Context, w *watchdog) error {
				err := b.core.AbortMultipartUpload(ctx, b.cfg.Bucket, u.Key, u.UploadID)
				if minio.ToErrorResponse(err).Code == "NoSuchUpload" {
					return nil
				}
				return err
			})
			if err != nil {
				return n, err
			}
			n++
		}
		if !res.IsTruncated {
			return n, nil
		}
		keyMarker, idMarker = res.NextKeyMarker, res.NextUploadIDMarker
	}
}
