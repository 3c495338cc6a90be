package libvirttest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"html"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

// Disk is one disk of a test domain.
type Disk struct {
	Target string // <target dev>: "vda", "vdb", ...; default vda, vdb, ... in order
	Format string // "qcow2" (default, compat=1.1: v3, persistent bitmaps) or "raw"
	Size   int64  // bytes; default 64 MiB
	// CreateOptions are passed to qemu-img create -o (e.g. "compat=0.10").
	CreateOptions string
	// Device is "disk" (default) or "cdrom" (read-only, ide bus).
	Device    string
	ReadOnly  bool
	Shareable bool

	// Path is the image file: given, it is used as it is (in a directory
	// QEMU can reach, such as a TempDir); else NewDomain creates it.
	Path string
}

// Options describe a test domain.
type Options struct {
	Name  string // default vmshadow-test-<random>
	Disks []Disk
	// Transient domains are started with virsh create and vanish when
	// stopped; the default is a persistent domain (define, then start).
	Transient bool
	// Paused starts the domain with its CPUs stopped (enough for
	// block-layer tests); otherwise SeaBIOS or the kernel runs.
	Paused bool
	// Kernel, Initrd and Cmdline boot a kernel directly (the test guest).
	Kernel, Initrd, Cmdline string
	MemoryMB                int // default 64, or 256 with a kernel
	// Agent adds the org.qemu.guest_agent.0 virtio channel libvirt talks
	// to qemu-ga through.
	Agent bool
	// Devices is extra XML inside <devices>.
	Devices string
	// UEFI boots OVMF (Debian's ovmf) with a UEFI variable store libvirt
	// creates from its template; TPM adds an emulated TPM 2.0 (swtpm).
	UEFI, TPM bool
}

// OVMF's firmware and variable store template (Debian's ovmf).
const (
	OVMFCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	OVMFVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// Domain is a running test domain.
type Domain struct {
	Name  string
	UUID  string
	Dir   string
	Disks []Disk
	opts  Options
}

// NewDomain creates the domain's disks (fill them with Write, then call
// Start) and removes the domain (destroy, undefine with its checkpoint
// metadata, files) when the test ends.
func NewDomain(t testing.TB, opts Options) *Domain {
	t.Helper()
	Need(t)
	if opts.UEFI {
		if _, err := os.Stat(OVMFCode); err != nil {
			if testutil.InCI() {
				t.Fatalf("OVMF is required (CI=true): %v: run 'make deps'", err)
			}
			t.Skipf("OVMF not installed (%v): run 'make deps'", err)
		}
	}
	if opts.TPM {
		testutil.NeedCommand(t, "swtpm")
		testutil.NeedCommand(t, "swtpm_setup")
	}
	if opts.Name == "" {
		var b [4]byte
		rand.Read(b[:])
		opts.Name = "vmshadow-test-" + hex.EncodeToString(b[:])
	}
	d := &Domain{Name: opts.Name, Dir: TempDir(t), opts: opts}
	for i, disk := range opts.Disks {
		if disk.Target == "" {
			disk.Target = "vd" + string(rune('a'+i))
		}
		if disk.Format == "" {
			disk.Format = "qcow2"
		}
		if disk.Size == 0 {
			disk.Size = 64 << 20
		}
		if disk.Path != "" {
			d.Disks = append(d.Disks, disk)
			continue
		}
		disk.Path = filepath.Join(d.Dir, disk.Target+"."+disk.Format)
		args := []string{"create", "-q", "-f", disk.Format}
		o := disk.CreateOptions
		if disk.Format == "qcow2" && !strings.Contains(o, "compat=") {
			o = strings.Trim("compat=1.1,"+o, ",")
		}
		if o != "" {
			args = append(args, "-o", o)
		}
		args = append(args, disk.Path, fmt.Sprint(disk.Size))
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v: %s", args, err, out)
		}
		d.Disks = append(d.Disks, disk)
	}
	t.Cleanup(func() { d.remove(t) })
	return d
}

// Write writes length bytes of pattern at off into the disk's image with
// qemu-io, before the domain starts (QEMU holds a write lock afterwards).
func (d *Domain) Write(t testing.TB, target string, pattern byte, off, length int64) {
	t.Helper()
	disk := d.Disk(t, target)
	out, err := exec.Command("qemu-io", "-f", disk.Format, "-c",
		fmt.Sprintf("write -P 0x%02x %d %d", pattern, off, length), disk.Path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "error") {
		t.Fatalf("qemu-io write to %s: %v: %s", disk.Path, err, out)
	}
}

// Disk returns the disk with the given target.
func (d *Domain) Disk(t testing.TB, target string) Disk {
	t.Helper()
	for _, disk := range d.Disks {
		if disk.Target == target {
			return disk
		}
	}
	t.Fatalf("domain %s has no disk %s", d.Name, target)
	return Disk{}
}

// XML is the domain definition.
func (d *Domain) XML() string {
	o := d.opts
	mem := o.MemoryMB
	if mem == 0 {
		mem = 64
		if o.Kernel != "" {
			mem = 256
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "<domain type='qemu'>\n  <name>%s</name>\n  <memory unit='MiB'>%d</memory>\n  <vcpu>1</vcpu>\n", html.EscapeString(d.Name), mem)
	b.WriteString("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n")
	if o.Kernel != "" {
		fmt.Fprintf(&b, "    <kernel>%s</kernel>\n", html.EscapeString(o.Kernel))
		if o.Initrd != "" {
			fmt.Fprintf(&b, "    <initrd>%s</initrd>\n", html.EscapeString(o.Initrd))
		}
		fmt.Fprintf(&b, "    <cmdline>%s</cmdline>\n", html.EscapeString(o.Cmdline))
	}
	if o.UEFI {
		fmt.Fprintf(&b, "    <loader readonly='yes' type='pflash'>%s</loader>\n    <nvram template='%s'/>\n", OVMFCode, OVMFVars)
	}
	b.WriteString("  </os>\n")
	if o.UEFI {
		b.WriteString("  <features>\n    <acpi/>\n  </features>\n")
	}
	b.WriteString("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>\n")
	b.WriteString("  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n")
	for _, disk := range d.Disks {
		dev := disk.Device
		if dev == "" {
			dev = "disk"
		}
		bus := "virtio"
		if dev == "cdrom" {
			bus = "sata"
		}
		fmt.Fprintf(&b, "    <disk type='file' device='%s'>\n      <driver name='qemu' type='%s'/>\n      <source file='%s'/>\n      <target dev='%s' bus='%s'/>\n",
			dev, disk.Format, html.EscapeString(disk.Path), disk.Target, bus)
		if disk.ReadOnly || dev == "cdrom" {
			b.WriteString("      <readonly/>\n")
		}
		if disk.Shareable {
			b.WriteString("      <shareable/>\n")
		}
		b.WriteString("    </disk>\n")
	}
	if o.Agent {
		b.WriteString("    <channel type='unix'>\n      <target type='virtio' name='org.qemu.guest_agent.0'/>\n    </channel>\n")
	}
	fmt.Fprintf(&b, "    <serial type='file'>\n      <source path='%s'/>\n      <target port='0'/>\n    </serial>\n", html.EscapeString(filepath.Join(d.Dir, "console.log")))
	if o.TPM {
		b.WriteString("    <tpm model='tpm-tis'>\n      <backend type='emulator' version='2.0'/>\n    </tpm>\n")
	}
	b.WriteString(o.Devices)
	b.WriteString("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n  </devices>\n</domain>\n")
	return b.String()
}

// Start defines (unless transient) and starts the domain.
func (d *Domain) Start(t testing.TB) {
	t.Helper()
	path := filepath.Join(d.Dir, "domain.xml")
	if err := os.WriteFile(path, []byte(d.XML()), 0o644); err != nil {
		t.Fatal(err)
	}
	var flags []string
	if d.opts.Paused {
		flags = append(flags, "--paused")
	}
	if d.opts.Transient {
		Virsh(t, append([]string{"create", path}, flags...)...)
	} else {
		Virsh(t, "define", path)
		Virsh(t, append([]string{"start", d.Name}, flags...)...)
	}
	d.UUID = strings.TrimSpace(Virsh(t, "domuuid", d.Name))
}

// Console is what the domain printed on its serial port.
func (d *Domain) Console() string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "console.log"))
	return string(b)
}

// WaitConsole waits until the console shows marker.
func (d *Domain) WaitConsole(t testing.TB, marker string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(d.Console(), marker) {
		if time.Now().After(deadline) {
			t.Fatalf("domain %s: %q not on the console after %s; console:\n%s", d.Name, marker, timeout, d.Console())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Log is libvirt's QEMU log of the domain.
func (d *Domain) Log() string {
	b, _ := os.ReadFile(LogPath(d.Name))
	return string(b)
}

// Tainted returns the log lines saying the domain is tainted.
func (d *Domain) Tainted() []string {
	var lines []string
	for _, l := range strings.Split(d.Log(), "\n") {
		if strings.Contains(l, "tainted") {
			lines = append(lines, l)
		}
	}
	return lines
}

// GuestWrite writes length bytes of pattern at off through the guest's
// device, as the guest would, with HMP qemu-io. It goes through libvirt's
// QEMU monitor passthrough and so TAINTS the domain ("custom-monitor"):
// only for tests that need guest writes into a domain with no OS, never
// before a taint check.
func (d *Domain) GuestWrite(t testing.TB, target string, pattern byte, off, length int64) {
	t.Helper()
	dev := d.qdev(t, target)
	cmd := fmt.Sprintf(`qemu-io -d /machine/peripheral/%s/virtio-backend "write -P 0x%02x %d %d"`, dev, pattern, off, length)
	out := Virsh(t, "qemu-monitor-command", d.Name, "--hmp", cmd)
	if strings.TrimSpace(out) != "" && !strings.Contains(out, "wrote") {
		t.Fatalf("guest write %s: %s", cmd, out)
	}
}

// qdev is the device id libvirt gave the disk's guest device.
func (d *Domain) qdev(t testing.TB, target string) string {
	t.Helper()
	xml := Virsh(t, "dumpxml", d.Name)
	i := strings.Index(xml, "<target dev='"+target+"'")
	if i < 0 {
		t.Fatalf("disk %s not in the live XML", target)
	}
	rest := xml[i:]
	end := strings.Index(rest, "</disk>")
	j := strings.Index(rest[:end], "<alias name='")
	if j < 0 {
		t.Fatalf("disk %s has no alias in the live XML", target)
	}
	alias := rest[j+len("<alias name='"):]
	return alias[:strings.Index(alias, "'")]
}

func (d *Domain) remove(t testing.TB) {
	if _, err := VirshErr("domstate", d.Name); err != nil {
		return
	}
	VirshErr("destroy", d.Name)
	if !d.opts.Transient {
		if _, err := VirshErr("undefine", d.Name, "--checkpoints-metadata", "--nvram"); err != nil {
			t.Logf("undefine %s: %v", d.Name, err)
		}
	}
}
