// Package notify owns the vmshadow server's webhooks: when a job's run
// ends, each webhook of the job (config.Webhook, the notify key of the
// configuration) whose on list holds the run's event is sent an HTTP POST
// of the run as JSON ([Event]). The reference, with a payload example and
// receivers' verification in shell and Python, is docs/notifications.md.
//
// A delivery is a POST with Content-Type application/json, User-Agent
// vmshadow/VERSION and the headers X-Vmshadow-Event (the event),
// X-Vmshadow-Delivery (a UUID, the same in every attempt),
// X-Vmshadow-Attempt, X-Vmshadow-Timestamp (Unix seconds of the attempt)
// and, for a webhook with a secret, X-Vmshadow-Signature: sha256=HEX, the
// HMAC-SHA256 keyed with the secret of TIMESTAMP + "." + BODY. A receiver
// checks it with [Verify] (or the few lines of the reference), refuses a
// timestamp more than 5 minutes from its clock, and remembers the
// delivery IDs it accepted within that window to refuse replays.
//
// A 2xx answer delivers. A network error, a timeout, 408, 429 and 5xx
// are retried with exponential backoff (by default 5 attempts, waiting
// 40s, 80s, 160s and 320s, each ±10%: about 10 minutes), waiting at
// least as long as a Retry-After header asks (up to the longest delay);
// any other answer (other 4xx, a redirect) is not retried.
//
// [Notifier.Send] never blocks the job that calls it: each delivery runs
// in its own goroutine, and each receiver URL has a bounded queue of
// deliveries not yet done; when it is full the oldest one is dropped
// (cancelled) with a warning, since the newest news matter most and the
// oldest has been failing longest. [Notifier.Close] stops taking events,
// makes every delivery waiting for a retry try once more at once, and
// gives up on the rest at its context's deadline.
//
// Secrets (secret_file, secret_env) are read by [FromConfig], when the
// server starts and when it reloads its configuration; they never appear
// in logs or errors, and neither does a URL's path (some receivers take a
// token there): logs name a webhook as https://HOST/….
package notify

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/config"
)

// Defaults of Options.
const (
	DefaultAttempts      = 5
	DefaultFirstRetry    = 40 * time.Second
	DefaultMaxRetryDelay = 10 * time.Minute
	DefaultQueueSize     = 100
)

// Log levels of Entry, as in the run logs of package state.
const (
	Info    = "info"
	Warning = "warning"
	Error   = "error"
)

// Entry is a line about a delivery, for the server's log and the run's
// log: an attempt that failed (Warning), a delivery given up or dropped
// (Error, Warning), a delivery done (Info). It never holds a secret or a
// URL's path or query.
type Entry struct {
	Time     time.Time
	Level    string
	Job      string
	RunID    int64
	Event    string
	Webhook  string // https://HOST[:PORT]/…
	Delivery string
	Message  string
}

func (e Entry) String() string {
	d := ""
	if e.Delivery != "" {
		d = ", delivery " + e.Delivery
	}
	return fmt.Sprintf("webhook %s (job %s, run %d, %s%s): %s", e.Webhook, e.Job, e.RunID, e.Event, d, e.Message)
}

// Options configure a Notifier. Zero values take the defaults.
type Options struct {
	Version string      // in the User-Agent: vmshadow/VERSION (default "dev")
	Host    string      // the payload's host (default os.Hostname)
	Log     func(Entry) // called from the delivery goroutines; nil: no log

	Attempts      int           // attempts of a delivery (default 5)
	FirstRetry    time.Duration // wait before the 2nd attempt, doubling after (default 40s)
	MaxRetryDelay time.Duration // longest wait, also for Retry-After (default 10m)
	QueueSize     int           // deliveries not yet done per receiver URL (default 100)
}

// Webhook is a configured webhook with its secret read and its HTTP
// client made.
type Webhook struct {
	url     string
	name    string // redacted
	on      []string
	timeout time.Duration
	secret  []byte
	client  *http.Client
}

// Wants reports whether the webhook is sent event.
func (w *Webhook) Wants(event string) bool {
	for _, e := range w.on {
		if e == event {
			return true
		}
	}
	return false
}

// String is the webhook as logs show it.
func (w *Webhook) String() string { return w.name }

// FromConfig returns the webhooks of job, reading their secrets and CA
// files now. An error names the job, the webhook and the file or
// variable, never a secret.
func FromConfig(job *config.Job) ([]*Webhook, error) {
	out := make([]*Webhook, 0, len(job.Notify))
	for i := range job.Notify {
		c := &job.Notify[i]
		w, err := newWebhook(c)
		if err != nil {
			return nil, fmt.Errorf("job %s: webhook %s (line %d): %w", job.Name, c.Redacted(), c.Line, err)
		}
		out = append(out, w)
	}
	return out, nil
}

func newWebhook(c *config.Webhook) (*Webhook, error) {
	w := &Webhook{url: c.URL, name: c.Redacted(), on: append([]string(nil), c.On...), timeout: c.Timeout}
	if w.timeout <= 0 {
		w.timeout = config.DefaultNotifyTimeout
	}
	if len(w.on) == 0 {
		w.on = append([]string(nil), config.DefaultOn...)
	}
	if u, err := url.Parse(c.URL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("not an http(s) URL: %w", errs.ErrUsage)
	}
	if c.Secret != (config.Secret{}) {
		s, err := readSecret(c.Secret)
		if err != nil {
			return nil, err
		}
		w.secret = s
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 4
	tr.MaxResponseHeaderBytes = 64 << 10
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CA != "" {
		pem, err := os.ReadFile(c.CA)
		if err != nil {
			return nil, fmt.Errorf("ca: %w: %w", err, errs.ErrUsage)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca %s holds no PEM certificate: %w", c.CA, errs.ErrUsage)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	w.client = &http.Client{
		Transport: tr,
		// A redirect is not followed: a POST would turn into a GET, or
		// the run's details go elsewhere than configured.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return w, nil
}

// maxSecret bounds the secret file read.
const maxSecret = 64 << 10

// readSecret returns the first line of the file, or the variable's value.
func readSecret(s config.Secret) ([]byte, error) {
	if s.Env != "" {
		v, ok := os.LookupEnv(s.Env)
		switch {
		case !ok:
			return nil, fmt.Errorf("secret_env: the environment variable %s is not set: %w", s.Env, errs.ErrUsage)
		case v == "":
			return nil, fmt.Errorf("secret_env: the environment variable %s is empty: %w", s.Env, errs.ErrUsage)
		}
		return []byte(v), nil
	}
	f, err := os.Open(s.File)
	if err != nil {
		return nil, fmt.Errorf("secret_file: %w: %w", err, errs.ErrUsage)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSecret))
	if err != nil {
		return nil, fmt.Errorf("secret_file %s: %w", s.File, err)
	}
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		b = b[:i]
	}
	b = bytes.TrimSuffix(b, []byte("\r"))
	if len(b) == 0 {
		return nil, fmt.Errorf("secret_file %s: the first line is empty: write the secret there: %w", s.File, errs.ErrUsage)
	}
	return b, nil
}

// Notifier delivers events to webhooks. It is safe for concurrent use.
type Notifier struct {
	opts   Options
	ua     string
	ctx    context.Context // cancelled when Close gives up
	cancel context.CancelCauseFunc
	flush  chan struct{} // closed by Close
	wg     sync.WaitGroup

	mu     sync.Mutex
	closed bool
	hooks  map[string][]*Webhook  // by job name
	queues map[string][]*delivery // deliveries not done, oldest first, by URL
}

var (
	errDropped   = errors.New("dropped: the queue of this webhook is full (newer deliveries are waiting)")
	errAbandoned = errors.New("abandoned: the server stopped before it was delivered")
)

// New returns a Notifier with no webhooks: give them with Configure.
func New(opts Options) *Notifier {
	if opts.Version == "" {
		opts.Version = "dev"
	}
	if opts.Host == "" {
		opts.Host, _ = os.Hostname()
	}
	if opts.Attempts <= 0 {
		opts.Attempts = DefaultAttempts
	}
	if opts.FirstRetry <= 0 {
		opts.FirstRetry = DefaultFirstRetry
	}
	if opts.MaxRetryDelay <= 0 {
		opts.MaxRetryDelay = DefaultMaxRetryDelay
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = DefaultQueueSize
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Notifier{
		opts: opts, ua: "vmshadow/" + opts.Version,
		ctx: ctx, cancel: cancel, flush: make(chan struct{}),
		hooks: map[string][]*Webhook{}, queues: map[string][]*delivery{},
	}
}

// Configure reads the webhooks of jobs (FromConfig: their secrets and
// CA files) and, if all are good, makes them the webhooks of later
// events; on an error nothing changes. Call it at start and on every
// reload. Deliveries under way keep the webhook they started with.
func (n *Notifier) Configure(jobs []*config.Job) error {
	hooks := make(map[string][]*Webhook, len(jobs))
	var errList []error
	for _, j := range jobs {
		ws, err := FromConfig(j)
		if err != nil {
			errList = append(errList, err)
			continue
		}
		hooks[j.Name] = ws
	}
	if len(errList) > 0 {
		return fmt.Errorf("webhooks: %w", errors.Join(errList...))
	}
	n.SetWebhooks(hooks)
	return nil
}

// SetWebhooks makes hooks (by job name) the webhooks of later events.
func (n *Notifier) SetWebhooks(hooks map[string][]*Webhook) {
	n.mu.Lock()
	n.hooks = hooks
	n.mu.Unlock()
}

type delivery struct {
	id     string
	hook   *Webhook
	event  string
	job    string
	run    int64
	body   []byte
	ctx    context.Context
	cancel context.CancelCauseFunc
}

// Send queues ev for every webhook of ev.Job that wants its event, and
// returns at once. The event name, host, duration and text are filled
// from the rest when empty. An event of a running run, of a job without
// webhooks, or sent after Close is not delivered (the last is logged).
func (n *Notifier) Send(ev Event) {
	ev.complete(n.opts.Host)
	if ev.Event == "" {
		return
	}
	body, err := json.Marshal(ev)
	var notSent []Entry
	n.mu.Lock()
	for _, w := range n.hooks[ev.Job] {
		if !w.Wants(ev.Event) {
			continue
		}
		if n.closed || err != nil {
			msg := "not sent: the notifier is closed (the server is stopping)"
			if err != nil {
				msg = "not sent: " + err.Error()
			}
			notSent = append(notSent, Entry{Level: Error, Job: ev.Job, RunID: ev.RunID, Event: ev.Event, Webhook: w.name, Message: msg})
			continue
		}
		ctx, cancel := context.WithCancelCause(n.ctx)
		d := &delivery{id: newID(), hook: w, event: ev.Event, job: ev.Job, run: ev.RunID, body: body, ctx: ctx, cancel: cancel}
		q := n.queues[w.url]
		for len(q) >= n.opts.QueueSize {
			q[0].cancel(errDropped) // its goroutine logs it
			q = q[1:]
		}
		n.queues[w.url] = append(q, d)
		n.wg.Add(1)
		go n.deliver(d)
	}
	n.mu.Unlock()
	for _, e := range notSent {
		n.log(e)
	}
}

// Close stops taking events and waits for the deliveries under way: each
// one waiting for a retry makes its last attempt at once. At ctx's end it
// cancels the rest, logs each, and returns an error saying how many were
// not delivered.
func (n *Notifier) Close(ctx context.Context) error {
	n.mu.Lock()
	if !n.closed {
		n.closed = true
		close(n.flush)
	}
	n.mu.Unlock()
	done := make(chan struct{})
	go func() { n.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	n.mu.Lock()
	left := 0
	for _, q := range n.queues {
		left += len(q)
	}
	n.mu.Unlock()
	n.cancel(errAbandoned)
	<-done
	if left == 0 {
		return nil
	}
	return fmt.Errorf("%d webhook deliveries abandoned at the shutdown deadline: %w", left, context.Cause(ctx))
}

func (n *Notifier) log(e Entry) {
	if n.opts.Log == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	n.opts.Log(e)
}

func (n *Notifier) dlog(d *delivery, level, format string, a ...any) {
	n.log(Entry{Level: level, Job: d.job, RunID: d.run, Event: d.event, Webhook: d.hook.name, Delivery: d.id, Message: fmt.Sprintf(format, a...)})
}

func (n *Notifier) remove(d *delivery) {
	n.mu.Lock()
	defer n.mu.Unlock()
	q := n.queues[d.hook.url]
	for i, x := range q {
		if x == d {
			q = append(q[:i:i], q[i+1:]...)
			break
		}
	}
	if len(q) == 0 {
		delete(n.queues, d.hook.url)
	} else {
		n.queues[d.hook.url] = q
	}
}

func (n *Notifier) closing() bool {
	select {
	case <-n.flush:
		return true
	default:
		return false
	}
}

// deliver makes the attempts of one delivery.
func (n *Notifier) deliver(d *delivery) {
	defer n.wg.Done()
	defer n.remove(d)
	defer d.cancel(nil)
	for attempt := 1; ; attempt++ {
		res := n.attempt(d, attempt)
		if res.err == nil {
			n.dlog(d, Info, "delivered (HTTP %d, attempt %d)", res.status, attempt)
			return
		}
		if d.ctx.Err() != nil {
			level := Warning
			if context.Cause(d.ctx) == errAbandoned {
				level = Error
			}
			n.dlog(d, level, "%v; stopped during attempt %d", context.Cause(d.ctx), attempt)
			return
		}
		switch {
		case res.permanent:
			n.dlog(d, Error, "not delivered: %v (not retried)", res.err)
			return
		case attempt >= n.opts.Attempts:
			n.dlog(d, Error, "not delivered after %d attempts: %v", attempt, res.err)
			return
		case n.closing():
			n.dlog(d, Error, "not delivered: %v (attempt %d; the server is stopping)", res.err, attempt)
			return
		}
		wait := n.delay(attempt, res.retryAfter)
		n.dlog(d, Warning, "attempt %d of %d: %v; next attempt in %s", attempt, n.opts.Attempts, res.err, wait.Round(time.Millisecond))
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-n.flush:
			t.Stop()
		case <-d.ctx.Done():
			t.Stop()
			level := Warning
			if context.Cause(d.ctx) == errAbandoned {
				level = Error
			}
			n.dlog(d, level, "%v; %d attempts had failed", context.Cause(d.ctx), attempt)
			return
		}
	}
}

// delay is the wait after a failed attempt: FirstRetry doubled for each
// attempt before, ±10%, at least retryAfter, at most MaxRetryDelay.
func (n *Notifier) delay(attempt int, retryAfter time.Duration) time.Duration {
	d := n.opts.FirstRetry
	for i := 1; i < attempt && d < n.opts.MaxRetryDelay; i++ {
		d *= 2
	}
	d = min(d, n.opts.MaxRetryDelay)
	d += time.Duration((mrand.Float64()*0.2 - 0.1) * float64(d))
	d = max(d, retryAfter)
	return min(d, n.opts.MaxRetryDelay)
}

type result struct {
	status     int
	err        error // nil: delivered
	permanent  bool
	retryAfter time.Duration
}

// attempt POSTs the delivery once.
func (n *Notifier) attempt(d *delivery, attempt int) result {
	ctx, cancel := context.WithTimeout(d.ctx, d.hook.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.hook.url, bytes.NewReader(d.body))
	if err != nil {
		return result{err: errors.New("cannot make the request"), permanent: true}
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	h := req.Header
	h.Set("Content-Type", "application/json")
	h.Set("User-Agent", n.ua)
	h.Set(HeaderEvent, d.event)
	h.Set(HeaderDelivery, d.id)
	h.Set(HeaderAttempt, strconv.Itoa(attempt))
	h.Set(HeaderTimestamp, ts)
	if d.hook.secret != nil {
		h.Set(HeaderSignature, Sign(d.hook.secret, ts, d.body))
	}
	resp, err := d.hook.client.Do(req)
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded && d.ctx.Err() == nil {
			return result{err: fmt.Errorf("no answer within %s", d.hook.timeout)}
		}
		return result{err: d.hook.clean(err)}
	}
	// Read a little of the answer so that the connection can be reused.
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	r := result{status: resp.StatusCode}
	switch c := resp.StatusCode; {
	case c >= 200 && c <= 299:
		return r
	case c == http.StatusRequestTimeout || c == http.StatusTooManyRequests || c >= 500:
		r.err = fmt.Errorf("HTTP %d", c)
		r.retryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	case c >= 300 && c <= 399:
		r.err = fmt.Errorf("HTTP %d: redirects are not followed; configure the URL the receiver redirects to", c)
		r.permanent = true
	default:
		r.err = fmt.Errorf("HTTP %d", c)
		r.permanent = true
	}
	return r
}

// clean turns an error of the HTTP client into one without the URL,
// whose path or query may hold a token.
func (w *Webhook) clean(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	msg := err.Error()
	if u, perr := url.Parse(w.url); perr == nil {
		msg = strings.ReplaceAll(msg, w.url, w.name)
		if len(u.Path) > 1 {
			msg = strings.ReplaceAll(msg, u.Path, "/…")
		}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		msg += " (timeout)"
	}
	return errors.New(msg)
}

// parseRetryAfter reads a Retry-After header: seconds, or an HTTP date.
// It returns 0 when absent or unreadable.
func parseRetryAfter(s string, now time.Time) time.Duration {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0
	}
	if secs, err := strconv.ParseInt(s, 10, 64); err == nil {
		if secs < 0 {
			return 0
		}
		return time.Duration(min(secs, 365*24*3600)) * time.Second
	}
	if t, err := http.ParseTime(s); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// newID returns a random (version 4) UUID.
func newID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
