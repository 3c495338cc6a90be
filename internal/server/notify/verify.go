package notify

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Headers of a delivery.
const (
	HeaderEvent     = "X-Vmshadow-Event"     // failure, success, interrupted, cancelled, skipped
	HeaderDelivery  = "X-Vmshadow-Delivery"  // a UUID, the same in every attempt of one delivery
	HeaderAttempt   = "X-Vmshadow-Attempt"   // 1, 2, ...
	HeaderTimestamp = "X-Vmshadow-Timestamp" // Unix seconds when the attempt was sent
	HeaderSignature = "X-Vmshadow-Signature" // sha256=HEX, with a secret only
)

// DefaultMaxAge is the replay window that receivers should use: a
// delivery whose timestamp is further than this from their clock is
// refused.
const DefaultMaxAge = 5 * time.Minute

// Errors of Verify.
var (
	ErrNoSignature  = errors.New("the request is not signed (no " + HeaderSignature + " header)")
	ErrBadSignature = errors.New("the signature does not match: another secret, or an altered body or timestamp")
	ErrBadHeader    = errors.New("malformed signature or timestamp header")
	ErrStale        = errors.New("the timestamp is outside the replay window: a replayed request, or a clock off")
)

// Sign returns the signature header's value for a body sent at timestamp
// (decimal Unix seconds, the timestamp header's value): "sha256=" and the
// lowercase hex HMAC-SHA256, keyed with secret, of timestamp + "." + body.
func Sign(secret []byte, timestamp string, body []byte) string {
	m := hmac.New(sha256.New, secret)
	io.WriteString(m, timestamp)
	m.Write([]byte{'.'})
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}

// Verify checks a delivery as its receiver should: signature and
// timestamp are the values of the X-Vmshadow-Signature and
// X-Vmshadow-Timestamp headers, body the exact bytes received. It refuses
// a signature that does not match (compared in constant time) and a
// timestamp further than maxAge from now, in either direction. Within
// that window a receiver rejects replays by remembering the
// X-Vmshadow-Delivery IDs it has accepted (every retry of a delivery
// carries the same ID).
func Verify(secret []byte, signature, timestamp string, body []byte, now time.Time, maxAge time.Duration) error {
	if signature == "" {
		return ErrNoSignature
	}
	mac, err := parseSignature(signature)
	if err != nil {
		return err
	}
	ts, err := parseTimestamp(timestamp)
	if err != nil {
		return err
	}
	want, _ := parseSignature(Sign(secret, timestamp, body))
	if !hmac.Equal(mac, want) {
		return ErrBadSignature
	}
	age := now.Unix() - ts
	if age < 0 {
		age = -age
	}
	if age > int64(maxAge/time.Second) || ts > maxUnix {
		return fmt.Errorf("%w (sent %s, now %s, window %s)", ErrStale, time.Unix(ts, 0).UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), maxAge)
	}
	return nil
}

// maxUnix keeps the age computation far from overflowing.
const maxUnix = 1 << 40

// parseSignature reads "sha256=HEX" (64 hex digits, either case;
// surrounding spaces ignored).
func parseSignature(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	algo, h, ok := strings.Cut(s, "=")
	if !ok || !strings.EqualFold(algo, "sha256") {
		return nil, fmt.Errorf("%w: %s: want sha256=HEX", ErrBadHeader, HeaderSignature)
	}
	if len(h) != 2*sha256.Size {
		return nil, fmt.Errorf("%w: %s: want %d hex digits, got %d characters", ErrBadHeader, HeaderSignature, 2*sha256.Size, len(h))
	}
	mac, err := hex.DecodeString(h)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: not hexadecimal", ErrBadHeader, HeaderSignature)
	}
	return mac, nil
}

// parseTimestamp reads decimal Unix seconds: digits only, no sign.
func parseTimestamp(s string) (int64, error) {
	if s == "" || len(s) > 12 || strings.Trim(s, "0123456789") != "" {
		return 0, fmt.Errorf("%w: %s: want the Unix time in seconds", ErrBadHeader, HeaderTimestamp)
	}
	ts, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %s: want the Unix time in seconds", ErrBadHeader, HeaderTimestamp)
	}
	return ts, nil
}

// maxBody bounds the body VerifyRequest reads.
const maxBody = 16 << 20

// VerifyRequest reads a delivery's body (at most 16 MiB) and verifies it
// with Verify against the current time: the receiver's side in Go.
func VerifyRequest(r *http.Request, secret []byte, maxAge time.Duration) ([]byte, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return nil, fmt.Errorf("read the delivery: %w", err)
	}
	if len(body) > maxBody {
		return nil, fmt.Errorf("the delivery is larger than %d bytes", maxBody)
	}
	if err := Verify(secret, r.Header.Get(HeaderSignature), r.Header.Get(HeaderTimestamp), body, time.Now(), maxAge); err != nil {
		return nil, err
	}
	return body, nil
}
