package filerestore

import (
	"time"

	"golang.org/x/sys/unix"
)

// lutimes sets the access and modification times of p to t, not
// following a symlink.
func lutimes(p string, t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	return unix.UtimesNanoAt(unix.AT_FDCWD, p, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW)
}
