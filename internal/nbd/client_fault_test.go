package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// The client against scripted servers: reply reordering, fallbacks, and
// every kind of misbehaviour.

func dialFake(t *testing.T, tgt Target, opts *Options) *Client {
	t.Helper()
	c, err := Dial(testCtx(t), tgt, opts)
	if err != nil {
		t.Fatalf("dial fake: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestFakeOutOfOrderChunkedReplies(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	disk := randBytes(rng, 3*8192)
	clear(disk[8192+1000 : 8192+3000]) // the hole the server will report
	tgt := startFake(t, fakeConfig{size: uint64(len(disk))}, func(fs *fakeServer) {
		var reqs []requestHeader
		for range 3 {
			h, _, ok := fs.request()
			if !ok {
				return
			}
			reqs = append(reqs, h)
		}
		slices.Reverse(reqs)
		for _, h := range reqs {
			o, l := h.offset, uint64(h.length)
			// second half first, then the first half in two chunks, one a hole
			fs.data(h.cookie, 0, o+l/2, disk[o+l/2:o+l])
			fs.data(h.cookie, 0, o, disk[o:o+1000])
			if o == 8192 {
				fs.hole(h.cookie, 0, o+1000, 2000)
				fs.data(h.cookie, replyFlagDone, o+3000, disk[o+3000:o+l/2])
			} else {
				fs.data(h.cookie, replyFlagDone, o+1000, disk[o+1000:o+l/2])
			}
		}
	})
	c := dialFake(t, tgt, nil)
	got := make([]byte, len(disk))
	for i := range got {
		got[i] = 0xff // the hole must be zeroed by the client
	}
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.ReadAt(testCtx(t), got[i*8192:(i+1)*8192], int64(i)*8192); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if !bytes.Equal(got, disk) {
		t.Fatal("reassembled data differs")
	}
}

func TestFakeSimpleRepliesAndExportName(t *testing.T) {
	disk := bytes.Repeat([]byte("0123456789abcdef"), 1024)
	tgt := startFake(t, fakeConfig{size: uint64(len(disk)), unstructued: true, noGo: true}, func(fs *fakeServer) {
		for {
			h, payload, ok := fs.request()
			if !ok {
				return
			}
			switch h.typ {
			case cmdRead:
				fs.simple(h.cookie, 0, disk[h.offset:h.offset+uint64(h.length)])
			case cmdWrite:
				copy(disk[h.offset:], payload)
				fs.simple(h.cookie, 0, nil)
			case cmdDisc:
				return
			}
		}
	})
	c := dialFake(t, tgt, nil)
	if c.StructuredReplies() {
		t.Fatal("structured replies negotiated with a server refusing them")
	}
	ctx := testCtx(t)
	if _, err := c.WriteAt(ctx, []byte("XYZ"), 5); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 32)
	if _, err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if string(got) != "01234XYZ89abcdef0123456789abcdef" {
		t.Fatalf("got %q", got)
	}
	tgt2 := startFake(t, fakeConfig{size: 4096, unstructued: true}, nil)
	if _, err := Dial(ctx, tgt2, &Options{MetaContexts: []string{ContextBaseAllocation}}); !errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("meta contexts without structured replies: %v", err)
	}
}

func TestFakeBlockSizeConstraints(t *testing.T) {
	var lens []uint32
	var mu sync.Mutex
	tgt := startFake(t, fakeConfig{size: 1 << 20, blockSizes: &BlockSizes{512, 4096, 4096}}, func(fs *fakeServer) {
		for {
			h, _, ok := fs.request()
			if !ok || h.typ == cmdDisc {
				return
			}
			mu.Lock()
			lens = append(lens, h.length)
			mu.Unlock()
			fs.data(h.cookie, replyFlagDone, h.offset, make([]byte, h.length))
		}
	})
	c := dialFake(t, tgt, nil)
	ctx := testCtx(t)
	if _, err := c.ReadAt(ctx, make([]byte, 16384), 0); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if !slices.Equal(lens, []uint32{4096, 4096, 4096, 4096}) {
		t.Fatalf("request lengths %v, want 4 of 4096", lens)
	}
	mu.Unlock()
	if _, err := c.ReadAt(ctx, make([]byte, 512), 100); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("unaligned read: %v", err)
	}
	if _, err := c.ReadAt(ctx, make([]byte, 100), 512); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("unaligned read length: %v", err)
	}
}

func TestFakeBlockStatus(t *testing.T) {
	const size = 1 << 20
	tgt := startFake(t, fakeConfig{size: size, contexts: map[string]uint32{ContextBaseAllocation: 7, ContextDirtyBitmap("b"): 9}}, func(fs *fakeServer) {
		for {
			h, _, ok := fs.request()
			if !ok || h.typ != cmdBlockStatus {
				return
			}
			// the dirty bitmap answers first, with more than was asked for
			fs.chunk(h.cookie, 0, chunkBlockStatus, blockStatusPayload(9, 4096, 0, 4096, 0, 8192, StateDirty, 1<<30, 0))
			fs.chunk(h.cookie, replyFlagDone, chunkBlockStatus, blockStatusPayload(7, 65536, 0, 65536, StateHole|StateZero))
		}
	})
	c := dialFake(t, tgt, &Options{MetaContexts: []string{ContextBaseAllocation, ContextDirtyBitmap("b")}})
	ctx := testCtx(t)
	exts, err := c.BlockStatus(ctx, ContextDirtyBitmap("b"), 0, 12288)
	if err != nil {
		t.Fatal(err)
	}
	if want := []Extent{{0, 8192, 0}, {8192, 4096, StateDirty}}; !slices.Equal(exts, want) {
		t.Fatalf("dirty extents %v, want %v (merged, clipped to the request)", exts, want)
	}
	exts, err = c.BlockStatus(ctx, ContextBaseAllocation, 4096, size)
	if err != nil {
		t.Fatal(err)
	}
	if want := []Extent{{4096, 65536, 0}, {69632, 65536, StateHole | StateZero}}; !slices.Equal(exts, want) {
		t.Fatalf("allocation extents %v, want %v", exts, want)
	}
}

// TestFakeProtocolViolations checks that every kind of bad reply gives a
// ProtocolError naming the problem, ends the connection, and never hangs.
func TestFakeProtocolViolations(t *testing.T) {
	type reply func(fs *fakeServer, h requestHeader)
	tests := []struct {
		name  string
		cmd   uint16 // cmdRead (4096 bytes at 4096), cmdBlockStatus or cmdWrite
		reply reply
		want  string
	}{
		{"bad magic", cmdRead, func(fs *fakeServer, h requestHeader) { fs.write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")) }, "bad reply magic"},
		{"unknown cookie", cmdRead, func(fs *fakeServer, h requestHeader) { fs.data(h.cookie+100, replyFlagDone, 4096, make([]byte, 4096)) }, "no request in flight"},
		{"data beyond request", cmdRead, func(fs *fakeServer, h requestHeader) { fs.data(h.cookie, replyFlagDone, 6144, make([]byte, 4096)) }, "outside the request"},
		{"data before request", cmdRead, func(fs *fakeServer, h requestHeader) { fs.data(h.cookie, replyFlagDone, 0, make([]byte, 10)) }, "outside the request"},
		{"chunk longer than request", cmdRead, func(fs *fakeServer, h requestHeader) {
			b := make([]byte, structuredReplyLen)
			putChunkHeader(b, chunkHeader{flags: replyFlagDone, typ: chunkOffsetData, cookie: h.cookie, length: 1 << 31})
			fs.write(b)
		}, "for a read of 4096 bytes"},
		{"overlapping chunks", cmdRead, func(fs *fakeServer, h requestHeader) {
			fs.data(h.cookie, 0, 4096, make([]byte, 2048))
			fs.data(h.cookie, replyFlagDone, 5000, make([]byte, 100))
		}, "overlaps"},
		{"hole overlapping data", cmdRead, func(fs *fakeServer, h requestHeader) {
			fs.data(h.cookie, 0, 4096, make([]byte, 2048))
			fs.hole(h.cookie, replyFlagDone, 4096, 4096)
		}, "overlaps"},
		{"short success", cmdRead, func(fs *fakeServer, h requestHeader) { fs.data(h.cookie, replyFlagDone, 4096, make([]byte, 4000)) }, "ended after 4000 bytes"},
		{"simple reply to structured read", cmdRead, func(fs *fakeServer, h requestHeader) { fs.simple(h.cookie, 0, make([]byte, 4096)) }, "simple reply to NBD_CMD_READ"},
		{"none with payload", cmdRead, func(fs *fakeServer, h requestHeader) { fs.chunk(h.cookie, replyFlagDone, chunkNone, []byte{1}) }, "must be empty and final"},
		{"none not final", cmdRead, func(fs *fakeServer, h requestHeader) { fs.chunk(h.cookie, 0, chunkNone, nil) }, "must be empty and final"},
		{"hole of bad length", cmdRead, func(fs *fakeServer, h requestHeader) { fs.chunk(h.cookie, replyFlagDone, chunkOffsetHole, make([]byte, 16)) }, "want 12"},
		{"hole of size 0", cmdRead, func(fs *fakeServer, h requestHeader) { fs.hole(h.cookie, replyFlagDone, 4096, 0) }, "hole size 0"},
		{"unknown chunk type", cmdRead, func(fs *fakeServer, h requestHeader) { fs.chunk(h.cookie, replyFlagDone, 77, nil) }, "unexpected chunk type"},
		{"block status for read", cmdRead, func(fs *fakeServer, h requestHeader) {
			fs.chunk(h.cookie, replyFlagDone, chunkBlockStatus, blockStatusPayload(1, 4096, 0))
		}, "unexpected NBD_REPLY_TYPE_BLOCK_STATUS"},
		{"error value 0", cmdRead, func(fs *fakeServer, h requestHeader) { fs.errorChunk(h.cookie, replyFlagDone, chunkError, 0, "") }, "error value 0"},
		{"error message too long", cmdRead, func(fs *fakeServer, h requestHeader) {
			fs.chunk(h.cookie, replyFlagDone, chunkError, []byte{0, 0, 0, 5, 0, 200, 'x'})
		}, "exceeds payload"},
		{"error offset outside", cmdRead, func(fs *fakeServer, h requestHeader) {
			fs.errorChunk(h.cookie, replyFlagDone, chunkErrorOffset, EIO, "bad", 1<<40)
		}, "outside the request"},
		{"data for write", cmdWrite, func(fs *fakeServer, h requestHeader) { fs.data(h.cookie, replyFlagDone, 0, []byte{1}) }, "unexpected NBD_REPLY_TYPE_OFFSET_DATA"},
		{"unknown context", cmdBlockStatus, func(fs *fakeServer, h requestHeader) {
			fs.chunk(h.cookie, replyFlagDone, chunkBlockStatus, blockStatusPayload(99, 4096, 0))
		}, "was not negotiated"},
		{"zero-length extent", cmdBlockStatus, func(fs *fakeServer, h requestHeader) {
			fs.chunk(h.cookie, replyFlagDone, chunkBlockStatus, blockStatusPayload(1, 4096, 0, 0, 1))
		}, "has length 0"},
		{"bad block status layout", cmdBlockStatus, func(fs *fakeServer, h requestHeader) {
			fs.chunk(h.cookie, replyFlagDone, chunkBlockStatus, blockStatusPayload(1, 4096, 0, 5))
		}, "positive multiple of 8"},
		{"context answered twice", cmdBlockStatus, func(fs *fakeServer, h requestHeader) {
			fs.chunk(h.cookie, 0, chunkBlockStatus, blockStatusPayload(1, 4096, 0))
			fs.chunk(h.cookie, replyFlagDone, chunkBlockStatus, blockStatusPayload(1, 4096, 0))
		}, "second chunk"},
		{"no extents", cmdBlockStatus, func(fs *fakeServer, h requestHeader) { fs.chunk(h.cookie, replyFlagDone, chunkNone, nil) }, "without extents"},
		{"simple reply to block status", cmdBlockStatus, func(fs *fakeServer, h requestHeader) { fs.simple(h.cookie, 0, nil) }, "simple reply without error"},
		{"huge block status", cmdBlockStatus, func(fs *fakeServer, h requestHeader) {
			b := make([]byte, structuredReplyLen)
			putChunkHeader(b, chunkHeader{flags: replyFlagDone, typ: chunkBlockStatus, cookie: h.cookie, length: 0xfffffff0})
			fs.write(b)
		}, "more than the"},
		{"extended header", cmdRead, func(fs *fakeServer, h requestHeader) {
			fs.write(binary.BigEndian.AppendUint32(nil, magicExtendedReply))
		}, "extended header"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tgt := startFake(t, fakeConfig{size: 1 << 20, contexts: map[string]uint32{ContextBaseAllocation: 1}}, func(fs *fakeServer) {
				h, _, ok := fs.request()
				if !ok {
					return
				}
				tt.reply(fs, h)
				fs.drain()
			})
			c := dialFake(t, tgt, &Options{MetaContexts: []string{ContextBaseAllocation}})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var err error
			switch tt.cmd {
			case cmdRead:
				_, err = c.ReadAt(ctx, make([]byte, 4096), 4096)
			case cmdWrite:
				_, err = c.WriteAt(ctx, make([]byte, 4096), 0)
			case cmdBlockStatus:
				_, err = c.BlockStatus(ctx, ContextBaseAllocation, 0, 4096)
			}
			var pe *ProtocolError
			if !errors.As(err, &pe) || !strings.Contains(err.Error(), tt.want) || !errors.Is(err, errs.ErrConnect) {
				t.Fatalf("got %v; want a protocol error containing %q", err, tt.want)
			}
			if _, err2 := c.ReadAt(ctx, make([]byte, 512), 0); !errors.As(err2, &pe) {
				t.Fatalf("call after a protocol error: %v, want the same protocol error", err2)
			}
		})
	}
}

func TestFakeServerErrorsKeepConnection(t *testing.T) {
	tgt := startFake(t, fakeConfig{size: 1 << 20}, func(fs *fakeServer) {
		for i := 0; ; i++ {
			h, _, ok := fs.request()
			if !ok || h.typ == cmdDisc {
				return
			}
			switch i {
			case 0: // an error after some data
				fs.data(h.cookie, 0, h.offset, make([]byte, 100))
				fs.errorChunk(h.cookie, 0, chunkErrorOffset, EIO, "bad sector", h.offset+100)
				fs.chunk(h.cookie, replyFlagDone, chunkNone, nil)
			case 1: // an error type this client does not know
				fs.errorChunk(h.cookie, replyFlagDone, chunkFlagError|0x55, ENOTSUP, "new kind of error")
			case 2: // a simple error reply to a write
				fs.simple(h.cookie, ENOSPC, nil)
			default:
				fs.data(h.cookie, replyFlagDone, h.offset, bytes.Repeat([]byte{7}, int(h.length)))
			}
		}
	})
	c := dialFake(t, tgt, nil)
	ctx := testCtx(t)
	_, err := c.ReadAt(ctx, make([]byte, 4096), 8192)
	var se *ServerError
	if !errors.As(err, &se) || se.Errno != EIO || se.ErrorOffset != 8292 || se.Message != "bad sector" {
		t.Fatalf("error offset chunk: %#v", err)
	}
	_, err = c.ReadAt(ctx, make([]byte, 4096), 0)
	if !errors.As(err, &se) || se.Errno != ENOTSUP || !errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("unknown error chunk: %v", err)
	}
	_, err = c.WriteAt(ctx, make([]byte, 4096), 0)
	if !errors.Is(err, errs.ErrNoSpace) {
		t.Fatalf("simple error reply: %v", err)
	}
	buf := make([]byte, 4096)
	if _, err := c.ReadAt(ctx, buf, 0); err != nil || buf[4095] != 7 {
		t.Fatalf("read after server errors: %v", err)
	}
}

func TestFakeConnectionDropsInFlight(t *testing.T) {
	tgt := startFake(t, fakeConfig{size: 1 << 20}, func(fs *fakeServer) {
		for range 3 {
			if _, _, ok := fs.request(); !ok {
				return
			}
		}
		fs.conn.Close()
	})
	c := dialFake(t, tgt, nil)
	ctx := testCtx(t)
	errc := make(chan error, 3)
	for i := range 3 {
		go func() { _, err := c.ReadAt(ctx, make([]byte, 4096), int64(i)*4096); errc <- err }()
	}
	for range 3 {
		err := <-errc
		if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "server closed the connection") {
			t.Fatalf("request in flight when the server hung up: %v", err)
		}
	}
	if _, err := c.ReadAt(ctx, make([]byte, 4096), 0); !errors.Is(err, errs.ErrConnect) {
		t.Fatalf("request after the server hung up: %v", err)
	}
}

func TestFakeCancelAndLateReply(t *testing.T) {
	release := make(chan struct{})
	tgt := startFake(t, fakeConfig{size: 1 << 20}, func(fs *fakeServer) {
		first, _, ok := fs.request()
		if !ok {
			return
		}
		<-release // the client has given up on the first request
		fs.data(first.cookie, replyFlagDone, first.offset, bytes.Repeat([]byte{1}, int(first.length)))
		h, _, ok := fs.request()
		if !ok {
			return
		}
		fs.data(h.cookie, replyFlagDone, h.offset, bytes.Repeat([]byte{2}, int(h.length)))
		fs.drain()
	})
	c := dialFake(t, tgt, nil)
	buf := make([]byte, 4096)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.ReadAt(ctx, buf, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled read: %v", err)
	}
	close(release)
	buf2 := make([]byte, 4096)
	if _, err := c.ReadAt(testCtx(t), buf2, 0); err != nil || buf2[0] != 2 {
		t.Fatalf("read after a cancelled one: %v", err)
	}
	if buf[0] != 0 {
		t.Fatal("the late reply to the abandoned read was written into its buffer")
	}
}

func TestFakeCancelWhileServerStallsMidChunk(t *testing.T) {
	tgt := startFake(t, fakeConfig{size: 1 << 20}, func(fs *fakeServer) {
		h, _, ok := fs.request()
		if !ok {
			return
		}
		b := make([]byte, structuredReplyLen)
		putChunkHeader(b, chunkHeader{flags: replyFlagDone, typ: chunkOffsetData, cookie: h.cookie, length: 8 + h.length})
		fs.write(append(append(b, binary.BigEndian.AppendUint64(nil, h.offset)...), 1, 2, 3)) // 3 of 65536 bytes
		_, _ = io.Copy(io.Discard, fs.br)
	})
	c := dialFake(t, tgt, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := c.ReadAt(ctx, make([]byte, 65536), 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled read: %v", err)
	}
	if d := time.Since(start); d > cancelGrace+2*time.Second {
		t.Fatalf("cancelled read took %v", d)
	}
	if _, err := c.ReadAt(testCtx(t), make([]byte, 512), 0); !errors.Is(err, errs.ErrConnect) {
		t.Fatalf("read after a stalled chunk: %v, want the connection closed", err)
	}
}

func TestFakeHandshakeFailures(t *testing.T) {
	greetWith := func(magic2 uint64) func(fs *fakeServer) {
		return func(fs *fakeServer) {
			b := binary.BigEndian.AppendUint64(nil, magicInit)
			fs.write(binary.BigEndian.AppendUint64(b, magic2))
			fs.write(make([]byte, 140))
		}
	}
	afterGreeting := func(f func(fs *fakeServer, opt uint32, data []byte)) func(fs *fakeServer) {
		return func(fs *fakeServer) {
			if !fs.greet(flagFixedNewstyle | flagNoZeroes) {
				return
			}
			opt, data, ok := fs.readOption()
			if ok {
				f(fs, opt, data)
			}
			_, _ = io.Copy(io.Discard, fs.br)
		}
	}
	tests := []struct {
		name  string
		hs    func(fs *fakeServer)
		opts  *Options
		class error
		want  string
	}{
		{"not nbd", func(fs *fakeServer) { fs.write([]byte("SSH-2.0-OpenSSH_9.2p1 Debian\r\n")) }, nil, errs.ErrConnect, "not an NBD server"},
		{"oldstyle", greetWith(magicOldstyle), nil, errs.ErrUnsupported, "oldstyle"},
		{"bad second magic", greetWith(0x1234), nil, errs.ErrConnect, "neither IHAVEOPT"},
		{"closes at once", func(fs *fakeServer) {}, nil, errs.ErrConnect, "closed the connection"},
		{"reply to another option", afterGreeting(func(fs *fakeServer, opt uint32, _ []byte) { fs.optReply(optList, repAck, nil) }), nil, errs.ErrConnect, "while waiting for the reply to NBD_OPT_STRUCTURED_REPLY"},
		{"bad reply magic", afterGreeting(func(fs *fakeServer, opt uint32, _ []byte) { fs.write(make([]byte, 20)) }), nil, errs.ErrConnect, "bad option reply magic"},
		{"huge reply", afterGreeting(func(fs *fakeServer, opt uint32, _ []byte) {
			fs.write(appendOptReplyHeader(nil, opt, repAck, 1<<30))
		}), nil, errs.ErrConnect, "more than the"},
		{"tls required", afterGreeting(func(fs *fakeServer, opt uint32, _ []byte) {
			fs.optReply(opt, repErrTLSReqd, []byte("TLS first"))
		}), nil, errs.ErrUnsupported, "nbds://"},
		{"go without export info", func(fs *fakeServer) {
			fs.greet(flagFixedNewstyle)
			for {
				opt, _, ok := fs.readOption()
				if !ok {
					return
				}
				fs.optReply(opt, repAck, nil)
			}
		}, nil, errs.ErrConnect, "without NBD_INFO_EXPORT"},
		{"bad block sizes", func(fs *fakeServer) {
			fs.greet(flagFixedNewstyle)
			for {
				opt, _, ok := fs.readOption()
				if !ok {
					return
				}
				if opt == optGo {
					p := binary.BigEndian.AppendUint16(nil, infoBlockSize)
					fs.optReply(opt, repInfo, append(p, 0, 0, 0, 3, 0, 0, 16, 0, 0, 0, 16, 0))
				}
				fs.optReply(opt, repAck, nil)
			}
		}, nil, errs.ErrConnect, "minimum block size 3"},
		{"unknown export", func(fs *fakeServer) {
			fs.greet(flagFixedNewstyle)
			for {
				opt, _, ok := fs.readOption()
				if !ok {
					return
				}
				if opt == optGo {
					fs.optReply(opt, repErrUnknown, nil)
				} else {
					fs.optReply(opt, repAck, nil)
				}
			}
		}, nil, errs.ErrNotFound, `no export named "e"`},
		{"export name refused", func(fs *fakeServer) {
			fs.greet(0) // not fixed newstyle: the client can only send NBD_OPT_EXPORT_NAME
			fs.readOption()
		}, nil, errs.ErrNotFound, "probably does not exist"},
		{"context id twice", func(fs *fakeServer) {
			fs.greet(flagFixedNewstyle)
			for {
				opt, _, ok := fs.readOption()
				if !ok {
					return
				}
				if opt == optSetMetaContext {
					fs.optReply(opt, repMetaContext, append([]byte{0, 0, 0, 1}, "base:allocation"...))
					fs.optReply(opt, repMetaContext, append([]byte{0, 0, 0, 1}, "qemu:x"...))
				}
				fs.optReply(opt, repAck, nil)
			}
		}, &Options{MetaContexts: []string{ContextBaseAllocation}}, errs.ErrConnect, "given twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tgt := startFake(t, fakeConfig{handshake: tt.hs}, nil)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := Dial(ctx, tgt, tt.opts)
			if err == nil {
				c.Close()
				t.Fatal("handshake succeeded")
			}
			if !errors.Is(err, tt.class) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v; want class %v and %q", err, tt.class, tt.want)
			}
		})
	}
}

func TestFakeHandshakeHonoursContext(t *testing.T) {
	tgt := startFake(t, fakeConfig{handshake: func(fs *fakeServer) {
		fs.greet(flagFixedNewstyle)
		_, _ = io.Copy(io.Discard, fs.br) // never answers an option
	}}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Dial(ctx, tgt, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial to a silent server: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("dial returned after %v", d)
	}
}
