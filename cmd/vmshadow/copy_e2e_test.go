package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
)

// TestCLICopy runs vmshadow copy between a local repository and one on a
// real S3 server, with different passwords and chunk sizes: local to S3
// and back to a second local repository, restores bit-identical, reruns
// copy nothing, --vm and named backups select, an incremental sends only
// its new chunks, a kill mid-copy leaves the target verifying clean and a
// rerun completes, and a damaged source chunk fails with exit 8 leaving
// no backup and a clean target.
func TestCLICopy(t *testing.T) {
	s := newS3Rig(t)
	dir := t.TempDir()
	local1 := filepath.Join(dir, "local1")
	local2 := filepath.Join(dir, "local2")
	remote := s.url("copy", false)
	toPW := []string{"VMSHADOW_TO_PASSWORD=second password"}
	s.ok("repo", "init", "--repo", local1, "--chunk-size", "262144")
	if res := s.run([]string{"VMSHADOW_PASSWORD=second password"}, "repo", "init", "--repo", remote, "--chunk-size", "524288"); res.code != 0 {
		t.Fatalf("init S3 repo: %s", res.errorMessage())
	}
	s.ok("repo", "init", "--repo", local2, "--chunk-size", "1048576")

	a := s3Image(t, filepath.Join(dir, "a.raw"), 8<<20, 1, 0, 2, 5)
	b := s3Image(t, filepath.Join(dir, "b.raw"), 3<<20+4097, 2, 0, 3)
	a1 := s.ok("backup", "--repo", local1, "--vm", "web", "--tag", "daily", "--disk", "sda="+filepath.Join(dir, "a.raw"))["backup_id"].(string)
	b1 := s.ok("backup", "--repo", local1, "--vm", "db", "--disk", "sdb="+filepath.Join(dir, "b.raw"))["backup_id"].(string)

	copyTo := func(extra []string, args ...string) result {
		t.Helper()
		return s.run(append(append([]string{}, toPW...), extra...), append([]string{"copy"}, args...)...)
	}
	okCopy := func(args ...string) map[string]any {
		t.Helper()
		res := copyTo(nil, args...)
		if res.code != 0 {
			t.Fatalf("copy %v: exit %d: %s %s", args, res.code, res.errorMessage(), res.stderr)
		}
		return res.summary(t)
	}

	// --vm selects; a named backup of another VM is a usage error.
	if res := copyTo(nil, "--from", local1, "--to", remote, "--vm", "web", b1[:8]); res.code != 2 {
		t.Fatalf("backup of another VM than --vm: exit %d %s, want 2", res.code, res.errorMessage())
	}
	c := okCopy("--from", local1, "--to", remote, "--vm", "web")
	if num(c["backups_copied"]) != 1 || c["copied"].([]any)[0].(map[string]any)["backup_id"] != a1 || num(c["chunks_sent"]) != 6 || num(c["chunks_zero"]) != 10 {
		t.Fatalf("copy --vm web: %v; want a1 copied with its 6 non-zero 512 KiB chunks", c)
	}
	// The rest; a named backup by prefix.
	c = okCopy("--from", local1, "--to", remote, b1[:10])
	if num(c["backups_copied"]) != 1 || c["copied"].([]any)[0].(map[string]any)["backup_id"] != b1 {
		t.Fatalf("copy %s: %v", b1[:10], c)
	}
	c = okCopy("--from", local1, "--to", remote)
	if num(c["backups_copied"]) != 0 || num(c["backups_skipped"]) != 2 || num(c["chunks_sent"]) != 0 {
		t.Fatalf("rerun: %v; want nothing copied, 2 skipped", c)
	}

	// An incremental: one changed chunk is all that is sent.
	a2 := append([]byte(nil), a...)
	copy(a2[5<<20:], strings.Repeat("changed ", 1024))
	os.WriteFile(filepath.Join(dir, "a.raw"), a2, 0o600)
	s.ok("backup", "--repo", local1, "--vm", "web", "--disk", "sda="+filepath.Join(dir, "a.raw"))
	c = okCopy("--from", local1, "--to", remote)
	if num(c["backups_copied"]) != 1 || num(c["chunks_sent"]) != 1 || num(c["chunks_present"]) != 5 {
		t.Fatalf("copy of the incremental: %v; want 1 chunk sent, 5 present", c)
	}
	if v := s.run([]string{"VMSHADOW_PASSWORD=second password"}, "verify", "--repo", remote); v.code != 0 {
		t.Fatalf("verify the S3 copy: exit %d %s", v.code, v.errorMessage())
	}

	// S3 to local (1 MiB chunks), killed once its first disk is read.
	fromS3 := []string{"--from", remote, "--to", local2}
	toLocal2 := []string{"VMSHADOW_PASSWORD=second password", "VMSHADOW_TO_PASSWORD=s3 test password"}
	res, killed := runKilled(t, append(append(append([]string{}, s.env...), toLocal2...), "VMSHADOW_CRASH_AT=copy-disk-done"), 0, append([]string{"copy"}, fromS3...)...)
	if !killed {
		t.Fatalf("copy was not killed at copy-disk-done: exit %d %s", res.code, res.stderr)
	}
	if v := s.ok("verify", "--repo", local2); num(v["backups"]) != 0 || num(v["problems"]) != 0 {
		t.Fatalf("target after a kill mid-copy: %v; want no backup, no problem", v)
	}
	if n := countFiles(filepath.Join(local2, "chunks")); n == 0 {
		t.Fatal("the killed copy stored no chunk: the kill was not mid-copy")
	}
	res = s.run(toLocal2, append([]string{"copy"}, fromS3...)...)
	if res.code != 0 {
		t.Fatalf("copy after the kill: exit %d %s", res.code, res.errorMessage())
	}
	if c = res.summary(t); num(c["backups_copied"]) != 3 {
		t.Fatalf("copy after the kill: %v; want 3 backups", c)
	}
	// The copies restore bit-identical; their origin is the local original.
	ids := map[string]string{} // origin -> copy
	for _, e := range s.ok("backups", "--repo", local2)["backups"].([]any) {
		m := e.(map[string]any)
		if o, _ := m["origin"].(string); o != "" {
			ids[o] = m["id"].(string)
		}
	}
	if len(ids) != 3 {
		t.Fatalf("local2 holds copies of %v, want the 3 backups of local1", ids)
	}
	for _, e := range s.ok("backups", "--repo", local1)["backups"].([]any) {
		m := e.(map[string]any)
		id := ids[m["id"].(string)]
		if id == "" {
			t.Fatalf("no copy of %s in local2", m["id"])
		}
		switch m["id"] {
		case a1:
			s.restoreCompare(local2, id, map[string][]byte{"sda": a})
		case b1:
			s.restoreCompare(local2, id, map[string][]byte{"sdb": b})
		default:
			s.restoreCompare(local2, id, map[string][]byte{"sda": a2})
		}
	}
	if c := okCopy("--from", local1, "--to", remote); num(c["backups_copied"]) != 0 {
		t.Fatalf("local1 to S3 again: %v", c)
	}

	// A damaged chunk of the source: exit 8, no backup in the target.
	local3 := filepath.Join(dir, "local3")
	s.ok("repo", "init", "--repo", local3)
	damageChunk(t, local1)
	res = s.run(nil, "copy", "--from", local1, "--to", local3, "--to-password-file", writePW(t, "s3 test password"), a1[:8])
	if res.code != 8 {
		t.Fatalf("copy of a damaged backup: exit %d %s, want 8", res.code, res.errorMessage())
	}
	if v := s.ok("verify", "--repo", local3); num(v["backups"]) != 0 || num(v["problems"]) != 0 {
		t.Fatalf("target after a damaged copy: %v", v)
	}
}

func writePW(t *testing.T, pw string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(p, []byte(pw+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// damageChunk flips the last byte of every chunk of the local repository.
func damageChunk(t *testing.T, dir string) {
	t.Helper()
	be, err := local.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	n := 0
	be.List(context.Background(), backend.KindChunks, "", func(fi backend.Info) error {
		if _, err := repo.ParseID(fi.Name); err != nil {
			return nil
		}
		p, _ := backend.Handle{Kind: backend.KindChunks, Name: fi.Name}.Path()
		f := filepath.Join(dir, filepath.FromSlash(p))
		blob, err := os.ReadFile(f)
		if err == nil && len(blob) > 0 {
			blob[len(blob)-1] ^= 1
			os.WriteFile(f, blob, 0o600)
			n++
		}
		return nil
	})
	if n == 0 {
		t.Fatal("no chunk to damage")
	}
}

// TestCopyThenLiveBackupStartsOwnChain: after live backups of a running
// QEMU VM are copied to another repository, the first live backup of the
// VM into that repository is a full one ("first backup"), not an
// incremental continuing the source repository's chain; the next one is
// incremental in the target's own chain, and the source's chain goes on.
func TestCopyThenLiveBackupStartsOwnChain(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 32 << 20}}})
	r := newLiveRig(t, vm, true)
	// A set's time has whole seconds, and the chain continues from the
	// newest backup: two backups of the VM in one second would leave which
	// one is newer to chance, so each backup waits for the next second.
	nextSecond := func() {
		time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second + 10*time.Millisecond)))
	}
	vm.Write("vda", 0x5a, 0, 32<<20)
	r.backup()
	r.scatter("vda", 2, map[int64]bool{})
	nextSecond()
	if sum := r.backup(); sum["mode"] != "incremental" {
		t.Fatalf("second backup into the source: mode %v (%v)", sum["mode"], sum["reason"])
	}
	target := filepath.Join(t.TempDir(), "target")
	targetEnv := append(append([]string{}, r.env...), "VMSHADOW_PASSWORD=target password")
	if res := vmshadow(t, targetEnv, "repo", "init", "--repo", target); res.code != 0 {
		t.Fatalf("init target: %s", res.errorMessage())
	}
	res := vmshadow(t, append(append([]string{}, r.env...), "VMSHADOW_TO_PASSWORD=target password"), "copy", "--from", r.repo, "--to", target)
	if res.code != 0 || num(res.summary(t)["backups_copied"]) != 2 {
		t.Fatalf("copy: exit %d %s", res.code, res.errorMessage())
	}
	liveInto := func(env []string, repo string) map[string]any {
		t.Helper()
		nextSecond()
		before := r.baseline()
		res := vmshadow(t, env, "backup", "--repo", repo, "--qmp", vm.QMPPath)
		if res.code != 0 {
			t.Fatalf("backup into %s: exit %d: %s", repo, res.code, res.errorMessage())
		}
		vm.AssertAsBefore(t, before)
		return res.summary(t)
	}
	r.scatter("vda", 2, map[int64]bool{})
	sum := liveInto(targetEnv, target)
	if sum["mode"] != "full" || !strings.Contains(fmt.Sprint(sum["reason"]), "first backup") {
		t.Fatalf("first live backup into the target after a copy: mode %v, reason %q; want full, first backup", sum["mode"], sum["reason"])
	}
	r.scatter("vda", 2, map[int64]bool{})
	if sum := liveInto(targetEnv, target); sum["mode"] != "incremental" {
		t.Fatalf("second live backup into the target: mode %v (%v)", sum["mode"], sum["reason"])
	}
	r.scatter("vda", 2, map[int64]bool{})
	if sum := liveInto(r.env, r.repo); sum["mode"] != "incremental" {
		t.Fatalf("live backup into the source after the copy: mode %v (%v); source backups: %s; target backups: %s",
			sum["mode"], sum["reason"], checkpoints(t, r.repo, "test-password"), checkpoints(t, target, "target password"))
	}
}

// checkpoints lists a repository's backups with their time, origin and
// disk checkpoints, for failure messages.
func checkpoints(t *testing.T, dir, pw string) string {
	t.Helper()
	be, err := local.Open(dir)
	if err != nil {
		return err.Error()
	}
	defer be.Close()
	r, err := repo.Open(context.Background(), be, func() ([]byte, error) { return []byte(pw), nil })
	if err != nil {
		return err.Error()
	}
	defer r.Close()
	bs, _, err := r.ListBackups(context.Background())
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, b := range bs {
		s := b.ID.Short() + "@" + b.Time.Format(time.RFC3339Nano) + " origin=" + b.Origin
		for _, d := range b.Disks {
			s += " " + d.Name + ":" + d.Checkpoint
		}
		out = append(out, s)
	}
	return strings.Join(out, "; ")
}
