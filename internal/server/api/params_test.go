package api

import (
	"strconv"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"
)

// FuzzParams: what the parsers of path IDs, names and query values accept
// is what they promise, and they never panic.
func FuzzParams(f *testing.F) {
	for _, s := range []string{"1", "0", "-1", "+5", "007", "9223372036854775808", "abcDEF", "", "a b", "web\x01", "\xff",
		strings.Repeat("a", 65), "2026-12-01T00:00:00Z", "limit=5&before=x", "%zz", "a;b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if id, err := parseRunID(s); err == nil {
			if id <= 0 || strconv.FormatInt(id, 10) != strings.TrimLeft(s, "0") {
				t.Errorf("run ID %q accepted as %d", s, id)
			}
		} else if !strings.Contains(err.Error(), "run ID") {
			t.Errorf("error %q does not say what was wrong", err)
		}
		if id, err := parseBackupID(s); err == nil {
			if id == "" || len(id) > 64 || strings.Trim(id, "0123456789abcdef") != "" || !strings.EqualFold(id, s) {
				t.Errorf("backup ID %q accepted as %q", s, id)
			}
		}
		if id, err := parseServeID(s); err == nil && (id != s || strings.ContainsAny(s, "/ .%?\x00")) {
			t.Errorf("serve ID %q accepted as %q", s, id)
		}
		if err := checkName(s); err == nil {
			if s == "" || len(s) > maxNameLen || !utf8.ValidString(s) || strings.ContainsFunc(s, unicode.IsControl) {
				t.Errorf("name %q accepted", s)
			}
		}
		q, err := parseQuery(s)
		if err != nil {
			return
		}
		if n, err := queryInt(q, "limit", 7, 1, 1000); err == nil {
			if _, given := q["limit"]; (!given && n != 7) || n < 1 || n > 1000 {
				t.Errorf("limit from %q: %d", s, n)
			}
		} else if !strings.Contains(err.Error(), "query parameter limit=") {
			t.Errorf("error %q does not name the parameter", err)
		}
		if _, err := queryTime(q, "before"); err != nil && !strings.Contains(err.Error(), "query parameter before=") {
			t.Errorf("error %q does not name the parameter", err)
		}
	})
}
