package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Export is a disk served by a Server. Its methods are called concurrently
// from many requests and connections. The server only asks for ranges
// within Size, which must not change while the export is served.
type Export interface {
	Size() int64
	// ReadAt fills p with the bytes at off. It returns n < len(p) only with
	// an error, which the client receives as an NBD error (EIO unless the
	// error wraps an Errno, errs.ErrNoSpace or errs.ErrUnsupported).
	ReadAt(ctx context.Context, p []byte, off int64) (int, error)
}

// Writer is implemented by exports that accept writes.
type Writer interface {
	WriteAt(ctx context.Context, p []byte, off int64) (int, error)
}

// Flusher is implemented by exports with a cache: Flush makes every write
// completed so far, from any connection, durable. Exports that are Writers
// without being Flushers are taken to complete writes durably.
type Flusher interface {
	Flush(ctx context.Context) error
}

// Trimmer is implemented by exports that can discard ranges; the contents
// of a trimmed range are undefined afterwards.
type Trimmer interface {
	Trim(ctx context.Context, off, length int64) error
}

// Zeroer is implemented by exports that can zero ranges faster than by
// writing zeroes; with punch the range may be deallocated. Writers without
// it get zero buffers written instead.
type Zeroer interface {
	WriteZeroes(ctx context.Context, off, length int64, punch bool) error
}

// ExtentReporter is implemented by exports that know their allocation. The
// extents describe [off, off+length) for base:allocation (StateHole,
// StateZero): in order, contiguous, starting at off. They may stop short of
// off+length but must describe at least one byte. Exports without it report
// everything as allocated data.
type ExtentReporter interface {
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
}

// ExportOptions describe how an export is offered.
type ExportOptions struct {
	// ReadOnly refuses writes (EPERM) even if the export is a Writer.
	// Exports that are not Writers are always read-only.
	ReadOnly bool
	// Description is shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
	Description string
}

// ServerOptions configure a Server. The zero value serves without TLS.
type ServerOptions struct {
	// TLSConfig, when set, makes TLS mandatory (FORCEDTLS): every option
	// but NBD_OPT_STARTTLS and NBD_OPT_ABORT is refused until TLS is up.
	TLSConfig *tls.Config
	// Logger receives connection events; nil discards them.
	Logger *slog.Logger
	// MaxBlockSize is the longest READ or WRITE accepted (advertised with
	// NBD_INFO_BLOCK_SIZE). Zero means 32 MiB.
	MaxBlockSize uint32
	// ConnBuffer bounds the memory one connection uses for the data of its
	// requests in flight; zero means 64 MiB. It is raised to MaxBlockSize
	// if smaller.
	ConnBuffer int64
	// HandshakeTimeout bounds the handshake; zero means 30 s.
	HandshakeTimeout time.Duration
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves named exports over NBD (fixed newstyle handshake,
// structured replies, base:allocation block status). Its methods are safe
// for concurrent use.
type Server struct {
	opts ServerOptions
	log  *slog.Logger

	mu        sync.Mutex
	exports   map[string]*served
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	closing   bool
	ctx       context.Context // cancelled by Close: Export calls give up
	cancel    context.CancelFunc
	wg        sync.WaitGroup // connections
}

// served is an export with its options and negotiated capabilities.
type served struct {
	name    string
	exp     Export
	opts    ExportOptions
	writer  Writer
	flusher Flusher
	trimmer Trimmer
	zeroer  Zeroer
	extents ExtentReporter
}

// NewServer returns a server with no exports.
func NewServer(opts *ServerOptions) *Server {
	s := &Server{exports: map[string]*served{}, listeners: map[net.Listener]struct{}{}, conns: map[*serverConn]struct{}{}}
	if opts != nil {
		s.opts = *opts
	}
	if s.opts.MaxBlockSize == 0 {
		s.opts.MaxBlockSize = defaultMaxBlockSize
	}
	if s.opts.ConnBuffer == 0 {
		s.opts.ConnBuffer = 64 << 20
	}
	s.opts.ConnBuffer = max(s.opts.ConnBuffer, int64(s.opts.MaxBlockSize))
	if s.opts.HandshakeTimeout == 0 {
		s.opts.HandshakeTimeout = 30 * time.Second
	}
	s.log = s.opts.Logger
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s
}

// AddExport offers e under name. Names must be unique and at most 4096
// bytes; "" is the default export.
func (s *Server) AddExport(name string, e Export, o ExportOptions) error {
	if len(name) > maxStringLen || len(o.Description) > maxStringLen {
		return fmt.Errorf("nbd export %q: name or description longer than %d bytes (%w)", name, maxStringLen, errs.ErrUsage)
	}
	if e.Size() < 0 {
		return fmt.Errorf("nbd export %q: negative size %d (%w)", name, e.Size(), errs.ErrUsage)
	}
	sv := &served{name: name, exp: e, opts: o}
	sv.writer, _ = e.(Writer)
	sv.flusher, _ = e.(Flusher)
	sv.trimmer, _ = e.(Trimmer)
	sv.zeroer, _ = e.(Zeroer)
	sv.extents, _ = e.(ExtentReporter)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.exports[name]; dup {
		return fmt.Errorf("nbd export %q already exists (%w)", name, errs.ErrUsage)
	}
	s.exports[name] = sv
	return nil
}

func (s *Server) export(name string) *served {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exports[name]
}

func (s *Server) exportList() []*served {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*served, 0, len(s.exports))
	for _, e := range s.exports {
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// flags are the transmission flags of the export as seen by a connection.
func (sv *served) flags(structured bool) TransmissionFlags {
	f := FlagHasFlags | FlagCanMultiConn
	if structured {
		f |= FlagSendDF
	}
	if sv.readOnly() {
		return f | FlagReadOnly
	}
	f |= FlagSendWriteZeroes
	if sv.flusher != nil {
		f |= FlagSendFlush | FlagSendFUA
	}
	if sv.trimmer != nil {
		f |= FlagSendTrim
	}
	return f
}

func (sv *served) readOnly() bool { return sv.opts.ReadOnly || sv.writer == nil }

// Serve accepts connections on l until Shutdown or Close, or until l
// fails. It returns ErrServerClosed after Shutdown or Close, and closes l.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var backoff time.Duration
	for {
		conn, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd server: accept: %w", err)
		}
		backoff = 0
		sc := newServerConn(s, conn)
		s.mu.Lock()
		if s.closing {
			s.mu.Unlock()
			conn.Close()
			return ErrServerClosed
		}
		s.conns[sc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			sc.serve()
			s.mu.Lock()
			delete(s.conns, sc)
			s.mu.Unlock()
		}()
	}
}

// Shutdown stops accepting connections, ends handshakes in progress, lets
// connections finish the requests they have in flight and closes them. If
// ctx ends first, Shutdown closes everything as Close does and returns
// ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	for sc := range s.conns {
		sc.stop()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		s.cancel()
		return nil
	case <-ctx.Done():
		s.Close()
		return ctx.Err()
	}
}

// Close closes listeners and connections at once, cancelling the contexts
// of Export calls in progress, and waits for the connections to end.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	for sc := range s.conns {
		sc.raw.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return nil
}
