package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// runKilled runs vmshadow --json and kills it with SIGKILL after delay
// (never when delay is 0: then only a crashpoint in env can kill it). It
// reports whether the process died of the kill.
func runKilled(t *testing.T, env []string, delay time.Duration, args ...string) (result, bool) {
	t.Helper()
	cmd, wait := startVmshadow(t, env, args...)
	if delay > 0 {
		timer := time.AfterFunc(delay, func() { cmd.Process.Kill() })
		defer timer.Stop()
	}
	r := wait()
	return r, r.code == 128+int(syscall.SIGKILL)
}

// faultCase is one command of the fault matrix.
type faultCase struct {
	name   string
	random int      // runs killed after a random delay
	points []string // runs killed at these crashpoints (VMSHADOW_CRASH_AT)
	// span measures (with a run that is not killed, checked like the
	// others) how long the command takes: random delays fall in [0, span).
	span    func(t *testing.T) time.Duration
	prepare func(t *testing.T) // before each run
	run     func(t *testing.T, env []string, delay time.Duration) (result, bool)
	// check runs after each run: the invariants of the command after a
	// kill (killed) or a normal end, and that the next run works.
	check func(t *testing.T, killed bool, res result)
}

// faultRig holds what the cases share: a repository of image backups, the
// image, an encrypted repository for passwd, one live VM.
type faultRig struct {
	t       *testing.T
	rng     *rand.Rand
	dir     string
	env     []string
	repo    string
	img     string // the disk image backed up as VM "img"
	last    string // the newest backup of "img", matching img's content
	encRepo string
	pw      string // encRepo's password
	pwN     int
	point   string // the crashpoint of the current run, "" for a random kill
}

func (f *faultRig) ok(what string, res result) result {
	f.t.Helper()
	if res.code != 0 {
		f.t.Fatalf("%s: exit %d: %s %s", what, res.code, res.errorMessage(), res.stderr)
	}
	return res
}

func (f *faultRig) vs(args ...string) result {
	f.t.Helper()
	return vmshadow(f.t, f.env, args...)
}

func (f *faultRig) verify(t *testing.T, repo string, env ...string) {
	t.Helper()
	if res := vmshadow(t, append(f.env, env...), "verify", "--repo", repo); res.code != 0 {
		t.Fatalf("verify %s after the run: exit %d: %s", repo, res.code, res.errorMessage())
	}
}

// fill writes varied content (random bytes, text, zeros) over b.
func fill(rng *rand.Rand, b []byte) {
	const seg = 64 << 10
	for off := 0; off < len(b); off += seg {
		s := b[off:min(off+seg, len(b))]
		switch rng.IntN(4) {
		case 0, 1:
			for i := range s {
				s[i] = byte(rng.Uint32())
			}
		case 2:
			for i := range s {
				s[i] = "vmshadow fault matrix "[i%22]
			}
		default:
			clear(s)
		}
	}
}

// mutate rewrites a random MiB of an image file.
func (f *faultRig) mutate(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	off := f.rng.IntN(len(b)/(1<<20)) << 20
	fill(f.rng, b[off:off+1<<20])
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (f *faultRig) newImage(t *testing.T, name string, size int) string {
	t.Helper()
	b := make([]byte, size)
	fill(f.rng, b)
	p := filepath.Join(f.dir, name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// sameImage fails the test unless path (in format) holds f.img's content.
func (f *faultRig) sameImage(t *testing.T, path, format string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "compare", "-q", "-f", format, "-F", "raw", path, f.img).CombinedOutput()
	if err != nil {
		t.Fatalf("%s exists under its final name but is not the backup's image: qemu-img compare: %v %s", path, err, out)
	}
}

// opens reports whether password opens the encrypted repository; when it
// does, the repository verifies.
func (f *faultRig) opens(t *testing.T, password string) bool {
	t.Helper()
	res := vmshadow(t, append(f.env, "VMSHADOW_PASSWORD="+password), "verify", "--repo", f.encRepo)
	switch res.code {
	case 0:
		return true
	case 7: // errs.ErrAuth: wrong password
		return false
	}
	t.Fatalf("verify %s with password %q: exit %d: %s", f.encRepo, password, res.code, res.errorMessage())
	return false
}

// TestFaultMatrix kills vmshadow (SIGKILL, as kill -9 or the OOM killer
// would) at random moments of every command that writes or locks
// something, and at the crashpoints of those commands: after each kill the
// repository verifies, the next run works, and nothing looks complete that
// is not. The random delays are seeded; the seed is logged and
// VMSHADOW_FAULT_SEED=N replays a run.
func TestFaultMatrix(t *testing.T) {
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "qemu-img")
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("VMSHADOW_FAULT_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("VMSHADOW_FAULT_SEED=%q: %v", s, err)
		}
		seed = n
	}
	t.Logf("seed %d (replay with VMSHADOW_FAULT_SEED=%d)", seed, seed)
	state, env := stateEnv(t)
	f := &faultRig{t: t, rng: rand.New(rand.NewPCG(seed, 1)), dir: t.TempDir(), env: env, repo: filepath.Join(state, "repo")}
	f.ok("repo init", f.vs("repo", "init", "--repo", f.repo, "--encryption", "none", "--chunk-size", "262144"))
	f.img = f.newImage(t, "img.raw", 24<<20)
	small := f.newImage(t, "small.raw", 2<<20)
	f.last = f.ok("backup", f.vs("backup", "--repo", f.repo, "--vm", "img", "--disk", "sda="+f.img)).summary(t)["backup_id"].(string)

	// timed runs a command that must succeed and returns how long it took.
	timed := func(t *testing.T, c *faultCase) time.Duration {
		t.Helper()
		c.prepare(t)
		start := time.Now()
		res, _ := c.run(t, nil, 0)
		d := time.Since(start)
		c.check(t, false, res)
		return d
	}
	plain := func(args func() []string) func(t *testing.T, env []string, delay time.Duration) (result, bool) {
		return func(t *testing.T, env []string, delay time.Duration) (result, bool) {
			return runKilled(t, append(f.env, env...), delay, args()...)
		}
	}
	restoreCase := func(format string) faultCase {
		to := filepath.Join(f.dir, "restore-"+format, "sda."+format)
		os.Mkdir(filepath.Dir(to), 0o700)
		args := func() []string { return []string{"restore", "--repo", f.repo, f.last, "--to", to, "--format", format} }
		return faultCase{
			name: "restore " + format, random: 3,
			prepare: func(t *testing.T) { os.Remove(to) }, // what a killed run left stays
			run:     plain(args),
			check: func(t *testing.T, killed bool, res result) {
				if _, err := os.Lstat(to); err == nil {
					f.sameImage(t, to, format) // the kill came after the image was complete
				} else {
					if !killed {
						t.Fatalf("restore ended with exit %d and no %s", res.code, to)
					}
					f.ok("restore after a killed one", f.vs(args()...))
					f.sameImage(t, to, format)
				}
				if ents, _ := os.ReadDir(filepath.Dir(to)); len(ents) != 1 {
					var names []string
					for _, e := range ents {
						names = append(names, e.Name())
					}
					t.Fatalf("after a complete restore the directory holds %q, want only %s", names, filepath.Base(to))
				}
			},
		}
	}
	sock := filepath.Join(state, "serve.sock")
	serveArgs := func() []string { return []string{"serve", "--repo", f.repo, f.last, "--listen", "unix:" + sock} }
	serveRig := &liveRig{t: t, env: f.env, repo: f.repo}
	// serveCheck serves the backup, compares the export with the image and
	// stops serve, which must end cleanly.
	serveCheck := func(t *testing.T, extra ...string) {
		serveRig.t = t
		uris, stop := serveRig.serveBackup(append([]string{f.last, "--listen", "unix:" + sock}, extra...)...)
		if out, err := exec.Command("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", uris["sda"], f.img).CombinedOutput(); err != nil {
			t.Fatalf("served backup differs from the image: %v %s", err, out)
		}
		if res := stop(); res.code != 0 {
			t.Fatalf("serve stopped with exit %d", res.code)
		}
	}
	pwNext := func() string { return fmt.Sprintf("password %d", f.pwN+1) }
	deadOverlays := -1 // overlays killed serves left (the serve --writable case; -1: not run)

	cases := []faultCase{
		{
			name: "backup --disk", random: 3,
			prepare: func(t *testing.T) { f.mutate(t, f.img) },
			run: plain(func() []string {
				return []string{"backup", "--repo", f.repo, "--vm", "img", "--disk", "sda=" + f.img}
			}),
			check: func(t *testing.T, killed bool, res result) {
				if !killed {
					f.ok("backup", res)
				}
				// The next backup works (and the restore cases restore it).
				f.last = f.ok("backup after the run", f.vs("backup", "--repo", f.repo, "--vm", "img", "--disk", "sda="+f.img)).summary(t)["backup_id"].(string)
			},
		},
		restoreCase("raw"),
		restoreCase("qcow2"),
		{
			name: "serve", random: 3,
			span: func(t *testing.T) time.Duration {
				start := time.Now()
				serveCheck(t)
				return time.Since(start) + 500*time.Millisecond // also kill while serving
			},
			prepare: func(t *testing.T) {},
			run:     plain(serveArgs),
			check: func(t *testing.T, killed bool, res result) {
				if !killed {
					t.Fatalf("serve ended by itself: exit %d %s", res.code, res.errorMessage())
				}
				// The lock the killed serve held is not stuck: an exclusive
				// lock can be taken, and a later serve works.
				f.ok("gc --dry-run after a killed serve", f.vs("gc", "--repo", f.repo, "--dry-run"))
				serveCheck(t)
			},
		},
		{
			name: "serve --writable", random: 3,
			span: func(t *testing.T) time.Duration {
				start := time.Now()
				serveCheck(t, "--writable")
				deadOverlays = 0
				return time.Since(start) + 500*time.Millisecond
			},
			prepare: func(t *testing.T) {},
			run: plain(func() []string {
				return []string{"serve", "--repo", f.repo, f.last, "--listen", "unix:" + sock, "--writable"}
			}),
			check: func(t *testing.T, killed bool, res result) {
				if !killed {
					t.Fatalf("serve ended by itself: exit %d %s", res.code, res.errorMessage())
				}
				dead := overlays(t, state)
				t.Logf("the killed serve left %q", dead)
				deadOverlays += len(dead)
				// A new writable serve removes the dead one's overlay ...
				serveRig.t = t
				_, stopLive := serveRig.serveBackup(f.last, "--listen", "unix:"+filepath.Join(state, "live.sock"), "--writable")
				live := overlays(t, state)
				if len(live) != 1 || slices.Contains(dead, live[0]) {
					t.Fatalf("with one serve --writable running after a killed one, the overlays are %q (the killed one left %q)", live, dead)
				}
				// ... and another one leaves the running one's alone.
				serveCheck(t, "--writable")
				if now := overlays(t, state); !slices.Equal(now, live) {
					t.Fatalf("after a second serve --writable the overlays are %q, want the running serve's %q", now, live)
				}
				if res := stopLive(); res.code != 0 {
					t.Fatalf("serve stopped with exit %d", res.code)
				}
				if now := overlays(t, state); len(now) != 0 {
					t.Fatalf("overlays %q left after every serve stopped", now)
				}
			},
		},
		{
			name: "prune", random: 2, points: []string{"prune-removed"},
			prepare: func(t *testing.T) {
				for range 2 {
					f.mutate(t, small)
					f.ok("backup", f.vs("backup", "--repo", f.repo, "--vm", "small", "--disk", "sda="+small))
				}
			},
			run: plain(func() []string { return []string{"prune", "--repo", f.repo, "--vm", "small", "--keep-last", "1"} }),
			check: func(t *testing.T, killed bool, res result) {
				if !killed {
					f.ok("prune", res)
				}
				if n := len(f.ok("prune after the run", f.vs("prune", "--repo", f.repo, "--vm", "small", "--keep-last", "1")).summary(t)["backups"].([]any)); n < 1 {
					t.Fatalf("prune after the run decided on %d backups", n)
				}
				if n := len(f.ok("backups", f.vs("backups", "--repo", f.repo, "--vm", "small")).summary(t)["backups"].([]any)); n != 1 {
					t.Fatalf("%d backups of small after prune --keep-last 1", n)
				}
			},
		},
		{
			name: "gc", random: 2, points: []string{"gc-deleted"},
			prepare: func(t *testing.T) {
				// Garbage: a backup of other data, pruned.
				junk := f.newImage(t, "junk.raw", 4<<20)
				for range 2 {
					f.mutate(t, junk)
					f.ok("backup", f.vs("backup", "--repo", f.repo, "--vm", "junk", "--disk", "sda="+junk))
				}
				f.ok("prune", f.vs("prune", "--repo", f.repo, "--vm", "junk", "--keep-last", "1"))
			},
			run: plain(func() []string { return []string{"gc", "--repo", f.repo, "--grace", "1ns"} }),
			check: func(t *testing.T, killed bool, res result) {
				if !killed {
					f.ok("gc", res)
				}
				f.ok("gc after the run", f.vs("gc", "--repo", f.repo, "--grace", "1ns"))
				sum := f.ok("gc --dry-run", f.vs("gc", "--repo", f.repo, "--grace", "1ns", "--dry-run")).summary(t)
				if num(sum["chunks_deleted"]) != 0 || num(sum["indexes_deleted"]) != 0 {
					t.Fatalf("garbage left after gc ran to its end: %v", sum)
				}
			},
		},
		{
			name: "repo passwd", random: 1, points: []string{"passwd-key-written"},
			prepare: func(t *testing.T) {
				if f.encRepo != "" {
					return
				}
				f.encRepo = filepath.Join(state, "enc")
				f.pw = "password 0"
				env := append(f.env, "VMSHADOW_PASSWORD="+f.pw)
				f.ok("repo init", vmshadow(t, env, "repo", "init", "--repo", f.encRepo))
				f.ok("backup", vmshadow(t, env, "backup", "--repo", f.encRepo, "--vm", "small", "--disk", "sda="+small))
			},
			run: func(t *testing.T, env []string, delay time.Duration) (result, bool) {
				env = append(append(f.env, env...), "VMSHADOW_PASSWORD="+f.pw, "VMSHADOW_NEW_PASSWORD="+pwNext())
				return runKilled(t, env, delay, "repo", "passwd", "--repo", f.encRepo)
			},
			check: func(t *testing.T, killed bool, res result) {
				old, next := f.pw, pwNext()
				oldOK, newOK := f.opens(t, old), f.opens(t, next)
				switch {
				case !killed:
					f.ok("repo passwd", res)
					if oldOK || !newOK {
						t.Fatalf("after repo passwd: old password opens %v, new %v", oldOK, newOK)
					}
				case !oldOK && !newOK:
					t.Fatal("after a killed repo passwd neither the old nor the new password opens the repository")
				case f.point == "passwd-key-written" && !(oldOK && newOK):
					// Killed between writing the new key file and removing
					// the old: both open the repository until the command
					// is run again.
					t.Fatalf("killed with both key files written: old password opens %v, new %v", oldOK, newOK)
				}
				if oldOK && newOK {
					// The user changes the password again, from the new
					// one: afterwards only the newest opens the repository
					// (the old key file does not stay behind).
					newest := fmt.Sprintf("password %d", f.pwN+2)
					f.ok("repo passwd from the new password", vmshadow(t, append(f.env, "VMSHADOW_PASSWORD="+next, "VMSHADOW_NEW_PASSWORD="+newest), "repo", "passwd", "--repo", f.encRepo))
					if o, n, nn := f.opens(t, old), f.opens(t, next), f.opens(t, newest); o || n || !nn {
						t.Fatalf("after repo passwd from the new password: the old password opens %v, the new %v, the newest %v", o, n, nn)
					}
					f.pw = newest
					f.pwN += 2
					return
				}
				if oldOK {
					// The user runs the command again: afterwards only the
					// new password opens the repository.
					f.ok("repo passwd again", vmshadow(t, append(f.env, "VMSHADOW_PASSWORD="+old, "VMSHADOW_NEW_PASSWORD="+next), "repo", "passwd", "--repo", f.encRepo))
					if f.opens(t, old) || !f.opens(t, next) {
						t.Fatal("after running repo passwd again the old password still opens the repository, or the new one does not")
					}
				}
				f.pw = next
				f.pwN++
			},
		},
	}
	for i := range cases {
		c := &cases[i]
		t.Run(c.name, func(t *testing.T) { f.t = t; runFaultCase(t, f, c, timed) })
	}
	if deadOverlays == 0 && !t.Failed() {
		t.Error("no killed serve --writable left an overlay: the clean-up was not tested")
	}
	f.t = t
	t.Run("backup --qmp", func(t *testing.T) { liveFaultCase(t, f) })
}

// overlays lists the overlay files of serve --writable in state.
func overlays(t *testing.T, state string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(state, "serve", "*.overlay"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// runFaultCase measures a command's span, then runs it killed at random
// moments and at its crashpoints, checking after each.
func runFaultCase(t *testing.T, f *faultRig, c *faultCase, timed func(*testing.T, *faultCase) time.Duration) {
	verify := func(t *testing.T) { f.verify(t, f.repo) } // the passwd case verifies its repository with each password
	var span time.Duration
	if c.span != nil {
		span = c.span(t)
	} else {
		span = timed(t, c)
	}
	var kills []string
	for range c.random {
		kills = append(kills, "")
	}
	kills = append(kills, c.points...)
	killedAny := false
	for _, point := range kills {
		c.prepare(t)
		f.point = point
		var env []string
		var delay time.Duration
		if point == "" {
			delay = time.Duration(f.rng.Int64N(int64(span))) + 1
			t.Logf("kill after %v (of a %v run)", delay.Round(time.Millisecond), span.Round(time.Millisecond))
		} else {
			env = []string{"VMSHADOW_CRASH_AT=" + point}
			t.Logf("kill at crashpoint %s", point)
		}
		res, killed := c.run(t, env, delay)
		if point != "" && !killed {
			t.Fatalf("not killed at crashpoint %s: exit %d %s", point, res.code, res.errorMessage())
		}
		if point == "" {
			killedAny = killedAny || killed
			if !killed {
				t.Logf("the run ended (exit %d) before the kill", res.code)
			}
		}
		c.check(t, killed, res)
		verify(t)
	}
	if c.random > 0 && len(c.points) == 0 && !killedAny {
		t.Errorf("none of the %d random kills hit a running %s: the matrix tested nothing", c.random, c.name)
	}
}

// liveFaultCase kills live backups of a running QEMU VM at random moments
// and at crashpoints of the snapshot set; the next backup recovers what the
// killed one left (the VM runs, its block graph is as before, change
// tracking continues) and restores bit-identical.
func liveFaultCase(t *testing.T, f *faultRig) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 16 << 20}}})
	r := newLiveRig(t, vm, false)
	r.rng = f.rng
	vm.Write("vda", 0x3c, 0, 16<<20)
	r.scatter("vda", 8, map[int64]bool{})
	start := time.Now()
	r.backup()
	span := time.Since(start)
	kills := []string{"", "", "qemu-paused", "backup-read"}
	for _, point := range kills {
		r.scatter("vda", 3, map[int64]bool{})
		before := r.baseline()
		var env []string
		var delay time.Duration
		if point == "" {
			delay = time.Duration(f.rng.Int64N(int64(span))) + 1
			t.Logf("kill after %v (of a %v run)", delay.Round(time.Millisecond), span.Round(time.Millisecond))
		} else {
			env = []string{"VMSHADOW_CRASH_AT=" + point}
			t.Logf("kill at crashpoint %s", point)
		}
		res, killed := runKilled(t, append(r.env, env...), delay, "backup", "--repo", r.repo, "--qmp", vm.QMPPath)
		if !killed && (point != "" || res.code != 0) {
			t.Fatalf("backup not killed (point %q): exit %d %s", point, res.code, res.errorMessage())
		}
		f.verify(t, r.repo)
		r.scatter("vda", 2, map[int64]bool{})
		want := r.expected()
		sum := r.backupFrom(before) // the VM as before the killed backup: running, nothing of either set left
		r.restoreCompare(sum["backup_id"].(string), want)
		if bm := r.ourBitmaps(); len(bm) != 1 {
			t.Fatalf("vmshadow bitmaps = %v, want one", bm)
		}
	}
}
