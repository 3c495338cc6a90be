package filerestore

import (
	"archive/tar"
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/fsproto"
)

// Sink receives what Get copies out of a file system. rel is a relative
// slash-separated path made only of names fsproto.CheckName accepted.
type Sink interface {
	// Dir is called before a directory's entries, DirDone after them.
	Dir(rel string, e *fsproto.Entry) error
	DirDone(rel string, e *fsproto.Entry) error
	// File receives a regular file; copy writes its bytes to w.
	File(rel string, e *fsproto.Entry, copy func(w io.Writer) error) error
	Symlink(rel string, e *fsproto.Entry) error
	Close() error
}

// GetStats counts what Get copied.
type GetStats struct {
	Files    int   `json:"files"`
	Dirs     int   `json:"dirs"`
	Symlinks int   `json:"symlinks"`
	Skipped  int   `json:"skipped"` // devices, fifos, sockets
	Bytes    int64 `json:"bytes"`
}

// Get copies p on f (a file, a symlink or a directory with everything
// under it) into sink under its base name (the file system's name for its
// root). skipped is told of entries that are not copied (devices, fifos,
// sockets).
func (s *Session) Get(ctx context.Context, f *FS, p string, sink Sink, st *GetStats, skipped func(string)) error {
	p = path.Clean("/" + p)
	e, err := s.Stat(ctx, f, p)
	if err != nil {
		return err
	}
	name := path.Base(p)
	if p == "/" {
		name = f.Name
		if i := len("lvm:"); len(name) > i && name[:i] == "lvm:" {
			name = path.Base(name[i:])
		}
	}
	e.Name = name
	return s.get(ctx, f, p, name, e, sink, st, skipped)
}

func (s *Session) get(ctx context.Context, f *FS, p, rel string, e *fsproto.Entry, sink Sink, st *GetStats, skipped func(string)) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	switch e.Type {
	case "file":
		err := sink.File(rel, e, func(w io.Writer) error { return s.ReadFile(ctx, f, p, e.Size, w) })
		if err == nil {
			st.Files++
			st.Bytes += e.Size
		}
		return err
	case "symlink":
		st.Symlinks++
		return sink.Symlink(rel, e)
	case "dir":
		if err := sink.Dir(rel, e); err != nil {
			return err
		}
		st.Dirs++
		err := s.List(ctx, f, p, func(c fsproto.Entry) error {
			return s.get(ctx, f, path.Join(p, c.Name), rel+"/"+c.Name, &c, sink, st, skipped)
		})
		if err != nil {
			return err
		}
		return sink.DirDone(rel, e)
	default:
		st.Skipped++
		if skipped != nil {
			skipped(fmt.Sprintf("%s:%s: a %s, not copied", f.Name, p, e.Type))
		}
		return nil
	}
}

// DirSink writes into a directory, keeping permissions, times, symlinks
// and (when run as root) owners. It never overwrites or follows what is
// already there: a name that exists is an error.
type DirSink struct {
	Root  string
	chown bool
}

// NewDirSink returns a sink writing under root (created if missing).
func NewDirSink(root string) (*DirSink, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("--to %s: %w", root, err)
	}
	return &DirSink{Root: root, chown: os.Geteuid() == 0}, nil
}

func (d *DirSink) path(rel string) string { return filepath.Join(d.Root, filepath.FromSlash(rel)) }

func exists(p string, err error) error {
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s already exists: restore into an empty directory, or move it away: %w", p, errs.ErrUsage)
	}
	return err
}

func (d *DirSink) meta(p string, e *fsproto.Entry, link bool) error {
	if d.chown {
		if err := os.Lchown(p, int(e.UID), int(e.GID)); err != nil {
			return err
		}
	}
	if !link {
		if err := unix.Chmod(p, e.Mode); err != nil {
			return fmt.Errorf("chmod %s: %w", p, err)
		}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(e.Atime), unix.NsecToTimespec(e.Mtime)}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times of %s: %w", p, err)
	}
	return nil
}

func (d *DirSink) Dir(rel string, e *fsproto.Entry) error {
	p := d.path(rel)
	return exists(p, os.Mkdir(p, 0o700))
}

func (d *DirSink) DirDone(rel string, e *fsproto.Entry) error { return d.meta(d.path(rel), e, false) }

func (d *DirSink) File(rel string, e *fsproto.Entry, copy func(io.Writer) error) error {
	p := d.path(rel)
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return exists(p, err)
	}
	err = copy(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(p) // never leave a part of a file that failed
		return err
	}
	return d.meta(p, e, false)
}

func (d *DirSink) Symlink(rel string, e *fsproto.Entry) error {
	p := d.path(rel)
	if err := os.Symlink(e.Link, p); err != nil {
		return exists(p, err)
	}
	return d.meta(p, e, true)
}

func (d *DirSink) Close() error { return nil }

// TarSink writes a POSIX (PAX) tar stream. When a file fails midway the
// stream is left without its end marker: readers see a truncated archive.
type TarSink struct{ w *tar.Writer }

// NewTarSink returns a sink writing a tar stream to w.
func NewTarSink(w io.Writer) *TarSink { return &TarSink{w: tar.NewWriter(w)} }

func header(rel string, e *fsproto.Entry) *tar.Header {
	return &tar.Header{Name: rel, Mode: int64(e.Mode), Uid: int(e.UID), Gid: int(e.GID),
		ModTime: time.Unix(0, e.Mtime), AccessTime: time.Unix(0, e.Atime), Format: tar.FormatPAX}
}

func (t *TarSink) Dir(rel string, e *fsproto.Entry) error {
	h := header(rel+"/", e)
	h.Typeflag = tar.TypeDir
	return t.w.WriteHeader(h)
}
func (t *TarSink) DirDone(string, *fsproto.Entry) error { return nil }
func (t *TarSink) File(rel string, e *fsproto.Entry, copy func(io.Writer) error) error {
	h := header(rel, e)
	h.Typeflag, h.Size = tar.TypeReg, e.Size
	if err := t.w.WriteHeader(h); err != nil {
		return err
	}
	return copy(t.w)
}
func (t *TarSink) Symlink(rel string, e *fsproto.Entry) error {
	h := header(rel, e)
	h.Typeflag, h.Linkname = tar.TypeSymlink, e.Link
	return t.w.WriteHeader(h)
}
func (t *TarSink) Close() error { return t.w.Close() }

// ZipSink writes a zip stream (symlinks as zip symlink entries).
type ZipSink struct{ w *zip.Writer }

// NewZipSink returns a sink writing a zip archive to w.
func NewZipSink(w io.Writer) *ZipSink { return &ZipSink{w: zip.NewWriter(w)} }

func (z *ZipSink) create(rel string, e *fsproto.Entry, mode fs.FileMode) (io.Writer, error) {
	h := &zip.FileHeader{Name: rel, Method: zip.Deflate, Modified: time.Unix(0, e.Mtime)}
	if mode.IsDir() {
		h.Method = zip.Store
	}
	h.SetMode(mode | fs.FileMode(e.Mode&0o777) | modeBits(fs.FileMode(e.Mode)))
	return z.w.CreateHeader(h)
}
func (z *ZipSink) Dir(rel string, e *fsproto.Entry) error {
	_, err := z.create(rel+"/", e, fs.ModeDir)
	return err
}
func (z *ZipSink) DirDone(string, *fsproto.Entry) error { return nil }
func (z *ZipSink) File(rel string, e *fsproto.Entry, copy func(io.Writer) error) error {
	w, err := z.create(rel, e, 0)
	if err != nil {
		return err
	}
	return copy(w)
}
func (z *ZipSink) Symlink(rel string, e *fsproto.Entry) error {
	w, err := z.create(rel, e, fs.ModeSymlink)
	if err != nil {
		return err
	}
	_, err = io.WriteString(w, e.Link)
	return err
}
func (z *ZipSink) Close() error { return z.w.Close() }
