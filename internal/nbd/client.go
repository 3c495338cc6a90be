package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
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
}

// Extent is a range of the export with the status flags one metadata
// context gives it (StateHole/StateZero for base:allocation, StateDirty for
// a dirty bitmap).
type Extent struct {
	Offset int64
	Length int64
	Flags  uint32
}

// End is the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// Client is one connection to an export in the transmission phase.
//
// A Client is safe for concurrent use: every call sends its own request and
// waits for its reply, so many calls run in flight at once on the one
// connection. Every call takes a context; when it is done the call returns
// its error at once and the reply, when it comes, is discarded.
//
// Errors: a *ServerError is the server's refusal of one request and leaves
// the connection usable. Anything else (a *ProtocolError, a broken
// connection, ErrClosed) ends the connection: every call in flight and every
// later call fails with that same error.
type Client struct {
	conn       net.Conn
	peer       string
	size       int64
	flags      TransmissionFlags
	blockSizes BlockSizes
	structured bool
	contexts   map[string]uint32
	maxIO      int64 // longest READ/WRITE/WRITE_ZEROES request
	maxLen     int64 // longest request of other kinds (32-bit length, aligned)

	sendSem chan struct{} // one request is written at a time
	hdr     [requestHeaderLen]byte

	mu       sync.Mutex
	inflight map[uint64]*request
	cookie   uint64
	err      error // once set, the connection is finished and calls fail with it
	closing  bool

	busy       atomic.Int64 // bytes of reads and writes in flight, for Pool
	readerDone chan struct{}
}

// request is one request in flight.
type request struct {
	cmd    uint16
	off    uint64
	length uint64
	done   chan struct{}
	err    error // set before done is closed

	// READ: the reader goroutine writes buf while holding mu; a caller that
	// gives up sets abandoned under mu, after which buf is not touched.
	buf       []byte
	mu        sync.Mutex
	abandoned bool
	spans     []span // structured READ: ranges received, merged
	received  uint64

	// BLOCK_STATUS
	ctxID   uint32
	seen    []uint32 // context IDs answered
	extents []Extent
}

type span struct{ start, end uint64 }

// cancelGrace is how long a cancelled call waits for the server to finish
// sending the chunk of data it is in the middle of, before the connection is
// closed so the call can return.
const cancelGrace = 2 * time.Second

// closeTimeout bounds how long Close waits for the server to finish the
// requests in flight after NBD_CMD_DISC.
const closeTimeout = 5 * time.Second

// readWindow is the number of requests one call keeps in flight when it has
// to be split.
const readWindow = 64

// Dial connects to the target and performs the handshake. ctx bounds the
// connection and the handshake only.
func Dial(ctx context.Context, t Target, opts *Options) (*Client, error) {
	conn, err := dialTarget(ctx, t)
	if err != nil {
		return nil, err
	}
	c, err := NewClient(ctx, conn, t, opts)
	if err != nil {
		conn.Close()
		return nil, err
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
// the caller still does.
func NewClient(ctx context.Context, conn net.Conn, t Target, opts *Options) (*Client, error) {
	if opts == nil {
		opts = &Options{}
	}
	peer := t.String()
	tlsConfig, err := clientTLSConfig(t, opts.TLSConfig)
	if err != nil {
		return nil, err
	}
	stop := watchContext(ctx, conn)
	n := &negotiator{conn: conn, peer: peer}
	c, err := negotiate(ctx, n, t.Export, tlsConfig, opts)
	if err = handshakeResult(ctx, peer, err, stop()); err != nil {
		if n.conn != conn {
			n.conn.Close() // the TLS connection; conn stays the caller's
		}
		return nil, err
	}
	c.conn, c.peer = n.conn, peer
	c.sendSem = make(chan struct{}, 1)
	c.inflight = map[uint64]*request{}
	c.readerDone = make(chan struct{})
	c.maxLen = alignDown(0xffffffff, int64(c.blockSizes.Min))
	c.maxIO = min(int64(c.blockSizes.Max), defaultMaxBlockSize, c.maxLen)
	if opts.MaxRequest > 0 {
		c.maxIO = min(int64(c.blockSizes.Max), int64(opts.MaxRequest), c.maxLen)
	}
	c.maxIO = max(alignDown(c.maxIO, int64(c.blockSizes.Min)), int64(c.blockSizes.Min))
	go c.readLoop()
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
func inHandshake(ctx context.Context, t Target, opts *Options, fn func(*negotiator) error) error {
	if opts == nil {
		opts = &Options{}
	}
	tlsConfig, err := clientTLSConfig(t, opts.TLSConfig)
	if err != nil {
		return err
	}
	conn, err := dialTarget(ctx, t)
	if err != nil {
		return err
	}
	defer conn.Close()
	stop := watchContext(ctx, conn)
	n := &negotiator{conn: conn, peer: t.String()}
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
	err = handshakeResult(ctx, n.peer, err, stop())
	if n.conn != conn {
		n.conn.Close()
	}
	return err
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

// Size is the export size in bytes.
func (c *Client) Size() int64 { return c.size }

// Flags are the export's transmission flags.
func (c *Client) Flags() TransmissionFlags { return c.flags }

// BlockSizes are the server's size constraints (defaults if it sent none).
func (c *Client) BlockSizes() BlockSizes { return c.blockSizes }

// StructuredReplies reports whether structured replies were negotiated.
func (c *Client) StructuredReplies() bool { return c.structured }

// MetaContexts lists the selected metadata contexts, sorted.
func (c *Client) MetaContexts() []string {
	names := make([]string, 0, len(c.contexts))
	for n := range c.contexts {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// String names the server and export (with secrets redacted).
func (c *Client) String() string { return c.peer }

// Err returns the error that ended the connection, or nil while it is
// usable.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// ReadAt reads len(p) bytes at off, like io.ReaderAt: it returns n <
// len(p) only with an error, io.EOF when the read reaches the end of the
// export. off and len(p) must be multiples of the minimum block size (except
// at the end of the export). Long reads are split into requests no longer
// than the maximum request size, kept in flight together.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("nbd %s: read at negative offset %d (%w)", c.peer, off, errs.ErrUsage)
	}
	if off >= c.size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	n := min(int64(len(p)), c.size-off)
	if err := c.checkAligned("read", off, n); err != nil {
		return 0, err
	}
	c.busy.Add(n)
	defer c.busy.Add(-n)
	err := c.pipeline(ctx, off, n, c.maxIO, func(o, l int64) *request {
		return &request{cmd: cmdRead, off: uint64(o), length: uint64(l), buf: p[o-off : o-off+l]}
	}, nil)
	if err != nil {
		return 0, err
	}
	if n < int64(len(p)) {
		return int(n), io.EOF
	}
	return int(n), nil
}

// WriteAt writes p at off. The range must lie within the export and be
// aligned to the minimum block size. Writing to a read-only export is an
// error wrapping errs.ErrUnsupported.
func (c *Client) WriteAt(ctx context.Context, p []byte, off int64) (int, error) {
	if err := c.checkWrite("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	c.busy.Add(int64(len(p)))
	defer c.busy.Add(-int64(len(p)))
	err := c.pipeline(ctx, off, int64(len(p)), c.maxIO, func(o, l int64) *request {
		return &request{cmd: cmdWrite, off: uint64(o), length: uint64(l)}
	}, func(o, l int64) []byte { return p[o-off : o-off+l] })
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteZeroes makes [off, off+length) read as zeroes. With punch the server
// may deallocate the range; without, it must stay allocated. Servers that do
// not support NBD_CMD_WRITE_ZEROES are sent zeroes with NBD_CMD_WRITE.
func (c *Client) WriteZeroes(ctx context.Context, off, length int64, punch bool) error {
	if err := c.checkWrite("write zeroes", off, length); err != nil {
		return err
	}
	if !c.flags.Has(FlagSendWriteZeroes) {
		zeroes := make([]byte, min(length, c.maxIO))
		return c.pipeline(ctx, off, length, c.maxIO, func(o, l int64) *request {
			return &request{cmd: cmdWrite, off: uint64(o), length: uint64(l)}
		}, func(o, l int64) []byte { return zeroes[:l] })
	}
	var flags uint16
	if !punch {
		flags = cmdFlagNoHole
	}
	return c.pipeline(ctx, off, length, c.maxIO, func(o, l int64) *request {
		return &request{cmd: cmdWriteZeroes, off: uint64(o), length: uint64(l)}
	}, nil, flags)
}

// Trim tells the server [off, off+length) is no longer needed. The range's
// contents are undefined afterwards. Trim is a hint: it does nothing if the
// server does not support NBD_CMD_TRIM.
func (c *Client) Trim(ctx context.Context, off, length int64) error {
	if err := c.checkWrite("trim", off, length); err != nil {
		return err
	}
	if !c.flags.Has(FlagSendTrim) {
		return nil
	}
	return c.pipeline(ctx, off, length, c.maxLen, func(o, l int64) *request {
		return &request{cmd: cmdTrim, off: uint64(o), length: uint64(l)}
	}, nil)
}

// Flush makes every write the server has replied to durable. It does
// nothing if the server does not advertise NBD_FLAG_SEND_FLUSH (it has no
// cache the client could flush).
func (c *Client) Flush(ctx context.Context) error {
	if !c.flags.Has(FlagSendFlush) {
		return nil
	}
	req := &request{cmd: cmdFlush}
	if err := c.start(ctx, req, 0, nil); err != nil {
		return err
	}
	return c.wait(ctx, req)
}

// BlockStatus sends one NBD_CMD_BLOCK_STATUS for [off, off+length) and
// returns the extents the server reported for the metadata context name,
// merged where adjacent extents have the same flags. They start at off and
// are contiguous; they may end before off+length (servers may describe less
// than asked), never after. name must be one of Options.MetaContexts.
func (c *Client) BlockStatus(ctx context.Context, name string, off, length int64) ([]Extent, error) {
	id, ok := c.contexts[name]
	if !ok {
		return nil, fmt.Errorf("nbd %s: metadata context %q was not selected when connecting; add it to Options.MetaContexts (%w)", c.peer, name, errs.ErrUsage)
	}
	if off < 0 || length <= 0 || off >= c.size {
		return nil, fmt.Errorf("nbd %s: block status of %d bytes at offset %d is outside the export of %d bytes (%w)", c.peer, length, off, c.size, errs.ErrUsage)
	}
	length = min(length, c.size-off, c.maxLen)
	if err := c.checkAligned("block status", off, length); err != nil {
		return nil, err
	}
	req := &request{cmd: cmdBlockStatus, off: uint64(off), length: uint64(length), ctxID: id}
	if err := c.start(ctx, req, 0, nil); err != nil {
		return nil, err
	}
	if err := c.wait(ctx, req); err != nil {
		return nil, err
	}
	return req.extents, nil
}

// Extents walks the extents of metadata context name over [off, off+length)
// (clipped to the export), one NBD_CMD_BLOCK_STATUS at a time, so memory
// stays bounded whatever the size of the export. Adjacent extents with equal
// flags are merged. On error the iterator yields it once and stops; breaking
// out of the loop stops the walk.
func (c *Client) Extents(ctx context.Context, name string, off, length int64) func(yield func(Extent, error) bool) {
	return walkExtents(ctx, c.BlockStatus, name, off, min(length, c.size-off))
}

func walkExtents(ctx context.Context, bs func(context.Context, string, int64, int64) ([]Extent, error), name string, off, length int64) func(yield func(Extent, error) bool) {
	return func(yield func(Extent, error) bool) {
		end := off + length
		var pending Extent
		for pos := off; pos < end; {
			exts, err := bs(ctx, name, pos, end-pos)
			if err != nil {
				yield(Extent{}, err)
				return
			}
			for _, e := range exts {
				if pending.Length > 0 && pending.Flags == e.Flags {
					pending.Length += e.Length
					continue
				}
				if pending.Length > 0 && !yield(pending, nil) {
					return
				}
				pending = e
			}
			pos = exts[len(exts)-1].End()
		}
		if pending.Length > 0 {
			yield(pending, nil)
		}
	}
}

func (c *Client) checkAligned(op string, off, length int64) error {
	m := int64(c.blockSizes.Min)
	if off%m != 0 || (length%m != 0 && off+length != c.size) {
		return fmt.Errorf("nbd %s: %s of %d bytes at offset %d is not aligned to the server's minimum block size %d (%w)", c.peer, op, length, off, m, errs.ErrUsage)
	}
	return nil
}

func (c *Client) checkWrite(op string, off, length int64) error {
	if c.flags.Has(FlagReadOnly) {
		return fmt.Errorf("nbd %s: %s: the export is read-only (%w)", c.peer, op, errs.ErrUnsupported)
	}
	if off < 0 || length < 0 || off > c.size || length > c.size-off {
		return fmt.Errorf("nbd %s: %s of %d bytes at offset %d is outside the export of %d bytes (%w)", c.peer, op, length, off, c.size, errs.ErrUsage)
	}
	return c.checkAligned(op, off, length)
}

// pipeline issues the requests mk makes for consecutive pieces of [off,
// off+length), each at most maxLen long, keeping up to readWindow in flight,
// and waits for all of them. payload gives the data of a WRITE piece.
func (c *Client) pipeline(ctx context.Context, off, length, maxLen int64, mk func(o, l int64) *request, payload func(o, l int64) []byte, flags ...uint16) error {
	var fl uint16
	for _, f := range flags {
		fl |= f
	}
	var queue []*request
	defer func() { // on early return nothing may still write into the caller's buffers
		for _, r := range queue {
			c.abandon(r)
		}
	}()
	for pos, end := off, off+length; pos < end || len(queue) > 0; {
		if pos < end && len(queue) < readWindow {
			l := min(maxLen, end-pos)
			req := mk(pos, l)
			var data []byte
			if payload != nil {
				data = payload(pos, l)
			}
			if err := c.start(ctx, req, fl, data); err != nil {
				return err
			}
			queue = append(queue, req)
			pos += l
			continue
		}
		err := c.wait(ctx, queue[0])
		queue = queue[1:]
		if err != nil {
			return err
		}
	}
	return nil
}

// start registers req and sends it. If sending fails part-way the stream is
// broken and the connection is closed.
func (c *Client) start(ctx context.Context, req *request, flags uint16, payload []byte) error {
	req.done = make(chan struct{})
	select {
	case c.sendSem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.sendSem }()
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	if err := ctx.Err(); err != nil {
		c.mu.Unlock()
		return err
	}
	c.cookie++
	cookie := c.cookie
	c.inflight[cookie] = req
	c.mu.Unlock()

	putRequestHeader(c.hdr[:], requestHeader{flags: flags, typ: req.cmd, cookie: cookie, offset: req.off, length: uint32(req.length)})
	var stop func() bool
	var fired chan struct{}
	if ctx.Done() != nil {
		fired = make(chan struct{})
		stop = context.AfterFunc(ctx, func() {
			_ = c.conn.SetWriteDeadline(aLongTimeAgo)
			close(fired)
		})
	}
	var err error
	if payload == nil {
		_, err = c.conn.Write(c.hdr[:])
	} else {
		bufs := net.Buffers{c.hdr[:], payload}
		_, err = bufs.WriteTo(c.conn)
	}
	if stop != nil && !stop() {
		<-fired
		_ = c.conn.SetWriteDeadline(time.Time{})
	}
	if err != nil {
		what := "sending " + cmdName(req.cmd) + " failed"
		if ctx.Err() != nil {
			what = "sending " + cmdName(req.cmd) + " was cancelled part-way, which leaves the stream unusable"
			err = ctx.Err()
		}
		c.fail(connError(c.peer, what, err))
		return c.Err()
	}
	return nil
}

// wait waits for req's reply. If ctx ends first, req is abandoned.
func (c *Client) wait(ctx context.Context, req *request) error {
	select {
	case <-req.done:
		return req.err
	case <-ctx.Done():
		c.abandon(req)
		return ctx.Err()
	}
}

// abandon makes sure the reader goroutine no longer writes into req.buf. If
// it is in the middle of doing so and the server does not finish the chunk
// within cancelGrace, the connection is closed.
func (c *Client) abandon(req *request) {
	if !req.mu.TryLock() {
		t := time.AfterFunc(cancelGrace, func() {
			c.fail(connError(c.peer, "the server stalled while sending data for a cancelled request", context.Canceled))
		})
		req.mu.Lock()
		t.Stop()
	}
	req.abandoned = true
	req.mu.Unlock()
}

// fail ends the connection with err (the first error wins).
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.conn.Close()
}

// Close ends the connection: new calls fail with ErrClosed, NBD_CMD_DISC is
// sent, the calls in flight get their replies if the server sends them
// within a few seconds and ErrClosed otherwise. Close is safe to call more
// than once and concurrently with other calls.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.readerDone
		return nil
	}
	c.closing = true
	alive := c.err == nil
	if alive {
		c.err = ErrClosed
	}
	c.mu.Unlock()
	if alive {
		timer := time.NewTimer(closeTimeout)
		defer timer.Stop()
		select {
		case c.sendSem <- struct{}{}:
			putRequestHeader(c.hdr[:], requestHeader{typ: cmdDisc})
			_ = c.conn.SetWriteDeadline(time.Now().Add(closeTimeout))
			_, err := c.conn.Write(c.hdr[:])
			<-c.sendSem
			if err == nil {
				select {
				case <-c.readerDone:
				case <-timer.C:
				}
			}
		case <-timer.C: // a request is stuck being sent: give up on a clean disconnect
		}
	}
	c.conn.Close()
	<-c.readerDone
	return nil
}

// ---- the reader goroutine ----

// readLoop reads replies and completes their requests until the connection
// ends, then fails whatever is still in flight.
func (c *Client) readLoop() {
	r := &replyReader{c: c, br: bufio.NewReaderSize(c.conn, 64<<10)}
	err := r.run()
	var pe *ProtocolError
	switch {
	case errors.As(err, &pe):
		c.fail(err)
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET):
		c.fail(connError(c.peer, "server closed the connection", err))
	default:
		c.fail(connError(c.peer, "connection broken", err))
	}
	c.mu.Lock()
	reqs := c.inflight
	c.inflight = nil
	err = c.err
	c.mu.Unlock()
	for _, req := range reqs {
		req.err = err
		close(req.done)
	}
	close(c.readerDone)
}

// replyReader parses the reply stream. All its methods run on the reader
// goroutine.
type replyReader struct {
	c       *Client
	br      *bufio.Reader
	hdr     [structuredReplyLen]byte
	scratch []byte
}

func (r *replyReader) protoErr(format string, a ...any) error {
	return &ProtocolError{Peer: r.c.peer, Msg: fmt.Sprintf(format, a...)}
}

func (r *replyReader) run() error {
	for {
		if _, err := io.ReadFull(r.br, r.hdr[:4]); err != nil {
			return err
		}
		switch m := binary.BigEndian.Uint32(r.hdr[:]); m {
		case magicSimpleReply:
			if _, err := io.ReadFull(r.br, r.hdr[4:simpleReplyLen]); err != nil {
				return err
			}
			errno := Errno(binary.BigEndian.Uint32(r.hdr[4:]))
			cookie := binary.BigEndian.Uint64(r.hdr[8:])
			req, err := r.lookup(cookie, "simple reply")
			if err != nil {
				return err
			}
			if err := r.simpleReply(cookie, req, errno); err != nil {
				return err
			}
		case magicStructuredReply:
			if _, err := io.ReadFull(r.br, r.hdr[4:structuredReplyLen]); err != nil {
				return err
			}
			h := parseChunkHeader(r.hdr[4:])
			if !r.c.structured {
				return r.protoErr("structured reply chunk, but structured replies were not negotiated")
			}
			req, err := r.lookup(h.cookie, chunkName(h.typ))
			if err != nil {
				return err
			}
			if err := r.chunk(req, h); err != nil {
				return err
			}
		case magicExtendedReply:
			return r.protoErr("extended header reply, but extended headers were not negotiated")
		default:
			return r.protoErr("bad reply magic 0x%08x", m)
		}
	}
}

func (r *replyReader) lookup(cookie uint64, what string) (*request, error) {
	r.c.mu.Lock()
	req := r.c.inflight[cookie]
	r.c.mu.Unlock()
	if req == nil {
		return nil, r.protoErr("%s for cookie %d, which has no request in flight", what, cookie)
	}
	return req, nil
}

func (r *replyReader) complete(cookie uint64, req *request) {
	r.c.mu.Lock()
	delete(r.c.inflight, cookie)
	r.c.mu.Unlock()
	close(req.done)
}

func (r *replyReader) serverError(req *request, ec errorChunk) *ServerError {
	e := &ServerError{Peer: r.c.peer, Op: opName(req.cmd), Offset: int64(req.off), Length: int64(req.length),
		Errno: ec.errno, Message: ec.message, ErrorOffset: -1}
	if ec.hasOffset {
		e.ErrorOffset = int64(ec.offset)
	}
	return e
}

func (r *replyReader) simpleReply(cookie uint64, req *request, errno Errno) error {
	switch {
	case errno != 0:
		req.err = r.serverError(req, errorChunk{errno: errno})
	case req.cmd == cmdRead && r.c.structured:
		return r.protoErr("simple reply to NBD_CMD_READ (cookie %d) although structured replies were negotiated", cookie)
	case req.cmd == cmdBlockStatus:
		return r.protoErr("simple reply without error to NBD_CMD_BLOCK_STATUS (cookie %d)", cookie)
	case req.cmd == cmdRead:
		if err := r.data(req, 0, req.length); err != nil {
			return err
		}
	}
	r.complete(cookie, req)
	return nil
}

// data reads n bytes of the reply stream into req.buf at offset at, or
// discards them if the caller has given up.
func (r *replyReader) data(req *request, at, n uint64) error {
	req.mu.Lock()
	defer req.mu.Unlock()
	if req.abandoned {
		_, err := io.CopyN(io.Discard, r.br, int64(n))
		return err
	}
	_, err := io.ReadFull(r.br, req.buf[at:at+n])
	return err
}

// payload reads a chunk payload of n bytes into the scratch buffer.
func (r *replyReader) payload(n uint32) ([]byte, error) {
	if cap(r.scratch) < int(n) {
		r.scratch = make([]byte, n)
	}
	p := r.scratch[:n]
	_, err := io.ReadFull(r.br, p)
	return p, err
}

func (r *replyReader) chunk(req *request, h chunkHeader) error {
	done := h.flags&replyFlagDone != 0
	what := fmt.Sprintf("%s for %s (cookie %d)", chunkName(h.typ), cmdName(req.cmd), h.cookie)
	switch {
	case h.typ == chunkNone:
		if h.length != 0 || !done {
			return r.protoErr("%s with length %d and flags 0x%x: must be empty and final", what, h.length, h.flags)
		}
	case h.typ&chunkFlagError != 0:
		if h.length > 6+0xffff+8 {
			return r.protoErr("%s of %d bytes", what, h.length)
		}
		p, err := r.payload(h.length)
		if err != nil {
			return err
		}
		ec, err := parseErrorChunk(h.typ, p)
		if err != nil {
			return r.protoErr("%s: %v", what, err)
		}
		if ec.hasOffset && (ec.offset < req.off || ec.offset >= req.off+req.length) {
			return r.protoErr("%s at offset %d, outside the request [%d, %d)", what, ec.offset, req.off, req.off+req.length)
		}
		if req.err == nil {
			req.err = r.serverError(req, ec)
		}
	case h.typ == chunkOffsetData && req.cmd == cmdRead:
		if h.length < 9 || uint64(h.length)-8 > req.length {
			return r.protoErr("%s with length %d for a read of %d bytes", what, h.length, req.length)
		}
		if _, err := io.ReadFull(r.br, r.hdr[:8]); err != nil {
			return err
		}
		off, n := binary.BigEndian.Uint64(r.hdr[:8]), uint64(h.length)-8
		if err := r.cover(req, off, n, what); err != nil {
			return err
		}
		if err := r.data(req, off-req.off, n); err != nil {
			return err
		}
	case h.typ == chunkOffsetHole && req.cmd == cmdRead:
		if h.length != 12 {
			return r.protoErr("%s with length %d, want 12", what, h.length)
		}
		p, err := r.payload(12)
		if err != nil {
			return err
		}
		off, size, err := parseOffsetHole(p)
		if err != nil {
			return r.protoErr("%s: %v", what, err)
		}
		if err := r.cover(req, off, uint64(size), what); err != nil {
			return err
		}
		req.mu.Lock()
		if !req.abandoned {
			clear(req.buf[off-req.off : off-req.off+uint64(size)])
		}
		req.mu.Unlock()
	case h.typ == chunkBlockStatus && req.cmd == cmdBlockStatus:
		if h.length > 4+8*maxBlockStatusExtent {
			return r.protoErr("%s of %d bytes, more than the %d extents accepted", what, h.length, maxBlockStatusExtent)
		}
		p, err := r.payload(h.length)
		if err != nil {
			return err
		}
		if err := r.blockStatus(req, p, what); err != nil {
			return err
		}
	default:
		return r.protoErr("unexpected %s", what)
	}
	if !done {
		return nil
	}
	if req.err == nil {
		switch {
		case req.cmd == cmdRead && req.received != req.length:
			return r.protoErr("reply to NBD_CMD_READ of %d bytes at offset %d (cookie %d) ended after %d bytes without an error", req.length, req.off, h.cookie, req.received)
		case req.cmd == cmdBlockStatus && req.extents == nil:
			return r.protoErr("reply to NBD_CMD_BLOCK_STATUS (cookie %d) ended without extents for the context asked for", h.cookie)
		}
	}
	r.complete(h.cookie, req)
	return nil
}

// cover records that a READ chunk covers [off, off+n), checking it lies in
// the request and does not overlap an earlier chunk.
func (r *replyReader) cover(req *request, off, n uint64, what string) error {
	end := off + n
	if off < req.off || end > req.off+req.length || end < off {
		return r.protoErr("%s covers [%d, %d), outside the request [%d, %d)", what, off, end, req.off, req.off+req.length)
	}
	i := sort.Search(len(req.spans), func(i int) bool { return req.spans[i].start >= off })
	if (i > 0 && req.spans[i-1].end > off) || (i < len(req.spans) && req.spans[i].start < end) {
		return r.protoErr("%s covers [%d, %d), which overlaps data already received", what, off, end)
	}
	switch joinPrev, joinNext := i > 0 && req.spans[i-1].end == off, i < len(req.spans) && req.spans[i].start == end; {
	case joinPrev && joinNext:
		req.spans[i-1].end = req.spans[i].end
		req.spans = slices.Delete(req.spans, i, i+1)
	case joinPrev:
		req.spans[i-1].end = end
	case joinNext:
		req.spans[i].start = off
	default:
		req.spans = slices.Insert(req.spans, i, span{off, end})
	}
	req.received += n
	return nil
}

func (r *replyReader) blockStatus(req *request, p []byte, what string) error {
	id, n, err := parseBlockStatusHeader(p)
	if err != nil {
		return r.protoErr("%s: %v", what, err)
	}
	known := false
	for _, v := range r.c.contexts {
		known = known || v == id
	}
	if !known {
		return r.protoErr("%s for metadata context ID %d, which was not negotiated", what, id)
	}
	if slices.Contains(req.seen, id) {
		return r.protoErr("%s: second chunk for metadata context ID %d", what, id)
	}
	req.seen = append(req.seen, id)
	pos, end := req.off, req.off+req.length
	for i := range n {
		length, flags := blockStatusDescriptor(p, i)
		if length == 0 {
			return r.protoErr("%s: descriptor %d has length 0", what, i)
		}
		if id != req.ctxID || pos >= end {
			continue // other contexts are checked, not kept; extents past the request are dropped
		}
		l := min(uint64(length), end-pos)
		if k := len(req.extents); k > 0 && req.extents[k-1].Flags == flags {
			req.extents[k-1].Length += int64(l)
		} else {
			req.extents = append(req.extents, Extent{Offset: int64(pos), Length: int64(l), Flags: flags})
		}
		pos += l
	}
	return nil
}

func opName(cmd uint16) string {
	switch cmd {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdWriteZeroes:
		return "write zeroes"
	case cmdBlockStatus:
		return "block status"
	}
	return cmdName(cmd)
}

func alignDown(v, m int64) int64 { return v - v%m }
