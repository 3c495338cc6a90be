package libvirttest

import (
	"os"
	"strings"
	"testing"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// TestDomain starts a two-disk domain with no OS on the shared libvirtd and
// checks that libvirt runs it as a TCG guest on the images the helper made.
func TestDomain(t *testing.T) {
	d := NewDomain(t, Options{Disks: []Disk{{}, {Format: "raw", Size: 32 << 20}}, Paused: true})
	d.Write(t, "vda", 0x5a, 0, 1<<20)
	d.Start(t)
	if st := strings.TrimSpace(Virsh(t, "domstate", d.Name)); st != "paused" {
		t.Fatalf("domstate = %q, want paused", st)
	}
	xml := Virsh(t, "dumpxml", d.Name)
	for _, disk := range d.Disks {
		if !strings.Contains(xml, disk.Path) {
			t.Errorf("live XML does not name %s:\n%s", disk.Path, xml)
		}
	}
	if !strings.Contains(xml, "type='qemu'") {
		t.Errorf("domain is not of type qemu:\n%s", xml)
	}
	if d.UUID == "" {
		t.Error("no UUID")
	}
	if !strings.Contains(d.Log(), "qemu-system-x86_64") {
		t.Errorf("no QEMU command line in %s:\n%s", LogPath(d.Name), d.Log())
	}
}
