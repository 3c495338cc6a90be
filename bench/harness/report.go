package main

import (
	"context"
	"fmt"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
)

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func field(ss []sample, f func(sample) float64) []float64 {
	out := make([]float64, len(ss))
	for i, s := range ss {
		out[i] = f(s)
	}
	return out
}

func wall(s sample) float64 { return s.Wall }
func cpu(s sample) float64  { return s.CPU }

// spread formats the median with the range of the runs.
func spread(v []float64, unit string, prec int) string {
	if len(v) == 0 {
		return "–"
	}
	m := median(v)
	lo, hi := slices.Min(v), slices.Max(v)
	if len(v) == 1 {
		return fmt.Sprintf("%.*f%s", prec, m, unit)
	}
	return fmt.Sprintf("%.*f%s (%.*f–%.*f)", prec, m, unit, prec, lo, prec, hi)
}

// order of the rows of the results table.
var order = []string{
	"vmshadow full", full1M, "qemu-img convert (read floor)", "restic full", "borg full",
	"vmshadow incremental", inc1M, "restic incremental", "borg incremental",
	"vmshadow restore", "vmshadow verify",
}

// lvOrder are the rows of the libvirt domain's table.
var lvOrder = []string{lvFull, vnbFull, lvInc, vnbInc, lvRestore, vnbRestore}

func version(args ...string) string {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "?"
}

func cpuFlags() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	var have []string
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "flags" {
			fl := strings.Fields(v)
			for _, f := range []string{"sha_ni", "aes", "vaes", "vpclmulqdq", "avx2", "avx512f"} {
				if slices.Contains(fl, f) {
					have = append(have, f)
				}
			}
			break
		}
	}
	return strings.Join(have, " ")
}

func memTotal() string {
	b, _ := os.ReadFile("/proc/meminfo")
	var kb int64
	fmt.Sscanf(strings.TrimPrefix(strings.SplitN(string(b), "\n", 2)[0], "MemTotal:"), "%d", &kb)
	return fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
}

type target struct {
	what    string
	figures string
	ratio   float64
	want    float64
	atMost  bool  // ratio must be <= want
	verdict *bool // if set, the result (not a ratio)
	cpu     float64
	unit    string
}

func (t target) pass() string {
	if t.verdict != nil {
		if *t.verdict {
			return "**pass**"
		}
		return "**FAIL**"
	}
	if math.IsNaN(t.ratio) {
		return "not measured"
	}
	ok := t.ratio >= t.want
	if t.atMost {
		ok = t.ratio <= t.want
	}
	if ok {
		return "**pass**"
	}
	return "**FAIL**"
}

func (b *bench) report(ctx context.Context) error {
	diskMiB := float64(b.Size) / (1 << 20)
	med := func(name string, f func(sample) float64) float64 { return median(field(b.Samples[name], f)) }
	var w strings.Builder
	pf := func(format string, a ...any) { fmt.Fprintf(&w, format, a...) }
	pf("# vmshadow benchmark results\n\n")
	pf("Written by `make bench` (`bench/harness`) on %s; the run took %s.\n\n", b.Start.UTC().Format("2006-01-02 15:04 UTC"), b.Took)
	pf("| | |\n|---|---|\n")
	pf("| CPU | %s, %d cores (%s) |\n", cpuModel(), runtime.NumCPU(), cpuFlags())
	pf("| memory | %s |\n", memTotal())
	pf("| kernel | %s |\n", version("uname", "-r"))
	pf("| load average (1, 5, 15 min) | before %s, after %s (the machine is shared: see CPU time) |\n", b.LoadBefore, b.LoadAfter)
	pf("| vmshadow | %s |\n", b.Version)
	pf("| QEMU | %s |\n", version("qemu-system-x86_64", "--version"))
	if !b.Skip["restic"] {
		pf("| restic | %s |\n", version("restic", "version"))
	}
	if !b.Skip["borg"] {
		pf("| borg | %s |\n", version("borg", "--version"))
	}
	if b.HaveLV {
		pf("| virtnbdbackup | %s; %s |\n", version("virtnbdbackup", "--version"), version("libvirtd", "--version"))
	}
	pf("| rounds | %d, tools interleaved in a rotating order; page cache dropped before every timed step |\n\n", b.Rounds)

	pf("## Test disk\n\n")
	pf("%s virtual, %s allocated: in 64 MiB regions, 25%% system files (a tar of /usr), 25%% random data, ", gib(b.Size), gib(b.Allocated))
	pf("15%% copies of earlier regions (4 MiB-aligned), 35%% holes (see `bench/harness/disk.go`). ")
	pf("The VMs run QEMU (TCG, no guest OS) with the disk as qcow2 (`-blockdev`, virtio-blk) opened with O_DIRECT (`cache.direct=on`; libvirt `cache='none'`), as production VMs usually are: QEMU then reads it without the page cache, for every NBD reader alike. ")
	pf("Between the full and the incremental backups, %d writes of 1 MiB, each of its own random data, at random non-overlapping 4 KiB-aligned offsets (%s, %.1f%% of the disk, touching %s of 4 MiB chunks) go through the VM's device (HMP `qemu-io`), ",
		b.Changed.Writes, mib(b.Changed.Bytes), 100*float64(b.Changed.Bytes)/float64(b.Size), mib(b.Changed.ChunkBytes))
	pf("and the same writes to the raw copy that restic and borg back up. Each round changes different places. ")
	pf("Every QEMU process (the vmshadow VM and the libvirt domain) runs with `%s` (a fixed malloc mmap threshold: a fresh NBD server is otherwise slowed by page faults on large requests until glibc's threshold settles), and the vmshadow VM's disk is read once, untimed, through a shadow copy before the rounds.\n\n", strings.Join(mallocEnv, " "))

	pf("## Results\n\n")
	pf("Medians, with the range over the rounds in brackets. Throughput is the disk's virtual size (%s) over wall time, for every tool. CPU is user + system time of the tool and its children (not of QEMU serving NBD): steadier than wall time on a shared machine. Peak RSS is the largest of the rounds (wait4's ru_maxrss, as GNU time reports it).\n\n", gib(b.Size))
	header := func() {
		pf("| step | wall s | throughput MiB/s | CPU s | peak RSS MiB | read from source MiB | stored MiB |\n|---|---|---|---|---|---|---|\n")
	}
	header()
	names := append([]string{}, order...)
	for n := range b.Samples {
		if !slices.Contains(names, n) && !slices.Contains(lvOrder, n) {
			names = append(names, n)
		}
	}
	var chart []string
	row := func(n string) {
		ss := b.Samples[n]
		if len(ss) == 0 {
			return
		}
		size := diskMiB
		if strings.Contains(n, "sparse") {
			size = float64(b.BigGiB << 10)
		}
		tp := field(ss, func(s sample) float64 { return size / s.Wall })
		rss := slices.Max(field(ss, func(s sample) float64 { return float64(s.RSS) / (1 << 20) }))
		read := median(field(ss, func(s sample) float64 { return float64(s.Read) / (1 << 20) }))
		stored := median(field(ss, func(s sample) float64 { return float64(s.Stored) / (1 << 20) }))
		st := fmt.Sprintf("%.0f", stored)
		if strings.Contains(n, "floor") || strings.Contains(n, "restore") || strings.Contains(n, "verify") {
			st = "–"
		}
		pf("| %s | %s | %s | %s | %.0f | %.0f | %s |\n", n, spread(field(ss, wall), "", 2), spread(tp, "", 0), spread(field(ss, cpu), "", 2), rss, read, st)
		if !strings.Contains(n, "verify") && !strings.Contains(n, "sparse") {
			chart = append(chart, fmt.Sprintf("%q %.1f %.1f %.1f", n, median(tp), slices.Min(tp), slices.Max(tp)))
		}
	}
	for _, n := range names {
		row(n)
	}
	pf("\nRead from source: for the NBD readers (vmshadow backups, qemu-img convert, virtnbdbackup) the bytes QEMU read from its image file during the step (`rchar` of QEMU's /proc/PID/io); restic and borg read the whole raw file, holes included (the file size is shown); for restore and verify, the bytes vmshadow read (its `rchar`: the repository; restore writes a sparse raw file on the same disk, as an operator would, where the read floor discards what it reads: `qemu-img convert -n` to the `null-co` driver). ")
	pf("vmshadow's own count of bytes read over NBD (its summary's `bytes_read`): full %s, incremental %s.\n\n", mib(int64(median(i64s(b.Extra["vmshadow full"])))), mib(int64(median(i64s(b.Extra["vmshadow incremental"])))))
	pf("Stored: what the step added to its repository (restic, borg, vmshadow: all files; virtnbdbackup: its output directory, uncompressed, unencrypted). restic: repository format 2, compression auto; borg: `--encryption repokey`, default lz4 compression and chunker; vmshadow: AES-256-GCM, zstd.\n\n")

	// Targets.
	fl := "qemu-img convert (read floor)"
	ratio := func(a, b float64) float64 {
		if a == 0 || b == 0 || math.IsNaN(a) || math.IsNaN(b) {
			return math.NaN()
		}
		return a / b
	}
	stored := func(name string) float64 {
		return median(field(b.Samples[name], func(s sample) float64 { return float64(s.Stored) }))
	}
	// targetsFor computes the targets for vmshadow's steps full and inc,
	// whose repository has chunks of chunk bytes.
	targetsFor := func(full, inc, chunkKey string, chunk string) []target {
		vf, vi := med(full, wall), med(inc, wall)
		vfc, vic := med(full, cpu), med(inc, cpu)
		var ts []target
		add := func(what string, other string, otherWall, otherCPU, mine, mineCPU, want float64) {
			ts = append(ts, target{what: what, figures: fmt.Sprintf("%s %.2f s, vmshadow %.2f s", other, otherWall, mine),
				ratio: ratio(otherWall, mine), want: want, cpu: ratio(otherCPU, mineCPU), unit: "x"})
		}
		for _, t := range []string{"restic", "borg"} {
			if !b.Skip[t] {
				add(fmt.Sprintf("full backup throughput >= 2x %s's", t), t, med(t+" full", wall), med(t+" full", cpu), vf, vfc, 2)
			}
		}
		add("full backup throughput >= 0.8x the read floor (qemu-img convert)", "qemu-img convert", med(fl, wall), med(fl, cpu), vf, vfc, 0.8)
		ts = append(ts, target{what: "incremental after 1% change >= 20x faster than vmshadow's full", figures: fmt.Sprintf("full %.2f s, incremental %.2f s", vf, vi),
			ratio: ratio(vf, vi), want: 20, cpu: ratio(vfc, vic), unit: "x"})
		if !b.Skip["restic"] {
			add("incremental >= 5x faster than restic's second run", "restic", med("restic incremental", wall), med("restic incremental", cpu), vi, vic, 5)
		}
		if b.HaveLV {
			add("full backup >= 2x faster than virtnbdbackup's", "virtnbdbackup", med("virtnbdbackup full", wall), med("virtnbdbackup full", cpu), vf, vfc, 2)
			add("incremental >= 2x faster than virtnbdbackup's", "virtnbdbackup", med("virtnbdbackup incremental", wall), med("virtnbdbackup incremental", cpu), vi, vic, 2)
		}
		incRead := median(i64s(b.Extra[inc]))
		chunkBytes := median(i64s(b.Extra[chunkKey]))
		ts = append(ts, target{what: "incremental reads <= 1.1x the changed bytes rounded to " + chunk + " chunks", figures: fmt.Sprintf("read %s, changed chunks %s", mib(int64(incRead)), mib(int64(chunkBytes))),
			ratio: ratio(incRead, chunkBytes), want: 1.1, atMost: true, cpu: math.NaN(), unit: "x"})
		if !b.Skip["restic"] {
			vs, rs := stored(full)+stored(inc), stored("restic full")+stored("restic incremental")
			ts = append(ts, target{what: "repository size (full + incremental) <= restic's", figures: fmt.Sprintf("vmshadow %.1f MiB, restic %.1f MiB", vs/(1<<20), rs/(1<<20)),
				ratio: ratio(vs, rs), want: 1, atMost: true, cpu: math.NaN(), unit: "x"})
		}
		return ts
	}
	vfc := med("vmshadow full", cpu)
	ts := targetsFor("vmshadow full", "vmshadow incremental", "changed chunk bytes", "4 MiB")
	var maxRSS float64
	for n, ss := range b.Samples {
		if strings.HasPrefix(n, "vmshadow") {
			maxRSS = max(maxRSS, slices.Max(field(ss, func(s sample) float64 { return float64(s.RSS) / (1 << 20) })))
		}
	}
	what := "vmshadow peak memory < 256 MiB (every step)"
	if b.BigGiB > 0 {
		what = fmt.Sprintf("vmshadow peak memory < 256 MiB (every step, and the %d GiB sparse disk)", b.BigGiB)
	}
	ts = append(ts, target{what: what, figures: fmt.Sprintf("%.0f MiB", maxRSS),
		ratio: maxRSS, want: 255.99, atMost: true, cpu: math.NaN(), unit: " MiB"})

	table := func(ts []target) {
		pf("| target | figures | ratio (wall time) | ratio (CPU time) | result |\n|---|---|---|---|---|\n")
		for _, t := range ts {
			c := "–"
			if !math.IsNaN(t.cpu) {
				c = fmt.Sprintf("%.2fx", t.cpu)
			}
			r := "–"
			if !math.IsNaN(t.ratio) {
				r = fmt.Sprintf("%.2f%s", t.ratio, t.unit)
				if t.atMost && t.unit == "x" {
					r = fmt.Sprintf("%.3f%s", t.ratio, t.unit)
				}
			}
			pf("| %s | %s | %s | %s | %s |\n", t.what, t.figures, r, c, t.pass())
		}
	}
	pf("## Targets (issues 4 and 6), from the medians of this run\n\n")
	pf("With the default repository (4 MiB chunks):\n\n")
	table(ts)
	if len(b.Samples[full1M]) > 0 {
		pf("\nWith a repository of 1 MiB chunks (`repo init --chunk-size 1048576`, backing up the same VM in the same rounds with its own change-tracking chain):\n\n")
		table(targetsFor(full1M, inc1M, "changed chunk bytes, 1 MiB chunks", "1 MiB"))
	}
	if !b.HaveLV {
		pf("\nvirtnbdbackup was not measured: %s.\n", b.LVNote)
	}
	if b.HaveLibvirt {
		b.libvirtSection(pf, header, row, ratio, table)
	}
	pf("\n![throughput per tool](%s)\n", filepath.Base(b.chart))
	if len(b.Micro) > 0 {
		pf("\n## Microbenchmarks of the hot path\n\n")
		pf("`go test -bench` in internal/repo (4 MiB chunks: `usr` system files, `mixed` half random half text, `random`; the `Raw` rows are the bare primitives, i.e. what the CPU can do on one core), internal/backup (the whole pipeline on a 256 MiB mixed image, all cores, in memory and into a local directory), internal/nbd (our NBD client reading a 1 GiB export of qemu-nbd over 1, 2 and 4 connections, next to qemu-img convert and nbdcopy of the same export), internal/server (an incremental of 16 MiB of fresh random data in a 64 MiB disk of a real QEMU VM through the server's job, where the repository's key was derived once, next to the same through a CLI process per backup; one job backing up 1, 2 and 4 such VMs at once, with the server's peak heap). One run each, taken after the rounds above.\n\n")
		pf("%s", b.microTable())
		if secs := b.Floor.total(); secs > 0 {
			cores := float64(runtime.NumCPU())
			pf("\nCPU floor of the full backup of this test disk, measured on its own data on one thread with no I/O and no overhead at all: keyed BLAKE3 of every allocated chunk %.1f s, zstd (default level) of the system-file regions %.1f s, AES-256-GCM of what is stored %.1f s: %.1f s of CPU, so at least %.1f s of wall time on %.0f cores, against %.2f s for the read floor (qemu-img convert) in this run. ",
				b.Floor.Hash, b.Floor.Compress, b.Floor.Encrypt, secs, secs/cores, cores, med(fl, wall))
			if secs/cores > med(fl, wall)/0.8 {
				pf("So a full backup that compresses at the default zstd level (what keeps the repository about as small as restic's) cannot reach 0.8x the read floor on this machine; judge it by how close it comes to this CPU floor. ")
			}
			pf("vmshadow full used %.1f s of CPU (%.1fx the floor).\n", vfc, vfc/secs)
		}
	}
	if notes, err := os.ReadFile(filepath.Join(filepath.Dir(b.results), "notes.md")); err == nil {
		pf("\n%s", notes)
	}
	if err := os.WriteFile(b.results, []byte(w.String()), 0o644); err != nil {
		return err
	}
	if err := plot(ctx, b.chart, chart, gib(b.Size)); err != nil {
		return err
	}
	logf("wrote %s and %s", b.results, b.chart)
	return nil
}

func i64s(v []int64) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = float64(x)
	}
	return out
}

// plot draws the median throughput per step with the range as error bars.
func plot(ctx context.Context, png string, rows []string, disk string) error {
	if _, err := exec.LookPath("gnuplot"); err != nil {
		logf("gnuplot is not installed: no chart (scripts/deps.sh bench installs it)")
		return nil
	}
	dir, err := os.MkdirTemp("", "vmsbplot")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	data := filepath.Join(dir, "data")
	if err := os.WriteFile(data, []byte(strings.Join(rows, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	script := fmt.Sprintf(`set terminal pngcairo size 1400,650 font "sans,10"
set output %q
set title "Throughput per step (%s disk; median, bars: range over the rounds)"
set ylabel "MiB/s of disk (log scale)"
set logscale y
set style data histograms
set style histogram errorbars gap 1 lw 1
set style fill solid 0.8 border -1
set boxwidth 0.8
set xtics rotate by -30 left
set grid ytics
set key off
set yrange [*:*]
set bmargin 9
set rmargin 14
plot %q using 2:3:4:xtic(1) linecolor rgb "#3b75af", '' using 0:2:(sprintf("%%.0f", $2)) with labels offset 0,1 notitle
`, png, disk, data)
	sf := filepath.Join(dir, "plot.gp")
	if err := os.WriteFile(sf, []byte(script), 0o644); err != nil {
		return err
	}
	_, err = quiet(ctx, nil, "gnuplot", sf)
	return err
}

// libvirtSection writes the table of the libvirt domain's steps and how
// vmshadow and virtnbdbackup compare on it.
func (b *bench) libvirtSection(pf func(string, ...any), header func(), row func(string), ratio func(float64, float64) float64, table func([]target)) {
	med := func(name string, f func(sample) float64) float64 { return median(field(b.Samples[name], f)) }
	pf("\n## vmshadow and virtnbdbackup on one libvirt domain\n\n")
	pf("One transient libvirt domain (`type='qemu'`, the test disk as qcow2 v3 with `cache='none'`), the same writes, the same rounds: ")
	pf("both full backups (`vmshadow backup --libvirt %s --vm DOMAIN`, `virtnbdbackup -l full`) in the rotating order, the change above through the domain's device, both incrementals (`-l inc`), ", libvirtURI)
	pf("then both restores of the incremental backups: vmshadow `restore --format qcow2` to a file, and `virtnbdrestore` of the full and the incremental into a directory (qcow2, written through the qemu-nbd it forks; the harness reaps that daemon, so its CPU time counts in virtnbdrestore's). ")
	pf("Read from source for the restores: what the tool read (its repository or backup files); for the backups, what QEMU read from the image. ")
	pf("virtnbdbackup refuses a domain carrying another tool's checkpoint, so vmshadow's checkpoint leaves libvirt's metadata during virtnbdbackup's steps (`checkpoint-delete --metadata`: the bitmap stays in QEMU and records) and is redefined after (`checkpoint-create --redefine --redefine-validate`), untimed; see the notes.\n\n")
	header()
	for _, n := range lvOrder {
		row(n)
	}
	cpOK, same, cpFig := lvChecks(b.LV, b.HaveLV)
	sumOK := len(b.LV) > 0 && same == len(b.LV)
	var ts []target
	add := func(what, other, mine string) {
		ow, mw := med(other, wall), med(mine, wall)
		ts = append(ts, target{what: what, figures: fmt.Sprintf("%s %.2f s, vmshadow %.2f s", other, ow, mw),
			ratio: ratio(ow, mw), want: 2, cpu: ratio(med(other, cpu), med(mine, cpu)), unit: "x"})
	}
	if b.HaveLV {
		add("full backup >= 2x faster than virtnbdbackup's", vnbFull, lvFull)
		add("incremental >= 2x faster than virtnbdbackup's", vnbInc, lvInc)
		add("restore >= 2x faster than virtnbdrestore (the same bar; no target in the issues)", vnbRestore, lvRestore)
	}
	incRead, chunkBytes := median(i64s(b.Extra[lvInc])), median(i64s(b.Extra["changed chunk bytes"]))
	ts = append(ts, target{what: "incremental reads <= 1.1x the changed bytes rounded to 4 MiB chunks", figures: fmt.Sprintf("read %s, changed chunks %s", mib(int64(incRead)), mib(int64(chunkBytes))),
		ratio: ratio(incRead, chunkBytes), want: 1.1, atMost: true, cpu: math.NaN(), unit: "x"})
	ts = append(ts, target{what: "each tool's checkpoint marks exactly the change (64 KiB granules) before the incrementals, keeps it through the other tool's steps, and marks nothing after the round (libvirt's size estimate, MiB)",
		figures: strings.Join(cpFig, "; "), ratio: math.NaN(), cpu: math.NaN(), verdict: &cpOK})
	ts = append(ts, target{what: "restored images identical to the domain's disk after the change (SHA-256, the disk read through a libvirt pull-mode export of its own)",
		figures: fmt.Sprintf("%d of %d rounds", same, len(b.LV)), ratio: math.NaN(), cpu: math.NaN(), verdict: &sumOK})
	pf("\n")
	table(ts)
}

// lvChecks judges the rounds on the libvirt domain: cpOK when in every
// round each tool's checkpoint marked exactly the change before the
// incrementals, kept its size through the other tool's steps, and the new
// checkpoints marked nothing at the end; same counts the rounds whose
// restores (virtnbdrestore's only if it ran) had the domain's checksum;
// figures describes each round.
func lvChecks(rounds []lvRound, haveVNB bool) (cpOK bool, same int, figures []string) {
	mibs := func(n int64) string { return fmt.Sprintf("%.1f", float64(n)/(1<<20)) }
	cpOK = len(rounds) > 0
	for i, lr := range rounds {
		var names []string
		for name := range lr.Base {
			names = append(names, name)
		}
		slices.Sort(names)
		slices.Reverse(names) // vmshadow-... before virtnbdbackup.N
		f := fmt.Sprintf("round %d: change %s", i+1, mibs(lr.Changed))
		if want := 1 + boolInt(haveVNB); len(names) != want || len(lr.After) != want {
			cpOK = false
		}
		for _, name := range names {
			n := lr.Base[name]
			tool, _, _ := strings.Cut(name, "-")
			tool, _, _ = strings.Cut(tool, ".")
			f += fmt.Sprintf(", %s %s", tool, mibs(n))
			if n != lr.Changed {
				cpOK = false
			}
		}
		if len(lr.Moved) > 0 {
			cpOK = false
			f += " (moved: " + strings.Join(lr.Moved, "; ") + ")"
		}
		for _, name := range slices.Sorted(maps.Keys(lr.After)) {
			if n := lr.After[name]; n != 0 {
				cpOK = false
				f += fmt.Sprintf(" (%s marks %s after the round)", name, mibs(n))
			}
		}
		figures = append(figures, f)
		if lr.Domain != "" && lr.Vmshadow == lr.Domain && (!haveVNB || lr.Virtnbd == lr.Domain) {
			same++
		}
	}
	return cpOK, same, figures
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
