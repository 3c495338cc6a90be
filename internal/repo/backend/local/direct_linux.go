package local

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// directMin is the smallest blob written with O_DIRECT: chunks, not
// configs, keys or small indexes.
const directMin = 256 << 10

// directAlign is the alignment O_DIRECT needs of the memory, file offset
// and length on every Linux file system that supports it.
const directAlign = 4096

// writeFile writes data to f, a new empty file. A large blob whose memory
// is 4 KiB-aligned (the backup pipeline's chunk buffers are) has its
// aligned part written with O_DIRECT: the kernel moves it from the buffer
// to the disk without copying it into the page cache first, which on the
// machines measured cost several times the CPU (bench/notes.md), and a
// backup does not fill the page cache with chunks nobody reads back soon.
// The unaligned tail, blobs that do not qualify, and file systems without
// O_DIRECT (tmpfs, some network file systems) go through the page cache.
// The caller fsyncs either way: O_DIRECT alone does not make data durable.
func writeFile(f *os.File, data []byte) error {
	n := len(data) &^ (directAlign - 1)
	if len(data) < directMin || uintptr(unsafe.Pointer(&data[0]))%directAlign != 0 {
		n = 0
	}
	if n > 0 && setDirect(f, true) == nil {
		// After an error (a file system that refuses the alignment, a
		// short write) the rest goes through the page cache, which
		// reports what is really wrong, such as a full disk.
		w, _ := f.Write(data[:n])
		if err := setDirect(f, false); err != nil {
			return err
		}
		data = data[w:]
	}
	_, err := f.Write(data)
	return err
}

func setDirect(f *os.File, on bool) error {
	fd := int(f.Fd())
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		fl |= unix.O_DIRECT
	} else {
		fl &^= unix.O_DIRECT
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl)
	return err
}
