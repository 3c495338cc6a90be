package healthcheck

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/instant"
	"github.com/vmshadow/vmshadow/internal/qga"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// The pieces of a throwaway VM over a backup, usable on their own (a file
// restore's helper VM boots its own kernel over the same disks): Disks
// serves the backup's disks, Firmware prepares BIOS or UEFI, StartVM runs
// QEMU, VM.Stop ends it. Everything lives in one private directory the
// caller makes and removes.

// Disks is a backup's disks served to a throwaway VM: instant restore's
// NBD server (chunks read on demand, checked against their hashes) on a
// UNIX socket, every disk writable through an overlay file in the private
// directory, never the repository. Keep the repository locked (shared)
// until Close.
type Disks struct {
	Socket  string // the NBD server's socket; exports are named after the disks
	srv     *instant.Server
	readErr chan error
}

// ServeDisks serves the disks sel of backup id (manifest m) from dir.
func ServeDisks(ctx context.Context, r *repo.Repo, id repo.ID, m *repo.Manifest, sel []repo.ManifestDisk, dir string, cacheBytes int64, warn func(string)) (*Disks, error) {
	d := &Disks{Socket: filepath.Join(dir, "nbd.sock"), readErr: make(chan error, 1)}
	if len(d.Socket) > 107 {
		return nil, fmt.Errorf("directory %s is too long for UNIX socket paths (107 bytes): give a shorter one: %w", dir, errs.ErrUsage)
	}
	srv, err := instant.NewServer(ctx, r, id, m, instant.ServeOptions{Disks: sel, CacheBytes: cacheBytes,
		Writable: true, OverlayDir: filepath.Join(dir, "overlay"), Warn: warn,
		ReadError: func(disk string, err error) {
			select {
			case d.readErr <- fmt.Errorf("disk %s: %w", disk, err):
			default:
			}
		}})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", d.Socket)
	if err != nil {
		srv.Close()
		return nil, fmt.Errorf("serve the disks: listen on %s: %w", d.Socket, err)
	}
	d.srv = srv
	go srv.Serve(ln)
	return d, nil
}

// ReadErrors delivers the first failed read of a disk (a damaged or
// missing chunk: the VM got an I/O error, never the data).
func (d *Disks) ReadErrors() <-chan error { return d.readErr }

// Close stops serving and removes the overlays.
func (d *Disks) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	d.srv.Shutdown(ctx)
	d.srv.Close()
}

// Firmware returns the QEMU arguments of the machine's firmware: none for
// BIOS (SeaBIOS); for UEFI, Debian's OVMF and a copy in dir of the
// backup's stored NVRAM (or of OVMF's empty variable store), so the guest
// may write its variables and the backup's stay as they are.
func Firmware(ctx context.Context, r *repo.Repo, m *repo.Manifest, mach *Machine, dir string) ([]string, error) {
	if mach.Firmware != "uefi" {
		return nil, nil
	}
	var nvram []byte
	if m.File(repo.FileNVRAM) != nil {
		var err error
		if nvram, err = restore.ReadFile(ctx, r, m, repo.FileNVRAM, 0); err != nil {
			return nil, fmt.Errorf("read the backup's NVRAM: %w", err)
		}
	}
	code, vars, err := uefiFiles(int64(len(nvram)))
	if err != nil {
		return nil, err
	}
	if nvram == nil {
		if nvram, err = os.ReadFile(vars); err != nil {
			return nil, fmt.Errorf("read the empty UEFI variable store: %w", err)
		}
	}
	nv := filepath.Join(dir, "nvram.fd")
	if err := os.WriteFile(nv, nvram, 0o600); err != nil {
		return nil, fmt.Errorf("write the NVRAM copy: %w", err)
	}
	return []string{
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + escape(code),
		"-drive", "if=pflash,format=raw,unit=1,file=" + escape(nv),
	}, nil
}

// VMOptions configure StartVM.
type VMOptions struct {
	Machine *Machine
	// Dir is the private directory for the VM's sockets and logs (at most
	// about 90 bytes: UNIX socket paths are limited).
	Dir   string
	Disks *Disks
	// Accel is "kvm", "tcg" or "" (KVM when /dev/kvm opens and QEMU can
	// use it, else TCG).
	Accel string
	QEMU  string // default qemu-system-x86_64
	// ExtraArgs are added to QEMU's command line (Firmware's, or -kernel
	// and -initrd of a helper VM).
	ExtraArgs []string
}

// VM is a running throwaway QEMU VM: no network, a serial console logged
// to a file (SeaBIOS's messages included), the guest agent's virtio-serial
// channel on AgentSocket, the disks from Disks on their buses in boot
// order.
type VM struct {
	AgentSocket string
	ConsoleLog  string
	QEMULog     string
	Started     time.Time

	accel    string // "" until known
	cmd      *exec.Cmd
	exited   chan struct{}
	waitErr  error
	stopOnce sync.Once
}

// StartVM starts QEMU. Stop it with Stop (also after it exited).
func StartVM(o VMOptions) (*VM, error) {
	qemu := o.QEMU
	if qemu == "" {
		qemu = "qemu-system-x86_64"
	}
	path, err := exec.LookPath(qemu)
	if err != nil {
		return nil, fmt.Errorf("%s not found (install qemu-system-x86): %w", qemu, errs.ErrUnsupported)
	}
	v := &VM{AgentSocket: filepath.Join(o.Dir, "qga.sock"), ConsoleLog: filepath.Join(o.Dir, "console.log"),
		QEMULog: filepath.Join(o.Dir, "qemu.log"), accel: o.Accel, exited: make(chan struct{})}
	if len(v.AgentSocket) > 107 {
		return nil, fmt.Errorf("directory %s is too long for UNIX socket paths (107 bytes): give a shorter one: %w", o.Dir, errs.ErrUsage)
	}
	sercon := filepath.Join(o.Dir, "sercon")
	if err := os.WriteFile(sercon, []byte{0xf8, 0x03}, 0o600); err != nil { // 0x3f8: COM1
		return nil, err
	}
	args := qemuArgs(o.Machine, o.Disks.Socket, v.AgentSocket, v.ConsoleLog, sercon)
	switch o.Accel {
	case "kvm", "tcg":
		args = append(args, "-accel", o.Accel)
	case "":
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
			f.Close()
			args = append(args, "-accel", "kvm", "-accel", "tcg") // QEMU falls back to TCG
		} else {
			v.accel = "tcg"
			args = append(args, "-accel", "tcg")
		}
	default:
		return nil, fmt.Errorf("accelerator %q: want kvm, tcg or empty: %w", o.Accel, errs.ErrUsage)
	}
	args = append(args, o.ExtraArgs...)
	lf, err := os.Create(v.QEMULog)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	v.cmd = exec.Command(path, args...)
	v.cmd.Stdout, v.cmd.Stderr = lf, lf
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	v.Started = time.Now()
	if err := v.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start QEMU: %w", err)
	}
	go func() { v.waitErr = v.cmd.Wait(); close(v.exited) }()
	return v, nil
}

// Exited is closed when QEMU has exited.
func (v *VM) Exited() <-chan struct{} { return v.exited }

// ExitStatus says how QEMU exited; call it after Exited is closed.
func (v *VM) ExitStatus() (string, bool) {
	return exitStatus(v.waitErr), v.waitErr == nil
}

// Stop ends QEMU: SIGTERM (QEMU quits at once), SIGKILL after a grace
// period, and waits for it.
func (v *VM) Stop() {
	v.stopOnce.Do(func() {
		v.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-v.exited:
		case <-time.After(stopGrace):
			v.cmd.Process.Kill()
			<-v.exited
		}
	})
}

// Accel is the accelerator QEMU ran with: it says so on stderr when it
// falls back from KVM to TCG.
func (v *VM) Accel() string {
	if v.accel != "" {
		return v.accel
	}
	b, _ := os.ReadFile(v.QEMULog)
	if strings.Contains(string(b), "falling back to tcg") {
		return "tcg"
	}
	return "kvm"
}

// Console is the last n non-empty lines of the serial console, cleaned of
// escape sequences, joined with " | ".
func (v *VM) Console(n int) string { return consoleTail(v.ConsoleLog, n) }

// DialAgent connects to the guest agent once QEMU has made its socket,
// and synchronises with the agent (qga.Dial retries until ctx ends).
func (v *VM) DialAgent(ctx context.Context) (*qga.Client, error) {
	for {
		if _, err := os.Stat(v.AgentSocket); err == nil {
			c, err := qga.Dial(ctx, v.AgentSocket)
			if err == nil || ctx.Err() != nil {
				return c, err
			}
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// errQEMUExited ends a wait when QEMU exited.
var errQEMUExited = errors.New("QEMU exited")

// qemuArgs is the VM's command line, without the accelerator and the
// firmware.
func qemuArgs(m *Machine, nbdSock, qgaSock, console, sercon string) []string {
	machine := "pc"
	if m.Q35 {
		machine = "q35"
	}
	a := []string{"-nodefaults", "-no-user-config", "-display", "none", "-machine", machine,
		"-m", fmt.Sprint(m.MemoryMiB), "-smp", fmt.Sprint(m.VCPUs),
		"-nic", "none",
		"-chardev", "file,id=console,path=" + escape(console), "-serial", "chardev:console",
		// SeaBIOS writes its messages ("No bootable device.") to COM1 too.
		"-fw_cfg", "name=etc/sercon-port,file=" + escape(sercon),
		"-device", "virtio-serial-pci,id=vser0",
		"-chardev", "socket,id=qga0,path=" + escape(qgaSock) + ",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
	}
	var ahci, scsi bool
	ide, sata := 0, 0 // q35: both on its AHCI (ide.N); pc: sata on an added AHCI, ide on IDE
	for i, d := range m.Disks {
		node := fmt.Sprintf("disk%d", i)
		a = append(a, "-blockdev", fmt.Sprintf("driver=nbd,node-name=%s,server.type=unix,server.path=%s,export=%s,cache.direct=off",
			node, escape(nbdSock), escape(d.Name)))
		boot := fmt.Sprintf(",bootindex=%d", i+1)
		switch d.Bus {
		case "sata", "ide":
			if m.Q35 || d.Bus == "sata" {
				if !m.Q35 && !ahci {
					a = append(a, "-device", "ahci,id=ahci0")
					ahci = true
				}
				bus := "ahci0"
				if m.Q35 {
					bus = "ide"
				}
				a = append(a, "-device", fmt.Sprintf("ide-hd,drive=%s,bus=%s.%d%s", node, bus, sata, boot))
				sata++
			} else {
				a = append(a, "-device", fmt.Sprintf("ide-hd,drive=%s,bus=ide.%d,unit=%d%s", node, ide/2, ide%2, boot))
				ide++
			}
		case "scsi":
			if !scsi {
				a = append(a, "-device", "virtio-scsi-pci,id=scsi0")
				scsi = true
			}
			a = append(a, "-device", fmt.Sprintf("scsi-hd,drive=%s,bus=scsi0.0%s", node, boot))
		default:
			a = append(a, "-device", fmt.Sprintf("virtio-blk-pci,drive=%s%s", node, boot))
		}
	}
	return a
}

// Describe says what the machine is, for messages.
func (m *Machine) Describe() string {
	var ds []string
	for _, d := range m.Disks {
		ds = append(ds, d.Name+" on "+d.Bus)
	}
	return fmt.Sprintf("%s (%d MiB, %d vCPU, %s, %s), disks %s", m.Boot, m.MemoryMiB, m.VCPUs,
		strings.ToUpper(m.Firmware), map[bool]string{true: "q35", false: "pc"}[m.Q35], strings.Join(ds, ", "))
}

func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func exitStatus(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ProcessState.String()
	}
	if err != nil {
		return err.Error()
	}
	return "exit status 0"
}

var ansi = regexp.MustCompile(`\x1b(\[[0-9;?]*[A-Za-z]|c|\([A-Za-z0-9])`)

// consoleTail is the last n non-empty lines of the console log, escape
// sequences and control characters removed, joined with " | ".
func consoleTail(path string, n int) string {
	s := cleanTail(path, n)
	if s == "" {
		return "(nothing on the serial console)"
	}
	return s
}

func fileTail(path string, n int) string {
	s := cleanTail(path, n)
	if s == "" {
		return "(no output)"
	}
	return s
}

func cleanTail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const max = 16 << 10
	if st, err := f.Stat(); err == nil && st.Size() > max {
		f.Seek(st.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, max))
	s := ansi.ReplaceAllString(string(b), "")
	s = strings.Map(func(r rune) rune {
		if r == '\n' || r == '\t' || (r >= ' ' && r != 0x7f && r != 0xfffd) {
			return r
		}
		if r == '\r' {
			return '\n'
		}
		return -1
	}, s)
	var lines []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

func tailBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

func lastLine(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	l := strings.TrimSpace(lines[len(lines)-1])
	if len(l) > 200 {
		l = l[:200] + "..."
	}
	return l
}
