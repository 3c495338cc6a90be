package coord

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Journal keeps one record per VM (the VM's snapshot set, if any) in a
// directory, and serialises vmshadow processes working on the same VM with
// an advisory lock that the kernel drops when a process dies.
type Journal struct {
	Dir string
}

func (j *Journal) path(key, ext string) string {
	return filepath.Join(j.Dir, key+ext)
}

// Lock takes the VM's lock without waiting. A held lock is errs.ErrBusy,
// naming the process that holds it.
func (j *Journal) Lock(key string) (unlock func(), err error) {
	if err := os.MkdirAll(j.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory %s: %w (set --state-dir or VMSHADOW_STATE_DIR to a writable directory)", j.Dir, err)
	}
	f, err := os.OpenFile(j.path(key, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(f.Name())
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("another vmshadow process (pid %s) is working on this VM; wait for it to finish: %w",
				strings.TrimSpace(string(holder)), errs.ErrBusy)
		}
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() {
		f.Truncate(0)
		syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

// Load returns the VM's set record, or nil when there is none.
func (j *Journal) Load(key string) (*Set, error) {
	b, err := os.ReadFile(j.path(key, ".json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read journal: %w", err)
	}
	var s Set
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("journal %s is damaged (%v): remove it after checking the VM by hand: %w", j.path(key, ".json"), err, errs.ErrCorrupt)
	}
	if s.Version != 1 {
		return nil, fmt.Errorf("journal %s has version %d, this vmshadow reads version 1: %w", j.path(key, ".json"), s.Version, errs.ErrUnsupported)
	}
	return &s, nil
}

// Save writes the set record durably (temporary file, fsync, rename, fsync
// of the directory), so a crash leaves either the old or the new record.
func (j *Journal) Save(key string, s *Set) error {
	s.Version = 1
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode journal: %w", err)
	}
	final := j.path(key, ".json")
	tmp, err := os.CreateTemp(j.Dir, key+".tmp*")
	if err != nil {
		return fmt.Errorf("write journal: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("write journal: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync journal: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write journal: %w", err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("write journal: %w", err)
	}
	return syncDir(j.Dir)
}

// Remove deletes the VM's set record.
func (j *Journal) Remove(key string) error {
	if err := os.Remove(j.path(key, ".json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove journal: %w", err)
	}
	return syncDir(j.Dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
