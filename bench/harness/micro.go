package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
)

// microResult is one Go benchmark line.
type microResult struct {
	Name    string
	MBs     float64
	Ratio   float64 // compressed/input, where reported
	Seconds float64 // per operation
	PeakMiB float64 // peak heap, where reported
}

// microbench runs the Go microbenchmarks of the hot path (chunk hash,
// compression, encryption, sealing, the pipeline, the NBD read loop) and
// returns their results.
// microbench runs the Go microbenchmarks of the hot path. A package whose
// benchmarks fail keeps the results of those that ran; the failures are
// returned as failed (package: the failing benchmarks and their messages).
func microbench(ctx context.Context) (out []microResult, failed []string, err error) {
	for _, args := range [][]string{
		{"-bench", ".", "-benchtime", "20x", "./internal/repo/"},
		{"-bench", "Pipeline", "-benchtime", "5x", "./internal/backup/"},
		{"-bench", "ReadQemuNBD", "-benchtime", "3x", "./internal/nbd/"},
		// the server's incremental next to the CLI's; one job with N VMs
		{"-bench", ".", "-benchtime", "5x", "./internal/server/"},
	} {
		logf("go test %s", strings.Join(args, " "))
		b, err := quiet(ctx, nil, append([]string{"go", "test", "-run", "^$", "-count", "1"}, args...)...)
		if ctx.Err() != nil {
			return out, failed, ctx.Err()
		}
		pkg := strings.TrimSuffix(strings.TrimPrefix(args[len(args)-1], "./internal/"), "/")
		if err != nil {
			var why []string
			for _, l := range strings.Split(string(b), "\n") {
				if t := strings.TrimSpace(l); strings.HasPrefix(t, "--- FAIL") || strings.HasPrefix(t, "bench_test.go") || strings.Contains(t, "_test.go:") {
					why = append(why, t)
				}
			}
			if len(why) == 0 {
				why = []string{err.Error()}
			}
			logf("microbenchmarks of %s failed (the others are kept): %s", pkg, strings.Join(why, " "))
			failed = append(failed, "internal/"+pkg+": "+strings.Join(why, " "))
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
				continue
			}
			r := microResult{Name: pkg + ": " + strings.TrimPrefix(f[0], "Benchmark")}
			if i := strings.LastIndex(r.Name, "-"); i > 0 {
				r.Name = r.Name[:i]
			}
			for i := 1; i+1 < len(f); i++ {
				v, err := strconv.ParseFloat(f[i], 64)
				if err != nil {
					continue
				}
				switch f[i+1] {
				case "MB/s":
					r.MBs = v
				case "ratio":
					r.Ratio = v
				case "ns/op":
					r.Seconds = v / 1e9
				case "peak-heap-MiB":
					r.PeakMiB = v
				}
			}
			out = append(out, r)
		}
	}
	return out, failed, nil
}

func (b *bench) microTable() string {
	var w strings.Builder
	fmt.Fprintf(&w, "| benchmark | MB/s (one run) | s/op | compressed/input | peak heap MiB |\n|---|---|---|---|---|\n")
	for _, r := range b.Micro {
		ratio, peak := "", ""
		if r.Ratio > 0 {
			ratio = fmt.Sprintf("%.3f", r.Ratio)
		}
		if r.PeakMiB > 0 {
			peak = fmt.Sprintf("%.0f", r.PeakMiB)
		}
		fmt.Fprintf(&w, "| %s | %.0f | %.3f | %s | %s |\n", r.Name, r.MBs, r.Seconds, ratio, peak)
	}
	for _, f := range b.MicroFailed {
		fmt.Fprintf(&w, "\nFailed, so missing above: %s\n", f)
	}
	return w.String()
}

// cpuFloor is the CPU time the full backup of the test image needs, with
// no I/O and no overhead: each step timed alone on one locked thread over
// the image's own data. Hash every allocated 4 MiB chunk with keyed BLAKE3,
// compress the system-file regions with zstd at the default level (the
// copies are deduplicated, the random regions stored as they are after
// sampling), encrypt what is stored with AES-256-GCM.
type cpuFloor struct {
	Hash, Compress, Encrypt float64 // seconds of CPU
}

func (f cpuFloor) total() float64 { return f.Hash + f.Compress + f.Encrypt }

func measureCPUFloor(img string, size int64) (cpuFloor, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	fd, err := os.Open(img)
	if err != nil {
		return cpuFloor{}, err
	}
	defer fd.Close()
	h, err := blake3.NewKeyed(make([]byte, 32))
	if err != nil {
		return cpuFloor{}, err
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(1),
		zstd.WithEncoderCRC(false), zstd.WithLowerEncoderMem(true))
	if err != nil {
		return cpuFloor{}, err
	}
	defer enc.Close()
	blk, _ := aes.NewCipher(make([]byte, 32))
	gcm, _ := cipher.NewGCM(blk)
	nonce := make([]byte, gcm.NonceSize())
	chunk := make([]byte, chunkSize)
	dst := make([]byte, 0, chunkSize+chunkSize/64+1024)
	var f cpuFloor
	timed := func(d *float64, fn func()) {
		t := threadCPU()
		fn()
		*d += threadCPU() - t
	}
	for i := int64(0); i < size/region; i++ {
		k := i % 20
		if k >= 13 {
			continue // hole
		}
		for off := i * region; off < (i+1)*region; off += chunkSize {
			if _, err := fd.ReadAt(chunk, off); err != nil {
				return f, err
			}
			timed(&f.Hash, func() { h.Reset(); h.Write(chunk); h.Sum(nil) })
			switch {
			case k < 5: // system files: compressed, then encrypted
				var out []byte
				timed(&f.Compress, func() { out = enc.EncodeAll(chunk, dst[:0]) })
				timed(&f.Encrypt, func() { gcm.Seal(out[:0:0], nonce, out, nil) })
			case k < 10: // random: encrypted as it is
				timed(&f.Encrypt, func() { gcm.Seal(dst[:0], nonce, chunk, nil) })
			}
		}
	}
	return f, nil
}

// threadCPU is the calling thread's CPU time in seconds.
func threadCPU() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(1, &ru) // RUSAGE_THREAD
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}
