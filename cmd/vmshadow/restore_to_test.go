package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestRestoreToDirectory: --to DIR/ or an existing directory writes
// DIR/NAME.raw (or .qcow2) for each disk whatever their number, one
// included (README: "--to /var/lib/vms/restored/"); --to a path that is no
// directory stays the output file of a single disk.
func TestRestoreToDirectory(t *testing.T) {
	dir := t.TempDir()
	env := []string{"VMSHADOW_PASSWORD=pw"}
	repo := filepath.Join(dir, "repo")
	if r := vmshadow(t, env, "repo", "init", "--repo", repo, "--encryption", "none"); r.code != 0 {
		t.Fatalf("repo init: %s", r.errorMessage())
	}
	disks := map[string][]byte{}
	var args []string
	for _, name := range []string{"sda", "sdb"} {
		b := bytes.Repeat([]byte(name), 300<<10)
		disks[name] = b
		p := filepath.Join(dir, name+".img")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--disk", name+"="+p)
	}
	one := vmshadow(t, env, "backup", "--repo", repo, "--vm", "one", "--disk", "sda="+filepath.Join(dir, "sda.img")).summary(t)["short_id"].(string)
	two := vmshadow(t, env, append([]string{"backup", "--repo", repo, "--vm", "two"}, args...)...).summary(t)["short_id"].(string)
	existing := filepath.Join(dir, "existing")
	if err := os.Mkdir(existing, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		want []string // files, relative to dir
	}{
		{"one disk to DIR/", []string{one, "--to", filepath.Join(dir, "new1") + "/"}, []string{"new1/sda.raw"}},
		{"one disk to DIR/ nested", []string{one, "--to", filepath.Join(dir, "a/b") + "/"}, []string{"a/b/sda.raw"}},
		{"one disk to an existing directory", []string{one, "--to", existing}, []string{"existing/sda.raw"}},
		{"one disk to DIR/ as qcow2", []string{one, "--to", filepath.Join(dir, "q") + "/", "--format", "qcow2"}, []string{"q/sda.qcow2"}},
		{"one of two disks to DIR/", []string{two, "--disk", "sdb", "--to", filepath.Join(dir, "new2") + "/"}, []string{"new2/sdb.raw"}},
		{"two disks to DIR/", []string{two, "--to", filepath.Join(dir, "new3") + "/"}, []string{"new3/sda.raw", "new3/sdb.raw"}},
		{"two disks to a new directory", []string{two, "--to", filepath.Join(dir, "new4")}, []string{"new4/sda.raw", "new4/sdb.raw"}},
		{"one disk to a file", []string{one, "--to", filepath.Join(dir, "file.raw")}, []string{"file.raw"}},
		{"one of two disks to a file", []string{two, "--disk", "sda", "--to", filepath.Join(dir, "file2.raw")}, []string{"file2.raw"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := vmshadow(t, env, append([]string{"restore", "--repo", repo}, tc.args...)...)
			if r.code != 0 {
				t.Fatalf("exit %d: %s", r.code, r.errorMessage())
			}
			got := r.summary(t)["disks"].([]any)
			if len(got) != len(tc.want) {
				t.Fatalf("restored %d disks, want %d", len(got), len(tc.want))
			}
			for i, w := range tc.want {
				path := filepath.Join(dir, w)
				if p := got[i].(map[string]any)["path"]; p != path {
					t.Errorf("disk %d restored to %v, want %s", i, p, path)
				}
				b, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				name := got[i].(map[string]any)["name"].(string)
				if filepath.Ext(path) == ".raw" && !bytes.Equal(b, disks[name]) {
					t.Errorf("%s differs from disk %s", path, name)
				}
				if filepath.Ext(path) == ".qcow2" && !bytes.HasPrefix(b, []byte("QFI\xfb")) {
					t.Errorf("%s is not a qcow2 image", path)
				}
			}
		})
	}
	// A file restored once is not overwritten by restoring into the same
	// directory again.
	if r := vmshadow(t, env, "restore", "--repo", repo, one, "--to", existing); r.code == 0 {
		t.Errorf("restore over %s/sda.raw succeeded", existing)
	}
}
