package s3

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// newTransport returns the HTTP transport of one backend: proxies from the
// environment, keep-alive connections up to the concurrency bound, TLS 1.2+
// with the system roots plus the CA file, if any.
func newTransport(c Config) (*http.Transport, error) {
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           dialer.DialContext,
		MaxIdleConns:          2 * c.Connections,
		MaxIdleConnsPerHost:   c.Connections,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   30 * time.Second,
		ExpectContinueTimeout: time.Second,
		ResponseHeaderTimeout: c.StallTimeout,
		// Objects are compressed and encrypted already; a transparently
		// gzipped response would also break Content-Length checks.
		DisableCompression: true,
		TLSClientConfig:    &tls.Config{MinVersion: tls.VersionTLS12},
	}
	if c.dial != nil {
		tr.DialContext = c.dial
	}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read S3 CA certificates: %v: %w", err, errs.ErrUsage)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("S3 CA file %s holds no PEM certificate: %w", c.CAFile, errs.ErrUsage)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	return tr, nil
}

// clock measures how far the store's clock is ahead of ours, from the Date
// header of every response, so that object timestamps (the store's clock)
// can be given on this host's clock. A Date is whole seconds, set before
// the response headers arrive here, so Date - arrival <= the true offset:
// the largest sample is the best estimate and never too large. Too small
// an estimate makes objects look younger, which is the safe side for gc.
type clock struct {
	mu     sync.Mutex
	offset time.Duration
	known  bool
}

func (c *clock) observe(date string, arrival time.Time) {
	d, err := http.ParseTime(date)
	if err != nil {
		return
	}
	off := d.Sub(arrival)
	c.mu.Lock()
	if !c.known || off > c.offset {
		c.offset, c.known = off, true
	}
	c.mu.Unlock()
}

// Offset is the store's clock minus ours (0 until a response was seen).
func (c *clock) Offset() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.offset
}

// local converts a store timestamp to this host's clock.
func (c *clock) local(t time.Time) time.Time { return t.Add(-c.Offset()) }

// clockTransport feeds the clock from every response.
type clockTransport struct {
	rt    http.RoundTripper
	clock *clock
}

func (t clockTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(req)
	if err == nil {
		t.clock.observe(resp.Header.Get("Date"), time.Now())
	}
	return resp, err
}

// errStalled is the cause of an attempt cancelled for making no progress.
var errStalled = errors.New("no progress")

// watchdog cancels one attempt when neither its upload nor its download
// made progress for the stall timeout.
type watchdog struct {
	timer   *time.Timer
	timeout time.Duration
}

func newWatchdog(ctx context.Context, timeout time.Duration) (*watchdog, context.Context, func()) {
	actx, cancel := context.WithCancelCause(ctx)
	w := &watchdog{timeout: timeout}
	w.timer = time.AfterFunc(timeout, func() { cancel(fmt.Errorf("%w for %s", errStalled, timeout)) })
	return w, actx, func() { w.timer.Stop(); cancel(context.Canceled) }
}

func (w *watchdog) poke() { w.timer.Reset(w.timeout) }

// reader returns r reporting progress to the watchdog.
func (w *watchdog) reader(r io.Reader) io.Reader { return progressReader{r, w} }

type progressReader struct {
	r io.Reader
	w *watchdog
}

func (p progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.w.poke()
	}
	return n, err
}
