package filerestore

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

var (
	helperMu  sync.Mutex
	helperRes *Helper
)

// BuildHelperForTest runs guest/fshelper/build.sh (cached) once per test
// binary and returns the helper.
func BuildHelperForTest(t testing.TB) *Helper {
	t.Helper()
	testutil.NeedCommand(t, "qemu-system-x86_64")
	helperMu.Lock()
	defer helperMu.Unlock()
	if helperRes != nil {
		return helperRes
	}
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
	cmd := exec.Command(filepath.Join(root, "guest", "fshelper", "build.sh"))
	cmd.Dir = root
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("guest/fshelper/build.sh: %v\n%s", err, stderr.String())
	}
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	h, err := FindHelper(lines[len(lines)-1])
	if err != nil {
		t.Fatal(err)
	}
	helperRes = h
	return h
}

// TestFile is a file of a test file system.
type TestFile struct {
	Path string // relative, slash-separated
	Type string // file (default), dir, symlink
	Data []byte // file content
	Link string // symlink target
	Mode os.FileMode
	UID  int
	GID  int
	Time time.Time
}

// TestTree returns a small tree of known files: directories, a symlink,
// owners, modes, times and a file of several MiB of random bytes (more
// than one read piece).
func TestTree(seed uint64) []TestFile {
	rng := rand.New(rand.NewPCG(seed, 7))
	big := make([]byte, 3<<20+12345)
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	t0 := time.Date(2025, 3, 14, 15, 9, 26, 0, time.UTC)
	return []TestFile{
		{Path: "etc", Type: "dir", Mode: 0o755, Time: t0},
		{Path: "etc/nginx", Type: "dir", Mode: 0o750, UID: 33, GID: 33, Time: t0.Add(time.Hour)},
		{Path: "etc/nginx/nginx.conf", Data: []byte("worker_processes 1;\nevents {}\n"), Mode: 0o640, UID: 33, GID: 33, Time: t0.Add(2 * time.Hour)},
		{Path: "etc/hostname", Data: []byte("restored\n"), Mode: 0o644, Time: t0.Add(3 * time.Hour)},
		{Path: "etc/link", Type: "symlink", Link: "nginx/nginx.conf", Time: t0.Add(4 * time.Hour)},
		{Path: "home", Type: "dir", Mode: 0o755, Time: t0},
		{Path: "home/user", Type: "dir", Mode: 0o700, UID: 1000, GID: 1000, Time: t0},
		{Path: "home/user/big.bin", Data: big, Mode: 0o600, UID: 1000, GID: 1000, Time: t0.Add(5 * time.Hour)},
		{Path: "home/user/empty", Data: []byte{}, Mode: 0o4755, UID: 1000, GID: 1000, Time: t0.Add(6 * time.Hour)},
	}
}

// WriteTree creates files under dir with their metadata.
func WriteTree(t testing.TB, dir string, files []TestFile) {
	t.Helper()
	for _, f := range files {
		p := filepath.Join(dir, filepath.FromSlash(f.Path))
		var err error
		switch f.Type {
		case "dir":
			err = os.MkdirAll(p, 0o755)
		case "symlink":
			err = os.Symlink(f.Link, p)
		default:
			err = os.WriteFile(p, f.Data, 0o600)
		}
		if err == nil {
			err = os.Lchown(p, f.UID, f.GID)
		}
		if err == nil && f.Type != "symlink" {
			err = os.Chmod(p, f.Mode|modeBits(f.Mode))
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	// Times last, deepest first (creating entries changes the parent's).
	for i := len(files) - 1; i >= 0; i-- {
		f := files[i]
		p := filepath.Join(dir, filepath.FromSlash(f.Path))
		if err := lutimes(p, f.Time); err != nil {
			t.Fatal(err)
		}
	}
}

func modeBits(m os.FileMode) os.FileMode {
	var b os.FileMode
	if m&0o4000 != 0 {
		b |= os.ModeSetuid
	}
	if m&0o2000 != 0 {
		b |= os.ModeSetgid
	}
	if m&0o1000 != 0 {
		b |= os.ModeSticky
	}
	return b
}

// TestPart is a partition of a test disk (or the whole disk when the
// table is "none").
type TestPart struct {
	SizeMiB int
	FSType  string // ext4, ext2, xfs, vfat, raw (Raw bytes written as they are), empty (zeros)
	Files   []TestFile
	Raw     []byte
	Label   string
}

// MakeTestDisk writes a raw disk image at path: a partition table
// ("gpt", "mbr" or "none") and the partitions' file systems holding
// their files, made without mounting (mkfs.ext4 -d, mtools for vfat,
// mkfs.xfs -p).
func MakeTestDisk(t testing.TB, path, table string, parts []TestPart) {
	t.Helper()
	testutil.NeedCommand(t, "sfdisk")
	testutil.NeedCommand(t, "mkfs.ext4")
	dir := t.TempDir()
	total := 2 // MiB: table and alignment, and the backup GPT
	for _, p := range parts {
		total += p.SizeMiB
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(total) << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	start := int64(1) << 20
	if table == "none" {
		if len(parts) != 1 {
			t.Fatal("MakeTestDisk: a disk without a table takes one part")
		}
		start = 0
	} else {
		var script strings.Builder
		label := map[string]string{"gpt": "gpt", "mbr": "dos"}[table]
		if label == "" {
			t.Fatalf("MakeTestDisk: table %q", table)
		}
		fmt.Fprintf(&script, "label: %s\n", label)
		for _, p := range parts {
			typ := "L"
			fmt.Fprintf(&script, "size=%dMiB, type=%s\n", p.SizeMiB, typ)
		}
		run(t, strings.NewReader(script.String()), "sfdisk", "-q", path)
	}
	for i, p := range parts {
		img := filepath.Join(dir, fmt.Sprintf("part%d", i))
		mkfs(t, img, dir, i, p)
		data, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		disk, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := disk.WriteAt(data, start); err != nil {
			t.Fatal(err)
		}
		disk.Close()
		start += int64(p.SizeMiB) << 20
	}
}

func mkfs(t testing.TB, img, dir string, i int, p TestPart) {
	t.Helper()
	src := filepath.Join(dir, fmt.Sprintf("src%d", i))
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	WriteTree(t, src, p.Files)
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(int64(p.SizeMiB) << 20)
	if p.FSType == "raw" {
		f.WriteAt(p.Raw, 0)
	}
	f.Close()
	switch p.FSType {
	case "ext4", "ext2":
		args := []string{"-F", "-q", "-t", p.FSType, "-d", src, "-E", "root_owner=0:0", "-U", "clear", "-b", "4096"}
		if p.Label != "" {
			args = append(args, "-L", p.Label)
		}
		run(t, nil, "mkfs."+p.FSType, append(args, img)...)
	case "vfat":
		testutil.NeedCommand(t, "mkfs.vfat")
		testutil.NeedCommand(t, "mcopy")
		run(t, nil, "mkfs.vfat", "-n", strings.ToUpper(p.Label + "X")[:len(p.Label+"X")-1], img)
		entries, _ := os.ReadDir(src)
		for _, e := range entries {
			run(t, nil, "mcopy", "-s", "-p", "-m", "-i", img, filepath.Join(src, e.Name()), "::/"+e.Name())
		}
	case "raw", "empty":
	default:
		t.Fatalf("MakeTestDisk: file system %q", p.FSType)
	}
}

func run(t testing.TB, stdin *strings.Reader, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = stdin
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}
