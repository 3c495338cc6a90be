package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestBadInputs runs the binary with paths and URLs that are wrong in one
// way each: a directory or character device as a disk, missing files, files
// where directories are expected, URLs with secrets. Each must give the
// documented exit code and an error naming what was wrong, with no stack
// trace, and never repeat a secret.
func TestBadInputs(t *testing.T) {
	if pw, ok := os.LookupEnv("VMSHADOW_PASSWORD"); ok {
		os.Unsetenv("VMSHADOW_PASSWORD") // password files are only read without it
		t.Cleanup(func() { os.Setenv("VMSHADOW_PASSWORD", pw) })
	}
	if pw, ok := os.LookupEnv("VMSHADOW_XAPI_PASSWORD"); ok {
		os.Unsetenv("VMSHADOW_XAPI_PASSWORD")
		t.Cleanup(func() { os.Setenv("VMSHADOW_XAPI_PASSWORD", pw) })
	}
	dir := t.TempDir()
	pw := []string{"VMSHADOW_PASSWORD=pw"}
	repo := filepath.Join(dir, "repo")
	if r := vmshadow(t, pw, "repo", "init", "--repo", repo); r.code != 0 {
		t.Fatalf("repo init: exit %d: %s %s", r.code, r.errorMessage(), r.stderr)
	}
	img := filepath.Join(dir, "sda.raw")
	if err := os.WriteFile(img, []byte("a disk"), 0o600); err != nil {
		t.Fatal(err)
	}
	id := vmshadow(t, pw, "backup", "--repo", repo, "--vm", "v", "--disk", "sda="+img).summary(t)["short_id"].(string)
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("not a directory"), 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// Should vmshadow block opening the FIFO for reading, a writer that
	// comes and goes lets it go on, so that the test fails instead of hanging.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Second):
				if w, err := os.OpenFile(fifo, os.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
					w.Close()
				}
			}
		}
	}()
	missing := filepath.Join(dir, "missing")
	pwFile := []string{"--password-file"}

	for _, tc := range []struct {
		name string
		env  []string
		args []string
		code int
		want []string // in the error message
	}{
		{"disk is a directory", pw, []string{"backup", "--repo", repo, "--vm", "v", "--disk", "sda=" + dir}, 2, []string{dir, "is a directory", "disk sda"}},
		{"disk is /dev/zero", pw, []string{"backup", "--repo", repo, "--vm", "v", "--disk", "sda=/dev/zero"}, 2, []string{"/dev/zero", "character device"}},
		{"disk is /dev/null", pw, []string{"backup", "--repo", repo, "--vm", "v", "--disk", "sda=/dev/null"}, 2, []string{"/dev/null", "character device"}},
		{"disk is a FIFO", pw, []string{"backup", "--repo", repo, "--vm", "v", "--disk", "sda=" + fifo}, 2, []string{fifo, "named pipe"}},
		{"disk without a size", pw, []string{"backup", "--repo", repo, "--vm", "v", "--disk", "sda=/proc/self/mem"}, 2, []string{"/proc/self/mem", "not a disk image"}},
		{"disk is missing", pw, []string{"backup", "--repo", repo, "--vm", "v", "--disk", "sda=" + missing}, 6, []string{missing, "does not exist"}},
		{"repo is a file", pw, []string{"backups", "--repo", file}, 2, []string{"--repo " + file, "not a directory"}},
		{"repo below a file", pw, []string{"backups", "--repo", file + "/repo"}, 2, []string{"--repo " + file + "/repo", "file, not a directory"}},
		{"repo init on a file", pw, []string{"repo", "init", "--repo", file}, 2, []string{"--repo " + file, "not a directory"}},
		{"repo init below a file", pw, []string{"repo", "init", "--repo", file + "/repo"}, 2, []string{file + "/repo", "not a directory"}},
		{"repo is missing", pw, []string{"backups", "--repo", missing}, 6, []string{missing, "not a vmshadow repository"}},
		{"password file missing", nil, []string{"backups", "--repo", repo, "--password-file", missing}, 2, []string{"password file " + missing, "no such file"}},
		{"password file is a directory", nil, append([]string{"backups", "--repo", repo}, append(pwFile, dir)...), 2, []string{"password file " + dir, "is a directory"}},
		{"repo stats of a file", pw, []string{"repo", "stats", "--repo", file}, 2, []string{"--repo " + file, "not a directory"}},
		{"repo stats of no repository", pw, []string{"repo", "stats", "--repo", missing}, 6, []string{missing, "not a vmshadow repository"}},
		{"repo stats with credentials in the URL", nil, []string{"repo", "stats", "--repo", "s3:http://AKIA:Sekr1tTok@127.0.0.1:7391/bkt"}, 2, []string{"credentials in the S3 repository URL"}},
		{"new password file missing", pw, []string{"repo", "passwd", "--repo", repo, "--new-password-file", missing}, 2, []string{"password file " + missing}},
		{"restore into a missing directory", pw, []string{"restore", "--repo", repo, id, "--to", missing + "/dir/x.raw"}, 2, []string{missing + "/dir", "does not exist"}},
		{"restore below a file", pw, []string{"restore", "--repo", repo, id, "--to", file + "/x.raw"}, 2, []string{file, "not a directory"}},
		{"restore into a file as directory", pw, []string{"restore", "--repo", repo, id, "--to", file + "/"}, 2, []string{file, "a file is in the way"}},
		{"serve on a socket below a file", pw, []string{"serve", "--repo", repo, id, "--listen", "unix:" + file + "/s.sock"}, 2, []string{file, "not an existing directory"}},
		{"serve on a port out of range", pw, []string{"serve", "--repo", repo, id, "--listen", "tcp:127.0.0.1:99999"}, 2, []string{"99999", "65535"}},
		{"healthcheck in a temp dir that is a file", pw, []string{"healthcheck", "--repo", repo, id, "--temp-dir", file}, 2, []string{file, "not an existing directory"}},
		{"healthcheck of a backup that does not exist", pw, []string{"healthcheck", "--repo", repo, "0123abcd"}, 6, []string{"0123abcd", "not found"}},
		{"hook missing", nil, []string{"snapshot", "create", "--qmp", missing, "--hook", missing}, 2, []string{"hook " + missing}},
		{"s3 URL with a signed query", nil, []string{"backups", "--repo", "s3:http://127.0.0.1:7391/bkt?X-Amz-Credential=Sekr1tTok"}, 2, []string{"s3:http://127.0.0.1:7391/bkt?...", "no query string"}},
		{"s3 URL with a fragment", nil, []string{"repo", "init", "--repo", "s3:http://127.0.0.1:7391/bkt#Sekr1tTok"}, 2, []string{"no query string"}},
		{"s3 URL with user info", nil, []string{"backups", "--repo", "s3:http://AKIA:Sekr1tTok@127.0.0.1:7391/bkt"}, 2, []string{"credentials in the S3 repository URL"}},
		{"s3 URL with a bad scheme", nil, []string{"backups", "--repo", "s3:ftp://127.0.0.1/bkt?Sekr1tTok"}, 2, []string{"s3:ftp://127.0.0.1/bkt?...", "scheme"}},
		{"s3 URL that does not parse", nil, []string{"backups", "--repo", "s3:http://127.0.0.1/bkt/%zz?Sekr1tTok"}, 2, []string{"invalid URL escape"}},
		{"xapi URL with user info", pw, []string{"backup", "--repo", repo, "--xapi", "https://root:Sekr1tTok@pool", "--vm", "x"}, 2, []string{"https://***@pool", "without user"}},
		{"xapi URL over http with user info", pw, []string{"backup", "--repo", repo, "--xapi", "http://root:Sekr1tTok@pool", "--vm", "x"}, 2, []string{"plain http"}},
		{"xapi URL with a query", pw, []string{"backup", "--repo", repo, "--xapi", "https://pool/?session_id=Sekr1tTok", "--vm", "x"}, 2, []string{"https://pool/?..."}},
		{"xapi URL with a bad scheme", pw, []string{"snapshot", "list", "--xapi", "ftp://pool/?Sekr1tTok", "--vm", "x"}, 2, []string{"ftp://pool/?...", "not https"}},
		{"restore to-xapi URL with a secret", pw, []string{"restore", "--repo", repo, id, "--to-xapi", "https://pool?session_id=Sekr1tTok", "--sr", "sr"}, 2, []string{"https://pool?..."}},
		{"copy to a file", pw, []string{"copy", "--from", repo, "--to", file}, 2, []string{"--to " + file, "not a directory"}},
		{"copy from below a file", pw, []string{"copy", "--from", file + "/repo", "--to", repo}, 2, []string{"--from " + file + "/repo", "file, not a directory"}},
		{"copy to an s3 URL with a signed query", pw, []string{"copy", "--from", repo, "--to", "s3:http://127.0.0.1:7391/bkt?X-Amz-Credential=Sekr1tTok"}, 2, []string{"s3:http://127.0.0.1:7391/bkt?...", "no query string"}},
		{"copy target password file missing", pw, []string{"copy", "--from", repo, "--to", repo, "--to-password-file", missing}, 2, []string{"password file " + missing}},
		{"copy into the same repository", append([]string{"VMSHADOW_TO_PASSWORD=pw"}, pw...), []string{"copy", "--from", repo, "--to", repo}, 2, []string{"same repository"}},
		{"copy of a VM name that cannot be", pw, []string{"copy", "--from", repo, "--to", repo, "--vm", "../x"}, 2, []string{"invalid VM name"}},
		{"xapi password file missing", pw, []string{"backup", "--repo", repo, "--xapi", "https://pool", "--vm", "x", "--xapi-password-file", missing}, 2, []string{"password file " + missing}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := vmshadow(t, tc.env, tc.args...)
			msg := r.errorMessage()
			if r.code != tc.code {
				t.Errorf("exit %d, want %d: %s %s", r.code, tc.code, msg, r.stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not say %q", msg, w)
				}
			}
			if strings.Contains(r.stderr, "goroutine ") || strings.Contains(r.stderr, "panic") {
				t.Errorf("stack trace: %s", r.stderr)
			}
			for _, m := range r.msgs {
				for k, v := range m {
					if s, ok := v.(string); ok && strings.Contains(s, "Sekr1tTok") {
						t.Errorf("%s message %s shows the secret: %q", m["message_type"], k, s)
					}
				}
			}
			if strings.Contains(r.stderr, "Sekr1tTok") {
				t.Errorf("stderr shows the secret: %s", r.stderr)
			}
		})
	}
}
