package filerestore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/fsproto"
	"github.com/vmshadow/vmshadow/internal/nbd"
)

func fileDisk(t *testing.T, name, path string) Disk {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	e, err := nbd.NewFileExport(f)
	if err != nil {
		t.Fatal(err)
	}
	return Disk{Name: name, Export: e}
}

// TestSessionPartitionsAndFiles boots the helper with a GPT disk (ext4 and
// an empty partition) and an MBR disk (ext2), and checks the inventory,
// listings and file bytes against the files the disks were made with.
func TestSessionPartitionsAndFiles(t *testing.T) {
	h := BuildHelperForTest(t)
	dir := t.TempDir()
	tree := TestTree(1)
	MakeTestDisk(t, filepath.Join(dir, "a.img"), "gpt", []TestPart{{SizeMiB: 16, FSType: "ext4", Files: tree, Label: "root"}, {SizeMiB: 2, FSType: "empty"}})
	MakeTestDisk(t, filepath.Join(dir, "b.img"), "mbr", []TestPart{{SizeMiB: 8, FSType: "ext2", Files: tree[:4]}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, err := Start(ctx, []Disk{fileDisk(t, "vda", filepath.Join(dir, "a.img")), fileDisk(t, "sdb", filepath.Join(dir, "b.img"))}, Options{Helper: h})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	t.Logf("helper booted in %s (kernel %s)", s.Boot, s.Kernel)
	got := map[string]string{}
	for _, f := range s.FS {
		got[f.Name] = f.Type + "|" + f.Table + "|" + f.Label
	}
	want := map[string]string{"vda": "|gpt|", "vda1": "ext4||root", "vda2": "||", "sdb": "|mbr|", "sdb1": "ext2||"}
	if len(got) != len(want) {
		t.Fatalf("file systems %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %q, want %q", k, got[k], v)
		}
	}
	if _, err := s.Find(""); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("Find of no name with two file systems: %v, want a usage error", err)
	}
	if _, err := s.Find("vda2"); !errors.Is(err, errs.ErrUnsupported) {
		t.Errorf("Find(vda2), an empty partition: %v, want unsupported", err)
	}
	fs, err := s.Find("vda1")
	if err != nil {
		t.Fatal(err)
	}
	for _, tf := range tree {
		e, err := s.Stat(ctx, fs, "/"+tf.Path)
		if err != nil {
			t.Fatal(err)
		}
		typ := tf.Type
		if typ == "" {
			typ = "file"
		}
		if e.Type != typ || e.UID != uint32(tf.UID) || e.GID != uint32(tf.GID) || e.Mtime != tf.Time.UnixNano() || e.Link != tf.Link ||
			(typ != "symlink" && e.Mode != uint32(tf.Mode)) || (typ == "file" && e.Size != int64(len(tf.Data))) {
			t.Errorf("%s: %+v, want %+v", tf.Path, *e, tf)
		}
		if typ == "file" {
			var b bytes.Buffer
			if err := s.ReadFile(ctx, fs, "/"+tf.Path, e.Size, &b); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b.Bytes(), tf.Data) {
				t.Errorf("%s: content differs", tf.Path)
			}
		}
	}
	var names []string
	if err := s.List(ctx, fs, "/etc", func(e fsproto.Entry) error { names = append(names, e.Name); return nil }); err != nil {
		t.Fatal(err)
	}
	if !sort.StringsAreSorted(names) || len(names) != 3 || names[0] != "hostname" || names[1] != "link" || names[2] != "nginx" {
		t.Errorf("list /etc: %v", names)
	}
	if _, err := s.Stat(ctx, fs, "/etc/nope"); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("stat of a missing file: %v, want not found", err)
	}
	if err := s.List(ctx, fs, "/etc/hostname", func(fsproto.Entry) error { return nil }); !errors.Is(err, errs.ErrNotFound) {
		t.Errorf("list of a file: %v, want not found (not a directory)", err)
	}
}

// TestSessionMoreFileSystems: xfs on GPT, LVM (an ext4 and an xfs
// logical volume) on MBR, NTFS on a whole disk, btrfs on GPT.
func TestSessionMoreFileSystems(t *testing.T) {
	h := BuildHelperForTest(t)
	dir := t.TempDir()
	tree := TestTree(8)
	vg := fmt.Sprintf("vmsf%d", time.Now().UnixNano()%1000000)
	MakeTestDisk(t, filepath.Join(dir, "a.img"), "gpt", []TestPart{{SizeMiB: 40, FSType: "xfs", Files: tree, Label: "data"}})
	MakeTestDisk(t, filepath.Join(dir, "b.img"), "mbr", []TestPart{{SizeMiB: 72, FSType: "lvm", VG: vg, LVs: []TestPart{
		{Name: "root", SizeMiB: 16, FSType: "ext4", Files: tree},
		{Name: "srv", SizeMiB: 40, FSType: "xfs", Files: tree[:4]}}}})
	ntfsFiles := []TestFile{{Path: "hello.txt", Data: []byte("hello from NTFS\n")}, {Path: "big.bin", Data: tree[7].Data}}
	MakeTestDisk(t, filepath.Join(dir, "c.img"), "none", []TestPart{{SizeMiB: 16, FSType: "ntfs", Files: ntfsFiles, Label: "win"}})
	MakeTestDisk(t, filepath.Join(dir, "d.img"), "gpt", []TestPart{{SizeMiB: 128, FSType: "btrfs", Files: tree, Label: "bt"}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, err := Start(ctx, []Disk{fileDisk(t, "vda", filepath.Join(dir, "a.img")), fileDisk(t, "vdb", filepath.Join(dir, "b.img")),
		fileDisk(t, "vdc", filepath.Join(dir, "c.img")), fileDisk(t, "vdd", filepath.Join(dir, "d.img"))}, Options{Helper: h})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, n := range s.Notes {
		t.Logf("note: %s", n)
	}
	got := map[string]string{}
	for _, f := range s.FS {
		got[f.Name] = f.Type
	}
	want := map[string]string{"vda": "", "vda1": "xfs", "vdb": "", "vdb1": "LVM2_member", "lvm:" + vg + "/root": "ext4", "lvm:" + vg + "/srv": "xfs", "vdc": "ntfs", "vdd": "", "vdd1": "btrfs"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("file systems %v, want %v", got, want)
	}
	check := func(fsName string, files []TestFile, times bool) {
		t.Helper()
		fs, err := s.Find(fsName)
		if err != nil {
			t.Fatal(err)
		}
		for _, tf := range files {
			e, err := s.Stat(ctx, fs, "/"+tf.Path)
			if err != nil {
				t.Fatalf("%s: %v", fsName, err)
			}
			typ := cmpOr(tf.Type, "file")
			if e.Type != typ || e.Link != tf.Link || (times && e.Mtime != tf.Time.UnixNano()) ||
				(fsName != "vdc" && (e.UID != uint32(tf.UID) || e.GID != uint32(tf.GID) || (typ != "symlink" && e.Mode != uint32(tf.Mode)))) {
				t.Errorf("%s:%s: %+v, want %+v", fsName, tf.Path, *e, tf)
			}
			if typ == "file" {
				var b bytes.Buffer
				if err := s.ReadFile(ctx, fs, "/"+tf.Path, e.Size, &b); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(b.Bytes(), tf.Data) {
					t.Errorf("%s:%s: content differs", fsName, tf.Path)
				}
			}
		}
	}
	check("vda1", tree, false) // mkfs.xfs -p sets no times
	check("lvm:"+vg+"/root", tree, true)
	check("lvm:"+vg+"/srv", tree[:4], false)
	check("vdc", ntfsFiles, false)
	check("vdd1", tree, true)
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// TestSessionLongListing: a directory whose entries do not fit one frame
// (1200 symlinks with 4085-byte targets: more than 4 MiB of JSON) is
// listed in pages, completely.
func TestSessionLongListing(t *testing.T) {
	h := BuildHelperForTest(t)
	dir := t.TempDir()
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	files := []TestFile{{Path: "links", Type: "dir", Mode: 0o755, Time: t0}}
	for i := 0; i < 1200; i++ {
		target := fmt.Sprintf("%04d/%s", i, strings.Repeat("x", 4080))
		files = append(files, TestFile{Path: fmt.Sprintf("links/l%04d", i), Type: "symlink", Link: target, Time: t0})
	}
	MakeTestDisk(t, filepath.Join(dir, "a.img"), "gpt", []TestPart{{SizeMiB: 32, FSType: "ext4", Files: files}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, err := Start(ctx, []Disk{fileDisk(t, "vda", filepath.Join(dir, "a.img"))}, Options{Helper: h, RequestTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fs, err := s.Find("vda1")
	if err != nil {
		t.Fatal(err)
	}
	i := 0
	err = s.List(ctx, fs, "/links", func(e fsproto.Entry) error {
		if want := files[i+1]; e.Name != filepath.Base(want.Path) || e.Link != want.Link {
			return fmt.Errorf("entry %d: %s -> %.10s..., want %s -> %.10s...", i, e.Name, e.Link, want.Path, want.Link)
		}
		i++
		return nil
	})
	if err != nil || i != 1200 {
		t.Fatalf("listed %d of 1200 entries: %v", i, err)
	}
}
