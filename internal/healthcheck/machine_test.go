package healthcheck

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
)

const domainQ35 = `<domain type='kvm'>
  <name>web</name>
  <memory unit='GiB'>2</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='cdrom'>
      <target dev='sdc' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/images/data.qcow2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/images/root.qcow2'/>
      <target dev='sda' bus='sata'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <target dev='sdb' bus='usb'/>
    </disk>
  </devices>
</domain>`

func disks(names ...string) []repo.ManifestDisk {
	var out []repo.ManifestDisk
	for _, n := range names {
		out = append(out, repo.ManifestDisk{Name: n})
	}
	return out
}

func TestFromDefinition(t *testing.T) {
	m, warn, err := FromDefinition([]byte(domainQ35), disks("vdb", "sda", "sdb", "vdz"))
	if err != nil {
		t.Fatal(err)
	}
	want := &Machine{Boot: BootDefinition, MemoryMiB: 2048, VCPUs: 2, Firmware: "uefi", Q35: true,
		Disks: []MachineDisk{{"sda", "sata"}, {"vdb", "virtio"}, {"sdb", "virtio"}, {"vdz", "virtio"}}}
	if !reflect.DeepEqual(m, want) {
		t.Fatalf("machine = %+v\nwant      %+v", m, want)
	}
	if len(warn) != 2 || !strings.Contains(warn[0], `bus "usb"`) || !strings.Contains(warn[1], "vdz is not in the definition") {
		t.Fatalf("warnings = %q, want the unsupported bus and the disk missing from the definition", warn)
	}
	// A BIOS pc domain with a pflash loader is UEFI; memory in KiB by default.
	m, _, err = FromDefinition([]byte(`<domain><memory>524288</memory><os><type machine='pc-i440fx-7.2'>hvm</type>
		<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader></os>
		<devices><disk device='disk'><target dev='hda' bus='ide'/></disk></devices></domain>`), disks("hda"))
	if err != nil {
		t.Fatal(err)
	}
	if m.MemoryMiB != 512 || m.VCPUs != 1 || m.Firmware != "uefi" || m.Q35 || !reflect.DeepEqual(m.Disks, []MachineDisk{{"hda", "ide"}}) {
		t.Fatalf("machine = %+v", m)
	}
	for _, bad := range []string{
		`<domain><memory unit='parsecs'>1</memory></domain>`,
		`<domain><memory>1</memory></domain>`,
		`<domain><vcpu>zero</vcpu></domain>`,
		`<domain><memory>`,
	} {
		if _, _, err := FromDefinition([]byte(bad), disks("vda")); !errors.Is(err, errs.ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", bad, err)
		}
	}
}

func TestDefaultsAndArgs(t *testing.T) {
	m := Defaults(disks("vda", "vdb"))
	if m.Boot != BootDefaults || m.MemoryMiB != 1024 || m.VCPUs != 1 || m.Firmware != "bios" || m.Q35 ||
		!reflect.DeepEqual(m.Disks, []MachineDisk{{"vda", "virtio"}, {"vdb", "virtio"}}) {
		t.Fatalf("defaults = %+v", m)
	}
	args := strings.Join(qemuArgs(m, "/t/nbd.sock", "/t/qga.sock", "/t/console.log", "/t/sercon"), " ")
	for _, want := range []string{"-nic none", "-m 1024", "-smp 1", "-machine pc",
		"driver=nbd,node-name=disk0,server.type=unix,server.path=/t/nbd.sock,export=vda",
		"virtio-blk-pci,drive=disk0,bootindex=1", "virtio-blk-pci,drive=disk1,bootindex=2",
		"socket,id=qga0,path=/t/qga.sock,server=on,wait=off", "name=org.qemu.guest_agent.0",
		"file,id=console,path=/t/console.log"} {
		if !strings.Contains(args, want) {
			t.Errorf("qemu args lack %q:\n%s", want, args)
		}
	}
	if strings.Contains(args, "netdev") || strings.Contains(args, "-net ") {
		t.Errorf("qemu args give the VM a network: %s", args)
	}
	m = &Machine{MemoryMiB: 2048, VCPUs: 2, Q35: true, Disks: []MachineDisk{{"sda", "sata"}, {"sdb", "scsi"}, {"v,x", "virtio"}}}
	args = strings.Join(qemuArgs(m, "/t/nbd.sock", "/t/q", "/t/c", "/t/s"), " ")
	for _, want := range []string{"-machine q35", "ide-hd,drive=disk0,bus=ide.0,bootindex=1",
		"virtio-scsi-pci,id=scsi0", "scsi-hd,drive=disk1,bus=scsi0.0,bootindex=2", "export=v,,x"} {
		if !strings.Contains(args, want) {
			t.Errorf("q35 qemu args lack %q:\n%s", want, args)
		}
	}
	m = &Machine{MemoryMiB: 512, VCPUs: 1, Disks: []MachineDisk{{"sda", "sata"}, {"hda", "ide"}, {"hdb", "ide"}}}
	args = strings.Join(qemuArgs(m, "/n", "/q", "/c", "/s"), " ")
	for _, want := range []string{"-device ahci,id=ahci0", "ide-hd,drive=disk0,bus=ahci0.0,bootindex=1",
		"ide-hd,drive=disk1,bus=ide.0,unit=0,bootindex=2", "ide-hd,drive=disk2,bus=ide.0,unit=1,bootindex=3"} {
		if !strings.Contains(args, want) {
			t.Errorf("pc qemu args lack %q:\n%s", want, args)
		}
	}
}

func TestUEFIFiles(t *testing.T) {
	old := OVMF
	t.Cleanup(func() { OVMF = old })
	OVMF = t.TempDir()
	if _, _, err := uefiFiles(0); !errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("no OVMF: %v, want ErrUnsupported", err)
	}
	for name, size := range map[string]int{"OVMF_CODE_4M.fd": 10, "OVMF_VARS_4M.fd": 540672, "OVMF_CODE.fd": 10, "OVMF_VARS.fd": 131072} {
		if err := os.WriteFile(filepath.Join(OVMF, name), make([]byte, size), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if c, v, err := uefiFiles(0); err != nil || filepath.Base(c) != "OVMF_CODE_4M.fd" || filepath.Base(v) != "OVMF_VARS_4M.fd" {
		t.Fatalf("no NVRAM: %s %s %v, want the 4M build", c, v, err)
	}
	if c, _, err := uefiFiles(131072); err != nil || filepath.Base(c) != "OVMF_CODE.fd" {
		t.Fatalf("2M NVRAM: %s %v, want OVMF_CODE.fd", c, err)
	}
	if _, _, err := uefiFiles(12345); err == nil || !strings.Contains(err.Error(), "12345 bytes") {
		t.Fatalf("NVRAM of no known size: %v", err)
	}
}

func TestConsoleTail(t *testing.T) {
	p := filepath.Join(t.TempDir(), "console.log")
	raw := "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\n\r\nBoot failed: not a bootable disk\n\x00\x01No bootable device.\n"
	if err := os.WriteFile(p, []byte(raw), 0o600); err != nil {
		t.Fatal(err)
	}
	got := consoleTail(p, 3)
	if want := "Booting from Hard Disk... | Boot failed: not a bootable disk | No bootable device."; got != want {
		t.Fatalf("consoleTail = %q, want %q", got, want)
	}
	if got := consoleTail(filepath.Join(t.TempDir(), "none"), 3); got != "(nothing on the serial console)" {
		t.Fatalf("missing console: %q", got)
	}
}
