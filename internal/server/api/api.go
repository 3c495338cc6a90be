package api

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// Prefix is the path under which the API lives.
const Prefix = "/api/v1"

// MaxBodySize bounds a request body: a larger one is refused (413).
const MaxBodySize = 1 << 20

// DefaultHeartbeat is how often an idle event stream gets a comment line,
// so that proxies and clients see the connection alive.
const DefaultHeartbeat = 15 * time.Second

// Options configure the handler.
type Options struct {
	// Version is shown by /healthz.
	Version string
	// Logf, if set, gets one line per request (method, path, status,
	// duration, token name, request ID) and the error of each failure.
	// Never a token or a request body.
	Logf func(format string, args ...any)
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Heartbeat is the event streams' keep-alive interval (default
	// DefaultHeartbeat).
	Heartbeat time.Duration
	// Metrics, if set, is served at GET /metrics to any token (role
	// viewer): the Prometheus exposition.
	Metrics http.Handler
	// Sessions, if set, authenticates a request without an Authorization
	// header by its browser session (the web interface's cookie).
	Sessions Sessions
}

// Sessions finds the API token behind a browser session (package
// server/web implements it).
type Sessions interface {
	// SessionSecret returns the token secret of r's session; ok is
	// false when r carries no session cookie. The error wraps
	// errs.ErrAuth for an unknown or expired session, ErrCSRF for a
	// state-changing request without the session's CSRF token.
	SessionSecret(r *http.Request) (secret string, ok bool, err error)
}

// ErrCSRF is a state-changing request authenticated by a session cookie
// without the session's CSRF token (header X-CSRF-Token): 403.
var ErrCSRF = errors.New("missing or wrong CSRF token (header X-CSRF-Token): reload the page")

// Route is one endpoint of the API: its method, its path pattern (as in
// the OpenAPI document) and the least role that may call it ("" for none:
// anonymous).
type Route struct {
	Method string
	Path   string
	Role   string
}

// route is a Route with its handler and accepted query parameters.
type route struct {
	Route
	query []string
	h     func(*call) error
	raw   bool // the handler writes the whole response itself (no JSON body)
}

type handler struct {
	svc    Service
	opts   Options
	mux    *http.ServeMux
	routes []route
}

// New returns the API's HTTP handler: /healthz, /metrics (when
// Options.Metrics is set) and everything under /api/v1.
func New(svc Service, opts Options) http.Handler {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = DefaultHeartbeat
	}
	h := &handler{svc: svc, opts: opts, mux: http.NewServeMux()}
	h.routes = h.table()
	for i := range h.routes {
		rt := &h.routes[i]
		h.mux.Handle(rt.Method+" "+rt.Path, h.wrap(rt))
	}
	return h
}

// Routes lists every endpoint New serves (with Options.Metrics set), for
// the tests that hold the OpenAPI document to the handler.
func Routes() []Route {
	h := &handler{opts: Options{Metrics: http.NotFoundHandler()}}
	var out []Route
	for _, r := range h.table() {
		out = append(out, r.Route)
	}
	return out
}

func (h *handler) table() []route {
	v, o, a := state.Viewer, state.Operator, state.Admin
	p := Prefix
	rs := []route{
		{Route: Route{"GET", "/healthz", ""}, h: h.healthz},
		{Route: Route{"GET", p + "/openapi.json", v}, h: h.openapi, raw: true},

		{Route: Route{"GET", p + "/vms", v}, h: h.listVMs},
		{Route: Route{"GET", p + "/vms/{vm}", v}, h: h.getVM},
		{Route: Route{"GET", p + "/vms/{vm}/backups", v}, query: []string{"repository", "limit", "before"}, h: h.vmBackups},
		{Route: Route{"GET", p + "/vms/{vm}/results", v}, query: []string{"before", "limit"}, h: h.vmResults},

		{Route: Route{"GET", p + "/backups", v}, query: []string{"repository", "vm", "limit", "before"}, h: h.listBackups},
		{Route: Route{"GET", p + "/repositories/{repo}/backups/{id}", v}, h: h.getBackup},
		{Route: Route{"DELETE", p + "/repositories/{repo}/backups/{id}", a}, h: h.deleteBackup},
		{Route: Route{"GET", p + "/repositories", v}, h: h.listRepositories},
		{Route: Route{"GET", p + "/repositories/{repo}/usage", v}, query: []string{"since"}, h: h.repoUsage},
		{Route: Route{"GET", p + "/repositories/{repo}/verifies", v}, query: []string{"before", "limit"}, h: h.repoVerifies},
		{Route: Route{"POST", p + "/repositories/{repo}/prune-preview", v}, h: h.prunePreview},
		{Route: Route{"GET", p + "/repositories/{repo}/gc-preview", o}, h: h.gcPreview},
		{Route: Route{"POST", p + "/selection-preview", v}, h: h.selectionPreview},
		{Route: Route{"GET", p + "/schedule-preview", v}, query: []string{"schedule", "timezone", "count"}, h: h.schedulePreview},

		{Route: Route{"GET", p + "/jobs", v}, h: h.listJobs},
		{Route: Route{"POST", p + "/jobs", a}, h: h.createJob},
		{Route: Route{"GET", p + "/jobs/{name}", v}, h: h.getJob},
		{Route: Route{"PUT", p + "/jobs/{name}", a}, h: h.updateJob},
		{Route: Route{"DELETE", p + "/jobs/{name}", a}, h: h.deleteJob},
		{Route: Route{"GET", p + "/jobs/{name}/prune-preview", v}, h: h.jobPrunePreview},
		{Route: Route{"POST", p + "/jobs/{name}/run", o}, h: h.runJob},
		{Route: Route{"POST", p + "/jobs/{name}/enable", o}, h: h.enableJob},
		{Route: Route{"POST", p + "/jobs/{name}/disable", o}, h: h.disableJob},

		{Route: Route{"GET", p + "/runs", v}, query: []string{"job", "status", "vm", "before", "limit"}, h: h.listRuns},
		{Route: Route{"GET", p + "/runs/{id}", v}, h: h.getRun},
		{Route: Route{"GET", p + "/runs/{id}/log", v}, query: []string{"after", "limit"}, h: h.runLog},
		{Route: Route{"GET", p + "/runs/{id}/events", v}, h: h.runEvents, raw: true},
		{Route: Route{"POST", p + "/runs/{id}/cancel", o}, h: h.cancelRun},

		{Route: Route{"POST", p + "/restore", o}, h: h.restore},
		{Route: Route{"GET", p + "/connections", v}, h: h.listConnections},
		{Route: Route{"GET", p + "/serves", v}, h: h.listServes},
		{Route: Route{"POST", p + "/serves", o}, h: h.startServe},
		{Route: Route{"DELETE", p + "/serves/{id}", o}, h: h.stopServe},
	}
	if h.opts.Metrics != nil {
		rs = append(rs, route{Route: Route{"GET", "/metrics", v}, h: h.metrics, raw: true})
	}
	return rs
}

// ServeHTTP answers a path or method the API does not have with a JSON
// error (404, or 405 with Allow), and dispatches the rest.
func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// On every response, the mux's own redirects included.
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if _, pattern := h.mux.Handler(r); pattern == "" {
		rec := &recorder{header: http.Header{}}
		h.mux.ServeHTTP(rec, r)
		c := h.newCall(w, r)
		defer c.logDone()
		switch rec.status {
		case http.StatusNotFound, http.StatusMethodNotAllowed:
			if allow := rec.header.Get("Allow"); allow != "" {
				w.Header().Set("Allow", allow)
			}
			var err error
			if rec.status == http.StatusNotFound {
				err = fmt.Errorf("no such endpoint %s (see %s/openapi.json): %w", r.URL.Path, Prefix, errs.ErrNotFound)
			} else {
				err = &httpError{status: http.StatusMethodNotAllowed, code: "method_not_allowed",
					msg: fmt.Sprintf("%s does not take %s (allowed: %s)", r.URL.Path, r.Method, rec.header.Get("Allow"))}
			}
			c.fail(err)
			return
		}
		// A redirect to the canonical path, say: pass it on.
		for k, v := range rec.header {
			c.w.Header()[k] = v
		}
		c.w.WriteHeader(rec.status)
		c.w.Write(rec.body)
		return
	}
	h.mux.ServeHTTP(w, r)
}

// recorder captures what the mux answers for an unknown path or method.
type recorder struct {
	header http.Header
	status int
	body   []byte
}

func (r *recorder) Header() http.Header { return r.header }
func (r *recorder) WriteHeader(s int) {
	if r.status == 0 {
		r.status = s
	}
}
func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	r.body = append(r.body, b...)
	return len(b), nil
}

// call is one request being served.
type call struct {
	h       *handler
	w       *statusWriter
	r       *http.Request
	ctx     context.Context
	token   *state.Token
	id      string
	start   time.Time
	errText string
}

// statusWriter remembers the status written, for the log line.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(s int) {
	if w.status == 0 {
		w.status = s
	}
	w.ResponseWriter.WriteHeader(s)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach Flush and SetWriteDeadline.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// requestIDRe is what a client's X-Request-ID may be to be kept.
var requestIDRe = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,64}$`)

func (h *handler) newCall(w http.ResponseWriter, r *http.Request) *call {
	id := r.Header.Get("X-Request-ID")
	if !requestIDRe.MatchString(id) {
		var b [8]byte
		rand.Read(b[:])
		id = hex.EncodeToString(b[:])
	}
	w.Header().Set("X-Request-ID", id)
	return &call{h: h, w: &statusWriter{ResponseWriter: w}, r: r, ctx: r.Context(), id: id, start: h.opts.Now()}
}

func (c *call) logDone() {
	if c.h.opts.Logf == nil {
		return
	}
	who := "-"
	if c.token != nil {
		who = c.token.Name
	}
	line := fmt.Sprintf("api: %s %s %d %s token=%s request=%s", c.r.Method, c.r.URL.Path, c.w.status,
		c.h.opts.Now().Sub(c.start).Round(time.Millisecond), who, c.id)
	if c.errText != "" {
		line += ": " + c.errText
	}
	// Paths and messages hold client input: no line breaks into the log.
	line = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, line)
	c.h.opts.Logf("%s", line)
}

// wrap authenticates, authorizes and checks the query of a request
// before its handler runs, and turns the handler's error into the JSON
// error response.
func (h *handler) wrap(rt *route) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := h.newCall(w, r)
		defer c.logDone()
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				c.fail(fmt.Errorf("internal error (%v): please report it", p))
			}
		}()
		if rt.Role != "" {
			if err := c.authenticate(rt.Role); err != nil {
				c.fail(err)
				return
			}
		}
		if err := checkQuery(r, rt.query); err != nil {
			c.fail(err)
			return
		}
		if err := rt.h(c); err != nil {
			c.fail(err)
		}
	})
}

// authenticate checks the bearer token (or, without an Authorization
// header, the browser session) and that its role allows need.
func (c *call) authenticate(need string) error {
	auth := c.r.Header.Get("Authorization")
	scheme, secret, ok := strings.Cut(auth, " ")
	if auth == "" && c.h.opts.Sessions != nil {
		var err error
		secret, ok, err = c.h.opts.Sessions.SessionSecret(c.r)
		switch {
		case errors.Is(err, ErrCSRF):
			return &httpError{status: 403, code: "csrf", msg: err.Error()}
		case err != nil:
			return &httpError{status: 401, code: "unauthorized", invalid: true, msg: err.Error()}
		}
		if ok {
			scheme = "Bearer"
		}
	}
	if auth == "" && !ok {
		return &httpError{status: 401, code: "unauthorized", msg: "this endpoint needs an API token: send 'Authorization: Bearer TOKEN' (create one with 'vmshadow server token create')"}
	}
	secret = strings.TrimSpace(secret)
	if !ok || !strings.EqualFold(scheme, "Bearer") || secret == "" {
		return &httpError{status: 401, code: "unauthorized", invalid: true, msg: "malformed Authorization header: send 'Authorization: Bearer TOKEN'"}
	}
	tok, err := c.h.svc.Authenticate(c.ctx, secret)
	if err != nil {
		if errors.Is(err, errs.ErrAuth) {
			// The service's message names no secret; still, say only
			// what the client needs.
			return &httpError{status: 401, code: "unauthorized", invalid: true, msg: "unknown or revoked API token (list tokens with 'vmshadow server token list')"}
		}
		return fmt.Errorf("check the API token: %w", err)
	}
	c.token = tok
	if !state.Allows(tok.Role, need) {
		return &httpError{status: 403, code: "forbidden", msg: fmt.Sprintf("token %q has role %s; this needs role %s or higher", tok.Name, tok.Role, need)}
	}
	return nil
}

// httpError is an error with its own status and code (those the error
// classes do not give).
type httpError struct {
	status  int
	code    string
	msg     string
	invalid bool // 401 for a token given but wrong
}

func (e *httpError) Error() string { return e.msg }

// ErrorBody is the JSON of every error response.
type ErrorBody struct {
	Error ErrorDetail `json:"error"`
}

// ErrorDetail says what went wrong: Code is stable (see docs/api.md),
// Message is for people, Class is the vmshadow error class ("busy",
// "not found", ...; as the CLI's JSON errors show it).
type ErrorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Class   string `json:"class,omitempty"`
}

// classify maps an error to its HTTP status and code.
func classify(err error) (int, string) {
	var he *httpError
	if errors.As(err, &he) {
		return he.status, he.code
	}
	switch {
	case errors.Is(err, errs.ErrNotFound):
		return http.StatusNotFound, "not_found"
	case errors.Is(err, errs.ErrUsage):
		return http.StatusBadRequest, "bad_request"
	case errors.Is(err, errs.ErrAuth):
		return http.StatusUnauthorized, "unauthorized"
	case errors.Is(err, errs.ErrBusy):
		return http.StatusConflict, "conflict"
	}
	return http.StatusInternalServerError, "internal"
}

// fail writes err as the JSON error response (unless a response was
// already started, as by an event stream: then it is only logged).
func (c *call) fail(err error) {
	c.errText = err.Error()
	if c.w.status != 0 {
		return
	}
	status, code := classify(err)
	if status == http.StatusUnauthorized {
		// invalid_token only when the token was wrong (not for the
		// service's own ErrAuth, a repository's password say).
		v := `Bearer realm="vmshadow"`
		var he *httpError
		if errors.As(err, &he) && he.invalid {
			v += `, error="invalid_token"`
		}
		c.w.Header().Set("WWW-Authenticate", v)
	}
	body := ErrorBody{Error: ErrorDetail{Code: code, Message: err.Error()}}
	if cls := errs.ClassName(err); cls != "error" {
		body.Error.Class = cls
		// The class is its own field: "...: not found" need not end
		// the message too.
		body.Error.Message = strings.TrimSuffix(body.Error.Message, ": "+cls)
	}
	c.json(status, body)
}

// json writes v as the response.
func (c *call) json(status int, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode the response: %w", err)
	}
	c.w.Header().Set("Content-Type", "application/json")
	c.w.WriteHeader(status)
	c.w.Write(append(b, '\n'))
	return nil
}

// noContent writes 204.
func (c *call) noContent() error {
	c.w.WriteHeader(http.StatusNoContent)
	return nil
}

// readJSON decodes the request body (at most MaxBodySize, JSON, no
// unknown fields, one value) into v.
func (c *call) readJSON(v any) error {
	b, err := c.readBody()
	if err != nil {
		return err
	}
	return decodeStrict(b, v)
}

// readBody reads the request body (at most MaxBodySize, JSON content type).
func (c *call) readBody() ([]byte, error) {
	if ct := c.r.Header.Get("Content-Type"); ct != "" {
		mt, _, _ := strings.Cut(ct, ";")
		if !strings.EqualFold(strings.TrimSpace(mt), "application/json") {
			return nil, &httpError{status: http.StatusUnsupportedMediaType, code: "unsupported_media_type",
				msg: fmt.Sprintf("request body of type %q: send JSON (Content-Type: application/json)", mt)}
		}
	}
	buf, err := io.ReadAll(http.MaxBytesReader(c.w, c.r.Body, MaxBodySize))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, &httpError{status: http.StatusRequestEntityTooLarge, code: "too_large",
				msg: fmt.Sprintf("request body larger than %d bytes: send at most that", MaxBodySize)}
		}
		return nil, fmt.Errorf("read the request body: %w", err)
	}
	if len(bytes.TrimSpace(buf)) == 0 {
		return nil, fmt.Errorf("empty request body: send a JSON object: %w", errs.ErrUsage)
	}
	return buf, nil
}

// decodeStrict decodes one JSON value into v, refusing unknown fields and
// trailing data, with an error naming what was wrong.
func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return fmt.Errorf("request body is not valid JSON (at byte %d): %v: %w", se.Offset, err, errs.ErrUsage)
		case errors.Is(err, io.ErrUnexpectedEOF):
			return fmt.Errorf("request body is not valid JSON: it ends early: %w", errs.ErrUsage)
		case errors.As(err, &te):
			return fmt.Errorf("request body: field %q must be %s, not %s: %w", te.Field, te.Type, te.Value, errs.ErrUsage)
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			return fmt.Errorf("request body: unknown field %s: %w", strings.TrimPrefix(err.Error(), "json: unknown field "), errs.ErrUsage)
		}
		return fmt.Errorf("request body: %v: %w", err, errs.ErrUsage)
	}
	if dec.More() {
		return fmt.Errorf("request body: data after the JSON value: send one JSON object: %w", errs.ErrUsage)
	}
	return nil
}

// checkQuery refuses query parameters the endpoint does not take, and
// repeated ones.
func checkQuery(r *http.Request, allowed []string) error {
	q, err := parseQuery(r.URL.RawQuery)
	if err != nil {
		return err
	}
	for k, v := range q {
		if !slices.Contains(allowed, k) {
			if len(allowed) == 0 {
				return fmt.Errorf("unknown query parameter %q: %s takes none: %w", k, r.URL.Path, errs.ErrUsage)
			}
			return fmt.Errorf("unknown query parameter %q: use %s: %w", k, strings.Join(allowed, ", "), errs.ErrUsage)
		}
		if len(v) > 1 {
			return fmt.Errorf("query parameter %q given %d times: give it once: %w", k, len(v), errs.ErrUsage)
		}
	}
	return nil
}
