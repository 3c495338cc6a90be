package restore

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// dirNames lists a directory.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// die simulates the restoring process being killed: its descriptors are
// closed (the kernel releases the lock), its files stay as they are.
func die(w ImageWriter) {
	switch w := w.(type) {
	case *rawFile:
		w.w.Close()
		w.f.Close()
	case *qcow2File:
		w.part.Close()
	}
}

// TestInterruptedRestoreLeavesNothing: while an image is written nothing
// exists under its final name; a restore that dies leaves only a hidden
// temporary file, which does not block the next restore to the same path
// (it is removed); the image appears complete under its name at Close.
func TestInterruptedRestoreLeavesNothing(t *testing.T) {
	data := bytes.Repeat([]byte("vmshadow"), 1<<16) // 512 KiB
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "sda."+format)
			w, err := Formats[format].Create(path, int64(len(data)))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.WriteAt(data[:len(data)/2], 0); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Lstat(path); err == nil {
				t.Fatalf("%s exists while its restore is half done", path)
			}
			die(w)
			if names := dirNames(t, dir); len(names) != 1 || names[0][0] != '.' {
				t.Fatalf("after a killed restore the directory holds %q, want one hidden temporary file", names)
			}
			// The rerun works and removes what the killed one left.
			w, err = Formats[format].Create(path, int64(len(data)))
			if err != nil {
				t.Fatalf("restore after a killed one: %v", err)
			}
			if _, err := w.WriteAt(data, 0); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if names := dirNames(t, dir); len(names) != 1 || names[0] != filepath.Base(path) {
				t.Fatalf("after the rerun the directory holds %q, want only %s", names, filepath.Base(path))
			}
			got := readImage(t, path, format)
			if !bytes.Equal(got, data) {
				t.Fatal("restored image differs")
			}
			// Abort leaves nothing at all.
			path2 := filepath.Join(dir, "sdb."+format)
			w, err = Formats[format].Create(path2, int64(len(data)))
			if err != nil {
				t.Fatal(err)
			}
			w.WriteAt(data[:4096], 0)
			w.(Aborter).Abort()
			if names := dirNames(t, dir); len(names) != 1 {
				t.Fatalf("after an aborted restore the directory holds %q", names)
			}
		})
	}
}

func readImage(t *testing.T, path, format string) []byte {
	t.Helper()
	if format == "raw" {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	testutil.NeedCommand(t, "qemu-img")
	raw := filepath.Join(t.TempDir(), "img.raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestPartialOfLiveRestoreKept: the temporary file of a restore still
// running (its lock held) is not taken for a stale one.
func TestPartialOfLiveRestoreKept(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "img")
	a, err := createPartial(path, os.O_WRONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer a.abort()
	b, err := createPartial(path, os.O_WRONLY)
	if err != nil {
		t.Fatal(err)
	}
	defer b.abort()
	if _, err := os.Stat(a.Name()); err != nil {
		t.Fatalf("a running restore's temporary file was removed: %v", err)
	}
	if a.Name() == b.Name() {
		t.Fatal("two restores share a temporary name")
	}
}

// TestCommitNeverReplaces: a file that appears under the final name while
// the image is written is left alone and the restore fails.
func TestCommitNeverReplaces(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "img")
	w, err := CreateRaw(path, 8192)
	if err != nil {
		t.Fatal(err)
	}
	w.WriteAt(bytes.Repeat([]byte{1}, 8192), 0)
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); !errors.Is(err, errs.ErrUsage) {
		t.Fatalf("commit over a file that appeared: %v, want a usage error", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "precious" {
		t.Fatalf("the file that appeared was replaced: %q", b)
	}
	if names := dirNames(t, dir); len(names) != 1 {
		t.Fatalf("directory holds %q", names)
	}
}
