package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// The test disk mixes what VM disks hold, in 64 MiB regions aligned to 4
// MiB, by position in a 20-region cycle (the layout of
// bench/repo-vs-restic.sh):
//
//	5 compressible system files: consecutive pieces of a tar of /usr
//	  (sorted, fixed metadata, so the same machine makes the same bytes)
//	5 incompressible data: a ChaCha8 stream with a fixed seed
//	3 copies of earlier regions at other offsets (cloned files)
//	7 holes (never written)
const region = 64 << 20

// makeImage writes the raw test image of size bytes at path (sparse) unless
// a file of that size made by the same generator version already exists.
func makeImage(ctx context.Context, path string, size int64) error {
	stamp := path + ".ok"
	want := fmt.Sprintf("v1 %d\n", size)
	if b, err := os.ReadFile(stamp); err == nil && string(b) == want {
		if fi, err := os.Stat(path); err == nil && fi.Size() == size {
			return nil
		}
	}
	logf("creating the %s test image %s", gib(size), path)
	os.Remove(stamp)
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	tr, stop, err := usrTar(ctx)
	if err != nil {
		return err
	}
	defer stop()
	rng := rand.NewChaCha8([32]byte{'v', 'm', 's', 'h', 'a', 'd', 'o', 'w'})
	buf := make([]byte, region)
	for i := int64(0); i < size/region; i++ {
		off := i * region
		switch k := i % 20; {
		case k < 5:
			if _, err := io.ReadFull(tr, buf); err != nil {
				return fmt.Errorf("tar of /usr is too small for a %s image: %w", gib(size), err)
			}
		case k < 10:
			rng.Read(buf)
		case k < 13:
			if _, err := f.ReadAt(buf, (i-10)*region); err != nil {
				return err
			}
		default:
			continue
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return os.WriteFile(stamp, []byte(want), 0o644)
}

// usrTar streams a tar of /usr/lib, /usr/share and /usr/bin with sorted
// names and fixed metadata.
func usrTar(ctx context.Context) (io.Reader, func(), error) {
	cmd := exec.CommandContext(ctx, "tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner",
		"--ignore-failed-read", "-cf", "-", "/usr/lib", "/usr/share", "/usr/bin")
	cmd.Stderr = io.Discard
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	stop := func() {
		cmd.Process.Kill()
		cmd.Wait()
	}
	return bufio.NewReaderSize(out, 1<<20), stop, nil
}

// change is one scattered write of the ~1% change: n bytes at off, taken
// from the file data.
type change struct {
	off, n int64
	data   string
}

// changes returns the writes of round r: count writes of n bytes at random
// 4 KiB-aligned offsets (as a guest file system writes, not aligned to any
// chunk size), not overlapping, spread over the whole disk (in holes and
// data alike), each with its own random data in a file under dir; and the
// bytes of the distinct chunks of each given size they touch.
func changes(dir string, size, n int64, count, round int, chunks ...int64) ([]change, []int64, error) {
	rng := rand.New(rand.NewPCG(uint64(round), 1))
	const align = 4 << 10
	var out []change
	for len(out) < count {
		off := rng.Int64N((size-n)/align+1) * align
		if slices.ContainsFunc(out, func(c change) bool { return off < c.off+c.n && c.off < off+n }) {
			continue
		}
		out = append(out, change{off: off, n: n})
	}
	src := rand.NewChaCha8([32]byte{'c', 'h', 'a', 'n', 'g', 'e', byte(round)})
	buf := make([]byte, n)
	for i := range out {
		out[i].data = filepath.Join(dir, fmt.Sprintf("change-%d.bin", i))
		src.Read(buf)
		if err := os.WriteFile(out[i].data, buf, 0o644); err != nil {
			return nil, nil, err
		}
	}
	touched := make([]int64, len(chunks))
	for k, cs := range chunks {
		set := map[int64]bool{}
		for _, c := range out {
			for i := c.off / cs; i <= (c.off+c.n-1)/cs; i++ {
				set[i] = true
			}
		}
		touched[k] = int64(len(set)) * cs
	}
	return out, touched, nil
}

// applyRaw applies the writes to a raw image file.
func applyRaw(path string, cs []change) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, c := range cs {
		b, err := os.ReadFile(c.data)
		if err != nil {
			return err
		}
		if _, err := f.WriteAt(b[:c.n], c.off); err != nil {
			return err
		}
	}
	return f.Sync()
}

// fillFile writes n bytes of random data (seeded) to path.
func fillFile(path string, n int64, seed byte) error {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{'f', 'i', 'l', 'l', seed}).Read(b)
	return os.WriteFile(path, b, 0o644)
}

func gib(n int64) string {
	if n >= 1<<30 && n%(1<<30) == 0 {
		return strconv.FormatInt(n>>30, 10) + " GiB"
	}
	return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
}

// allocated is the allocated size of a file (du -B1).
func allocated(path string) int64 {
	out, err := exec.Command("du", "-B1", path).Output()
	if err != nil {
		return 0
	}
	n, _ := strconv.ParseInt(strings.Fields(string(out))[0], 10, 64)
	return n
}

var errSkip = errors.New("skipped")

func abs(p string) string { a, _ := filepath.Abs(p); return a }
