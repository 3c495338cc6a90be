package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
)

// microResult is one Go benchmark line.
type microResult struct {
	Name  string
	MBs   float64
	Ratio float64 // compressed/input, where reported
}

// microbench runs the Go microbenchmarks of the hot path (chunk hash,
// compression, encryption, sealing, the pipeline, the NBD read loop) and
// returns their results.
func microbench(ctx context.Context) ([]microResult, error) {
	var out []microResult
	for _, args := range [][]string{
		{"-bench", ".", "-benchtime", "20x", "./internal/repo/"},
		{"-bench", "Pipeline", "-benchtime", "5x", "./internal/backup/"},
		{"-bench", "ReadQemuNBD", "-benchtime", "3x", "./internal/nbd/"},
	} {
		logf("go test %s", strings.Join(args, " "))
		b, err := quiet(ctx, nil, append([]string{"go", "test", "-run", "^$", "-count", "1"}, args...)...)
		if err != nil {
			return out, err
		}
		pkg := strings.TrimSuffix(strings.TrimPrefix(args[len(args)-1], "./internal/"), "/")
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
				}
			}
			out = append(out, r)
		}
	}
	return out, nil
}

func (b *bench) microTable() string {
	var w strings.Builder
	fmt.Fprintf(&w, "| benchmark | MB/s (one run) | compressed/input |\n|---|---|---|\n")
	for _, r := range b.Micro {
		ratio := ""
		if r.Ratio > 0 {
			ratio = fmt.Sprintf("%.3f", r.Ratio)
		}
		fmt.Fprintf(&w, "| %s | %.0f | %s |\n", r.Name, r.MBs, ratio)
	}
	return w.String()
}

func (b *bench) microMBs(name string) float64 {
	for _, r := range b.Micro {
		if r.Name == name {
			return r.MBs
		}
	}
	return 0
}

// cpuBound is the CPU time the full backup of the test disk needs at the
// microbenchmarks' rates, with no I/O and no overhead at all: hash every
// allocated byte, compress the system-file regions (the copies are
// deduplicated, the random regions skipped after sampling), encrypt what is
// stored.
func (b *bench) cpuBound() (secs float64, ok bool) {
	var text, random, dup float64
	for i := int64(0); i < b.Size/region; i++ {
		switch k := i % 20; {
		case k < 5:
			text += region
		case k < 10:
			random += region
		case k < 13:
			dup += region
		}
	}
	hash := b.microMBs("repo: ChunkHash/blake3-keyed")
	zstd := b.microMBs("repo: RawZstd/default/usr")
	ratio := 0.0
	for _, r := range b.Micro {
		if r.Name == "repo: RawZstd/default/usr" {
			ratio = r.Ratio
		}
	}
	aes := b.microMBs("repo: RawAESGCM")
	if hash == 0 || zstd == 0 || aes == 0 {
		return 0, false
	}
	secs = (text+random+dup)/1e6/hash + text/1e6/zstd + (text*ratio+random)/1e6/aes
	return secs, true
}
