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
	"os"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
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
// to start, cancellation): nothing to record.
func Run(ctx context.Context, r *repo.Repo, id repo.ID, m *repo.Manifest, o Options) (*Outcome, error) {
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Minute
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
	mach, err := MachineFor(ctx, r, m, warn)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(o.TempDir, "vmshadow-hc-")
	if err != nil {
		return nil, fmt.Errorf("health check: make a temporary directory: %w", err)
	}
	defer os.RemoveAll(dir)
	firmware, err := Firmware(ctx, r, m, mach, dir)
	if err != nil {
		return nil, err
	}
	sel, _ := restore.Select(m, nil) // MachineFor checked it
	disks, err := ServeDisks(ctx, r, id, m, sel, dir, o.CacheBytes, warn)
	if err != nil {
		return nil, err
	}
	defer disks.Close()
	logf("booting backup %s of %s: %s", id.Short(), m.VM, mach.Describe())
	vm, err := StartVM(VMOptions{Machine: mach, Dir: dir, Disks: disks, Accel: o.Accel, QEMU: o.QEMU, ExtraArgs: firmware})
	if err != nil {
		return nil, err
	}
	defer vm.Stop()
	start := vm.Started
	res := repo.HealthResult{Time: start.UTC().Truncate(time.Second), Boot: mach.Boot, Version: o.Version, Script: o.Script}
	out := &Outcome{Machine: mach}
	fail := func(reason string, cause error) (*Outcome, error) {
		vm.Stop()
		res.Accel, res.Reason, res.Result = vm.Accel(), reason, repo.HealthFailed
		out.Result, out.Console = res, vm.Console(8)
		if cause != nil {
			return out, fmt.Errorf("health check of backup %s failed: %w", id.Short(), cause)
		}
		return out, fmt.Errorf("health check of backup %s failed: %s", id.Short(), reason)
	}

	// Wait for the agent, until the timeout, QEMU's exit or a read error.
	wctx, cancel := context.WithDeadline(ctx, start.Add(o.Timeout))
	defer cancel()
	// why is what ended the wait early, set before wctx is cancelled.
	var whyMu sync.Mutex
	var whyErr error
	why := func() error { whyMu.Lock(); defer whyMu.Unlock(); return whyErr }
	go func() {
		var e error
		select {
		case <-vm.Exited():
			e = errQEMUExited
		case e = <-disks.ReadErrors():
		case <-wctx.Done():
			return
		}
		whyMu.Lock()
		whyErr = e
		whyMu.Unlock()
		cancel()
	}()
	client, err := vm.DialAgent(wctx)
	if err == nil {
		if err = client.Ping(wctx); err != nil {
			client.Close()
		}
	}
	if err != nil {
		cancel()
		why := why()
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case why != nil && why != errQEMUExited:
			return fail(fmt.Sprintf("reading the backup failed, the VM was stopped: %v", why), why)
		case why == errQEMUExited:
			st, clean := vm.ExitStatus()
			if !clean && time.Since(start) < 10*time.Second {
				// QEMU itself failed (firmware, accelerator): not the backup's fault.
				return nil, fmt.Errorf("QEMU failed to start the VM (%s): %s: %w", st, fileTail(vm.QEMULog, 5), errs.ErrUnsupported)
			}
			reason := fmt.Sprintf("the VM stopped (%s) before its guest agent answered; console: %s", st, vm.Console(5))
			return fail(reason, fmt.Errorf("%s: %w", reason, errs.ErrTimeout))
		default:
			reason := fmt.Sprintf("the guest agent did not answer within %s; console: %s", o.Timeout, vm.Console(5))
			return fail(reason, fmt.Errorf("%s: %w", reason, errs.ErrTimeout))
		}
	}
	defer client.Close()
	readFailed := func() error {
		if w := why(); w != nil && w != errQEMUExited {
			return w
		}
		select {
		case err := <-disks.ReadErrors():
			return err
		default:
			return nil
		}
	}
	res.AnswerS = time.Since(start).Seconds()
	logf("the guest agent answered guest-ping after %.1f s", res.AnswerS)
	passed := func(reason string) (*Outcome, error) {
		if e := readFailed(); e != nil {
			return fail(fmt.Sprintf("reading the backup failed: %v", e), e)
		}
		vm.Stop()
		res.Accel, res.Reason, res.Result = vm.Accel(), reason, repo.HealthPassed
		out.Result, out.Console = res, vm.Console(8)
		return out, nil
	}
	if o.Script == "" {
		return passed("guest-ping answered")
	}
	logf("running %s in the guest", o.Script)
	xr, err := client.Exec(wctx, o.Script, []string{}, nil, nil)
	if err != nil {
		var ae *qga.Error
		why := why()
		switch {
		case ctx.Err() != nil:
			return nil, ctx.Err()
		case why != nil && why != errQEMUExited:
			return fail(fmt.Sprintf("reading the backup failed, the VM was stopped: %v", why), why)
		case why == errQEMUExited:
			return fail(fmt.Sprintf("the VM stopped while script %s ran; console: %s", o.Script, vm.Console(5)), nil)
		case errors.As(err, &ae):
			return fail(fmt.Sprintf("script %s could not run: %s", o.Script, ae.Desc), nil)
		default:
			reason := fmt.Sprintf("script %s did not finish within the timeout of %s: %v", o.Script, o.Timeout, err)
			return fail(reason, fmt.Errorf("%s: %w", reason, errs.ErrTimeout))
		}
	}
	out.ScriptStdout, out.ScriptStderr = tailBytes(xr.Stdout, MaxOutput), tailBytes(xr.Stderr, MaxOutput)
	code := xr.ExitCode
	res.ScriptExit = &code
	if xr.ExitCode != 0 || xr.Signal != 0 {
		if e := readFailed(); e != nil {
			return fail(fmt.Sprintf("reading the backup failed: %v", e), e)
		}
		reason := fmt.Sprintf("script %s exited %d", o.Script, xr.ExitCode)
		if xr.Signal != 0 {
			reason = fmt.Sprintf("script %s was killed by signal %d", o.Script, xr.Signal)
		}
		if s := lastLine(xr.Stderr); s != "" {
			reason += ": " + s
		}
		return fail(reason, nil)
	}
	return passed(fmt.Sprintf("guest-ping answered, script %s exited 0", o.Script))
}

// MachineFor is the throwaway VM's hardware for backup m: its libvirt
// definition's (FromDefinition, warnings to warn) or the defaults.
func MachineFor(ctx context.Context, r *repo.Repo, m *repo.Manifest, warn func(string)) (*Machine, error) {
	sel, err := restore.Select(m, nil)
	if err != nil {
		return nil, err
	}
	if len(sel) == 0 {
		return nil, fmt.Errorf("backup of %s has no disks to boot: %w", m.VM, errs.ErrUsage)
	}
	if m.Definition != repo.DefinitionLibvirt || m.File(repo.FileDomainXML) == nil {
		return Defaults(sel), nil
	}
	b, err := restore.ReadFile(ctx, r, m, repo.FileDomainXML, 0)
	if err != nil {
		return nil, fmt.Errorf("read the backup's VM definition: %w", err)
	}
	mach, ws, err := FromDefinition(b, sel)
	if err != nil {
		return nil, err
	}
	for _, w := range ws {
		if warn != nil {
			warn(w)
		}
	}
	return mach, nil
}
