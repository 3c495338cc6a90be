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
)

const libvirtURI = "qemu:///system"

// libvirt is a libvirtd (started by the harness if none ran) with one
// transient domain for virtnbdbackup: a TCG VM with no OS and the same
// disk content as the vmshadow VM.
type libvirt struct {
	dom     string
	started []string // pid files of the daemons the harness started
	scratch string
}

func startLibvirt(ctx context.Context, name, dir, disk string) (*libvirt, error) {
	for _, c := range []string{"virsh", "virtnbdbackup", "/usr/sbin/libvirtd", "/usr/sbin/virtlogd"} {
		if _, err := exec.LookPath(c); err != nil {
			return nil, fmt.Errorf("%s is not installed (scripts/deps.sh bench installs it): %w", c, errSkip)
		}
	}
	l := &libvirt{dom: name, scratch: filepath.Join(dir, "scratch")}
	for _, d := range []struct{ bin, pid string }{{"/usr/sbin/virtlogd", "/run/virtlogd.pid"}, {"/usr/sbin/libvirtd", "/run/libvirtd.pid"}} {
		if alive(d.pid) {
			continue
		}
		if out, err := exec.Command(d.bin, "-d").CombinedOutput(); err != nil {
			l.stop()
			return nil, fmt.Errorf("start %s (no systemd here, so the harness starts it): %v: %s: %w", d.bin, err, out, errSkip)
		}
		l.started = append(l.started, d.pid)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := quiet(ctx, nil, "virsh", "-c", libvirtURI, "version"); err == nil {
			break
		} else if time.Now().After(deadline) {
			l.stop()
			return nil, fmt.Errorf("libvirtd does not answer: %v: %w", err, errSkip)
		}
		time.Sleep(200 * time.Millisecond)
	}
	quiet(ctx, nil, "virsh", "-c", libvirtURI, "destroy", name) // a leftover of an interrupted run
	if err := os.MkdirAll(l.scratch, 0o1777); err != nil {
		return nil, err
	}
	os.Chmod(l.scratch, 0o1777)
	xml := fmt.Sprintf(`<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>%s</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='%s'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
  <qemu:commandline>%s
  </qemu:commandline>
</domain>
`, name, disk, qemuEnv())
	xf := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xf, []byte(xml), 0o644); err != nil {
		return nil, err
	}
	if _, err := quiet(ctx, nil, "virsh", "-c", libvirtURI, "create", xf); err != nil {
		l.stop()
		return nil, fmt.Errorf("start the libvirt domain: %v: %w", err, errSkip)
	}
	return l, nil
}

func alive(pidFile string) bool {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	return err == nil && pid > 0 && syscall.Kill(pid, 0) == nil
}

// pid is the domain's QEMU process.
func (l *libvirt) pid() int {
	b, _ := os.ReadFile("/run/libvirt/qemu/" + l.dom + ".pid")
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

// write applies the change through the domain's device.
func (l *libvirt) write(ctx context.Context, cs []change) error {
	for _, c := range cs {
		line := fmt.Sprintf(`qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -q -s %s %d %d"`, c.data, c.off, c.n)
		out, err := quiet(ctx, nil, "virsh", "-c", libvirtURI, "qemu-monitor-command", l.dom, "--hmp", line)
		if err != nil {
			return err
		}
		if s := strings.TrimSpace(string(out)); s != "" {
			return fmt.Errorf("%s: %s", line, s)
		}
	}
	return nil
}

// backupArgs is the virtnbdbackup command line of a full or incremental
// backup into dir.
func (l *libvirt) backupArgs(level, dir string) []string {
	return []string{"virtnbdbackup", "-U", libvirtURI, "-d", l.dom, "-l", level, "-o", dir,
		"-S", l.scratch, "-f", filepath.Join(l.scratch, "nbd.sock"), "-n"}
}

// stop destroys the domain and stops the daemons the harness started.
func (l *libvirt) stop() {
	if l.dom != "" {
		quiet(context.Background(), nil, "virsh", "-c", libvirtURI, "destroy", l.dom)
	}
	for i := len(l.started) - 1; i >= 0; i-- {
		b, err := os.ReadFile(l.started[i])
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 {
			continue
		}
		syscall.Kill(pid, syscall.SIGTERM)
		for range 50 {
			if syscall.Kill(pid, 0) != nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func qemuEnv() string {
	var s string
	for _, e := range mallocEnv {
		k, v, _ := strings.Cut(e, "=")
		s += fmt.Sprintf("\n    <qemu:env name='%s' value='%s'/>", k, v)
	}
	return s
}
