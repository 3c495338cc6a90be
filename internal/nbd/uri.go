package nbd

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/redact"
)

// DefaultPort is the IANA-assigned NBD port.
const DefaultPort = 10809

// Target says where an export is and how to reach it.
type Target struct {
	Network string // "tcp" or "unix"
	Address string // host:port for tcp, the socket path for unix
	Export  string // export name ("" is the server's default export)
	// TLS requires NBD_OPT_STARTTLS and a verified server certificate
	// (nbds:// and nbds+unix:// URIs). Options.TLSConfig must then be set.
	TLS bool
	// TLSHostname is the name the server certificate must carry. Empty means
	// the host of Address (tcp) or Options.TLSConfig.ServerName.
	TLSHostname string
}

// ParseURI parses an NBD URI as qemu-img and libnbd accept them
// (NetworkBlockDevice/nbd doc/uri.md):
//
//	nbd://host[:port]/export            nbd+tcp:// is the same
//	nbds://host[:port]/export           TLS required
//	nbd+unix:///export?socket=/path     nbds+unix:// with TLS
//	nbd:unix:/path[:exportname=NAME]    QEMU's legacy form
//	nbd:host:port[:exportname=NAME]     QEMU's legacy form
//
// Query parameters: socket (unix schemes), tls-hostname and tls-verify-peer=1
// (TLS schemes). Anything else is an error, as is a URI that would silently
// mean something else than intended (host with a unix socket, socket with
// tcp, user info, fragments). Errors wrap errs.ErrUsage.
func ParseURI(s string) (Target, error) {
	bad := func(format string, a ...any) (Target, error) {
		return Target{}, fmt.Errorf("invalid NBD URI %q: %s (%w)", redactURI(s), fmt.Sprintf(format, a...), errs.ErrUsage)
	}
	if rest, ok := strings.CutPrefix(s, "nbd:"); ok && !strings.HasPrefix(rest, "//") {
		return parseLegacy(rest, bad)
	}
	u, err := url.Parse(s)
	if err != nil {
		return bad("%v", unwrapURLError(err))
	}
	var t Target
	switch u.Scheme {
	case "nbd", "nbd+tcp":
		t.Network = "tcp"
	case "nbds", "nbds+tcp":
		t.Network, t.TLS = "tcp", true
	case "nbd+unix":
		t.Network = "unix"
	case "nbds+unix":
		t.Network, t.TLS = "unix", true
	case "":
		return bad("no scheme; want nbd://, nbds://, nbd+unix:// or nbds+unix://")
	default:
		return bad("scheme %q is not an NBD scheme (nbd, nbds, nbd+unix, nbds+unix)", u.Scheme)
	}
	if u.Opaque != "" {
		return bad("want %s://HOST/EXPORT or %s:///EXPORT?socket=PATH", u.Scheme, u.Scheme)
	}
	if u.User != nil {
		return bad("user names are not supported")
	}
	if u.Fragment != "" || strings.Contains(s, "#") {
		return bad("fragments (#...) are not allowed")
	}
	t.Export = strings.TrimPrefix(u.Path, "/")
	if strings.ContainsRune(t.Export, 0) {
		return bad("export name contains a NUL byte")
	}
	if len(t.Export) > maxStringLen {
		return bad("export name is %d bytes, more than %d", len(t.Export), maxStringLen)
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return bad("query: %v", err)
	}
	for k, v := range q {
		if len(v) != 1 {
			return bad("query parameter %q given %d times", k, len(v))
		}
		switch k {
		case "socket":
			if t.Network != "unix" {
				return bad("socket= is only valid with nbd+unix:// or nbds+unix://")
			}
		case "tls-hostname", "tls-verify-peer", "tls-type":
			if !t.TLS {
				return bad("%s is only valid with nbds:// or nbds+unix://", k)
			}
		default:
			return bad("unknown query parameter %q (known: socket, tls-hostname, tls-verify-peer, tls-type)", k)
		}
	}
	if v := q.Get("tls-verify-peer"); v != "" && v != "1" {
		return bad("tls-verify-peer=%s: the server certificate is always verified", v)
	}
	if v := q.Get("tls-type"); v != "" && v != "x509" {
		return bad("tls-type=%s: only x509 is supported", v)
	}
	t.TLSHostname = q.Get("tls-hostname")
	switch t.Network {
	case "tcp":
		host, port := u.Hostname(), u.Port()
		if host == "" {
			return bad("no host; want %s://HOST[:PORT]/EXPORT", u.Scheme)
		}
		if strings.HasSuffix(u.Host, ":") {
			return bad("empty port")
		}
		if port == "" {
			port = strconv.Itoa(DefaultPort)
		} else if err := checkPort(port); err != nil {
			return bad("%v", err)
		}
		if t.Address, err = joinHostPort(host, port); err != nil {
			return bad("%v", err)
		}
	case "unix":
		if u.Host != "" {
			return bad("a unix socket URI has no host: want %s:///EXPORT?socket=PATH", u.Scheme)
		}
		t.Address = q.Get("socket")
		if t.Address == "" {
			return bad("missing socket=PATH")
		}
	}
	return t, nil
}

// parseLegacy parses what follows "nbd:" in QEMU's legacy syntax.
func parseLegacy(rest string, bad func(string, ...any) (Target, error)) (Target, error) {
	t := Target{Network: "tcp"}
	if i := strings.Index(rest, ":exportname="); i >= 0 {
		rest, t.Export = rest[:i], rest[i+len(":exportname="):]
	}
	if strings.ContainsRune(t.Export, 0) || len(t.Export) > maxStringLen {
		return bad("export name contains a NUL byte or is longer than %d bytes", maxStringLen)
	}
	if path, ok := strings.CutPrefix(rest, "unix:"); ok {
		if path == "" {
			return bad("missing socket path after nbd:unix:")
		}
		t.Network, t.Address = "unix", path
		return t, nil
	}
	host, port, err := net.SplitHostPort(rest)
	if err != nil || host == "" {
		return bad("want nbd:HOST:PORT[:exportname=NAME] or nbd:unix:PATH[:exportname=NAME]")
	}
	if err := checkPort(port); err != nil {
		return bad("%v", err)
	}
	if t.Address, err = joinHostPort(host, port); err != nil {
		return bad("%v", err)
	}
	return t, nil
}

// joinHostPort makes a TCP address, checking that the host is one that
// reads back the same in an nbd:// URI.
func joinHostPort(host, port string) (string, error) {
	addr := net.JoinHostPort(host, port)
	if u, err := url.Parse("nbd://" + addr + "/"); err != nil || u.Hostname() != host {
		return "", fmt.Errorf("invalid host %q", host)
	}
	return addr, nil
}

func checkPort(p string) error {
	n, err := strconv.Atoi(p)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not a number from 1 to 65535", p)
	}
	return nil
}

func unwrapURLError(err error) error {
	if ue, ok := err.(*url.Error); ok {
		return ue.Err
	}
	return err
}

// String gives the target as a URI, with anything after a '?' in the export
// name (XenServer puts the session reference there) replaced by "...", so it
// can go into logs and errors.
func (t Target) String() string {
	scheme := "nbd"
	if t.TLS {
		scheme = "nbds"
	}
	export := (&url.URL{Path: "/" + redactExport(t.Export)}).EscapedPath()
	if t.Network == "unix" {
		return scheme + "+unix://" + export + "?socket=" + url.QueryEscape(t.Address)
	}
	return scheme + "://" + t.Address + export
}

// redactExport hides what may be a secret in an export name.
func redactExport(name string) string {
	if i := strings.IndexByte(name, '?'); i >= 0 {
		return name[:i] + "?..."
	}
	return name
}

// redactIn hides a secret export name where a peer's message repeats it.
func redactIn(msg, export string) string {
	if red := redactExport(export); red != export {
		return strings.ReplaceAll(msg, export, red)
	}
	return msg
}

// redactURI hides user info, a query other than the URI's own parameters,
// and an escaped '?' in the export path (XenServer puts a session reference
// there) in a URI that failed to parse.
func redactURI(s string) string {
	return redact.URL(s, "socket", "tls-hostname", "tls-verify-peer", "tls-type")
}
