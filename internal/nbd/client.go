package nbd

import (
	"context"
	"fmt"
	"io"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Client is one connection to an export in the transmission phase.
//
// A Client is safe for concurrent use: every call sends its own request and
// waits for its reply, so many calls run in flight at once on the one
// connection. Every call takes a context; when it is done the call returns
// its error at once and the reply, when it comes, is discarded.
//
// A call cancelled while the server is in the middle of sending its data
// waits up to 2 s for that chunk to end, then closes the connection; a call cancelled
// while its own request is still being written (a long write to a slow
// server) closes the connection at once, since a request cut short leaves
// the stream unusable.
//
// Errors: a *ServerError is the server's refusal of one request and leaves
// the connection usable (except ESHUTDOWN: the server is going away, so the
// client disconnects and later calls fail). Anything else (a
// *ProtocolError, a broken connection, ErrClosed) ends the connection: every
// call in flight and every later call fails with that same error.
type Client struct {
	conn       net.Conn
	peer       string
	export     string
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

	idle     time.Duration // Options.IdleTimeout; 0: none
	lastRecv atomic.Int64  // unix nanoseconds of the last byte received, or of the first request after a quiet spell
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
	err := c.pipeline(ctx, off, n, c.maxIO, 0, func(o, l int64) *request {
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
	err := c.pipeline(ctx, off, int64(len(p)), c.maxIO, 0, func(o, l int64) *request {
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
		return c.pipeline(ctx, off, length, c.maxIO, 0, func(o, l int64) *request {
			return &request{cmd: cmdWrite, off: uint64(o), length: uint64(l)}
		}, func(o, l int64) []byte { return zeroes[:l] })
	}
	var flags uint16
	if !punch {
		flags = cmdFlagNoHole
	}
	return c.pipeline(ctx, off, length, c.maxIO, flags, func(o, l int64) *request {
		return &request{cmd: cmdWriteZeroes, off: uint64(o), length: uint64(l)}
	}, nil)
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
	return c.pipeline(ctx, off, length, c.maxLen, 0, func(o, l int64) *request {
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
func (c *Client) pipeline(ctx context.Context, off, length, maxLen int64, flags uint16, mk func(o, l int64) *request, payload func(o, l int64) []byte) error {
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
			if err := c.start(ctx, req, flags, data); err != nil {
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
	if len(c.inflight) == 0 {
		c.lastRecv.Store(time.Now().UnixNano()) // the idle limit counts from now
	}
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

// watchIdle fails the connection when requests are in flight and the server
// sent nothing for c.idle: a stalled server fails the reads waiting on it
// (and later ones) instead of holding them forever.
func (c *Client) watchIdle() {
	t := time.NewTicker(max(c.idle/8, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-c.readerDone:
			return
		case <-t.C:
		}
		c.mu.Lock()
		n := len(c.inflight)
		c.mu.Unlock()
		if n > 0 && time.Since(time.Unix(0, c.lastRecv.Load())) >= c.idle {
			c.fail(connError(c.peer, fmt.Sprintf("the server sent nothing for %s while %d requests waited: it is hung or overloaded (raise the peer timeout if it is only slow)", c.idle, n), context.DeadlineExceeded))
			return
		}
	}
}

// progressReader notes the time of every byte received, for watchIdle.
type progressReader struct{ c *Client }

func (p progressReader) Read(b []byte) (int, error) {
	n, err := p.c.conn.Read(b)
	if n > 0 && p.c.idle > 0 {
		p.c.lastRecv.Store(time.Now().UnixNano())
	}
	return n, err
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
	c.disconnect(ErrClosed)
	return nil
}

// disconnect ends the connection softly (NBD_CMD_DISC), later calls failing
// with err, and waits for the reader goroutine to end.
func (c *Client) disconnect(err error) {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.readerDone
		return
	}
	c.closing = true
	alive := c.err == nil
	if alive {
		c.err = err
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
