package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// TestPeerWaitsHaveDeadlines is the rule "every peer wait has a deadline"
// for NBD: servers that accept and stall, greet and stall, answer garbage,
// or stall in the transmission phase (no reply, half a reply). Calls made
// with contexts that have no deadline still end within a bound, with an
// error of class errs.ErrConnect naming the server.
func TestPeerWaitsHaveDeadlines(t *testing.T) {
	opts := &Options{HandshakeTimeout: 500 * time.Millisecond, IdleTimeout: 500 * time.Millisecond}
	stall := func(fs *fakeServer) { _, _ = io.Copy(io.Discard, fs.br) }
	tests := []struct {
		name      string
		cfg       fakeConfig
		script    func(fs *fakeServer)
		handshake bool // Dial fails
		want      string
	}{
		{name: "accept and stall", cfg: fakeConfig{handshake: stall}, handshake: true, want: "no answer to the handshake within 500ms"},
		{name: "greet and stall", cfg: fakeConfig{handshake: func(fs *fakeServer) { fs.greet(flagFixedNewstyle); stall(fs) }}, handshake: true, want: "no answer to the handshake"},
		{name: "garbage greeting", cfg: fakeConfig{handshake: func(fs *fakeServer) { fs.write([]byte("SSH-2.0-OpenSSH_9.2\r\n")); stall(fs) }}, handshake: true, want: "nbd"},
		{name: "no reply", cfg: fakeConfig{size: 1 << 20}, script: stall, want: "sent nothing for 500ms"},
		{name: "half a reply", cfg: fakeConfig{size: 1 << 20}, script: func(fs *fakeServer) {
			h, _, ok := fs.request()
			if !ok {
				return
			}
			b := make([]byte, structuredReplyLen)
			putChunkHeader(b, chunkHeader{flags: replyFlagDone, typ: chunkOffsetData, cookie: h.cookie, length: 8 + h.length})
			fs.write(append(append(b, binary.BigEndian.AppendUint64(nil, h.offset)...), 1, 2, 3))
			stall(fs)
		}, want: "sent nothing for 500ms"},
		{name: "garbage reply", cfg: fakeConfig{size: 1 << 20}, script: func(fs *fakeServer) {
			fs.request()
			fs.write([]byte("this is not an NBD reply"))
			stall(fs)
		}, want: "bad reply magic"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tgt := startFake(t, tt.cfg, tt.script)
			start := time.Now()
			c, err := Dial(context.Background(), tgt, opts)
			if err == nil {
				defer c.Close()
				if tt.handshake {
					t.Fatal("Dial succeeded")
				}
				_, err = c.ReadAt(context.Background(), make([]byte, 65536), 0)
			}
			if !errors.Is(err, errs.ErrConnect) && !(tt.name == "garbage greeting" && err != nil) {
				t.Fatalf("err = %v, want errs.ErrConnect", err)
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), filepath.Base(tgt.Address)) {
				t.Fatalf("err = %v, want %q and the server", err, tt.want)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Fatalf("took %s", d)
			}
		})
	}
}

// TestIdleTimeoutSparesSlowServers: a server that trickles a reply, never
// silent for as long as the idle limit, is slow but alive; an idle
// connection with no request in flight is not failed either.
func TestIdleTimeoutSparesSlowServers(t *testing.T) {
	const idle = 300 * time.Millisecond
	tgt := startFake(t, fakeConfig{size: 1 << 20}, func(fs *fakeServer) {
		for {
			h, _, ok := fs.request()
			if !ok || h.typ == cmdDisc {
				return
			}
			b := make([]byte, structuredReplyLen)
			putChunkHeader(b, chunkHeader{flags: replyFlagDone, typ: chunkOffsetData, cookie: h.cookie, length: 8 + h.length})
			msg := append(append(b, binary.BigEndian.AppendUint64(nil, h.offset)...), make([]byte, h.length)...)
			for len(msg) > 0 { // 3 x idle in all, a piece every idle/3
				n := min(len(msg), 1+len(msg)/8)
				fs.write(msg[:n])
				msg = msg[n:]
				time.Sleep(idle / 3)
			}
		}
	})
	c := dialFake(t, tgt, &Options{IdleTimeout: idle})
	time.Sleep(3 * idle) // idle with nothing in flight
	start := time.Now()
	if _, err := c.ReadAt(context.Background(), make([]byte, 4096), 0); err != nil {
		t.Fatalf("slow read: %v", err)
	}
	if d := time.Since(start); d < 2*idle {
		t.Fatalf("the read took %s: the server did not trickle", d)
	}
}

// cappedListener accepts n connections and then no more, leaving later
// ones in the listen queue (as QEMU's NBD server does at max-connections).
type cappedListener struct {
	net.Listener
	n      atomic.Int32
	closed chan struct{}
	once   sync.Once
}

func (l *cappedListener) Accept() (net.Conn, error) {
	if l.n.Add(-1) < 0 {
		<-l.closed
		return nil, net.ErrClosed
	}
	return l.Listener.Accept()
}

func (l *cappedListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// TestPoolAtConnectionLimit: asking for more connections than the server
// accepts fails with a clear error within the handshake limit, instead of
// waiting forever at "opening connection N+1".
func TestPoolAtConnectionLimit(t *testing.T) {
	s := NewServer(nil)
	if err := s.AddExport("e", newMemExport(1<<20), ExportOptions{ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(shortTempDir(t), "nbd.sock")
	ul, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l := &cappedListener{Listener: ul, closed: make(chan struct{})}
	l.n.Store(3)
	go s.Serve(l)
	t.Cleanup(func() { l.Close(); s.Close() })
	start := time.Now()
	_, err = DialPool(context.Background(), Target{Network: "unix", Address: sock, Export: "e"}, 8, &Options{HandshakeTimeout: 500 * time.Millisecond})
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "opening connection 4 of 8") || !strings.Contains(err.Error(), "at its connection limit") {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("took %s", d)
	}
}
