package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

// Helpers to run the real peers: qemu-nbd, nbdkit, qemu-img, qemu-io,
// nbdinfo and QEMU itself.

// needCmd is testutil.NeedCommand, skipping with -short as well.
func needCmd(t testing.TB, names ...string) {
	t.Helper()
	testutil.SkipShort(t)
	for _, n := range names {
		testutil.NeedCommand(t, n)
	}
}

// run runs a command and returns its combined output, failing the test if
// it fails.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// runErr runs a command and returns its output and error.
func runErr(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// syncBuffer collects a process's output.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// daemon is a server process started by a test.
type daemon struct {
	cmd *exec.Cmd
	out *syncBuffer // stdout and stderr
}

// startDaemon starts a long-running server process and waits until addr
// (a unix socket path, or host:port) accepts connections. The process is
// killed when the test ends.
func startDaemon(t testing.TB, network, addr, name string, args ...string) *daemon {
	t.Helper()
	cmd := exec.Command(name, args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-exited:
			t.Fatalf("%s %s exited: %s", name, strings.Join(args, " "), out.String())
		default:
		}
		if c, err := net.DialTimeout(network, addr, time.Second); err == nil {
			c.Close()
			return &daemon{cmd, out}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not start listening on %s: %s", name, addr, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// qemuNBD serves file with qemu-nbd on a unix socket and returns the
// socket path. args come before the file name.
func qemuNBD(t testing.TB, file string, args ...string) string {
	t.Helper()
	needCmd(t, "qemu-nbd")
	sock := filepath.Join(shortTempDir(t), "qemu-nbd.sock")
	startDaemon(t, "unix", sock, "qemu-nbd", append(append([]string{"--persistent", "--socket=" + sock}, args...), file)...)
	return sock
}

// nbdkit runs nbdkit in the foreground on a unix socket with args (plugin,
// filters, parameters) and returns the socket path.
func nbdkit(t testing.TB, args ...string) string {
	t.Helper()
	needCmd(t, "nbdkit")
	sock := filepath.Join(shortTempDir(t), "nbdkit.sock")
	startDaemon(t, "unix", sock, "nbdkit", append([]string{"--foreground", "--unix", sock}, args...)...)
	return sock
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// sparseFile creates a file of size bytes holding random data in the given
// [offset, end) ranges and holes elsewhere, and returns its path and
// contents.
func sparseFile(t testing.TB, dir string, size int64, seed uint64, ranges ...[2]int64) (string, []byte) {
	t.Helper()
	path := filepath.Join(dir, fmt.Sprintf("sparse-%d.raw", seed))
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	rng := newRand(seed)
	for _, r := range ranges {
		copy(want[r[0]:r[1]], randBytes(rng, int(r[1]-r[0])))
		if _, err := f.WriteAt(want[r[0]:r[1]], r[0]); err != nil {
			t.Fatal(err)
		}
	}
	return path, want
}

// imageContents returns the guest-visible contents of an image file.
func imageContents(t testing.TB, path, format string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "contents.raw")
	run(t, "qemu-img", "convert", "-U", "-f", format, "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readAll reads the whole export through r in pieces of n bytes.
func readAll(t testing.TB, ctx context.Context, r interface {
	ReadAt(context.Context, []byte, int64) (int, error)
	Size() int64
}, n int) []byte {
	t.Helper()
	got := make([]byte, r.Size())
	for off := int64(0); off < r.Size(); off += int64(n) {
		end := min(off+int64(n), r.Size())
		if _, err := r.ReadAt(ctx, got[off:end], off); err != nil {
			t.Fatalf("read %d bytes at %d: %v", end-off, off, err)
		}
	}
	return got
}

// collectExtents walks a context over the whole export.
func collectExtents(t testing.TB, ctx context.Context, c *Client, name string) []Extent {
	t.Helper()
	var out []Extent
	for e, err := range c.Extents(ctx, name, 0, c.Size()) {
		if err != nil {
			t.Fatalf("extents of %s: %v", name, err)
		}
		out = append(out, e)
	}
	return out
}

// extentsOf builds the expected extents of a layout: flags on in ranges,
// off elsewhere, over size bytes.
func extentsOf(size int64, on, off uint32, ranges ...[2]int64) []Extent {
	var out []Extent
	add := func(o, l int64, f uint32) {
		if l == 0 {
			return
		}
		if k := len(out); k > 0 && out[k-1].Flags == f {
			out[k-1].Length += l
			return
		}
		out = append(out, Extent{o, l, f})
	}
	pos := int64(0)
	for _, r := range ranges {
		add(pos, r[0]-pos, off)
		add(r[0], r[1]-r[0], on)
		pos = r[1]
	}
	add(pos, size-pos, off)
	return out
}

// ---- QMP, just enough for the tests ----

type qmpConn struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
	qemu *daemon
}

// startQEMU starts a paused QEMU with a QMP socket and extra arguments.
func startQEMU(t testing.TB, args ...string) *qmpConn {
	t.Helper()
	needCmd(t, "qemu-system-x86_64")
	sock := filepath.Join(shortTempDir(t), "qmp.sock")
	base := []string{"-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-qmp", "unix:" + sock + ",server=on,wait=off"}
	d := startDaemon(t, "unix", sock, "qemu-system-x86_64", append(base, args...)...)
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	q := &qmpConn{t: t, conn: conn, r: bufio.NewReader(conn), qemu: d}
	if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
		t.Fatal(err)
	}
	q.cmd("qmp_capabilities", nil)
	return q
}

// cmd runs a QMP command and returns its "return" value.
func (q *qmpConn) cmd(name string, args any) json.RawMessage {
	q.t.Helper()
	req := map[string]any{"execute": name}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	_ = q.conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		q.t.Fatal(err)
	}
	for {
		line, err := q.r.ReadBytes('\n')
		if err != nil {
			q.t.Fatalf("QMP %s: %v", name, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct{ Class, Desc string }
			Event  string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			q.t.Fatalf("QMP %s: %v: %s", name, err, line)
		}
		switch {
		case resp.Error != nil:
			q.t.Fatalf("QMP %s: %s: %s", name, resp.Error.Class, resp.Error.Desc)
		case resp.Event != "":
			continue
		default:
			return resp.Return
		}
	}
}

// hmp runs a human monitor command and returns its output. QEMU 7.2
// prints the output of HMP qemu-io on its stdout rather than returning it:
// with until, hmp waits (up to 10 s) for QEMU's stdout to show that text
// and includes that output.
func (q *qmpConn) hmp(line string, until ...string) string {
	q.t.Helper()
	before := len(q.qemu.out.String())
	var s string
	if err := json.Unmarshal(q.cmd("human-monitor-command", map[string]any{"command-line": line}), &s); err != nil {
		q.t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); len(until) > 0 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if strings.Contains(q.qemu.out.String()[before:], until[0]) {
			break
		}
	}
	return s + q.qemu.out.String()[before:]
}

func itoa(i int) string { return strconv.Itoa(i) }
