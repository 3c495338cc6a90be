//go:build !linux

package local

import "os"

// writeFile writes data to f through the page cache (O_DIRECT is used on
// Linux only).
func writeFile(f *os.File, data []byte) error {
	_, err := f.Write(data)
	return err
}
