package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// This file is one server connection: the server's side of the handshake,
// then the request loop.

// allocationContextID is the ID of base:allocation on our server.
const allocationContextID = 1

// maxReplyExtents caps the descriptors in one BLOCK_STATUS reply.
const maxReplyExtents = 128 << 10

// errAborted ends a connection whose client sent NBD_OPT_ABORT.
var errAborted = errors.New("client aborted the handshake")

type serverConn struct {
	s      *Server
	raw    net.Conn // the accepted connection; safe to Close from any goroutine
	conn   net.Conn // raw, or TLS over raw
	br     *bufio.Reader
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc

	tls        bool
	structured bool
	noZeroes   bool
	metaExport string // export named in the last NBD_OPT_SET_META_CONTEXT
	metaAlloc  bool   // base:allocation selected for metaExport

	exp   *served
	flags TransmissionFlags

	wmu      sync.Mutex // serialises replies
	budget   budget
	handlers sync.WaitGroup
	stopping atomic.Bool
}

func newServerConn(s *Server, conn net.Conn) *serverConn {
	remote := "unknown"
	if a := conn.RemoteAddr(); a != nil && a.String() != "" {
		remote = a.String()
	}
	sc := &serverConn{s: s, raw: conn, conn: conn, br: bufio.NewReaderSize(conn, 64<<10),
		log: s.log.With("remote", remote)}
	sc.ctx, sc.cancel = context.WithCancel(s.ctx)
	sc.budget.init(s.opts.ConnBuffer)
	return sc
}

// stop makes the connection finish: handshakes end, the request loop stops
// reading, requests in flight complete.
func (sc *serverConn) stop() {
	sc.stopping.Store(true)
	_ = sc.raw.SetReadDeadline(aLongTimeAgo)
}

func (sc *serverConn) serve() {
	defer sc.cancel()
	defer sc.raw.Close()
	_ = sc.raw.SetDeadline(time.Now().Add(sc.s.opts.HandshakeTimeout))
	if sc.stopping.Load() {
		return
	}
	sv, err := sc.handshake()
	if err != nil {
		if errors.Is(err, errAborted) || errors.Is(err, io.EOF) {
			sc.log.Debug("nbd handshake ended", "reason", err)
		} else {
			sc.log.Warn("nbd handshake failed", "err", err)
		}
		return
	}
	_ = sc.raw.SetDeadline(time.Time{})
	sc.exp, sc.flags = sv, sv.flags(sc.structured)
	sc.log.Debug("nbd client connected", "export", sv.name, "flags", sc.flags.String(), "structured", sc.structured, "tls", sc.tls)
	err = sc.transmit()
	sc.handlers.Wait()
	switch {
	case err == nil, sc.stopping.Load():
		sc.log.Debug("nbd client disconnected", "export", sv.name)
	case errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed):
		sc.log.Debug("nbd client dropped the connection", "export", sv.name)
	default:
		sc.log.Warn("nbd connection ended", "export", sv.name, "err", err)
	}
}

// ---- handshake ----

func (sc *serverConn) handshake() (*served, error) {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], magicInit)
	binary.BigEndian.PutUint64(b[8:], magicOpts)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := sc.conn.Write(b[:]); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(sc.br, b[:4]); err != nil {
		return nil, err
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return nil, fmt.Errorf("client sent unknown flags 0x%x", cflags)
	}
	sc.noZeroes = cflags&flagCNoZeroes != 0
	var hdr [optionHeaderLen]byte
	for {
		if _, err := io.ReadFull(sc.br, hdr[:]); err != nil {
			return nil, err
		}
		if m := binary.BigEndian.Uint64(hdr[:]); m != magicOpts {
			return nil, fmt.Errorf("bad option magic 0x%x", m)
		}
		opt, length := binary.BigEndian.Uint32(hdr[8:]), binary.BigEndian.Uint32(hdr[12:])
		if length > maxOptionLen {
			return nil, fmt.Errorf("%s with %d bytes of data, more than the %d accepted", optName(opt), length, maxOptionLen)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(sc.br, data); err != nil {
			return nil, err
		}
		sv, err := sc.option(opt, data)
		if err != nil || sv != nil {
			return sv, err
		}
	}
}

// option handles one option. It returns the export when the option ends
// the handshake, an error when the connection must end.
func (sc *serverConn) option(opt uint32, data []byte) (*served, error) {
	if sc.s.opts.TLSConfig != nil && !sc.tls && opt != optStartTLS && opt != optAbort {
		if opt == optExportName {
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME before TLS, which this server requires")
		}
		return nil, sc.optError(opt, repErrTLSReqd, "this server requires TLS: send NBD_OPT_STARTTLS first")
	}
	switch opt {
	case optExportName:
		sv := sc.s.export(string(data))
		if sv == nil {
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME for unknown export %q", redactExport(string(data)))
		}
		b := binary.BigEndian.AppendUint64(nil, uint64(sv.exp.Size()))
		b = binary.BigEndian.AppendUint16(b, uint16(sv.flags(sc.structured)))
		if !sc.noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		if _, err := sc.conn.Write(b); err != nil {
			return nil, err
		}
		return sc.entering(sv), nil
	case optAbort:
		_ = sc.optReply(opt, repAck, nil)
		return nil, errAborted
	case optList:
		if len(data) != 0 {
			return nil, sc.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, sv := range sc.s.exportList() {
			p := appendString(nil, sv.name)
			p = append(p, sv.opts.Description...)
			if err := sc.optReply(opt, repServer, p); err != nil {
				return nil, err
			}
		}
		return nil, sc.optReply(opt, repAck, nil)
	case optStartTLS:
		return nil, sc.startTLS(data)
	case optInfo, optGo:
		return sc.info(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return nil, sc.optError(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		sc.structured = true
		return nil, sc.optReply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return nil, sc.metaContext(opt, data)
	}
	return nil, sc.optError(opt, repErrUnsup, fmt.Sprintf("%s is not supported", optName(opt)))
}

// entering forgets meta context selections made for another export.
func (sc *serverConn) entering(sv *served) *served {
	if sc.metaExport != sv.name {
		sc.metaAlloc = false
	}
	return sv
}

func (sc *serverConn) optReply(opt, typ uint32, data []byte) error {
	b := appendOptReplyHeader(make([]byte, 0, optReplyHeaderLen+len(data)), opt, typ, len(data))
	_, err := sc.conn.Write(append(b, data...))
	return err
}

// optError refuses an option. It returns only write errors: the handshake
// goes on.
func (sc *serverConn) optError(opt, typ uint32, msg string) error {
	return sc.optReply(opt, typ, []byte(msg))
}

func (sc *serverConn) startTLS(data []byte) error {
	switch {
	case sc.s.opts.TLSConfig == nil:
		return sc.optError(optStartTLS, repErrPolicy, "this server does not offer TLS")
	case len(data) != 0:
		return sc.optError(optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	case sc.tls:
		return sc.optError(optStartTLS, repErrInvalid, "TLS is already up")
	case sc.br.Buffered() > 0:
		return fmt.Errorf("client sent data after NBD_OPT_STARTTLS before the reply")
	}
	if err := sc.optReply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	tc := tls.Server(sc.raw, sc.s.opts.TLSConfig)
	if err := tc.HandshakeContext(sc.ctx); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	sc.conn, sc.tls = tc, true
	sc.br.Reset(tc)
	sc.structured, sc.metaAlloc, sc.metaExport = false, false, "" // STARTTLS forgets earlier options
	return nil
}

func (sc *serverConn) info(opt uint32, data []byte) (*served, error) {
	name, infos, err := parseInfoRequest(data)
	if err != nil {
		return nil, sc.optError(opt, repErrInvalid, err.Error())
	}
	sv := sc.s.export(name)
	if sv == nil {
		return nil, sc.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", redactExport(name)))
	}
	p := binary.BigEndian.AppendUint16(nil, infoExport)
	p = binary.BigEndian.AppendUint64(p, uint64(sv.exp.Size()))
	p = binary.BigEndian.AppendUint16(p, uint16(sv.flags(sc.structured)))
	if err := sc.optReply(opt, repInfo, p); err != nil {
		return nil, err
	}
	p = binary.BigEndian.AppendUint16(nil, infoBlockSize)
	p = binary.BigEndian.AppendUint32(p, 1)
	p = binary.BigEndian.AppendUint32(p, 4096)
	p = binary.BigEndian.AppendUint32(p, sc.s.opts.MaxBlockSize)
	if err := sc.optReply(opt, repInfo, p); err != nil {
		return nil, err
	}
	for _, i := range infos {
		var s string
		switch i {
		case infoName:
			s = sv.name
		case infoDescription:
			s = sv.opts.Description
		default:
			continue
		}
		if err := sc.optReply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, i), s...)); err != nil {
			return nil, err
		}
	}
	if err := sc.optReply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optGo {
		return sc.entering(sv), nil
	}
	return nil, nil
}

func (sc *serverConn) metaContext(opt uint32, data []byte) error {
	if !sc.structured {
		return sc.optError(opt, repErrInvalid, "negotiate NBD_OPT_STRUCTURED_REPLY first")
	}
	name, queries, err := parseMetaContextRequest(data)
	if err != nil {
		return sc.optError(opt, repErrInvalid, err.Error())
	}
	if sc.s.export(name) == nil {
		return sc.optError(opt, repErrUnknown, fmt.Sprintf("no export named %q", redactExport(name)))
	}
	reply := func(id uint32) error {
		return sc.optReply(opt, repMetaContext, append(binary.BigEndian.AppendUint32(nil, id), ContextBaseAllocation...))
	}
	if opt == optSetMetaContext {
		sc.metaExport, sc.metaAlloc = name, false
		for _, q := range queries {
			if q == ContextBaseAllocation && !sc.metaAlloc {
				sc.metaAlloc = true
				if err := reply(allocationContextID); err != nil {
					return err
				}
			}
		}
		return sc.optReply(opt, repAck, nil)
	}
	match := len(queries) == 0
	for _, q := range queries {
		match = match || q == "base:" || q == ContextBaseAllocation
	}
	if match {
		if err := reply(0); err != nil {
			return err
		}
	}
	return sc.optReply(opt, repAck, nil)
}

// ---- transmission ----

// transmit reads requests and runs each in its own goroutine until the
// client disconnects. It returns nil after NBD_CMD_DISC.
func (sc *serverConn) transmit() error {
	var hb [requestHeaderLen]byte
	maxBlock := uint64(sc.s.opts.MaxBlockSize)
	for {
		if sc.stopping.Load() {
			return nil
		}
		if _, err := io.ReadFull(sc.br, hb[:]); err != nil {
			return err
		}
		h, err := parseRequestHeader(hb[:])
		if err != nil {
			return err
		}
		if h.typ == cmdDisc {
			return nil
		}
		// Requests are weighed by the memory they need (at least 1 MiB each,
		// which also caps the number of goroutines per connection).
		weight := int64(1 << 20)
		if (h.typ == cmdRead || h.typ == cmdWrite) && uint64(h.length) <= maxBlock {
			weight = max(weight, int64(h.length))
		}
		var payload []byte
		if h.typ == cmdWrite {
			if uint64(h.length) > maxBlock {
				return fmt.Errorf("NBD_CMD_WRITE of %d bytes, more than the maximum block size %d", h.length, maxBlock)
			}
			sc.budget.acquire(weight)
			payload = getBuf(int(h.length))
			if _, err := io.ReadFull(sc.br, payload); err != nil {
				putBuf(payload)
				sc.budget.release(weight)
				return err
			}
		} else {
			sc.budget.acquire(weight)
		}
		sc.handlers.Add(1)
		go func() {
			defer sc.handlers.Done()
			defer sc.budget.release(weight)
			defer putBuf(payload)
			if err := sc.execute(h, payload); err != nil {
				sc.replyError(h, err)
			}
		}()
	}
}

// requestError is a refusal of a request with an NBD error value.
type requestError struct {
	errno Errno
	msg   string
}

func (e *requestError) Error() string { return e.msg }
func (e *requestError) Unwrap() error { return e.errno }

func refuse(errno Errno, format string, a ...any) error {
	return &requestError{errno, fmt.Sprintf(format, a...)}
}

// execute runs one request and sends its reply, except for errors, which
// it returns for the caller to send.
func (sc *serverConn) execute(h requestHeader, payload []byte) error {
	sv, ctx := sc.exp, sc.ctx
	off, length := h.offset, uint64(h.length)
	size := uint64(sv.exp.Size())
	inBounds := off <= size && length <= size-off
	allowed := uint16(0)
	if sc.flags.Has(FlagSendFUA) {
		allowed |= cmdFlagFUA
	}
	switch h.typ {
	case cmdRead:
		allowed |= cmdFlagDF
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	}
	if bad := h.flags &^ allowed; bad != 0 {
		return refuse(EINVAL, "flags 0x%x are not valid for %s here", bad, cmdName(h.typ))
	}
	isWrite := h.typ == cmdWrite || h.typ == cmdTrim || h.typ == cmdWriteZeroes
	if isWrite && sc.flags.Has(FlagReadOnly) {
		return refuse(EPERM, "export %q is read-only", sv.name)
	}
	if isWrite && !inBounds {
		return refuse(ENOSPC, "%s of %d bytes at offset %d is beyond the end of the export (%d bytes)", cmdName(h.typ), length, off, size)
	}
	var err error
	switch h.typ {
	case cmdRead:
		if !inBounds {
			return refuse(EINVAL, "read of %d bytes at offset %d is beyond the end of the export (%d bytes)", length, off, size)
		}
		if length > uint64(sc.s.opts.MaxBlockSize) {
			return refuse(EINVAL, "read of %d bytes is longer than the maximum block size %d", length, sc.s.opts.MaxBlockSize)
		}
		buf := getBuf(int(length))
		defer putBuf(buf)
		n, err := sv.exp.ReadAt(ctx, buf, int64(off))
		if err == nil && n < len(buf) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return fmt.Errorf("read of %d bytes at offset %d: %w", length, off, err)
		}
		return sc.replyData(h, buf)
	case cmdWrite:
		var n int
		n, err = sv.writer.WriteAt(ctx, payload, int64(off))
		if err == nil && n < len(payload) {
			err = io.ErrShortWrite
		}
	case cmdFlush:
		if sv.flusher == nil {
			return refuse(EINVAL, "NBD_CMD_FLUSH is not supported by this export")
		}
		err = sv.flusher.Flush(ctx)
	case cmdTrim:
		if sv.trimmer == nil {
			return refuse(EINVAL, "NBD_CMD_TRIM is not supported by this export")
		}
		err = sv.trimmer.Trim(ctx, int64(off), int64(length))
	case cmdWriteZeroes:
		err = sc.writeZeroes(ctx, int64(off), int64(length), h.flags&cmdFlagNoHole == 0)
	case cmdBlockStatus:
		return sc.blockStatus(ctx, h, inBounds)
	default:
		return refuse(EINVAL, "unknown command %d", h.typ)
	}
	if err == nil && h.flags&cmdFlagFUA != 0 && sv.flusher != nil {
		err = sv.flusher.Flush(ctx)
	}
	if err != nil {
		return fmt.Errorf("%s of %d bytes at offset %d: %w", cmdName(h.typ), length, off, err)
	}
	return sc.replySimple(h.cookie, 0)
}

func (sc *serverConn) writeZeroes(ctx context.Context, off, length int64, punch bool) error {
	sv := sc.exp
	if sv.zeroer != nil {
		return sv.zeroer.WriteZeroes(ctx, off, length, punch)
	}
	zero := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, int64(len(zero)))
		if _, err := sv.writer.WriteAt(ctx, zero[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

func (sc *serverConn) blockStatus(ctx context.Context, h requestHeader, inBounds bool) error {
	if !sc.metaAlloc {
		return refuse(EINVAL, "no metadata context was selected for this export")
	}
	off, length := int64(h.offset), int64(h.length)
	if !inBounds || length == 0 {
		return refuse(EINVAL, "block status of %d bytes at offset %d is outside the export (%d bytes)", length, off, sc.exp.exp.Size())
	}
	exts := []Extent{{Offset: off, Length: length}}
	if sc.exp.extents != nil {
		var err error
		if exts, err = sc.exp.extents.Extents(ctx, off, length); err != nil {
			return fmt.Errorf("block status of %d bytes at offset %d: %w", length, off, err)
		}
	}
	limit := maxReplyExtents
	if h.flags&cmdFlagReqOne != 0 {
		limit = 1
	}
	p := binary.BigEndian.AppendUint32(make([]byte, 0, 4+8*min(len(exts), limit)), allocationContextID)
	pos, end := off, off+length
	for i, e := range exts {
		if i == limit || pos == end {
			break
		}
		if e.Offset != pos || e.Length <= 0 {
			sc.log.Error("nbd export reported bad extents", "export", sc.exp.name, "want_offset", pos, "extent", e)
			return refuse(EIO, "the export reported inconsistent allocation")
		}
		l := min(e.Length, end-pos)
		p = binary.BigEndian.AppendUint32(p, uint32(l))
		p = binary.BigEndian.AppendUint32(p, e.Flags&(StateHole|StateZero))
		pos += l
	}
	if pos == off {
		return refuse(EIO, "the export reported no allocation for offset %d", off)
	}
	return sc.replyChunk(h.cookie, chunkBlockStatus, p)
}

// ---- replies ----

func (sc *serverConn) write(bufs ...[]byte) error {
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	nb := net.Buffers(bufs)
	if _, err := nb.WriteTo(sc.conn); err != nil {
		sc.raw.Close() // the stream is broken: end the connection
		return err
	}
	return nil
}

func (sc *serverConn) replySimple(cookie uint64, errno Errno) error {
	var b [simpleReplyLen]byte
	putSimpleReply(b[:], errno, cookie)
	return sc.write(b[:])
}

func (sc *serverConn) replyChunk(cookie uint64, typ uint16, payload ...[]byte) error {
	var b [structuredReplyLen]byte
	n := 0
	for _, p := range payload {
		n += len(p)
	}
	putChunkHeader(b[:], chunkHeader{flags: replyFlagDone, typ: typ, cookie: cookie, length: uint32(n)})
	return sc.write(append([][]byte{b[:]}, payload...)...)
}

func (sc *serverConn) replyData(h requestHeader, data []byte) error {
	switch {
	case !sc.structured:
		var b [simpleReplyLen]byte
		putSimpleReply(b[:], 0, h.cookie)
		return sc.write(b[:], data)
	case len(data) == 0:
		return sc.replyChunk(h.cookie, chunkNone)
	}
	return sc.replyChunk(h.cookie, chunkOffsetData, binary.BigEndian.AppendUint64(nil, h.offset), data)
}

func (sc *serverConn) replyError(h requestHeader, err error) {
	errno := errnoFor(err)
	var re *requestError
	if !errors.As(err, &re) {
		sc.log.Warn("nbd request failed", "export", sc.exp.name, "err", err)
	}
	if !sc.structured {
		_ = sc.replySimple(h.cookie, errno)
		return
	}
	_ = sc.replyChunk(h.cookie, chunkError, appendErrorChunkPayload(nil, errno, err.Error()))
}

// ---- memory ----

// budget is a counting semaphore over bytes of request data.
type budget struct {
	mu    sync.Mutex
	cond  sync.Cond
	avail int64
}

func (b *budget) init(n int64) {
	b.avail = n
	b.cond.L = &b.mu
}

func (b *budget) acquire(n int64) {
	b.mu.Lock()
	for b.avail < n {
		b.cond.Wait()
	}
	b.avail -= n
	b.mu.Unlock()
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.avail += n
	b.mu.Unlock()
	b.cond.Broadcast()
}

// Buffers come from per-size-class pools (powers of two from 4 KiB).
const minBufClass = 12

var bufPools [32]sync.Pool

func bufClass(n int) int {
	c := minBufClass
	for 1<<c < n {
		c++
	}
	return c
}

func getBuf(n int) []byte {
	if n == 0 {
		return nil
	}
	c := bufClass(n)
	if b, ok := bufPools[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<c)
}

func putBuf(b []byte) {
	if cap(b) == 0 || cap(b)&(cap(b)-1) != 0 || cap(b) < 1<<minBufClass {
		return
	}
	b = b[:cap(b)]
	bufPools[bufClass(cap(b))].Put(&b)
}
