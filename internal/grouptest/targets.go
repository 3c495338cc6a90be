package grouptest

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/qga"
	"github.com/vmshadow/vmshadow/internal/qmp"
)

// WorkPort is the name of the virtio-serial port of the workload's own
// agent in a guest (WorkAgentArgs, StartWorkAgent).
const WorkPort = "org.vmshadow.grouptest"

// WorkAgentArgs are the QEMU arguments that give a guest a second agent
// port, WorkPort, whose host side is the UNIX socket path. The guest's
// virtio-serial device must exist (the test guest has one).
func WorkAgentArgs(path string) []string {
	return []string{
		"-chardev", "socket,id=grouptest0,path=" + strings.ReplaceAll(path, ",", ",,") + ",server=on,wait=off",
		"-device", "virtserialport,chardev=grouptest0,name=" + WorkPort,
	}
}

// StartWorkAgent starts, through the guest's agent at agentSocket, a
// second qemu-ga in the guest on the port WorkPort (see WorkAgentArgs),
// for the workload alone. The backup under test holds the guest's agent
// socket for the whole snapshot set (QEMU serves one client per socket):
// writing through it, the workload would stand still for the set, and a
// group that does not pause its VMs together could not be caught. The
// workload's agent is not frozen either (qemu-ga's frozen state is its
// own), and the log disk has no file system: the workload writes on
// while the guest's file systems are frozen, and only a paused VM stops
// it.
func StartWorkAgent(ctx context.Context, agentSocket string) error {
	c, err := qga.Dial(ctx, agentSocket)
	if err != nil {
		return err
	}
	defer c.Close()
	script := `dev=
for p in /sys/class/virtio-ports/*; do
	[ "$(cat "$p/name" 2>/dev/null)" = ` + WorkPort + ` ] && dev=/dev/${p##*/}
done
[ -n "$dev" ] || { echo "no virtio-serial port ` + WorkPort + `" >&2; exit 1; }
[ -e "$dev" ] || { echo "no device node $dev" >&2; exit 1; }
mkdir -p /run/grouptest-ga
qemu-ga -m virtio-serial -p "$dev" -t /run/grouptest-ga -f /run/grouptest-ga.pid </dev/null >/run/grouptest-ga.log 2>&1 &
echo "$dev"`
	res, err := c.Exec(ctx, "/bin/sh", []string{"-c", script}, nil, nil)
	if err != nil {
		return fmt.Errorf("start the workload's agent in the guest: %w", err)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("start the workload's agent in the guest: exit %d: %s", res.ExitCode, strings.TrimSpace(string(res.Stderr)))
	}
	return nil
}

// GuestAgent writes the log of a real guest through its qemu-ga: guest-exec
// of busybox dd, the record on standard input, one direct write of a sector
// at the record's slot of Device followed by fsync; the write is done when
// dd has exited 0.
//
// Socket is best the workload's own agent (StartWorkAgent). It connects
// for each write and disconnects after, so that it can share an agent
// socket with another client (QEMU serves one client at a time): while
// another client holds the socket the connection waits (busy), and while
// the guest's file systems are frozen the agent refuses guest-exec (busy).
type GuestAgent struct {
	VMName string
	Socket string // the agent's UNIX socket
	Device string // the log disk inside the guest, e.g. /dev/vdb
	// Timeout bounds one attempt: the connection (waiting while another
	// client holds the socket counts as busy), and then the write. Default
	// 30 s.
	Timeout time.Duration
}

func (g *GuestAgent) Name() string { return g.VMName }

func (g *GuestAgent) Write(ctx context.Context, vm int, n uint64) error {
	timeout := g.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	if _, err := os.Stat(g.Socket); err != nil {
		return fmt.Errorf("guest agent socket: %w", err)
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := qga.Dial(dctx, g.Socket)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w: %v", ErrBusy, err) // another client holds the socket
	}
	defer c.Close()
	args := []string{"dd", "of=" + g.Device, "bs=" + strconv.Itoa(RecordSize), "seek=" + strconv.FormatUint(n-1, 10),
		"count=1", "iflag=fullblock", "oflag=direct", "conv=notrunc,fsync"}
	code, stderr, err := execFast(dctx, c, "/bin/busybox", args, Record(vm, n))
	if err != nil {
		var ae *qga.Error
		if errors.As(err, &ae) && strings.Contains(ae.Desc, "frozen") {
			return fmt.Errorf("%w: %v", ErrBusy, err) // "the agent is in frozen state"
		}
		return fmt.Errorf("guest-exec dd: %w", err)
	}
	if code != "" {
		return fmt.Errorf("dd of=%s in the guest: %s: %s", g.Device, code, strings.TrimSpace(stderr))
	}
	return nil
}

// execFast runs a program in the guest like qga.Client.Exec, but asks for
// its end every 5 ms rather than 100: the workload's pace is that of its
// writes, and the faster it goes the smaller the gap between two VMs'
// snapshots it catches. code is "" for exit 0, else what ended it.
func execFast(ctx context.Context, c *qga.Client, path string, args []string, stdin []byte) (code, stderr string, err error) {
	var started struct {
		PID int `json:"pid"`
	}
	req := map[string]any{"path": path, "arg": args, "capture-output": true, "input-data": base64.StdEncoding.EncodeToString(stdin)}
	if err := c.Execute(ctx, "guest-exec", req, &started); err != nil {
		return "", "", err
	}
	for {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			Signal   int    `json:"signal"`
			ErrData  string `json:"err-data"`
		}
		if err := c.Execute(ctx, "guest-exec-status", map[string]int{"pid": started.PID}, &st); err != nil {
			return "", "", err
		}
		if st.Exited {
			errOut, _ := base64.StdEncoding.DecodeString(st.ErrData)
			switch {
			case st.Signal != 0:
				code = fmt.Sprintf("signal %d", st.Signal)
			case st.ExitCode != 0:
				code = fmt.Sprintf("exit %d", st.ExitCode)
			}
			return code, string(errOut), nil
		}
		select {
		case <-ctx.Done():
			return "", "", fmt.Errorf("guest-exec %s: %w", path, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// QEMUIO writes the log of a VM without an OS through QEMU itself: HMP
// qemu-io on the disk's device ("qemu-io -d QOMPATH"), as the guest's own
// I/O would go (through any filter vmshadow inserted above the disk), with
// FUA. qemu-io reports on QEMU's standard output, which it reads back to
// know the write was done.
//
// QEMU runs qemu-io whatever the VM's run state: to behave like a guest,
// which cannot write while paused, it asks query-status first and is busy
// unless the VM runs. The two commands are not atomic: a pause between them
// lets one write land in a paused VM. A set that pauses every VM of the
// group before committing any still holds the invariant (the next write of
// the sequence needs another VM, which is paused), so this does not weaken
// the check of a group.
type QEMUIO struct {
	VMName    string
	QMPSocket string // a QMP monitor of its own: QEMU serves one client per monitor
	Device    string // QOM path of the disk's block backend, e.g. /machine/peripheral/log/virtio-backend
	Stdout    string // QEMU's standard output (a file)
	Dir       string // where the record is put for qemu-io -s: no spaces or quotes

	mu sync.Mutex
	c  *qmp.Client
}

func (q *QEMUIO) Name() string { return q.VMName }

// Close drops the QMP connection.
func (q *QEMUIO) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.c == nil {
		return nil
	}
	err := q.c.Close()
	q.c = nil
	return err
}

func (q *QEMUIO) Write(ctx context.Context, vm int, n uint64) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if q.c == nil {
		c, err := qmp.Dial(ctx, q.QMPSocket)
		if err != nil {
			return err
		}
		q.c = c
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := q.c.Execute(ctx, "query-status", nil, &st); err != nil {
		return err
	}
	if st.Status != "running" {
		return fmt.Errorf("%w: the VM is %s", ErrBusy, st.Status)
	}
	src := filepath.Join(q.Dir, fmt.Sprintf("record-%d.bin", vm))
	if strings.ContainsAny(src, " \"'\\") {
		return fmt.Errorf("record file %q: the directory must have no spaces, quotes or backslashes (it goes on a qemu-io command line)", src)
	}
	if err := os.WriteFile(src, Record(vm, n), 0o600); err != nil {
		return err
	}
	before, err := size(q.Stdout)
	if err != nil {
		return fmt.Errorf("QEMU's standard output: %w", err)
	}
	off := Offset(n)
	out, err := q.c.HMP(ctx, fmt.Sprintf("qemu-io -d %s \"write -f -s %s %d %d\"", q.Device, src, off, RecordSize))
	if err != nil {
		return fmt.Errorf("qemu-io: %w", err)
	}
	if s := strings.TrimSpace(out); s != "" {
		return fmt.Errorf("qemu-io: %s", s)
	}
	// qemu-io printed its report before the command returned.
	want := fmt.Sprintf("wrote %d/%d bytes at offset %d", RecordSize, RecordSize, off)
	report, err := readFrom(q.Stdout, before)
	if err != nil {
		return fmt.Errorf("QEMU's standard output: %w", err)
	}
	if !strings.Contains(report, want) {
		return fmt.Errorf("qemu-io write of record %d: no %q on QEMU's output, which says: %q", n, want, strings.TrimSpace(report))
	}
	return nil
}

func size(path string) (int64, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// readFrom reads path from offset off, at most 64 KiB.
func readFrom(path string, off int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(io.NewSectionReader(f, off, 1<<62), 64<<10))
	return string(b), err
}
