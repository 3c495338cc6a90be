package instant

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmshadow/vmshadow/internal/nbd"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// ServeOptions say how a backup's disks are served.
type ServeOptions struct {
	// Disks are the disks to serve (restore.Select); each becomes the
	// export named after it.
	Disks []repo.ManifestDisk
	// CacheBytes bounds the decoded chunks cached per disk.
	CacheBytes int64
	// Writable accepts writes into an overlay file per disk in
	// OverlayDir (created if needed), removed by Close. Overlays there
	// that killed serves left are removed first (RemoveStaleOverlays).
	Writable   bool
	OverlayDir string
	// Warn is told of problems that do not stop the server; may be nil.
	Warn func(string)
	// ReadError, if not nil, is told of every failed read of a disk from
	// the repository (a missing or damaged chunk: the client gets an I/O
	// error, never the data), so that a caller can stop what depends on
	// the disk (vmshadow healthcheck stops its VM).
	ReadError func(disk string, err error)
}

// reportingDisk tells ServeOptions.ReadError of failed reads.
type reportingDisk struct {
	*Disk
	name string
	fn   func(string, error)
}

func (d reportingDisk) ReadAt(ctx context.Context, p []byte, off int64) (int, error) {
	n, err := d.Disk.ReadAt(ctx, p, off)
	if err != nil && ctx.Err() == nil {
		d.fn(d.name, err)
	}
	return n, err
}

// Server is an NBD server of a backup's disks, read on demand from the
// repository. The caller serves it on its listener and, once done, shuts
// it down and closes it.
type Server struct {
	*nbd.Server
	overlays []*Overlay
	paths    []string
}

// NewServer builds the server of the disks o.Disks of backup id (manifest
// m): each disk's index is loaded and checked against the manifest,
// and with o.Writable its overlay created. The repository must stay
// locked (shared) while it serves, so that gc removes no chunk it reads.
func NewServer(ctx context.Context, r *repo.Repo, id repo.ID, m *repo.Manifest, o ServeOptions) (_ *Server, err error) {
	s := &Server{Server: nbd.NewServer(nil)}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	for _, d := range o.Disks {
		x, err := restore.LoadIndex(ctx, r, d)
		if err != nil {
			return nil, err
		}
		var base Base = NewDisk(r, x, o.CacheBytes)
		if o.ReadError != nil {
			base = reportingDisk{base.(*Disk), d.Name, o.ReadError}
		}
		var export nbd.Export = base
		if o.Writable {
			if err := os.MkdirAll(o.OverlayDir, 0o700); err != nil {
				return nil, err
			}
			// Overlays of killed serves (a running one's is locked).
			if _, err := RemoveStaleOverlays(o.OverlayDir); err != nil && o.Warn != nil {
				o.Warn(err.Error())
			}
			path := filepath.Join(o.OverlayDir, fmt.Sprintf("%s-%s-%d%s", id.Short(), d.Name, os.Getpid(), OverlaySuffix))
			ov, err := NewOverlay(base, path)
			if err != nil {
				return nil, fmt.Errorf("disk %s: %w", d.Name, err)
			}
			s.overlays, s.paths = append(s.overlays, ov), append(s.paths, path)
			export = ov
		}
		if err := s.AddExport(d.Name, export, nbd.ExportOptions{ReadOnly: !o.Writable,
			Description: fmt.Sprintf("vmshadow backup %s of %s, disk %s", id.Short(), m.VM, d.Name)}); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Close closes the NBD server and removes the overlays: their writes are
// discarded.
func (s *Server) Close() error {
	err := s.Server.Close()
	for i, ov := range s.overlays {
		ov.Close()
		os.Remove(s.paths[i])
	}
	s.overlays, s.paths = nil, nil
	return err
}
