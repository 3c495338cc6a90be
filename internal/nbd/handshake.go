package nbd

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// This file is the client's side of the handshake (option haggling).

// negotiator runs the client side of the handshake on one connection.
type negotiator struct {
	conn     net.Conn // replaced by a *tls.Conn after NBD_OPT_STARTTLS
	peer     string
	export   string // hidden in messages from the server, see redactIn
	fixed    bool   // fixed newstyle: options other than EXPORT_NAME allowed
	noZeroes bool
	buf      []byte
}

// greet reads the server's greeting and sends the client flags.
func (n *negotiator) greet() error {
	var b [18]byte
	if _, err := io.ReadFull(n.conn, b[:16]); err != nil {
		return n.ioErr("reading the server greeting", err)
	}
	if m := binary.BigEndian.Uint64(b[:]); m != magicInit {
		return n.protoErr("greeting starts with 0x%016x, not NBDMAGIC: not an NBD server", m)
	}
	switch m := binary.BigEndian.Uint64(b[8:]); m {
	case magicOpts:
	case magicOldstyle:
		return fmt.Errorf("nbd %s: server uses the oldstyle handshake, which has no export names, TLS or structured replies: %w", n.peer, errs.ErrUnsupported)
	default:
		return n.protoErr("greeting magic 0x%016x is neither IHAVEOPT nor oldstyle", m)
	}
	if _, err := io.ReadFull(n.conn, b[16:18]); err != nil {
		return n.ioErr("reading the handshake flags", err)
	}
	hflags := binary.BigEndian.Uint16(b[16:])
	n.fixed = hflags&flagFixedNewstyle != 0
	n.noZeroes = hflags&flagNoZeroes != 0
	var cflags uint32
	if n.fixed {
		cflags |= flagCFixedNewstyle
	}
	if n.noZeroes {
		cflags |= flagCNoZeroes
	}
	binary.BigEndian.PutUint32(b[:4], cflags)
	if _, err := n.conn.Write(b[:4]); err != nil {
		return n.ioErr("sending the client flags", err)
	}
	return nil
}

func (n *negotiator) sendOption(opt uint32, data []byte) error {
	n.buf = appendOptionHeader(n.buf[:0], opt, len(data))
	n.buf = append(n.buf, data...)
	if _, err := n.conn.Write(n.buf); err != nil {
		return n.ioErr("sending "+optName(opt), err)
	}
	return nil
}

// reply reads one option reply to opt. Error replies are returned as
// *OptionError together with the reply type.
func (n *negotiator) reply(opt uint32) (typ uint32, payload []byte, err error) {
	var hb [optReplyHeaderLen]byte
	if _, err := io.ReadFull(n.conn, hb[:]); err != nil {
		return 0, nil, n.ioErr("reading the reply to "+optName(opt), err)
	}
	h, err := parseOptReplyHeader(hb[:])
	if err != nil {
		return 0, nil, n.protoErr("%v", err)
	}
	if h.option != opt {
		return 0, nil, n.protoErr("reply for %s while waiting for the reply to %s", optName(h.option), optName(opt))
	}
	payload = make([]byte, h.length)
	if _, err := io.ReadFull(n.conn, payload); err != nil {
		return 0, nil, n.ioErr("reading the reply to "+optName(opt), err)
	}
	if h.typ&repFlagError != 0 {
		oe := &OptionError{Peer: n.peer, Option: optName(opt), Reply: repName(h.typ), Message: redactIn(sanitize(payload), n.export), code: h.typ}
		switch h.typ {
		case repErrTLSReqd:
			oe.Hint = "the server requires TLS: use nbds:// or nbds+unix:// with the server's CA"
		case repErrShutdown:
			oe.Hint = "the server is shutting down"
		}
		return h.typ, nil, oe
	}
	return h.typ, payload, nil
}

// simpleOption sends an option whose only successful reply is NBD_REP_ACK.
// It returns an *OptionError if the server refused it.
func (n *negotiator) simpleOption(opt uint32) error {
	if err := n.sendOption(opt, nil); err != nil {
		return err
	}
	typ, _, err := n.reply(opt)
	if err != nil {
		return err
	}
	if typ != repAck {
		return n.protoErr("%s in reply to %s, want NBD_REP_ACK", repName(typ), optName(opt))
	}
	return nil
}

// startTLS upgrades the connection. cfg must verify the server.
func (n *negotiator) startTLS(ctx context.Context, cfg *tls.Config) error {
	if !n.fixed {
		return fmt.Errorf("nbd %s: server does not support fixed newstyle negotiation, so TLS cannot be negotiated: %w", n.peer, errs.ErrUnsupported)
	}
	if err := n.simpleOption(optStartTLS); err != nil {
		var oe *OptionError
		if errors.As(err, &oe) {
			oe.Hint = "TLS was required by the nbds:// target but the server does not offer it"
		}
		return err
	}
	tc := tls.Client(n.conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		var cv *tls.CertificateVerificationError
		if errors.As(err, &cv) {
			return fmt.Errorf("nbd %s: server certificate refused: %w (%w)", n.peer, err, errs.ErrAuth)
		}
		return connError(n.peer, "TLS handshake failed", err)
	}
	n.conn = tc
	return nil
}

// structuredReplies negotiates NBD_OPT_STRUCTURED_REPLY; false means the
// server does not offer them.
func (n *negotiator) structuredReplies() (bool, error) {
	err := n.simpleOption(optStructuredReply)
	var oe *OptionError
	if errors.As(err, &oe) && oe.code != repErrTLSReqd && oe.code != repErrShutdown {
		return false, nil
	}
	return err == nil, err
}

// setMetaContexts selects contexts for export and returns their IDs. Every
// context asked for must be granted: a missing one is an error wrapping
// errs.ErrNotFound.
func (n *negotiator) setMetaContexts(export string, names []string) (map[string]uint32, error) {
	if err := n.sendOption(optSetMetaContext, appendMetaContextRequest(nil, export, names)); err != nil {
		return nil, err
	}
	got := map[string]uint32{}
	ids := map[uint32]bool{}
	for {
		typ, p, err := n.reply(optSetMetaContext)
		if err != nil {
			return nil, err
		}
		switch typ {
		case repMetaContext:
			id, name, err := parseMetaContextReply(p)
			if err != nil {
				return nil, n.protoErr("%v", err)
			}
			if ids[id] {
				return nil, n.protoErr("metadata context ID %d given twice", id)
			}
			ids[id], got[name] = true, id
		case repAck:
			for _, name := range names {
				if _, ok := got[name]; !ok {
					return nil, fmt.Errorf("nbd %s: server does not offer metadata context %q for this export (a dirty bitmap must be exported by the server, e.g. qemu-nbd -B NAME or block-export-add \"bitmaps\"): %w", n.peer, name, errs.ErrNotFound)
				}
			}
			return got, nil
		default:
			return nil, n.protoErr("%s in reply to NBD_OPT_SET_META_CONTEXT", repName(typ))
		}
	}
}

// listMetaContexts lists the contexts matching queries (all if none).
func (n *negotiator) listMetaContexts(export string, queries []string) ([]string, error) {
	if err := n.sendOption(optListMetaContext, appendMetaContextRequest(nil, export, queries)); err != nil {
		return nil, err
	}
	var names []string
	for {
		typ, p, err := n.reply(optListMetaContext)
		if err != nil {
			return nil, err
		}
		switch typ {
		case repMetaContext:
			_, name, err := parseMetaContextReply(p)
			if err != nil {
				return nil, n.protoErr("%v", err)
			}
			names = append(names, name)
		case repAck:
			return names, nil
		default:
			return nil, n.protoErr("%s in reply to NBD_OPT_LIST_META_CONTEXT", repName(typ))
		}
	}
}

// ExportInfo describes one export in the reply to NBD_OPT_LIST.
type ExportInfo struct {
	Name        string
	Description string
}

func (n *negotiator) list() ([]ExportInfo, error) {
	if err := n.sendOption(optList, nil); err != nil {
		return nil, err
	}
	var out []ExportInfo
	for {
		typ, p, err := n.reply(optList)
		if err != nil {
			return nil, err
		}
		switch typ {
		case repServer:
			name, desc, err := parseServerReply(p)
			if err != nil {
				return nil, n.protoErr("%v", err)
			}
			out = append(out, ExportInfo{name, desc})
		case repAck:
			return out, nil
		default:
			return nil, n.protoErr("%s in reply to NBD_OPT_LIST", repName(typ))
		}
	}
}

// goExport ends the handshake with NBD_OPT_GO, or NBD_OPT_EXPORT_NAME when
// the server is not fixed newstyle or does not know NBD_OPT_GO.
func (n *negotiator) goExport(export string) (exportInfo, error) {
	if !n.fixed {
		return n.exportName(export)
	}
	if err := n.sendOption(optGo, appendInfoRequest(nil, export, infoBlockSize)); err != nil {
		return exportInfo{}, err
	}
	var info exportInfo
	for {
		typ, p, err := n.reply(optGo)
		var oe *OptionError
		switch {
		case errors.As(err, &oe) && oe.code == repErrUnsup:
			return n.exportName(export)
		case errors.As(err, &oe) && oe.code == repErrUnknown:
			oe.Hint = fmt.Sprintf("no export named %q", redactExport(export))
			return exportInfo{}, err
		case err != nil:
			return exportInfo{}, err
		}
		switch typ {
		case repInfo:
			if err := parseInfoReply(p, &info); err != nil {
				return exportInfo{}, n.protoErr("%v", err)
			}
		case repAck:
			if !info.haveExport {
				return exportInfo{}, n.protoErr("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
			}
			return info, n.checkSize(info.size)
		default:
			return exportInfo{}, n.protoErr("%s in reply to NBD_OPT_GO", repName(typ))
		}
	}
}

func (n *negotiator) exportName(export string) (exportInfo, error) {
	if err := n.sendOption(optExportName, []byte(export)); err != nil {
		return exportInfo{}, err
	}
	b := make([]byte, 10+124)
	if n.noZeroes {
		b = b[:10]
	}
	if _, err := io.ReadFull(n.conn, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return exportInfo{}, fmt.Errorf("nbd %s: server closed the connection after NBD_OPT_EXPORT_NAME: the export %q probably does not exist: %w", n.peer, redactExport(export), errs.ErrNotFound)
		}
		return exportInfo{}, n.ioErr("reading the reply to NBD_OPT_EXPORT_NAME", err)
	}
	info := exportInfo{size: binary.BigEndian.Uint64(b), flags: TransmissionFlags(binary.BigEndian.Uint16(b[8:])), haveExport: true}
	return info, n.checkSize(info.size)
}

func (n *negotiator) checkSize(size uint64) error {
	if size > math.MaxInt64 {
		return n.protoErr("export size %d is beyond 2^63", size)
	}
	return nil
}

// abort ends the handshake with NBD_OPT_ABORT (a soft disconnect). The
// server may close without replying, so errors are ignored.
func (n *negotiator) abort() {
	if n.fixed {
		if n.sendOption(optAbort, nil) == nil {
			_ = n.conn.SetReadDeadline(time.Now().Add(time.Second))
			_, _, _ = n.reply(optAbort)
		}
	}
}

func (n *negotiator) protoErr(format string, a ...any) error {
	return &ProtocolError{Peer: n.peer, Msg: "handshake: " + fmt.Sprintf(format, a...)}
}

func (n *negotiator) ioErr(what string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return connError(n.peer, "handshake: server closed the connection while "+what, io.ErrUnexpectedEOF)
	}
	return connError(n.peer, "handshake: "+what, err)
}

// watchContext makes conn's I/O fail when ctx is done until the returned
// stop function is called. stop returns ctx's error if ctx interrupted the
// I/O. (ctx's deadline is not copied to conn: the I/O must fail only once
// ctx reports an error, so that callers can tell why.)
func watchContext(ctx context.Context, conn net.Conn) (stop func() error) {
	fired := make(chan struct{})
	stopAfter := context.AfterFunc(ctx, func() {
		_ = conn.SetDeadline(aLongTimeAgo)
		close(fired)
	})
	return func() error {
		if !stopAfter() {
			<-fired
			return ctx.Err()
		}
		_ = conn.SetDeadline(time.Time{})
		return nil
	}
}

// aLongTimeAgo is a deadline in the past, which makes pending I/O fail.
var aLongTimeAgo = time.Unix(1, 0)
