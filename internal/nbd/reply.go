package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"syscall"
)

// This file is the client's reader goroutine: it parses the reply stream
// and completes the requests in flight.

// readLoop reads replies and completes their requests until the connection
// ends, then fails whatever is still in flight.
func (c *Client) readLoop() {
	r := &replyReader{c: c, br: bufio.NewReaderSize(progressReader{c}, 64<<10)}
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
	c        *Client
	br       *bufio.Reader
	hdr      [structuredReplyLen]byte
	scratch  []byte
	shutdown bool // the server said ESHUTDOWN
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
		Errno: ec.errno, Message: redactIn(ec.message, r.c.export), ErrorOffset: -1}
	if ec.hasOffset {
		e.ErrorOffset = int64(ec.offset)
	}
	if ec.errno == ESHUTDOWN && !r.shutdown {
		// The server is going away: the protocol requires a soft
		// disconnect. Calls in flight still get their replies.
		r.shutdown = true
		go r.c.disconnect(connError(r.c.peer, "server is shutting down", ESHUTDOWN))
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
