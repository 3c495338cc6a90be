// Package web owns the web interface of vmshadow server: the page served
// at / (HTML, JavaScript and CSS embedded in the binary, no external
// resource), the login with an API token and the browser sessions that
// follow it, and the security headers of the page. The page itself calls
// the REST API (package server/api) with the session cookie, so every
// action it shows is one an API client can do; the API accepts the
// session through its Options.Sessions, which a *Web is.
//
// Sessions live in memory (a restart logs everyone out), expire after
// Options.TTL, and hold the token's secret so that each API call is
// judged by the token as it is now (a revoked token ends its sessions at
// once). CSRF: the synchronizer-token pattern — each session has a random
// CSRF token, given to the page in a meta tag, that every state-changing
// API request must send in the X-CSRF-Token header; the cookie is
// SameSite=Strict and HTTP-only besides.
package web

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// CookieName is the session cookie's name.
const CookieName = "vmshadow_session"

// DefaultTTL is how long a session lasts after its login.
const DefaultTTL = 12 * time.Hour

// maxSessions bounds the sessions kept: the oldest goes first.
const maxSessions = 1000

// CSP is the page's Content-Security-Policy: nothing but its own files,
// no inline script or style, never in a frame.
const CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
	"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

//go:embed assets
var assets embed.FS

var pages = template.Must(template.ParseFS(assets, "assets/*.html"))

// Authenticator checks an API token (the api.Service does).
type Authenticator interface {
	Authenticate(ctx context.Context, secret string) (*state.Token, error)
}

// Options configure the web interface.
type Options struct {
	// TTL is a session's lifetime (default DefaultTTL).
	TTL time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Version is shown in the page's footer.
	Version string
}

// Web is the web interface's handler and session store.
type Web struct {
	auth   Authenticator
	opts   Options
	static http.Handler
	mu     sync.Mutex
	// sessions by the SHA-256 of the cookie's value (a memory dump
	// does not give usable cookies).
	sessions map[string]*session
}

type session struct {
	secret  string
	csrf    string
	created time.Time
	expires time.Time
}

// New returns the web interface; auth checks the tokens given to log in.
func New(auth Authenticator, opts Options) *Web {
	if opts.TTL <= 0 {
		opts.TTL = DefaultTTL
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	sub, _ := fs.Sub(assets, "assets")
	return &Web{auth: auth, opts: opts, sessions: map[string]*session{},
		static: http.StripPrefix("/static/", http.FileServerFS(sub))}
}

// Mount returns the handler of a server with both: the API (its /api/
// paths, /metrics and /healthz) and the web interface (everything else).
func Mount(w *Web, apiHandler http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle(api.Prefix+"/", apiHandler)
	mux.Handle("/metrics", apiHandler)
	mux.Handle("/healthz", apiHandler)
	mux.Handle("/", w)
	return mux
}

// ServeHTTP serves the page (/), the login (/login), the logout (POST
// /logout) and the page's files (/static/).
func (w *Web) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	h := rw.Header()
	h.Set("Content-Security-Policy", CSP)
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "same-origin")
	if r.TLS != nil {
		h.Set("Strict-Transport-Security", "max-age=31536000")
	}
	switch {
	case r.URL.Path == "/":
		if !get(rw, r) {
			return
		}
		w.page(rw, r)
	case r.URL.Path == "/login":
		switch r.Method {
		case http.MethodGet, http.MethodHead:
			h.Set("Cache-Control", "no-store")
			w.render(rw, http.StatusOK, "login.html", loginData{Version: w.opts.Version})
		case http.MethodPost:
			w.login(rw, r)
		default:
			h.Set("Allow", "GET, HEAD, POST")
			http.Error(rw, "method not allowed", http.StatusMethodNotAllowed)
		}
	case r.URL.Path == "/logout":
		if r.Method != http.MethodPost {
			h.Set("Allow", "POST")
			http.Error(rw, "log out with POST", http.StatusMethodNotAllowed)
			return
		}
		w.logout(rw, r)
	case strings.HasPrefix(r.URL.Path, "/static/") && !strings.HasSuffix(r.URL.Path, ".html") && !strings.HasSuffix(r.URL.Path, "/"):
		if !get(rw, r) {
			return
		}
		h.Set("Cache-Control", "no-cache")
		w.static.ServeHTTP(rw, r)
	default:
		http.NotFound(rw, r)
	}
}

// get refuses methods other than GET and HEAD.
func get(rw http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	rw.Header().Set("Allow", "GET, HEAD")
	http.Error(rw, "method not allowed", http.StatusMethodNotAllowed)
	return false
}

type loginData struct {
	Error   string
	Version string
}

type pageData struct {
	Name, Role, CSRF, Version string
}

func (w *Web) render(rw http.ResponseWriter, status int, name string, data any) {
	var b strings.Builder
	if err := pages.ExecuteTemplate(&b, name, data); err != nil {
		http.Error(rw, "render the page: "+err.Error(), http.StatusInternalServerError)
		return
	}
	rw.Header().Set("Content-Type", "text/html; charset=utf-8")
	rw.WriteHeader(status)
	rw.Write([]byte(b.String()))
}

// page serves the application's page to a logged-in browser, and sends
// any other to the login.
func (w *Web) page(rw http.ResponseWriter, r *http.Request) {
	rw.Header().Set("Cache-Control", "no-store")
	s, _, err := w.lookup(r)
	if s == nil || err != nil {
		http.Redirect(rw, r, "/login", http.StatusSeeOther)
		return
	}
	tok, err := w.auth.Authenticate(r.Context(), s.secret)
	if err != nil {
		if errors.Is(err, errs.ErrAuth) {
			w.drop(r)
			http.Redirect(rw, r, "/login", http.StatusSeeOther)
			return
		}
		http.Error(rw, "check the session's token: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.render(rw, http.StatusOK, "index.html", pageData{Name: tok.Name, Role: tok.Role, CSRF: s.csrf, Version: w.opts.Version})
}

// sameOrigin refuses a login or logout posted from another site (login
// CSRF): a browser sends Origin (or Sec-Fetch-Site) with every POST.
func sameOrigin(r *http.Request) bool {
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" {
		// Modern browsers: this says it (Origin may be "null").
		return site == "same-origin" || site == "none"
	}
	o := r.Header.Get("Origin")
	if o == "" {
		return true // not a browser, or an old one: SameSite still holds
	}
	u, err := url.Parse(o)
	return err == nil && u.Host == r.Host
}

func (w *Web) login(rw http.ResponseWriter, r *http.Request) {
	rw.Header().Set("Cache-Control", "no-store")
	if !sameOrigin(r) {
		http.Error(rw, "login refused: the form was posted from another site", http.StatusForbidden)
		return
	}
	r.Body = http.MaxBytesReader(rw, r.Body, 4096)
	if err := r.ParseForm(); err != nil {
		w.render(rw, http.StatusBadRequest, "login.html", loginData{Error: "The login form could not be read: send the token in the field 'token'.", Version: w.opts.Version})
		return
	}
	secret := strings.TrimSpace(r.PostForm.Get("token"))
	if secret == "" {
		w.render(rw, http.StatusUnauthorized, "login.html", loginData{Error: "Give an API token (create one with 'vmshadow server token create').", Version: w.opts.Version})
		return
	}
	if _, err := w.auth.Authenticate(r.Context(), secret); err != nil {
		if errors.Is(err, errs.ErrAuth) {
			w.render(rw, http.StatusUnauthorized, "login.html", loginData{Error: "Unknown or revoked API token: check it, or list tokens with 'vmshadow server token list'.", Version: w.opts.Version})
			return
		}
		w.render(rw, http.StatusInternalServerError, "login.html", loginData{Error: "The token could not be checked: " + err.Error(), Version: w.opts.Version})
		return
	}
	id, csrf := random(), random()
	now := w.opts.Now()
	w.mu.Lock()
	w.sweep(now)
	w.sessions[hash(id)] = &session{secret: secret, csrf: csrf, created: now, expires: now.Add(w.opts.TTL)}
	w.mu.Unlock()
	http.SetCookie(rw, &http.Cookie{Name: CookieName, Value: id, Path: "/", HttpOnly: true, Secure: r.TLS != nil,
		SameSite: http.SameSiteStrictMode, MaxAge: int(w.opts.TTL / time.Second)})
	http.Redirect(rw, r, "/", http.StatusSeeOther)
}

func (w *Web) logout(rw http.ResponseWriter, r *http.Request) {
	rw.Header().Set("Cache-Control", "no-store")
	s, _, _ := w.lookup(r)
	if s != nil {
		if !sameOrigin(r) || r.ParseForm() != nil || !equal(r.PostForm.Get("csrf"), s.csrf) {
			http.Error(rw, "logout refused: missing or wrong CSRF token: reload the page", http.StatusForbidden)
			return
		}
		w.drop(r)
	}
	http.SetCookie(rw, &http.Cookie{Name: CookieName, Value: "", Path: "/", HttpOnly: true, Secure: r.TLS != nil,
		SameSite: http.SameSiteStrictMode, MaxAge: -1})
	http.Redirect(rw, r, "/login", http.StatusSeeOther)
}

// sweep drops expired sessions, and the oldest while there are too many.
// w.mu is held.
func (w *Web) sweep(now time.Time) {
	for k, s := range w.sessions {
		if !now.Before(s.expires) {
			delete(w.sessions, k)
		}
	}
	for len(w.sessions) >= maxSessions {
		var oldest string
		for k, s := range w.sessions {
			if oldest == "" || s.created.Before(w.sessions[oldest].created) {
				oldest = k
			}
		}
		delete(w.sessions, oldest)
	}
}

// lookup finds r's session: nil and false without a cookie; an error for
// an unknown or expired one.
func (w *Web) lookup(r *http.Request) (*session, bool, error) {
	c, err := r.Cookie(CookieName)
	if err != nil || c.Value == "" {
		return nil, false, nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	k := hash(c.Value)
	s := w.sessions[k]
	if s == nil {
		return nil, true, fmt.Errorf("unknown session (the server restarted, or you logged out): log in again: %w", errs.ErrAuth)
	}
	if !w.opts.Now().Before(s.expires) {
		delete(w.sessions, k)
		return nil, true, fmt.Errorf("session expired: log in again: %w", errs.ErrAuth)
	}
	cp := *s
	return &cp, true, nil
}

func (w *Web) drop(r *http.Request) {
	if c, err := r.Cookie(CookieName); err == nil {
		w.mu.Lock()
		delete(w.sessions, hash(c.Value))
		w.mu.Unlock()
	}
}

// SessionSecret implements api.Sessions: the token secret of r's
// session, after the CSRF check of a state-changing request.
func (w *Web) SessionSecret(r *http.Request) (string, bool, error) {
	s, found, err := w.lookup(r)
	if !found || err != nil {
		return "", found, err
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead && !equal(r.Header.Get("X-CSRF-Token"), s.csrf) {
		return "", true, api.ErrCSRF
	}
	return s.secret, true, nil
}

func equal(a, b string) bool {
	return a != "" && subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

func random() string {
	var b [32]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func hash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}
