package restore

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// ReadFile returns the named file of a backup's Files (see
// repo.Manifest.Files), every chunk checked against its hash. A file the
// backup lacks is errs.ErrNotFound; one larger than limit bytes (or
// repo.MaxFileSize) is errs.ErrCorrupt.
func ReadFile(ctx context.Context, r *repo.Repo, m *repo.Manifest, name string, limit int64) ([]byte, error) {
	f := m.File(name)
	if f == nil {
		return nil, fmt.Errorf("backup of %s at %s stores no %s: %w", m.VM, m.Time.Format("2006-01-02 15:04:05"), name, errs.ErrNotFound)
	}
	if limit <= 0 || limit > repo.MaxFileSize {
		limit = repo.MaxFileSize
	}
	if f.Size > limit {
		return nil, fmt.Errorf("file %s: %d bytes, more than the %d expected: %w", name, f.Size, limit, errs.ErrCorrupt)
	}
	x, err := LoadIndex(ctx, r, *f)
	if err != nil {
		return nil, fmt.Errorf("file %s: %w", name, err)
	}
	b := make([]byte, f.Size)
	if _, err := NewDiskReader(r, x, r.ChunkSize()).ReadAtContext(ctx, b, 0); err != nil {
		return nil, fmt.Errorf("read file %s of the backup: %w", name, err)
	}
	return b, nil
}

// DefinitionFile is a VM definition file written by WriteDefinition.
type DefinitionFile struct {
	Name string `json:"name"` // the file's name in the backup
	Path string `json:"path"`
}

// WriteDefinition writes the VM definition a backup stores into dir, next
// to its restored disks, as it was stored: VM.xml (the libvirt domain
// XML; its disks still name the original images), VM.nvram (UEFI
// variables) and VM.tpm-FILE (TPM state). A backup without a definition
// writes nothing. Each file appears complete or not at all, and an
// existing file is never overwritten.
func WriteDefinition(ctx context.Context, r *repo.Repo, m *repo.Manifest, dir string) ([]DefinitionFile, error) {
	if m.Definition == "" {
		return nil, nil
	}
	var out []DefinitionFile
	for _, f := range m.Files {
		var path string
		switch {
		case f.Name == repo.FileDomainXML:
			path = filepath.Join(dir, m.VM+".xml")
		case f.Name == repo.FileNVRAM, len(f.Name) > len(repo.FileTPMPrefix) && f.Name[:len(repo.FileTPMPrefix)] == repo.FileTPMPrefix:
			path = filepath.Join(dir, m.VM+"."+f.Name)
		default:
			continue // what vmshadow keeps for itself (checkpoint.xml)
		}
		b, err := ReadFile(ctx, r, m, f.Name, 0)
		if err != nil {
			return out, err
		}
		if err := writeNew(path, b); err != nil {
			return out, err
		}
		out = append(out, DefinitionFile{Name: f.Name, Path: path})
	}
	return out, nil
}

// writeNew writes b to path as restores write images (partialFile):
// complete or not at all, never replacing an existing file.
func writeNew(path string, b []byte) error {
	p, err := createPartial(path, os.O_WRONLY)
	if err != nil {
		return err
	}
	if _, err := p.Write(b); err != nil {
		p.abort()
		return fmt.Errorf("write %s: %w", path, mapNoSpace(err))
	}
	return p.commit()
}
