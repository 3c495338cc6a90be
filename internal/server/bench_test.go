package server

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// benchDisk is each benchmark VM's disk, and benchChange what changes in
// it between two incrementals.
const (
	benchDisk   = 64 << 20
	benchChange = 16 << 20
)

var (
	cliOnce sync.Once
	cliBin  string
	cliErr  error
)

// cli builds the vmshadow binary once.
func cli(b *testing.B) string {
	cliOnce.Do(func() {
		dir, err := os.MkdirTemp("", "vmshadow-bench")
		if err != nil {
			cliErr = err
			return
		}
		cliBin = filepath.Join(dir, "vmshadow")
		if out, err := exec.Command("go", "build", "-o", cliBin, "../../cmd/vmshadow").CombinedOutput(); err != nil {
			cliErr = fmt.Errorf("build vmshadow: %v: %s", err, out)
		}
	})
	if cliErr != nil {
		b.Fatal(cliErr)
	}
	return cliBin
}

// randomFile is n bytes of random data in dir: guest writes that neither
// compress nor deduplicate.
func randomFile(b *testing.B, dir string, n int64) string {
	p := filepath.Join(dir, fmt.Sprintf("random-%d", time.Now().UnixNano()))
	buf := make([]byte, n)
	rand.Read(buf)
	if err := os.WriteFile(p, buf, 0o600); err != nil {
		b.Fatal(err)
	}
	return p
}

// change writes benchChange fresh random bytes into vm's disk.
func change(b *testing.B, vm *qemutest.VM, dir string, i int) {
	src := randomFile(b, dir, benchChange)
	off := int64(i%(benchDisk/benchChange)) * benchChange
	if err := vm.GuestIO("vda", fmt.Sprintf("write -s %s %d %d", src, off, int64(benchChange))); err != nil {
		b.Fatal(err)
	}
	os.Remove(src)
}

// BenchmarkIncremental: the same incremental backup (16 MiB of fresh
// random data changed in a 64 MiB disk of a real QEMU VM) run by the
// server's job (repository opened and its key derived once) and by the
// CLI (a process per backup: key derivation, QMP connection, repository
// listing each time).
func BenchmarkIncremental(b *testing.B) {
	for _, mode := range []string{"server", "cli"} {
		b.Run(mode, func(b *testing.B) {
			g := newBenchRig(b, 1, `  - {name: inc, type: backup, repository: main, vms: [{connection: lab}]}
`)
			vm := g.vms["vm1"]
			run := func() {
				if mode == "server" {
					r, err := g.s.RunJob(context.Background(), "inc")
					if err != nil {
						b.Fatal(err)
					}
					if end := g.wait(b, r.ID); end.Status != state.Succeeded {
						b.Fatalf("run: %+v", end)
					}
					return
				}
				cmd := exec.Command(cli(b), "backup", "--repo", filepath.Join(g.dir, "main"), "--qmp", vm.QMPPath, "--vm", "vm1",
					"--password-file", filepath.Join(g.dir, "pw"), "--state-dir", filepath.Join(g.dir, "cli-state"))
				if out, err := cmd.CombinedOutput(); err != nil {
					b.Fatalf("vmshadow backup: %v: %s", err, out)
				}
			}
			run() // the full backup
			b.SetBytes(benchChange)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				change(b, vm, g.dir, i)
				b.StartTimer()
				run()
			}
		})
	}
}

// BenchmarkJobVMs: one backup job backing up N VMs at once (per_job N),
// each with 16 MiB of fresh random data changed: throughput and the
// server's peak heap as N grows.
func BenchmarkJobVMs(b *testing.B) {
	for _, n := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("vms=%d", n), func(b *testing.B) {
			g := newBenchRig(b, n, fmt.Sprintf(`  - {name: all, type: backup, repository: main, vms: [{connection: lab}], concurrency: {per_job: %d, per_host: %d}}
`, n, n))
			runJob := func() {
				r, err := g.s.RunJob(context.Background(), "all")
				if err != nil {
					b.Fatal(err)
				}
				if end := g.wait(b, r.ID); end.Status != state.Succeeded {
					b.Fatalf("run: %+v", end)
				}
			}
			runJob()
			var peak atomic.Uint64
			stop := make(chan struct{})
			go func() {
				var ms runtime.MemStats
				for {
					select {
					case <-stop:
						return
					case <-time.After(20 * time.Millisecond):
					}
					runtime.ReadMemStats(&ms)
					if ms.HeapInuse > peak.Load() {
						peak.Store(ms.HeapInuse)
					}
				}
			}()
			b.SetBytes(int64(n) * benchChange)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				for _, vm := range g.vms {
					change(b, vm, g.dir, i)
				}
				b.StartTimer()
				runJob()
			}
			b.StopTimer()
			close(stop)
			b.ReportMetric(float64(peak.Load())/(1<<20), "peak-heap-MiB")
		})
	}
}

// newBenchRig starts n QEMU VMs (vm1...) and a server whose repository
// has the default key derivation cost.
func newBenchRig(b *testing.B, n int, jobs string) *rig {
	var names []string
	for i := 1; i <= n; i++ {
		names = append(names, fmt.Sprintf("vm%d", i))
	}
	g := &rig{dir: b.TempDir(), vms: map[string]*qemutest.VM{}}
	socks := filepath.Join(g.dir, "sockets")
	os.MkdirAll(socks, 0o700)
	for _, name := range names {
		vm := qemutest.Start(b, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda", Size: benchDisk}}, Name: name})
		if err := os.Symlink(vm.QMPPath, filepath.Join(socks, name+".qmp")); err != nil {
			b.Fatal(err)
		}
		g.vms[name] = vm
	}
	if err := os.WriteFile(filepath.Join(g.dir, "pw"), []byte("s3cret\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	for _, name := range []string{"main", "offsite"} {
		be, err := local.Create(filepath.Join(g.dir, name))
		if err != nil {
			b.Fatal(err)
		}
		r, err := repo.Init(context.Background(), be, repo.InitOptions{Password: []byte("s3cret")})
		if err != nil {
			b.Fatal(err)
		}
		r.Close()
		be.Close()
	}
	g.cfgPath = filepath.Join(g.dir, "server.yaml")
	g.writeConfig(b, jobs)
	s, err := New(context.Background(), Options{ConfigPath: g.cfgPath, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	g.s = s
	b.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		s.Close(ctx)
	})
	return g
}
