package xapitest

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/qmp"
)

// nbdServer is the pool's NBD server: a real qemu-storage-daemon, driven
// over QMP, serving each VDI a session asked for (VDI.get_nbd_info) as a
// read-only export named "/<vdi-uuid>?session_id=<session>", as XenServer's
// NBD server names them, over TLS (nbd networks) or not (insecure_nbd).
//
// In front of it, as xapi-nbd's accept loop (ocaml/nbd/src/main.ml), the
// port clients are given counts every client connection of the host and
// closes, before the NBD greeting, any beyond the limit
// (Consts.connection_limit = 16, ocaml/nbd/lib/consts.ml).
type nbdServer struct {
	cmd     *exec.Cmd
	qmp     *qmp.Client
	port    int // the limiting front, given to clients
	backend string
	seq     int
	exports map[string]string // export name -> export id
	nodes   map[string]string // export id -> node name

	front net.Listener
	tls   *tls.Config // nil: plain NBD (insecure_nbd)
	// validSession reports whether a session reference is logged in.
	validSession func(string) bool
	limit        int
	cmu          sync.Mutex
	conns        map[net.Conn]bool
	open         int // client connections now
	peak         int // most at once
	refused      int // closed for being beyond the limit
	stopOnce     sync.Once
}

// serveFront accepts client connections and relays them to the daemon.
func (n *nbdServer) serveFront() {
	for {
		c, err := n.front.Accept()
		if err != nil {
			return
		}
		n.cmu.Lock()
		n.open++ // inc_conn: counted before the check, as xapi-nbd
		if n.open > n.limit {
			n.open--
			n.refused++
			n.cmu.Unlock()
			c.Close() // "Server busy: already at maximum 16 connections."
			continue
		}
		n.peak = max(n.peak, n.open)
		n.conns[c] = true
		n.cmu.Unlock()
		go n.relay(c)
	}
}

func (n *nbdServer) relay(c net.Conn) {
	defer func() {
		c.Close()
		n.cmu.Lock()
		delete(n.conns, c)
		n.open--
		n.cmu.Unlock()
	}()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	client, export, err := n.handshake(c)
	if err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	// As xapi-nbd's with_session: the session in the export name must be
	// alive when the client connects (Session.get_uuid), else the
	// connection is closed.
	if _, q, _ := strings.Cut(export, "?session_id="); n.validSession != nil && !n.validSession(q) {
		return
	}
	b, err := net.Dial("tcp", n.backend)
	if err != nil {
		return
	}
	defer b.Close()
	// The daemon's own handshake: its greeting, the client's flags (the
	// fixed newstyle only, as xapi-nbd offers no others), the export name.
	var greet [18]byte
	if _, err := io.ReadFull(b, greet[:]); err != nil {
		return
	}
	req := binary.BigEndian.AppendUint32(nil, nbdFlagFixedNewstyle)
	req = binary.BigEndian.AppendUint64(req, nbdIHaveOpt)
	req = binary.BigEndian.AppendUint32(req, nbdOptExportName)
	req = binary.BigEndian.AppendUint32(req, uint32(len(export)))
	if _, err := b.Write(append(req, export...)); err != nil {
		return
	}
	done := make(chan struct{}, 2)
	go func() { io.Copy(b, client); b.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(client, b); done <- struct{}{} }()
	<-done
}

// NBD handshake constants (the NBD protocol's newstyle negotiation).
const (
	nbdMagic             = 0x4e42444d41474943
	nbdIHaveOpt          = 0x49484156454F5054
	nbdReplyMagic        = 0x3e889045565a9
	nbdFlagFixedNewstyle = 1
	nbdOptExportName     = 1
	nbdOptAbort          = 2
	nbdOptList           = 3
	nbdOptStartTLS       = 5
	nbdRepAck            = 1
	nbdRepErrUnsup       = 1<<31 | 1
	nbdRepErrPolicy      = 1<<31 | 2
	nbdRepErrInvalid     = 1<<31 | 3
	nbdRepErrTLSReqd     = 1<<31 | 5
)

// handshake negotiates with a client as xapi-nbd does (xapi-project/nbd
// lib/server.ml, Server.connect): the fixed newstyle only; with TLS,
// every option but NBD_OPT_STARTTLS before it is answered "TLS required";
// NBD_OPT_EXPORT_NAME selects the export; NBD_OPT_LIST is refused
// (policy); every other option, NBD_OPT_GO, NBD_OPT_INFO,
// NBD_OPT_STRUCTURED_REPLY and NBD_OPT_SET_META_CONTEXT among them, is
// "unsupported": no structured replies, so no block status. It returns the
// connection (TLS once started) and the export name asked for.
func (n *nbdServer) handshake(c net.Conn) (net.Conn, string, error) {
	greet := binary.BigEndian.AppendUint64(nil, nbdMagic)
	greet = binary.BigEndian.AppendUint64(greet, nbdIHaveOpt)
	greet = binary.BigEndian.AppendUint16(greet, nbdFlagFixedNewstyle)
	if _, err := c.Write(greet); err != nil {
		return nil, "", err
	}
	var flags [4]byte
	if _, err := io.ReadFull(c, flags[:]); err != nil {
		return nil, "", err
	}
	conn, tlsOn := c, false
	for {
		var hdr [16]byte
		if _, err := io.ReadFull(conn, hdr[:]); err != nil {
			return nil, "", err
		}
		opt, length := binary.BigEndian.Uint32(hdr[8:]), binary.BigEndian.Uint32(hdr[12:])
		if binary.BigEndian.Uint64(hdr[:8]) != nbdIHaveOpt || length > 4096 {
			return nil, "", fmt.Errorf("bad option header")
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(conn, data); err != nil {
			return nil, "", err
		}
		reply := func(typ uint32) error {
			r := binary.BigEndian.AppendUint64(nil, nbdReplyMagic)
			r = binary.BigEndian.AppendUint32(r, opt)
			r = binary.BigEndian.AppendUint32(r, typ)
			r = binary.BigEndian.AppendUint32(r, 0)
			_, err := conn.Write(r)
			return err
		}
		var err error
		switch {
		case n.tls != nil && !tlsOn && opt == nbdOptStartTLS:
			if err = reply(nbdRepAck); err == nil {
				t := tls.Server(conn, n.tls)
				if err = t.Handshake(); err == nil {
					conn, tlsOn = t, true
				}
			}
		case n.tls != nil && !tlsOn && (opt == nbdOptExportName || opt == nbdOptAbort):
			return nil, "", fmt.Errorf("option %d before TLS", opt)
		case n.tls != nil && !tlsOn:
			err = reply(nbdRepErrTLSReqd)
		case opt == nbdOptExportName:
			return conn, string(data), nil
		case opt == nbdOptAbort:
			reply(nbdRepAck)
			return nil, "", fmt.Errorf("client aborted")
		case opt == nbdOptStartTLS && tlsOn:
			err = reply(nbdRepErrInvalid)
		case opt == nbdOptStartTLS, opt == nbdOptList:
			err = reply(nbdRepErrPolicy)
		default:
			err = reply(nbdRepErrUnsup)
		}
		if err != nil {
			return nil, "", err
		}
	}
}

func startNBD(ctx context.Context, dir string, tlsConfig *tls.Config, limit int) (*nbdServer, error) {
	// The listening socket is made here and inherited as fd 3, so the port
	// is known without a race.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sock := filepath.Join(dir, "qsd.qmp")
	args := []string{"--chardev", "socket,id=m,path=" + sock + ",server=on,wait=off", "--monitor", "chardev=m"}
	args = append(args, "--nbd-server", "addr.type=fd,addr.str=3")
	cmd := exec.Command("qemu-storage-daemon", args...)
	cmd.ExtraFiles = []*os.File{f} // its TLS failures are the client's to report
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start qemu-storage-daemon: %w", err)
	}
	n := &nbdServer{cmd: cmd, backend: ln.Addr().String(), exports: map[string]string{}, nodes: map[string]string{},
		limit: limit, conns: map[net.Conn]bool{}, tls: tlsConfig}
	if n.front, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		n.stop()
		return nil, err
	}
	n.port = n.front.Addr().(*net.TCPAddr).Port
	go n.serveFront()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if n.qmp, err = qmp.Dial(ctx, sock); err == nil {
			return n, nil
		}
	}
	n.stop()
	return nil, fmt.Errorf("connect to qemu-storage-daemon: %w", err)
}

// export serves the raw file path read-only under name (idempotent).
func (n *nbdServer) export(ctx context.Context, name, path string) error {
	if _, ok := n.exports[name]; ok {
		return nil
	}
	n.seq++
	node, id := fmt.Sprintf("n%d", n.seq), fmt.Sprintf("e%d", n.seq)
	err := n.qmp.Execute(ctx, "blockdev-add", map[string]any{"driver": "raw", "node-name": node, "read-only": true,
		"file": map[string]any{"driver": "file", "filename": path, "read-only": true}}, nil)
	if err != nil {
		return fmt.Errorf("blockdev-add: %w", err)
	}
	err = n.qmp.Execute(ctx, "block-export-add", map[string]any{"type": "nbd", "id": id, "node-name": node, "name": name, "writable": false}, nil)
	if err != nil {
		n.qmp.Execute(ctx, "blockdev-del", map[string]any{"node-name": node}, nil)
		return fmt.Errorf("block-export-add: %w", err)
	}
	n.exports[name] = id
	n.nodes[id] = node
	return nil
}

// unexport removes an export, dropping its clients, and its node.
func (n *nbdServer) unexport(ctx context.Context, name string) error {
	id, ok := n.exports[name]
	if !ok {
		return nil
	}
	delete(n.exports, name)
	node := n.nodes[id]
	delete(n.nodes, id)
	if err := n.qmp.Execute(ctx, "block-export-del", map[string]any{"id": id, "mode": "hard"}, nil); err != nil {
		return err
	}
	// The export goes away asynchronously; its node is busy until then.
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if err = n.qmp.Execute(ctx, "blockdev-del", map[string]any{"node-name": node}, nil); err == nil {
			return nil
		}
	}
	return err
}

func (n *nbdServer) stop() {
	n.stopOnce.Do(func() {
		if n.front != nil {
			n.front.Close()
		}
		n.cmu.Lock()
		for c := range n.conns {
			c.Close()
		}
		n.cmu.Unlock()
	})
	if n.qmp != nil {
		n.qmp.Close()
	}
	if n.cmd.Process != nil {
		n.cmd.Process.Kill()
		n.cmd.Wait()
	}
}
