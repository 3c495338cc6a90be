// Package redact owns how a URL or URI that a user gave (a repository,
// a XAPI pool, an NBD export, a libvirt connection) is shown in messages
// and errors: never with its user info, query or fragment, which is where
// credentials, signed request parameters and session references live.
// Every place that prints such a URL goes through URL.
package redact

import "strings"

// URL returns s with user info replaced by "***@", and the query and
// fragment by "?..." and "#...". An escaped '?' in the path (%3F, where
// XenServer's NBD exports carry a session reference) cuts the rest of the
// URL off the same way. keep names query parameters that are never
// secret (NBD's socket=): a query of only those is shown as it is.
//
// s need not parse as a URL: it is handled as text, so that a malformed
// URL in an error message is redacted too.
func URL(s string, keep ...string) string {
	var b strings.Builder
	rest := s
	if i := strings.Index(rest, "://"); i >= 0 {
		b.WriteString(rest[:i+3])
		rest = rest[i+3:]
	} else if i := schemeLen(rest); i > 0 && !strings.Contains(authority(rest), "@") {
		// "s3:host/bucket", "nbd:unix:/path"; but in "user:pw@host"
		// what looks like a scheme is user info.
		b.WriteString(rest[:i])
		rest = rest[i:]
	}
	if at := strings.LastIndexByte(authority(rest), '@'); at >= 0 {
		b.WriteString("***@")
		rest = rest[at+1:]
	}
	// Path: up to the query or fragment, or an escaped '?'.
	end := len(rest)
	if i := strings.IndexAny(rest, "?#"); i >= 0 {
		end = i
	}
	if i := strings.Index(strings.ToUpper(rest[:end]), "%3F"); i >= 0 {
		b.WriteString(rest[:i])
		b.WriteString("%3F...")
		return b.String()
	}
	b.WriteString(rest[:end])
	rest = rest[end:]
	if q, ok := strings.CutPrefix(rest, "?"); ok {
		q, _, _ = strings.Cut(q, "#")
		if onlyKeys(q, keep) {
			b.WriteString("?" + q)
		} else {
			b.WriteString("?...")
		}
	}
	if strings.Contains(rest, "#") {
		b.WriteString("#...")
	}
	return b.String()
}

// authority is s up to the first '/', '?' or '#'.
func authority(s string) string {
	if i := strings.IndexAny(s, "/?#"); i >= 0 {
		return s[:i]
	}
	return s
}

// schemeLen is the length of a leading "scheme:" (RFC 3986 letters), or 0.
func schemeLen(s string) int {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z':
		case i > 0 && (c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.'):
		case i > 0 && c == ':':
			return i + 1
		default:
			return 0
		}
	}
	return 0
}

// onlyKeys reports whether every parameter of the raw query q is named in
// keep (an empty query has none to hide).
func onlyKeys(q string, keep []string) bool {
	if q == "" {
		return true
	}
	for _, p := range strings.FieldsFunc(q, func(r rune) bool { return r == '&' || r == ';' }) {
		k, _, _ := strings.Cut(p, "=")
		found := false
		for _, kk := range keep {
			if k == kk {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
