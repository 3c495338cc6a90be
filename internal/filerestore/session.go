// Package filerestore owns file-level restore (vmshadow files): it serves a
// backup's disks read-only over NBD on a private socket (the instant-restore
// path: chunks read on demand and checked against their hashes), boots the
// helper VM (guest/fshelper: a Debian kernel and an initramfs whose /init is
// the agent) under QEMU with those disks attached read-only, and talks to
// the agent over virtio-serial (internal/fsproto). The file systems are
// parsed only by the helper VM's kernel, so a hostile file system cannot
// harm the host; everything the agent says is checked before use.
package filerestore

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/fsproto"
	"github.com/vmshadow/vmshadow/internal/nbd"
)

// Helper is the helper VM's kernel and initramfs.
type Helper struct {
	Dir    string
	Kernel string
	Initrd string
}

// DefaultHelperDir is where guest/fshelper/build.sh leaves its newest
// build: $VMSHADOW_FSHELPER_CACHE/current, else
// ${XDG_CACHE_HOME:-~/.cache}/vmshadow/fshelper/current.
func DefaultHelperDir() string {
	if d := os.Getenv("VMSHADOW_FSHELPER_CACHE"); d != "" {
		return filepath.Join(d, "current")
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, _ := os.UserHomeDir()
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "vmshadow", "fshelper", "current")
}

// FindHelper returns the helper in dir (DefaultHelperDir when empty).
func FindHelper(dir string) (*Helper, error) {
	if dir == "" {
		dir = DefaultHelperDir()
	}
	h := &Helper{Dir: dir, Kernel: filepath.Join(dir, "vmlinux"), Initrd: filepath.Join(dir, "initrd.img")}
	for _, f := range []string{h.Kernel, h.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("file restore helper VM: %s is missing (build the helper with guest/fshelper/build.sh, or 'make fshelper', or name its directory with --helper): %w", f, errs.ErrUnsupported)
		}
	}
	return h, nil
}

// Disk is one disk to attach to the helper VM.
type Disk struct {
	Name   string // the backup's disk name (vda, sda, ...)
	Export nbd.Export
}

// Options say how the helper VM runs.
type Options struct {
	Helper *Helper
	QEMU   string // default qemu-system-x86_64
	Accel  string // default tcg
	// MemoryMB of the helper VM (default 256).
	MemoryMB int
	// BootTimeout bounds the boot until the agent answers (default 3m).
	BootTimeout time.Duration
	// RequestTimeout bounds each answer of the agent (default 5m): a
	// file system that hangs the helper's kernel fails the command.
	RequestTimeout time.Duration
	// WorkDir holds the sockets and the console log (a temporary
	// directory when empty, removed by Close).
	WorkDir string
}

// FS is one file system (or unrecognised volume) found on the disks.
type FS struct {
	Name   string `json:"name"` // vda1, vda (a whole disk), lvm:vg0/root
	Disk   string `json:"disk"`
	Type   string `json:"type,omitempty"`
	Label  string `json:"label,omitempty"`
	Size   int64  `json:"size"`
	Table  string `json:"table,omitempty"` // the disk's partition table (whole disks)
	Found  string `json:"found,omitempty"` // what was found where Type is empty
	dev    string
	usable bool
}

// Usable reports whether the file system can be listed.
func (f *FS) Usable() bool { return f.usable }

// Session is a running helper VM with the backup's disks attached.
type Session struct {
	opts    Options
	dir     string
	tmpDir  bool
	nbd     *nbd.Server
	ln      net.Listener
	qemu    *exec.Cmd
	exited  chan struct{}
	conn    net.Conn
	r       *bufio.Reader
	mu      sync.Mutex
	disks   []*watched
	FS      []FS
	Notes   []string
	Kernel  string
	Boot    time.Duration
	console string
	broken  error // the connection failed: the stream may be out of step
}

// watched is an export that remembers the first read error (a chunk that
// failed verification), so that an I/O error the agent reports can be
// told as corrupt data of the backup.
type watched struct {
	nbd.Export
	name string
	mu   sync.Mutex
	err  error
}

func (w *watched) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := w.Export.ReadAt(ctx, p, off)
	if err != nil && !errors.Is(err, io.EOF) && ctx.Err() == nil {
		w.mu.Lock()
		if w.err == nil {
			w.err = fmt.Errorf("disk %s: %w", w.name, err)
		}
		w.mu.Unlock()
	}
	return n, err
}

func (w *watched) Extents(ctx context.Context, off, length int64) ([]nbd.Extent, error) {
	if x, ok := w.Export.(nbd.ExtentReporter); ok {
		return x.Extents(ctx, off, length)
	}
	return []nbd.Extent{{Offset: off, Length: length}}, nil
}

func (w *watched) readErr() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// Start serves the disks, boots the helper VM and waits for its agent's
// inventory.
func Start(ctx context.Context, disks []Disk, o Options) (_ *Session, err error) {
	if o.Helper == nil {
		return nil, errors.New("filerestore: no helper")
	}
	if len(disks) == 0 || len(disks) > 20 {
		return nil, fmt.Errorf("%d disks: the helper VM takes 1 to 20: %w", len(disks), errs.ErrUsage)
	}
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.Accel == "" {
		o.Accel = "tcg"
	}
	if o.MemoryMB == 0 {
		o.MemoryMB = 256
	}
	if o.BootTimeout == 0 {
		o.BootTimeout = 3 * time.Minute
	}
	if o.RequestTimeout == 0 {
		o.RequestTimeout = 5 * time.Minute
	}
	s := &Session{opts: o, dir: o.WorkDir, exited: make(chan struct{})}
	if s.dir == "" {
		if s.dir, err = os.MkdirTemp("", "vmshadow-files-"); err != nil {
			return nil, err
		}
		s.tmpDir = true
	}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	s.console = filepath.Join(s.dir, "console.log")
	s.nbd = nbd.NewServer(nil)
	for _, d := range disks {
		w := &watched{Export: d.Export, name: d.Name}
		s.disks = append(s.disks, w)
		if err := s.nbd.AddExport(d.Name, w, nbd.ExportOptions{ReadOnly: true}); err != nil {
			return nil, err
		}
	}
	nbdSock := filepath.Join(s.dir, "nbd.sock")
	if s.ln, err = net.Listen("unix", nbdSock); err != nil {
		return nil, fmt.Errorf("listen for the helper VM's disks: %w", err)
	}
	go s.nbd.Serve(s.ln)
	agentSock := filepath.Join(s.dir, "agent.sock")
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		// seccomp: QEMU itself may not spawn, raise privileges or use
		// obsolete system calls, should the helper's guest break out.
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-machine", "q35", "-accel", o.Accel, "-smp", "1", "-m", strconv.Itoa(o.MemoryMB),
		"-kernel", o.Helper.Kernel, "-initrd", o.Helper.Initrd,
		"-append", "console=ttyS0 panic=-1 quiet no_timer_check",
		"-chardev", "file,id=console,path=" + esc(s.console), "-serial", "chardev:console",
		"-device", "virtio-serial-pci,id=vserial0",
		"-chardev", "socket,id=agent0,path=" + esc(agentSock) + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent0,name=org.vmshadow.files",
	} // -nodefaults: no network device, the helper has no network
	for i, d := range disks {
		node := fmt.Sprintf("d%d", i)
		args = append(args, "-blockdev",
			fmt.Sprintf(`{"driver":"raw","node-name":"%s","read-only":true,"file":{"driver":"nbd","read-only":true,"server":{"type":"unix","path":%q},"export":%q}}`,
				node, nbdSock, d.Name),
			"-device", "virtio-blk-pci,drive="+node+",serial="+node+",id=blk"+node)
	}
	s.qemu = exec.Command(o.QEMU, args...)
	var stderr strings.Builder
	s.qemu.Stderr = &limited{w: &stderr, n: 8 << 10}
	start := time.Now()
	if err := s.qemu.Start(); err != nil {
		return nil, fmt.Errorf("start the helper VM (%s): %w: %w", o.QEMU, err, errs.ErrUnsupported)
	}
	go func() { s.qemu.Wait(); close(s.exited) }()
	bctx, cancel := context.WithTimeout(ctx, o.BootTimeout)
	defer cancel()
	// Connect to the agent's port (QEMU creates the socket shortly).
	for {
		s.conn, err = net.Dial("unix", agentSock)
		if err == nil {
			break
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("the helper VM did not start: QEMU exited (%s): %s: %w", s.qemu.ProcessState, strings.TrimSpace(stderr.String()), errs.ErrUnsupported)
		case <-bctx.Done():
			return nil, s.bootFailed(ctx, "QEMU created no agent socket")
		case <-time.After(20 * time.Millisecond):
		}
	}
	s.r = bufio.NewReaderSize(s.conn, 256<<10)
	var h fsproto.Hello
	if err := s.call(bctx, &fsproto.Request{Op: fsproto.OpHello}, &h); err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if bctx.Err() != nil || errors.Is(err, errs.ErrTimeout) {
			return nil, s.bootFailed(ctx, "its agent did not answer")
		}
		select { // the connection dropped: QEMU is likely on its way out
		case <-s.exited:
			return nil, fmt.Errorf("the helper VM stopped before its agent answered: QEMU exited (%s): %s\n%s: %w", s.qemu.ProcessState,
				strings.TrimSpace(stderr.String()), s.consoleTail(), errs.ErrUnsupported)
		case <-time.After(3 * time.Second):
		}
		return nil, fmt.Errorf("the helper VM's agent: %w", err)
	}
	if err := fsproto.CheckHello(&h); err != nil {
		return nil, err
	}
	s.Boot = time.Since(start)
	s.Kernel = fsproto.Printable(h.Kernel, 100)
	for _, n := range h.Notes {
		s.Notes = append(s.Notes, fsproto.Printable(n, 600))
	}
	s.FS = inventory(disks, h.Devices)
	return s, nil
}

func (s *Session) bootFailed(ctx context.Context, what string) error {
	return fmt.Errorf("the helper VM did not come up within %s: %s\n%s: %w", s.opts.BootTimeout, what, s.consoleTail(), errs.ErrTimeout)
}

func (s *Session) consoleTail() string {
	b, _ := os.ReadFile(s.console)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return "helper console: " + fsproto.Printable(strings.TrimSpace(string(b)), 2100)
}

// limited writes at most n bytes to w.
type limited struct {
	w io.Writer
	n int
}

func (l *limited) Write(p []byte) (int, error) {
	if l.n > 0 {
		k := min(l.n, len(p))
		l.w.Write(p[:k])
		l.n -= k
	}
	return len(p), nil
}

func esc(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// partName names partition n of disk: vda1, nvme0n1p1.
func partName(disk string, n int) string {
	if disk != "" && disk[len(disk)-1] >= '0' && disk[len(disk)-1] <= '9' {
		return disk + "p" + strconv.Itoa(n)
	}
	return disk + strconv.Itoa(n)
}

// inventory maps the agent's devices to the backup's disk names.
func inventory(disks []Disk, devs []fsproto.Device) []FS {
	byDev := map[string]string{} // guest disk -> backup disk
	var out []FS
	for _, d := range devs {
		if d.Parent != "" || d.LV != "" {
			continue
		}
		i, err := strconv.Atoi(strings.TrimPrefix(d.Serial, "d"))
		if !strings.HasPrefix(d.Serial, "d") || err != nil || i < 0 || i >= len(disks) {
			continue
		}
		byDev[d.Dev] = disks[i].Name
	}
	for _, d := range devs {
		f := FS{Type: fsproto.Printable(d.FSType, 40), Label: fsproto.Printable(d.Label, 64), Size: d.Size,
			Found: fsproto.Printable(d.Found, 300), dev: d.Dev}
		switch {
		case d.LV != "":
			f.Name, f.Disk = "lvm:"+fsproto.Printable(d.LV, 200), "lvm"
		case d.Parent != "":
			disk, ok := byDev[d.Parent]
			if !ok || d.Number <= 0 {
				continue
			}
			f.Name, f.Disk = partName(disk, d.Number), disk
		default:
			disk, ok := byDev[d.Dev]
			if !ok {
				continue
			}
			f.Name, f.Disk, f.Table = disk, disk, fsproto.Printable(d.Table, 10)
		}
		switch f.Type {
		case "ext2", "ext3", "ext4", "xfs", "vfat", "btrfs", "ntfs":
			f.usable = true
		}
		out = append(out, f)
	}
	return out
}

// call sends one request and decodes the JSON reply into v.
func (s *Session) call(ctx context.Context, req *fsproto.Request, v any) error {
	typ, payload, err := s.roundTrip(ctx, req)
	if err != nil {
		return err
	}
	return fsproto.DecodeReply(typ, payload, v)
}

func (s *Session) roundTrip(ctx context.Context, req *fsproto.Request) (byte, []byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken != nil {
		return 0, nil, s.broken
	}
	dl := time.Now().Add(s.opts.RequestTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(dl) {
		dl = d
	}
	s.conn.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { s.conn.SetDeadline(time.Now()) })
	defer stop()
	if err := fsproto.WriteJSON(s.conn, fsproto.TypeRequest, req); err != nil {
		s.broken = s.connErr(ctx, err)
		return 0, nil, s.broken
	}
	typ, payload, err := fsproto.ReadFrame(s.r, fsproto.MaxPayload)
	if err != nil {
		s.broken = s.connErr(ctx, err)
		return 0, nil, s.broken
	}
	return typ, payload, nil
}

func (s *Session) connErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, fsproto.ErrProtocol) {
		return err
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("the helper VM's agent did not answer within %s: %w", s.opts.RequestTimeout, errs.ErrTimeout)
	}
	select {
	case <-s.exited:
		return fmt.Errorf("the helper VM stopped: %v\n%s: %w", err, s.consoleTail(), errs.ErrConnect)
	default:
	}
	return fmt.Errorf("talking to the helper VM's agent: %v: %w", err, errs.ErrConnect)
}

// Find returns the file system named name, or the only usable one when
// name is empty.
func (s *Session) Find(name string) (*FS, error) {
	var usable []string
	for i := range s.FS {
		f := &s.FS[i]
		if f.Name == name {
			if !f.usable {
				return nil, fmt.Errorf("%s: %s: %w", name, f.describe(), errs.ErrUnsupported)
			}
			return f, nil
		}
		if f.usable {
			usable = append(usable, f.Name)
		}
	}
	if name == "" && len(usable) == 1 {
		return s.Find(usable[0])
	}
	if len(usable) == 0 {
		var found []string
		for _, f := range s.FS {
			found = append(found, f.Name+": "+f.describe())
		}
		return nil, fmt.Errorf("no file system recognised on the backup's disks (found %s): %w", strings.Join(found, "; "), errs.ErrNotFound)
	}
	if name == "" {
		return nil, fmt.Errorf("several file systems (%s): name one, as in %s:/path: %w", strings.Join(usable, ", "), usable[0], errs.ErrUsage)
	}
	return nil, fmt.Errorf("no file system %q (the file systems are %s): %w", name, strings.Join(usable, ", "), errs.ErrNotFound)
}

func (f *FS) describe() string {
	switch {
	case f.Type == "LVM2_member":
		return "an LVM physical volume"
	case f.Type != "":
		return f.Type + " (not supported by the helper)"
	case f.Table != "":
		return "a " + f.Table + " partition table"
	case f.Found != "":
		return f.Found
	}
	return "nothing recognised"
}

// agentErr turns the agent's error about fs and path into a classified
// error; an I/O error is corrupt data when a disk read failed verification.
func (s *Session) agentErr(f *FS, p string, err error) error {
	var ae *fsproto.Error
	if !errors.As(err, &ae) {
		return err
	}
	where := f.Name + ":" + p
	switch ae.Kind {
	case "notfound":
		return fmt.Errorf("%s: no such file or directory: %w", where, errs.ErrNotFound)
	case "notdir":
		return fmt.Errorf("%s: a path component is not a directory: %w", where, errs.ErrNotFound)
	}
	for _, d := range s.disks {
		if derr := d.readErr(); derr != nil {
			return fmt.Errorf("%s: the helper VM could not read the backup's disk (%s): %w", where, ae.Message, derr)
		}
	}
	if ae.Kind == "mount" {
		return fmt.Errorf("%s: %s: %w", f.Name, ae.Message, errs.ErrUnsupported)
	}
	if ae.Kind == "io" {
		// Every chunk read verified: the file system itself was damaged
		// when it was backed up (not the repository: no exit code 8).
		return fmt.Errorf("%s: %s (the file system in the backup is damaged; the repository's data verified)", where, ae.Message)
	}
	return fmt.Errorf("%s: %s", where, ae.Message)
}

// Stat returns the entry of p on f, not following a final symlink.
func (s *Session) Stat(ctx context.Context, f *FS, p string) (*fsproto.Entry, error) {
	var e fsproto.Entry
	if err := s.call(ctx, &fsproto.Request{Op: fsproto.OpStat, FS: f.dev, Path: p}, &e); err != nil {
		return nil, s.agentErr(f, p, err)
	}
	if err := fsproto.CheckEntry(&e, false); err != nil {
		return nil, err
	}
	return &e, nil
}

// List calls fn for each entry of directory p on f, in name order.
func (s *Session) List(ctx context.Context, f *FS, p string, fn func(fsproto.Entry) error) error {
	cookie := 0
	for {
		var l fsproto.List
		if err := s.call(ctx, &fsproto.Request{Op: fsproto.OpList, FS: f.dev, Path: p, Cookie: cookie}, &l); err != nil {
			return s.agentErr(f, p, err)
		}
		if err := fsproto.CheckList(&l); err != nil {
			return err
		}
		for _, e := range l.Entries {
			if err := fn(e); err != nil {
				return err
			}
		}
		if l.Next == 0 {
			return nil
		}
		if l.Next <= cookie {
			return fmt.Errorf("agent listing %s: cookie went back from %d to %d: %w", p, cookie, l.Next, fsproto.ErrProtocol)
		}
		cookie = l.Next
	}
}

// ReadFile copies size bytes of regular file p on f to w, in pieces of
// fsproto.MaxRead; a file that changed size is an error.
func (s *Session) ReadFile(ctx context.Context, f *FS, p string, size int64, w io.Writer) error {
	for off := int64(0); off < size; {
		n := int(min(size-off, fsproto.MaxRead))
		typ, payload, err := s.roundTrip(ctx, &fsproto.Request{Op: fsproto.OpRead, FS: f.dev, Path: p, Offset: off, Length: n})
		if err != nil {
			return err
		}
		if typ != fsproto.TypeData {
			if err := fsproto.DecodeReply(typ, payload, &struct{}{}); err != nil {
				return s.agentErr(f, p, err)
			}
			return fmt.Errorf("agent reading %s: a reply where data was expected: %w", p, fsproto.ErrProtocol)
		}
		if len(payload) > n {
			return fmt.Errorf("agent reading %s: %d bytes for %d asked: %w", p, len(payload), n, fsproto.ErrProtocol)
		}
		if len(payload) < n {
			return fmt.Errorf("%s:%s: the file ended at %d bytes, %d expected", f.Name, p, off+int64(len(payload)), size)
		}
		if _, err := w.Write(payload); err != nil {
			return err
		}
		off += int64(n)
	}
	return nil
}

// Close asks the agent to power off, stops QEMU (killed after a few
// seconds) and the disks' server, and removes the work directory.
func (s *Session) Close() error {
	if s.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.call(ctx, &fsproto.Request{Op: fsproto.OpQuit}, &struct{}{})
		cancel()
		s.conn.Close()
	}
	if s.qemu != nil && s.qemu.Process != nil {
		select {
		case <-s.exited:
		case <-time.After(5 * time.Second):
			s.qemu.Process.Kill()
			<-s.exited
		}
	}
	if s.nbd != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s.nbd.Shutdown(ctx)
		cancel()
		s.nbd.Close()
	}
	if s.tmpDir {
		os.RemoveAll(s.dir)
	}
	return nil
}
