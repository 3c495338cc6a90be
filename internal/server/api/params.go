package api

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Bounds of the list endpoints' limit parameter.
const (
	defaultLimit    = 100
	maxLimit        = 1000
	defaultLogLimit = 1000
	maxLogLimit     = 10000
	maxNameLen      = 256
)

// parseQuery parses a raw query string, naming what is wrong with it.
func parseQuery(raw string) (url.Values, error) {
	q, err := url.ParseQuery(raw)
	if err != nil {
		return nil, fmt.Errorf("bad query string: %v: %w", err, errs.ErrUsage)
	}
	return q, nil
}

// queryInt returns the query parameter name as an integer in [lo, hi],
// def when absent.
func queryInt(q url.Values, name string, def, lo, hi int64) (int64, error) {
	s, ok := q[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.ParseInt(s[0], 10, 64)
	if err != nil || n < lo || n > hi || strings.HasPrefix(s[0], "+") {
		return 0, fmt.Errorf("query parameter %s=%q: want a whole number from %d to %d: %w", name, s[0], lo, hi, errs.ErrUsage)
	}
	return n, nil
}

// queryTime returns the query parameter name as an RFC 3339 time, zero
// when absent.
func queryTime(q url.Values, name string) (time.Time, error) {
	s, ok := q[name]
	if !ok {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s[0])
	if err != nil {
		return time.Time{}, fmt.Errorf("query parameter %s=%q: want an RFC 3339 time such as 2026-12-03T01:30:00Z: %w", name, s[0], errs.ErrUsage)
	}
	return t, nil
}

// queryName returns the query parameter name as a name (see checkName),
// "" when absent.
func queryName(q url.Values, name string) (string, error) {
	s, ok := q[name]
	if !ok {
		return "", nil
	}
	if err := checkName(s[0]); err != nil {
		return "", fmt.Errorf("query parameter %s: %v: %w", name, err, errs.ErrUsage)
	}
	return s[0], nil
}

// checkName accepts a VM, job or repository name: 1 to 256 bytes of
// UTF-8 without control characters.
func checkName(s string) error {
	switch {
	case s == "":
		return fmt.Errorf("empty name")
	case len(s) > maxNameLen:
		return fmt.Errorf("name of %d bytes: at most %d", len(s), maxNameLen)
	case !utf8.ValidString(s):
		return fmt.Errorf("name %q is not UTF-8", s)
	case strings.ContainsFunc(s, unicode.IsControl):
		return fmt.Errorf("name %q holds a control character", s)
	}
	return nil
}

// pathName returns the path parameter key as a name.
func (c *call) pathName(key string) (string, error) {
	s := c.r.PathValue(key)
	if err := checkName(s); err != nil {
		return "", fmt.Errorf("path parameter {%s}: %v: %w", key, err, errs.ErrUsage)
	}
	return s, nil
}

// parseRunID parses a run ID: a positive decimal integer.
func parseRunID(s string) (int64, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || strings.HasPrefix(s, "+") {
		return 0, fmt.Errorf("run ID %q: want a positive whole number (list runs with GET %s/runs): %w", s, Prefix, errs.ErrUsage)
	}
	return n, nil
}

// parseBackupID checks a backup ID or ID prefix: 1 to 64 hex digits.
func parseBackupID(s string) (string, error) {
	if s == "" || len(s) > 64 || strings.Trim(strings.ToLower(s), "0123456789abcdef") != "" {
		return "", fmt.Errorf("backup ID %q: want 1 to 64 hex digits (an ID or a unique prefix of one): %w", s, errs.ErrUsage)
	}
	return strings.ToLower(s), nil
}

// parseServeID checks the ID of a running serve: 1 to 64 letters, digits,
// '-' or '_'.
func parseServeID(s string) (string, error) {
	ok := s != "" && len(s) <= 64 && !strings.ContainsFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_')
	})
	if !ok {
		return "", fmt.Errorf("serve ID %q: want 1 to 64 letters, digits, '-' or '_' (list them with GET %s/serves): %w", s, Prefix, errs.ErrUsage)
	}
	return s, nil
}

// pathEscape escapes a name for a Location header.
func pathEscape(s string) string { return url.PathEscape(s) }

// pageQuery parses the paging of a list newest first: before= (an ID: the
// page holds older items; 0 for the newest) and limit=.
func pageQuery(q url.Values) (before int64, limit int, err error) {
	if before, err = queryInt(q, "before", 0, 1, 1<<62); err != nil {
		return 0, 0, err
	}
	l, err := queryInt(q, "limit", defaultLimit, 1, maxLimit)
	return before, int(l), err
}

// nextBefore is the before= of the page after page (its items' IDs by
// id), or nil when page is not full: there is none.
func nextBefore[E any](page []E, limit int, id func(E) int64) *int64 {
	if n := len(page); n > 0 && n >= limit {
		v := id(page[n-1])
		return &v
	}
	return nil
}
