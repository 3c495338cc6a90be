package api_test

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/web"
)

// login posts secret to the web interface's login and returns the
// session cookie it sets.
func login(t *testing.T, ui *web.Web, secret string) *http.Cookie {
	t.Helper()
	r := httptest.NewRequest("POST", "/login", strings.NewReader(url.Values{"token": {secret}}.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	w := httptest.NewRecorder()
	ui.ServeHTTP(w, r)
	if w.Code != http.StatusSeeOther {
		t.Fatalf("login: %d %s", w.Code, w.Body)
	}
	for _, c := range w.Result().Cookies() {
		if c.Name == web.CookieName {
			return c
		}
	}
	t.Fatal("login set no session cookie")
	return nil
}

// TestSessionCookie: with Options.Sessions, a request without an
// Authorization header is judged by its session cookie (the token's
// role applies), a change needs the session's CSRF token, an unknown
// session is 401, and a bearer token is judged alone.
func TestSessionCookie(t *testing.T) {
	f := newFake()
	ui := web.New(f, web.Options{})
	h := api.New(f, api.Options{Sessions: ui})
	op := login(t, ui, operatorTok)
	csrf := csrfOf(t, ui, op)

	send := func(method, path string, c *http.Cookie, hdr ...string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(method, path, nil)
		if c != nil {
			r.AddCookie(c)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			r.Header.Set(hdr[i], hdr[i+1])
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		return w
	}
	if w := send("GET", "/api/v1/jobs", op); w.Code != 200 {
		t.Fatalf("GET with the session: %d %s", w.Code, w.Body)
	}
	f.takeCalls()
	w := send("POST", "/api/v1/jobs/nightly/run", op)
	if code, _ := errCode(t, w); w.Code != 403 || code != "csrf" {
		t.Fatalf("POST without the CSRF token: %d %s", w.Code, w.Body)
	}
	wrong := "0" + csrf[1:]
	if csrf[0] == '0' {
		wrong = "1" + csrf[1:]
	}
	if w := send("POST", "/api/v1/jobs/nightly/run", op, "X-CSRF-Token", wrong); w.Code != 403 {
		t.Fatalf("POST with a wrong CSRF token: %d %s", w.Code, w.Body)
	}
	if calls := f.takeCalls(); len(calls) != 0 {
		t.Fatalf("refused requests reached the service: %v", calls)
	}
	if w := send("POST", "/api/v1/jobs/nightly/run", op, "X-CSRF-Token", csrf); w.Code != 202 && w.Code != 200 && w.Code != 201 {
		t.Fatalf("POST with the CSRF token: %d %s", w.Code, w.Body)
	}
	// The operator's role, not more.
	if w := send("DELETE", "/api/v1/jobs/nightly", op, "X-CSRF-Token", csrf); w.Code != 403 {
		t.Fatalf("operator session deleting a job: %d %s", w.Code, w.Body)
	}
	bogus := &http.Cookie{Name: web.CookieName, Value: strings.Repeat("ab", 32)}
	if w := send("GET", "/api/v1/jobs", bogus); w.Code != 401 || !strings.Contains(w.Body.String(), "log in again") {
		t.Fatalf("unknown session: %d %s", w.Code, w.Body)
	}
	// A bearer token wins over the cookie: a viewer's token with an
	// operator's session may not run.
	if w := send("POST", "/api/v1/jobs/nightly/run", op, "X-CSRF-Token", csrf, "Authorization", "Bearer "+viewerTok); w.Code != 403 {
		t.Fatalf("viewer bearer with operator session: %d %s", w.Code, w.Body)
	}
	// Without Sessions the cookie means nothing.
	plain := api.New(f, api.Options{})
	r := httptest.NewRequest("GET", "/api/v1/jobs", nil)
	r.AddCookie(op)
	w = httptest.NewRecorder()
	plain.ServeHTTP(w, r)
	if w.Code != 401 {
		t.Fatalf("cookie without Sessions: %d", w.Code)
	}
}

// csrfOf reads the CSRF token the page of session c carries.
func csrfOf(t *testing.T, ui *web.Web, c *http.Cookie) string {
	t.Helper()
	r := httptest.NewRequest("GET", "/", nil)
	r.AddCookie(c)
	w := httptest.NewRecorder()
	ui.ServeHTTP(w, r)
	body := w.Body.String()
	_, rest, ok := strings.Cut(body, `<meta name="csrf-token" content="`)
	tok, _, ok2 := strings.Cut(rest, `"`)
	if w.Code != 200 || !ok || !ok2 || len(tok) != 64 {
		t.Fatalf("page of the session: %d %s", w.Code, body)
	}
	return tok
}
