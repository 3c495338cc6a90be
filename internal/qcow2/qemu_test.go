package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// qemuCheck runs 'qemu-img check' and fails unless it exits 0 and reports
// no errors, corruptions or leaks.
func qemuCheck(t *testing.T, path string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", "--output=json", path).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img check %s: %v\n%s", path, err, out)
	}
	var res map[string]any
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("qemu-img check output: %v\n%s", err, out)
	}
	for _, k := range []string{"check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed"} {
		if v, ok := res[k]; ok && v != float64(0) {
			t.Fatalf("qemu-img check %s: %s = %v\n%s", path, k, v, out)
		}
	}
	if res["format"] != "qcow2" {
		t.Fatalf("qemu-img check %s: format %v\n%s", path, res["format"], out)
	}
}

// qemuCompare runs 'qemu-img compare' of a raw file and a qcow2 image and
// fails unless it says they are identical (exit status 0).
func qemuCompare(t *testing.T, raw, img string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img compare %s %s: %v\n%s", raw, img, err, out)
	}
	if !strings.Contains(string(out), "Images are identical") {
		t.Fatalf("qemu-img compare: unexpected output %s", out)
	}
}

type qemuInfo struct {
	VirtualSize int64  `json:"virtual-size"`
	ActualSize  int64  `json:"actual-size"`
	ClusterSize int64  `json:"cluster-size"`
	Format      string `json:"format"`
	DirtyFlag   bool   `json:"dirty-flag"`
	Specific    struct {
		Data struct {
			Compat       string `json:"compat"`
			RefcountBits int    `json:"refcount-bits"`
			Corrupt      bool   `json:"corrupt"`
		} `json:"data"`
	} `json:"format-specific"`
}

func qemuImgInfo(t *testing.T, path string) qemuInfo {
	t.Helper()
	out := run(t, "qemu-img", "info", "--output=json", "-f", "qcow2", path)
	var info qemuInfo
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info output: %v\n%s", err, out)
	}
	return info
}

// writeBoth applies ops to a sparse raw file and to a new qcow2 image.
func writeBoth(t *testing.T, rawPath, imgPath string, size int64, opts Options, ops []op) {
	t.Helper()
	raw, err := os.Create(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if err := raw.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(imgPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := Create(f, size, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range ops {
		if _, err := raw.WriteAt(o.data, o.off); err != nil {
			t.Fatal(err)
		}
		if n, err := w.WriteAt(o.data, o.off); err != nil || n != len(o.data) {
			t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", len(o.data), o.off, n, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// verifyImage checks an image written by writeBoth with ops with qemu-img,
// with the layout checker (including that exactly the clusters that got
// non-zero data are allocated) and with Reader against a model of the disk.
func verifyImage(t *testing.T, rawPath, imgPath string, size, cs int64, ops []op) {
	t.Helper()
	model := make([]byte, size)
	alloc := applyModel(model, ops, cs)
	qemuCheck(t, imgPath)
	qemuCompare(t, rawPath, imgPath)
	f, err := os.Open(imgPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	lay, err := checkLayout(f, st.Size())
	if err != nil {
		t.Fatalf("layout: %v", err)
	}
	if lay.dataClusters != int64(len(alloc)) {
		t.Fatalf("%d data clusters allocated, want %d (the clusters that received non-zero data)", lay.dataClusters, len(alloc))
	}
	r, err := Open(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	if err := compareReader(r, model); err != nil {
		t.Fatal(err)
	}
}

// TestRandomPatternsQemu writes random sparse patterns into a raw file and
// a qcow2 image and has qemu-img check the image and compare the two.
func TestRandomPatternsQemu(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	testutil.SkipShort(t)
	cases := []struct {
		name  string
		size  int64
		opts  Options
		ops   int
		seeds int
	}{
		{"default", 200 << 20, Options{}, 200, 3},
		{"default-unaligned-size", 64<<20 + 37*512, Options{}, 200, 2},
		{"512b-clusters-evicting", 3<<20 + 512, Options{ClusterSize: 512, L2CacheTables: 2}, 400, 3},
		{"4k-clusters-one-table", 40 << 20, Options{ClusterSize: 4096, L2CacheTables: 1}, 300, 3},
		{"2m-clusters", 256<<20 + 4096, Options{ClusterSize: 2 << 20}, 60, 2},
		{"tiny", 512, Options{ClusterSize: 512}, 20, 2},
		{"empty", 0, Options{}, 0, 1},
	}
	for _, c := range cases {
		for seed := range c.seeds {
			t.Run(fmt.Sprintf("%s/seed%d", c.name, seed), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(uint64(seed), uint64(c.size)))
				cs := int64(c.opts.ClusterSize)
				if cs == 0 {
					cs = DefaultClusterSize
				}
				ops := randomOps(rng, c.size, cs, c.ops)
				dir := t.TempDir()
				rawPath, imgPath := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "disk.qcow2")
				writeBoth(t, rawPath, imgPath, c.size, c.opts, ops)
				verifyImage(t, rawPath, imgPath, c.size, cs, ops)
			})
		}
	}
}

// TestRestoreLikeQemu writes a disk the way restore does: 4 MiB chunks in
// increasing order, some chunks skipped (absent from the backup), some all
// zero, some with zero clusters inside.
func TestRestoreLikeQemu(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	testutil.SkipShort(t)
	const size, chunk = 512<<20 + 5<<20, 4 << 20 // crosses an L2 table boundary
	rng := rand.New(rand.NewPCG(7, 7))
	var ops []op
	for off := int64(0); off < size; off += chunk {
		l := min(chunk, size-off)
		switch rng.IntN(4) {
		case 0: // not in the backup
			continue
		case 1:
			ops = append(ops, op{off, make([]byte, l)})
		default:
			data := make([]byte, l)
			fillRandom(rng, data)
			for c := int64(0); c < l; c += DefaultClusterSize {
				if rng.IntN(3) == 0 {
					clear(data[c:min(l, c+DefaultClusterSize)])
				}
			}
			ops = append(ops, op{off, data})
		}
	}
	dir := t.TempDir()
	rawPath, imgPath := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "disk.qcow2")
	writeBoth(t, rawPath, imgPath, size, Options{}, ops)
	verifyImage(t, rawPath, imgPath, size, DefaultClusterSize, ops)
}

// TestInfoSparse checks what qemu-img info reports for a sparse image.
func TestInfoSparse(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	testutil.SkipShort(t)
	const size = 10 << 30
	dir := t.TempDir()
	rawPath, imgPath := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "disk.qcow2")
	data := bytes.Repeat([]byte{0xa5}, 3<<20)
	ops := []op{{0, data}, {5 << 30, make([]byte, 64<<20)}, {size - 4096, data[:4096]}}
	writeBoth(t, rawPath, imgPath, size, Options{}, ops)
	info := qemuImgInfo(t, imgPath)
	if info.Format != "qcow2" || info.VirtualSize != size || info.ClusterSize != DefaultClusterSize ||
		info.Specific.Data.Compat != "1.1" || info.Specific.Data.RefcountBits != 16 || info.Specific.Data.Corrupt || info.DirtyFlag {
		t.Fatalf("qemu-img info: %+v", info)
	}
	// 3 MiB + one cluster of data, two L2 tables, header, L1, refcounts.
	if info.ActualSize > 4<<20 {
		t.Fatalf("actual size %d, want at most 4 MiB", info.ActualSize)
	}
	qemuCheck(t, imgPath)
	qemuCompare(t, rawPath, imgPath)
}

// TestLargeVirtualSizeQemu: a 4 TiB image with a few writes stays small,
// passes qemu-img check and reads back (checked with qemu-io, not by
// comparing 4 TiB).
func TestLargeVirtualSizeQemu(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	testutil.NeedCommand(t, "qemu-io")
	testutil.SkipShort(t)
	const size = 4 << 40
	path := filepath.Join(t.TempDir(), "big.qcow2")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := Create(f, size, Options{})
	if err != nil {
		t.Fatal(err)
	}
	writes := []struct {
		off     int64
		n       int
		pattern byte
	}{{0, 1 << 20, 0x11}, {1 << 40, 65536, 0x22}, {3<<40 + 12345, 777, 0x33}, {size - 512, 512, 0x44}}
	for _, wr := range writes {
		if _, err := w.WriteAt(bytes.Repeat([]byte{wr.pattern}, wr.n), wr.off); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > 4<<20 {
		t.Fatalf("4 TiB image with 1.2 MiB written is %d bytes", st.Size())
	}
	qemuCheck(t, path)
	if info := qemuImgInfo(t, path); info.VirtualSize != size {
		t.Fatalf("virtual size %d, want %d", info.VirtualSize, size)
	}
	var cmds []string
	for _, wr := range writes {
		cmds = append(cmds, "-c", fmt.Sprintf("read -P %d %d %d", wr.pattern, wr.off, wr.n))
	}
	// Zeros around the partial cluster and in untouched space.
	cmds = append(cmds, "-c", fmt.Sprintf("read -P 0 %d %d", 3<<40, 12345), "-c", fmt.Sprintf("read -P 0 %d %d", 3<<40+12345+777, 65536-12345-777),
		"-c", fmt.Sprintf("read -P 0 %d %d", 2<<40, 1<<20))
	out := run(t, "qemu-io", append([]string{"-r", "-f", "qcow2"}, append(cmds, path)...)...)
	if strings.Contains(out, "Pattern verification failed") || strings.Count(out, "read ") != len(cmds)/2 {
		t.Fatalf("qemu-io:\n%s", out)
	}
}

// TestIncompleteImageRefused: an image whose Close never ran must not be
// usable by QEMU nor by Open.
func TestIncompleteImageRefused(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	testutil.SkipShort(t)
	path := filepath.Join(t.TempDir(), "partial.qcow2")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := Create(f, 1<<30, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	// No Close.
	if out, err := exec.Command("qemu-img", "info", path).CombinedOutput(); err == nil {
		t.Fatalf("qemu-img info accepted an incomplete image:\n%s", out)
	}
	if out, err := exec.Command("qemu-img", "check", path).CombinedOutput(); err == nil {
		t.Fatalf("qemu-img check accepted an incomplete image:\n%s", out)
	}
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(f, st.Size()); !errors.Is(err, errs.ErrCorrupt) {
		t.Fatalf("Open of an incomplete image: %v, want ErrCorrupt", err)
	}
}

// TestReaderQemuImages reads images made by qemu-img and qemu-io with
// Reader and compares them with the raw source.
func TestReaderQemuImages(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	testutil.NeedCommand(t, "qemu-io")
	testutil.SkipShort(t)
	const size = 24<<20 + 512
	dir := t.TempDir()
	rawPath := filepath.Join(dir, "src.raw")
	rng := rand.New(rand.NewPCG(1, 2))
	model := make([]byte, size)
	applyModel(model, randomOps(rng, size, 4096, 100), 4096)
	copy(model, bytes.Repeat([]byte{0x77}, 65536)) // the first cluster holds data
	if err := os.WriteFile(rawPath, model, 0o600); err != nil {
		t.Fatal(err)
	}
	read := func(t *testing.T, path string) (*Reader, error) {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		st, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		return Open(f, st.Size())
	}
	for _, c := range []struct{ name, opts string }{
		{"v3-64k", "cluster_size=65536"},
		{"v2-4k", "compat=0.10,cluster_size=4096"},
		{"v3-512-refcount64", "cluster_size=512,refcount_bits=64"},
		{"v3-2m", "cluster_size=2M"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := filepath.Join(dir, c.name+".qcow2")
			run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", c.opts, rawPath, img)
			r, err := read(t, img)
			if err != nil {
				t.Fatal(err)
			}
			if err := compareReader(r, model); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("zero-flag-and-partial-clusters", func(t *testing.T) {
		img := filepath.Join(dir, "z.qcow2")
		run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawPath, img)
		// Zero clusters (v3 zero flag on allocated clusters), an unaligned
		// write into an unallocated area and one at the end of the disk.
		run(t, "qemu-io", "-f", "qcow2", "-c", "write -z 0 1M", "-c", "write -P 0x5a 20000001 3000",
			"-c", fmt.Sprintf("write -P 0x6b %d 512", size-512), img)
		clear(model[:1<<20])
		copy(model[20000001:], bytes.Repeat([]byte{0x5a}, 3000))
		copy(model[size-512:], bytes.Repeat([]byte{0x6b}, 512))
		r, err := read(t, img)
		if err != nil {
			t.Fatal(err)
		}
		if err := compareReader(r, model); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("compressed-unsupported", func(t *testing.T) {
		img := filepath.Join(dir, "c.qcow2")
		run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", rawPath, img)
		r, err := read(t, img)
		if err != nil {
			t.Fatal(err)
		}
		if err := compareReader(r, model); !strings.Contains(fmt.Sprint(err), "compressed") {
			t.Fatalf("reading a compressed image: %v, want an error about compression", err)
		}
		if _, err := r.ReadAt(make([]byte, 4096), 0); !errors.Is(err, errs.ErrUnsupported) {
			t.Fatalf("ReadAt of a compressed cluster: %v, want ErrUnsupported", err)
		}
	})
	t.Run("backing-file-unsupported", func(t *testing.T) {
		base := filepath.Join(dir, "base.qcow2")
		run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", rawPath, base)
		img := filepath.Join(dir, "overlay.qcow2")
		run(t, "qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", img)
		if _, err := read(t, img); !errors.Is(err, errs.ErrUnsupported) {
			t.Fatalf("Open of an overlay: %v, want ErrUnsupported", err)
		}
	})
}
