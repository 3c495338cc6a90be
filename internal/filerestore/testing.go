package filerestore

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
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
	testutil.SkipShort(t)
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
	// FSType: ext4, ext2, xfs, vfat, btrfs, ntfs (files in the root only), lvm
	// (an LVM physical volume of volume group VG holding LVs), raw (Raw
	// bytes written as they are), empty (zeros).
	FSType string
	Files  []TestFile
	Raw    []byte
	Label  string
	// LVM: the volume group and its logical volumes (Name, SizeMiB,
	// FSType, Files of each).
	VG  string
	LVs []TestPart
	// Name of a logical volume.
	Name string
}

// MakeTestDisk writes a raw disk image at path: a partition table
// ("gpt", "mbr" or "none") and the partitions' file systems holding
// their files, made without mounting (mkfs.ext4 -d, mtools for vfat,
// mkfs.xfs -p).
func MakeTestDisk(t testing.TB, path, table string, parts []TestPart) {
	t.Helper()
	testutil.SkipShort(t)
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
		disk, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		copySparse(t, disk, img, start)
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
	case "xfs":
		testutil.NeedCommand(t, "mkfs.xfs")
		proto := filepath.Join(dir, fmt.Sprintf("proto%d", i))
		if err := os.WriteFile(proto, []byte(xfsProto(t, src)), 0o600); err != nil {
			t.Fatal(err)
		}
		args := []string{"-q", "-f", "-p", proto}
		if p.Label != "" {
			args = append(args, "-L", p.Label)
		}
		// The fstests variables let mkfs.xfs make a file system under 300 MB.
		runEnv(t, []string{"TEST_DIR=1", "TEST_DEV=1", "QA_CHECK_FS=1"}, nil, "mkfs.xfs", append(args, img)...)
	case "ntfs":
		testutil.NeedCommand(t, "mkntfs")
		testutil.NeedCommand(t, "ntfscp")
		run(t, nil, "mkntfs", "-F", "-Q", "-q", "-L", p.Label, img)
		for _, f := range p.Files {
			if f.Type != "" && f.Type != "file" || strings.Contains(f.Path, "/") {
				t.Fatalf("MakeTestDisk: ntfs takes files in its root only, not %s", f.Path)
			}
			run(t, nil, "ntfscp", "-f", "-q", img, filepath.Join(src, f.Path), "/"+f.Path)
		}
	case "btrfs":
		testutil.NeedCommand(t, "mkfs.btrfs")
		args := []string{"-q", "-r", src}
		if p.Label != "" {
			args = append(args, "-L", p.Label)
		}
		run(t, nil, "mkfs.btrfs", append(args, img)...)
	case "lvm":
		makeLVM(t, img, dir, i, p)
	case "raw", "empty":
	default:
		t.Fatalf("MakeTestDisk: file system %q", p.FSType)
	}
}

func run(t testing.TB, stdin *strings.Reader, name string, args ...string) {
	t.Helper()
	runEnv(t, nil, stdin, name, args...)
}

func runEnv(t testing.TB, env []string, stdin *strings.Reader, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	if stdin != nil {
		cmd.Stdin = stdin
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// xfsProto returns the mkfs.xfs prototype file of the tree under src.
func xfsProto(t testing.TB, src string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("/dev/null\n0 0\n")
	mode := func(fi os.FileInfo) string {
		st := fi.Sys().(*syscall.Stat_t)
		c := "-"
		switch {
		case fi.IsDir():
			c = "d"
		case fi.Mode()&os.ModeSymlink != 0:
			c = "l"
		}
		u, g := "-", "-"
		if st.Mode&0o4000 != 0 {
			u = "u"
		}
		if st.Mode&0o2000 != 0 {
			g = "g"
		}
		return fmt.Sprintf("%s%s%s%03o %d %d", c, u, g, st.Mode&0o777, st.Uid, st.Gid)
	}
	var walk func(dir string)
	walk = func(dir string) {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			p := filepath.Join(dir, e.Name())
			fi, err := os.Lstat(p)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case fi.IsDir():
				fmt.Fprintf(&b, "%s %s\n", e.Name(), mode(fi))
				walk(p)
				b.WriteString("$\n")
			case fi.Mode()&os.ModeSymlink != 0:
				l, _ := os.Readlink(p)
				fmt.Fprintf(&b, "%s %s %s\n", e.Name(), mode(fi), l)
			default:
				fmt.Fprintf(&b, "%s %s %s\n", e.Name(), mode(fi), p)
			}
		}
	}
	fi, err := os.Lstat(src)
	if err != nil {
		t.Fatal(err)
	}
	b.WriteString(mode(fi) + "\n")
	walk(src)
	b.WriteString("$\n")
	return b.String()
}

// makeLVM makes img an LVM physical volume of volume group p.VG holding
// p.LVs, each with its file system. The host's LVM tools write the
// metadata through a loop device; no volume is activated (the host needs
// no device-mapper) and no metadata backup is kept on the host.
func makeLVM(t testing.TB, img, dir string, i int, p TestPart) {
	t.Helper()
	testutil.NeedCommand(t, "lvm")
	testutil.NeedCommand(t, "losetup")
	env := []string{"LVM_SUPPRESS_FD_WARNINGS=1"}
	cfg := "backup { backup = 0 archive = 0 } devices { use_devicesfile = 0 }"
	dev := strings.TrimSpace(runEnv(t, nil, nil, "losetup", "--show", "-f", img))
	detached := false
	detach := func() {
		if !detached {
			exec.Command("losetup", "-d", dev).Run()
			detached = true
		}
	}
	defer detach()
	lvm := func(args ...string) string {
		return runEnv(t, env, nil, "lvm", append([]string{args[0], "--config", cfg}, args[1:]...)...)
	}
	lvm("pvcreate", "-q", "-y", dev)
	lvm("vgcreate", "-q", "-s", "1m", p.VG, dev)
	for _, lv := range p.LVs {
		lvm("lvcreate", "--driverloaded", "n", "-q", "-y", "-an", "-Zn", "-L", fmt.Sprintf("%dm", lv.SizeMiB), "-n", lv.Name, p.VG)
	}
	var peStart int64
	fmt.Sscan(strings.TrimSpace(lvm("pvs", "--noheadings", "-o", "pe_start", "--units", "b", "--nosuffix", dev)), &peStart)
	segs := lvm("lvs", "--noheadings", "--separator", "|", "-o", "lv_name,seg_pe_ranges", p.VG)
	detach()
	start := map[string]int64{}
	for _, line := range strings.Split(segs, "\n") {
		name, rng, ok := strings.Cut(strings.TrimSpace(line), "|")
		if !ok {
			continue
		}
		var first int64
		_, pe, _ := strings.Cut(rng, ":")
		fmt.Sscanf(pe, "%d-", &first)
		start[name] = peStart + first<<20
	}
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for j, lv := range p.LVs {
		off, ok := start[lv.Name]
		if !ok || peStart == 0 {
			t.Fatalf("logical volume %s: no segment in %q (pe_start %d)", lv.Name, segs, peStart)
		}
		lvImg := filepath.Join(dir, fmt.Sprintf("lv%d-%d", i, j))
		mkfs(t, lvImg, dir, 100*(i+1)+j, lv)
		copySparse(t, f, lvImg, off)
	}
}

// copySparse writes the file src into dst at off, skipping the MiBs of
// zeros (dst is a sparse file of zeros there).
func copySparse(t testing.TB, dst *os.File, src string, off int64) {
	t.Helper()
	f, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for pos := int64(0); ; pos += int64(len(buf)) {
		n, err := io.ReadFull(f, buf)
		if n > 0 && bytes.Count(buf[:n], []byte{0}) != n {
			if _, err := dst.WriteAt(buf[:n], off+pos); err != nil {
				t.Fatal(err)
			}
		}
		if err != nil {
			return
		}
	}
}
