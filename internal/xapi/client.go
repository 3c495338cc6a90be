// Package xapi is vmshadow's own client for the management API of XenServer
// and XCP-ng pools (XAPI), as documented in xapi-project/xen-api
// (doc/content/xen-api/wire-protocol.md and the datamodel in ocaml/idl):
//
//   - JSON-RPC 2.0 at POST /jsonrpc: positional params, the session
//     reference first; failures come as {"error":{"code":..,"message":
//     "<API error code>","data":[params...]}} and become an [*Error] that
//     wraps vmshadow's error class (errs.ErrAuth, errs.ErrNotFound, ...);
//   - sessions: session.login_with_password and session.logout;
//   - long calls through their Async.* forms and task polling ([Client.RunAsync]);
//   - the raw disk upload PUT /import_raw_vdi ([Client.ImportRaw]);
//   - the base64 bitmap of VDI.list_changed_blocks ([ParseChangedBlocks]).
//
// Secrets: the password is only sent in the login call, and the session
// reference (a bearer token while the session lives) is replaced by
// "<session>" in every error this package returns.
package xapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/redact"
)

// Config says how to reach and log in to a pool.
type Config struct {
	// URL is the pool master, e.g. https://pool-master or https://10.0.0.1:443.
	URL string
	// User and Password log in (session.login_with_password).
	User     string
	Password []byte
	// TLS verifies the server (RootCAs from --xapi-ca). Nil means the
	// system roots. InsecureSkipVerify must be asked for explicitly by the
	// caller (--insecure).
	TLS *tls.Config
	// CallTimeout bounds each JSON-RPC call; default 2 minutes. Long
	// operations go through RunAsync and are bounded by their context only.
	CallTimeout time.Duration
	// PollInterval is how often tasks are polled; default 500 ms.
	PollInterval time.Duration
}

// Originator is the name vmshadow gives itself at login (it appears in the
// pool's session list and audit log).
const Originator = "vmshadow"

// NullRef is XAPI's null reference.
const NullRef = "OpaqueRef:NULL"

// Client is a logged-in session. It is safe for concurrent use.
type Client struct {
	base     *url.URL
	http     *http.Client
	cfg      Config
	session  string
	password string // only to redact it from errors
	id       atomic.Int64
}

// Login connects to the pool and logs in. A host that is a pool member,
// not the master, is reported with the master's address (HOST_IS_SLAVE).
func Login(ctx context.Context, cfg Config) (*Client, error) {
	base, err := ParseURL(cfg.URL, cfg.TLS != nil && cfg.TLS.InsecureSkipVerify)
	if err != nil {
		return nil, err
	}
	if cfg.User == "" {
		return nil, fmt.Errorf("no XAPI user name: give --xapi-user: %w", errs.ErrUsage)
	}
	if len(cfg.Password) == 0 {
		return nil, fmt.Errorf("no XAPI password: set VMSHADOW_XAPI_PASSWORD or give --xapi-password-file: %w", errs.ErrUsage)
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = 2 * time.Minute
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = 500 * time.Millisecond
	}
	tlsConfig := cfg.TLS
	if tlsConfig == nil {
		tlsConfig = &tls.Config{}
	}
	tlsConfig = tlsConfig.Clone()
	if tlsConfig.MinVersion == 0 {
		tlsConfig.MinVersion = tls.VersionTLS12
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsConfig,
		TLSHandshakeTimeout:   30 * time.Second,
		ExpectContinueTimeout: time.Second,
		MaxIdleConnsPerHost:   4,
		ForceAttemptHTTP2:     false,
	}
	c := &Client{base: base, cfg: cfg, password: string(cfg.Password),
		http: &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
	var ref string
	err = c.rpc(ctx, "session.login_with_password", &ref, cfg.User, string(cfg.Password), "", Originator)
	if err != nil {
		tr.CloseIdleConnections()
		var xe *Error
		if errors.As(err, &xe) && xe.Code == "HOST_IS_SLAVE" && len(xe.Params) > 0 {
			return nil, fmt.Errorf("%s is a pool member, not the pool master: connect to the master (--xapi https://%s): %w",
				base.Host, xe.Params[0], errs.ErrUsage)
		}
		return nil, err
	}
	if ref == "" || ref == NullRef {
		tr.CloseIdleConnections()
		return nil, fmt.Errorf("XAPI %s: login returned no session: %w", base.Host, errs.ErrConnect)
	}
	c.session = ref
	return c, nil
}

// ParseURL checks a pool URL: https (http only when insecure is allowed),
// a host, nothing else but an optional port.
func ParseURL(s string, insecure bool) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("XAPI URL %q: want https://HOST[:PORT] (the pool master): %w", redact.URL(s), errs.ErrUsage)
	}
	switch {
	case u.Scheme == "https":
	case u.Scheme == "http" && insecure:
	case u.Scheme == "http":
		return nil, fmt.Errorf("XAPI URL %q: plain http would send the password unencrypted: use https (or --insecure): %w", redact.URL(s), errs.ErrUsage)
	default:
		return nil, fmt.Errorf("XAPI URL %q: scheme %q is not https: %w", redact.URL(s), u.Scheme, errs.ErrUsage)
	}
	if u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("XAPI URL %q: give only https://HOST[:PORT], without user, path or query: %w", redact.URL(s), errs.ErrUsage)
	}
	return &url.URL{Scheme: u.Scheme, Host: u.Host}, nil
}

// Host is the pool master's host[:port], for messages.
func (c *Client) Host() string { return c.base.Host }

// Logout ends the session; the client is unusable afterwards. NBD exports
// and uploads that use the session end with it.
func (c *Client) Logout(ctx context.Context) error {
	if c.session == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	err := c.rpc(ctx, "session.logout", nil, c.session)
	c.session = ""
	c.http.CloseIdleConnections()
	return err
}

// Call invokes method with the session reference and params, decoding the
// result into result (nil to ignore it).
func (c *Client) Call(ctx context.Context, method string, result any, params ...any) error {
	if c.session == "" {
		return fmt.Errorf("XAPI %s: %s: not logged in: %w", c.base.Host, method, errs.ErrAuth)
	}
	return c.rpc(ctx, method, result, append([]any{c.session}, params...)...)
}

type rpcRequest struct {
	JSONRPC string `json:"jsonrpc"`
	Method  string `json:"method"`
	Params  []any  `json:"params"`
	ID      int64  `json:"id"`
}

type rpcResponse struct {
	JSONRPC string          `json:"jsonrpc"`
	Result  json.RawMessage `json:"result"`
	Error   *struct {
		Code    json.RawMessage `json:"code"`
		Message string          `json:"message"`
		Data    []any           `json:"data"`
	} `json:"error"`
	ID json.RawMessage `json:"id"`
}

// maxResponse bounds a JSON-RPC response (a get_all_records of a large
// pool is a few MiB).
const maxResponse = 64 << 20

func (c *Client) rpc(parent context.Context, method string, result any, params ...any) error {
	ctx, cancel := context.WithTimeout(parent, c.cfg.CallTimeout)
	defer cancel()
	id := c.id.Add(1)
	body, err := json.Marshal(rpcRequest{JSONRPC: "2.0", Method: method, Params: params, ID: id})
	if err != nil {
		return fmt.Errorf("XAPI %s: encode %s: %w", c.base.Host, method, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base.String()+"/jsonrpc", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", Originator)
	resp, err := c.http.Do(req)
	if err != nil {
		return c.transportError(parent, method, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return c.transportError(parent, method, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("XAPI %s: %s: HTTP %s: %s: %w", c.base.Host, method, resp.Status, c.redact(snippet(data)), errs.ErrConnect)
	}
	if len(data) > maxResponse {
		return fmt.Errorf("XAPI %s: %s: response larger than %d bytes: %w", c.base.Host, method, maxResponse, errs.ErrConnect)
	}
	var r rpcResponse
	if err := json.Unmarshal(data, &r); err != nil {
		return fmt.Errorf("XAPI %s: %s: response is not JSON-RPC (%v): %s: %w", c.base.Host, method, err, c.redact(snippet(data)), errs.ErrConnect)
	}
	if string(r.ID) != fmt.Sprint(id) {
		return fmt.Errorf("XAPI %s: %s: response id %s does not match request id %d: %w", c.base.Host, method, snippet(r.ID), id, errs.ErrConnect)
	}
	if r.Error != nil {
		e := &Error{Method: method, Host: c.base.Host, Code: r.Error.Message}
		for _, p := range r.Error.Data {
			s, ok := p.(string)
			if !ok {
				b, _ := json.Marshal(p)
				s = string(b)
			}
			e.Params = append(e.Params, c.redact(s))
		}
		if e.Code == "" {
			e.Code = "UNKNOWN_ERROR"
		}
		return e
	}
	if result == nil {
		return nil
	}
	if len(r.Result) == 0 {
		return fmt.Errorf("XAPI %s: %s: response has neither result nor error: %w", c.base.Host, method, errs.ErrConnect)
	}
	if err := json.Unmarshal(r.Result, result); err != nil {
		return fmt.Errorf("XAPI %s: %s: unexpected result (%v): %s: %w", c.base.Host, method, err, c.redact(snippet(r.Result)), errs.ErrConnect)
	}
	return nil
}

// transportError explains a failed HTTP exchange without the URL (which
// may hold the session) and with the class of failure. ctx is the caller's
// context: when it ended, its error is returned.
func (c *Client) transportError(ctx context.Context, what string, err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	msg := c.redact(err.Error())
	if ctx.Err() != nil {
		return fmt.Errorf("XAPI %s: %s: %w", c.base.Host, what, ctx.Err())
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("XAPI %s: %s: no answer within %s: %w", c.base.Host, what, c.cfg.CallTimeout, errs.ErrConnect)
	}
	var certErr *tls.CertificateVerificationError
	var unknownAuth x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	if errors.As(err, &certErr) || errors.As(err, &unknownAuth) || errors.As(err, &hostErr) {
		return fmt.Errorf("XAPI %s: TLS certificate of the pool master not trusted (%s): give its CA or certificate with --xapi-ca FILE (or --insecure to skip verification): %w",
			c.base.Host, msg, errs.ErrConnect)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || strings.Contains(msg, "connection reset") || strings.Contains(msg, "broken pipe") {
		return fmt.Errorf("XAPI %s: %s: the host dropped the connection (%s): %w", c.base.Host, what, msg, errs.ErrConnect)
	}
	return fmt.Errorf("XAPI %s: %s: %s: %w", c.base.Host, what, msg, errs.ErrConnect)
}

func (c *Client) redact(s string) string {
	if c.session != "" {
		s = strings.ReplaceAll(s, c.session, "<session>")
		s = strings.ReplaceAll(s, url.QueryEscape(c.session), "<session>")
	}
	if c.password != "" {
		s = strings.ReplaceAll(s, c.password, "<password>")
	}
	return s
}

func snippet(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return strings.Map(func(r rune) rune {
		if r < 32 || r == 127 {
			return ' '
		}
		return r
	}, s)
}
