// Package healthcheck owns `vmshadow healthcheck`: it proves that a backup
// boots by starting it in a throwaway QEMU VM and waiting for the guest
// agent to answer (and, optionally, for a command run in the guest to
// succeed). The VM's disks are the backup's, served read-only from the
// repository through instant restore (internal/instant: chunks read on
// demand and checked against their hashes) with instant's writable overlay
// in a private temporary directory, so the guest can write and nothing it
// writes reaches the repository. The VM has no network (-nic none), its
// hardware comes from the backup's libvirt definition or from defaults
// (Machine), and everything it used (overlays, sockets, console log,
// NVRAM copy) is removed when it is stopped. The result is the caller's
// to record (repo.AddHealth).
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

// Options configure a health check.
type Options struct {
	// Timeout bounds the wait for the guest agent's answer and the script
	// together (default 10 minutes).
	Timeout time.Duration
	// Script is a program in the guest run through the agent (guest-exec,
	// no arguments) once it answers; it must exit 0. "" runs nothing.
	Script string
	// TempDir is where the run's private directory is made ("": the
	// system's temporary directory). Keep it short: it holds UNIX sockets.
	TempDir string
	// QEMU is the emulator (default qemu-system-x86_64 from PATH).
	QEMU string
	// Accel is "kvm", "tcg" or "" (KVM when /dev/kvm opens and QEMU can
	// use it, else TCG).
	Accel string
	// CacheBytes bounds the decoded chunks cached per disk (default 64 MiB).
	CacheBytes int64
	// Version is the vmshadow version recorded with the result.
	Version string
	// Log is told of progress; Warn of problems that do not stop the
	// check. Either may be nil.
	Log, Warn func(string)
}

// Outcome is what a health check found.
type Outcome struct {
	Result  repo.HealthResult
	Machine *Machine
	// Console is the last lines of the VM's serial console (firmware
	// messages included).
	Console string
	// ScriptStdout and ScriptStderr are the script's output (at most
	// MaxOutput bytes each, the end kept).
	ScriptStdout, ScriptStderr []byte
}

// MaxOutput bounds the script output kept.
const MaxOutput = 64 << 10

// stopGrace is how long QEMU has to exit on SIGTERM before it is killed.
const stopGrace = 5 * time.Second

// Run checks backup id (manifest m) of r, which must stay locked (shared)
// until it returns. It returns an Outcome whenever the backup was put to
// the test (the caller records it), with a nil error when it passed; the
// error of a failed check wraps errs.ErrTimeout when the guest agent never
// answered (the timeout passed, or the guest stopped first) and
// errs.ErrCorrupt when a disk read failed (a damaged or missing chunk: the
// VM is stopped at once, the guest never gets the data). A nil Outcome
// means the check could not run (no QEMU, bad options, a QEMU that failed
// to start): nothing to record.
func Run(ctx context.Context, r *repo.Repo, id repo.ID, m *repo.Manifest, o Options) (*Outcome, error) {
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Minute
	}
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.CacheBytes <= 0 {
		o.CacheBytes = 64 << 20
	}
	logf := func(format string, args ...any) {
		if o.Log != nil {
			o.Log(fmt.Sprintf(format, args...))
		}
	}
	warn := func(s string) {
		if o.Warn != nil {
			o.Warn(s)
		}
	}
	qemu, err := exec.LookPath(o.QEMU)
	if err != nil {
		return nil, fmt.Errorf("health check needs QEMU: %s not found (install qemu-system-x86): %w", o.QEMU, errs.ErrUnsupported)
	}
	sel, err := restore.Select(m, nil)
	if err != nil {
		return nil, err
	}
	if len(sel) == 0 {
		return nil, fmt.Errorf("backup %s has no disks to boot: %w", id.Short(), errs.ErrUsage)
	}
	mach := Defaults(sel)
	if m.Definition == repo.DefinitionLibvirt && m.File(repo.FileDomainXML) != nil {
		b, err := restore.ReadFile(ctx, r, m, repo.FileDomainXML, 0)
		if err != nil {
			return nil, fmt.Errorf("read the backup's VM definition: %w", err)
		}
		var ws []string
		if mach, ws, err = FromDefinition(b, sel); err != nil {
			return nil, err
		}
		for _, w := range ws {
			warn(w)
		}
	}

	dir, err := os.MkdirTemp(o.TempDir, "vmshadow-hc-")
	if err != nil {
		return nil, fmt.Errorf("health check: make a temporary directory: %w", err)
	}
	defer os.RemoveAll(dir)
	if len(filepath.Join(dir, "qga.sock")) > 107 {
		return nil, fmt.Errorf("temporary directory %s is too long for UNIX socket paths (107 bytes): give a shorter one (--temp-dir): %w", dir, errs.ErrUsage)
	}

	var firmware []string
	if mach.Firmware == "uefi" {
		var nvram []byte
		if m.File(repo.FileNVRAM) != nil {
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
		// A copy: the guest may write its variables; the backup's stay.
		nv := filepath.Join(dir, "nvram.fd")
		if err := os.WriteFile(nv, nvram, 0o600); err != nil {
			return nil, fmt.Errorf("health check: write the NVRAM copy: %w", err)
		}
		firmware = []string{
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + escape(code),
			"-drive", "if=pflash,format=raw,unit=1,file=" + escape(nv),
		}
	}

	// The disks: instant restore's NBD server on a private socket, every
	// disk writable through an overlay in dir. A failed read stops the VM.
	readErr := make(chan error, 1)
	srv, err := instant.NewServer(ctx, r, id, m, instant.ServeOptions{Disks: sel, CacheBytes: o.CacheBytes,
		Writable: true, OverlayDir: filepath.Join(dir, "overlay"), Warn: warn,
		ReadError: func(disk string, err error) {
			select {
			case readErr <- fmt.Errorf("disk %s: %w", disk, err):
			default:
			}
		}})
	if err != nil {
		return nil, err
	}
	nbdSock := filepath.Join(dir, "nbd.sock")
	ln, err := net.Listen("unix", nbdSock)
	if err != nil {
		srv.Close()
		return nil, fmt.Errorf("health check: listen on %s: %w", nbdSock, err)
	}
	go srv.Serve(ln)
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		srv.Close()
	}()

	accel, tryKVM := o.Accel, false
	switch accel {
	case "kvm", "tcg":
	case "":
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
			f.Close()
			tryKVM = true
		} else {
			accel = "tcg"
		}
	default:
		return nil, fmt.Errorf("accelerator %q: want kvm, tcg or empty: %w", o.Accel, errs.ErrUsage)
	}
	qgaSock := filepath.Join(dir, "qga.sock")
	console := filepath.Join(dir, "console.log")
	qemuLog := filepath.Join(dir, "qemu.log")
	args := qemuArgs(mach, nbdSock, qgaSock, console, filepath.Join(dir, "sercon"))
	if tryKVM {
		args = append(args, "-accel", "kvm", "-accel", "tcg")
	} else {
		args = append(args, "-accel", accel)
	}
	args = append(args, firmware...)
	if err := os.WriteFile(filepath.Join(dir, "sercon"), []byte{0xf8, 0x03}, 0o600); err != nil { // 0x3f8: COM1
		return nil, fmt.Errorf("health check: %w", err)
	}
	lf, err := os.Create(qemuLog)
	if err != nil {
		return nil, fmt.Errorf("health check: %w", err)
	}
	defer lf.Close()
	cmd := exec.Command(qemu, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf("booting backup %s of %s: %s", id.Short(), m.VM, mach.Describe())
	start := time.Now()
	res := repo.HealthResult{Time: start.UTC().Truncate(time.Second), Boot: mach.Boot, Version: o.Version, Script: o.Script}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start QEMU: %w", err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	var stopOnce sync.Once
	stop := func() {
		stopOnce.Do(func() {
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(stopGrace):
				cmd.Process.Kill()
				<-exited
			}
		})
	}
	defer stop()

	out := &Outcome{Machine: mach}
	finish := func(passed bool, reason string) {
		stop()
		res.Accel = accelUsed(accel, qemuLog)
		res.Reason = reason
		res.Result = repo.HealthFailed
		if passed {
			res.Result = repo.HealthPassed
		}
		out.Result = res
		out.Console = consoleTail(console, 8)
	}
	// Wait for the agent, until the timeout, QEMU's exit or a read error.
	deadline := start.Add(o.Timeout)
	wctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	// why is what ended the wait early, set before wctx is cancelled.
	var whyMu sync.Mutex
	var whyErr error
	why := func() error { whyMu.Lock(); defer whyMu.Unlock(); return whyErr }
	go func() {
		var e error
		select {
		case <-exited:
			e = errQEMUExited
		case e = <-readErr:
		case <-wctx.Done():
			return
		}
		whyMu.Lock()
		whyErr = e
		whyMu.Unlock()
		cancel()
	}()
	client, err := dialAgent(wctx, qgaSock)
	if err == nil {
		err = client.Ping(wctx)
		if err != nil {
			client.Close()
		}
	}
	if err != nil {
		cancel()
		why := why()
		switch {
		case ctx.Err() != nil:
			stop()
			return nil, ctx.Err()
		case why != nil && why != errQEMUExited:
			finish(false, fmt.Sprintf("reading the backup failed, the VM was stopped: %v", why))
			return out, fmt.Errorf("health check of backup %s failed: %w", id.Short(), why)
		case why == errQEMUExited:
			st := exitStatus(waitErr)
			if waitErr != nil && time.Since(start) < 10*time.Second {
				// QEMU itself failed (bad firmware, accelerator): not the backup's fault.
				return nil, fmt.Errorf("QEMU failed to start the VM (%s): %s: %w", st, fileTail(qemuLog, 5), errs.ErrUnsupported)
			}
			finish(false, fmt.Sprintf("the VM stopped (%s) before its guest agent answered; console: %s", st, consoleTail(console, 5)))
		default:
			finish(false, fmt.Sprintf("the guest agent did not answer within %s; console: %s", o.Timeout, consoleTail(console, 5)))
		}
		return out, fmt.Errorf("health check of backup %s failed: %s: %w", id.Short(), res.Reason, errs.ErrTimeout)
	}
	defer client.Close()
	readFailed := func() error {
		if w := why(); w != nil && w != errQEMUExited {
			return w
		}
		return checkRead(readErr)
	}
	res.AnswerS = time.Since(start).Seconds()
	logf("the guest agent answered guest-ping after %.1f s", res.AnswerS)
	if o.Script == "" {
		if e := readFailed(); e != nil {
			finish(false, fmt.Sprintf("reading the backup failed: %v", e))
			return out, fmt.Errorf("health check of backup %s failed: %w", id.Short(), e)
		}
		finish(true, "guest-ping answered")
		return out, nil
	}
	logf("running %s in the guest", o.Script)
	xr, err := client.Exec(wctx, o.Script, []string{}, nil, nil)
	if err != nil {
		var ae *qga.Error
		why := why()
		switch {
		case ctx.Err() != nil:
			stop()
			return nil, ctx.Err()
		case why != nil && why != errQEMUExited:
			finish(false, fmt.Sprintf("reading the backup failed, the VM was stopped: %v", why))
			return out, fmt.Errorf("health check of backup %s failed: %w", id.Short(), why)
		case why == errQEMUExited:
			finish(false, fmt.Sprintf("the VM stopped while script %s ran; console: %s", o.Script, consoleTail(console, 5)))
			return out, fmt.Errorf("health check of backup %s failed: %s", id.Short(), res.Reason)
		case errors.As(err, &ae):
			finish(false, fmt.Sprintf("script %s could not run: %s", o.Script, ae.Desc))
			return out, fmt.Errorf("health check of backup %s failed: %s", id.Short(), res.Reason)
		default:
			finish(false, fmt.Sprintf("script %s did not finish within the timeout of %s: %v", o.Script, o.Timeout, err))
			return out, fmt.Errorf("health check of backup %s failed: %s: %w", id.Short(), res.Reason, errs.ErrTimeout)
		}
	}
	out.ScriptStdout, out.ScriptStderr = tailBytes(xr.Stdout, MaxOutput), tailBytes(xr.Stderr, MaxOutput)
	code := xr.ExitCode
	res.ScriptExit = &code
	if e := readFailed(); e != nil {
		finish(false, fmt.Sprintf("reading the backup failed: %v", e))
		return out, fmt.Errorf("health check of backup %s failed: %w", id.Short(), e)
	}
	if xr.ExitCode != 0 || xr.Signal != 0 {
		r := fmt.Sprintf("script %s exited %d", o.Script, xr.ExitCode)
		if xr.Signal != 0 {
			r = fmt.Sprintf("script %s was killed by signal %d", o.Script, xr.Signal)
		}
		if s := lastLine(xr.Stderr); s != "" {
			r += ": " + s
		}
		finish(false, r)
		return out, fmt.Errorf("health check of backup %s failed: %s", id.Short(), r)
	}
	finish(true, fmt.Sprintf("guest-ping answered, script %s exited 0", o.Script))
	return out, nil
}

var errQEMUExited = errors.New("QEMU exited")

func checkRead(ch chan error) error {
	select {
	case err := <-ch:
		return err
	default:
		return nil
	}
}

// dialAgent connects to the agent socket once QEMU has made it, and
// synchronises with the agent (qga.Dial retries until ctx ends).
func dialAgent(ctx context.Context, path string) (*qga.Client, error) {
	for {
		if _, err := os.Stat(path); err == nil {
			c, err := qga.Dial(ctx, path)
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

// qemuArgs is the VM's command line, without the accelerator and the
// UEFI firmware.
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

// accelUsed is the accelerator QEMU ran with: it says so on stderr when it
// falls back from KVM to TCG.
func accelUsed(accel, qemuLog string) string {
	if accel != "" {
		return accel
	}
	b, _ := os.ReadFile(qemuLog)
	if strings.Contains(string(b), "falling back to tcg") {
		return "tcg"
	}
	return "kvm"
}

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
