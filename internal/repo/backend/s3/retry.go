package s3

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// op is one attempt of a request. The context is the attempt's: it is
// cancelled when the attempt stalls. Readers of request or response bodies
// go through w.reader so progress keeps the attempt alive.
type op func(ctx context.Context, w *watchdog) error

// do runs fn, retrying transient failures with exponential backoff and
// full jitter, holding one of the backend's connection slots during each
// attempt (never while waiting). what names the operation for errors
// ("write chunks/ab12..."); write says whether it modifies the store (for
// telling read-only credentials from wrong ones).
func (b *Backend) do(ctx context.Context, what string, write bool, fn op) error {
	start := time.Now()
	var err error
	attempts := 0
	for {
		if cerr := ctx.Err(); cerr != nil {
			return fmt.Errorf("%s: %w", what, cerr)
		}
		select {
		case b.slots <- struct{}{}:
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", what, ctx.Err())
		}
		w, actx, stop := newWatchdog(ctx, b.cfg.StallTimeout)
		err = fn(actx, w)
		cause := context.Cause(actx)
		stop()
		<-b.slots
		attempts++
		if err == nil {
			return nil
		}
		if cerr := ctx.Err(); cerr != nil {
			return fmt.Errorf("%s: %w", what, cerr)
		}
		if errors.Is(cause, errStalled) {
			err = fmt.Errorf("request abandoned: %w", cause)
		}
		if !transient(err) || attempts >= b.cfg.Retry.Attempts {
			break
		}
		b.retries.Add(1)
		t := time.NewTimer(b.backoff(attempts - 1))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%s: %w (while retrying after: %v)", what, ctx.Err(), b.describe(err))
		}
	}
	return b.classify(what, write, err, attempts, time.Since(start))
}

func (b *Backend) backoff(n int) time.Duration {
	d := b.cfg.Retry.Base << min(n, 30)
	if d <= 0 || d > b.cfg.Retry.Max {
		d = b.cfg.Retry.Max
	}
	return time.Duration(rand.Int64N(int64(d)) + 1)
}

// Error codes S3-compatible stores use for overload, throttling and
// internal trouble: always worth another attempt.
var transientCodes = map[string]bool{
	"SlowDown": true, "SlowDownRead": true, "SlowDownWrite": true, "Throttling": true,
	"ThrottlingException": true, "RequestLimitExceeded": true, "RequestThrottled": true,
	"TooManyRequests": true, "ServiceUnavailable": true, "InternalError": true,
	"RequestTimeout": true, "RequestTimeTooSkewed": false, "OperationAborted": true,
	"XMinioServerNotInitialized": true, "XAmzContentSHA256Mismatch": true,
	"BadDigest": true, "IncompleteBody": true, "XAmzContentChecksumMismatch": true,
	// versitygw's POSIX backend answers this when a concurrent DELETE
	// removed the (empty) parent directory of the key between its checks
	// and its link: our keys are never directories, so it is a race.
	"ExistingObjectIsDirectory": true,
}

// transient reports whether another attempt may succeed.
func transient(err error) bool {
	var er minio.ErrorResponse
	if errors.As(err, &er) && (er.Code != "" || er.StatusCode != 0) {
		if ok, known := transientCodes[er.Code]; known {
			return ok
		}
		switch er.StatusCode {
		case http.StatusRequestTimeout, http.StatusTooManyRequests, 499, http.StatusInternalServerError,
			http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return true
		}
		return false
	}
	if errors.Is(err, errStalled) {
		return true
	}
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	var rh tls.RecordHeaderError
	if errors.As(err, &ua) || errors.As(err, &hn) || errors.As(err, &ci) || errors.As(err, &rh) {
		return false
	}
	if strings.Contains(err.Error(), "server gave HTTP response to HTTPS client") {
		return false
	}
	var ne net.Error
	var ue *url.Error
	return errors.As(err, &ne) || errors.As(err, &ue) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, errShortBody)
}

// errShortBody is a response body that ended before its Content-Length.
var errShortBody = errors.New("response body ended early")

// describe renders an error without credentials (minio-go's errors carry
// none; URLs hold bucket and key only).
func (b *Backend) describe(err error) string {
	var er minio.ErrorResponse
	if errors.As(err, &er) && (er.Code != "" || er.StatusCode != 0) {
		msg := er.Code
		if er.StatusCode != 0 {
			msg += fmt.Sprintf(" (HTTP %d)", er.StatusCode)
		}
		if er.Message != "" {
			msg += ": " + er.Message
		}
		return msg
	}
	return err.Error()
}

// classify maps a final error to the backend contract and vmshadow's error
// classes, with a message that says what to do.
func (b *Backend) classify(what string, write bool, err error, attempts int, took time.Duration) error {
	var er minio.ErrorResponse
	isResp := errors.As(err, &er) && (er.Code != "" || er.StatusCode != 0)
	where := fmt.Sprintf("bucket %q at %s", b.cfg.Bucket, b.cfg.Endpoint)
	switch {
	case isResp && (er.Code == "NoSuchKey" || er.StatusCode == http.StatusNotFound && er.Code == ""):
		return fmt.Errorf("%s: %w", what, backend.ErrNotExist)
	case isResp && er.Code == "NoSuchBucket":
		return fmt.Errorf("%s: %s does not exist: create it, or create the repository with 'vmshadow repo init' (which creates the bucket): %w",
			what, where, errs.ErrNotFound)
	case isResp && (er.Code == "InvalidAccessKeyId" || er.Code == "XAdminUserNotFound" || er.Code == "InvalidClientTokenId"):
		return fmt.Errorf("%s: %s does not know the access key ID (check AWS_ACCESS_KEY_ID or the profile's aws_access_key_id): %w", what, b.cfg.Endpoint, errs.ErrAuth)
	case isResp && er.Code == "SignatureDoesNotMatch":
		return fmt.Errorf("%s: %s rejected the request signature: the secret key does not match the access key ID (check AWS_SECRET_ACCESS_KEY or the profile's aws_secret_access_key): %w", what, b.cfg.Endpoint, errs.ErrAuth)
	case isResp && (er.Code == "ExpiredToken" || er.Code == "InvalidToken" || er.Code == "TokenRefreshRequired"):
		return fmt.Errorf("%s: the session token was refused (%s): renew the temporary credentials (AWS_SESSION_TOKEN or the profile): %w", what, er.Code, errs.ErrAuth)
	case isResp && er.Code == "RequestTimeTooSkewed":
		return fmt.Errorf("%s: this host's clock is too far from %s's (%s ahead of ours): fix the time (NTP): %w",
			what, b.cfg.Endpoint, b.clock.Offset().Round(time.Second), errs.ErrAuth)
	case isResp && (er.StatusCode == http.StatusInsufficientStorage || er.Code == "QuotaExceeded" || er.Code == "XMinioStorageFull" || er.Code == "StorageFull"):
		return fmt.Errorf("%s: %s is full or over quota (%s): %w", what, where, b.describe(err), errs.ErrNoSpace)
	case isResp && (er.Code == "AccessDenied" || er.Code == "AllAccessDisabled" || er.StatusCode == http.StatusForbidden || er.StatusCode == http.StatusUnauthorized):
		if write {
			// The credentials could read the bucket when it was opened:
			// they are read-only here. Shared operations carry on without
			// a lock; writes fail as authentication errors.
			return fmt.Errorf("%s: access denied to %s: the credentials may only read it: %w (%w)", what, where, backend.ErrReadOnly, errs.ErrAuth)
		}
		return fmt.Errorf("%s: access denied to %s: check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy (vmshadow needs s3:ListBucket, GetObject, PutObject and DeleteObject on it): %w",
			what, where, errs.ErrAuth)
	}
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	switch {
	case errors.As(err, &ua):
		return fmt.Errorf("%s: the TLS certificate of %s is signed by an unknown authority: give its CA certificate with --s3-ca FILE or VMSHADOW_S3_CA: %w", what, b.cfg.Endpoint, errs.ErrConnect)
	case errors.As(err, &hn), errors.As(err, &ci):
		return fmt.Errorf("%s: the TLS certificate of %s is not valid for it (%v): %w", what, b.cfg.Endpoint, err, errs.ErrConnect)
	case strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"), errors.As(err, new(tls.RecordHeaderError)):
		return fmt.Errorf("%s: %s speaks plain HTTP: use an s3:http:// URL: %w", what, b.cfg.Endpoint, errs.ErrConnect)
	}
	if transient(err) {
		hint := "is it running and reachable?"
		if isResp {
			hint = "the store is overloaded or throttling; try again later or lower --s3-connections"
		}
		return fmt.Errorf("%s: %s failed %d times in %s, last: %s (%s): %w",
			what, b.cfg.Endpoint, attempts, took.Round(time.Millisecond), b.describe(err), hint, errs.ErrConnect)
	}
	return fmt.Errorf("%s: %w", what, described{err, b.describe(err)})
}

// described is an error with a better text, still wrapping the original.
type described struct {
	error
	text string
}

func (d described) Error() string { return d.text }
func (d described) Unwrap() error { return d.error }
