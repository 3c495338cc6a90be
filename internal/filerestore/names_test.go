package filerestore

import (
	"errors"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

func TestParseLocation(t *testing.T) {
	for in, want := range map[string][2]string{
		"vda2:/etc/nginx":   {"vda2", "/etc/nginx"},
		"vda:/":             {"vda", "/"},
		"vda1:":             {"vda1", "/"},
		"nvme0n1p2:/a:b":    {"nvme0n1p2", "/a:b"},
		"lvm:vg0/root:/etc": {"lvm:vg0/root", "/etc"},
		"lvm:vg0/root:":     {"lvm:vg0/root", "/"},
		"/etc/x":            {"", "/etc/x"},
	} {
		fs, p, err := ParseLocation(in)
		if err != nil || fs != want[0] || p != want[1] {
			t.Errorf("ParseLocation(%q) = %q, %q, %v; want %q, %q", in, fs, p, err, want[0], want[1])
		}
	}
	for _, in := range []string{"etc", "vda1:etc", "lvm:vg0:/etc", "lvm:vg0/root/x:/", "lvm:/root:/", ":/etc", "a/b:/c", "vda1:/a\x00b"} {
		if _, _, err := ParseLocation(in); !errors.Is(err, errs.ErrUsage) {
			t.Errorf("ParseLocation(%q): %v, want a usage error", in, err)
		}
	}
}

func TestPartName(t *testing.T) {
	for disk, want := range map[string]string{"vda": "vda3", "nvme0n1": "nvme0n1p3", "disk-0": "disk-0p3"} {
		if got := partName(disk, 3); got != want {
			t.Errorf("partName(%q, 3) = %q, want %q", disk, got, want)
		}
	}
}
