package main

import (
	"io/fs"
	"path/filepath"
	"strings"
	"testing"
)

// repoFileBytes sums the sizes of a local repository's files (tmp/ aside).
func repoFileBytes(t *testing.T, root string) (total, chunks int64) {
	t.Helper()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if strings.HasPrefix(rel, "tmp/") {
			return nil
		}
		st, err := d.Info()
		if err != nil {
			return err
		}
		total += st.Size()
		if strings.HasPrefix(rel, "chunks/") {
			chunks += st.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return total, chunks
}

// TestCLIRepoStats backs up one image twice with the binary and checks
// `repo stats`: stored bytes stay one copy, logical bytes double, the
// factor about doubles; every figure against the repository's files.
func TestCLIRepoStats(t *testing.T) {
	dir := t.TempDir()
	r := filepath.Join(dir, "repo")
	mustOK(t, vm(t, pwEnv, "repo", "init", "--repo", r, "--json"))
	img := filepath.Join(dir, "a.raw")
	writeImage(t, img, 9<<20, 0, 5<<20) // 4 MiB chunks: 0 and 1 hold data, 2 is zero

	num := func(m map[string]any, k string) float64 {
		t.Helper()
		v, ok := m[k].(float64)
		if !ok {
			t.Fatalf("stats lack number %q: %v", k, m)
		}
		return v
	}
	stats := func() map[string]any {
		t.Helper()
		s := mustOK(t, vm(t, pwEnv, "repo", "stats", "--repo", r, "--json")).last(t)
		total, chunks := repoFileBytes(t, r)
		if got := num(s, "stored_bytes"); got != float64(total) {
			t.Errorf("stored_bytes %v, the repository's files hold %d", got, total)
		}
		if got := num(s, "chunk_bytes"); got != float64(chunks) {
			t.Errorf("chunk_bytes %v, the chunk files hold %d", got, chunks)
		}
		if s["repository"] != r || len(s["id"].(string)) != 64 {
			t.Errorf("repository %v id %v", s["repository"], s["id"])
		}
		return s
	}

	mustOK(t, vm(t, pwEnv, "backup", "--repo", r, "--vm", "web1", "--disk", "sda="+img, "--json"))
	one := stats()
	mustOK(t, vm(t, pwEnv, "backup", "--repo", r, "--vm", "web1", "--disk", "sda="+img, "--json"))
	two := stats()
	for k, want := range map[string]float64{"backups": 2, "vms": 1, "chunks": 2, "indexes": 1, "referenced_chunks": 2,
		"logical_bytes": 2 * 9 << 20, "referenced_bytes": 2 * 8 << 20, "unique_bytes": 8 << 20, "unreferenced_chunks": 0} {
		if got := num(two, k); got != want {
			t.Errorf("%s = %v, want %v", k, got, want)
		}
	}
	if num(two, "chunk_bytes") != num(one, "chunk_bytes") {
		t.Errorf("chunk bytes grew from %v to %v for the same data", num(one, "chunk_bytes"), num(two, "chunk_bytes"))
	}
	if f := num(two, "dedup_factor") / num(one, "dedup_factor"); f < 1.99 || f >= 2 {
		t.Errorf("dedup factor went from %v to %v, want about twice", num(one, "dedup_factor"), num(two, "dedup_factor"))
	}
	per := two["per_vm"].([]any)
	if len(per) != 1 || per[0].(map[string]any)["vm"] != "web1" || num(per[0].(map[string]any), "backups") != 2 {
		t.Errorf("per_vm %v", per)
	}

	text := mustOK(t, vm(t, pwEnv, "repo", "stats", "--repo", r)).stdout
	for _, want := range []string{"backups:             2 (1 VMs)", "deduplication factor", "web1"} {
		if !strings.Contains(text, want) {
			t.Errorf("text output lacks %q:\n%s", want, text)
		}
	}
	if res := vm(t, pwEnv, "repo", "stats", "--repo", filepath.Join(dir, "none")); res.code != 6 || !strings.Contains(res.stderr, "not a vmshadow repository") {
		t.Errorf("stats of no repository: exit %d %s", res.code, res.stderr)
	}
}
