package restore

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// partialMark is in the name of a file being restored:
// DIR/.NAME.vmshadow-partial-RANDOM for the target DIR/NAME.
const partialMark = ".vmshadow-partial-"

// partialFile is a new regular file being restored. It is written under a
// temporary name next to its final path and holds an exclusive flock on it
// while it is written. commit syncs it, renames it to the final path (never
// replacing a file that appeared meanwhile) and syncs the directory, so the
// final name only ever holds a complete image. A restore that fails removes
// its temporary file; one that is killed (kill -9, power loss) leaves it,
// and the next restore to the same path removes it: its lock is free then.
type partialFile struct {
	*os.File
	final string
}

// partialName is the temporary name of a restore to final.
func partialName(final string) string {
	var rnd [8]byte
	rand.Read(rnd[:])
	return filepath.Join(filepath.Dir(final), "."+filepath.Base(final)+partialMark+hex.EncodeToString(rnd[:]))
}

// createPartial checks that final does not exist, removes what killed
// restores to final left, and creates a temporary file for it, opened
// with flag (os.O_WRONLY or os.O_RDWR).
func createPartial(final string, flag int) (*partialFile, error) {
	if _, err := os.Lstat(final); err == nil {
		return nil, fmt.Errorf("%s already exists: restore never overwrites a file; remove it or choose another path: %w", final, errs.ErrUsage)
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("restore target %s: %w", final, err)
	}
	removeStalePartials(final)
	tmp := partialName(final)
	f, err := os.OpenFile(tmp, flag|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", final, mapNoSpace(err))
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil && !errors.Is(err, unix.ENOLCK) && !errors.Is(err, unix.EOPNOTSUPP) {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("lock %s: %w", tmp, err)
	}
	return &partialFile{File: f, final: final}, nil
}

// removeStalePartials removes the temporary files of restores to final
// whose process is gone (nobody holds their lock). Failures are ignored:
// the new restore uses a name of its own anyway.
func removeStalePartials(final string) {
	dir, prefix := filepath.Dir(final), "."+filepath.Base(final)+partialMark
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), prefix) || !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(dir, e.Name())
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			os.Remove(p)
		}
		f.Close()
	}
}

// commit makes the complete file appear under its final name: fsync, rename
// without replacing, fsync of the directory (which makes the rename
// durable). On failure the temporary file is removed.
func (p *partialFile) commit() error {
	tmp := p.Name()
	if err := p.Sync(); err != nil {
		p.abort()
		return fmt.Errorf("sync %s: %w", tmp, mapNoSpace(err))
	}
	if err := p.Close(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := renameNoReplace(tmp, p.final); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := syncDir(filepath.Dir(p.final)); err != nil {
		// The image is complete, only its name may not survive a power loss.
		return fmt.Errorf("restored %s, but syncing its directory failed (the file may be missing after a power loss): %w", p.final, err)
	}
	return nil
}

// abort closes and removes the temporary file.
func (p *partialFile) abort() {
	p.Close()
	os.Remove(p.Name())
}

// renameNoReplace renames from to to, failing if to exists.
func renameNoReplace(from, to string) error {
	err := unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
		// The file system has no RENAME_NOREPLACE: a hard link fails as
		// well if to exists.
		if err = os.Link(from, to); err == nil {
			os.Remove(from)
			return nil
		}
		if errors.Is(err, fs.ErrExist) {
			err = unix.EEXIST
		} else if _, serr := os.Lstat(to); errors.Is(serr, fs.ErrNotExist) {
			err = os.Rename(from, to) // no hard links either (e.g. some FUSE file systems)
		}
	}
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("%s appeared while restoring to it: restore never overwrites a file; the restored image was removed: %w", to, errs.ErrUsage)
	}
	if err != nil {
		return fmt.Errorf("rename the restored image %s to %s: %w", from, to, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
