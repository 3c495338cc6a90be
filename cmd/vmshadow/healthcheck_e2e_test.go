package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/guestvm"
	"github.com/vmshadow/vmshadow/internal/libvirttest"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// repoFiles lists the files of a local repository with their size and
// modification time, but for locks (every command takes one) and health
// records (what healthcheck writes).
func repoFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() && (rel == "locks" || rel == "health") {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			out = append(out, fmt.Sprintf("%s %d %d", rel, fi.Size(), fi.ModTime().UnixNano()))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// leftovers says what a health check left behind: entries in its temporary
// directory, or a process still naming it.
func leftovers(t *testing.T, tmp string) string {
	t.Helper()
	ents, err := os.ReadDir(tmp)
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, e := range ents {
		left = append(left, e.Name())
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), tmp+"/") {
			left = append(left, "process "+filepath.Base(filepath.Dir(p))+": "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return strings.Join(left, ", ")
}

// healthOf is the "health" object of backup id in `backups --json`, or nil.
func healthOf(t *testing.T, env []string, repoDir, id string) map[string]any {
	t.Helper()
	res := vmshadow(t, env, "backups", "--repo", repoDir)
	if res.code != 0 {
		t.Fatalf("backups: exit %d: %s", res.code, res.errorMessage())
	}
	for _, b := range res.summary(t)["backups"].([]any) {
		b := b.(map[string]any)
		if b["id"] == id {
			h, _ := b["health"].(map[string]any)
			return h
		}
	}
	t.Fatalf("backup %s not listed", id)
	return nil
}

// TestHealthcheck boots backups of the bootable test guest disk (MBR,
// syslinux, kernel and initramfs on the disk, qemu-ga started by init) in
// real QEMU: the intact backup passes (guest-ping answered; --script
// /bin/true passes, /bin/false fails with its exit code), a backup of the
// disk with its boot sector wiped fails with exit code 5 and the
// firmware's "No bootable device" within its short timeout, a damaged chunk
// under the boot sector is reported (exit code 8) instead of booted from.
// Each result shows in `backups --json`; the repository is never written
// but for the health records; nothing is left behind.
func TestHealthcheck(t *testing.T) {
	img := guestvm.BootDiskForTest(t)
	dir := t.TempDir()
	state, env := stateEnv(t)
	env = append(env, "VMSHADOW_PASSWORD=hc-test")
	repoDir := filepath.Join(state, "repo")
	if res := vmshadow(t, env, "repo", "init", "--repo", repoDir); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	good := filepath.Join(dir, "boot.img")
	wiped := filepath.Join(dir, "wiped.img")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(good, b, 0o600); err != nil {
		t.Fatal(err)
	}
	clear(b[:512])
	if err := os.WriteFile(wiped, b, 0o600); err != nil {
		t.Fatal(err)
	}
	backup := func(vmName, path string) string {
		t.Helper()
		res := vmshadow(t, env, "backup", "--repo", repoDir, "--vm", vmName, "--disk", "vda="+path)
		if res.code != 0 {
			t.Fatalf("backup %s: exit %d: %s", vmName, res.code, res.errorMessage())
		}
		return res.summary(t)["backup_id"].(string)
	}
	goodID := backup("svhealth-boot", good)
	wipedID := backup("svhealth-wiped", wiped)
	if h := healthOf(t, env, repoDir, goodID); h != nil {
		t.Fatalf("never checked, yet backups shows health %v", h)
	}
	tmp, err := os.MkdirTemp("", "hc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	before := repoFiles(t, repoDir)
	// check runs healthcheck; the repository must be as before but for
	// the health records and the files in moved (damaged chunks moved to
	// the quarantine by the read that found them).
	check := func(t *testing.T, id string, moved []string, args ...string) (result, map[string]any, time.Duration) {
		t.Helper()
		start := time.Now()
		res := vmshadow(t, env, append([]string{"healthcheck", "--repo", repoDir, id, "--temp-dir", tmp}, args...)...)
		took := time.Since(start)
		if left := leftovers(t, tmp); left != "" {
			t.Fatalf("healthcheck left behind: %s", left)
		}
		want := before
		if moved != nil {
			want = nil
			for _, f := range before {
				if !strings.HasPrefix(f, moved[0]+" ") {
					want = append(want, f)
				}
			}
		}
		after := repoFiles(t, repoDir)
		var got []string
		for _, f := range after {
			if moved != nil && strings.HasPrefix(f, moved[1]+" ") {
				continue
			}
			got = append(got, f)
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") || (moved != nil && len(got) == len(after)) {
			t.Fatalf("healthcheck changed the repository beyond its health record (moved %v):\nbefore %v\nafter  %v", moved, before, after)
		}
		var h map[string]any
		for _, m := range res.msgs {
			if m["message_type"] == "summary" {
				h, _ = m["health"].(map[string]any)
			}
		}
		if h == nil {
			t.Fatalf("healthcheck gave no result: exit %d: %s %s", res.code, res.errorMessage(), res.stderr)
		}
		return res, h, took
	}

	t.Run("passes", func(t *testing.T) {
		res, h, _ := check(t, goodID, nil, "--timeout", "5m", "--script", "/bin/true")
		if res.code != 0 {
			t.Fatalf("healthcheck of the bootable backup: exit %d: %s\n%v", res.code, res.errorMessage(), res.msgs)
		}
		if h["result"] != "passed" || h["boot"] != "defaults" || h["script_exit"] != 0.0 {
			t.Fatalf("health = %v, want passed, booted with defaults, script_exit 0", h)
		}
		if a, _ := h["answer_s"].(float64); a <= 0 || a > 300 {
			t.Fatalf("answer_s = %v, want the seconds to the agent's answer", h["answer_s"])
		}
		t.Logf("boot to guest-ping: %.1f s under %v", h["answer_s"], h["accel"])
		got := healthOf(t, env, repoDir, goodID)
		if got["result"] != "passed" || got["answer_s"] != h["answer_s"] || got["time"] != h["time"] {
			t.Fatalf("backups --json health = %v, want the result just recorded %v", got, h)
		}
	})

	t.Run("script fails", func(t *testing.T) {
		res, h, _ := check(t, goodID, nil, "--timeout", "5m", "--script", "/bin/false")
		if res.code != 1 {
			t.Fatalf("--script /bin/false: exit %d, want 1: %s", res.code, res.errorMessage())
		}
		if h["result"] != "failed" || h["script_exit"] != 1.0 || !strings.Contains(fmt.Sprint(h["reason"]), "/bin/false exited 1") {
			t.Fatalf("health = %v, want failed with script_exit 1", h)
		}
		got := healthOf(t, env, repoDir, goodID)
		if got["result"] != "failed" || got["last_passed"] == nil {
			t.Fatalf("backups --json health = %v, want the failure, with when it last passed", got)
		}
	})

	t.Run("wiped boot sector", func(t *testing.T) {
		res, h, took := check(t, wipedID, nil, "--timeout", "20s")
		if res.code != 5 {
			t.Fatalf("healthcheck of a disk without boot sector: exit %d, want 5: %s", res.code, res.errorMessage())
		}
		reason := fmt.Sprint(h["reason"])
		if h["result"] != "failed" || !strings.Contains(reason, "did not answer within 20s") || !strings.Contains(reason, "No bootable device") {
			t.Fatalf("health = %v, want failed, no answer within 20s, the firmware's No bootable device", h)
		}
		if !strings.Contains(res.errorMessage(), "No bootable device") {
			t.Fatalf("error %q does not say why", res.errorMessage())
		}
		if took > 90*time.Second {
			t.Fatalf("a 20 s timeout took %s", took)
		}
		if got := healthOf(t, env, repoDir, wipedID); got["result"] != "failed" || got["reason"] != h["reason"] {
			t.Fatalf("backups --json health = %v, want %v", got, h)
		}
		txt := vm(t, env, "backups", "--repo", repoDir)
		if !strings.Contains(txt.stdout, "HEALTH") || !strings.Contains(txt.stdout, "failed ") {
			t.Fatalf("backups does not show the health column:\n%s", txt.stdout)
		}
	})

	t.Run("interrupted", func(t *testing.T) {
		// SIGTERM while the VM boots (the wiped disk never answers): exit
		// 130 promptly, nothing recorded, nothing left.
		was := healthOf(t, env, repoDir, wipedID)
		cmd, wait := startVmshadow(t, env, "healthcheck", "--repo", repoDir, wipedID, "--temp-dir", tmp, "--timeout", "5m")
		deadline := time.Now().Add(time.Minute)
		for {
			con, _ := filepath.Glob(filepath.Join(tmp, "*", "console.log"))
			if len(con) > 0 {
				if b, _ := os.ReadFile(con[0]); len(b) > 0 {
					break // QEMU runs
				}
			}
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				t.Fatalf("the health check's VM did not start within a minute: %s", leftovers(t, tmp))
			}
			time.Sleep(100 * time.Millisecond)
		}
		start := time.Now()
		cmd.Process.Signal(syscall.SIGTERM)
		res := wait()
		if res.code != 130 {
			t.Fatalf("healthcheck after SIGTERM: exit %d, want 130: %s", res.code, res.errorMessage())
		}
		if took := time.Since(start); took > 15*time.Second {
			t.Fatalf("healthcheck took %s to end after SIGTERM", took)
		}
		if left := leftovers(t, tmp); left != "" {
			t.Fatalf("interrupted healthcheck left behind: %s", left)
		}
		if now := healthOf(t, env, repoDir, wipedID); now["time"] != was["time"] {
			t.Fatalf("an interrupted check was recorded: %v (before %v)", now, was)
		}
	})

	t.Run("damaged chunk", func(t *testing.T) {
		chunk := damageFirstChunk(t, repoDir, goodID, "hc-test")
		before = repoFiles(t, repoDir) // the damage itself
		moved := []string{"chunks/" + chunk[:2] + "/" + chunk, "quarantine/" + chunk}
		res, h, _ := check(t, goodID, moved, "--timeout", "2m")
		if res.code != 8 {
			t.Fatalf("healthcheck over a damaged boot sector chunk: exit %d, want 8: %s", res.code, res.errorMessage())
		}
		if h["result"] != "failed" || !strings.Contains(fmt.Sprint(h["reason"]), "chunk") || h["answer_s"] != 0.0 {
			t.Fatalf("health = %v, want failed, naming the chunk, never answered", h)
		}
	})
}

// damageFirstChunk flips a byte in the chunk holding the first bytes of
// backup id's first disk (the boot sector) and returns the chunk's name.
func damageFirstChunk(t *testing.T, repoDir, id, password string) string {
	t.Helper()
	ctx := context.Background()
	be, err := local.Open(repoDir)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	r, err := repo.Open(ctx, be, func() ([]byte, error) { return []byte(password), nil })
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	bid, err := repo.ParseID(id)
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.LoadManifest(ctx, bid)
	if err != nil {
		t.Fatal(err)
	}
	xid, err := repo.ParseID(m.Disks[0].Index)
	if err != nil {
		t.Fatal(err)
	}
	x, err := r.LoadIndex(ctx, xid)
	if err != nil {
		t.Fatal(err)
	}
	p, err := backend.Handle{Kind: backend.KindChunks, Name: x.ID(0).String()}.Path()
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(repoDir, filepath.FromSlash(p))
	blob, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	blob[len(blob)/2] ^= 1
	if err := os.WriteFile(f, blob, 0o600); err != nil {
		t.Fatal(err)
	}
	return x.ID(0).String()
}

// TestHealthcheckLiveS3 backs the bootable test guest up live (backup
// --qmp --qga of the running VM booted from its disk by SeaBIOS) into an
// S3 repository, and the backup passes the health check there; then prune
// of that backup removes its health record and gc keeps the others.
func TestHealthcheckLiveS3(t *testing.T) {
	img := guestvm.BootDiskForTest(t)
	s := newS3Rig(t)
	dir := guestvm.TempDir(t)
	disk := filepath.Join(dir, "boot.raw")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(disk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	vm := guestvm.StartForTest(t, guestvm.Options{Dir: dir, DataDisks: []guestvm.Disk{{Path: disk}}, BootFromDisk: true})
	if !strings.Contains(vm.Console(), "SYSLINUX") {
		t.Fatalf("the guest did not boot through its disk's bootloader; console:\n%s", vm.Console())
	}
	repoURL := s.url("svhealth-live", false)
	s.ok("repo", "init", "--repo", repoURL)
	sum := s.ok("backup", "--repo", repoURL, "--qmp", vm.QMPSocket, "--qga", vm.AgentSocket, "--vm", "svhealth-live")
	id := sum["backup_id"].(string)
	if sum["source"] != "qemu" {
		t.Fatalf("backup summary %v: want a live qemu backup", sum)
	}
	vm.Kill() // the health check boots the backup, not this VM
	tmp, err := os.MkdirTemp("", "hc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	res := s.run(nil, "healthcheck", "--repo", repoURL, id, "--timeout", "5m", "--temp-dir", tmp)
	if res.code != 0 {
		t.Fatalf("healthcheck of the live backup: exit %d: %s %s", res.code, res.errorMessage(), res.stderr)
	}
	h := res.summary(t)["health"].(map[string]any)
	if h["result"] != "passed" || h["boot"] != "defaults" {
		t.Fatalf("health = %v, want passed with defaults", h)
	}
	if left := leftovers(t, tmp); left != "" {
		t.Fatalf("healthcheck left behind: %s", left)
	}
	if n := s3Objects(s, "svhealth-live/health/"); n != 1 {
		t.Fatalf("%d health records in the bucket, want 1", n)
	}
	got := healthOf(t, s.env, repoURL, id)
	if got["result"] != "passed" || got["time"] != h["time"] {
		t.Fatalf("backups --json health = %v, want %v", got, h)
	}
	// A second backup, unchecked; prune keeps it and removes the checked one
	// with its record.
	vm2 := guestvm.StartForTest(t, guestvm.Options{DataDisks: []guestvm.Disk{{Path: disk}}, BootFromDisk: true})
	s.ok("backup", "--repo", repoURL, "--qmp", vm2.QMPSocket, "--qga", vm2.AgentSocket, "--vm", "svhealth-live")
	vm2.Kill()
	s.ok("prune", "--repo", repoURL, "--keep-last", "1")
	if n := s3Objects(s, "svhealth-live/health/"); n != 0 {
		t.Fatalf("%d health records left after the checked backup was pruned", n)
	}
}

// s3Objects counts the objects under prefix in the rig's bucket (the
// server's files).
func s3Objects(s *s3Rig, prefix string) int {
	n := 0
	filepath.WalkDir(filepath.Join(s.srv.Dir, s.bucket, prefix), func(p string, e fs.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() {
			n++
		}
		return nil
	})
	return n
}

// TestHealthcheckLibvirtDefinition backs up libvirt domains booting the
// bootable test guest from its disk, through SeaBIOS (384 MiB) and through
// OVMF (UEFI, 448 MiB, an NVRAM libvirt keeps), and the health check boots
// each backup with its stored definition's hardware, not the defaults: the
// UEFI one with OVMF and a copy of the stored NVRAM.
func TestHealthcheckLibvirtDefinition(t *testing.T) {
	img := guestvm.BootDiskForTest(t)
	testutil.NeedCommand(t, "qemu-img")
	for _, tc := range []struct {
		name    string
		image   string
		uefi    bool
		machine string
	}{
		{"bios", img, false, "definition (384 MiB, 1 vCPU, BIOS, pc), disks vda on virtio"},
		{"uefi", guestvm.UEFIBootDisk(img), true, "definition (448 MiB, 1 vCPU, UEFI, pc), disks vda on virtio"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := libvirttest.TempDir(t)
			disk := filepath.Join(dir, "boot.qcow2")
			if out, err := exec.Command("qemu-img", "convert", "-O", "qcow2", tc.image, disk).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img convert: %v: %s", err, out)
			}
			var rnd [4]byte
			rand.Read(rnd[:])
			mem := 384
			if tc.uefi {
				mem = 448
			}
			d := libvirttest.NewDomain(t, libvirttest.Options{Name: "svhealth-" + hex.EncodeToString(rnd[:]),
				Disks: []libvirttest.Disk{{Target: "vda", Format: "qcow2", Path: disk}}, Agent: true, MemoryMB: mem, UEFI: tc.uefi})
			d.Start(t)
			d.WaitConsole(t, guestvm.ReadyMarker, 5*time.Minute)
			state, env := stateEnv(t)
			env = append(env, "VMSHADOW_PASSWORD=hc-test")
			repoDir := filepath.Join(state, "repo")
			if res := vmshadow(t, env, "repo", "init", "--repo", repoDir); res.code != 0 {
				t.Fatalf("repo init: %s", res.errorMessage())
			}
			res := vmshadow(t, env, "backup", "--repo", repoDir, "--libvirt", libvirttest.URI, "--vm", d.Name, "--scratch-dir", libvirttest.TempDir(t))
			if res.code != 0 {
				t.Fatalf("backup: exit %d: %s", res.code, res.errorMessage())
			}
			sum := res.summary(t)
			id := sum["backup_id"].(string)
			if tc.uefi && !strings.Contains(fmt.Sprint(sum["files"]), "nvram") {
				t.Fatalf("the backup of a UEFI domain stores no NVRAM: %v", sum["files"])
			}
			libvirttest.Virsh(t, "destroy", d.Name) // its CPU time goes to the health check
			res = vmshadow(t, env, "healthcheck", "--repo", repoDir, id, "--timeout", "5m", "--script", "/bin/true")
			if res.code != 0 {
				t.Fatalf("healthcheck: exit %d: %s %s", res.code, res.errorMessage(), res.stderr)
			}
			sum = res.summary(t)
			h := sum["health"].(map[string]any)
			if h["result"] != "passed" || h["boot"] != "definition" {
				t.Fatalf("health = %v, want passed, booted from the definition", h)
			}
			if m := fmt.Sprint(sum["machine"]); m != tc.machine {
				t.Fatalf("machine = %q, want %q", m, tc.machine)
			}
			t.Logf("boot to guest-ping: %.1f s", h["answer_s"])
		})
	}
}

// BenchmarkHealthcheckBoot measures a health check of the bootable test
// guest's backup (BIOS, defaults), from the command's start to its end,
// and reports the seconds from starting QEMU to the agent's answer
// (answer_s). Under TCG on the 2-core test machine: about 13 to 16 s, of
// which about 5 s is the test guest's init waiting for its test control
// port, which the health check's VM does not have.
func BenchmarkHealthcheckBoot(b *testing.B) {
	img := guestvm.BootDiskForTest(b)
	dir, err := os.MkdirTemp("", "hcb")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	env := []string{"VMSHADOW_STATE_DIR=" + dir, "VMSHADOW_PASSWORD=hc-bench"}
	repoDir := filepath.Join(dir, "repo")
	if res := vmshadow(b, env, "repo", "init", "--repo", repoDir); res.code != 0 {
		b.Fatalf("repo init: %s", res.errorMessage())
	}
	res := vmshadow(b, env, "backup", "--repo", repoDir, "--vm", "svhealth-bench", "--disk", "vda="+img)
	if res.code != 0 {
		b.Fatalf("backup: %s", res.errorMessage())
	}
	id := res.summary(b)["backup_id"].(string)
	var answer float64
	b.ResetTimer()
	for range b.N {
		res := vmshadow(b, env, "healthcheck", "--repo", repoDir, id, "--timeout", "5m")
		if res.code != 0 {
			b.Fatalf("healthcheck: exit %d: %s", res.code, res.errorMessage())
		}
		answer += res.summary(b)["health"].(map[string]any)["answer_s"].(float64)
	}
	b.ReportMetric(answer/float64(b.N), "answer_s")
}
