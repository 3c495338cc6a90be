package directio

import (
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

func openDirect(path string, mode int) *os.File {
	f, err := os.OpenFile(path, mode|unix.O_DIRECT, 0)
	if err != nil {
		return nil
	}
	return f
}

func addr(p []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(p))) }
