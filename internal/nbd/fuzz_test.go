package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Fuzz tests for every parser of untrusted bytes. They run their seed
// corpus (f.Add and testdata/fuzz) as normal tests; explore with e.g.
//
//	go test -run '^$' -fuzz FuzzClientReplies ./internal/nbd/

// scriptConn is a net.Conn whose reads come from fixed bytes: first, then,
// once gate is closed, second, then EOF. Writes are discarded.
type scriptConn struct {
	first, second *bytes.Reader
	gate          chan struct{}
	closeOnce     sync.Once
	closed        chan struct{}
}

func newScriptConn(first, second []byte, gated bool) *scriptConn {
	c := &scriptConn{first: bytes.NewReader(first), second: bytes.NewReader(second), gate: make(chan struct{}), closed: make(chan struct{})}
	if !gated {
		close(c.gate)
	}
	return c
}

func (c *scriptConn) Read(p []byte) (int, error) {
	select {
	case <-c.closed:
		return 0, net.ErrClosed
	default:
	}
	if c.first.Len() > 0 {
		return c.first.Read(p)
	}
	select {
	case <-c.gate:
	case <-c.closed:
		return 0, net.ErrClosed
	}
	return c.second.Read(p)
}

func (c *scriptConn) Write(p []byte) (int, error) {
	select {
	case <-c.closed:
		return 0, net.ErrClosed
	default:
		return len(p), nil
	}
}

func (c *scriptConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return nil
}

func (c *scriptConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

var fuzzTarget = Target{Network: "unix", Address: "fuzz", Export: "d"}

// serverHandshake is what a server sends to a client asking for structured
// replies, base:allocation and NBD_OPT_GO "d".
func serverHandshake(size uint64, flags TransmissionFlags, bs *BlockSizes) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicInit)
	b = binary.BigEndian.AppendUint64(b, magicOpts)
	b = binary.BigEndian.AppendUint16(b, flagFixedNewstyle|flagNoZeroes)
	b = appendOptReplyHeader(b, optStructuredReply, repAck, 0)
	meta := append(binary.BigEndian.AppendUint32(nil, 1), ContextBaseAllocation...)
	b = appendOptReplyHeader(b, optSetMetaContext, repMetaContext, len(meta))
	b = append(b, meta...)
	b = appendOptReplyHeader(b, optSetMetaContext, repAck, 0)
	info := binary.BigEndian.AppendUint16(nil, infoExport)
	info = binary.BigEndian.AppendUint64(info, size)
	info = binary.BigEndian.AppendUint16(info, uint16(flags))
	b = appendOptReplyHeader(b, optGo, repInfo, len(info))
	b = append(b, info...)
	if bs != nil {
		p := binary.BigEndian.AppendUint16(nil, infoBlockSize)
		p = binary.BigEndian.AppendUint32(p, bs.Min)
		p = binary.BigEndian.AppendUint32(p, bs.Preferred)
		p = binary.BigEndian.AppendUint32(p, bs.Max)
		b = appendOptReplyHeader(b, optGo, repInfo, len(p))
		b = append(b, p...)
	}
	return appendOptReplyHeader(b, optGo, repAck, 0)
}

// FuzzClientHandshake feeds arbitrary server bytes to the client's
// handshake: it must fail cleanly or succeed, never panic or hang.
func FuzzClientHandshake(f *testing.F) {
	good := serverHandshake(1<<20, FlagHasFlags|FlagSendFlush, &BlockSizes{512, 4096, 1 << 20})
	f.Add(good)
	f.Add(serverHandshake(0, 0, nil))
	f.Add(good[:40])
	bad := slices.Clone(good)
	bad[len(bad)-30] ^= 0xff
	f.Add(bad)
	f.Add(append(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, magicInit), magicOpts), 0, 0,
		0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
	f.Fuzz(func(t *testing.T, data []byte) {
		conn := newScriptConn(data, nil, false)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := NewClient(ctx, conn, fuzzTarget, &Options{MetaContexts: []string{ContextBaseAllocation}})
		if err != nil {
			if !errors.Is(err, errs.ErrConnect) && !errors.Is(err, errs.ErrNotFound) && !errors.Is(err, errs.ErrUnsupported) && !errors.Is(err, errs.ErrAuth) {
				t.Fatalf("handshake error without a class: %v", err)
			}
			return
		}
		if c.Size() < 0 || c.BlockSizes().validate() != nil {
			t.Fatalf("accepted size %d, block sizes %+v", c.Size(), c.BlockSizes())
		}
		c.Close()
	})
}

// FuzzClientReplies feeds arbitrary reply bytes to a connected client with
// reads, a write, a flush and a block status in flight: every call must
// return, with data or an error, and nothing may panic.
func FuzzClientReplies(f *testing.F) {
	chunk := func(flags, typ uint16, cookie uint64, payload []byte) []byte {
		b := make([]byte, structuredReplyLen)
		putChunkHeader(b, chunkHeader{flags: flags, typ: typ, cookie: cookie, length: uint32(len(payload))})
		return append(b, payload...)
	}
	data := func(cookie, off uint64, n int) []byte {
		return chunk(replyFlagDone, chunkOffsetData, cookie, append(binary.BigEndian.AppendUint64(nil, off), bytes.Repeat([]byte{0xa5}, n)...))
	}
	simple := func(cookie uint64, errno Errno) []byte {
		b := make([]byte, simpleReplyLen)
		putSimpleReply(b, errno, cookie)
		return b
	}
	// Reads are of fuzzReadLen bytes: small inputs keep each execution
	// and the minimization of interesting inputs fast.
	all := slices.Concat(
		data(2, fuzzReadLen, fuzzReadLen),
		chunk(0, chunkOffsetHole, 1, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, 0), fuzzReadLen/2)),
		chunk(replyFlagDone, chunkOffsetData, 1, append(binary.BigEndian.AppendUint64(nil, fuzzReadLen/2), make([]byte, fuzzReadLen/2)...)),
		chunk(replyFlagDone, chunkBlockStatus, 3, blockStatusPayload(1, 4096, 0, 61440, 3)),
		simple(4, 0), simple(5, 0))
	f.Add(all)
	f.Add(slices.Concat(data(1, 0, fuzzReadLen), data(2, fuzzReadLen, fuzzReadLen),
		chunk(0, chunkErrorOffset, 3, binary.BigEndian.AppendUint64(appendErrorChunkPayload(nil, EIO, "x"), 100)),
		chunk(replyFlagDone, chunkNone, 3, nil),
		chunk(replyFlagDone, chunkError, 4, appendErrorChunkPayload(nil, ENOSPC, "full")), simple(5, EIO)))
	f.Add(all[:len(all)-7])
	f.Add([]byte{})
	f.Fuzz(fuzzClientRepliesBody)
}

// fuzzReadLen is the length of the reads FuzzClientReplies has in flight.
const fuzzReadLen = 64

func fuzzClientRepliesBody(t *testing.T, replies []byte) {
	conn := newScriptConn(serverHandshake(1<<20, FlagHasFlags|FlagSendFlush, &BlockSizes{1, 4096, 4096}), replies, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := NewClient(ctx, conn, fuzzTarget, &Options{MetaContexts: []string{ContextBaseAllocation}})
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	defer c.Close()
	bufs := [][]byte{make([]byte, fuzzReadLen), make([]byte, fuzzReadLen)}
	reqs := []*request{
		{cmd: cmdRead, off: 0, length: fuzzReadLen, buf: bufs[0]},
		{cmd: cmdRead, off: fuzzReadLen, length: fuzzReadLen, buf: bufs[1]},
		{cmd: cmdBlockStatus, off: 0, length: 65536, ctxID: 1},
		{cmd: cmdWrite, off: 0, length: 512},
		{cmd: cmdFlush},
	}
	for _, r := range reqs { // cookies 1 to 5, in this order
		var payload []byte
		if r.cmd == cmdWrite {
			payload = make([]byte, r.length)
		}
		if err := c.start(ctx, r, 0, payload); err != nil {
			t.Fatalf("start: %v", err)
		}
	}
	close(conn.gate)
	// Let the reader goroutine consume every reply (it ends at the end of
	// the input) before collecting the results. Collecting them while it
	// runs made the coverage of an input depend on scheduling: the fuzzer
	// then kept re-running inputs whose new coverage it could not
	// reproduce, and managed about one counted execution a second.
	select {
	case <-c.readerDone:
	case <-ctx.Done():
		t.Fatal("the client did not finish reading a finite reply stream")
	}
	for _, r := range reqs {
		err := c.wait(ctx, r)
		var se *ServerError
		var pe *ProtocolError
		switch {
		case err == nil:
			if r.cmd == cmdBlockStatus {
				var sum int64
				for _, e := range r.extents {
					if e.Length <= 0 || e.Offset != int64(r.off)+sum {
						t.Fatalf("bad extents %v", r.extents)
					}
					sum += e.Length
				}
				if sum == 0 || sum > int64(r.length) {
					t.Fatalf("extents cover %d bytes of %d", sum, r.length)
				}
			}
		case errors.As(err, &se), errors.As(err, &pe), errors.Is(err, errs.ErrConnect), errors.Is(err, ErrClosed):
		case errors.Is(err, context.DeadlineExceeded):
			t.Fatal("a call hung")
		default:
			t.Fatalf("unexpected error: %v", err)
		}
	}
}

// FuzzServerConn feeds arbitrary client bytes to a server connection: it
// must end (at the end of the input at the latest) without panicking.
func FuzzServerConn(f *testing.F) {
	opt := func(o uint32, data []byte) []byte {
		return append(appendOptionHeader(nil, o, len(data)), data...)
	}
	req := func(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) []byte {
		b := make([]byte, requestHeaderLen)
		putRequestHeader(b, requestHeader{flags: flags, typ: typ, cookie: cookie, offset: off, length: length})
		return append(b, payload...)
	}
	hello := []byte{0, 0, 0, 3}
	session := slices.Concat(hello,
		opt(optStructuredReply, nil),
		opt(optListMetaContext, appendMetaContextRequest(nil, "d", nil)),
		opt(optSetMetaContext, appendMetaContextRequest(nil, "d", []string{ContextBaseAllocation, "qemu:x"})),
		opt(optInfo, appendInfoRequest(nil, "d", infoName, infoDescription, infoBlockSize)),
		opt(optGo, appendInfoRequest(nil, "d", infoBlockSize)),
		req(cmdWrite, cmdFlagFUA, 1, 4096, 8, []byte("12345678")),
		req(cmdRead, 0, 2, 0, 8192, nil),
		req(cmdBlockStatus, cmdFlagReqOne, 3, 0, 64<<10, nil),
		req(cmdWriteZeroes, cmdFlagNoHole, 4, 0, 65536, nil),
		req(cmdTrim, 0, 5, 65536, 65536, nil),
		req(cmdFlush, 0, 6, 0, 0, nil),
		req(cmdRead, 0, 7, 64<<10-1, 2, nil),
		req(99, 0, 8, 0, 0, nil),
		req(cmdDisc, 0, 9, 0, 0, nil))
	f.Add(session)
	f.Add(slices.Concat(hello, opt(optList, nil), opt(optExportName, []byte("d")), req(cmdRead, 0, 1, 0, 512, nil)))
	f.Add(slices.Concat(hello, opt(optStartTLS, nil), opt(77, []byte("x")), opt(optAbort, nil)))
	f.Add(slices.Concat([]byte{0, 0, 0, 1}, opt(optGo, appendInfoRequest(nil, "nope")), opt(optExportName, nil), req(cmdWrite, 0, 1, 0, 1<<30, nil)))
	f.Fuzz(func(t *testing.T, in []byte) {
		s := NewServer(&ServerOptions{MaxBlockSize: 1 << 20, ConnBuffer: 4 << 20})
		m := newMemExport(64 << 10)
		if err := s.AddExport("d", m, ExportOptions{Description: "fuzz"}); err != nil {
			t.Fatal(err)
		}
		if err := s.AddExport("", newMemExport(4096), ExportOptions{ReadOnly: true}); err != nil {
			t.Fatal(err)
		}
		sc := newServerConn(s, newScriptConn(in, nil, false))
		done := make(chan struct{})
		go func() { sc.serve(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server connection did not end at the end of its input")
		}
	})
}

// FuzzParseURI: no panics, usage errors only, and targets that print back
// as URIs parse to themselves.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"nbd://h/e", "nbds+unix:///e?socket=/s&tls-hostname=x", "nbd:unix:/s:exportname=e",
		"nbd://[::1]:5/%2F%3F", "nbd:h:1", "nbd+unix:///?socket=%00abs", "nbds://h:1/e?tls-verify-peer=1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tgt, err := ParseURI(s)
		if err != nil {
			if !errors.Is(err, errs.ErrUsage) {
				t.Fatalf("error without usage class: %v", err)
			}
			return
		}
		if tgt.Network != "tcp" && tgt.Network != "unix" || tgt.Address == "" {
			t.Fatalf("bad target %+v", tgt)
		}
		if bytes.ContainsRune([]byte(tgt.Export), '?') {
			return // String redacts
		}
		back, err := ParseURI(tgt.String())
		tgt.TLSHostname = ""
		if err != nil || back != tgt {
			t.Fatalf("%q -> %+v -> %q -> %+v, %v", s, tgt, tgt.String(), back, err)
		}
	})
}

// FuzzParsers runs the message decoders on arbitrary payloads; the first
// byte picks the decoder.
func FuzzParsers(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 1})
	f.Add(append([]byte{1}, appendInfoRequest(nil, "disk", 1, 3)...))
	f.Add(append([]byte{2}, appendMetaContextRequest(nil, "disk", []string{"base:allocation", "qemu:dirty-bitmap:b"})...))
	f.Add(append([]byte{3}, appendErrorChunkPayload(nil, EIO, "boom")...))
	f.Add(append([]byte{4}, blockStatusPayload(1, 512, 1, 1024, 3)...))
	f.Add([]byte{5, 0, 0, 0, 4, 'n', 'a', 'm', 'e', 'd', 'e', 's', 'c'})
	f.Add([]byte{6, 0, 0, 0, 1, 'b', 'a', 's', 'e', ':', 'a'})
	f.Add([]byte{7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		p := in[1:]
		switch in[0] % 9 {
		case 0:
			var info exportInfo
			if parseInfoReply(p, &info) == nil && info.haveBlock && info.blockSizes.validate() != nil {
				t.Fatal("invalid block sizes accepted")
			}
		case 1:
			name, infos, err := parseInfoRequest(p)
			if err == nil {
				if back := appendInfoRequest(nil, name, infos...); !bytes.Equal(back, p) {
					t.Fatalf("info request does not round-trip: %x -> %x", p, back)
				}
			}
		case 2:
			name, queries, err := parseMetaContextRequest(p)
			if err == nil {
				if back := appendMetaContextRequest(nil, name, queries); !bytes.Equal(back, p) {
					t.Fatalf("meta context request does not round-trip: %x -> %x", p, back)
				}
			}
		case 3:
			for _, typ := range []uint16{chunkError, chunkErrorOffset, chunkFlagError | 9} {
				if ec, err := parseErrorChunk(typ, p); err == nil && ec.errno == 0 {
					t.Fatal("error chunk with errno 0 accepted")
				}
			}
		case 4:
			if _, n, err := parseBlockStatusHeader(p); err == nil {
				for i := range n {
					blockStatusDescriptor(p, i)
				}
			}
		case 5:
			_, _, _ = parseServerReply(p)
		case 6:
			_, _, _ = parseMetaContextReply(p)
		case 7:
			if _, size, err := parseOffsetHole(p); err == nil && size == 0 {
				t.Fatal("hole of size 0 accepted")
			}
		case 8:
			if len(p) >= optReplyHeaderLen {
				_, _ = parseOptReplyHeader(p)
			}
			_, _ = parseRequestHeader(p)
		}
	})
}

// Make sure the script conn does what the fuzz tests rely on.
func TestScriptConn(t *testing.T) {
	c := newScriptConn([]byte("ab"), []byte("cd"), true)
	b := make([]byte, 4)
	if n, _ := c.Read(b); string(b[:n]) != "ab" {
		t.Fatalf("first read %q", b[:n])
	}
	close(c.gate)
	if got, _ := io.ReadAll(c); string(got) != "cd" {
		t.Fatalf("second part %q", got)
	}
}
