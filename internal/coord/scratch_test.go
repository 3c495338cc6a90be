package coord

import (
	"errors"
	"strings"
	"syscall"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

func TestCheckScratch(t *testing.T) {
	dir := t.TempDir()
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	free := int64(fs.Bavail) * int64(fs.Bsize)
	if free < 2*MinScratch {
		t.Skipf("only %d bytes free in %s", free, dir)
	}
	if msg, err := CheckScratch(dir, MinScratch, "X"); err != nil || msg != "" {
		t.Errorf("small set: %q, %v; want neither warning nor error", msg, err)
	}
	if msg, err := CheckScratch(dir, 2*free, "the copies break"); err != nil || !strings.Contains(msg, "if it fills, the copies break") {
		t.Errorf("set larger than the free space: %q, %v; want a warning with the consequence", msg, err)
	}
	if _, err := CheckScratch(dir, 200*free, "X"); !errors.Is(err, errs.ErrNoSpace) || !strings.Contains(err.Error(), "--scratch-dir") {
		t.Errorf("free space below 1%% of the set: %v; want ErrNoSpace naming --scratch-dir", err)
	}
	if _, err := CheckScratch(dir+"/missing", 1, "X"); err == nil {
		t.Error("a missing scratch dir passed")
	}
}

func TestSafeName(t *testing.T) {
	for _, tc := range []struct {
		in   string
		max  int
		want string
	}{
		{"web-1.example_a", 40, "web-1.example_a"},
		{"a b/c:d", 40, "a_b_c_d"},
		{"ünï", 40, "_n_"},
		{strings.Repeat("x", 50), 40, strings.Repeat("x", 40)},
	} {
		if got := SafeName(tc.in, tc.max); got != tc.want {
			t.Errorf("SafeName(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
}
