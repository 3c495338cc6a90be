package guestvm

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ReadyMarker is the console line the guest prints once qemu-ga and walapp
// are started.
const ReadyMarker = "vmshadow-guest: ready"

// fatalMarker starts the console line of a guest that cannot come up.
const fatalMarker = "vmshadow-guest: FATAL"

// Disk is a data disk given to the guest as a virtio-blk device. The guest
// mounts the first on /data and the others on /data-vdb, /data-vdc, ...; walapp
// writes its log (walcheck.LogPath in the file system) on each.
type Disk struct {
	Path   string // image file, e.g. made by MakeDataDisk
	Format string // "raw" (default) or "qcow2"
	// NodeName is the block node name of the format node (default "diskN");
	// the protocol (file) node below it is NodeName+"-file".
	NodeName string
	// DeviceID is the qdev id of the virtio-blk-pci device (default "vdiskN");
	// its QOM path is /machine/peripheral/DeviceID.
	DeviceID string
}

// Options configure Start.
type Options struct {
	// Dir holds the VM's sockets, console log and QEMU's log. Required; keep
	// it short: UNIX socket paths are limited to 107 bytes.
	Dir       string
	DataDisks []Disk
	// KernelArgs are added to the kernel command line, e.g. the guest's knobs
	// "vmshadow.noagent=1", "vmshadow.refuse_freeze=1", "vmshadow.noapp=1",
	// "vmshadow.wal_interval_ms=N", "vmshadow.wal_batch=N",
	// "vmshadow.hook_timeout=N", "vmshadow.debug=1" (see guest/init).
	KernelArgs []string
	MemoryMB   int    // default 256
	Accel      string // "tcg", "kvm", or "" to use DetectAccel
	// BootTimeout bounds the wait for the ready marker (default 3 minutes:
	// TCG on a loaded machine is slow).
	BootTimeout time.Duration
	// QEMU is the emulator binary (default qemu-system-x86_64).
	QEMU string
	// ExtraArgs are appended to QEMU's command line.
	ExtraArgs []string
	// BootFromDisk boots the first data disk through the firmware (SeaBIOS)
	// and its bootloader instead of -kernel and -initrd: a disk made by
	// BuildBootDisk, whose kernel command line is its own (KernelArgs must
	// be empty).
	BootFromDisk bool
}

// VM is a running guest.
type VM struct {
	QMPSocket     string // QMP monitor for the code under test
	TestQMPSocket string // a second QMP monitor for the test's own look (one client per monitor)
	AgentSocket   string // qemu-ga's virtio-serial port org.qemu.guest_agent.0
	ControlSocket string // the guest's control port org.vmshadow.control (see Control)
	ConsoleLog    string // the serial console
	QEMULog       string // QEMU's standard output and error
	PID           int
	Accel         string
	Disks         []Disk        // as given, with node names and device ids filled in
	BootTime      time.Duration // from starting QEMU to the ready marker

	cmd     *exec.Cmd
	done    chan struct{} // closed when QEMU has exited
	waitErr error
	ctlMu   sync.Mutex
}

// Start boots the guest under QEMU and waits for its ready marker. The VM
// runs until Stop or Kill, whatever happens to ctx afterwards; ctx bounds
// only the start.
func Start(ctx context.Context, g *Guest, opts Options) (*VM, error) {
	if opts.Dir == "" {
		return nil, errors.New("guestvm.Start: Options.Dir is required")
	}
	if opts.Accel == "" {
		a, err := DetectAccel(ctx, g)
		if err != nil {
			return nil, err
		}
		opts.Accel = a
	}
	vm := &VM{
		QMPSocket:     filepath.Join(opts.Dir, "qmp.sock"),
		TestQMPSocket: filepath.Join(opts.Dir, "qmp-test.sock"),
		AgentSocket:   filepath.Join(opts.Dir, "qga.sock"),
		ControlSocket: filepath.Join(opts.Dir, "control.sock"),
		ConsoleLog:    filepath.Join(opts.Dir, "console.log"),
		QEMULog:       filepath.Join(opts.Dir, "qemu.log"),
		Accel:         opts.Accel,
		done:          make(chan struct{}),
	}
	if len(vm.ControlSocket) > 107 {
		return nil, fmt.Errorf("VM directory %s is too long for UNIX socket paths: use a shorter one", opts.Dir)
	}
	for i, d := range opts.DataDisks {
		if d.Format == "" {
			d.Format = "raw"
		}
		if d.NodeName == "" {
			d.NodeName = fmt.Sprintf("disk%d", i)
		}
		if d.DeviceID == "" {
			d.DeviceID = fmt.Sprintf("vdisk%d", i)
		}
		if _, err := os.Stat(d.Path); err != nil {
			return nil, fmt.Errorf("data disk %d: %w", i, err)
		}
		vm.Disks = append(vm.Disks, d)
	}
	args, err := vm.qemuArgs(g, opts)
	if err != nil {
		return nil, err
	}
	for _, f := range []string{vm.QMPSocket, vm.TestQMPSocket, vm.AgentSocket, vm.ControlSocket, vm.ConsoleLog} {
		os.Remove(f)
	}
	logf, err := os.Create(vm.QEMULog)
	if err != nil {
		return nil, fmt.Errorf("create QEMU log: %w", err)
	}
	defer logf.Close()
	qemu := opts.QEMU
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	vm.cmd = exec.Command(qemu, args...)
	vm.cmd.Stdout, vm.cmd.Stderr = logf, logf
	// QEMU must not outlive the test or demo that started it.
	vm.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := vm.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", qemu, err)
	}
	vm.PID = vm.cmd.Process.Pid
	go func() {
		vm.waitErr = vm.cmd.Wait()
		close(vm.done)
	}()

	timeout := opts.BootTimeout
	if timeout == 0 {
		timeout = 3 * time.Minute
	}
	if err := vm.waitReady(ctx, timeout); err != nil {
		vm.Kill()
		return nil, fmt.Errorf("boot test guest (%s): %w\n%s", vm.Accel, err, vm.diagnostics())
	}
	vm.BootTime = time.Since(start)
	return vm, nil
}

func (vm *VM) qemuArgs(g *Guest, opts Options) ([]string, error) {
	mem := opts.MemoryMB
	if mem == 0 {
		mem = 256
	}
	switch opts.Accel {
	case "tcg", "kvm":
	default:
		return nil, fmt.Errorf("accelerator %q: use tcg or kvm", opts.Accel)
	}
	// no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer
	// check can fail and panic the boot ("IO-APIC + timer doesn't work").
	cmdline := append([]string{"console=ttyS0", "panic=-1", "quiet", "no_timer_check"}, opts.KernelArgs...)
	for _, a := range cmdline {
		if strings.ContainsAny(a, " \t\n\"") {
			return nil, fmt.Errorf("kernel argument %q has a space or quote", a)
		}
	}
	sock := func(id, path string) string {
		return "socket,id=" + id + ",path=" + escape(path) + ",server=on,wait=off"
	}
	boot := []string{"-kernel", g.Kernel, "-initrd", g.Initrd, "-append", strings.Join(cmdline, " ")}
	if opts.BootFromDisk {
		if len(opts.KernelArgs) > 0 || len(vm.Disks) == 0 {
			return nil, errors.New("BootFromDisk: the first data disk must be a boot disk, and KernelArgs empty (the disk's bootloader has the command line)")
		}
		boot = nil
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-machine", "q35", "-accel", opts.Accel, "-smp", "1", "-m", strconv.Itoa(mem),
		"-chardev", "file,id=console,path=" + escape(vm.ConsoleLog), "-serial", "chardev:console",
		"-chardev", sock("qmp", vm.QMPSocket), "-mon", "chardev=qmp,mode=control",
		"-chardev", sock("qmptest", vm.TestQMPSocket), "-mon", "chardev=qmptest,mode=control",
		"-device", "virtio-serial-pci,id=vserial0",
		"-chardev", sock("qga0", vm.AgentSocket),
		"-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
		"-chardev", sock("control0", vm.ControlSocket),
		"-device", "virtserialport,chardev=control0,name=org.vmshadow.control",
	}
	args = append(args, boot...)
	if opts.Accel == "kvm" {
		args = append(args, "-cpu", "host")
	}
	for _, d := range vm.Disks {
		switch d.Format {
		case "raw", "qcow2":
		default:
			return nil, fmt.Errorf("data disk %s: format %q: use raw or qcow2", d.Path, d.Format)
		}
		node, err := json.Marshal(map[string]any{
			"driver": d.Format, "node-name": d.NodeName,
			"file": map[string]any{"driver": "file", "filename": d.Path, "node-name": d.NodeName + "-file"},
		})
		if err != nil {
			return nil, err
		}
		dev := "virtio-blk-pci,drive=" + escape(d.NodeName) + ",id=" + escape(d.DeviceID)
		if opts.BootFromDisk && d.NodeName == vm.Disks[0].NodeName {
			dev += ",bootindex=1"
		}
		args = append(args, "-blockdev", string(node), "-device", dev)
	}
	return append(args, opts.ExtraArgs...), nil
}

// escape doubles commas, QEMU's escape in option values.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func (vm *VM) waitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		con, _ := os.ReadFile(vm.ConsoleLog)
		if i := strings.Index(string(con), fatalMarker); i >= 0 {
			line, _, _ := strings.Cut(string(con[i:]), "\n")
			return errors.New(line)
		}
		if strings.Contains(string(con), ReadyMarker) {
			return nil
		}
		select {
		case <-vm.done:
			return fmt.Errorf("QEMU exited before the guest was ready: %v", vm.waitErr)
		case <-deadline.C:
			return fmt.Errorf("no ready marker on the console after %v", timeout)
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// diagnostics is the end of the console and of QEMU's log, for errors.
func (vm *VM) diagnostics() string {
	con, _ := os.ReadFile(vm.ConsoleLog)
	ql, _ := os.ReadFile(vm.QEMULog)
	return fmt.Sprintf("--- console (%s) ---\n%s\n--- QEMU (%s) ---\n%s",
		vm.ConsoleLog, tail(string(con), 30), vm.QEMULog, tail(string(ql), 10))
}

// Console returns what the guest printed on its serial console so far.
func (vm *VM) Console() string {
	b, _ := os.ReadFile(vm.ConsoleLog)
	return string(b)
}

// Exited reports whether QEMU has exited.
func (vm *VM) Exited() bool {
	select {
	case <-vm.done:
		return true
	default:
		return false
	}
}

// Wait waits until QEMU exits or ctx ends.
func (vm *VM) Wait(ctx context.Context) error {
	select {
	case <-vm.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Kill ends QEMU at once (SIGKILL), like a host crash would for the guest,
// and waits for it. Killing a VM that has exited does nothing.
func (vm *VM) Kill() {
	if vm.Exited() {
		return
	}
	_ = vm.cmd.Process.Kill()
	<-vm.done
}

// Stop powers the guest off cleanly: walapp stops after fsync, qemu-ga stops,
// the data disks are unmounted, then QEMU exits. It kills QEMU when that does
// not happen within ctx (or 2 minutes) and then says so.
func (vm *VM) Stop(ctx context.Context) error {
	if vm.Exited() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if _, err := vm.Control(ctx, "poweroff"); err != nil {
		vm.Kill()
		return fmt.Errorf("power off the guest: %w (QEMU killed)", err)
	}
	if err := vm.Wait(ctx); err != nil {
		vm.Kill()
		return fmt.Errorf("guest did not power off: %w (QEMU killed)\n%s", err, vm.diagnostics())
	}
	if !strings.Contains(vm.Console(), "vmshadow-guest: powering off") {
		return fmt.Errorf("QEMU exited without the guest powering off\n%s", vm.diagnostics())
	}
	return nil
}

// Control sends one command to the guest's control port and returns the
// reply without its "ok " prefix. Commands (see guest/init):
//
//	ping, status, agent-stop, agent-start, refuse-freeze on|off, poweroff
//
// The port works whatever qemu-ga's state, also while file systems are frozen.
// An "error ..." reply is returned as an error.
func (vm *VM) Control(ctx context.Context, command string) (string, error) {
	vm.ctlMu.Lock()
	defer vm.ctlMu.Unlock()
	if strings.ContainsAny(command, "\n\r") {
		return "", fmt.Errorf("control command %q has a line break", command)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", vm.ControlSocket)
	if err != nil {
		return "", fmt.Errorf("connect to the guest's control port: %w", err)
	}
	defer conn.Close()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(30 * time.Second)
	}
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := conn.Write([]byte(command + "\n")); err != nil {
		return "", fmt.Errorf("control %q: %w", command, err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("control %q: no reply: %w", command, err)
	}
	line = strings.TrimRight(line, "\r\n")
	if rest, ok := strings.CutPrefix(line, "ok"); ok {
		return strings.TrimSpace(rest), nil
	}
	return "", fmt.Errorf("control %q: guest says: %s", command, line)
}

// Status is the guest's state as its control port reports it.
type Status struct {
	Agent        bool   // qemu-ga is running
	App          bool   // walapp is running
	RefuseFreeze bool   // the fsfreeze hook refuses to freeze
	Paused       bool   // walapp's paused marker exists
	Seq          uint64 // last record walapp wrote
	Durable      uint64 // last record walapp fsynced
	State        string // walapp's state: running, paused, stopped, or "" before it wrote one
}

// Status asks the guest for its state.
func (vm *VM) Status(ctx context.Context) (Status, error) {
	reply, err := vm.Control(ctx, "status")
	if err != nil {
		return Status{}, err
	}
	return parseStatus(reply)
}

func parseStatus(reply string) (Status, error) {
	var s Status
	for _, f := range strings.Fields(reply) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return s, fmt.Errorf("guest status %q: field %q is not key=value", reply, f)
		}
		var err error
		switch k {
		case "agent":
			s.Agent = v == "running"
		case "app":
			s.App = v == "running"
		case "refuse_freeze":
			s.RefuseFreeze = v == "on"
		case "paused":
			s.Paused = v == "1"
		case "seq":
			s.Seq, err = strconv.ParseUint(v, 10, 64)
		case "durable":
			s.Durable, err = strconv.ParseUint(v, 10, 64)
		case "state":
			s.State = v
		}
		if err != nil {
			return s, fmt.Errorf("guest status %q: %s: %w", reply, k, err)
		}
	}
	return s, nil
}
