package coord

import (
	"fmt"
	"strings"
	"syscall"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/progress"
)

// MinScratch is the least free space a diff area must have to be used at
// all.
const MinScratch = 64 << 20

// CheckScratch checks that the diff area in dir can hold a set of disks
// of need bytes in all, for providers whose shadow copies keep the old
// content of rewritten blocks there. Below MinScratch or 1% of need it
// fails with errs.ErrNoSpace; below need it returns a warning that says
// what happens if it fills (onFull, the provider's consequence).
func CheckScratch(dir string, need int64, onFull string) (warning string, err error) {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return "", fmt.Errorf("scratch dir %s: %w", dir, err)
	}
	free := int64(fs.Bavail) * int64(fs.Bsize)
	switch {
	case free < MinScratch || free < need/100:
		return "", fmt.Errorf("scratch dir %s has %s free; the diff area of this set may need up to %s (the size of its disks): free space or choose another --scratch-dir: %w",
			dir, progress.Bytes(free), progress.Bytes(need), errs.ErrNoSpace)
	case free < need:
		return fmt.Sprintf("scratch dir %s has %s free, less than the %s the diff area needs if the guest rewrites every block while the set exists; if it fills, %s",
			dir, progress.Bytes(free), progress.Bytes(need), onFull), nil
	}
	return "", nil
}

// SafeName is s with every character other than ASCII letters, digits,
// '-', '_' and '.' made '_', cut to at most max bytes: a hypervisor's name
// for a VM or disk made fit for file names and keys.
func SafeName(s string, max int) string {
	var b strings.Builder
	for _, r := range s {
		if r < 128 && (r == '-' || r == '_' || r == '.' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
		if b.Len() >= max {
			break
		}
	}
	return b.String()
}
