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
	"slices"
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
	if len(os.Args) > 1 && os.Args[1] == reapFlag {
		os.Exit(reap(os.Args[2:]))
	}
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
	flag.StringVar(&skip, "skip", "", "comma-separated parts to leave out: restic, borg, virtnbdbackup, libvirt (the libvirt domain: vmshadow --libvirt and virtnbdbackup), qmp (the QMP VM: vmshadow --qmp and the read floor)")
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
	HaveLibvirt  bool            // the libvirt domain ran (vmshadow --libvirt)
	LVNote       string          // why they did not
	LV           []lvRound       // per round: the checkpoints and restores on the libvirt domain
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
	MicroFailed           []string // microbenchmarks that failed
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
	if !c.skip["qmp"] {
		vmDir := filepath.Join(run, "vm")
		os.MkdirAll(vmDir, 0o755)
		if b.vm, err = startVM(ctx, "bench", vmDir, vmDisk); err != nil {
			return err
		}
		defer b.vm.stop()
	}
	if !c.skip["libvirt"] {
		lvDir := filepath.Join(run, "libvirt")
		os.MkdirAll(lvDir, 0o755)
		tools := []string{"nbdcopy", "qemu-nbd"}
		if !c.skip["virtnbdbackup"] {
			tools = append(tools, "virtnbdbackup", "virtnbdrestore")
		}
		b.lv, err = startLibvirt(ctx, "vmshadow-bench", lvDir, lvDisk, tools)
		if errors.Is(err, errSkip) {
			b.LVNote = err.Error()
			logf("the libvirt domain (vmshadow --libvirt, virtnbdbackup) left out: %v", err)
			b.lv = nil
		} else if err != nil {
			return err
		} else {
			defer b.lv.stop()
		}
	} else {
		b.LVNote = "left out with -skip"
	}
	if c.skip["virtnbdbackup"] && b.LVNote == "" {
		b.LVNote = "left out with -skip"
	}
	for _, t := range []string{"restic", "borg"} {
		if _, err := exec.LookPath(t); err != nil && !c.skip[t] {
			logf("%s is not installed: left out (scripts/deps.sh bench installs it)", t)
			c.skip[t] = true
		}
	}
	b.Skip = c.skip
	b.HaveLibvirt = b.lv != nil
	b.HaveLV = b.lv != nil && !c.skip["virtnbdbackup"]

	// Warm up the VM's NBD server and the page cache paths once, untimed.
	if b.vm != nil {
		if err := b.warmUp(ctx); err != nil {
			return fmt.Errorf("warm-up read: %w", err)
		}
	}
	b.LoadBefore = loadavg()
	for r := 1; r <= c.rounds; r++ {
		if err := b.round(ctx, r, filepath.Join(run, fmt.Sprintf("round%d", r))); err != nil {
			return fmt.Errorf("round %d: %w", r, err)
		}
	}
	if b.vm != nil {
		b.vm.stop()
	}
	if b.lv != nil {
		b.lv.stop()
	}
	if c.bigGiB > 0 {
		if err := b.big(ctx, filepath.Join(run, "big")); err != nil {
			return fmt.Errorf("%d GiB sparse disk: %w", c.bigGiB, err)
		}
	}
	b.LoadAfter = loadavg()
	b.Version = fmt.Sprintf("%s (%s)", version(b.vmshadow, "--version"), version("git", "-C", filepath.Dir(b.vmshadow), "describe", "--always", "--dirty"))
	// Saved now and again at the end: what the rounds measured is not lost
	// if what follows fails.
	if err := b.save(); err != nil {
		return err
	}
	if !c.noMicro {
		if b.Micro, b.MicroFailed, err = microbench(ctx); err != nil {
			return fmt.Errorf("microbenchmarks: %w", err)
		}
		logf("CPU floor of the full backup of the test image")
		if b.Floor, err = measureCPUFloor(img, b.Size); err != nil {
			return fmt.Errorf("CPU floor: %w", err)
		}
	}
	b.Took = time.Since(b.Start).Round(time.Second)
	if err := b.save(); err != nil {
		return err
	}
	return b.report(ctx)
}

// save writes the measurements to WORK/measurements.json.
func (b *bench) save() error {
	raw, err := json.MarshalIndent(b.measurements, "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(b.work, "measurements.json"), raw, 0o644)
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

// Names of the steps on the libvirt domain: vmshadow (--libvirt) and
// virtnbdbackup back up the same domain with the same writes.
const (
	lvFull       = "vmshadow libvirt full"
	lvInc        = "vmshadow libvirt incremental"
	lvRestore    = "vmshadow libvirt restore"
	vnbFull      = "virtnbdbackup full"
	vnbInc       = "virtnbdbackup incremental"
	vnbRestore   = "virtnbdrestore"
	granule      = 64 << 10 // the dirty bitmaps' granularity (qcow2's cluster size)
	lvCheckpoint = "vmshadow-"
	vnbPrefix    = "virtnbdbackup."
)

// lvRound is what one round saw of the two tools' checkpoints on the
// libvirt domain and of their restores.
type lvRound struct {
	// Changed is the change rounded to the bitmaps' 64 KiB granules.
	Changed int64
	// Base is the size libvirt gives each tool's checkpoint (what a backup
	// from it would read) after the change, before the incrementals.
	Base map[string]int64
	// Moved names a base whose size changed through the other tool's
	// incremental (or the hiding of vmshadow's checkpoints around
	// virtnbdbackup's steps); empty when none did.
	Moved []string
	// After is the size of each tool's newest checkpoint at the end of the
	// round: 0 when nothing was written since its incremental's instant.
	After map[string]int64
	// SHA-256 of the domain's disk after the change, and of each restore.
	Domain, Vmshadow, Virtnbd string
}

// round runs every tool once: full backups, the change, incremental
// backups, then the restores and vmshadow's verify.
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
	lrepo := filepath.Join(dir, "vmshadow-libvirt-repo")
	// A second repository with 1 MiB chunks (repo init --chunk-size),
	// backing up the same VM with its own change-tracking chain: the
	// trade-off of the chunk size, measured next to the default.
	vrepo1 := filepath.Join(dir, "vmshadow-repo-1m")
	if b.vm != nil {
		if _, err := quiet(ctx, b.env, b.vmshadow, "repo", "init", "--repo", vrepo); err != nil {
			return err
		}
		if _, err := quiet(ctx, b.env, b.vmshadow, "repo", "init", "--repo", vrepo1, "--chunk-size", fmt.Sprint(1<<20)); err != nil {
			return err
		}
		if err := b.vm.removeBitmaps(ctx); err != nil {
			return err
		}
	}
	if b.lv != nil {
		if _, err := quiet(ctx, b.env, b.vmshadow, "repo", "init", "--repo", lrepo); err != nil {
			return err
		}
		// Both tools' checkpoints of the earlier round go, bitmaps and all.
		if err := b.lv.clearCheckpoints(ctx); err != nil {
			return err
		}
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
	size := map[string]int64{vrepo: dirSize(vrepo), vrepo1: dirSize(vrepo1), lrepo: dirSize(lrepo), "r": dirSize(rrepo), "b": dirSize(brepo)}
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
	// The tools' logs stay in WORK/logs/roundN until the next run.
	logDir := filepath.Join(b.work, "logs", fmt.Sprintf("round%d", r))
	os.RemoveAll(logDir)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return err
	}
	logs := func(name string) string { return filepath.Join(logDir, strings.ReplaceAll(name, " ", "-")+".log") }

	// backup is a vmshadow backup step: of the QMP VM or of the libvirt
	// domain, into repo, which must be of the given mode.
	backup := func(name, mode, repo string, pid func() int, args []string) step {
		return step{name, func(ctx context.Context) error {
			var sum struct {
				BytesRead int64  `json:"bytes_read"`
				Mode      string `json:"mode"`
			}
			s, err := qemuRead(pid(), func() (sample, error) {
				s, out, err := measured(ctx, logs(name), b.env, args...)
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
			s.Stored = grew(repo, repo)
			b.Extra[name] = append(b.Extra[name], sum.BytesRead)
			b.add(name, s)
			return nil
		}}
	}
	vmBackup := func(name, mode, repo string) step {
		return backup(name, mode, repo, b.vm.pid, []string{b.vmshadow, "backup", "--repo", repo, "--qmp", b.vm.QMPPath, "--json"})
	}
	lvBackup := func(name, mode string) step {
		return backup(name, mode, lrepo, b.lv.pid, b.lv.vmshadowArgs(b.vmshadow, lrepo))
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
		return step{name, func(ctx context.Context) (err error) {
			// virtnbdbackup refuses a domain with another tool's
			// checkpoint: vmshadow's are out of libvirt's metadata (their
			// bitmaps stay and record) while it runs, untimed.
			unhide, err := b.lv.hide(ctx, lvCheckpoint)
			if err != nil {
				return err
			}
			defer func() {
				if uerr := unhide(); uerr != nil {
					err = errors.Join(err, uerr)
				}
			}()
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
	var full, inc []step
	if b.vm != nil {
		full = append(full, vmBackup("vmshadow full", "full", vrepo), floor, vmBackup(full1M, "full", vrepo1))
		inc = append(inc, vmBackup("vmshadow incremental", "incremental", vrepo), vmBackup(inc1M, "incremental", vrepo1))
	}
	if !b.Skip["restic"] {
		full = append(full, restic("restic full"))
		inc = append(inc, restic("restic incremental"))
	}
	if !b.Skip["borg"] {
		full = append(full, borg("borg full", "full"))
		inc = append(inc, borg("borg incremental", "inc"))
	}
	// On the libvirt domain: each tool's incremental must read what its own
	// checkpoint marks, whatever the other tool did to its checkpoints in
	// between; checked after each incremental (untimed).
	var lr lvRound
	keeps := func(s step) step {
		return step{s.name, func(ctx context.Context) error {
			if err := s.fn(ctx); err != nil {
				return err
			}
			return b.lvKept(ctx, &lr, s.name)
		}}
	}
	if b.lv != nil {
		full = append(full, lvBackup(lvFull, "full"))
		inc = append(inc, keeps(lvBackup(lvInc, "incremental")))
		if b.HaveLV {
			full = append(full, virtnbd(vnbFull, "full"))
			inc = append(inc, keeps(virtnbd(vnbInc, "inc")))
		}
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
	cs, touched, err := changes(chdir, b.Size, changeWrite, count, r, chunkSize, 1<<20, granule)
	if err != nil {
		return err
	}
	b.Changed.Bytes, b.Changed.ChunkBytes, b.Changed.Writes = int64(count)*changeWrite, touched[0], count
	if b.vm != nil {
		if err := b.vm.write(ctx, cs); err != nil {
			return err
		}
	}
	if err := applyRaw(b.raw, cs); err != nil {
		return err
	}
	if b.lv != nil {
		if err := b.lv.write(ctx, cs); err != nil {
			return err
		}
		lr.Changed = touched[2]
		if err := b.lvBases(ctx, &lr); err != nil {
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

	var restores []step
	if b.vm != nil {
		restores = append(restores, step{"vmshadow restore", func(ctx context.Context) error { return b.restoreQMP(ctx, vrepo, logs) }})
	}
	if b.lv != nil {
		restores = append(restores, step{lvRestore, func(ctx context.Context) error { return b.restoreLibvirt(ctx, lrepo, logs, &lr) }})
		if b.HaveLV {
			restores = append(restores, step{vnbRestore, func(ctx context.Context) error { return b.virtnbdrestore(ctx, vnb, dir, logs, &lr) }})
		}
	}
	for _, s := range rotate(restores, r) {
		if err := s.fn(ctx); err != nil {
			return err
		}
	}
	if b.lv != nil {
		if err := b.lvAfter(ctx, &lr); err != nil {
			return err
		}
		b.LV = append(b.LV, lr)
	}
	if b.vm != nil {
		s, _, err := measured(ctx, logs("verify"), b.env, b.vmshadow, "verify", "--repo", vrepo)
		if err != nil {
			return err
		}
		b.add("vmshadow verify", s)
	}
	return nil
}

// latestIncremental is the ID of the newest incremental backup in repo.
func (b *bench) latestIncremental(ctx context.Context, repo string) (string, error) {
	out, err := quiet(ctx, b.env, b.vmshadow, "backups", "--repo", repo, "--json")
	if err != nil {
		return "", err
	}
	var list struct {
		Backups []struct {
			ID   string `json:"id"`
			Mode string `json:"mode"`
		} `json:"backups"`
	}
	if err := lastJSON(out, &list); err != nil {
		return "", fmt.Errorf("backups --json: %w", err)
	}
	id := ""
	for _, bk := range list.Backups {
		if bk.Mode == "incremental" {
			id = bk.ID
		}
	}
	if id == "" {
		return "", fmt.Errorf("no incremental backup listed: %s", out)
	}
	return id, nil
}

// restoreQMP restores the QMP VM's incremental backup to a file on disk,
// as an operator would, and compares it with the raw copy.
func (b *bench) restoreQMP(ctx context.Context, repo string, logs func(string) string) error {
	target := filepath.Join(b.work, "vmshadow-bench-restore.raw")
	os.Remove(target)
	defer os.Remove(target)
	id, err := b.latestIncremental(ctx, repo)
	if err != nil {
		return err
	}
	s, _, err := measured(ctx, logs("restore"), b.env, b.vmshadow, "restore", "--repo", repo, id, "--to", target)
	if err != nil {
		return err
	}
	b.add("vmshadow restore", s)
	if _, err := quiet(ctx, nil, "cmp", b.raw, target); err != nil {
		return fmt.Errorf("the restored incremental backup differs from the disk: %w", err)
	}
	return nil
}

// restoreLibvirt restores the libvirt domain's incremental backup to a
// qcow2 file (virtnbdrestore writes qcow2) and checks it against the
// domain's disk.
func (b *bench) restoreLibvirt(ctx context.Context, repo string, logs func(string) string, lr *lvRound) error {
	target := filepath.Join(b.work, "vmshadow-bench-restore-libvirt.qcow2")
	os.Remove(target)
	defer os.Remove(target)
	id, err := b.latestIncremental(ctx, repo)
	if err != nil {
		return err
	}
	s, _, err := measured(ctx, logs(lvRestore), b.env, b.vmshadow, "restore", "--repo", repo, id, "--to", target, "--format", "qcow2")
	if err != nil {
		return err
	}
	s.Stored = allocated(target)
	b.add(lvRestore, s)
	if lr.Vmshadow, err = imageSum(ctx, target, "qcow2"); err != nil {
		return err
	}
	if lr.Vmshadow != lr.Domain {
		return fmt.Errorf("vmshadow's restore of the libvirt domain's incremental backup differs from the domain's disk (SHA-256 %s, the disk %s)", lr.Vmshadow, lr.Domain)
	}
	return nil
}

// virtnbdrestore restores virtnbdbackup's full and incremental backup into
// a directory and checks the image against the domain's disk.
func (b *bench) virtnbdrestore(ctx context.Context, vnb, dir string, logs func(string) string, lr *lvRound) error {
	out := filepath.Join(b.work, "virtnbdrestore-out")
	os.RemoveAll(out)
	defer os.RemoveAll(out)
	s, _, err := measuredReaped(ctx, logs(vnbRestore), nil, "virtnbdrestore", "-U", libvirtURI, "-i", vnb, "-o", out, "-n",
		"-f", filepath.Join(b.lv.scratch, "restore.sock"), "-L", logs("virtnbdrestore-own"))
	if err != nil {
		return err
	}
	imgs, _ := filepath.Glob(filepath.Join(out, "*.qcow2"))
	if len(imgs) != 1 {
		ls, _ := os.ReadDir(out)
		var names []string
		for _, e := range ls {
			names = append(names, e.Name())
		}
		return fmt.Errorf("virtnbdrestore wrote %d qcow2 images to %s, want 1: %s", len(imgs), out, strings.Join(names, " "))
	}
	s.Stored = allocated(imgs[0])
	b.add(vnbRestore, s)
	if lr.Virtnbd, err = imageSum(ctx, imgs[0], "qcow2"); err != nil {
		return err
	}
	if lr.Virtnbd != lr.Domain {
		return fmt.Errorf("virtnbdrestore's image differs from the domain's disk (SHA-256 %s, the disk %s)", lr.Virtnbd, lr.Domain)
	}
	return nil
}

// lvBases notes, after the change and before the incrementals, the size of
// each tool's checkpoint (what its incremental will read) and the
// checksum of the domain's disk.
func (b *bench) lvBases(ctx context.Context, lr *lvRound) error {
	lr.Base = map[string]int64{}
	for _, p := range b.lvPrefixes() {
		name, err := b.lv.latest(ctx, p)
		if err != nil {
			return err
		}
		if name == "" {
			return fmt.Errorf("no checkpoint %s* on the libvirt domain after the full backups", p)
		}
		n, err := b.lv.checkpointSize(ctx, name)
		if err != nil {
			return err
		}
		lr.Base[name] = n
	}
	logf("  checkpoints after the change: %v (the change in 64 KiB granules: %s)", lr.Base, mib(lr.Changed))
	var err error
	lr.Domain, err = b.lv.sum(ctx)
	return err
}

// lvKept checks, after an incremental on the libvirt domain, that the
// base checkpoints still there kept their size.
func (b *bench) lvKept(ctx context.Context, lr *lvRound, after string) error {
	have, err := b.lv.checkpoints(ctx)
	if err != nil {
		return err
	}
	for name, n := range lr.Base {
		if !slices.Contains(have, name) {
			continue // the tool's own base, superseded
		}
		m, err := b.lv.checkpointSize(ctx, name)
		if err != nil {
			return err
		}
		if m != n {
			msg := fmt.Sprintf("%s: %s -> %s after %s", name, mib(n), mib(m), after)
			logf("  checkpoint size changed: %s", msg)
			lr.Moved = append(lr.Moved, msg)
		}
	}
	return nil
}

// lvAfter notes the size of each tool's newest checkpoint at the end of
// the round.
func (b *bench) lvAfter(ctx context.Context, lr *lvRound) error {
	lr.After = map[string]int64{}
	for _, p := range b.lvPrefixes() {
		name, err := b.lv.latest(ctx, p)
		if err != nil {
			return err
		}
		n, err := b.lv.checkpointSize(ctx, name)
		if err != nil {
			return err
		}
		lr.After[name] = n
	}
	return nil
}

func (b *bench) lvPrefixes() []string {
	if b.HaveLV {
		return []string{lvCheckpoint, vnbPrefix}
	}
	return []string{lvCheckpoint}
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
