package restore

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// Target is where a restore puts a backup's disks: image files or block
// devices (Files), new VDIs of a XenServer / XCP-ng pool
// (internal/restore/xenpool), volumes of a libvirt storage pool.
//
// Run calls Create once per selected disk, in order, and writes the disk
// into the writer Create returns; once every disk is written and closed it
// calls Finish. When a disk or Finish fails, Run calls Abort instead, once;
// Abort removes what the target created that a failed restore must not
// leave. After Finish succeeded or Abort returned, the target is done.
type Target interface {
	// Create makes the destination of disk d, whose index x Run loaded and
	// checked against the manifest, and returns the writer of the disk's
	// data and a name of the destination for results and messages (a
	// path, "VDI <uuid>"). Run closes the writer once the disk is written
	// (Close completes and syncs it), or aborts it (Aborter) when the
	// disk's restore failed.
	Create(ctx context.Context, d repo.ManifestDisk, x *repo.Index) (w ImageWriter, where string, err error)
	// Finish completes the restore once every disk is closed (e.g. makes
	// a VM of them).
	Finish(ctx context.Context) error
	// Abort removes what the target created, after a failure. Its ctx is
	// not cancelled by the failure.
	Abort(ctx context.Context)
}

// Select picks the disks of m to restore: those named, in that order, or
// all of them when names is empty. A name given twice is a usage error, a
// name the backup lacks ErrNotFound.
func Select(m *repo.Manifest, names []string) ([]repo.ManifestDisk, error) {
	if len(names) == 0 {
		return m.Disks, nil
	}
	var sel []repo.ManifestDisk
	seen := map[string]bool{}
	for _, name := range names {
		if seen[name] {
			return nil, fmt.Errorf("disk %q given twice: %w", name, errs.ErrUsage)
		}
		seen[name] = true
		d := m.Disk(name)
		if d == nil {
			var all []string
			for _, d := range m.Disks {
				all = append(all, d.Name)
			}
			return nil, fmt.Errorf("backup has no disk %q (it has %v): %w", name, all, errs.ErrNotFound)
		}
		sel = append(sel, *d)
	}
	return sel, nil
}

// LoadIndex loads the index of disk d and checks that it is as large as
// the manifest says.
func LoadIndex(ctx context.Context, r *repo.Repo, d repo.ManifestDisk) (*repo.Index, error) {
	xid, err := repo.ParseID(d.Index)
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", d.Name, err)
	}
	x, err := r.LoadIndex(ctx, xid)
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", d.Name, err)
	}
	if x.Size() != d.Size {
		return nil, fmt.Errorf("disk %s: index says %d bytes, manifest %d: %w", d.Name, x.Size(), d.Size, errs.ErrCorrupt)
	}
	return x, nil
}

// File is where one disk goes in a restore to files.
type File struct {
	Disk repo.ManifestDisk
	Path string
}

// Files is the Target of image files or block devices in one format. A
// file appears under its path only once its image is complete and synced;
// a failed restore leaves nothing there (a block device keeps partial
// content). Disks restored before a failure stay.
type Files struct {
	Disks  []File
	format Format
}

// Plan places the selected disks (see Select) in files of format. With one
// disk, to is the output path; with several, to is a directory (created
// if needed) and each disk goes to DIR/<disk name><format extension>, e.g.
// DIR/sda.raw.
func Plan(disks []repo.ManifestDisk, to, format string) (*Files, error) {
	f, ok := Formats[format]
	if !ok {
		return nil, fmt.Errorf("unknown output format %q (known: raw, qcow2): %w", format, errs.ErrUsage)
	}
	if to == "" {
		return nil, fmt.Errorf("no restore target: give --to PATH: %w", errs.ErrUsage)
	}
	fs := &Files{format: f}
	if len(disks) == 1 {
		if st, err := os.Stat(to); err == nil && st.IsDir() {
			return nil, fmt.Errorf("%s is a directory: with one disk, --to is the output file (e.g. %s): %w", to, filepath.Join(to, disks[0].Name+f.Ext), errs.ErrUsage)
		}
		fs.Disks = []File{{disks[0], to}}
		return fs, nil
	}
	for _, d := range disks {
		fs.Disks = append(fs.Disks, File{d, filepath.Join(to, d.Name+f.Ext)})
	}
	return fs, nil
}

// Create implements Target: the file of disk d.
func (fs *Files) Create(ctx context.Context, d repo.ManifestDisk, x *repo.Index) (ImageWriter, string, error) {
	for _, f := range fs.Disks {
		if f.Disk.Name != d.Name {
			continue
		}
		if len(fs.Disks) > 1 {
			if err := os.MkdirAll(filepath.Dir(f.Path), 0o755); err != nil {
				return nil, "", fmt.Errorf("create restore directory: %w", err)
			}
		}
		w, err := fs.format.Create(f.Path, x.Size())
		return w, f.Path, err
	}
	return nil, "", fmt.Errorf("no file planned for disk %s", d.Name)
}

// Finish implements Target: each file is complete once closed.
func (fs *Files) Finish(context.Context) error { return nil }

// Abort implements Target: the failed disk's writer removed its file; the
// disks restored before it stay.
func (fs *Files) Abort(context.Context) {}

// DiskResult is the outcome of one disk's restore.
type DiskResult struct {
	Name     string  `json:"name"`
	Path     string  `json:"path"` // where the disk went, as the target names it
	Size     int64   `json:"size"`
	Verified bool    `json:"verified"` // every chunk matched its hash
	Seconds  float64 `json:"duration_s"`
	Stats
}

// Run restores the selected disks (see Select) one after another into t,
// every chunk checked against its hash, and finishes t; on failure it
// aborts t. It returns the disks restored, also on failure.
func Run(ctx context.Context, r *repo.Repo, disks []repo.ManifestDisk, t Target, o Options) (out []DiskResult, err error) {
	defer func() {
		if err != nil {
			actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			t.Abort(actx)
		}
	}()
	for _, d := range disks {
		start := time.Now()
		x, err := LoadIndex(ctx, r, d)
		if err != nil {
			return out, err
		}
		w, where, err := t.Create(ctx, d, x)
		if err != nil {
			return out, fmt.Errorf("disk %s: %w", d.Name, err)
		}
		st, err := Disk(ctx, r, x, w, o)
		if err != nil {
			abort(w)
		} else {
			err = w.Close()
		}
		if err != nil {
			return out, fmt.Errorf("restore disk %s to %s: %w", d.Name, where, err)
		}
		out = append(out, DiskResult{Name: d.Name, Path: where, Size: x.Size(), Verified: true,
			Seconds: time.Since(start).Seconds(), Stats: st})
	}
	if err := t.Finish(ctx); err != nil {
		return out, err
	}
	return out, nil
}

// abort ends the image of a failed restore: writers that can discard it
// (Aborter) do, others are closed.
func abort(w ImageWriter) {
	if a, ok := w.(Aborter); ok {
		a.Abort()
		return
	}
	w.Close()
}
