package local

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/backendtest"
	"github.com/vmshadow/vmshadow/internal/repo/repotest"
)

func TestSuite(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backend.Backend {
		l, err := Create(filepath.Join(t.TempDir(), "repo"))
		if err != nil {
			t.Fatal(err)
		}
		return l
	})
}

func TestLayout(t *testing.T) {
	root := filepath.Join(t.TempDir(), "repo")
	l, err := Create(root)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := l.Put(ctx, backend.Handle{Kind: backend.KindChunks, Name: "abcdef"}, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := l.Put(ctx, backend.Handle{Kind: backend.KindConfig, Name: "config"}, []byte("c")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"chunks/ab/abcdef", "config"} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Errorf("expected %s: %v", p, err)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(root, "tmp")); len(ents) != 0 {
		t.Errorf("tmp/ not empty after writes: %d entries", len(ents))
	}
	if _, err := Create(root); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("Create over an existing repository: %v", err)
	}
	other := t.TempDir()
	os.WriteFile(filepath.Join(other, "precious"), []byte("x"), 0o600)
	if _, err := Create(other); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("Create in a non-empty directory: %v", err)
	}
	if _, err := Create(t.TempDir()); err != nil {
		t.Errorf("Create in an empty directory: %v", err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "none")); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("Open of a non-repository: %v", err)
	}
	if _, err := Open(root); err != nil {
		t.Errorf("Open: %v", err)
	}
}

func TestCleanTemp(t *testing.T) {
	root := filepath.Join(t.TempDir(), "repo")
	l, err := Create(root)
	if err != nil {
		t.Fatal(err)
	}
	old := filepath.Join(root, "tmp", "abc.1")
	young := filepath.Join(root, "tmp", "abc.2")
	os.WriteFile(old, []byte("partial"), 0o600)
	os.WriteFile(young, []byte("in flight"), 0o600)
	past := time.Now().Add(-48 * time.Hour)
	os.Chtimes(old, past, past)
	n, err := l.CleanTemp(context.Background(), 24*time.Hour)
	if err != nil || n != 1 {
		t.Fatalf("CleanTemp = %d, %v; want 1", n, err)
	}
	if _, err := os.Stat(young); err != nil {
		t.Errorf("young temp file removed: %v", err)
	}
}

// TestReadOnly uses a read-only bind of the directory when running as root
// (permissions do not stop root), else directory permissions.
func TestReadOnly(t *testing.T) {
	root := filepath.Join(t.TempDir(), "repo")
	l, err := Create(root)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	hd := backend.Handle{Kind: backend.KindChunks, Name: "ro01"}
	if err := l.Put(ctx, hd, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := l.Put(ctx, backend.Handle{Kind: backend.KindConfig, Name: "config"}, []byte("c")); err != nil {
		t.Fatal(err)
	}
	ro := repotest.ReadOnlyDir(t, root)
	r, err := Open(ro)
	if err != nil {
		t.Fatal(err)
	}
	err = r.Put(ctx, backend.Handle{Kind: backend.KindChunks, Name: "ro02"}, []byte("y"))
	if !errors.Is(err, backend.ErrReadOnly) {
		t.Fatalf("Put on read-only repository: %v, want ErrReadOnly", err)
	}
	if err := r.Delete(ctx, hd); !errors.Is(err, backend.ErrReadOnly) {
		t.Fatalf("Delete on read-only repository: %v, want ErrReadOnly", err)
	}
	if d, err := r.Get(ctx, hd, 0, -1); err != nil || string(d) != "x" {
		t.Fatalf("Get on read-only repository: %q %v", d, err)
	}
}
