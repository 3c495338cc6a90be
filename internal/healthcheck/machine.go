package healthcheck

import (
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// Where the VM's hardware comes from (repo.HealthResult.Boot).
const (
	BootDefinition = "definition"
	BootDefaults   = "defaults"
)

// The defaults for a backup without a VM definition.
const (
	DefaultMemoryMiB = 1024
	DefaultVCPUs     = 1
)

// Machine is the throwaway VM's hardware.
type Machine struct {
	Boot      string // BootDefinition or BootDefaults
	MemoryMiB int
	VCPUs     int
	Firmware  string // "bios" or "uefi"
	Q35       bool   // the q35 machine type (else pc, i440fx)
	Disks     []MachineDisk
}

// MachineDisk is one disk of the VM, in boot order.
type MachineDisk struct {
	Name string // the backup's disk (the NBD export's name)
	Bus  string // "virtio", "sata", "scsi" or "ide"
}

// Defaults is the machine of a backup without a definition: 1 GiB, 1 vCPU,
// BIOS, the pc machine type, every disk on virtio in the backup's order.
func Defaults(disks []repo.ManifestDisk) *Machine {
	m := &Machine{Boot: BootDefaults, MemoryMiB: DefaultMemoryMiB, VCPUs: DefaultVCPUs, Firmware: "bios"}
	for _, d := range disks {
		m.Disks = append(m.Disks, MachineDisk{Name: d.Name, Bus: "virtio"})
	}
	return m
}

// domainXML is the part of a libvirt domain definition the health check
// reads.
type domainXML struct {
	Memory struct {
		Unit  string `xml:"unit,attr"`
		Value string `xml:",chardata"`
	} `xml:"memory"`
	VCPU string `xml:"vcpu"`
	OS   struct {
		Firmware string `xml:"firmware,attr"`
		Type     struct {
			Machine string `xml:"machine,attr"`
		} `xml:"type"`
		Loader *struct {
			Type string `xml:"type,attr"`
		} `xml:"loader"`
	} `xml:"os"`
	Disks []struct {
		Device string `xml:"device,attr"`
		Target struct {
			Dev string `xml:"dev,attr"`
			Bus string `xml:"bus,attr"`
		} `xml:"target"`
		Boot *struct {
			Order int `xml:"order,attr"`
		} `xml:"boot"`
	} `xml:"devices>disk"`
}

// FromDefinition is the machine a libvirt domain definition describes:
// memory, vCPUs, firmware (UEFI when <os firmware='efi'> or a pflash
// <loader>), machine type (q35 or pc) and the bus and order of the disks
// (boot order first, then as listed). Disks of the backup that the
// definition does not name are added on virtio after the others, with a
// warning; the definition's disks that were not backed up (CD-ROMs,
// excluded disks) are left out.
func FromDefinition(b []byte, disks []repo.ManifestDisk) (*Machine, []string, error) {
	var d domainXML
	if err := xml.Unmarshal(b, &d); err != nil {
		return nil, nil, fmt.Errorf("parse the backup's libvirt domain XML: %v: %w", err, errs.ErrCorrupt)
	}
	m := &Machine{Boot: BootDefinition, MemoryMiB: DefaultMemoryMiB, VCPUs: DefaultVCPUs, Firmware: "bios"}
	var warn []string
	if v := strings.TrimSpace(d.Memory.Value); v != "" {
		mib, err := memoryMiB(v, d.Memory.Unit)
		if err != nil {
			return nil, nil, fmt.Errorf("libvirt domain XML: <memory>: %v: %w", err, errs.ErrCorrupt)
		}
		m.MemoryMiB = mib
	}
	if v := strings.TrimSpace(d.VCPU); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1024 {
			return nil, nil, fmt.Errorf("libvirt domain XML: <vcpu>%s</vcpu> is not a count of 1 to 1024: %w", v, errs.ErrCorrupt)
		}
		m.VCPUs = n
	}
	if d.OS.Firmware == "efi" || (d.OS.Loader != nil && d.OS.Loader.Type == "pflash") {
		m.Firmware = "uefi"
	}
	m.Q35 = strings.Contains(d.OS.Type.Machine, "q35")
	have := map[string]bool{}
	for _, x := range disks {
		have[x.Name] = true
	}
	type cand struct {
		MachineDisk
		order, pos int
	}
	var cs []cand
	for i, x := range d.Disks {
		if !have[x.Target.Dev] || (x.Device != "" && x.Device != "disk") {
			continue
		}
		bus := x.Target.Bus
		switch bus {
		case "virtio", "sata", "scsi", "ide":
		case "":
			bus = "virtio"
		default:
			warn = append(warn, fmt.Sprintf("disk %s: bus %q is not supported here; attached on virtio", x.Target.Dev, bus))
			bus = "virtio"
		}
		o := 1 << 30
		if x.Boot != nil && x.Boot.Order > 0 {
			o = x.Boot.Order
		}
		cs = append(cs, cand{MachineDisk{x.Target.Dev, bus}, o, i})
		delete(have, x.Target.Dev)
	}
	// Stable: boot order first, then the definition's order.
	for i := 1; i < len(cs); i++ {
		for j := i; j > 0 && cs[j].order < cs[j-1].order; j-- {
			cs[j], cs[j-1] = cs[j-1], cs[j]
		}
	}
	for _, c := range cs {
		m.Disks = append(m.Disks, c.MachineDisk)
	}
	for _, x := range disks {
		if have[x.Name] {
			warn = append(warn, fmt.Sprintf("disk %s is not in the definition; attached on virtio after the others", x.Name))
			m.Disks = append(m.Disks, MachineDisk{x.Name, "virtio"})
		}
	}
	return m, warn, nil
}

func memoryMiB(v, unit string) (int, error) {
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a number", v)
	}
	mul := map[string]uint64{"": 1 << 10, "k": 1 << 10, "kib": 1 << 10, "b": 1, "bytes": 1, "kb": 1000,
		"m": 1 << 20, "mib": 1 << 20, "mb": 1e6, "g": 1 << 30, "gib": 1 << 30, "gb": 1e9, "t": 1 << 40, "tib": 1 << 40, "tb": 1e12}
	f, ok := mul[strings.ToLower(unit)]
	if !ok {
		return 0, fmt.Errorf("unknown unit %q", unit)
	}
	mib := n * f >> 20
	if mib < 16 || mib > 1<<20 {
		return 0, fmt.Errorf("%s %s is outside 16 MiB to 1 TiB", v, unit)
	}
	return int(mib), nil
}

// OVMF is where Debian's ovmf package puts the UEFI firmware.
var OVMF = "/usr/share/OVMF"

// uefiFiles picks the OVMF code matching an NVRAM of nvramSize bytes (0:
// none stored; the 4 MiB build and its empty variable store are used).
func uefiFiles(nvramSize int64) (code, vars string, err error) {
	pairs := [][2]string{{"OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"}, {"OVMF_CODE.fd", "OVMF_VARS.fd"}}
	for _, p := range pairs {
		c, v := filepath.Join(OVMF, p[0]), filepath.Join(OVMF, p[1])
		cs, err1 := os.Stat(c)
		vs, err2 := os.Stat(v)
		if err1 != nil || err2 != nil || !cs.Mode().IsRegular() {
			continue
		}
		if nvramSize == 0 || vs.Size() == nvramSize {
			return c, v, nil
		}
	}
	if nvramSize != 0 {
		return "", "", fmt.Errorf("no OVMF firmware in %s matches the stored NVRAM of %d bytes (install Debian's ovmf): %w", OVMF, nvramSize, errs.ErrUnsupported)
	}
	return "", "", fmt.Errorf("no OVMF firmware in %s (install Debian's ovmf): %w", OVMF, errs.ErrUnsupported)
}
