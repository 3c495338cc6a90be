package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmshadow/vmshadow/internal/qmp"
)

// mallocEnv is set for every QEMU process of the benchmark (the VM and the
// libvirt domain): with glibc's dynamic mmap threshold a freshly started NBD
// server serves large requests from fresh mmaps and is slowed by page
// faults until the threshold settles; a fixed threshold (and a trim
// threshold above it) makes the figures stable from the first request.
// These are glibc's MALLOC_*_ variables, the same tunables as
// GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...,
// which libvirt's qemu:env cuts at the first colon.
var mallocEnv = []string{"MALLOC_MMAP_THRESHOLD_=67108864", "MALLOC_TRIM_THRESHOLD_=268435456"}

// vm is a QEMU VM with one qcow2 disk (virtio-blk, device id vda) and no
// guest OS: it runs in the firmware. vmshadow talks to QMPPath; the harness
// uses its own monitor for writes through the device.
type vm struct {
	Name    string
	Dir     string
	QMPPath string
	Disk    string
	cmd     *exec.Cmd
	mon     *qmp.Client
	exited  chan struct{} // closed when QEMU has exited
}

func startVM(ctx context.Context, name, dir, disk string) (*vm, error) {
	v := &vm{Name: name, Dir: dir, QMPPath: filepath.Join(dir, "qmp.sock"), Disk: disk}
	mon := filepath.Join(dir, "mon.sock")
	os.Remove(v.QMPPath)
	os.Remove(mon)
	out, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		return nil, err
	}
	defer out.Close()
	v.cmd = exec.Command("qemu-system-x86_64", "-name", name, "-nodefaults", "-display", "none",
		"-machine", "pc,accel=tcg", "-m", "64",
		"-qmp", "unix:"+v.QMPPath+",server=on,wait=off",
		"-qmp", "unix:"+mon+",server=on,wait=off",
		"-blockdev", "driver=file,filename="+disk+",node-name=file-vda,cache.direct=on",
		"-blockdev", "driver=qcow2,file=file-vda,node-name=fmt-vda",
		"-device", "virtio-blk-pci,drive=fmt-vda,id=vda")
	v.cmd.Env = append(os.Environ(), mallocEnv...)
	v.cmd.Stdout, v.cmd.Stderr = out, out
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := v.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start qemu: %w", err)
	}
	v.exited = make(chan struct{})
	go func() { v.cmd.Wait(); close(v.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(mon); err == nil {
			if v.mon, err = qmp.Dial(ctx, mon); err == nil {
				break
			}
		}
		select {
		case <-v.exited:
			b, _ := os.ReadFile(filepath.Join(dir, "qemu.log"))
			return nil, fmt.Errorf("qemu exited at start: %v: %s", v.cmd.ProcessState, b)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			v.stop()
			return nil, fmt.Errorf("qemu did not open its monitor within 30 s")
		}
	}
	return v, nil
}

func (v *vm) pid() int { return v.cmd.Process.Pid }

// hmp runs a human monitor command; any output is an error (qemu-io
// prints only on failure with -q).
func (v *vm) hmp(ctx context.Context, line string) error {
	out, err := v.mon.HMP(ctx, line)
	if err != nil {
		return err
	}
	if s := strings.TrimSpace(out); s != "" {
		return fmt.Errorf("%s: %s", line, s)
	}
	return nil
}

// write applies the change through the device, as the guest would.
func (v *vm) write(ctx context.Context, cs []change) error {
	for _, c := range cs {
		if err := v.hmp(ctx, fmt.Sprintf("qemu-io -d /machine/peripheral/vda/virtio-backend \"write -q -s %s %d %d\"", c.data, c.off, c.n)); err != nil {
			return err
		}
	}
	return nil
}

// removeBitmaps removes vmshadow's change-tracking bitmaps left by earlier
// rounds' repositories, so each round starts alike.
func (v *vm) removeBitmaps(ctx context.Context) error {
	var blocks []struct {
		Device   string `json:"device"`
		Inserted struct {
			NodeName     string `json:"node-name"`
			DirtyBitmaps []struct {
				Name string `json:"name"`
			} `json:"dirty-bitmaps"`
		} `json:"inserted"`
	}
	if err := v.mon.Execute(ctx, "query-block", nil, &blocks); err != nil {
		return err
	}
	for _, b := range blocks {
		for _, bm := range b.Inserted.DirtyBitmaps {
			if strings.HasPrefix(bm.Name, "vmshadow-") {
				if err := v.mon.Execute(ctx, "block-dirty-bitmap-remove", map[string]string{"node": b.Inserted.NodeName, "name": bm.Name}, nil); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// stop quits QEMU (killing it if it does not quit); it may be called more
// than once.
func (v *vm) stop() {
	select {
	case <-v.exited:
		return
	default:
	}
	if v.mon != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		v.mon.Execute(ctx, "quit", nil, nil)
		cancel()
		v.mon.Close()
	}
	select {
	case <-v.exited:
	case <-time.After(10 * time.Second):
		v.cmd.Process.Kill()
		<-v.exited
	}
}

// procIO reads a process's I/O counters (rchar: bytes read by read-like
// system calls, read_bytes: bytes fetched from storage).
func procIO(pid int) (rchar, readBytes int64) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
	if err != nil {
		return 0, 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(l, ": ")
		n, _ := strconv.ParseInt(v, 10, 64)
		switch k {
		case "rchar":
			rchar = n
		case "read_bytes":
			readBytes = n
		}
	}
	return
}
