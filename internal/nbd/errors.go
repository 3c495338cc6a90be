package nbd

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// ErrClosed is returned by calls on a Client or Pool after Close.
var ErrClosed = errors.New("nbd: connection closed by the client")

// ServerError is an error the server reported for one request. The
// connection stays usable. It wraps its Errno and, where one fits, an
// internal/errs class (ENOSPC: errs.ErrNoSpace, ENOTSUP: errs.ErrUnsupported,
// ESHUTDOWN: errs.ErrConnect).
type ServerError struct {
	Peer    string // the server, as Target.String gives it
	Op      string // "read", "write", "block status", ...
	Offset  int64  // the request's range
	Length  int64
	Errno   Errno
	Message string // the server's explanation, if it sent one
	// ErrorOffset is where the error occurred when the server said
	// (NBD_REPLY_TYPE_ERROR_OFFSET), else -1.
	ErrorOffset int64
}

func (e *ServerError) Error() string {
	s := fmt.Sprintf("nbd %s: %s of %d bytes at offset %d failed on the server: %v", e.Peer, e.Op, e.Length, e.Offset, e.Errno)
	if e.ErrorOffset >= 0 {
		s += fmt.Sprintf(" at offset %d", e.ErrorOffset)
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

func (e *ServerError) Unwrap() []error {
	switch e.Errno {
	case ENOSPC:
		return []error{e.Errno, errs.ErrNoSpace}
	case ENOTSUP:
		return []error{e.Errno, errs.ErrUnsupported}
	case ESHUTDOWN:
		return []error{e.Errno, errs.ErrConnect}
	}
	return []error{e.Errno}
}

// ProtocolError means the peer sent something the NBD protocol does not
// allow (bad magic, a reply for a request not in flight, a chunk outside the
// request, a reply shorter than promised, ...). The connection is closed
// when it is detected. It wraps errs.ErrConnect.
type ProtocolError struct {
	Peer string
	Msg  string
}

func (e *ProtocolError) Error() string {
	return fmt.Sprintf("nbd %s: protocol violation by the peer: %s", e.Peer, e.Msg)
}

func (e *ProtocolError) Unwrap() error { return errs.ErrConnect }

// OptionError is the server's refusal of a handshake option: the export does
// not exist (wraps errs.ErrNotFound), the server requires TLS or lacks the
// option (errs.ErrUnsupported), policy forbids it (errs.ErrAuth), or
// anything else (errs.ErrConnect).
type OptionError struct {
	Peer    string
	Option  string // e.g. "NBD_OPT_GO"
	Reply   string // e.g. "NBD_REP_ERR_UNKNOWN"
	Message string // the server's explanation, if any
	Hint    string // what to do about it, if we know
	code    uint32
}

func (e *OptionError) Error() string {
	s := fmt.Sprintf("nbd %s: server refused %s with %s", e.Peer, e.Option, e.Reply)
	if e.Message != "" {
		s += ": " + e.Message
	}
	if e.Hint != "" {
		s += " (" + e.Hint + ")"
	}
	return s
}

func (e *OptionError) Unwrap() error {
	switch e.code {
	case repErrUnknown:
		return errs.ErrNotFound
	case repErrUnsup, repErrPlatform, repErrTLSReqd, repErrBlockSizeReqd:
		return errs.ErrUnsupported
	case repErrPolicy:
		return errs.ErrAuth
	}
	return errs.ErrConnect
}

// connError describes a broken connection; it wraps the cause and
// errs.ErrConnect.
func connError(peer, what string, cause error) error {
	return fmt.Errorf("nbd %s: %s: %w (%w)", peer, what, cause, errs.ErrConnect)
}

// errnoFor maps an error returned by an Export to the NBD error value sent to
// the client.
func errnoFor(err error) Errno {
	var e Errno
	switch {
	case errors.As(err, &e):
		return e
	case errors.Is(err, errs.ErrNoSpace), errors.Is(err, syscall.ENOSPC),
		errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return ENOSPC
	case errors.Is(err, errs.ErrUnsupported), errors.Is(err, syscall.EOPNOTSUPP):
		return ENOTSUP
	case errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES):
		return EPERM
	case errors.Is(err, context.Canceled):
		return ESHUTDOWN
	}
	return EIO
}
