package main

import (
	"archive/tar"
	"archive/zip"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/filerestore"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/testutil"
	"github.com/vmshadow/vmshadow/internal/walcheck"
)

// These tests back up disk images holding partition tables and file
// systems with known files, then list and get those files through the
// helper VM (real QEMU, TCG).

func filesHelper(t *testing.T) string {
	t.Helper()
	testutil.SkipShort(t)
	return filerestore.BuildHelperForTest(t).Dir
}

// treeFiles maps a tree's paths to its files.
func treeFiles(tree []filerestore.TestFile) map[string]filerestore.TestFile {
	m := map[string]filerestore.TestFile{}
	for _, f := range tree {
		if f.Type == "" {
			f.Type = "file"
		}
		m["/"+f.Path] = f
	}
	return m
}

func filesOK(t *testing.T, env []string, args ...string) result {
	t.Helper()
	res := vmshadow(t, env, args...)
	if res.code != 0 {
		t.Fatalf("vmshadow %v: exit %d: %s\n%s", args, res.code, res.errorMessage(), res.stderr)
	}
	return res
}

func entries(res result, kind string) []map[string]any {
	var out []map[string]any
	for _, m := range res.msgs {
		if m["message_type"] == "status" && m["kind"] == kind {
			out = append(out, m)
		}
	}
	return out
}

// str is a JSON string field, "" when absent.
func str(v any) string {
	s, _ := v.(string)
	return s
}

// checkEntry compares a listed entry with the file it was made from.
func checkEntry(t *testing.T, e map[string]any, f filerestore.TestFile) {
	t.Helper()
	want := map[string]any{"type": f.Type, "uid": float64(f.UID), "gid": float64(f.GID),
		"mtime": f.Time.UTC().Format(time.RFC3339Nano)}
	if f.Type != "symlink" {
		want["mode"] = fmt.Sprintf("%04o", uint32(f.Mode))
	} else {
		want["link"] = f.Link
	}
	if f.Type == "file" {
		want["size"] = float64(len(f.Data))
	}
	for k, v := range want {
		if e[k] != v {
			t.Errorf("%s: %s = %v, want %v", e["path"], k, e[k], v)
		}
	}
}

// checkExtracted compares a file written by files get with its source.
func checkExtracted(t *testing.T, p string, f filerestore.TestFile) {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != f.UID || int(st.Gid) != f.GID {
		t.Errorf("%s: owner %d:%d, want %d:%d", p, st.Uid, st.Gid, f.UID, f.GID)
	}
	if !fi.ModTime().Equal(f.Time) {
		t.Errorf("%s: mtime %s, want %s", p, fi.ModTime(), f.Time)
	}
	switch f.Type {
	case "symlink":
		if l, err := os.Readlink(p); err != nil || l != f.Link {
			t.Errorf("%s: link %q (%v), want %q", p, l, err, f.Link)
		}
		return
	case "dir":
		if !fi.IsDir() {
			t.Errorf("%s: not a directory", p)
		}
	default:
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Equal(b, f.Data) {
			t.Errorf("%s: content differs (%d bytes, want %d; %v)", p, len(b), len(f.Data), err)
		}
	}
	if st.Mode&0o7777 != uint32(f.Mode) {
		t.Errorf("%s: mode %04o, want %04o", p, st.Mode&0o7777, uint32(f.Mode))
	}
}

// filesBackup makes the test disks and backs them up.
func filesBackup(t *testing.T, env []string, repoArg, dir string, disks map[string]string) string {
	t.Helper()
	args := []string{"backup", "--repo", repoArg, "--vm", "files-e2e"}
	names := make([]string, 0, len(disks))
	for n := range disks {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		args = append(args, "--disk", n+"="+disks[n])
	}
	return filesOK(t, env, args...).summary(t)["backup_id"].(string)
}

// TestFilesListAndGet: a GPT disk (ext4, vfat, an empty partition) and
// an MBR disk (ext2) in a local repository: files ls shows the file
// systems and exactly the files they were made with, files get returns
// them byte-identical with their metadata, into a directory, as tar and
// as zip; and the errors of bad locations.
func TestFilesListAndGet(t *testing.T) {
	helper := filesHelper(t)
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	env := pwEnv
	filesOK(t, env, "repo", "init", "--repo", r)
	tree1, tree2, tree3 := filerestore.TestTree(1), filerestore.TestTree(2)[:4], filerestore.TestTree(3)[:5]
	filerestore.MakeTestDisk(t, filepath.Join(dir, "a.img"), "gpt", []filerestore.TestPart{
		{SizeMiB: 16, FSType: "ext4", Files: tree1, Label: "root"},
		{SizeMiB: 8, FSType: "vfat", Files: tree2, Label: "efi"},
		{SizeMiB: 2, FSType: "empty"}})
	filerestore.MakeTestDisk(t, filepath.Join(dir, "b.img"), "mbr", []filerestore.TestPart{{SizeMiB: 8, FSType: "ext2", Files: tree3}})
	id := filesBackup(t, env, r, dir, map[string]string{"vda": filepath.Join(dir, "a.img"), "sdb": filepath.Join(dir, "b.img")})
	base := []string{"--repo", r, "--helper", helper, id}
	files := func(sub string, args ...string) []string {
		return append(append([]string{"files", sub}, base...), args...)
	}

	// The file systems.
	res := filesOK(t, env, files("ls")...)
	got := map[string]string{}
	for _, e := range entries(res, "filesystem") {
		got[e["fs"].(string)] = str(e["disk"]) + "|" + str(e["type"]) + str(e["table"]) + "|" + str(e["label"])
	}
	want := map[string]string{"vda": "vda|gpt|", "vda1": "vda|ext4|root", "vda2": "vda|vfat|EFI",
		"vda3": "vda||", "sdb": "sdb|mbr|", "sdb1": "sdb|ext2|"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("file systems:\n%v\nwant\n%v", got, want)
	}
	sum := res.summary(t)
	t.Logf("files ls: helper up in %.1fs, %v bytes (%v chunks) read from the repository", sum["boot_s"], sum["bytes_read"], sum["chunks_read"])
	if sum["bytes_read"].(float64) <= 0 {
		t.Errorf("summary says nothing was read: %v", sum)
	}

	// Exactly the files, recursively, with their metadata.
	res = filesOK(t, env, files("ls", "vda1:/", "-R")...)
	want1 := treeFiles(tree1)
	seen := map[string]bool{}
	for _, e := range entries(res, "entry") {
		p := e["path"].(string)
		if p == "/lost+found" {
			continue
		}
		f, ok := want1[p]
		if !ok {
			t.Errorf("files ls -R lists %s, which was never made", p)
			continue
		}
		seen[p] = true
		checkEntry(t, e, f)
	}
	if len(seen) != len(want1) {
		t.Errorf("files ls -R listed %d of the %d files: %v", len(seen), len(want1), seen)
	}
	// A file, and a directory without -R.
	res = filesOK(t, env, files("ls", "vda1:/etc/nginx/nginx.conf")...)
	if es := entries(res, "entry"); len(es) != 1 || es[0]["path"] != "/etc/nginx/nginx.conf" {
		t.Errorf("ls of a file: %v", es)
	}
	res = filesOK(t, env, files("ls", "sdb1:/etc")...)
	var names []string
	for _, e := range entries(res, "entry") {
		names = append(names, e["name"].(string))
	}
	if strings.Join(names, ",") != "hostname,link,nginx" {
		t.Errorf("ls sdb1:/etc: %v", names)
	}

	// get into a directory: a tree, a big file, a file of another disk.
	out := filepath.Join(dir, "out")
	res = filesOK(t, env, files("get", "vda1:/etc", "vda1:/home/user/big.bin", "sdb1:/etc/hostname", "--to", out)...)
	for p, f := range want1 {
		if strings.HasPrefix(p, "/etc") {
			checkExtracted(t, filepath.Join(out, p), f)
		}
	}
	checkExtracted(t, filepath.Join(out, "big.bin"), want1["/home/user/big.bin"])
	checkExtracted(t, filepath.Join(out, "hostname"), treeFiles(tree3)["/etc/hostname"])
	if s := res.summary(t); s["files"] != float64(4) || s["symlinks"] != float64(1) || s["dirs"] != float64(2) {
		t.Errorf("get summary %v", s)
	}
	// Never overwrites.
	res = vmshadow(t, env, files("get", "vda1:/etc/hostname", "--to", filepath.Join(out, "etc"))...)
	if res.code != 2 || !strings.Contains(res.errorMessage(), "already exists") {
		t.Errorf("get over an existing file: exit %d: %s", res.code, res.errorMessage())
	}

	// As a tar stream.
	cmd := exec.Command(bin, files("get", "vda1:/home", "--to", "-")...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("get --to -: %v\n%s", err, stderr.String())
	}
	tr := tar.NewReader(&stdout)
	n := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		f, ok := want1["/"+strings.TrimSuffix(h.Name, "/")]
		if !ok {
			t.Errorf("tar holds %s", h.Name)
			continue
		}
		n++
		data, _ := io.ReadAll(tr)
		if h.Uid != f.UID || h.Gid != f.GID || h.Mode != int64(f.Mode) || !h.ModTime.Equal(f.Time) || !bytes.Equal(data, f.Data) {
			t.Errorf("tar %s: uid %d gid %d mode %o mtime %s, %d bytes; want %+v", h.Name, h.Uid, h.Gid, h.Mode, h.ModTime, len(data), f)
		}
	}
	if n != 4 {
		t.Errorf("tar of /home holds %d entries, want 4", n)
	}

	// As zip, from the vfat partition.
	cmd = exec.Command(bin, files("get", "vda2:/etc", "--to", "-", "--format", "zip")...)
	cmd.Env = append(os.Environ(), env...)
	stdout.Reset()
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("get --format zip: %v\n%s", err, stderr.String())
	}
	zr, err := zip.NewReader(bytes.NewReader(stdout.Bytes()), int64(stdout.Len()))
	if err != nil {
		t.Fatal(err)
	}
	want2 := treeFiles(tree2)
	zn := 0
	for _, zf := range zr.File {
		f, ok := want2["/"+strings.TrimSuffix(zf.Name, "/")]
		if !ok {
			t.Errorf("zip holds %s", zf.Name)
			continue
		}
		zn++
		if f.Type == "file" {
			rc, _ := zf.Open()
			data, _ := io.ReadAll(rc)
			rc.Close()
			if !bytes.Equal(data, f.Data) {
				t.Errorf("zip %s: content differs", zf.Name)
			}
		}
	}
	if zn != 4 {
		t.Errorf("zip of vda2:/etc holds %d entries, want 4", zn)
	}

	// Bad locations.
	for _, c := range []struct {
		loc  string
		code int
		msg  string
	}{
		{"vda1:/etc/nope", 6, "no such file"},
		{"vda9:/", 6, "no file system \"vda9\""},
		{"/etc", 2, "several file systems"},
		{"vda3:/", 9, "vda3: only zeros"},
		{"vda1:etc", 2, "must be absolute"},
	} {
		res := vmshadow(t, env, files("ls", c.loc)...)
		if res.code != c.code || !strings.Contains(res.errorMessage(), c.msg) {
			t.Errorf("ls %s: exit %d %q, want exit %d and %q", c.loc, res.code, res.errorMessage(), c.code, c.msg)
		}
	}
}

// TestFilesS3 lists and gets files of a backup in an S3 repository.
func TestFilesS3(t *testing.T) {
	helper := filesHelper(t)
	s := newS3Rig(t)
	r := s.url("files", false)
	dir := t.TempDir()
	s.ok("repo", "init", "--repo", r)
	tree := filerestore.TestTree(4)
	filerestore.MakeTestDisk(t, filepath.Join(dir, "a.img"), "gpt", []filerestore.TestPart{{SizeMiB: 16, FSType: "ext4", Files: tree}})
	id := s.ok("backup", "--repo", r, "--vm", "files-s3", "--disk", "vda="+filepath.Join(dir, "a.img"))["backup_id"].(string)
	res := s.run(nil, "files", "ls", "--repo", r, "--helper", helper, id, "/home/user")
	if res.code != 0 {
		t.Fatalf("files ls: exit %d: %s", res.code, res.errorMessage())
	}
	want := treeFiles(tree)
	es := entries(res, "entry")
	if len(es) != 2 {
		t.Fatalf("ls /home/user: %v", es)
	}
	for _, e := range es {
		checkEntry(t, e, want[e["path"].(string)])
	}
	out := filepath.Join(dir, "out")
	s.ok("files", "get", "--repo", r, "--helper", helper, id, "vda1:/home/user/big.bin", "--to", out)
	checkExtracted(t, filepath.Join(out, "big.bin"), want["/home/user/big.bin"])
}

// TestFilesCorruptChunk: a chunk under a requested file is damaged in the
// repository: files get says so and exits 8, writes nothing of that file,
// and other files still come out.
func TestFilesCorruptChunk(t *testing.T) {
	helper := filesHelper(t)
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	filesOK(t, nil, "repo", "init", "--repo", r, "--encryption", "none", "--chunk-size", "65536")
	tree := filerestore.TestTree(5)
	img := filepath.Join(dir, "a.img")
	filerestore.MakeTestDisk(t, img, "mbr", []filerestore.TestPart{{SizeMiB: 16, FSType: "ext4", Files: tree}})
	id := filesBackup(t, nil, r, dir, map[string]string{"vda": img})
	big := treeFiles(tree)["/home/user/big.bin"].Data

	// The chunks of the disk wholly inside big.bin: damage the middle one.
	disk, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	var inside [][]byte
	for off := 0; off+65536 <= len(disk); off += 65536 {
		c := disk[off : off+65536]
		if bytes.Contains(big, c) {
			inside = append(inside, c)
		}
	}
	if len(inside) < 10 {
		t.Fatalf("only %d chunks of the disk lie inside big.bin", len(inside))
	}
	be, err := local.Open(r)
	if err != nil {
		t.Fatal(err)
	}
	rp, err := repo.Open(context.Background(), be, nil)
	if err != nil {
		t.Fatal(err)
	}
	cid := rp.HashChunk(inside[len(inside)/2]).String()
	rp.Close()
	var chunk string
	filepath.Walk(filepath.Join(r, "chunks"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && filepath.Base(p) == cid {
			chunk = p
		}
		return nil
	})
	if chunk == "" {
		t.Fatalf("chunk %s not found in the repository", cid)
	}
	data, _ := os.ReadFile(chunk)
	data[len(data)/2] ^= 0x55
	os.WriteFile(chunk, data, 0o600)

	// As a stream: exit 8, and no complete archive.
	cmd := exec.Command(bin, "files", "get", "--repo", r, "--helper", helper, id, "vda1:/home/user/big.bin", "--to", "-")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 8 || !strings.Contains(stderr.String(), "corrupt") {
		t.Fatalf("get --to - over a damaged chunk: %v: %s", err, stderr.String())
	}
	tr := tar.NewReader(&stdout)
	if _, err := tr.Next(); err == nil {
		if _, err := io.Copy(io.Discard, tr); err == nil {
			t.Errorf("the tar stream holds all of big.bin although a chunk of it is damaged")
		}
	}
	// Into a directory.
	out := filepath.Join(dir, "out")
	res := vmshadow(t, nil, "files", "get", "--repo", r, "--helper", helper, id, "vda1:/etc/hostname", "vda1:/home/user/big.bin", "--to", out)
	// The damaged chunk was quarantined by the first read: now it is missing.
	if res.code != 6 || !strings.Contains(res.errorMessage(), "big.bin") || !strings.Contains(res.errorMessage(), "is missing") {
		t.Fatalf("get of a file over a damaged chunk: exit %d: %s\n%s", res.code, res.errorMessage(), res.stderr)
	}
	if _, err := os.Lstat(filepath.Join(out, "big.bin")); err == nil {
		t.Errorf("big.bin was written although its data failed verification")
	}
	checkExtracted(t, filepath.Join(out, "hostname"), treeFiles(tree)["/etc/hostname"])
}

// TestFilesUnrecognisedAndHostile: a partition of random bytes and an
// ext4 file system whose metadata is scrambled. The host only reports:
// what was found where nothing is recognised, the helper's error for the
// file system that does not mount or read.
func TestFilesUnrecognisedAndHostile(t *testing.T) {
	helper := filesHelper(t)
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	filesOK(t, nil, "repo", "init", "--repo", r, "--encryption", "none")
	junk := bytes.Repeat([]byte("not a file system "), 1000)
	img := filepath.Join(dir, "a.img")
	filerestore.MakeTestDisk(t, img, "gpt", []filerestore.TestPart{
		{SizeMiB: 8, FSType: "ext4", Files: filerestore.TestTree(6)[:4]},
		{SizeMiB: 2, FSType: "raw", Raw: junk}})
	// Scramble the ext4 metadata after its superblock: group descriptors,
	// bitmaps, inode table (the first 2 MiB of the partition but the
	// superblock's 4 KiB).
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	garbage := bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef, 0x01, 0x00, 0xff, 0x7f}, (2<<20-4096)/8)
	if _, err := f.WriteAt(garbage, 1<<20+4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	whole := filepath.Join(dir, "b.img")
	os.WriteFile(whole, bytes.Repeat(junk, 200), 0o600)
	id := filesBackup(t, nil, r, dir, map[string]string{"vda": img, "vdb": whole})

	res := filesOK(t, nil, "files", "ls", "--repo", r, "--helper", helper, id)
	found := map[string]string{}
	for _, e := range entries(res, "filesystem") {
		found[e["fs"].(string)] = str(e["type"]) + "|" + str(e["found"])
	}
	if found["vda1"] != "ext4|" || !strings.HasPrefix(found["vda2"], "|no known superblock (first bytes 6e6f7420") ||
		!strings.HasPrefix(found["vdb"], "|no known superblock") {
		t.Errorf("file systems found: %v", found)
	}
	res = vmshadow(t, nil, "files", "ls", "--repo", r, "--helper", helper, id, "vda1:/", "-R")
	if res.code == 0 || res.errorMessage() == "" || strings.Contains(res.stderr, "panic") {
		t.Fatalf("ls of a scrambled ext4: exit %d: %q %s", res.code, res.errorMessage(), res.stderr)
	}
	t.Logf("scrambled ext4: exit %d: %s", res.code, res.errorMessage())
	res = vmshadow(t, nil, "files", "ls", "--repo", r, "--helper", helper, "--disk", "vdb", id, "/")
	if res.code != 6 || !strings.Contains(res.errorMessage(), "no file system recognised") || !strings.Contains(res.errorMessage(), "vdb: no known superblock") {
		t.Errorf("ls of a disk without a file system: exit %d: %s", res.code, res.errorMessage())
	}
}

// TestFilesHelperFailures: a missing helper, one QEMU cannot boot, and one
// that does not answer in time are reported with why.
func TestFilesHelperFailures(t *testing.T) {
	helper := filesHelper(t)
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	filesOK(t, nil, "repo", "init", "--repo", r, "--encryption", "none")
	img := filepath.Join(dir, "a.img")
	filerestore.MakeTestDisk(t, img, "none", []filerestore.TestPart{{SizeMiB: 4, FSType: "ext4", Files: filerestore.TestTree(7)[:1]}})
	id := filesBackup(t, nil, r, dir, map[string]string{"vda": img})

	res := vmshadow(t, nil, "files", "ls", "--repo", r, "--helper", filepath.Join(dir, "nohelper"), id)
	if res.code != 9 || !strings.Contains(res.errorMessage(), "fshelper/build.sh") {
		t.Errorf("missing helper: exit %d: %s", res.code, res.errorMessage())
	}
	bad := filepath.Join(dir, "badhelper")
	os.Mkdir(bad, 0o755)
	os.WriteFile(filepath.Join(bad, "vmlinux"), []byte("not a kernel"), 0o644)
	os.WriteFile(filepath.Join(bad, "initrd.img"), []byte("not an initramfs"), 0o644)
	res = vmshadow(t, nil, "files", "ls", "--repo", r, "--helper", bad, id)
	if res.code != 9 || !strings.Contains(res.errorMessage(), "QEMU exited") {
		t.Errorf("unbootable helper: exit %d: %s", res.code, res.errorMessage())
	}
	res = vmshadow(t, nil, "files", "ls", "--repo", r, "--helper", helper, "--boot-timeout", "1s", id)
	if res.code != 5 || !strings.Contains(res.errorMessage(), "did not come up within 1s") {
		t.Errorf("helper slower than --boot-timeout: exit %d: %s", res.code, res.errorMessage())
	}
	// The whole disk is the file system: found without a name.
	res = filesOK(t, nil, "files", "ls", "--repo", r, "--helper", helper, id, "/")
	if es := entries(res, "entry"); len(es) != 2 || es[0]["path"] != "/etc" || es[1]["path"] != "/lost+found" {
		t.Errorf("ls / of a whole-disk ext4: %v", es)
	}
}

// TestFilesLVMXfsNTFS: an LVM volume group on an MBR partition (an ext4
// and an xfs logical volume), xfs on a GPT partition and NTFS on a whole
// disk, through the CLI.
func TestFilesLVMXfsNTFS(t *testing.T) {
	helper := filesHelper(t)
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	filesOK(t, nil, "repo", "init", "--repo", r, "--encryption", "none")
	tree := filerestore.TestTree(9)
	vg := fmt.Sprintf("vmsfcli%d", time.Now().UnixNano()%1000000)
	filerestore.MakeTestDisk(t, filepath.Join(dir, "a.img"), "mbr", []filerestore.TestPart{{SizeMiB: 72, FSType: "lvm", VG: vg, LVs: []filerestore.TestPart{
		{Name: "root", SizeMiB: 16, FSType: "ext4", Files: tree},
		{Name: "srv", SizeMiB: 40, FSType: "xfs", Files: tree[:4]}}}})
	filerestore.MakeTestDisk(t, filepath.Join(dir, "b.img"), "gpt", []filerestore.TestPart{{SizeMiB: 40, FSType: "xfs", Files: tree[5:], Label: "home"}})
	hello := filerestore.TestFile{Path: "hello.txt", Type: "file", Data: []byte("hello from NTFS\n")}
	filerestore.MakeTestDisk(t, filepath.Join(dir, "c.img"), "none", []filerestore.TestPart{{SizeMiB: 16, FSType: "ntfs", Files: []filerestore.TestFile{hello}, Label: "win"}})
	id := filesBackup(t, nil, r, dir, map[string]string{"sda": filepath.Join(dir, "a.img"), "sdb": filepath.Join(dir, "b.img"), "sdc": filepath.Join(dir, "c.img")})
	base := []string{"--repo", r, "--helper", helper, id}
	files := func(sub string, args ...string) []string {
		return append(append([]string{"files", sub}, base...), args...)
	}
	res := filesOK(t, nil, files("ls")...)
	got := map[string]string{}
	for _, e := range entries(res, "filesystem") {
		got[e["fs"].(string)] = str(e["type"])
	}
	want := map[string]string{"sda": "", "sda1": "LVM2_member", "lvm:" + vg + "/root": "ext4", "lvm:" + vg + "/srv": "xfs", "sdb": "", "sdb1": "xfs", "sdc": "ntfs"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("file systems %v, want %v", got, want)
	}
	out := filepath.Join(dir, "out")
	filesOK(t, nil, files("get", "lvm:"+vg+"/root:/etc", "sdc:/hello.txt", "--to", out)...)
	all := treeFiles(tree)
	for p, f := range all {
		if strings.HasPrefix(p, "/etc") {
			checkExtracted(t, filepath.Join(out, p), f)
		}
	}
	if b, err := os.ReadFile(filepath.Join(out, "hello.txt")); err != nil || !bytes.Equal(b, hello.Data) {
		t.Errorf("hello.txt from NTFS: %q %v", b, err)
	}
	res = filesOK(t, nil, files("ls", "sdb1:/home/user", "-R")...)
	var paths []string
	for _, e := range entries(res, "entry") {
		paths = append(paths, e["path"].(string))
		f := all[e["path"].(string)]
		if e["type"] != f.Type || e["uid"] != float64(f.UID) || (f.Type == "file" && e["size"] != float64(len(f.Data))) {
			t.Errorf("xfs entry %v, want %+v", e, f)
		}
	}
	if strings.Join(paths, ",") != "/home/user/big.bin,/home/user/empty" {
		t.Errorf("ls -R sdb1:/home/user: %v", paths)
	}
	res = vmshadow(t, nil, files("ls", "lvm:"+vg+"/nope:/")...)
	if res.code != 6 || !strings.Contains(res.errorMessage(), "lvm:"+vg+"/root") {
		t.Errorf("ls of a missing logical volume: exit %d: %s", res.code, res.errorMessage())
	}
}

// TestFilesFromLiveGuestBackup: a live, filesystem-consistent backup of
// the real test guest while its workload writes; files get returns the
// workload's log from the backed-up ext4 data disk, and the log checks
// complete (no torn record) up to a record.
func TestFilesFromLiveGuestBackup(t *testing.T) {
	helper := filesHelper(t)
	g := startGuest(t, "vmshadow.nohook=1")
	g.waitRecords(20)
	res := g.backup("--require", "filesystem")
	if res.code != 0 {
		t.Fatalf("backup: exit %d: %s", res.code, res.errorMessage())
	}
	id := res.summary(t)["backup_id"].(string)
	res = filesOK(t, g.env, "files", "ls", "--repo", g.repo, "--helper", helper, id)
	var fsName string
	for _, e := range entries(res, "filesystem") {
		if e["type"] == "ext4" {
			fsName = e["fs"].(string)
		}
	}
	if fsName == "" {
		t.Fatalf("no ext4 file system in the guest's backup: %v", entries(res, "filesystem"))
	}
	res = filesOK(t, g.env, "files", "ls", "--repo", g.repo, "--helper", helper, id, fsName+":/wal.log")
	es := entries(res, "entry")
	if len(es) != 1 || es[0]["type"] != "file" || es[0]["size"].(float64) <= 0 {
		t.Fatalf("ls %s:/wal.log: %v", fsName, es)
	}
	out := t.TempDir()
	filesOK(t, g.env, "files", "get", "--repo", g.repo, "--helper", helper, id, fsName+":/wal.log", "--to", out)
	fi, err := os.Stat(filepath.Join(out, "wal.log"))
	if err != nil || fi.Size() != int64(es[0]["size"].(float64)) {
		t.Fatalf("wal.log: %v, %v bytes, want %v", err, fi, es[0]["size"])
	}
	wal, err := walcheck.CheckFile(filepath.Join(out, "wal.log"))
	if err != nil {
		t.Fatalf("the workload's log out of the backup is damaged: %v", err)
	}
	if wal.LastSeq == 0 || wal.TrailingPartial {
		t.Errorf("the log out of the backup: last record %d, torn %v", wal.LastSeq, wal.TrailingPartial)
	}
	t.Logf("wal.log from the backup: %d records, %d bytes", wal.LastSeq, fi.Size())
}
