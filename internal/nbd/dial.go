package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Options configure a client connection. The zero value is valid.
type Options struct {
	// TLSConfig verifies the server of a TLS target (nbds://, nbds+unix://):
	// its RootCAs must hold the CA that signed the server certificate, and
	// the certificate must carry the target's TLSHostname, its host, or
	// TLSConfig.ServerName. It must be nil for plain targets, so that asking
	// for TLS is never silently ignored.
	TLSConfig *tls.Config
	// MetaContexts are selected with NBD_OPT_SET_META_CONTEXT, e.g.
	// ContextBaseAllocation and ContextDirtyBitmap("backup-0"). The handshake
	// fails (errs.ErrNotFound) if the server does not grant every one.
	MetaContexts []string
	// MaxRequest caps the length of one READ or WRITE request (memory per
	// request). Zero means 32 MiB. The server's maximum block size is always
	// respected; longer calls are split.
	MaxRequest int
	// HandshakeTimeout bounds connecting and the handshake when ctx allows
	// longer (a server at its connection limit leaves a new connection in
	// its listen queue, unanswered). Zero means DefaultHandshakeTimeout;
	// negative, no limit beyond ctx.
	HandshakeTimeout time.Duration
	// IdleTimeout fails the connection (errs.ErrConnect) when requests are
	// in flight and the server sends nothing for this long, whatever the
	// callers' contexts allow. Zero means DefaultIdleTimeout; negative,
	// no limit.
	IdleTimeout time.Duration
}

// Defaults of Options.HandshakeTimeout and Options.IdleTimeout: generous
// (a 4 MiB read from a loaded host takes well under a second), but finite.
var (
	DefaultHandshakeTimeout = 60 * time.Second
	DefaultIdleTimeout      = 60 * time.Second
)

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// handshakeContext bounds ctx by the handshake timeout.
func handshakeContext(ctx context.Context, opts *Options) (context.Context, time.Duration, context.CancelFunc) {
	limit := orDefault(opts.HandshakeTimeout, DefaultHandshakeTimeout)
	if limit <= 0 {
		return ctx, 0, func() {}
	}
	hctx, cancel := context.WithTimeout(ctx, limit)
	return hctx, limit, cancel
}

// handshakeTimedOut is the error of a handshake that its own limit, not
// the caller's context, ended.
func handshakeTimedOut(ctx, hctx context.Context, peer string, limit time.Duration, err error) error {
	if err == nil || limit <= 0 || ctx.Err() != nil || !errors.Is(hctx.Err(), context.DeadlineExceeded) {
		return err
	}
	return connError(peer, fmt.Sprintf("no answer to the handshake within %s: the server is hung, or at its connection limit (QEMU's NBD server serves 100 at a time: use fewer connections)", limit), context.DeadlineExceeded)
}

// Dial connects to the target and performs the handshake. ctx bounds the
// connection and the handshake only.
func Dial(ctx context.Context, t Target, opts *Options) (*Client, error) {
	if opts == nil {
		opts = &Options{}
	}
	hctx, limit, cancel := handshakeContext(ctx, opts)
	defer cancel()
	conn, err := dialTarget(hctx, t)
	if err != nil {
		return nil, handshakeTimedOut(ctx, hctx, t.String(), limit, err)
	}
	c, err := NewClient(hctx, conn, t, opts)
	if err != nil {
		conn.Close()
		return nil, handshakeTimedOut(ctx, hctx, t.String(), limit, err)
	}
	return c, nil
}

// DialURI parses uri with ParseURI and dials it.
func DialURI(ctx context.Context, uri string, opts *Options) (*Client, error) {
	t, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return Dial(ctx, t, opts)
}

func dialTarget(ctx context.Context, t Target) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, t.Network, t.Address)
	if err != nil {
		return nil, connError(t.String(), "cannot connect", err)
	}
	return conn, nil
}

// NewClient performs the handshake on conn, an established connection to
// the server that t describes (t.Network and t.Address are used for TLS
// verification and messages only). On success the Client owns conn; on error
// the caller must close it.
func NewClient(ctx context.Context, conn net.Conn, t Target, opts *Options) (*Client, error) {
	if opts == nil {
		opts = &Options{}
	}
	peer := t.String()
	tlsConfig, err := clientTLSConfig(t, opts.TLSConfig)
	if err != nil {
		return nil, err
	}
	octx := ctx
	ctx, limit, cancel := handshakeContext(ctx, opts)
	defer cancel()
	stop := watchContext(ctx, conn)
	n := &negotiator{conn: conn, peer: peer, export: t.Export}
	c, err := negotiate(ctx, n, t.Export, tlsConfig, opts)
	if err = handshakeResult(ctx, peer, err, stop()); err != nil {
		return nil, handshakeTimedOut(octx, ctx, peer, limit, err)
	}
	c.idle = orDefault(opts.IdleTimeout, DefaultIdleTimeout)
	c.conn, c.peer, c.export = n.conn, peer, t.Export
	c.sendSem = make(chan struct{}, 1)
	c.inflight = map[uint64]*request{}
	c.readerDone = make(chan struct{})
	minBlock := int64(c.blockSizes.Min)
	c.maxLen = alignDown(0xffffffff, minBlock)
	maxIO := int64(defaultMaxBlockSize)
	if opts.MaxRequest > 0 {
		maxIO = int64(opts.MaxRequest)
	}
	c.maxIO = max(alignDown(min(maxIO, int64(c.blockSizes.Max), c.maxLen), minBlock), minBlock)
	go c.readLoop()
	if c.idle > 0 {
		go c.watchIdle()
	}
	return c, nil
}

func clientTLSConfig(t Target, cfg *tls.Config) (*tls.Config, error) {
	if !t.TLS {
		if cfg != nil {
			return nil, fmt.Errorf("nbd %s: a TLS configuration was given for a target without TLS; use nbds:// or nbds+unix:// (%w)", t, errs.ErrUsage)
		}
		return nil, nil
	}
	if cfg == nil {
		return nil, fmt.Errorf("nbd %s: TLS target needs a TLS configuration with the server's CA (%w)", t, errs.ErrUsage)
	}
	if cfg.InsecureSkipVerify {
		return nil, fmt.Errorf("nbd %s: TLS configuration must verify the server certificate (%w)", t, errs.ErrUsage)
	}
	cfg = cfg.Clone()
	if t.TLSHostname != "" {
		cfg.ServerName = t.TLSHostname
	}
	if cfg.ServerName == "" && t.Network == "tcp" {
		if host, _, err := net.SplitHostPort(t.Address); err == nil {
			cfg.ServerName = host
		}
	}
	if cfg.ServerName == "" {
		return nil, fmt.Errorf("nbd %s: no name to verify the server certificate against: add tls-hostname= to the URI or set ServerName (%w)", t, errs.ErrUsage)
	}
	return cfg, nil
}

func negotiate(ctx context.Context, n *negotiator, export string, tlsConfig *tls.Config, opts *Options) (*Client, error) {
	if err := n.greet(); err != nil {
		return nil, err
	}
	if tlsConfig != nil {
		if err := n.startTLS(ctx, tlsConfig); err != nil {
			return nil, err
		}
	}
	c := &Client{}
	if n.fixed {
		var err error
		if c.structured, err = n.structuredReplies(); err != nil {
			return nil, err
		}
	}
	if len(opts.MetaContexts) > 0 {
		if !c.structured {
			return nil, fmt.Errorf("nbd %s: server does not support structured replies, so block status (%s) cannot be queried: %w", n.peer, opts.MetaContexts[0], errs.ErrUnsupported)
		}
		var err error
		if c.contexts, err = n.setMetaContexts(export, opts.MetaContexts); err != nil {
			return nil, err
		}
	}
	info, err := n.goExport(export)
	if err != nil {
		return nil, err
	}
	c.size, c.flags = int64(info.size), info.flags
	c.blockSizes = BlockSizes{Min: 1, Preferred: 4096, Max: defaultMaxBlockSize}
	if info.haveBlock {
		c.blockSizes = info.blockSizes
	}
	return c, nil
}

// List connects to the server and returns the exports it lists
// (NBD_OPT_LIST). t.Export is ignored.
func List(ctx context.Context, t Target, opts *Options) ([]ExportInfo, error) {
	var out []ExportInfo
	err := inHandshake(ctx, t, opts, func(n *negotiator) (err error) {
		out, err = n.list()
		return err
	})
	return out, err
}

// ListMetaContexts connects to the server and returns the metadata contexts
// it offers for t.Export that match queries (e.g. "qemu:dirty-bitmap:" for
// every exported bitmap), or all contexts if there are none.
func ListMetaContexts(ctx context.Context, t Target, opts *Options, queries ...string) ([]string, error) {
	var out []string
	err := inHandshake(ctx, t, opts, func(n *negotiator) error {
		sr, err := n.structuredReplies()
		if err != nil {
			return err
		}
		if !sr {
			return nil // no structured replies: no metadata contexts
		}
		out, err = n.listMetaContexts(t.Export, queries)
		return err
	})
	return out, err
}

// inHandshake connects, greets (and starts TLS), runs fn during option
// haggling and ends with NBD_OPT_ABORT.
func inHandshake(ctx context.Context, t Target, opts *Options, fn func(*negotiator) error) (err error) {
	if opts == nil {
		opts = &Options{}
	}
	tlsConfig, err := clientTLSConfig(t, opts.TLSConfig)
	if err != nil {
		return err
	}
	octx := ctx
	ctx, limit, cancel := handshakeContext(ctx, opts)
	defer cancel()
	defer func() { err = handshakeTimedOut(octx, ctx, t.String(), limit, err) }()
	conn, err := dialTarget(ctx, t)
	if err != nil {
		return err
	}
	defer conn.Close()
	stop := watchContext(ctx, conn)
	n := &negotiator{conn: conn, peer: t.String(), export: t.Export}
	err = n.greet()
	if err == nil && !n.fixed {
		err = fmt.Errorf("nbd %s: server does not support fixed newstyle negotiation: %w", n.peer, errs.ErrUnsupported)
	}
	if err == nil && tlsConfig != nil {
		err = n.startTLS(ctx, tlsConfig)
	}
	if err == nil {
		err = fn(n)
	}
	if err == nil {
		n.abort()
	}
	return handshakeResult(ctx, n.peer, err, stop())
}

// handshakeResult is the outcome of a handshake that ended with err, given
// what stopping the context watch returned: when ctx ended, its error is
// the cause, whatever I/O error it provoked.
func handshakeResult(ctx context.Context, peer string, err, stopErr error) error {
	if stopErr == nil && err != nil && ctx.Err() != nil {
		stopErr = ctx.Err()
	}
	if stopErr != nil {
		return fmt.Errorf("nbd %s: handshake interrupted: %w", peer, stopErr)
	}
	return err
}
