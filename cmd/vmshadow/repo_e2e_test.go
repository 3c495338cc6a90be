package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// These tests run the real vmshadow binary (built by TestMain), as users do.

// vmshadowBinary is the binary TestMain built.
func vmshadowBinary(t *testing.T) string {
	t.Helper()
	testutil.SkipShort(t)
	return bin
}

type runResult struct {
	code           int
	stdout, stderr string
}

// msgs parses NDJSON stdout.
func (r runResult) msgs(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("stdout line is not JSON: %q", l)
		}
		out = append(out, m)
	}
	return out
}

func (r runResult) last(t *testing.T) map[string]any {
	m := r.msgs(t)
	if len(m) == 0 {
		t.Fatalf("no JSON output; stderr %s", r.stderr)
	}
	return m[len(m)-1]
}

func vm(t *testing.T, env []string, args ...string) runResult {
	t.Helper()
	cmd := exec.Command(vmshadowBinary(t), args...)
	cmd.Env = append(os.Environ(), env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return runResult{code, o.String(), e.String()}
}

var pwEnv = []string{"VMSHADOW_PASSWORD=correct horse"}

func mustOK(t *testing.T, r runResult) runResult {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	return r
}

func writeImage(t *testing.T, path string, size int64, dataAt ...int64) []byte {
	t.Helper()
	img := make([]byte, size)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(size)
	for _, off := range dataAt {
		b := img[off:min(off+3<<20, size)]
		rand.Read(b)
		copy(b, "text text text text text text")
		f.WriteAt(b, off)
	}
	return img
}

func TestCLIBackupRestoreCycle(t *testing.T) {
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	mustOK(t, vm(t, pwEnv, "repo", "init", "--repo", r, "--json"))
	a := writeImage(t, filepath.Join(dir, "a.raw"), 20<<20, 0, 9<<20)
	b := writeImage(t, filepath.Join(dir, "b.raw"), 9<<20+4097, 4<<20)

	res := mustOK(t, vm(t, pwEnv, "backup", "--repo", r, "--vm", "web1", "--disk", "sda="+filepath.Join(dir, "a.raw"),
		"--disk", "sdb="+filepath.Join(dir, "b.raw"), "--tag", "nightly", "--json"))
	s := res.last(t)
	for _, k := range []string{"backup_id", "vm", "time", "disks", "bytes_read", "bytes_new", "duration_s"} {
		if _, ok := s[k]; !ok {
			t.Errorf("backup summary lacks %q: %v", k, s)
		}
	}
	if s["message_type"] != "summary" || s["vm"] != "web1" {
		t.Fatalf("summary %v", s)
	}
	disks := s["disks"].([]any)
	d0 := disks[0].(map[string]any)
	for _, k := range []string{"name", "size", "bytes_read", "bytes_new", "chunks_new", "chunks_reused"} {
		if _, ok := d0[k]; !ok {
			t.Errorf("disk summary lacks %q: %v", k, d0)
		}
	}
	if d0["name"] != "sda" || d0["size"].(float64) != 20<<20 {
		t.Errorf("disk 0: %v", d0)
	}
	id := s["backup_id"].(string)

	list := mustOK(t, vm(t, pwEnv, "backups", "--repo", r, "--json")).last(t)
	bs := list["backups"].([]any)
	if len(bs) != 1 {
		t.Fatalf("backups: %v", list)
	}
	e := bs[0].(map[string]any)
	if e["id"] != id || e["vm"] != "web1" || e["tags"].([]any)[0] != "nightly" || len(e["disks"].([]any)) != 2 || e["time"] == nil {
		t.Errorf("listed backup %v", e)
	}

	// Several disks: --to is a directory, files NAME.raw.
	out := filepath.Join(dir, "out")
	rr := mustOK(t, vm(t, pwEnv, "restore", "--repo", r, id[:6], "--to", out, "--json")).last(t)
	if len(rr["disks"].([]any)) != 2 {
		t.Fatalf("restore summary %v", rr)
	}
	for name, img := range map[string][]byte{"sda.raw": a, "sdb.raw": b} {
		got, _ := os.ReadFile(filepath.Join(out, name))
		if !bytes.Equal(got, img) {
			t.Errorf("%s differs after restore", name)
		}
	}
	// One disk: --to is the file; existing files are never overwritten.
	one := filepath.Join(dir, "one.img")
	mustOK(t, vm(t, pwEnv, "restore", "--repo", r, id, "--disk", "sdb", "--to", one))
	if got, _ := os.ReadFile(one); !bytes.Equal(got, b) {
		t.Error("single-disk restore differs")
	}
	if res := vm(t, pwEnv, "restore", "--repo", r, id, "--disk", "sdb", "--to", one); res.code != 2 || !strings.Contains(res.stderr, "exists") {
		t.Errorf("restore over an existing file: %d %s", res.code, res.stderr)
	}
	if res := vm(t, pwEnv, "restore", "--repo", r, id, "--disk", "sdz", "--to", one+"x"); res.code != 6 {
		t.Errorf("restore of unknown disk: %d %s", res.code, res.stderr)
	}
	if res := vm(t, pwEnv, "restore", "--repo", r, id, "--disk", "sda", "--to", one+"q", "--format", "qcow2"); res.code != 9 && res.code != 0 {
		t.Errorf("--format qcow2: %d %s", res.code, res.stderr)
	}

	// Password handling.
	if res := vm(t, []string{"VMSHADOW_PASSWORD=wrong"}, "backups", "--repo", r); res.code != 7 || !strings.Contains(res.stderr, "wrong password") {
		t.Errorf("wrong password: exit %d %s", res.code, res.stderr)
	}
	pwFile := filepath.Join(dir, "pw")
	os.WriteFile(pwFile, []byte("correct horse\n"), 0o600)
	env := os.Environ()
	noPW := []string{}
	for _, e := range env {
		if !strings.HasPrefix(e, "VMSHADOW_PASSWORD=") {
			noPW = append(noPW, e)
		}
	}
	cmd := exec.Command(vmshadowBinary(t), "backups", "--repo", r, "--password-file", pwFile)
	cmd.Env = noPW
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("--password-file: %v %s", err, out)
	}
	cmd = exec.Command(vmshadowBinary(t), "backups", "--repo", r)
	cmd.Env = noPW
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "VMSHADOW_PASSWORD") {
		t.Errorf("no password and no terminal: %v %s", err, out)
	}
	mustOK(t, vm(t, append(pwEnv, "VMSHADOW_NEW_PASSWORD=battery staple"), "repo", "passwd", "--repo", r))
	if res := vm(t, pwEnv, "backups", "--repo", r); res.code != 7 {
		t.Errorf("old password after passwd: exit %d", res.code)
	}
	newPW := []string{"VMSHADOW_PASSWORD=battery staple"}
	mustOK(t, vm(t, newPW, "verify", "--repo", r))

	// Dedup: the same images again store nothing new.
	s2 := mustOK(t, vm(t, newPW, "backup", "--repo", r, "--vm", "web1", "--disk", "sda="+filepath.Join(dir, "a.raw"), "--json")).last(t)
	if s2["bytes_new"].(float64) != 0 || s2["chunks_new"].(float64) != 0 {
		t.Errorf("second backup stored data: %v", s2)
	}
	// Prune per VM, dry run first.
	pr := mustOK(t, vm(t, newPW, "prune", "--repo", r, "--keep-last", "1", "--dry-run", "--json")).last(t)
	if pr["kept"].(float64) != 1 || pr["removed"].(float64) != 1 || pr["dry_run"] != true {
		t.Errorf("prune dry run %v", pr)
	}
	if res := vm(t, newPW, "prune", "--repo", r); res.code != 2 {
		t.Errorf("prune without policy: exit %d", res.code)
	}
	mustOK(t, vm(t, newPW, "prune", "--repo", r, "--keep-last", "1"))
	g := mustOK(t, vm(t, newPW, "gc", "--repo", r, "--json")).last(t)
	if g["chunks_deleted"].(float64) != 0 || g["indexes_in_grace"].(float64) == 0 {
		t.Errorf("gc within grace: %v", g)
	}
}

func TestCLIVerifyReportsDamage(t *testing.T) {
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	mustOK(t, vm(t, nil, "repo", "init", "--repo", r, "--encryption", "none"))
	writeImage(t, filepath.Join(dir, "a.raw"), 8<<20, 0)
	id := mustOK(t, vm(t, nil, "backup", "--repo", r, "--vm", "db", "--disk", "sda="+filepath.Join(dir, "a.raw"), "--json")).last(t)["backup_id"].(string)
	var chunk string
	filepath.Walk(filepath.Join(r, "chunks"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			chunk = p
		}
		return nil
	})
	data, _ := os.ReadFile(chunk)
	data[len(data)/2] ^= 1
	os.WriteFile(chunk, data, 0o600)
	res := vm(t, nil, "verify", "--repo", r, "--json")
	if res.code != 8 {
		t.Fatalf("verify of damaged repository: exit %d %s", res.code, res.stderr)
	}
	var summary map[string]any
	for _, m := range res.msgs(t) {
		if m["message_type"] == "summary" {
			summary = m
		}
	}
	if summary == nil || summary["ok"] != false {
		t.Fatalf("no failing summary: %s", res.stdout)
	}
	p := summary["problems"].([]any)[0].(map[string]any)
	aff := p["affected"].([]any)[0].(map[string]any)
	if p["kind"] != "chunk" || p["id"] != filepath.Base(chunk) || aff["backup"] != id || aff["vm"] != "db" {
		t.Errorf("problem %v", p)
	}
	if res.last(t)["message_type"] != "error" {
		t.Errorf("last message %v", res.last(t))
	}
}

func TestCLIRepositoryVersionAndLocks(t *testing.T) {
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	mustOK(t, vm(t, nil, "repo", "init", "--repo", r, "--encryption", "none"))
	// gc while another process holds a shared lock: busy.
	be, _ := local.Open(r)
	rp, err := repo.Open(context.Background(), be, nil)
	if err != nil {
		t.Fatal(err)
	}
	l, _, err := rp.Lock(context.Background(), false, "backup")
	if err != nil {
		t.Fatal(err)
	}
	if res := vm(t, nil, "gc", "--repo", r); res.code != 3 || !strings.Contains(res.stderr, "locked") {
		t.Errorf("gc under a shared lock: exit %d %s", res.code, res.stderr)
	}
	l.Unlock()
	rp.Close()
	mustOK(t, vm(t, nil, "gc", "--repo", r))

	cfg := filepath.Join(r, "config")
	raw, _ := os.ReadFile(cfg)
	os.WriteFile(cfg, bytes.Replace(raw, []byte(`"version": 1`), []byte(`"version": 2`), 1), 0o600)
	if res := vm(t, nil, "backups", "--repo", r); res.code != 9 || !strings.Contains(res.stderr, "newer") {
		t.Errorf("repository of a newer version: exit %d %s", res.code, res.stderr)
	}
	if res := vm(t, nil, "backups", "--repo", filepath.Join(dir, "nothing")); res.code != 6 {
		t.Errorf("not a repository: exit %d %s", res.code, res.stderr)
	}
}

// TestCLIKill9 kills a real backup process mid-way: no backup is left, and
// the next backup (despite the dead process's lock) and verify succeed.
func TestCLIKill9(t *testing.T) {
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	mustOK(t, vm(t, pwEnv, "repo", "init", "--repo", r))
	img := filepath.Join(dir, "big.raw")
	var offs []int64
	for off := int64(0); off < 384<<20; off += 3 << 20 {
		offs = append(offs, off)
	}
	want := writeImage(t, img, 384<<20, offs...)

	cmd := exec.Command(vmshadowBinary(t), "backup", "--repo", r, "--vm", "v", "--disk", "sda="+img)
	cmd.Env = append(os.Environ(), pwEnv...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for countFiles(filepath.Join(r, "chunks")) < 5 {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatal("backup stored no chunks in 60 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	err := cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
		t.Fatalf("backup finished before it was killed (%v): make the image larger", err)
	}
	if n := countFiles(filepath.Join(r, "backups")); n != 0 {
		t.Fatalf("killed backup left %d manifests", n)
	}
	if n := countFiles(filepath.Join(r, "locks")); n != 1 {
		t.Fatalf("killed backup left %d locks, want its 1 (stale) lock", n)
	}
	chunksBefore := countFiles(filepath.Join(r, "chunks"))
	s := mustOK(t, vm(t, pwEnv, "backup", "--repo", r, "--vm", "v", "--disk", "sda="+img, "--json")).last(t)
	if s["chunks_reused"].(float64) < float64(chunksBefore)-1 {
		t.Errorf("second backup reused %v chunks; %d were stored before the kill", s["chunks_reused"], chunksBefore)
	}
	mustOK(t, vm(t, pwEnv, "verify", "--repo", r))
	out := filepath.Join(dir, "out.raw")
	mustOK(t, vm(t, pwEnv, "restore", "--repo", r, s["backup_id"].(string), "--to", out))
	got, _ := os.ReadFile(out)
	if !bytes.Equal(got, want) {
		t.Fatal("restore after kill -9 differs from the image")
	}
	if n := countFiles(filepath.Join(r, "locks")); n != 0 {
		t.Errorf("%d locks left after the good backup (stale lock not cleaned)", n)
	}
}

func countFiles(dir string) int {
	n := 0
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n++
		}
		return nil
	})
	return n
}
