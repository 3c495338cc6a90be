package web_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
	"github.com/vmshadow/vmshadow/internal/server/web"
)

// dbAuth checks tokens in a real state database.
type dbAuth struct{ db *state.DB }

func (a dbAuth) Authenticate(ctx context.Context, secret string) (*state.Token, error) {
	return a.db.Authenticate(ctx, secret, time.Now())
}

func newDB(t *testing.T) *state.DB {
	t.Helper()
	db, err := state.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func post(ui http.Handler, path string, form url.Values, hdr ...string) *httptest.ResponseRecorder {
	r := httptest.NewRequest("POST", path, strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	ui.ServeHTTP(w, r)
	return w
}

func cookie(w *httptest.ResponseRecorder) *http.Cookie {
	for _, c := range w.Result().Cookies() {
		if c.Name == web.CookieName {
			return c
		}
	}
	return nil
}

func get(ui http.Handler, path string, c *http.Cookie) *httptest.ResponseRecorder {
	r := httptest.NewRequest("GET", path, nil)
	if c != nil {
		r.AddCookie(c)
	}
	w := httptest.NewRecorder()
	ui.ServeHTTP(w, r)
	return w
}

// TestLoginSessions: a good token gets an HTTP-only SameSite=Strict
// session cookie (Secure over TLS) and the page; a wrong one, another
// site's form or no session get none; the session expires, ends at
// logout (which needs its CSRF token) and when its token is revoked;
// every answer has the security headers.
func TestLoginSessions(t *testing.T) {
	ctx := context.Background()
	db := newDB(t)
	admin, err := db.CreateToken(ctx, "ops", state.Admin, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	clock := func() time.Time { return now }
	ui := web.New(dbAuth{db}, web.Options{TTL: time.Hour, Now: clock, Version: "9.9"})

	if w := get(ui, "/", nil); w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/login" {
		t.Fatalf("page without a session: %d %v", w.Code, w.Header())
	}
	w := get(ui, "/login", nil)
	for k, v := range map[string]string{"Content-Security-Policy": web.CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff"} {
		if w.Header().Get(k) != v {
			t.Errorf("login page: %s = %q, want %q", k, w.Header().Get(k), v)
		}
	}
	if !strings.Contains(web.CSP, "default-src 'self'") || !strings.Contains(web.CSP, "frame-ancestors 'none'") || strings.Contains(web.CSP, "unsafe") {
		t.Errorf("CSP not strict: %s", web.CSP)
	}
	if strings.Contains(w.Body.String(), "<script>") || strings.Contains(w.Body.String(), " style=") {
		t.Errorf("inline script or style in the login page")
	}

	w = post(ui, "/login", url.Values{"token": {"vmsh_" + strings.Repeat("0", 64)}})
	if w.Code != http.StatusUnauthorized || cookie(w) != nil || !strings.Contains(w.Body.String(), "Unknown or revoked API token") {
		t.Fatalf("wrong token: %d %s", w.Code, w.Body)
	}
	if w := post(ui, "/login", url.Values{"token": {admin}}, "Origin", "https://evil.example"); w.Code != http.StatusForbidden || cookie(w) != nil {
		t.Fatalf("login from another site: %d", w.Code)
	}
	if w := post(ui, "/login", url.Values{"token": {admin}}, "Sec-Fetch-Site", "cross-site"); w.Code != http.StatusForbidden || cookie(w) != nil {
		t.Fatalf("login from another site (Sec-Fetch-Site): %d", w.Code)
	}

	w = post(ui, "/login", url.Values{"token": {admin}}, "Origin", "http://example.com")
	c := cookie(w)
	if w.Code != http.StatusSeeOther || c == nil || !c.HttpOnly || c.SameSite != http.SameSiteStrictMode || c.Secure || c.Value == admin {
		t.Fatalf("login: %d %+v", w.Code, c)
	}
	page := get(ui, "/", c)
	if page.Code != 200 || !strings.Contains(page.Body.String(), `content="admin"`) || page.Header().Get("Content-Security-Policy") != web.CSP {
		t.Fatalf("page: %d %s", page.Code, page.Body)
	}
	if strings.Contains(page.Body.String(), admin) {
		t.Fatal("the page holds the token's secret")
	}
	// The session's secret for the API; a change needs the CSRF token.
	r := httptest.NewRequest("POST", "/api/v1/jobs/x/run", nil)
	r.AddCookie(c)
	if _, ok, err := ui.SessionSecret(r); !ok || !errors.Is(err, api.ErrCSRF) {
		t.Fatalf("POST without CSRF: %v %v", ok, err)
	}
	r = httptest.NewRequest("GET", "/api/v1/jobs", nil)
	r.AddCookie(c)
	if s, ok, err := ui.SessionSecret(r); !ok || err != nil || s != admin {
		t.Fatalf("GET: %v %v", ok, err)
	}

	// Over TLS the cookie is Secure, and HSTS is sent.
	r = httptest.NewRequest("POST", "/login", strings.NewReader(url.Values{"token": {admin}}.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	r.TLS = &tls.ConnectionState{}
	tw := httptest.NewRecorder()
	ui.ServeHTTP(tw, r)
	if tc := cookie(tw); tc == nil || !tc.Secure || tw.Header().Get("Strict-Transport-Security") == "" {
		t.Fatalf("login over TLS: %+v %v", tc, tw.Header())
	}

	// Logout needs the CSRF token of the page.
	if w := post(ui, "/logout", url.Values{"csrf": {"nope"}}, "Cookie", c.Name+"="+c.Value); w.Code != http.StatusForbidden {
		t.Fatalf("logout without CSRF: %d", w.Code)
	}
	csrf := between(page.Body.String(), `name="csrf-token" content="`, `"`)
	if w := post(ui, "/logout", url.Values{"csrf": {csrf}}, "Cookie", c.Name+"="+c.Value); w.Code != http.StatusSeeOther {
		t.Fatalf("logout: %d %s", w.Code, w.Body)
	}
	if w := get(ui, "/", c); w.Code != http.StatusSeeOther {
		t.Fatalf("page after logout: %d", w.Code)
	}

	// Expiry.
	c = cookie(post(ui, "/login", url.Values{"token": {admin}}))
	now = now.Add(time.Hour + time.Second)
	r = httptest.NewRequest("GET", "/api/v1/jobs", nil)
	r.AddCookie(c)
	if _, ok, err := ui.SessionSecret(r); !ok || err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired session: %v %v", ok, err)
	}

	// Revoking the token ends its sessions.
	c = cookie(post(ui, "/login", url.Values{"token": {admin}}))
	if err := db.RevokeToken(ctx, "ops", time.Now()); err != nil {
		t.Fatal(err)
	}
	if w := get(ui, "/", c); w.Code != http.StatusSeeOther {
		t.Fatalf("page of a revoked token: %d", w.Code)
	}

	// The page's files are served; the templates are not.
	if w := get(ui, "/static/app.js", nil); w.Code != 200 || !strings.Contains(w.Body.String(), "X-CSRF-Token") {
		t.Fatalf("app.js: %d", w.Code)
	}
	for _, p := range []string{"/static/index.html", "/static/"} {
		if w := get(ui, p, nil); w.Code != 404 {
			t.Fatalf("%s: %d", p, w.Code)
		}
	}
}

func between(s, a, b string) string {
	_, rest, _ := strings.Cut(s, a)
	v, _, _ := strings.Cut(rest, b)
	return v
}
