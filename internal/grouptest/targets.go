package grouptest

import (
	"context"
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

// GuestAgent writes the log of a real guest through its qemu-ga: guest-exec
// of busybox dd, the record on standard input, one direct write of a sector
// at the record's slot of Device followed by fsync; the write is done when
// dd has exited 0.
//
// It connects for each write and disconnects after: QEMU serves one client
// per agent socket and the backup under test needs it too. While another
// client holds the socket the connection waits (busy), and while the guest's
// file systems are frozen the agent refuses guest-exec (busy).
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
	res, err := c.Exec(dctx, "/bin/busybox", []string{"dd", "of=" + g.Device, "bs=" + strconv.Itoa(RecordSize),
		"seek=" + strconv.FormatUint(n-1, 10), "count=1", "iflag=fullblock", "oflag=direct", "conv=notrunc,fsync"}, nil, Record(vm, n))
	if err != nil {
		var ae *qga.Error
		if errors.As(err, &ae) && strings.Contains(ae.Desc, "frozen") {
			return fmt.Errorf("%w: %v", ErrBusy, err) // "the agent is in frozen state"
		}
		return fmt.Errorf("guest-exec dd: %w", err)
	}
	if res.ExitCode != 0 || res.Signal != 0 {
		return fmt.Errorf("dd of=%s in the guest: exit %d signal %d: %s", g.Device, res.ExitCode, res.Signal, strings.TrimSpace(string(res.Stderr)))
	}
	return nil
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
