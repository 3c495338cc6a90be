package api_test

import (
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/vmshadow/vmshadow/internal/server/api/apitest"
)

// FuzzRequest sends arbitrary methods, paths, queries, bodies and
// Last-Event-ID headers: the handler never panics, never fails with 500
// on the fake's good answers, always answers JSON with no-store, and what
// it answers to a documented path is valid against the document.
func FuzzRequest(f *testing.F) {
	for _, s := range [][4]string{
		{"GET", "/api/v1/runs", "limit=5&before=3", ""},
		{"GET", "/api/v1/backups", "before=2026-12-01T00:00:00Z&vm=a", ""},
		{"GET", "/api/v1/runs/12/log", "after=3&limit=1", ""},
		{"GET", "/api/v1/repositories/local/backups/abC1", "", ""},
		{"DELETE", "/api/v1/serves/a-b_c", "", ""},
		{"POST", "/api/v1/jobs", "", `{"name":"n","type":"backup"}`},
		{"PUT", "/api/v1/jobs/n", "", `{"name":"n"}`},
		{"POST", "/api/v1/restore", "", `{"repository":"r","backup":"ab","to":"/x"}`},
		{"POST", "/api/v1/serves", "", `{"repository":"r","backup":"ab","disk":"vda"}`},
		{"GET", "/api/v1/vms/%ff%00", "x=%zz;", ""},
		{"GET", "/api/v1/runs/99999999999999999999", "", ""},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	fk := newFake()
	h := newHandler(fk, nil)
	d := doc(f)
	f.Fuzz(func(t *testing.T, method, path, query, body string) {
		switch method {
		case "GET", "POST", "PUT", "DELETE", "PATCH":
		default:
			method = "GET"
		}
		if !strings.HasPrefix(path, "/") || strings.ContainsAny(path, " ?#\r\n\t") || !utf8.ValidString(path) ||
			strings.ContainsAny(query, " #\r\n\t") || strings.HasSuffix(path, "/events") {
			return
		}
		target := path
		if query != "" {
			target += "?" + query
		}
		if _, err := url.ParseRequestURI(target); err != nil {
			return // no HTTP client sends it; the server's parser refuses it
		}
		defer func() {
			if p := recover(); p != nil {
				t.Fatalf("%s %s: panic %v", method, target, p)
			}
		}()
		r := httptest.NewRequest(method, "http://x"+target, strings.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+adminTok)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code == 500 {
			t.Fatalf("%s %s %q: 500 %s", method, target, body, w.Body)
		}
		if w.Header().Get("Cache-Control") != "no-store" {
			t.Fatalf("%s %s: no Cache-Control", method, target)
		}
		if w.Code >= 300 && w.Code < 400 {
			return // the mux's redirect to a canonical path
		}
		if ct := w.Header().Get("Content-Type"); w.Code != 204 && ct != "application/json" {
			t.Fatalf("%s %s: %d with Content-Type %q", method, target, w.Code, ct)
		}
		if w.Code != 404 && w.Code != 405 {
			if _, item, _, ok := apitest.Find(d, r.URL.EscapedPath()); ok && item.GetOperation(method) != nil {
				apitest.ValidateRecorder(t, d, method, r.URL.EscapedPath(), w)
			}
		}
	})
}
