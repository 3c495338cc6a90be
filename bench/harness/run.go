package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sample is one timed run of one step.
type sample struct {
	Wall   float64 // seconds
	CPU    float64 // user + system seconds of the tool and its children
	RSS    int64   // peak resident set of the tool (or its largest child), bytes
	Read   int64   // bytes read from the source (see the report's notes)
	Stored int64   // bytes the step added to its repository or output
}

// dropCaches writes dirty pages and empties the page cache, so every timed
// step reads its source and repository from storage.
func dropCaches() error {
	exec.Command("sync").Run()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0)
}

// measured runs a command after dropping the page cache, under sh so that
// the tool's own read counter (rchar of /proc/PID/io, which includes
// reaped children) can be taken at its end. Its stdout is returned; stdout
// and stderr go to logPath. The resource usage is that of wait4, as GNU
// time reports it.
func measured(ctx context.Context, logPath string, env []string, args ...string) (sample, []byte, error) {
	if err := dropCaches(); err != nil {
		return sample{}, nil, fmt.Errorf("drop the page cache (run as root): %w", err)
	}
	ioFile := logPath + ".io"
	os.Remove(ioFile)
	script := `"$@"; rc=$?; cat /proc/$$/io > "$VMSB_IOFILE"; exit $rc`
	cmd := exec.CommandContext(ctx, "sh", append([]string{"-c", script, "sh"}, args...)...)
	cmd.Env = append(append(os.Environ(), env...), "VMSB_IOFILE="+ioFile)
	// On cancellation the tool goes too, not only the shell around it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	lf, err := os.Create(logPath)
	if err != nil {
		return sample{}, nil, err
	}
	defer lf.Close()
	var out bytes.Buffer
	cmd.Stdout = io.MultiWriter(&out, lf)
	cmd.Stderr = lf
	start := time.Now()
	err = cmd.Run()
	wall := time.Since(start).Seconds()
	var s sample
	s.Wall = wall
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		s.CPU = float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
		s.RSS = ru.Maxrss << 10
	}
	if b, e := os.ReadFile(ioFile); e == nil {
		s.Read = ioField(string(b), "rchar")
	}
	if err != nil {
		tail, _ := os.ReadFile(logPath)
		if len(tail) > 2000 {
			tail = tail[len(tail)-2000:]
		}
		return s, out.Bytes(), fmt.Errorf("%s: %v (log %s):\n%s", strings.Join(args, " "), err, logPath, tail)
	}
	return s, out.Bytes(), nil
}

func ioField(s, key string) int64 {
	for _, l := range strings.Split(s, "\n") {
		k, v, _ := strings.Cut(l, ": ")
		if k == key {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}

// quiet runs an untimed command and returns its stdout.
func quiet(ctx context.Context, env []string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.Bytes(), fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

// dirSize is the bytes of the files under dir (du -sb).
func dirSize(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// lastJSON decodes the last line of NDJSON output into v.
func lastJSON(out []byte, v any) error {
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	if len(lines) == 0 {
		return fmt.Errorf("no output")
	}
	return json.Unmarshal(lines[len(lines)-1], v)
}

// reapFlag, as the harness's first argument, makes it the reaper wrapper
// of measuredReaped: `harness -reap CMD ARGS...`.
const reapFlag = "-reap"

// measuredReaped is measured for a tool that leaves daemonized helpers
// doing part of its work (virtnbdrestore forks qemu-nbd, which writes the
// image): the tool runs under this harness binary as a child subreaper, so
// the orphaned helpers are reaped by it and their CPU time counts in the
// step's (wait4 counts only waited-for descendants), and the step ends
// when the last of them has exited.
func measuredReaped(ctx context.Context, logPath string, env []string, args ...string) (sample, []byte, error) {
	self, err := os.Executable()
	if err != nil {
		return sample{}, nil, err
	}
	return measured(ctx, logPath, env, append([]string{self, reapFlag}, args...)...)
}

// reap runs args as a child subreaper and waits for every descendant; it
// returns the exit code of args.
func reap(args []string) int {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "reaper: %v\n", err)
		return 125
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "reaper: %v\n", err)
		return 127
	}
	code := 0
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, 0, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil { // ECHILD: no descendant left
			return code
		}
		if pid == cmd.Process.Pid {
			code = ws.ExitStatus()
			if ws.Signaled() {
				code = 128 + int(ws.Signal())
			}
		}
	}
}
