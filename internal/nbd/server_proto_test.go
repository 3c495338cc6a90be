package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// The server's protocol handling, byte by byte: option errors, the
// NBD_OPT_EXPORT_NAME path with its zero padding, FORCEDTLS refusals,
// invalid requests and hard disconnects.

// rawClient speaks raw NBD to a server.
type rawClient struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dialRaw(t *testing.T, sock string, cflags uint32) *rawClient {
	t.Helper()
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	rc := &rawClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	g := rc.read(18)
	if binary.BigEndian.Uint64(g) != magicInit || binary.BigEndian.Uint64(g[8:]) != magicOpts || binary.BigEndian.Uint16(g[16:]) != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("greeting %x", g)
	}
	rc.write(binary.BigEndian.AppendUint32(nil, cflags))
	return rc
}

func (rc *rawClient) write(b []byte) {
	rc.t.Helper()
	if _, err := rc.conn.Write(b); err != nil {
		rc.t.Fatal(err)
	}
}

func (rc *rawClient) read(n int) []byte {
	rc.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(rc.r, b); err != nil {
		rc.t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

func (rc *rawClient) option(opt uint32, data []byte) {
	rc.write(append(appendOptionHeader(nil, opt, len(data)), data...))
}

// reply reads one option reply and checks it answers opt.
func (rc *rawClient) reply(opt uint32) (uint32, []byte) {
	rc.t.Helper()
	h, err := parseOptReplyHeader(rc.read(optReplyHeaderLen))
	if err != nil || h.option != opt {
		rc.t.Fatalf("reply header %+v, %v; want a reply to %s", h, err, optName(opt))
	}
	return h.typ, rc.read(int(h.length))
}

func (rc *rawClient) expect(opt, typ uint32, msg string) []byte {
	rc.t.Helper()
	got, data := rc.reply(opt)
	if got != typ || !strings.Contains(string(data), msg) {
		rc.t.Fatalf("%s: got %s %q, want %s containing %q", optName(opt), repName(got), data, repName(typ), msg)
	}
	return data
}

// closed checks the server hung up.
func (rc *rawClient) closed() {
	rc.t.Helper()
	_ = rc.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := rc.r.ReadByte(); !errors.Is(err, io.EOF) {
		rc.t.Fatalf("server did not close the connection: %v", err)
	}
}

func TestServerOptions(t *testing.T) {
	m := newMemExport(1 << 20)
	copy(m.data, "hello")
	_, sock, _ := startServer(t, nil, map[string]Export{"d": m}, map[string]ExportOptions{"d": {Description: "a disk"}})

	rc := dialRaw(t, sock, flagCFixedNewstyle) // no NO_ZEROES: NBD_OPT_EXPORT_NAME pads
	rc.option(77, []byte("junk"))
	rc.expect(77, repErrUnsup, "not supported")
	rc.option(optList, []byte{1})
	rc.expect(optList, repErrInvalid, "no data")
	rc.option(optSetMetaContext, appendMetaContextRequest(nil, "d", []string{ContextBaseAllocation}))
	rc.expect(optSetMetaContext, repErrInvalid, "STRUCTURED_REPLY first")
	rc.option(optStartTLS, nil)
	rc.expect(optStartTLS, repErrPolicy, "does not offer TLS")
	rc.option(optInfo, appendInfoRequest(nil, "nope"))
	rc.expect(optInfo, repErrUnknown, `no export named "nope"`)
	rc.option(optGo, []byte{0, 0, 0, 9, 'd'})
	rc.expect(optGo, repErrInvalid, "exceeds")
	rc.option(optList, nil)
	if typ, data := rc.reply(optList); typ != repServer || !bytes.Equal(data, append(appendString(nil, "d"), "a disk"...)) {
		t.Fatalf("NBD_OPT_LIST: %s %q", repName(typ), data)
	}
	rc.expect(optList, repAck, "")
	// NBD_OPT_INFO with name and description requested
	rc.option(optInfo, appendInfoRequest(nil, "d", infoName, infoDescription))
	var info exportInfo
	for {
		typ, data := rc.reply(optInfo)
		if typ == repAck {
			break
		}
		if err := parseInfoReply(data, &info); typ != repInfo || err != nil {
			t.Fatalf("NBD_OPT_INFO: %s %v", repName(typ), err)
		}
	}
	if !info.haveExport || info.size != 1<<20 || info.name != "d" || info.desc != "a disk" || info.blockSizes != (BlockSizes{1, 4096, 32 << 20}) {
		t.Fatalf("info %+v", info)
	}
	// NBD_OPT_EXPORT_NAME: size, flags, 124 zeroes; then simple replies
	rc.option(optExportName, []byte("d"))
	b := rc.read(8 + 2 + 124)
	if binary.BigEndian.Uint64(b) != 1<<20 || !bytes.Equal(b[10:], make([]byte, 124)) {
		t.Fatalf("NBD_OPT_EXPORT_NAME reply %x", b[:10])
	}
	if f := TransmissionFlags(binary.BigEndian.Uint16(b[8:])); f.Has(FlagSendDF) || f.Has(FlagReadOnly) {
		t.Fatalf("flags %v", f)
	}
	req := make([]byte, requestHeaderLen)
	putRequestHeader(req, requestHeader{typ: cmdRead, cookie: 42, offset: 0, length: 5})
	rc.write(req)
	r := rc.read(simpleReplyLen + 5)
	if binary.BigEndian.Uint32(r) != magicSimpleReply || binary.BigEndian.Uint32(r[4:]) != 0 || binary.BigEndian.Uint64(r[8:]) != 42 || string(r[16:]) != "hello" {
		t.Fatalf("read reply %x", r)
	}
	// a read beyond the end: an error and no data
	putRequestHeader(req, requestHeader{typ: cmdRead, cookie: 43, offset: 1 << 20, length: 1})
	rc.write(req)
	if r := rc.read(simpleReplyLen); Errno(binary.BigEndian.Uint32(r[4:])) != EINVAL {
		t.Fatalf("read beyond the end: %x", r)
	}
	// garbage: the server hangs up
	rc.write(bytes.Repeat([]byte{0xee}, requestHeaderLen))
	rc.closed()

	rc = dialRaw(t, sock, flagCFixedNewstyle|flagCNoZeroes)
	rc.option(optExportName, []byte("missing"))
	rc.closed()

	rc = dialRaw(t, sock, 1<<7) // unknown client flag
	rc.closed()

	rc = dialRaw(t, sock, flagCFixedNewstyle)
	rc.option(optAbort, nil)
	rc.expect(optAbort, repAck, "")
	rc.closed()
}

func TestServerForcedTLS(t *testing.T) {
	m := newMemExport(4096)
	_, sock, _ := startServer(t, &ServerOptions{TLSConfig: testTLS(t).serverConfig()}, map[string]Export{"d": m}, nil)
	rc := dialRaw(t, sock, flagCFixedNewstyle|flagCNoZeroes)
	for _, opt := range []uint32{optList, optStructuredReply, optGo, optInfo, 77} {
		rc.option(opt, nil)
		rc.expect(opt, repErrTLSReqd, "requires TLS")
	}
	rc.option(optExportName, []byte("d"))
	rc.closed()
}

// TestServerRequestErrors sends invalid requests through our client's
// internals and checks each is refused with the right error while the
// connection stays usable.
func TestServerRequestErrors(t *testing.T) {
	m := newMemExport(1 << 20)
	_, sock, _ := startServer(t, &ServerOptions{MaxBlockSize: 64 << 10}, map[string]Export{"d": m, "ro": newMemExport(4096)},
		map[string]ExportOptions{"ro": {ReadOnly: true}})
	ctx := testCtx(t)
	c := dialT(t, unixURI(sock, "d"), nil)
	tests := []struct {
		cmd         uint16
		off, length uint64
		flags       uint16
		want        Errno
	}{
		{99, 0, 0, 0, EINVAL},
		{cmdRead, 1 << 20, 512, 0, EINVAL},
		{cmdRead, 0, 128 << 10, 0, EINVAL}, // beyond the maximum block size
		{cmdRead, 0, 512, cmdFlagReqOne, EINVAL},
		{cmdWriteZeroes, 1<<20 - 512, 1024, 0, ENOSPC},
		{cmdWriteZeroes, 0, 512, cmdFlagFastZero, EINVAL},
		{cmdTrim, 1 << 21, 1, 0, ENOSPC},
		{cmdBlockStatus, 0, 512, 0, EINVAL}, // no context selected
		{cmdCache, 0, 512, 0, EINVAL},
	}
	for _, tt := range tests {
		req := &request{cmd: tt.cmd, off: tt.off, length: tt.length, buf: make([]byte, tt.length)}
		if err := c.start(ctx, req, tt.flags, nil); err != nil {
			t.Fatal(err)
		}
		err := c.wait(ctx, req)
		var se *ServerError
		if !errors.As(err, &se) || se.Errno != tt.want || se.Message == "" {
			t.Errorf("%s flags 0x%x off %d len %d: %v, want %v with a message", cmdName(tt.cmd), tt.flags, tt.off, tt.length, err, tt.want)
		}
	}
	if _, err := c.ReadAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatalf("connection unusable after refused requests: %v", err)
	}
	// A write longer than the maximum block size cannot be skipped: the
	// server hangs up, while the payload is still being sent (the send
	// fails) or after (the wait does).
	req := &request{cmd: cmdWrite, off: 0, length: 128 << 10}
	err := c.start(ctx, req, 0, make([]byte, 128<<10))
	if err == nil {
		err = c.wait(ctx, req)
	}
	if !strings.Contains(fmtErr(err), "server closed the connection") {
		t.Fatalf("oversized write: %v", err)
	}
}

func fmtErr(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}
