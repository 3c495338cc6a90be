package restore_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// TestBackupFiles: the files describing a VM are stored with a backup,
// read back checked, kept by gc, checked by verify (a damaged one named)
// and written next to restored disks; a backup without them keeps
// manifest version 1.
func TestBackupFiles(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(ctx, be, repo.InitOptions{Encryption: repo.EncryptionNone, ChunkSize: cs})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	disk := make([]byte, 2*cs)
	nvram := make([]byte, 3*cs+17)
	for _, b := range [][]byte{disk, nvram} {
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
	}
	domain := []byte("<domain type='kvm'><name>vm</name></domain>\n")
	files := map[string][]byte{repo.FileDomainXML: domain, repo.FileNVRAM: nvram}

	plain, err := backup.Run(ctx, r, backup.Job{VM: "vm", Disks: []backup.Disk{{Source: backup.Bytes("vda", disk)}}}, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if plain.Manifest.Version != 1 || plain.Manifest.Files != nil {
		t.Fatalf("backup without files: version %d, files %v; want 1, none", plain.Manifest.Version, plain.Manifest.Files)
	}
	res, err := backup.Run(ctx, r, backup.Job{VM: "vm", Definition: repo.DefinitionLibvirt,
		Disks: []backup.Disk{{Source: backup.Bytes("vda", disk)}},
		Files: []backup.Source{backup.Bytes(repo.FileDomainXML, domain), backup.Bytes(repo.FileNVRAM, nvram)}}, backup.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Stats.BytesRead != int64(len(disk)) {
		t.Errorf("backup stats read %d bytes, want the disk's %d only", res.Stats.BytesRead, len(disk))
	}
	check := func(what string) *repo.Manifest {
		t.Helper()
		m, err := r.LoadManifest(ctx, res.ID)
		if err != nil {
			t.Fatal(err)
		}
		if m.Version != 2 || m.Definition != repo.DefinitionLibvirt || len(m.Files) != 2 {
			t.Fatalf("%s: manifest version %d, definition %q, files %+v", what, m.Version, m.Definition, m.Files)
		}
		for name, want := range files {
			got, err := restore.ReadFile(ctx, r, m, name, 0)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%s: ReadFile(%s) = %d bytes, %v; want the %d stored", what, name, len(got), err, len(want))
			}
		}
		return m
	}
	m := check("stored")
	if _, err := restore.ReadFile(ctx, r, m, "tpm-x", 0); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("ReadFile of a file the backup lacks: %v, want ErrNotFound", err)
	}
	if _, err := restore.ReadFile(ctx, r, m, repo.FileNVRAM, 100); !errors.Is(err, errs.ErrCorrupt) {
		t.Fatalf("ReadFile over its limit: %v, want ErrCorrupt", err)
	}

	// gc at once keeps the files' chunks (only the first backup's
	// manifest-less leftovers could go; there are none).
	if _, err := r.GC(ctx, repo.GCOptions{Immediate: true}); err != nil {
		t.Fatal(err)
	}
	m = check("after gc")

	out := t.TempDir()
	wrote, err := restore.WriteDefinition(ctx, r, m, out)
	if err != nil || len(wrote) != 2 {
		t.Fatalf("WriteDefinition = %+v, %v", wrote, err)
	}
	for name, path := range map[string]string{repo.FileDomainXML: "vm.xml", repo.FileNVRAM: "vm.nvram"} {
		if b, err := os.ReadFile(filepath.Join(out, path)); err != nil || !bytes.Equal(b, files[name]) {
			t.Errorf("%s: %d bytes, %v; want the stored %s", path, len(b), err, name)
		}
	}
	if _, err := restore.WriteDefinition(ctx, r, m, out); err == nil || !errors.Is(err, errs.ErrUsage) {
		t.Errorf("WriteDefinition over existing files: %v, want a usage error (never overwritten)", err)
	}

	// A damaged chunk of the NVRAM: verify names the file, ReadFile fails.
	xid, _ := repo.ParseID(m.File(repo.FileNVRAM).Index)
	x, err := r.LoadIndex(ctx, xid)
	if err != nil {
		t.Fatal(err)
	}
	chunk := filepath.Join(dir, "repo", "chunks", x.ID(1).String()[:2], x.ID(1).String())
	b, err := os.ReadFile(chunk)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(chunk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	vr, err := r.Verify(ctx, repo.VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	named := false
	for _, p := range vr.Problems {
		for _, a := range p.Affected {
			named = named || a.Backup == res.ID.String() && a.Disk == repo.FileNVRAM
		}
	}
	if !named {
		t.Fatalf("verify of a damaged NVRAM chunk: problems %+v, want one naming the backup's nvram", vr.Problems)
	}
	if _, err := restore.ReadFile(ctx, r, m, repo.FileNVRAM, 0); !errors.Is(err, errs.ErrCorrupt) && !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("ReadFile of a damaged file: %v, want ErrCorrupt", err)
	}
}
