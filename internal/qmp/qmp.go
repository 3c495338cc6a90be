// Package qmp is a client for the QEMU Machine Protocol over a UNIX socket.
//
// It owns the wire protocol only: the greeting and capability negotiation,
// commands correlated with their replies by "id" (several may be in flight),
// and asynchronous events delivered to subscribers. What the commands mean is
// the caller's business (see internal/provider/qemu).
//
// QEMU serves one QMP client per monitor socket at a time; a second client's
// connection is accepted by the kernel but gets no greeting until the first
// disconnects. Dial therefore bounds the wait for the greeting and reports a
// busy or non-QMP socket clearly instead of hanging.
//
// Every command's wait is bounded too: by its context, and at most by
// CommandTimeout. QEMU answers commands in order, so a command that gets no
// reply in time means the monitor is hung (or the peer is not QEMU): the
// client then declares the peer stalled, closes the connection, and every
// command still waiting or sent later fails at once with an error wrapping
// ErrStalled and errs.ErrConnect. A command abandoned because its context
// was cancelled (a signal) leaves its reply due; if that reply does not come
// within CancelGrace the peer is declared stalled the same way, so that
// cleanup after an interruption does not queue behind a hung monitor.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// MaxMessage bounds one QMP message (a query-qmp-schema reply is ~200 KiB).
const MaxMessage = 16 << 20

// Version is QEMU's version from the greeting.
type Version struct {
	Major   int    `json:"major"`
	Minor   int    `json:"minor"`
	Micro   int    `json:"micro"`
	Package string `json:"-"`
}

// AtLeast reports whether v is major.minor or newer.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || (v.Major == major && v.Minor >= minor)
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// Error is an error reply from QEMU.
type Error struct {
	Command string
	Class   string // e.g. GenericError, CommandNotFound, DeviceNotFound
	Desc    string
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp %s: %s", e.Command, e.Desc)
}

// IsCommandNotFound reports whether err says QEMU does not know a command.
func IsCommandNotFound(err error) bool {
	var qe *Error
	return errors.As(err, &qe) && qe.Class == "CommandNotFound"
}

// Event is an asynchronous QMP event.
type Event struct {
	Name      string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp time.Time       `json:"-"`
}

// ErrClosed is returned for commands on a closed or broken connection.
var ErrClosed = errors.New("qmp connection closed")

// ErrStalled is wrapped by the errors of a connection whose peer did not
// answer a command in time (see the package documentation).
var ErrStalled = errors.New("qmp peer stalled")

// Client is a QMP connection. It is safe for concurrent use.
type Client struct {
	conn    net.Conn
	path    string
	timeout time.Duration // CommandTimeout when dialled
	version Version
	pid     int // QEMU's process id from SO_PEERCRED, 0 if unknown

	wmu sync.Mutex // serialises writes

	mu      sync.Mutex
	nextID  uint64
	pending map[string]chan reply
	subs    map[*Subscription]struct{}
	err     error // set once the reader stops
	stalled error // set when the peer is declared stalled
	done    chan struct{}
}

type reply struct {
	ret json.RawMessage
	err *Error
}

// wire is any message QEMU sends.
type wire struct {
	QMP *struct {
		Version struct {
			Qemu    Version
			Package string
		}
	} `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	ID        json.RawMessage `json:"id"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// GreetingTimeout bounds the wait for QEMU's greeting.
var GreetingTimeout = 5 * time.Second

// CommandTimeout bounds the wait for the reply to each command (when the
// command's context allows longer), for clients dialled after it is set.
// Generous: QEMU under TCG on a loaded host can take seconds for a
// transaction or a blockdev-del. Zero or negative: no limit beyond the
// context.
var CommandTimeout = 60 * time.Second

// CancelGrace is how long the reply to a command abandoned by its caller
// (context ended) may take before the peer is declared stalled.
var CancelGrace = 5 * time.Second

// Dial connects to the QMP socket at path, reads the greeting and enters
// command mode. Errors wrap errs.ErrConnect.
func Dial(ctx context.Context, path string) (*Client, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("qmp socket %s: %w (is the VM running with -qmp unix:%s,server=on,wait=off?): %w", path, err, path, errs.ErrConnect)
	}
	if st.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("qmp socket %s is not a UNIX socket: %w", path, errs.ErrConnect)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to qmp socket %s: %w: %w", path, err, errs.ErrConnect)
	}
	c, err := newClient(ctx, conn, path)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

func newClient(ctx context.Context, conn net.Conn, path string) (*Client, error) {
	c := &Client{
		conn:    conn,
		path:    path,
		timeout: CommandTimeout,
		pending: map[string]chan reply{},
		subs:    map[*Subscription]struct{}{},
		done:    make(chan struct{}),
		pid:     peerPID(conn),
	}
	deadline := time.Now().Add(GreetingTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn.SetReadDeadline(deadline)
	br := bufio.NewReaderSize(conn, 64<<10)
	line, err := readLine(br)
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil, fmt.Errorf("no QMP greeting on %s within %s: the socket is not a QMP monitor, or another client (a running vmshadow, libvirt) holds it: %w", path, GreetingTimeout, errs.ErrConnect)
		}
		return nil, fmt.Errorf("read QMP greeting from %s: %w: %w", path, err, errs.ErrConnect)
	}
	var g wire
	if err := json.Unmarshal(line, &g); err != nil || g.QMP == nil {
		return nil, fmt.Errorf("%s is not a QMP socket (first message %.60q): %w", path, line, errs.ErrConnect)
	}
	conn.SetReadDeadline(time.Time{})
	c.version = g.QMP.Version.Qemu
	c.version.Package = g.QMP.Version.Package
	go c.readLoop(br)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		c.Close()
		return nil, fmt.Errorf("qmp capabilities negotiation on %s: %w: %w", path, err, errs.ErrConnect)
	}
	return c, nil
}

func peerPID(conn net.Conn) int {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return 0
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0
	}
	var pid int
	raw.Control(func(fd uintptr) {
		if cred, err := syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}

func readLine(br *bufio.Reader) ([]byte, error) {
	var buf []byte
	for {
		chunk, isPrefix, err := br.ReadLine()
		if err != nil {
			return nil, err
		}
		buf = append(buf, chunk...)
		if len(buf) > MaxMessage {
			return nil, fmt.Errorf("qmp message longer than %d bytes", MaxMessage)
		}
		if !isPrefix {
			return buf, nil
		}
	}
}

// Version is QEMU's version from the greeting.
func (c *Client) Version() Version { return c.version }

// PID is the QEMU process id (from the socket's peer credentials), 0 if unknown.
func (c *Client) PID() int { return c.pid }

// Done is closed when the connection is gone.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection; pending commands fail with ErrClosed.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

func (c *Client) readLoop(br *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = readLine(br)
		if err != nil {
			break
		}
		var m wire
		if jerr := json.Unmarshal(line, &m); jerr != nil {
			err = fmt.Errorf("qmp: bad message from QEMU: %v", jerr)
			break
		}
		switch {
		case m.Event != "":
			ev := Event{Name: m.Event, Data: m.Data}
			if m.Timestamp != nil {
				ev.Timestamp = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
			}
			c.mu.Lock()
			for s := range c.subs {
				s.deliver(ev)
			}
			c.mu.Unlock()
		case m.ID != nil:
			var id string
			if json.Unmarshal(m.ID, &id) != nil {
				continue
			}
			c.mu.Lock()
			ch := c.pending[id]
			delete(c.pending, id)
			c.mu.Unlock()
			if ch == nil {
				continue // reply to a command whose caller gave up
			}
			r := reply{ret: m.Return}
			if m.Error != nil {
				r.err = &Error{Class: m.Error.Class, Desc: m.Error.Desc}
			}
			ch <- r
		}
	}
	c.mu.Lock()
	if c.stalled != nil {
		c.err = c.stalled
	} else if errors.Is(err, net.ErrClosed) || err == nil {
		c.err = ErrClosed
	} else {
		c.err = fmt.Errorf("%w: %v", ErrClosed, err)
	}
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
	for s := range c.subs {
		s.close()
	}
	c.mu.Unlock()
	close(c.done)
}

// Execute runs a command. args is marshalled as the "arguments" object (nil
// for none); the "return" value is unmarshalled into result unless it is nil.
// A QEMU error reply is returned as *Error.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	ret, err := c.ExecuteRaw(ctx, command, args)
	if err != nil {
		return err
	}
	if result != nil {
		if err := json.Unmarshal(ret, result); err != nil {
			return fmt.Errorf("qmp %s: decode reply: %w", command, err)
		}
	}
	return nil
}

// ExecuteRaw runs a command and returns its raw "return" value.
func (c *Client) ExecuteRaw(ctx context.Context, command string, args any) (json.RawMessage, error) {
	return c.execute(ctx, command, args, nil)
}

// ExecuteWithFile runs a command that takes a file descriptor (add-fd,
// getfd): f's descriptor travels with the command as SCM_RIGHTS, so QEMU
// gets an open file without needing permission to open the path itself.
func (c *Client) ExecuteWithFile(ctx context.Context, command string, args, result any, f *os.File) error {
	ret, err := c.execute(ctx, command, args, f)
	if err != nil {
		return err
	}
	if result != nil {
		if err := json.Unmarshal(ret, result); err != nil {
			return fmt.Errorf("qmp %s: decode reply: %w", command, err)
		}
	}
	return nil
}

func (c *Client) execute(ctx context.Context, command string, args any, f *os.File) (json.RawMessage, error) {
	msg := map[string]any{"execute": command}
	if args != nil {
		msg["arguments"] = args
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	c.nextID++
	id := "vmshadow-" + strconv.FormatUint(c.nextID, 10)
	ch := make(chan reply, 1)
	c.pending[id] = ch
	c.mu.Unlock()
	msg["id"] = id
	b, err := json.Marshal(msg)
	if err != nil {
		c.forget(id)
		return nil, fmt.Errorf("qmp %s: encode: %w", command, err)
	}
	b = append(b, '\n')
	c.wmu.Lock()
	if d, ok := ctx.Deadline(); ok {
		c.conn.SetWriteDeadline(d)
	}
	if f != nil {
		uc, ok := c.conn.(*net.UnixConn)
		if !ok {
			err = fmt.Errorf("cannot pass a file over a %T", c.conn)
		} else {
			_, _, err = uc.WriteMsgUnix(b, syscall.UnixRights(int(f.Fd())), nil)
		}
	} else {
		_, err = c.conn.Write(b)
	}
	c.conn.SetWriteDeadline(time.Time{})
	c.wmu.Unlock()
	if err != nil {
		c.forget(id)
		return nil, fmt.Errorf("qmp %s: send: %w", command, err)
	}
	var limit <-chan time.Time
	if c.timeout > 0 {
		t := time.NewTimer(c.timeout)
		defer t.Stop()
		limit = t.C
	}
	select {
	case r, ok := <-ch:
		if !ok {
			c.mu.Lock()
			err := c.err
			c.mu.Unlock()
			return nil, fmt.Errorf("qmp %s: %w", command, err)
		}
		if r.err != nil {
			r.err.Command = command
			return nil, r.err
		}
		return r.ret, nil
	case <-ctx.Done():
		if !errors.Is(ctx.Err(), context.Canceled) {
			// The caller's deadline: the reply stays due, and a command
			// queued behind it waits at most its own CommandTimeout.
			return nil, fmt.Errorf("qmp %s: %w", command, ctx.Err())
		}
		// Cancelled (a signal): cleanup follows at once, and queues
		// behind this reply. If it does not come soon, QEMU is hung.
		time.AfterFunc(CancelGrace, func() {
			c.mu.Lock()
			due := c.pending[id] == ch
			c.mu.Unlock()
			if due {
				c.stall(fmt.Errorf("QEMU did not answer %s on %s within %s after vmshadow stopped waiting for it: the monitor is hung: %w: %w", command, c.path, CancelGrace, ErrStalled, errs.ErrConnect))
			}
		})
		return nil, fmt.Errorf("qmp %s: %w", command, ctx.Err())
	case <-limit:
		err := fmt.Errorf("QEMU did not answer %s on %s within %s: the VM's monitor is hung, or the socket is not QEMU's (check the VM; raise --peer-timeout if QEMU is only slow): %w: %w", command, c.path, c.timeout, ErrStalled, errs.ErrConnect)
		c.stall(err)
		<-c.done
		return nil, err
	}
}

// stall declares the peer stalled: the connection is closed and every
// command waiting or sent later fails with err.
func (c *Client) stall(err error) {
	c.mu.Lock()
	if c.stalled == nil && c.err == nil {
		c.stalled = err
	}
	c.mu.Unlock()
	c.conn.Close()
}

// Err is the error that ended the connection (wrapping ErrStalled when the
// peer was declared stalled), or nil while it is usable.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

func (c *Client) forget(id string) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// Subscription receives events from the moment it is made.
type Subscription struct {
	c      *Client
	ch     chan Event
	once   sync.Once
	filter func(Event) bool
}

// Subscribe returns a subscription to events accepted by filter (nil: all).
// Events are buffered; a subscriber that falls more than 256 events behind
// loses the oldest. Close it when done.
func (c *Client) Subscribe(filter func(Event) bool) *Subscription {
	s := &Subscription{c: c, ch: make(chan Event, 256), filter: filter}
	c.mu.Lock()
	if c.err != nil {
		close(s.ch)
	} else {
		c.subs[s] = struct{}{}
	}
	c.mu.Unlock()
	return s
}

// Events is the channel of events; it is closed when the connection ends.
func (s *Subscription) Events() <-chan Event { return s.ch }

// Wait returns the next event, or an error when ctx ends or the connection closes.
func (s *Subscription) Wait(ctx context.Context) (Event, error) {
	select {
	case ev, ok := <-s.ch:
		if !ok {
			return Event{}, ErrClosed
		}
		return ev, nil
	case <-ctx.Done():
		return Event{}, ctx.Err()
	}
}

// Close ends the subscription.
func (s *Subscription) Close() {
	s.c.mu.Lock()
	if _, ok := s.c.subs[s]; ok {
		delete(s.c.subs, s)
		s.close()
	}
	s.c.mu.Unlock()
}

// deliver and close run with c.mu held.
func (s *Subscription) deliver(ev Event) {
	if s.filter != nil && !s.filter(ev) {
		return
	}
	select {
	case s.ch <- ev:
	default:
		select {
		case <-s.ch:
		default:
		}
		s.ch <- ev
	}
}

func (s *Subscription) close() { s.once.Do(func() { close(s.ch) }) }

// HMP runs a human monitor command and returns its text output.
func (c *Client) HMP(ctx context.Context, commandLine string) (string, error) {
	var out string
	err := c.Execute(ctx, "human-monitor-command", map[string]string{"command-line": commandLine}, &out)
	return out, err
}
