// Command agent is PID 1 of vmshadow's file restore helper VM (built by
// guest/fshelper/build.sh into its initramfs). It loads the kernel modules,
// finds the disks (attached read-only, named by their virtio serial),
// their partitions, LVM logical volumes and file systems, and answers the
// host's requests (internal/fsproto) on the virtio-serial port
// org.vmshadow.files: list a directory, stat, read a file's bytes. File
// systems are mounted read-only without replaying their journals, on first
// use; paths are resolved inside each file system's root (RESOLVE_IN_ROOT).
// It powers the VM off when the host says quit or goes away.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmshadow/vmshadow/internal/fsproto"
)

const portName = "org.vmshadow.files"

var notes []string

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "fsagent: "+format+"\n", args...)
}

func main() {
	setup()
	port, err := openPort()
	if err != nil {
		logf("FATAL: %v", err)
		poweroff()
	}
	logf("ready")
	serve(port)
	poweroff()
}

func poweroff() {
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

func setup() {
	for _, m := range []struct{ src, dst, typ string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"}, {"tmpfs", "/run", "tmpfs"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.typ, 0, ""); err != nil {
			logf("mount %s: %v", m.dst, err)
		}
	}
	if c, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		os.Stderr = c
	}
	loadModules("")
}

// loadModules loads the modules of a group ("" for those loaded at boot),
// in the order of guest/fshelper/modules.txt.
func loadModules(group string) []string {
	list, err := os.ReadFile("/lib/modules/order")
	if err != nil {
		logf("no module list: %v", err)
	}
	var failed []string
	for _, line := range strings.Split(string(list), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || (len(f) > 1 && f[1] != "@"+group) || (len(f) == 1 && group != "") {
			continue
		}
		m := f[0]
		fd, err := os.Open("/lib/modules/" + m + ".ko")
		if err == nil {
			err = unix.FinitModule(int(fd.Fd()), "", 0)
			fd.Close()
		}
		if err != nil && !errors.Is(err, unix.EEXIST) {
			failed = append(failed, fmt.Sprintf("kernel module %s: %v", m, err))
		}
	}
	if group == "" {
		notes = append(notes, failed...)
	}
	return failed
}

// openPort waits for the virtio-serial port and opens it.
func openPort() (*os.File, error) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		ports, _ := filepath.Glob("/sys/class/virtio-ports/*")
		for _, p := range ports {
			name, _ := os.ReadFile(p + "/name")
			if strings.TrimSpace(string(name)) == portName {
				return os.OpenFile("/dev/"+filepath.Base(p), os.O_RDWR, 0)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, fmt.Errorf("virtio-serial port %s not found", portName)
}

func serve(port *os.File) {
	r := bufio.NewReaderSize(port, 64<<10)
	w := bufio.NewWriterSize(port, 64<<10)
	for {
		typ, payload, err := fsproto.ReadFrame(r, 64<<10)
		if err != nil {
			logf("read request: %v", err)
			return
		}
		var req fsproto.Request
		if typ != fsproto.TypeRequest {
			reply(w, nil, &fsproto.Error{Kind: "usage", Message: "not a request frame"})
			continue
		}
		if err := jsonUnmarshal(payload, &req); err != nil {
			reply(w, nil, &fsproto.Error{Kind: "usage", Message: "malformed request: " + err.Error()})
			continue
		}
		if req.Op == fsproto.OpQuit {
			reply(w, struct{}{}, nil)
			return
		}
		v, data, ferr := handle(&req)
		if ferr == nil && data != nil {
			fsproto.WriteFrame(w, fsproto.TypeData, data)
			w.Flush()
			continue
		}
		reply(w, v, ferr)
	}
}

func reply(w *bufio.Writer, v any, e *fsproto.Error) {
	var err error
	if e != nil {
		err = fsproto.WriteJSON(w, fsproto.TypeError, e)
	} else {
		err = fsproto.WriteJSON(w, fsproto.TypeReply, v)
	}
	if err != nil { // every request gets its one reply
		fsproto.WriteJSON(w, fsproto.TypeError, &fsproto.Error{Kind: "other", Message: "reply: " + err.Error()})
	}
	w.Flush()
}

func handle(req *fsproto.Request) (any, []byte, *fsproto.Error) {
	switch req.Op {
	case fsproto.OpHello:
		return hello(), nil, nil
	case fsproto.OpList, fsproto.OpStat, fsproto.OpRead:
	default:
		return nil, nil, &fsproto.Error{Kind: "usage", Message: fmt.Sprintf("unknown operation %q", req.Op)}
	}
	root, ferr := mountFS(req.FS)
	if ferr != nil {
		return nil, nil, ferr
	}
	p := path.Clean("/" + req.Path)
	switch req.Op {
	case fsproto.OpList:
		l, err := list(root, p, req.Cookie)
		return l, nil, err
	case fsproto.OpStat:
		e, err := stat(root, p)
		return e, nil, err
	default:
		b, err := read(root, p, req.Offset, req.Length)
		if b == nil && err == nil {
			b = []byte{}
		}
		return nil, b, err
	}
}

func fail(what string, err error) *fsproto.Error {
	kind := "other"
	switch {
	case errors.Is(err, unix.ENOENT):
		kind = "notfound"
	case errors.Is(err, unix.ENOTDIR):
		kind = "notdir"
	case errors.Is(err, unix.EISDIR):
		kind = "isdir"
	case errors.Is(err, unix.EIO), errors.Is(err, unix.EUCLEAN), errors.Is(err, unix.EBADMSG):
		kind = "io"
	}
	return &fsproto.Error{Kind: kind, Message: fmt.Sprintf("%s: %v", what, err)}
}

// --- devices ---------------------------------------------------------------

var devices []fsproto.Device

func hello() *fsproto.Hello {
	var uts unix.Utsname
	unix.Uname(&uts)
	if devices == nil {
		devices = scan()
	}
	return &fsproto.Hello{Version: fsproto.Version, Kernel: unix.ByteSliceToString(uts.Release[:]), Devices: devices, Notes: notes}
}

func readSys(p string) string {
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}

func scan() []fsproto.Device {
	var out []fsproto.Device
	disks, _ := filepath.Glob("/sys/block/vd*")
	sort.Strings(disks)
	for _, d := range disks {
		name := filepath.Base(d)
		sectors, _ := strconv.ParseInt(readSys(d+"/size"), 10, 64)
		dev := fsproto.Device{Dev: name, Serial: readSys(d + "/serial"), Size: sectors * 512}
		dev.Table = table("/dev/" + name)
		parts, _ := filepath.Glob(d + "/" + name + "*")
		sort.Slice(parts, func(i, j int) bool {
			a, _ := strconv.Atoi(readSys(parts[i] + "/partition"))
			b, _ := strconv.Atoi(readSys(parts[j] + "/partition"))
			return a < b
		})
		if len(parts) == 0 {
			probe(&dev)
		}
		out = append(out, dev)
		for _, p := range parts {
			n, _ := strconv.Atoi(readSys(p + "/partition"))
			psec, _ := strconv.ParseInt(readSys(p+"/size"), 10, 64)
			pd := fsproto.Device{Dev: filepath.Base(p), Parent: name, Number: n, Size: psec * 512}
			probe(&pd)
			out = append(out, pd)
		}
	}
	out = append(out, lvm(out)...)
	return out
}

// table tells the partition table of a disk.
func table(dev string) string {
	b := make([]byte, 1024)
	f, err := os.Open(dev)
	if err != nil {
		return ""
	}
	defer f.Close()
	if n, _ := f.ReadAt(b, 0); n < 1024 {
		return ""
	}
	if string(b[512:520]) == "EFI PART" {
		return "gpt"
	}
	if b[510] == 0x55 && b[511] == 0xaa {
		for i := 0; i < 4; i++ {
			if b[446+16*i+4] != 0 {
				return "mbr"
			}
		}
	}
	return ""
}

// probe recognises a file system from its superblock.
func probe(d *fsproto.Device) {
	f, err := os.Open("/dev/" + d.Dev)
	if err != nil {
		d.Found = "cannot open: " + err.Error()
		return
	}
	defer f.Close()
	b := make([]byte, 128<<10)
	n, err := f.ReadAt(b, 0)
	if n < len(b) && err != nil && !errors.Is(err, io.EOF) {
		d.Found = "cannot read: " + err.Error()
		return
	}
	b = b[:n]
	at := func(off int, s string) bool { return len(b) >= off+len(s) && string(b[off:off+len(s)]) == s }
	switch {
	case len(b) >= 1082 && binary.LittleEndian.Uint16(b[1080:]) == 0xEF53:
		compat := binary.LittleEndian.Uint32(b[1024+0x5c:])
		incompat := binary.LittleEndian.Uint32(b[1024+0x60:])
		switch {
		case incompat&0x2c0 != 0: // extents, 64bit, flex_bg
			d.FSType = "ext4"
		case compat&0x4 != 0: // has_journal
			d.FSType = "ext3"
		default:
			d.FSType = "ext2"
		}
		d.Label = cstr(b[1024+0x78 : 1024+0x88])
	case at(0, "XFSB"):
		d.FSType = "xfs"
		d.Label = cstr(b[108:120])
	case at(3, "NTFS    "):
		d.FSType = "ntfs"
	case at(0x52, "FAT32   ") || at(0x36, "FAT16   ") || at(0x36, "FAT12   "):
		d.FSType = "vfat"
		if at(0x52, "FAT32   ") {
			d.Label = strings.TrimSpace(cstr(b[0x47:0x52]))
		} else {
			d.Label = strings.TrimSpace(cstr(b[0x2b:0x36]))
		}
	case at(512+24, "LVM2 001") || at(24, "LVM2 001"):
		d.FSType = "LVM2_member"
	case at(0x10040, "_BHRfS_M"):
		d.FSType = "btrfs"
	case at(0, "\xeb\x63\x90") || at(0, "\xeb\x48\x90"):
		d.Found = "a boot loader and no file system"
	default:
		if bytes.Count(b, []byte{0}) == len(b) {
			d.Found = "only zeros in the first 128 KiB"
		} else {
			d.Found = fmt.Sprintf("no known superblock (first bytes %x)", b[:min(16, len(b))])
		}
	}
}

func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return fsproto.Printable(string(b), 64)
}

// lvm activates the volume groups on the LVM physical volumes found,
// read-only, and returns their logical volumes.
func lvm(devs []fsproto.Device) []fsproto.Device {
	has := false
	for _, d := range devs {
		has = has || d.FSType == "LVM2_member"
	}
	if !has {
		return nil
	}
	if _, err := os.Stat("/bin/lvm"); err != nil {
		notes = append(notes, "LVM physical volumes found, but this helper has no lvm tool")
		return nil
	}
	os.MkdirAll("/run/lvm", 0o755)
	os.MkdirAll("/etc/lvm", 0o755)
	os.Setenv("LVM_SUPPRESS_FD_WARNINGS", "1")
	// No udev, no daemons, no metadata backups (nothing is ever written).
	conf := "devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }\n" +
		"global { use_lvmpolld = 0 }\nbackup { backup = 0 archive = 0 }\n"
	os.WriteFile("/etc/lvm/lvm.conf", []byte(conf+"activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n"), 0o644)
	vgs, err := exec.Command("/bin/lvm", "vgs", "--readonly", "--noheadings", "-o", "vg_name").CombinedOutput()
	if err != nil {
		notes = append(notes, fmt.Sprintf("LVM: vgs: %v: %s", err, fsproto.Printable(string(vgs), 500)))
		return nil
	}
	// Every volume group is activated read-only (read_only_volume_list).
	var names []string
	for _, vg := range strings.Fields(string(vgs)) {
		names = append(names, strconv.Quote(vg))
	}
	os.WriteFile("/etc/lvm/lvm.conf", []byte(conf+"activation { udev_sync = 0 udev_rules = 0 monitoring = 0 read_only_volume_list = [ "+
		strings.Join(names, ", ")+" ] }\n"), 0o644)
	out, err := exec.Command("/bin/lvm", "vgchange", "-ay", "--sysinit", "--noudevsync", "--ignorelockingfailure").CombinedOutput()
	if err != nil {
		notes = append(notes, fmt.Sprintf("LVM activation: %v: %s", err, fsproto.Printable(string(out), 500)))
	}
	lvs, err := exec.Command("/bin/lvm", "lvs", "--readonly", "--noheadings", "--separator", "|", "-o", "vg_name,lv_name,lv_size", "--units", "b", "--nosuffix").Output()
	if err != nil {
		notes = append(notes, fmt.Sprintf("LVM lvs: %v", err))
		return nil
	}
	var res []fsproto.Device
	for _, line := range strings.Split(string(lvs), "\n") {
		f := strings.Split(strings.TrimSpace(line), "|")
		if len(f) != 3 {
			continue
		}
		size, _ := strconv.ParseInt(f[2], 10, 64)
		dm := strings.ReplaceAll(f[0], "-", "--") + "-" + strings.ReplaceAll(f[1], "-", "--")
		d := fsproto.Device{Dev: "mapper/" + dm, LV: f[0] + "/" + f[1], Size: size}
		if _, err := os.Stat("/dev/mapper/" + dm); err != nil {
			exec.Command("/bin/lvm", "vgmknodes", "--sysinit").Run()
		}
		probe(&d)
		res = append(res, d)
	}
	return res
}

// --- file systems --------------------------------------------------------------

var mounted = map[string]int{} // device -> root directory fd

func mountFS(dev string) (int, *fsproto.Error) {
	if fd, ok := mounted[dev]; ok {
		return fd, nil
	}
	if devices == nil {
		devices = scan()
	}
	var d *fsproto.Device
	for i := range devices {
		if devices[i].Dev == dev {
			d = &devices[i]
		}
	}
	if d == nil {
		return -1, &fsproto.Error{Kind: "notfound", Message: fmt.Sprintf("no device %q", dev)}
	}
	var typ, opts string
	flags := uintptr(unix.MS_RDONLY | unix.MS_NODEV | unix.MS_NOSUID | unix.MS_NOEXEC)
	switch d.FSType {
	case "ext4", "ext3":
		typ, opts = "ext4", "noload"
	case "ext2":
		typ = "ext4"
	case "xfs":
		typ, opts = "xfs", "norecovery"
	case "vfat":
		typ, opts = "vfat", "utf8,shortname=mixed"
	case "btrfs":
		typ, opts = "btrfs", "rescue=nologreplay"
		if failed := loadModules("btrfs"); len(failed) > 0 {
			return -1, &fsproto.Error{Kind: "mount", Message: dev + ": btrfs: " + strings.Join(failed, "; ")}
		}
	case "ntfs":
		if _, err := os.Stat("/bin/ntfs-3g"); err != nil {
			return -1, &fsproto.Error{Kind: "mount", Message: dev + ": NTFS, but this helper has no ntfs-3g (install ntfs-3g and rebuild it)"}
		}
		typ = "ntfs-3g"
	default:
		return -1, &fsproto.Error{Kind: "mount", Message: fmt.Sprintf("%s holds no file system the helper can mount (%s)", dev, cmpOr(d.FSType, d.Found))}
	}
	mp := "/mnt/" + strings.ReplaceAll(dev, "/", "_")
	os.MkdirAll(mp, 0o755)
	if typ == "ntfs-3g" {
		out, err := exec.Command("/bin/ntfs-3g", "-o", "ro,norecover,nodev,nosuid,noexec", "/dev/"+dev, mp).CombinedOutput()
		if err != nil {
			return -1, &fsproto.Error{Kind: "mount", Message: fmt.Sprintf("mount %s (ntfs-3g, read-only): %v: %s", dev, err, fsproto.Printable(string(out), 500))}
		}
	} else if err := unix.Mount("/dev/"+dev, mp, typ, flags, opts); err != nil {
		return -1, &fsproto.Error{Kind: "mount", Message: fmt.Sprintf("mount %s (%s, read-only, %s): %v", dev, typ, cmpOr(opts, "no options"), err)}
	}
	fd, err := unix.Open(mp, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return -1, fail("open "+mp, err)
	}
	mounted[dev] = fd
	return fd, nil
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func openIn(root int, p string, flags uint64) (int, error) {
	rel := strings.TrimPrefix(p, "/")
	if rel == "" {
		rel = "."
	}
	return unix.Openat2(root, rel, &unix.OpenHow{Flags: flags | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS})
}

func entryOf(name string, st *unix.Stat_t) fsproto.Entry {
	e := fsproto.Entry{Name: name, Size: st.Size, Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid,
		Mtime: st.Mtim.Nano(), Atime: st.Atim.Nano()}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		e.Type = "file"
	case unix.S_IFDIR:
		e.Type = "dir"
	case unix.S_IFLNK:
		e.Type = "symlink"
	case unix.S_IFCHR:
		e.Type, e.Size = "char", 0
	case unix.S_IFBLK:
		e.Type, e.Size = "block", 0
	case unix.S_IFIFO:
		e.Type, e.Size = "fifo", 0
	default:
		e.Type, e.Size = "socket", 0
	}
	return e
}

func statAt(dirfd int, name string) (fsproto.Entry, error) {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fsproto.Entry{}, err
	}
	e := entryOf(name, &st)
	if e.Type == "symlink" {
		buf := make([]byte, 4096)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return e, err
		}
		e.Link = string(buf[:n])
	}
	return e, nil
}

func stat(root int, p string) (*fsproto.Entry, *fsproto.Error) {
	dir, base := path.Split(p)
	if base == "" {
		var st unix.Stat_t
		if err := unix.Fstat(root, &st); err != nil {
			return nil, fail("stat /", err)
		}
		e := entryOf("/", &st)
		return &e, nil
	}
	fd, err := openIn(root, dir, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return nil, fail(dir, err)
	}
	defer unix.Close(fd)
	e, err := statAt(fd, base)
	if err != nil {
		return nil, fail(p, err)
	}
	return &e, nil
}

func list(root int, p string, cookie int) (*fsproto.List, *fsproto.Error) {
	fd, err := openIn(root, p, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, fail(p, err)
	}
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, fail("read directory "+p, err)
	}
	sort.Strings(names)
	if cookie > len(names) {
		cookie = len(names)
	}
	l := &fsproto.List{Entries: []fsproto.Entry{}}
	size := 0 // the page's JSON stays well under fsproto.MaxPayload
	for _, n := range names[cookie:] {
		if len(l.Entries) == fsproto.MaxEntries || size > fsproto.MaxPayload/2 {
			l.Next = cookie + len(l.Entries)
			break
		}
		e, err := statAt(fd, n)
		if err != nil {
			return nil, fail(path.Join(p, n), err)
		}
		l.Entries = append(l.Entries, e)
		size += 2*len(e.Name) + 2*len(e.Link) + 256 // JSON escapes at most double
	}
	return l, nil
}

func read(root int, p string, off int64, n int) ([]byte, *fsproto.Error) {
	if n <= 0 || n > fsproto.MaxRead || off < 0 {
		return nil, &fsproto.Error{Kind: "usage", Message: fmt.Sprintf("read of %d bytes at %d", n, off)}
	}
	fd, err := openIn(root, p, unix.O_RDONLY|unix.O_NOFOLLOW)
	if err != nil {
		return nil, fail(p, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fail(p, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, &fsproto.Error{Kind: "isdir", Message: p + ": not a regular file"}
	}
	buf := make([]byte, n)
	got := 0
	for got < n {
		m, err := unix.Pread(fd, buf[got:], off+int64(got))
		if err != nil {
			return nil, fail("read "+p, err)
		}
		if m == 0 {
			break
		}
		got += m
	}
	return buf[:got], nil
}
