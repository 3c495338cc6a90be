package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const libvirtURI = "qemu:///system"

// libvirt is a libvirtd (started by the harness if none ran) with one
// transient domain that both vmshadow (--libvirt) and virtnbdbackup back
// up: a TCG VM with no OS and the same disk content as the vmshadow VM.
type libvirt struct {
	dom     string
	started []string // pid files of the daemons the harness started
	scratch string
	dir     string
}

func startLibvirt(ctx context.Context, name, dir, disk string, tools []string) (*libvirt, error) {
	for _, c := range append([]string{"virsh", "/usr/sbin/libvirtd", "/usr/sbin/virtlogd"}, tools...) {
		if _, err := exec.LookPath(c); err != nil {
			return nil, fmt.Errorf("%s is not installed (scripts/deps.sh bench installs it): %w", c, errSkip)
		}
	}
	l := &libvirt{dom: name, scratch: filepath.Join(dir, "scratch"), dir: dir}
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

// vmshadowArgs is the vmshadow command line of a backup of the domain.
func (l *libvirt) vmshadowArgs(vmshadow, repo string) []string {
	return []string{vmshadow, "backup", "--repo", repo, "--libvirt", libvirtURI, "--vm", l.dom, "--scratch-dir", l.scratch, "--json"}
}

func (l *libvirt) virsh(ctx context.Context, args ...string) ([]byte, error) {
	return quiet(ctx, nil, append([]string{"virsh", "-q", "-c", libvirtURI}, args...)...)
}

// checkpoints lists the domain's checkpoints, parents before children.
func (l *libvirt) checkpoints(ctx context.Context) ([]string, error) {
	out, err := l.virsh(ctx, "checkpoint-list", l.dom, "--name", "--topological")
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(out)), nil
}

// checkpointDef is the part of a checkpoint's XML the harness reads.
type checkpointDef struct {
	Name   string `xml:"name"`
	Parent struct {
		Name string `xml:"name"`
	} `xml:"parent"`
	Disks []struct {
		Name string `xml:"name,attr"`
		Size int64  `xml:"size,attr"`
	} `xml:"disks>disk"`
}

// checkpointSize is what libvirt says a backup from the checkpoint would
// copy now (checkpoint-dumpxml --size: the bytes its dirty bitmaps mark,
// all disks).
func (l *libvirt) checkpointSize(ctx context.Context, name string) (int64, error) {
	out, err := l.virsh(ctx, "checkpoint-dumpxml", l.dom, name, "--size", "--no-domain")
	if err != nil {
		return 0, err
	}
	var d checkpointDef
	if err := xml.Unmarshal(out, &d); err != nil {
		return 0, fmt.Errorf("checkpoint %s: %w", name, err)
	}
	var n int64
	for _, disk := range d.Disks {
		n += disk.Size
	}
	return n, nil
}

// latest returns the newest checkpoint whose name starts with prefix ("" if
// none).
func (l *libvirt) latest(ctx context.Context, prefix string) (string, error) {
	names, err := l.checkpoints(ctx)
	if err != nil {
		return "", err
	}
	last := ""
	for _, n := range names {
		if strings.HasPrefix(n, prefix) {
			last = n
		}
	}
	return last, nil
}

// clearCheckpoints deletes every checkpoint of the domain (and its
// bitmaps), children first, so that each round starts alike.
func (l *libvirt) clearCheckpoints(ctx context.Context) error {
	names, err := l.checkpoints(ctx)
	if err != nil {
		return err
	}
	for i := len(names) - 1; i >= 0; i-- {
		if _, err := l.virsh(ctx, "checkpoint-delete", l.dom, names[i]); err != nil {
			return err
		}
	}
	return nil
}

// hide takes the metadata of the checkpoints whose name starts with prefix
// out of libvirt, leaving their bitmaps in QEMU (recording on), and returns
// the function that redefines them from their XML (validating that each
// bitmap is still there). virtnbdbackup refuses to run on a domain with a
// checkpoint it did not create ("Foreign checkpoint found"), and has no
// option to allow it.
func (l *libvirt) hide(ctx context.Context, prefix string) (func() error, error) {
	names, err := l.checkpoints(ctx)
	if err != nil {
		return nil, err
	}
	var files []string
	restore := func() error {
		have, err := l.checkpoints(context.WithoutCancel(ctx))
		if err != nil {
			return err
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				return err
			}
			var d checkpointDef
			if err := xml.Unmarshal(b, &d); err != nil {
				return fmt.Errorf("%s: %w", f, err)
			}
			if d.Parent.Name != "" && !slices.Contains(have, d.Parent.Name) {
				// The parent went meanwhile (virtnbdbackup's full deletes
				// its earlier checkpoints): redefined as a root. libvirt
				// reads only the checkpoint's own bitmap for an
				// incremental, so the parent is bookkeeping.
				s := string(b)
				i, j := strings.Index(s, "<parent>"), strings.Index(s, "</parent>")
				if i >= 0 && j > i {
					b = []byte(s[:i] + s[j+len("</parent>"):])
				}
				os.WriteFile(f, b, 0o644)
			}
			if _, err := l.virsh(context.WithoutCancel(ctx), "checkpoint-create", l.dom, f, "--redefine", "--redefine-validate"); err != nil {
				return fmt.Errorf("redefine checkpoint %s: %w", d.Name, err)
			}
			have = append(have, d.Name)
			os.Remove(f)
		}
		return nil
	}
	for _, n := range names {
		if !strings.HasPrefix(n, prefix) {
			continue
		}
		out, err := l.virsh(ctx, "checkpoint-dumpxml", l.dom, n)
		if err == nil {
			f := filepath.Join(l.dir, "hidden-"+n+".xml")
			if err = os.WriteFile(f, out, 0o644); err == nil {
				_, err = l.virsh(ctx, "checkpoint-delete", l.dom, n, "--metadata")
				if err == nil {
					files = append(files, f)
				}
			}
		}
		if err != nil {
			return nil, errors.Join(fmt.Errorf("hide checkpoint %s: %w", n, err), restore())
		}
	}
	return restore, nil
}

// sum is the SHA-256 of the domain's disk now, read through a pull-mode
// backup job of its own (no checkpoint) with nbdcopy: independent of both
// tools measured.
func (l *libvirt) sum(ctx context.Context) (string, error) {
	sock := filepath.Join(l.scratch, "sum.sock")
	bx := filepath.Join(l.dir, "sum-backup.xml")
	os.Remove(sock)
	x := fmt.Sprintf(`<domainbackup mode='pull'>
  <server transport='unix' socket='%s'/>
  <disks><disk name='vda' backup='yes' type='file'><scratch file='%s'/></disk></disks>
</domainbackup>
`, sock, filepath.Join(l.scratch, "sum.scratch"))
	if err := os.WriteFile(bx, []byte(x), 0o644); err != nil {
		return "", err
	}
	if _, err := l.virsh(ctx, "backup-begin", l.dom, bx); err != nil {
		return "", err
	}
	defer l.virsh(context.WithoutCancel(ctx), "domjobabort", l.dom)
	return nbdSum(ctx, "nbd+unix:///vda?socket="+sock)
}

// imageSum is the SHA-256 of the guest-visible content of an image file
// (raw or qcow2), served read-only by qemu-nbd to nbdcopy.
func imageSum(ctx context.Context, path, format string) (string, error) {
	return nbdSum(ctx, "[", "qemu-nbd", "-r", "-f", format, path, "]")
}

// nbdSum hashes what nbdcopy reads from an NBD source.
func nbdSum(ctx context.Context, src ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "nbdcopy", append(append([]string{"--"}, src...), "-")...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", err
	}
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		return "", err
	}
	h := sha256.New()
	_, cerr := io.Copy(h, out)
	if err := cmd.Wait(); err != nil || cerr != nil {
		return "", fmt.Errorf("nbdcopy %s: %v %v: %s", strings.Join(src, " "), err, cerr, errb.String())
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// stop destroys the domain and stops the daemons the harness started; it
// may be called more than once.
func (l *libvirt) stop() {
	if l.dom != "" {
		quiet(context.Background(), nil, "virsh", "-c", libvirtURI, "destroy", l.dom)
		l.dom = ""
	}
	defer func() { l.started = nil }()
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
