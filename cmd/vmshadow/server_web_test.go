package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestServerWeb: 'vmshadow server' serves the web interface next to the
// API: / sends a browser to the login, a token logs it in, the page comes
// with its security headers, and the API takes the session cookie (with
// the CSRF token for a change).
func TestServerWeb(t *testing.T) {
	dir, _ := stateEnv(t)
	cfg := filepath.Join(dir, "server.yaml")
	sock := filepath.Join(dir, "api.sock")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf("listen: [{address: \"unix:%[1]s\"}]\nstate_dir: %[2]s/state\njobs: []\n", sock, dir)), 0o600); err != nil {
		t.Fatal(err)
	}
	res := vmshadow(t, nil, "server", "token", "create", "--config", cfg, "--name", "web", "--role", "operator")
	if res.code != 0 {
		t.Fatalf("token create: %s", res.errorMessage())
	}
	token := fmt.Sprint(res.summary(t)["token"])
	cmd, wait := startVmshadow(t, nil, "server", "--config", cfg)
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		if r := wait(); r.code != 0 {
			t.Errorf("server exit: %s", r.errorMessage())
		}
	}()
	client := &http.Client{
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	var resp *http.Response
	for deadline := time.Now().Add(30 * time.Second); ; {
		var err error
		resp, err = client.Get("http://vmshadow/")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not answer: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/login" {
		t.Fatalf("GET / without a session: %d %v", resp.StatusCode, resp.Header)
	}
	resp, err := client.PostForm("http://vmshadow/login", url.Values{"token": {token}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	var session *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "vmshadow_session" {
			session = c
		}
	}
	if resp.StatusCode != http.StatusSeeOther || session == nil || !session.HttpOnly {
		t.Fatalf("login: %d %v", resp.StatusCode, resp.Header)
	}
	send := func(method, path, csrf string) (*http.Response, string) {
		req, _ := http.NewRequest(method, "http://vmshadow"+path, nil)
		req.AddCookie(session)
		if csrf != "" {
			req.Header.Set("X-CSRF-Token", csrf)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	resp, page := send("GET", "/", "")
	if resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("Content-Security-Policy"), "default-src 'self'") ||
		resp.Header.Get("X-Frame-Options") != "DENY" || !strings.Contains(page, `src="/static/app.js"`) {
		t.Fatalf("page: %d %v %s", resp.StatusCode, resp.Header, page)
	}
	_, rest, _ := strings.Cut(page, `name="csrf-token" content="`)
	csrf, _, _ := strings.Cut(rest, `"`)
	if resp, body := send("GET", "/api/v1/jobs", ""); resp.StatusCode != 200 {
		t.Fatalf("API with the session: %d %s", resp.StatusCode, body)
	}
	if resp, body := send("POST", "/api/v1/jobs/nosuch/run", ""); resp.StatusCode != 403 || !strings.Contains(body, `"csrf"`) {
		t.Fatalf("API change without the CSRF token: %d %s", resp.StatusCode, body)
	}
	if resp, body := send("POST", "/api/v1/jobs/nosuch/run", csrf); resp.StatusCode != 404 {
		t.Fatalf("API change with the CSRF token: %d %s", resp.StatusCode, body)
	}
	if resp, body := send("GET", "/static/app.js", ""); resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/javascript") {
		t.Fatalf("app.js: %d %v %.80s", resp.StatusCode, resp.Header, body)
	}
}
