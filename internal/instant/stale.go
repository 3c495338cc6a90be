package instant

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// OverlaySuffix ends the names of overlay files; RemoveStaleOverlays
// considers only those.
const OverlaySuffix = ".overlay"

// createLocked creates path (which must not exist) and takes an exclusive
// flock on it, held until the file is closed (or its process dies). A file
// system without flock (some NFS setups) leaves it unlocked; then
// RemoveStaleOverlays cannot lock it either and leaves it alone.
func createLocked(path string) (*os.File, error) {
	for range 3 {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		// Blocking: only RemoveStaleOverlays can hold the lock of a file
		// just created, and only for a moment.
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			if errors.Is(err, unix.ENOLCK) || errors.Is(err, unix.EOPNOTSUPP) {
				return f, nil
			}
			f.Close()
			os.Remove(path)
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		// RemoveStaleOverlays may have taken the file for a stale one
		// between its creation and the lock: then it is gone from path.
		fi, err1 := f.Stat()
		pi, err2 := os.Stat(path)
		if err1 == nil && err2 == nil && os.SameFile(fi, pi) {
			return f, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("create %s: removed again while being created", path)
}

// RemoveStaleOverlays removes the overlay files (*.overlay) in dir that
// no process holds locked: those a writable serve left when it was killed
// (kill -9, the OOM killer, a power loss) before it could remove its own.
// The overlay of a running serve is locked and stays. It returns the paths
// removed; a missing dir is not an error.
func RemoveStaleOverlays(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("remove stale overlays: %w", err)
	}
	var removed []string
	var errs []error
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), OverlaySuffix) || !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(dir, e.Name())
		f, err := os.Open(p)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			if err := os.Remove(p); err == nil {
				removed = append(removed, p)
			} else if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
		f.Close()
	}
	if err := errors.Join(errs...); err != nil {
		return removed, fmt.Errorf("remove stale overlays: %w", err)
	}
	return removed, nil
}
