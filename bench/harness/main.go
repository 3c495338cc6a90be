// Command harness is `make bench`: it backs up the same multi-GiB VM disk
// with vmshadow and with the tools users would pick instead (restic, borg,
// virtnbdbackup), next to the read floor (qemu-img convert of the same NBD
// shadow copy), several times, interleaved, and writes bench/results.md and
// a throughput chart. Run as root (it drops the page cache before every
// timed step and starts libvirtd):
//
//	go run ./bench/harness -vmshadow bin/vmshadow [-rounds 3] [-size-gib 4]
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
}

type config struct {
	vmshadow  string
	work      string
	sizeGiB   int64
	bigGiB    int64
	rounds    int
	results   string
	chart     string
	skip      map[string]bool
	noMicro   bool
	from      string
	floorOnly string
}

const (
	chunkSize   = 4 << 20
	changeWrite = 1 << 20
	password    = "bench-password"
)

func main() {
	var c config
	var skip string
	flag.StringVar(&c.vmshadow, "vmshadow", "bin/vmshadow", "the vmshadow binary to measure")
	flag.StringVar(&c.work, "work", "bench/out", "scratch directory (keeps the generated test image between runs)")
	flag.Int64Var(&c.sizeGiB, "size-gib", 4, "size of the test disk")
	flag.Int64Var(&c.bigGiB, "big-gib", 64, "size of the sparse disk of the memory check (0: skip)")
	flag.IntVar(&c.rounds, "rounds", 3, "rounds: each runs every tool once, in a rotating order")
	flag.StringVar(&c.results, "results", "bench/results.md", "markdown report to write")
	flag.StringVar(&c.chart, "chart", "bench/throughput.png", "throughput chart to write (gnuplot)")
	flag.BoolVar(&c.noMicro, "no-micro", false, "do not run the Go microbenchmarks")
	flag.StringVar(&c.floorOnly, "cpu-floor", "", "only measure the CPU floor of a full backup of this test image")
	flag.StringVar(&c.from, "from", "", "only write the report, from the measurements a run saved (WORK/measurements.json)")
	flag.StringVar(&skip, "skip", "", "comma-separated tools to leave out: restic,borg,virtnbdbackup")
	flag.Parse()
	c.skip = map[string]bool{}
	for _, s := range strings.Split(skip, ",") {
		if s != "" {
			c.skip[s] = true
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	do := run
	switch {
	case c.from != "":
		do = reportFrom
	case c.floorOnly != "":
		do = func(ctx context.Context, c config) error {
			fi, err := os.Stat(c.floorOnly)
			if err != nil {
				return err
			}
			f, err := measureCPUFloor(c.floorOnly, fi.Size())
			fmt.Printf("CPU floor of a full backup of %s: hash %.2f s, compress %.2f s, encrypt %.2f s, total %.2f s\n", c.floorOnly, f.Hash, f.Compress, f.Encrypt, f.total())
			return err
		}
	}
	if err := do(ctx, c); err != nil {
		logf("bench failed: %v", err)
		os.Exit(1)
	}
}

// bench is the state of one harness run.
type bench struct {
	config
	raw   string // the raw image restic and borg back up
	vm    *vm
	lv    *libvirt
	state string // VMSHADOW_STATE_DIR
	env   []string
	measurements
}

// measurements are what the report is written from; a run saves them as
// WORK/measurements.json (-from writes the report again from that file).
type measurements struct {
	Size, BigGiB int64
	Rounds       int
	Allocated    int64           // of the test image
	Skip         map[string]bool // tools left out
	HaveLV       bool            // virtnbdbackup ran
	LVNote       string          // why it did not
	Samples      map[string][]sample
	Extra        map[string][]int64 // vmshadow's own bytes_read per step; changed chunk bytes per round
	Changed      struct {
		Bytes, ChunkBytes int64
		Writes            int
	}
	LoadBefore, LoadAfter string
	Start                 time.Time
	Took                  time.Duration // the whole run, set when it ends
	Version               string        // of the vmshadow measured, and its git describe
	Micro                 []microResult
	Floor                 cpuFloor
}

func run(ctx context.Context, c config) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root: the harness drops the page cache and starts libvirtd")
	}
	for _, cmd := range []string{"qemu-system-x86_64", "qemu-img", "cmp"} {
		if _, err := exec.LookPath(cmd); err != nil {
			return fmt.Errorf("%s is missing: run scripts/deps.sh bench", cmd)
		}
	}
	b := &bench{config: c}
	b.Samples, b.Extra, b.Start, b.Rounds, b.BigGiB = map[string][]sample{}, map[string][]int64{}, time.Now(), c.rounds, c.bigGiB
	b.vmshadow = abs(c.vmshadow)
	if err := os.MkdirAll(c.work, 0o755); err != nil {
		return err
	}
	b.work = abs(c.work)
	// libvirt's QEMU runs as another user: it must reach the disk.
	for d := b.work; d != "/"; d = filepath.Dir(d) {
		if fi, err := os.Stat(d); err == nil && fi.Mode().Perm()&0o005 != 0o005 {
			os.Chmod(d, fi.Mode().Perm()|0o005)
		}
	}
	b.Size = c.sizeGiB << 30
	b.state = filepath.Join(b.work, "state")
	b.env = []string{"VMSHADOW_PASSWORD=" + password, "RESTIC_PASSWORD=" + password, "BORG_PASSPHRASE=" + password,
		"VMSHADOW_STATE_DIR=" + b.state, "BORG_RELOCATED_REPO_ACCESS_IS_OK=yes", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes",
		"BORG_BASE_DIR=" + filepath.Join(b.work, "borg-home"), "RESTIC_CACHE_DIR=" + filepath.Join(b.work, "restic-cache")}
	run := filepath.Join(b.work, "run")
	os.RemoveAll(run)
	os.RemoveAll(b.state)
	if err := os.MkdirAll(run, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(run)
	defer os.RemoveAll(b.state)
	defer os.RemoveAll(filepath.Join(b.work, "borg-home"))
	defer os.RemoveAll(filepath.Join(b.work, "restic-cache"))

	img := filepath.Join(b.work, fmt.Sprintf("disk-%dg.raw", c.sizeGiB))
	if err := makeImage(ctx, img, b.Size); err != nil {
		return fmt.Errorf("make the test image: %w", err)
	}
	b.Allocated = allocated(img)
	// Three copies of the same content, changed alike: the vmshadow VM's
	// disk, the libvirt VM's disk, and a raw file for restic and borg.
	b.raw = filepath.Join(run, "disk.raw")
	vmDisk := filepath.Join(run, "vm.qcow2")
	lvDisk := filepath.Join(run, "lv.qcow2")
	logf("copying the test image for the VMs and the file-based tools")
	if _, err := quiet(ctx, nil, "cp", "--sparse=always", img, b.raw); err != nil {
		return err
	}
	for _, d := range []string{vmDisk, lvDisk} {
		if _, err := quiet(ctx, nil, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, d); err != nil {
			return err
		}
	}
	os.Chmod(lvDisk, 0o666)
	var err error
	vmDir := filepath.Join(run, "vm")
	os.MkdirAll(vmDir, 0o755)
	if b.vm, err = startVM(ctx, "bench", vmDir, vmDisk); err != nil {
		return err
	}
	defer b.vm.stop()
	if !c.skip["virtnbdbackup"] {
		lvDir := filepath.Join(run, "libvirt")
		os.MkdirAll(lvDir, 0o755)
		b.lv, err = startLibvirt(ctx, "vmshadow-bench", lvDir, lvDisk)
		if errors.Is(err, errSkip) {
			b.LVNote = err.Error()
			logf("virtnbdbackup left out: %v", err)
			b.lv = nil
		} else if err != nil {
			return err
		} else {
			defer b.lv.stop()
		}
	} else {
		b.LVNote = "left out with -skip"
	}
	for _, t := range []string{"restic", "borg"} {
		if _, err := exec.LookPath(t); err != nil && !c.skip[t] {
			logf("%s is not installed: left out (scripts/deps.sh bench installs it)", t)
			c.skip[t] = true
		}
	}
	b.Skip = c.skip
	b.HaveLV = b.lv != nil

	// Warm up the VM's NBD server and the page cache paths once, untimed.
	if err := b.warmUp(ctx); err != nil {
		return fmt.Errorf("warm-up read: %w", err)
	}
	b.LoadBefore = loadavg()
	for r := 1; r <= c.rounds; r++ {
		if err := b.round(ctx, r, filepath.Join(run, fmt.Sprintf("round%d", r))); err != nil {
			return fmt.Errorf("round %d: %w", r, err)
		}
	}
	b.vm.stop()
	if c.bigGiB > 0 {
		if err := b.big(ctx, filepath.Join(run, "big")); err != nil {
			return fmt.Errorf("%d GiB sparse disk: %w", c.bigGiB, err)
		}
	}
	b.LoadAfter = loadavg()
	if !c.noMicro {
		if b.Micro, err = microbench(ctx); err != nil {
			return fmt.Errorf("microbenchmarks: %w", err)
		}
		logf("CPU floor of the full backup of the test image")
		if b.Floor, err = measureCPUFloor(img, b.Size); err != nil {
			return fmt.Errorf("CPU floor: %w", err)
		}
	}
	b.Took = time.Since(b.Start).Round(time.Second)
	b.Version = fmt.Sprintf("%s (%s)", version(b.vmshadow, "--version"), version("git", "-C", filepath.Dir(b.vmshadow), "describe", "--always", "--dirty"))
	raw, err := json.MarshalIndent(b.measurements, "", " ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(b.work, "measurements.json"), raw, 0o644); err != nil {
		return err
	}
	return b.report(ctx)
}

// reportFrom writes the report from saved measurements.
func reportFrom(ctx context.Context, c config) error {
	raw, err := os.ReadFile(c.from)
	if err != nil {
		return err
	}
	b := &bench{config: c}
	if err := json.Unmarshal(raw, &b.measurements); err != nil {
		return fmt.Errorf("%s: %w", c.from, err)
	}
	b.vmshadow = abs(c.vmshadow)
	return b.report(ctx)
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// rotate returns the steps starting at the r-th, so that no tool always
// runs first (or right after the same other tool).
func rotate[T any](s []T, r int) []T {
	k := r % len(s)
	return append(append([]T{}, s[k:]...), s[:k]...)
}

type step struct {
	name string
	fn   func(context.Context) error
}

func (b *bench) add(name string, s sample) {
	b.Samples[name] = append(b.Samples[name], s)
	logf("  %-28s %7.2f s wall %7.2f s CPU %6.0f MiB RSS  read %s  stored %s", name, s.Wall, s.CPU, float64(s.RSS)/(1<<20), mib(s.Read), mib(s.Stored))
}

func mib(n int64) string { return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20)) }

// Names of the steps of the repository with 1 MiB chunks.
const (
	full1M = "vmshadow full, 1 MiB chunks"
	inc1M  = "vmshadow incremental, 1 MiB chunks"
)

// round runs every tool once: full backups, the change, incremental
// backups, then vmshadow's restore and verify.
func (b *bench) round(ctx context.Context, r int, dir string) error {
	logf("round %d of %d", r, b.Rounds)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	vrepo := filepath.Join(dir, "vmshadow-repo")
	rrepo := filepath.Join(dir, "restic-repo")
	brepo := filepath.Join(dir, "borg-repo")
	vnb := filepath.Join(dir, "virtnbdbackup")
	// A second repository with 1 MiB chunks (repo init --chunk-size),
	// backing up the same VM with its own change-tracking chain: the
	// trade-off of the chunk size, measured next to the default.
	vrepo1 := filepath.Join(dir, "vmshadow-repo-1m")
	if _, err := quiet(ctx, b.env, b.vmshadow, "repo", "init", "--repo", vrepo); err != nil {
		return err
	}
	if _, err := quiet(ctx, b.env, b.vmshadow, "repo", "init", "--repo", vrepo1, "--chunk-size", fmt.Sprint(1<<20)); err != nil {
		return err
	}
	if err := b.vm.removeBitmaps(ctx); err != nil {
		return err
	}
	if !b.Skip["restic"] {
		if _, err := quiet(ctx, b.env, "restic", "init", "--repository-version", "2", "--repo", rrepo); err != nil {
			return err
		}
	}
	if !b.Skip["borg"] {
		if _, err := quiet(ctx, b.env, "borg", "init", "--encryption", "repokey", brepo); err != nil {
			return err
		}
	}
	size := map[string]int64{vrepo: dirSize(vrepo), vrepo1: dirSize(vrepo1), "r": dirSize(rrepo), "b": dirSize(brepo)}
	grew := func(k, dir string) int64 {
		n := dirSize(dir)
		d := n - size[k]
		size[k] = n
		return d
	}
	qemuRead := func(pid int, f func() (sample, error)) (sample, error) {
		before, _ := procIO(pid)
		s, err := f()
		after, _ := procIO(pid)
		s.Read = after - before
		return s, err
	}
	logs := func(name string) string { return filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".log") }

	vmBackup := func(name, mode, vrepo string) step {
		return step{name, func(ctx context.Context) error {
			var sum struct {
				BytesRead int64  `json:"bytes_read"`
				Mode      string `json:"mode"`
			}
			s, err := qemuRead(b.vm.pid(), func() (sample, error) {
				s, out, err := measured(ctx, logs(name), b.env, b.vmshadow, "backup", "--repo", vrepo, "--qmp", b.vm.QMPPath, "--json")
				if err == nil {
					err = lastJSON(out, &sum)
				}
				return s, err
			})
			if err != nil {
				return err
			}
			if sum.Mode != mode {
				return fmt.Errorf("%s: the backup was %s", name, sum.Mode)
			}
			s.Stored = grew(vrepo, vrepo)
			b.Extra[name] = append(b.Extra[name], sum.BytesRead)
			b.add(name, s)
			return nil
		}}
	}
	floor := step{"qemu-img convert (read floor)", func(ctx context.Context) error {
		uri, del, err := b.shadow(ctx)
		if err != nil {
			return err
		}
		defer del()
		// The data goes to QEMU's null-co driver (/dev/null as a block
		// device): only the reading is measured. Writing it to tmpfs
		// cost qemu-img 1.5-4 s of CPU here, more than the reading.
		target := fmt.Sprintf("driver=null-co,size=%d", b.Size)
		s, err := qemuRead(b.vm.pid(), func() (sample, error) {
			s, _, err := measured(ctx, logs("floor"), nil, "qemu-img", "convert", "-n", "-f", "raw", uri, "--target-image-opts", target)
			return s, err
		})
		if err != nil {
			return err
		}
		b.add("qemu-img convert (read floor)", s)
		return nil
	}}
	restic := func(name string) step {
		return step{name, func(ctx context.Context) error {
			s, _, err := measured(ctx, logs(name), b.env, "restic", "backup", "--repo", rrepo, "--quiet", b.raw)
			if err != nil {
				return err
			}
			s.Read = b.Size // every byte of the file, holes included (its rchar also counts its own pack files)
			s.Stored = grew("r", rrepo)
			b.add(name, s)
			return nil
		}}
	}
	borg := func(name, archive string) step {
		return step{name, func(ctx context.Context) error {
			s, _, err := measured(ctx, logs(name), b.env, "borg", "create", brepo+"::"+archive, b.raw)
			if err != nil {
				return err
			}
			s.Read = b.Size // every byte of the file, holes included
			s.Stored = grew("b", brepo)
			b.add(name, s)
			return nil
		}}
	}
	virtnbd := func(name, level string) step {
		return step{name, func(ctx context.Context) error {
			before := dirSize(vnb)
			s, err := qemuRead(b.lv.pid(), func() (sample, error) {
				s, _, err := measured(ctx, logs(name), nil, b.lv.backupArgs(level, vnb)...)
				return s, err
			})
			if err != nil {
				return err
			}
			s.Stored = dirSize(vnb) - before
			b.add(name, s)
			return nil
		}}
	}
	full := []step{vmBackup("vmshadow full", "full", vrepo), floor, vmBackup(full1M, "full", vrepo1)}
	inc := []step{vmBackup("vmshadow incremental", "incremental", vrepo), vmBackup(inc1M, "incremental", vrepo1)}
	if !b.Skip["restic"] {
		full = append(full, restic("restic full"))
		inc = append(inc, restic("restic incremental"))
	}
	if !b.Skip["borg"] {
		full = append(full, borg("borg full", "full"))
		inc = append(inc, borg("borg incremental", "inc"))
	}
	if b.lv != nil {
		full = append(full, virtnbd("virtnbdbackup full", "full"))
		inc = append(inc, virtnbd("virtnbdbackup incremental", "inc"))
	}
	for _, s := range rotate(full, r) {
		if err := s.fn(ctx); err != nil {
			return err
		}
	}

	// About 1% of the disk changes in scattered 1 MiB writes, the same on
	// the three copies, different each round.
	count := int(b.Size / 100 / changeWrite)
	chdir := filepath.Join(dir, "change")
	if err := os.MkdirAll(chdir, 0o755); err != nil {
		return err
	}
	os.Chmod(dir, 0o755)
	cs, touched, err := changes(chdir, b.Size, changeWrite, count, r, chunkSize, 1<<20)
	if err != nil {
		return err
	}
	b.Changed.Bytes, b.Changed.ChunkBytes, b.Changed.Writes = int64(count)*changeWrite, touched[0], count
	if err := b.vm.write(ctx, cs); err != nil {
		return err
	}
	if err := applyRaw(b.raw, cs); err != nil {
		return err
	}
	if b.lv != nil {
		if err := b.lv.write(ctx, cs); err != nil {
			return err
		}
	}
	b.Extra["changed chunk bytes"] = append(b.Extra["changed chunk bytes"], touched[0])
	b.Extra["changed chunk bytes, 1 MiB chunks"] = append(b.Extra["changed chunk bytes, 1 MiB chunks"], touched[1])
	for _, s := range rotate(inc, r) {
		if err := s.fn(ctx); err != nil {
			return err
		}
	}

	// Restore the incremental backup to a file on disk, as an operator
	// would, and compare it with the raw copy.
	target := filepath.Join(b.work, "vmshadow-bench-restore.raw")
	os.Remove(target)
	defer os.Remove(target)
	out, err := quiet(ctx, b.env, b.vmshadow, "backups", "--repo", vrepo, "--json")
	if err != nil {
		return err
	}
	var list struct {
		Backups []struct {
			ID   string `json:"id"`
			Mode string `json:"mode"`
		} `json:"backups"`
	}
	if err := lastJSON(out, &list); err != nil {
		return fmt.Errorf("backups --json: %w", err)
	}
	id := ""
	for _, bk := range list.Backups {
		if bk.Mode == "incremental" {
			id = bk.ID
		}
	}
	if id == "" {
		return fmt.Errorf("no incremental backup listed: %s", out)
	}
	s, _, err := measured(ctx, logs("restore"), b.env, b.vmshadow, "restore", "--repo", vrepo, id, "--to", target)
	if err != nil {
		return err
	}
	b.add("vmshadow restore", s)
	if _, err := quiet(ctx, nil, "cmp", b.raw, target); err != nil {
		return fmt.Errorf("the restored incremental backup differs from the disk: %w", err)
	}
	os.Remove(target)
	s, _, err = measured(ctx, logs("verify"), b.env, b.vmshadow, "verify", "--repo", vrepo)
	if err != nil {
		return err
	}
	b.add("vmshadow verify", s)
	return nil
}

// warmUp reads a shadow copy of the VM's disk once with qemu-img convert,
// untimed.
func (b *bench) warmUp(ctx context.Context) error {
	uri, del, err := b.shadow(ctx)
	if err != nil {
		return err
	}
	defer del()
	_, err = quiet(ctx, nil, "qemu-img", "convert", "-n", "-f", "raw", uri, "--target-image-opts", fmt.Sprintf("driver=null-co,size=%d", b.Size))
	return err
}

// shadow takes a snapshot set of the VM with vmshadow and returns its NBD
// URI and the function that deletes it.
func (b *bench) shadow(ctx context.Context) (string, func(), error) {
	var set struct {
		SetID   string `json:"set_id"`
		Shadows []struct {
			NBD string `json:"nbd"`
		} `json:"shadows"`
	}
	out, err := quiet(ctx, b.env, b.vmshadow, "snapshot", "create", "--qmp", b.vm.QMPPath, "--json")
	if err == nil {
		err = lastJSON(out, &set)
	}
	if err == nil && len(set.Shadows) != 1 {
		err = fmt.Errorf("%d shadow copies, want 1", len(set.Shadows))
	}
	if err != nil {
		return "", nil, fmt.Errorf("snapshot create: %w", err)
	}
	del := func() {
		quiet(context.WithoutCancel(ctx), b.env, b.vmshadow, "snapshot", "delete", "--qmp", b.vm.QMPPath, set.SetID)
	}
	return set.Shadows[0].NBD, del, nil
}

// big backs up a sparse disk of bigGiB with the test image in its first
// GiBs and 4 MiB of data every 4 GiB after, to show that vmshadow's memory
// does not grow with the disk.
func (b *bench) big(ctx context.Context, dir string) error {
	logf("%d GiB sparse disk", b.BigGiB)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	disk := filepath.Join(dir, "big.qcow2")
	size := b.BigGiB << 30
	if _, err := quiet(ctx, nil, "qemu-img", "create", "-q", "-f", "qcow2", disk, fmt.Sprint(size)); err != nil {
		return err
	}
	if _, err := quiet(ctx, nil, "qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", b.raw, disk); err != nil {
		return err
	}
	data := filepath.Join(dir, "data.bin")
	if err := fillFile(data, chunkSize, 99); err != nil {
		return err
	}
	var io []string
	for off := b.Size; off < size; off += 4 << 30 {
		io = append(io, "-c", fmt.Sprintf("write -q -s %s %d %d", data, off, chunkSize))
	}
	if _, err := quiet(ctx, nil, append(append([]string{"qemu-io", "-f", "qcow2"}, io...), disk)...); err != nil {
		return err
	}
	v, err := startVM(ctx, "bench-big", dir, disk)
	if err != nil {
		return err
	}
	defer v.stop()
	repo := filepath.Join(dir, "repo")
	if _, err := quiet(ctx, b.env, b.vmshadow, "repo", "init", "--repo", repo); err != nil {
		return err
	}
	name := fmt.Sprintf("vmshadow full, %d GiB sparse", b.BigGiB)
	before, _ := procIO(v.pid())
	s, _, err := measured(ctx, filepath.Join(dir, "backup.log"), b.env, b.vmshadow, "backup", "--repo", repo, "--qmp", v.QMPPath, "--json")
	if err != nil {
		return err
	}
	after, _ := procIO(v.pid())
	s.Read = after - before
	s.Stored = dirSize(repo)
	b.add(name, s)
	return nil
}
