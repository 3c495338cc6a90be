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

// Target is where one disk goes.
type Target struct {
	Disk repo.ManifestDisk
	Path string
}

// Plan picks the disks to restore and their paths. With one disk selected
// (the backup has one, or disks names one) to is the output path; with
// several, to is a directory (created if needed) and each disk goes to
// DIR/<disk name><format extension>, e.g. DIR/sda.raw.
func Plan(m *repo.Manifest, disks []string, to, format string) ([]Target, error) {
	f, ok := Formats[format]
	if !ok {
		return nil, fmt.Errorf("unknown output format %q (known: raw, qcow2): %w", format, errs.ErrUsage)
	}
	if to == "" {
		return nil, fmt.Errorf("no restore target: give --to PATH: %w", errs.ErrUsage)
	}
	var sel []repo.ManifestDisk
	if len(disks) == 0 {
		sel = m.Disks
	}
	seen := map[string]bool{}
	for _, name := range disks {
		if seen[name] {
			return nil, fmt.Errorf("disk %q given twice: %w", name, errs.ErrUsage)
		}
		seen[name] = true
		d := m.Disk(name)
		if d == nil {
			var names []string
			for _, d := range m.Disks {
				names = append(names, d.Name)
			}
			return nil, fmt.Errorf("backup has no disk %q (it has %v): %w", name, names, errs.ErrNotFound)
		}
		sel = append(sel, *d)
	}
	if len(sel) == 1 {
		if st, err := os.Stat(to); err == nil && st.IsDir() {
			return nil, fmt.Errorf("%s is a directory: with one disk, --to is the output file (e.g. %s): %w", to, filepath.Join(to, sel[0].Name+f.Ext), errs.ErrUsage)
		}
		return []Target{{sel[0], to}}, nil
	}
	var ts []Target
	for _, d := range sel {
		ts = append(ts, Target{d, filepath.Join(to, d.Name+f.Ext)})
	}
	return ts, nil
}

// DiskResult is the outcome of one disk's restore.
type DiskResult struct {
	Name     string  `json:"name"`
	Path     string  `json:"path"`
	Size     int64   `json:"size"`
	Verified bool    `json:"verified"` // every chunk matched its hash
	Seconds  float64 `json:"duration_s"`
	Stats
}

// Run restores the targets one after another in format. A file appears
// under its path only once its image is complete and synced; a failed
// restore leaves nothing there (a block device keeps partial content).
func Run(ctx context.Context, r *repo.Repo, targets []Target, format string, o Options) ([]DiskResult, error) {
	f, ok := Formats[format]
	if !ok {
		return nil, fmt.Errorf("unknown output format %q: %w", format, errs.ErrUsage)
	}
	if len(targets) > 1 {
		if err := os.MkdirAll(filepath.Dir(targets[0].Path), 0o755); err != nil {
			return nil, fmt.Errorf("create restore directory: %w", err)
		}
	}
	var out []DiskResult
	for _, t := range targets {
		start := time.Now()
		xid, err := repo.ParseID(t.Disk.Index)
		if err != nil {
			return out, err
		}
		x, err := r.LoadIndex(ctx, xid)
		if err != nil {
			return out, fmt.Errorf("disk %s: %w", t.Disk.Name, err)
		}
		if x.Size() != t.Disk.Size {
			return out, fmt.Errorf("disk %s: index says %d bytes, manifest %d: %w", t.Disk.Name, x.Size(), t.Disk.Size, errs.ErrCorrupt)
		}
		w, err := f.Create(t.Path, x.Size())
		if err != nil {
			return out, fmt.Errorf("disk %s: %w", t.Disk.Name, err)
		}
		st, err := Disk(ctx, r, x, w, o)
		if err != nil {
			abort(w)
		} else {
			err = w.Close()
		}
		if err != nil {
			return out, fmt.Errorf("restore disk %s to %s: %w", t.Disk.Name, t.Path, err)
		}
		out = append(out, DiskResult{Name: t.Disk.Name, Path: t.Path, Size: x.Size(), Verified: true,
			Seconds: time.Since(start).Seconds(), Stats: st})
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
