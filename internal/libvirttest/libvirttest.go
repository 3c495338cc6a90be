// Package libvirttest makes a real libvirtd available to tests and defines
// test domains on it: type 'qemu' (TCG; this machine's /dev/kvm cannot run
// guests), disks in qcow2 v3 or raw created with qemu-img, with no OS
// (SeaBIOS spinning, or paused) or booting a kernel and initramfs (the
// project's test guest, with a qemu-ga channel).
//
// There is no systemd here: when libvirtd is not running the helper starts
// `virtlogd -d` and `libvirtd -d` itself, once per test binary, and stops
// them when the last test binary that uses them ends, never a daemon it did
// not start. Use it from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(libvirttest.Main(m)) }
//
// and call Need(t) in each test. In CI (CI=true) a missing libvirtd, virsh or
// QEMU fails the test (testutil.NeedCommand); elsewhere it skips.
//
// The helper drives libvirt with virsh, independently of the code under
// test (which speaks libvirt's RPC through go-libvirt).
package libvirttest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

// Default paths of a system libvirtd (Debian).
const (
	SocketPath      = "/run/libvirt/libvirt-sock"
	virtlogdSocket  = "/run/libvirt/virtlogd-sock"
	libvirtdPIDFile = "/run/libvirtd.pid"
	virtlogdPIDFile = "/run/virtlogd.pid"
	// lockPath is held shared by every test binary using the daemons (the
	// last one takes it exclusively to stop them); lockPath+".start"
	// serialises starting them; the marker names the daemons the helpers
	// started.
	lockPath   = "/run/vmshadow-libvirttest.lock"
	markerPath = "/run/vmshadow-libvirttest.started"
	// LogDir holds each domain's QEMU log (NAME.log).
	LogDir = "/var/log/libvirt/qemu"
)

// URI is the connection URI of the daemon the helper provides.
const URI = "qemu:///system"

var (
	once     sync.Once
	startErr error
	lockFile *os.File
	used     bool
	mu       sync.Mutex
)

// Main runs the package's tests and afterwards stops the daemons the
// helpers started, if no other test binary still uses them. Call it from
// TestMain and pass its result to os.Exit.
func Main(m *testing.M) int {
	code := m.Run()
	mu.Lock()
	defer mu.Unlock()
	if used {
		if err := release(); err != nil {
			fmt.Fprintf(os.Stderr, "libvirttest: %v\n", err)
		}
	}
	return code
}

// Need makes sure libvirtd runs (starting it if needed) and returns its
// URI. It skips with -short, skips when a program is missing (fails in
// CI), and fails when the daemon cannot be started.
func Need(t testing.TB) string {
	t.Helper()
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "qemu-system-x86_64")
	testutil.NeedCommand(t, "qemu-img")
	testutil.NeedCommand(t, "virsh")
	if _, err := os.Stat("/usr/sbin/libvirtd"); err != nil {
		testutil.NeedCommand(t, "libvirtd")
	}
	if _, err := os.Stat("/usr/sbin/virtlogd"); err != nil {
		testutil.NeedCommand(t, "virtlogd")
	}
	if os.Geteuid() != 0 {
		if testutil.InCI() {
			t.Fatal("the libvirt tests need root (qemu:///system)")
		}
		t.Skip("the libvirt tests need root (qemu:///system)")
	}
	mu.Lock()
	defer mu.Unlock()
	once.Do(func() {
		used = true
		startErr = ensure()
	})
	if startErr != nil {
		t.Fatalf("libvirtd: %v", startErr)
	}
	return URI
}

func listening(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func daemonPath(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	return "/usr/sbin/" + name
}

// ensure takes the shared lock and starts what does not run.
func ensure() error {
	f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	// Starters take turns on a second lock; the use lock is only ever
	// shared here, so a binary that uses the daemons never waits for
	// another one to finish (only for one that is stopping them).
	start, err := os.OpenFile(lockPath+".start", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		f.Close()
		return err
	}
	defer start.Close()
	if err := syscall.Flock(int(start.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH); err != nil {
		f.Close()
		return err
	}
	lockFile = f
	return startMissing()
}

// startMissing starts virtlogd and libvirtd where they do not listen and
// records them in the marker as started by the helpers.
func startMissing() error {
	var started []string
	if !listening(virtlogdSocket) {
		if err := run(daemonPath("virtlogd"), "-d"); err != nil {
			return fmt.Errorf("start virtlogd: %w", err)
		}
		started = append(started, virtlogdPIDFile)
		if err := waitListening(virtlogdSocket); err != nil {
			return fmt.Errorf("virtlogd: %w", err)
		}
	}
	if !listening(SocketPath) {
		if err := run(daemonPath("libvirtd"), "-d"); err != nil {
			return fmt.Errorf("start libvirtd: %w", err)
		}
		started = append(started, libvirtdPIDFile)
		if err := waitListening(SocketPath); err != nil {
			return fmt.Errorf("libvirtd: %w", err)
		}
	}
	if len(started) > 0 {
		old, _ := os.ReadFile(markerPath)
		lines := strings.Fields(string(old))
		for _, pf := range started {
			if !slices.Contains(lines, pf) {
				lines = append(lines, pf)
			}
		}
		if err := os.WriteFile(markerPath, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
			return err
		}
	}
	return nil
}

func waitListening(path string) error {
	deadline := time.Now().Add(60 * time.Second)
	for !listening(path) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not listening after 60 s", path)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return nil
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// release drops this binary's use; the last user stops the daemons named
// in the marker (those the helpers started), libvirtd first.
func release() error {
	if lockFile == nil {
		return nil
	}
	defer func() { lockFile.Close(); lockFile = nil }()
	if err := syscall.Flock(int(lockFile.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return nil // another test binary still uses the daemons: it stops them
	}
	b, err := os.ReadFile(markerPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	} else if err != nil {
		return err
	}
	pidFiles := strings.Fields(string(b))
	var errList []error
	for _, want := range []string{libvirtdPIDFile, virtlogdPIDFile} {
		for _, pf := range pidFiles {
			if pf == want {
				if err := stopPIDFile(pf); err != nil {
					errList = append(errList, err)
				}
			}
		}
	}
	if len(errList) == 0 {
		os.Remove(markerPath)
	}
	return errors.Join(errList...)
}

func stopPIDFile(pf string) error {
	b, err := os.ReadFile(pf)
	if err != nil {
		return nil // gone already
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return fmt.Errorf("%s: bad pid %q", pf, b)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return nil
	}
	deadline := time.Now().Add(30 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s (pid %d) did not exit after SIGTERM", pf, pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// alive reports whether pid runs: it exists and is not a zombie (the
// daemons' parent is whatever reaps orphans here, maybe late).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, ok := strings.Cut(string(b), ") ")
	return ok && !strings.HasPrefix(rest, "Z") && !strings.HasPrefix(rest, "X")
}

// Virsh runs virsh against the helper's daemon and returns its standard
// output; it fails the test when virsh fails.
func Virsh(t testing.TB, args ...string) string {
	t.Helper()
	out, err := VirshErr(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// VirshErr runs virsh and returns its output or an error with its stderr.
func VirshErr(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-c", URI}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("virsh %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.String(), nil
}

// qemuCanReach lets the user libvirt runs QEMU as (qemu.conf's user,
// Debian's libvirt-qemu by default) traverse and read dir.
func qemuCanReach(dir string) error {
	return os.Chmod(dir, 0o755)
}

// TempDir makes a directory QEMU under libvirt can read (0755: libvirt runs
// QEMU as libvirt-qemu and relabels the image files, not their directory),
// removed when the test ends. It is short, for UNIX socket paths.
func TempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmslv")
	if err != nil {
		t.Fatal(err)
	}
	if err := qemuCanReach(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// LogPath is the QEMU log libvirt keeps for domain name.
func LogPath(name string) string { return filepath.Join(LogDir, name+".log") }

// RestartLibvirtd stops and starts libvirtd (domains keep running; libvirtd
// reconnects to them), for tests of what survives a restart. It restarts
// only a libvirtd the helpers started, waiting until no other test binary
// uses it; otherwise the test is skipped (fails in CI).
func RestartLibvirtd(t testing.TB) {
	t.Helper()
	Need(t)
	mu.Lock()
	defer mu.Unlock()
	// Wait until no other test binary uses the daemons. flock cannot turn
	// the shared lock into an exclusive one atomically: while this binary
	// waits, another one may find itself the last user and stop both
	// daemons. So the state is read only once the lock is exclusive, after
	// starting whatever does not run.
	fd := int(lockFile.Fd())
	deadline := time.Now().Add(3 * time.Minute)
	for syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		if time.Now().After(deadline) {
			t.Fatal("another test binary keeps using libvirtd: cannot restart it")
		}
		time.Sleep(200 * time.Millisecond)
	}
	defer syscall.Flock(fd, syscall.LOCK_SH)
	if err := startMissing(); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(markerPath)
	if !strings.Contains(string(b), libvirtdPIDFile) {
		msg := "libvirtd was not started by the test helpers: not restarting it"
		if testutil.InCI() {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	if err := stopPIDFile(libvirtdPIDFile); err != nil {
		t.Fatal(err)
	}
	if err := startMissing(); err != nil {
		t.Fatal(err)
	}
}
