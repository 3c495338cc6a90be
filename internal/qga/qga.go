// Package qga is a client for the QEMU guest agent (qemu-ga) protocol, spoken
// over the host side of the agent's virtio-serial port (a UNIX socket chardev
// of QEMU). QMP does not relay agent commands, so this is a separate channel.
//
// The agent answers one command at a time, in order, and its replies carry no
// id. A client that timed out may therefore see a late reply to an earlier
// command. The protocol's answer is guest-sync-delimited: the agent prefixes
// the sync reply with a 0xFF byte, and everything before it is discarded. This
// client syncs when it connects and again after any timeout or protocol
// error, so a reply is never attributed to the wrong command.
//
// QEMU only reads the socket once qemu-ga has opened the port in the guest,
// and the agent may be starting up: Dial resends the sync request every
// SyncInterval until its context ends, rather than in a tight loop.
//
// Every wait has a deadline: the context's, and at most CommandTimeout when
// the context has none. A command abandoned because its context was
// cancelled (a signal) leaves the agent busy with it; the next command's
// resync then gets at most CancelGrace, after which the agent is declared
// hung and every later command fails at once, so that cleanup after an
// interruption does not wait out the writer time limit on a dead agent.
package qga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// SyncInterval is how long Dial waits for a sync reply before resending.
var SyncInterval = 2 * time.Second

// CommandTimeout bounds Dial and each command when their context has no
// deadline. Zero or negative: no limit beyond the context.
var CommandTimeout = 60 * time.Second

// CancelGrace bounds the resync after a command was cancelled.
var CancelGrace = 10 * time.Second

// maxReply bounds one reply line (guest-file-read of a large file, guest-get-*).
const maxReply = 16 << 20

// Error is an error reply from the agent.
type Error struct {
	Command string
	Class   string
	Desc    string
}

func (e *Error) Error() string { return fmt.Sprintf("guest agent %s: %s", e.Command, e.Desc) }

// Client is a guest agent connection. Commands are serialised: it is safe for
// concurrent use, but calls wait for each other.
type Client struct {
	path string
	conn net.Conn
	br   *bufio.Reader

	mu        sync.Mutex
	insync    bool
	staleIDs  map[int64]bool // sync ids sent whose replies may still arrive
	cancelled time.Time      // when a command was last abandoned by cancellation
	dead      error          // set when the agent was declared hung
}

// bounded returns ctx with CommandTimeout as its deadline if it has none.
func bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || CommandTimeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, CommandTimeout)
}

// Dial connects to the agent socket and synchronises with the agent, retrying
// every SyncInterval until ctx ends. Errors wrap errs.ErrConnect.
func Dial(ctx context.Context, path string) (*Client, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("guest agent socket %s: %w: %w", path, err, errs.ErrConnect)
	}
	if st.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("guest agent socket %s is not a UNIX socket: %w", path, errs.ErrConnect)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("connect to guest agent socket %s: %w: %w", path, err, errs.ErrConnect)
	}
	c := &Client{path: path, conn: conn, br: bufio.NewReaderSize(conn, 64<<10), staleIDs: map[int64]bool{}}
	ctx, cancel := bounded(ctx)
	defer cancel()
	c.mu.Lock()
	err = c.sync(ctx)
	c.mu.Unlock()
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// sync runs guest-sync-delimited until a reply with our id arrives. c.mu held.
func (c *Client) sync(ctx context.Context) error {
	if c.dead != nil {
		return c.dead
	}
	if !c.cancelled.IsZero() {
		limit := c.cancelled.Add(CancelGrace)
		gctx, cancel := context.WithDeadline(ctx, limit)
		defer cancel()
		err := c.syncLoop(gctx)
		if err != nil && !time.Now().Before(limit) && ctx.Err() == nil {
			c.dead = fmt.Errorf("guest agent %s did not answer within %s after vmshadow abandoned a command: the agent is hung: %w", c.path, CancelGrace, errs.ErrConnect)
			c.conn.Close()
			return c.dead
		}
		if err == nil {
			c.cancelled = time.Time{}
		}
		return err
	}
	return c.syncLoop(ctx)
}

func (c *Client) syncLoop(ctx context.Context) error {
	start := time.Now()
	for {
		id := rand.Int64N(1<<52) + 1
		c.staleIDs[id] = true
		req, _ := json.Marshal(map[string]any{"execute": "guest-sync-delimited", "arguments": map[string]int64{"id": id}})
		// 0xFF first: the agent's JSON parser discards any partial input.
		if err := c.write(ctx, append([]byte{0xFF}, append(req, '\n')...)); err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return c.noAnswer(ctx, start) // the time ran out before the request was even taken
			}
			return fmt.Errorf("guest agent %s: send sync: %w: %w", c.path, err, errs.ErrConnect)
		}
		deadline := time.Now().Add(SyncInterval)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		err := c.awaitSync(ctx, id, deadline)
		if err == nil {
			delete(c.staleIDs, id)
			c.insync = true
			return nil
		}
		var ne net.Error
		if !(errors.As(err, &ne) && ne.Timeout()) {
			return fmt.Errorf("guest agent %s: sync: %w: %w", c.path, err, errs.ErrConnect)
		}
		if d, ok := ctx.Deadline(); ctx.Err() != nil || ok && !time.Now().Before(d) {
			return c.noAnswer(ctx, start)
		}
	}
}

// noAnswer is the error of a sync that ctx ended: the agent is not there
// (errs.ErrConnect), whatever limit ended the wait.
func (c *Client) noAnswer(ctx context.Context, start time.Time) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		c.cancelled = time.Now()
	}
	return fmt.Errorf("guest agent %s did not answer within %s: qemu-ga is not running in the guest, the guest is not up yet, or another client holds the socket: %w",
		c.path, time.Since(start).Round(time.Millisecond), errs.ErrConnect)
}

// awaitSync skips input up to the 0xFF sentinel, then reads replies until the
// sync reply carrying id.
func (c *Client) awaitSync(ctx context.Context, id int64, deadline time.Time) error {
	c.conn.SetReadDeadline(deadline)
	defer c.conn.SetReadDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() { c.conn.SetReadDeadline(time.Now()) })
	defer stop()
	for {
		if _, err := c.br.ReadBytes(0xFF); err != nil {
			return err
		}
		for {
			line, err := c.readLine()
			if err != nil {
				return err
			}
			var r struct {
				Return *int64 `json:"return"`
			}
			if json.Unmarshal(TrimSentinel(line), &r) != nil || r.Return == nil {
				break // not a sync reply: look for the next sentinel
			}
			if *r.Return == id {
				return nil
			}
			delete(c.staleIDs, *r.Return)
			break
		}
	}
}

// readLine reads one whole line. Unlike bufio.Reader.ReadLine it never
// returns a line cut short by an error (a deadline in the middle of a reply).
func (c *Client) readLine() ([]byte, error) {
	var buf []byte
	for {
		chunk, err := c.br.ReadSlice('\n')
		buf = append(buf, chunk...)
		if len(buf) > maxReply {
			return nil, fmt.Errorf("reply longer than %d bytes", maxReply)
		}
		if err == nil {
			return bytes.TrimSuffix(buf[:len(buf)-1], []byte("\r")), nil
		}
		if err != bufio.ErrBufferFull {
			return nil, err
		}
	}
}

func (c *Client) write(ctx context.Context, b []byte) error {
	if d, ok := ctx.Deadline(); ok {
		c.conn.SetWriteDeadline(d)
		defer c.conn.SetWriteDeadline(time.Time{})
	}
	_, err := c.conn.Write(b)
	return err
}

// Execute runs an agent command. args is the "arguments" object (nil: none);
// the "return" value is decoded into result unless it is nil. When ctx ends
// first, the client resynchronises before its next command.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	ctx, cancel := bounded(ctx)
	defer cancel()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead != nil {
		return c.dead
	}
	if !c.insync {
		if err := c.sync(ctx); err != nil {
			return err
		}
	}
	msg := map[string]any{"execute": command}
	if args != nil {
		msg["arguments"] = args
	}
	req, err := json.Marshal(msg)
	if err != nil {
		return fmt.Errorf("guest agent %s: encode: %w", command, err)
	}
	if err := c.write(ctx, append(req, '\n')); err != nil {
		c.insync = false
		return fmt.Errorf("guest agent %s: send: %w", command, err)
	}
	ret, err := c.readReply(ctx, command)
	if err != nil {
		var ae *Error
		if !errors.As(err, &ae) {
			c.insync = false
		}
		return err
	}
	if result != nil {
		if err := json.Unmarshal(ret, result); err != nil {
			return fmt.Errorf("guest agent %s: decode reply: %w", command, err)
		}
	}
	return nil
}

func (c *Client) readReply(ctx context.Context, command string) (json.RawMessage, error) {
	if d, ok := ctx.Deadline(); ok {
		c.conn.SetReadDeadline(d)
	}
	defer c.conn.SetReadDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() { c.conn.SetReadDeadline(time.Now()) })
	defer stop()
	for {
		line, err := c.readLine()
		if err != nil {
			if ctx.Err() != nil {
				if errors.Is(ctx.Err(), context.Canceled) {
					c.cancelled = time.Now()
				}
				return nil, fmt.Errorf("guest agent %s on %s: no reply: %w", command, c.path, ctx.Err())
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil, fmt.Errorf("guest agent %s on %s: no reply: %w", command, c.path, context.DeadlineExceeded)
			}
			return nil, fmt.Errorf("guest agent %s: read reply: %w", command, err)
		}
		line = TrimSentinel(line)
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var r struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
		}
		if err := json.Unmarshal(line, &r); err != nil {
			return nil, fmt.Errorf("guest agent %s: bad reply %.80q: %w", command, line, err)
		}
		if r.Error != nil {
			return nil, &Error{Command: command, Class: r.Error.Class, Desc: r.Error.Desc}
		}
		if r.Return == nil {
			continue // an event or something else without a return: not ours
		}
		var n int64
		if json.Unmarshal(r.Return, &n) == nil && c.staleIDs[n] {
			delete(c.staleIDs, n) // late reply to an earlier sync
			continue
		}
		return r.Return, nil
	}
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	return c.Execute(ctx, "guest-ping", nil, nil)
}

// Info describes the agent.
type Info struct {
	Version  string `json:"version"`
	Commands []struct {
		Name    string `json:"name"`
		Enabled bool   `json:"enabled"`
	} `json:"supported_commands"`
}

// Supports reports whether the agent has the command enabled.
func (i Info) Supports(name string) bool {
	for _, c := range i.Commands {
		if c.Name == name {
			return c.Enabled
		}
	}
	return false
}

// Info returns the agent's version and commands.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var i Info
	err := c.Execute(ctx, "guest-info", nil, &i)
	return i, err
}

// FreezeStatus is "thawed" or "frozen".
func (c *Client) FreezeStatus(ctx context.Context) (string, error) {
	var s string
	err := c.Execute(ctx, "guest-fsfreeze-status", nil, &s)
	return s, err
}

// Freeze freezes the guest's file systems (all, or only mountpoints when
// given) and returns how many were frozen. The agent runs its fsfreeze hook
// first; a hook failure fails the call.
func (c *Client) Freeze(ctx context.Context, mountpoints []string) (int, error) {
	var n int
	if len(mountpoints) > 0 {
		err := c.Execute(ctx, "guest-fsfreeze-freeze-list", map[string]any{"mountpoints": mountpoints}, &n)
		return n, err
	}
	err := c.Execute(ctx, "guest-fsfreeze-freeze", nil, &n)
	return n, err
}

// Thaw thaws the guest's file systems and returns how many were thawed.
func (c *Client) Thaw(ctx context.Context) (int, error) {
	var n int
	err := c.Execute(ctx, "guest-fsfreeze-thaw", nil, &n)
	return n, err
}

// ExecResult is the outcome of a program run in the guest.
type ExecResult struct {
	ExitCode int
	Signal   int
	Stdout   []byte
	Stderr   []byte
}

// Exec runs a program in the guest with extra environment variables
// ("NAME=value") and waits for it, polling every 100 ms. If ctx ends first
// the program goes on running in the guest (the agent cannot kill it).
func (c *Client) Exec(ctx context.Context, path string, args, env []string, stdin []byte) (ExecResult, error) {
	req := map[string]any{"path": path, "arg": args, "capture-output": true}
	if len(env) > 0 {
		req["env"] = env
	}
	if stdin != nil {
		req["input-data"] = base64.StdEncoding.EncodeToString(stdin)
	}
	var started struct {
		PID int `json:"pid"`
	}
	if err := c.Execute(ctx, "guest-exec", req, &started); err != nil {
		return ExecResult{}, err
	}
	for {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			Signal   int    `json:"signal"`
			OutData  string `json:"out-data"`
			ErrData  string `json:"err-data"`
		}
		if err := c.Execute(ctx, "guest-exec-status", map[string]int{"pid": started.PID}, &st); err != nil {
			return ExecResult{}, err
		}
		if st.Exited {
			out, _ := base64.StdEncoding.DecodeString(st.OutData)
			errOut, _ := base64.StdEncoding.DecodeString(st.ErrData)
			return ExecResult{ExitCode: st.ExitCode, Signal: st.Signal, Stdout: out, Stderr: errOut}, nil
		}
		select {
		case <-ctx.Done():
			return ExecResult{}, fmt.Errorf("guest-exec %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TrimSentinel strips leading 0xFF bytes: the agent's sync sentinel on
// replies, the parser-flush byte on requests.
func TrimSentinel(b []byte) []byte {
	for len(b) > 0 && b[0] == 0xFF {
		b = b[1:]
	}
	return b
}
