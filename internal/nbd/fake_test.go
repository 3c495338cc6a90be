package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// fakeServer is a scripted NBD server for unit tests of the client's
// protocol handling and failure paths. It performs a canned handshake
// described by fakeConfig, then runs a script that reads requests and
// writes whatever bytes the test wants.
type fakeServer struct {
	t    testing.TB
	conn net.Conn
	br   *bufio.Reader
}

type fakeConfig struct {
	size        uint64
	flags       TransmissionFlags
	unstructued bool              // refuse NBD_OPT_STRUCTURED_REPLY
	contexts    map[string]uint32 // granted metadata contexts
	blockSizes  *BlockSizes
	noGo        bool // refuse NBD_OPT_GO: the client must fall back to NBD_OPT_EXPORT_NAME
	// handshake, if set, replaces the canned handshake entirely.
	handshake func(fs *fakeServer)
}

// startFake listens on a unix socket, serves one connection with cfg and
// script, and returns the target. The script runs on its own goroutine;
// the test waits for it at cleanup.
func startFake(t testing.TB, cfg fakeConfig, script func(fs *fakeServer)) Target {
	t.Helper()
	sock := filepath.Join(shortTempDir(t), "fake.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer l.Close()
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		fs := &fakeServer{t: t, conn: conn, br: bufio.NewReader(conn)}
		if cfg.handshake != nil {
			cfg.handshake(fs)
		} else if !fs.cannedHandshake(cfg) {
			return
		}
		if script != nil {
			script(fs)
		}
	}()
	t.Cleanup(func() { l.Close(); wg.Wait() })
	return Target{Network: "unix", Address: sock, Export: "e"}
}

func (fs *fakeServer) write(b []byte) {
	_, _ = fs.conn.Write(b)
}

func (fs *fakeServer) readFull(n int) ([]byte, bool) {
	b := make([]byte, n)
	_, err := io.ReadFull(fs.br, b)
	return b, err == nil
}

func (fs *fakeServer) greet(hflags uint16) bool {
	b := binary.BigEndian.AppendUint64(nil, magicInit)
	b = binary.BigEndian.AppendUint64(b, magicOpts)
	fs.write(binary.BigEndian.AppendUint16(b, hflags))
	_, ok := fs.readFull(4)
	return ok
}

// readOption reads one option; ok is false when the client went away.
func (fs *fakeServer) readOption() (opt uint32, data []byte, ok bool) {
	h, ok := fs.readFull(16)
	if !ok {
		return 0, nil, false
	}
	opt = binary.BigEndian.Uint32(h[8:])
	data, ok = fs.readFull(int(binary.BigEndian.Uint32(h[12:])))
	return opt, data, ok
}

func (fs *fakeServer) optReply(opt, typ uint32, data []byte) {
	fs.write(append(appendOptReplyHeader(nil, opt, typ, len(data)), data...))
}

func (fs *fakeServer) cannedHandshake(cfg fakeConfig) bool {
	if !fs.greet(flagFixedNewstyle | flagNoZeroes) {
		return false
	}
	for {
		opt, data, ok := fs.readOption()
		if !ok {
			return false
		}
		switch opt {
		case optStructuredReply:
			if cfg.unstructued {
				fs.optReply(opt, repErrUnsup, nil)
			} else {
				fs.optReply(opt, repAck, nil)
			}
		case optSetMetaContext:
			_, queries, _ := parseMetaContextRequest(data)
			for _, q := range queries {
				if id, ok := cfg.contexts[q]; ok {
					fs.optReply(opt, repMetaContext, append(binary.BigEndian.AppendUint32(nil, id), q...))
				}
			}
			fs.optReply(opt, repAck, nil)
		case optGo:
			if cfg.noGo {
				fs.optReply(opt, repErrUnsup, nil)
				continue
			}
			p := binary.BigEndian.AppendUint16(nil, infoExport)
			p = binary.BigEndian.AppendUint64(p, cfg.size)
			fs.optReply(opt, repInfo, binary.BigEndian.AppendUint16(p, uint16(cfg.flags|FlagHasFlags)))
			if bs := cfg.blockSizes; bs != nil {
				p = binary.BigEndian.AppendUint16(nil, infoBlockSize)
				p = binary.BigEndian.AppendUint32(p, bs.Min)
				p = binary.BigEndian.AppendUint32(p, bs.Preferred)
				fs.optReply(opt, repInfo, binary.BigEndian.AppendUint32(p, bs.Max))
			}
			fs.optReply(opt, repAck, nil)
			return true
		case optExportName:
			p := binary.BigEndian.AppendUint64(nil, cfg.size)
			fs.write(binary.BigEndian.AppendUint16(p, uint16(cfg.flags|FlagHasFlags)))
			return true
		default:
			fs.optReply(opt, repErrUnsup, nil)
		}
	}
}

// request reads one request (and a WRITE's payload).
func (fs *fakeServer) request() (requestHeader, []byte, bool) {
	b, ok := fs.readFull(requestHeaderLen)
	if !ok {
		return requestHeader{}, nil, false
	}
	h, err := parseRequestHeader(b)
	if err != nil {
		fs.t.Errorf("fake server: %v", err)
		return requestHeader{}, nil, false
	}
	var payload []byte
	if h.typ == cmdWrite {
		if payload, ok = fs.readFull(int(h.length)); !ok {
			return h, nil, false
		}
	}
	return h, payload, true
}

// drain reads requests without answering them until NBD_CMD_DISC or the
// end of the connection, then closes it as a server must after DISC.
func (fs *fakeServer) drain() {
	for {
		h, _, ok := fs.request()
		if !ok || h.typ == cmdDisc {
			fs.conn.Close()
			return
		}
	}
}

func (fs *fakeServer) simple(cookie uint64, errno Errno, data []byte) {
	b := make([]byte, simpleReplyLen)
	putSimpleReply(b, errno, cookie)
	fs.write(append(b, data...))
}

func (fs *fakeServer) chunk(cookie uint64, flags, typ uint16, payload []byte) {
	b := make([]byte, structuredReplyLen)
	putChunkHeader(b, chunkHeader{flags: flags, typ: typ, cookie: cookie, length: uint32(len(payload))})
	fs.write(append(b, payload...))
}

func (fs *fakeServer) data(cookie uint64, flags uint16, off uint64, data []byte) {
	fs.chunk(cookie, flags, chunkOffsetData, append(binary.BigEndian.AppendUint64(nil, off), data...))
}

func (fs *fakeServer) hole(cookie uint64, flags uint16, off uint64, size uint32) {
	fs.chunk(cookie, flags, chunkOffsetHole, binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, off), size))
}

func (fs *fakeServer) errorChunk(cookie uint64, flags, typ uint16, errno Errno, msg string, off ...uint64) {
	p := appendErrorChunkPayload(nil, errno, msg)
	for _, o := range off {
		p = binary.BigEndian.AppendUint64(p, o)
	}
	fs.chunk(cookie, flags, typ, p)
}

func blockStatusPayload(id uint32, descs ...uint32) []byte {
	p := binary.BigEndian.AppendUint32(nil, id)
	for _, d := range descs {
		p = binary.BigEndian.AppendUint32(p, d)
	}
	return p
}
