package deb

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

const unitName = "vmshadow-server.service"

// repoRoot is the top of the source tree (this package is packaging/deb).
func repoRoot(t *testing.T) string {
	t.Helper()
	top, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return top
}

// run runs a program and returns its standard output, failing the test
// with its output when it fails.
func run(t *testing.T, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// debVersion asks scripts/package-deb.sh for the Debian version of a
// 'git describe' output.
func debVersion(t *testing.T, describe, commits string) string {
	t.Helper()
	script := filepath.Join(repoRoot(t), "scripts", "package-deb.sh")
	return strings.TrimSpace(run(t, nil, script, "--deb-version", describe, commits))
}

// TestDebVersion: every form 'git describe --always --dirty' prints becomes
// a valid Debian version that sorts where it belongs (checked by dpkg).
func TestDebVersion(t *testing.T) {
	testutil.NeedCommand(t, "dpkg")
	cases := []struct{ describe, want string }{
		{"v1.2.3", "1.2.3"},
		{"v1.2.3-dirty", "1.2.3+dirty"},
		{"v1.2.3-4-gabc1234", "1.2.3+git4.abc1234"},
		{"v1.2.3-4-gabc1234-dirty", "1.2.3+git4.abc1234.dirty"},
		{"v1.0-rc1", "1.0~rc1"},
		{"v1.0-rc1-2-gdeadbee", "1.0~rc1+git2.deadbee"},
		{"790cdbe", "0.0.0+git317.790cdbe"},
		{"790cdbe-dirty", "0.0.0+git317.790cdbe.dirty"},
		{"dev", "0.0.0+dev"},
	}
	for _, c := range cases {
		got := debVersion(t, c.describe, "317")
		if got != c.want {
			t.Errorf("%s: Debian version %q, want %q", c.describe, got, c.want)
		}
		run(t, nil, "dpkg", "--validate-version", got)
	}
	// Each before the next: a package built later from later history
	// upgrades one built earlier.
	order := [][2]string{
		{"790cdbe", "317"}, {"790cdbe-dirty", "317"}, {"1234567", "318"},
		{"v1.0-rc1", ""}, {"v1.0-rc1-2-gdeadbee", ""}, {"v1.0", ""},
		{"v1.0-dirty", ""}, {"v1.0-1-gabc1234", ""}, {"v1.0-1-gabc1234-dirty", ""},
		{"v1.0-12-gabc1234", ""}, {"v1.0.1", ""}, {"v1.1", ""},
	}
	for i := 1; i < len(order); i++ {
		a := debVersion(t, order[i-1][0], order[i-1][1])
		b := debVersion(t, order[i][0], order[i][1])
		if err := exec.Command("dpkg", "--compare-versions", a, "lt", b).Run(); err != nil {
			t.Errorf("%s (%s) does not sort before %s (%s)", a, order[i-1][0], b, order[i][0])
		}
	}
}

// pkg is the package built once by TestPackage and extracted.
type pkg struct {
	deb  string // the .deb
	root string // its files, extracted with dpkg-deb -x
}

// TestPackage builds the package with 'make package' and checks it.
func TestPackage(t *testing.T) {
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "make")
	testutil.NeedCommand(t, "dpkg-deb")
	top := repoRoot(t)
	dist := t.TempDir()
	// gzip: a quarter of xz's time; the compression is dpkg-deb's business.
	run(t, nil, "make", "-s", "-C", top, "package", "DIST="+dist, "DEB_COMPRESS=gzip")
	debs, _ := filepath.Glob(filepath.Join(dist, "vmshadow_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make package made %d packages in %s, want 1: %v", len(debs), dist, debs)
	}
	p := pkg{deb: debs[0], root: filepath.Join(t.TempDir(), "root")}
	run(t, nil, "dpkg-deb", "-x", p.deb, p.root)

	t.Run("control", func(t *testing.T) { checkControl(t, p) })
	t.Run("contents", func(t *testing.T) { checkContents(t, p) })
	t.Run("binary", func(t *testing.T) { checkBinary(t, p) })
	t.Run("unit", func(t *testing.T) { checkUnit(t, p) })
	t.Run("server-command", func(t *testing.T) { checkServerCommand(t, p) })
	t.Run("man", func(t *testing.T) { checkMan(t, p) })
	t.Run("completions", func(t *testing.T) { checkCompletions(t, p) })
	t.Run("dpkg-root", func(t *testing.T) { checkInstall(t, p) })
}

// binVersion is what the packaged binary says its version is.
func binVersion(t *testing.T, p pkg) string {
	t.Helper()
	out := run(t, nil, filepath.Join(p.root, "usr", "bin", "vmshadow"), "--version")
	v, ok := strings.CutPrefix(strings.TrimSpace(out), "vmshadow version ")
	if !ok || v == "" || v == "dev" {
		t.Fatalf("vmshadow --version printed %q, want 'vmshadow version' and git describe's version (the Makefile's LDFLAGS)", out)
	}
	return v
}

func checkControl(t *testing.T, p pkg) {
	fields := map[string]string{}
	for _, line := range strings.Split(run(t, nil, "dpkg-deb", "-f", p.deb), "\n") {
		if k, v, ok := strings.Cut(line, ": "); ok && !strings.HasPrefix(k, " ") {
			fields[k] = strings.TrimSpace(v)
		}
	}
	field := func(name string) string { return fields[name] }
	if got := field("Package"); got != "vmshadow" {
		t.Errorf("Package: %q, want vmshadow", got)
	}
	if want := strings.TrimSpace(run(t, nil, "dpkg", "--print-architecture")); field("Architecture") != want {
		t.Errorf("Architecture: %q, want %q (this machine's; GOARCH=%s)", field("Architecture"), want,
			strings.TrimSpace(run(t, nil, "go", "env", "GOARCH")))
	}
	commits := strings.TrimSpace(run(t, nil, "git", "-C", repoRoot(t), "rev-list", "--count", "HEAD"))
	if got, want := field("Version"), debVersion(t, binVersion(t, p), commits); got != want {
		t.Errorf("Version: %q, want %q (from the binary's version %q)", got, want, binVersion(t, p))
	}
	run(t, nil, "dpkg", "--validate-version", field("Version"))
	// A static binary depends on nothing; QEMU and libvirt are optional.
	if got := field("Depends"); got != "" {
		t.Errorf("Depends: %q, want none", got)
	}
	if got := field("Recommends"); !strings.Contains(got, "qemu-utils") {
		t.Errorf("Recommends: %q, want qemu-utils", got)
	}
	for _, f := range []string{"Maintainer", "Description", "Installed-Size", "Section"} {
		if field(f) == "" {
			t.Errorf("control field %s missing", f)
		}
	}
	if got := strings.TrimSpace(run(t, nil, "dpkg-deb", "-I", p.deb, "conffiles")); got != "/etc/vmshadow/server.yaml.sample" {
		t.Errorf("conffiles: %q, want only the sample /etc/vmshadow/server.yaml.sample", got)
	}
}

// topCommands lists the commands 'vmshadow --help' shows.
func topCommands(t *testing.T, p pkg) []string {
	t.Helper()
	out := run(t, nil, filepath.Join(p.root, "usr", "bin", "vmshadow"), "--help")
	_, list, ok := strings.Cut(out, "Available Commands:\n")
	if !ok {
		t.Fatalf("vmshadow --help lists no commands:\n%s", out)
	}
	var cmds []string
	for _, line := range strings.Split(list, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			break
		}
		if f[0] != "help" && f[0] != "completion" {
			cmds = append(cmds, f[0])
		}
	}
	return cmds
}

func checkContents(t *testing.T, p pkg) {
	// Every member: mode, owner and path (dpkg-deb -c prints
	// "-rwxr-xr-x root/root 12640418 2026-12-03 03:44 ./usr/bin/vmshadow").
	type member struct{ mode, owner string }
	files := map[string]member{}
	sc := bufio.NewScanner(strings.NewReader(run(t, nil, "dpkg-deb", "-c", p.deb)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 {
			t.Fatalf("dpkg-deb -c line %q", sc.Text())
		}
		files[strings.TrimPrefix(f[5], ".")] = member{f[0], f[1]}
	}
	want := map[string]string{
		"/usr/bin/vmshadow":                                  "-rwxr-xr-x",
		"/lib/systemd/system/" + unitName:                    "-rw-r--r--",
		"/etc/vmshadow/":                                     "drwxr-xr-x",
		"/etc/vmshadow/server.yaml.sample":                   "-rw-r--r--",
		"/usr/share/bash-completion/completions/vmshadow":    "-rw-r--r--",
		"/usr/share/zsh/vendor-completions/_vmshadow":        "-rw-r--r--",
		"/usr/share/fish/vendor_completions.d/vmshadow.fish": "-rw-r--r--",
		"/usr/share/doc/vmshadow/copyright":                  "-rw-r--r--",
		"/usr/share/doc/vmshadow/server-config.md":           "-rw-r--r--",
		"/usr/share/man/man1/vmshadow.1.gz":                  "-rw-r--r--",
	}
	for _, c := range topCommands(t, p) {
		want["/usr/share/man/man1/vmshadow-"+c+".1.gz"] = "-rw-r--r--"
	}
	for path, mode := range want {
		m, ok := files[path]
		switch {
		case !ok:
			t.Errorf("%s missing from the package", path)
		case m.mode != mode:
			t.Errorf("%s: mode %s, want %s", path, m.mode, mode)
		}
	}
	for path, m := range files {
		if m.owner != "root/root" {
			t.Errorf("%s owned by %s, want root/root", path, m.owner)
		}
		if strings.HasPrefix(path, "/usr/share/man/") && !strings.HasSuffix(path, "/") &&
			!regexp.MustCompile(`^/usr/share/man/man1/vmshadow[a-z0-9-]*\.1\.gz$`).MatchString(path) {
			t.Errorf("%s: man pages belong in /usr/share/man/man1, gzipped", path)
		}
		if strings.HasPrefix(path, "/etc/") && path != "/etc/" && path != "/etc/vmshadow/" && path != "/etc/vmshadow/server.yaml.sample" {
			t.Errorf("%s: the package must ship no live configuration (an upgrade would overwrite it)", path)
		}
	}
	// The sample is the documented one, and the licences of what the binary
	// links are in the copyright file.
	sample, err := os.ReadFile(filepath.Join(repoRoot(t), "docs", "server.yaml.sample"))
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(p.root, "etc", "vmshadow", "server.yaml.sample")); !bytes.Equal(got, sample) {
		t.Error("/etc/vmshadow/server.yaml.sample differs from docs/server.yaml.sample")
	}
	copyright, err := os.ReadFile(filepath.Join(p.root, "usr", "share", "doc", "vmshadow", "copyright"))
	if err != nil {
		t.Fatal(err)
	}
	for _, mod := range []string{"Go (the standard library", "github.com/spf13/cobra", "github.com/klauspost/compress", "golang.org/x/crypto"} {
		if !bytes.Contains(copyright, []byte("==> "+mod)) {
			t.Errorf("copyright has no licence of %s", mod)
		}
	}
	// md5sums match the files (dpkg -V uses them).
	ctl := t.TempDir()
	run(t, nil, "dpkg-deb", "-e", p.deb, ctl)
	md5, err := os.ReadFile(filepath.Join(ctl, "md5sums"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("md5sum", "--check", "--quiet", "--strict", "-")
	cmd.Dir, cmd.Stdin = p.root, bytes.NewReader(md5)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("md5sums do not match the files: %v\n%s", err, out)
	}
	if n := bytes.Count(md5, []byte("\n")); n < len(want)-1 { // want holds one directory
		t.Errorf("md5sums lists %d files, fewer than the %d expected", n, len(want)-1)
	}
}

func checkBinary(t *testing.T, p pkg) {
	bin := filepath.Join(p.root, "usr", "bin", "vmshadow")
	binVersion(t, p)
	// Statically linked: no program interpreter (the package has no Depends).
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Error("/usr/bin/vmshadow is dynamically linked; the package declares no Depends: build it with CGO_ENABLED=0")
		}
	}
	// The generator the package build runs is not a documented command.
	if out := run(t, nil, bin, "--help"); strings.Contains(out, "__generate-docs") {
		t.Error("vmshadow --help lists the hidden __generate-docs command")
	}
}

// unitSettings reads KEY=VALUE lines of a unit file (a key set twice
// keeps every value).
func unitSettings(t *testing.T, path string) map[string][]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := map[string][]string{}
	for _, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == '[' {
			continue
		}
		k, v, _ := strings.Cut(line, "=")
		s[k] = append(s[k], v)
	}
	return s
}

func checkUnit(t *testing.T, p pkg) {
	testutil.NeedCommand(t, "systemd-analyze")
	// systemd-analyze verify --root finds the targets the unit is ordered
	// against under the root, so the host's units go in beside ours.
	unitDir := filepath.Join(p.root, "lib", "systemd", "system")
	run(t, nil, "cp", "-an", "/lib/systemd/system/.", unitDir)
	verify := func(unit string) (string, error) {
		// --man=no: the unit's man page is in the package, not on this host
		// (the man subtest checks it).
		out, err := exec.Command("systemd-analyze", "verify", "--man=no", "--root="+p.root, unit).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	if out, err := verify(unitName); err != nil || out != "" {
		t.Errorf("systemd-analyze verify %s: %v\n%s", unitName, err, out)
	}
	// The same check on a broken copy must complain: the check can fail.
	unit, err := os.ReadFile(filepath.Join(unitDir, unitName))
	if err != nil {
		t.Fatal(err)
	}
	broken := bytes.Replace(unit, []byte("KillMode=mixed"), []byte("KillMode=bogus"), 1)
	if err := os.WriteFile(filepath.Join(unitDir, "vmshadow-broken.service"), broken, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := verify("vmshadow-broken.service"); err == nil && out == "" {
		t.Error("systemd-analyze verify found nothing wrong with KillMode=bogus: the unit check cannot fail")
	}
	os.Remove(filepath.Join(unitDir, "vmshadow-broken.service"))

	s := unitSettings(t, filepath.Join(unitDir, unitName))
	want := map[string]string{
		"ExecStart":        "/usr/bin/vmshadow server --config /etc/vmshadow/server.yaml",
		"ProtectSystem":    "strict",
		"StateDirectory":   "vmshadow",
		"RuntimeDirectory": "vmshadow",
		"PrivateTmp":       "yes",
		"NoNewPrivileges":  "yes",
		"ProtectHome":      "read-only",
		"Restart":          "on-failure",
		"KillMode":         "mixed",
		"WantedBy":         "multi-user.target",
	}
	for k, v := range want {
		if !slices.Contains(s[k], v) {
			t.Errorf("%s=%v, want %s", k, s[k], v)
		}
	}
	if !slices.Contains(s["ExecReload"], "/bin/kill -HUP $MAINPID") {
		t.Errorf("ExecReload=%v: the server reloads its configuration on SIGHUP", s["ExecReload"])
	}
	if len(s["TimeoutStopSec"]) == 0 {
		t.Error("no TimeoutStopSec: a running backup needs time to release its snapshot set")
	}

	// How exposed the service is, by systemd's own measure (0 = locked
	// down, 10 = unprotected; an unhardened service scores 9.6).
	out, err := exec.Command("systemd-analyze", "security", "--offline=true", "--root="+p.root, unitName).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for ` + regexp.QuoteMeta(unitName) + `: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("systemd-analyze security printed no exposure level:\n%s", out)
	}
	level, _ := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("systemd-analyze security: exposure %.1f", level)
	if level > 6.0 {
		t.Errorf("exposure level %.1f, more than 6.0: the unit lost some of its hardening", level)
	}

}

// checkServerCommand: the commands the unit runs exist in the packaged
// binary, once the server command is built (issue 14).
func checkServerCommand(t *testing.T, p pkg) {
	bin := filepath.Join(p.root, "usr", "bin", "vmshadow")
	help, err := exec.Command(bin, "server", "--help").CombinedOutput()
	if err != nil {
		t.Skipf("vmshadow server --help: %v (the server command is not in this build yet)", err)
	}
	for _, flag := range []string{"--config", "--check-config"} {
		if !bytes.Contains(help, []byte(flag)) {
			t.Errorf("vmshadow server has no %s flag, which the unit uses:\n%s", flag, help)
		}
	}
}

func checkMan(t *testing.T, p pkg) {
	testutil.NeedCommand(t, "groff")
	version := binVersion(t, p)
	dir := filepath.Join(p.root, "usr", "share", "man", "man1")
	pages, _ := filepath.Glob(filepath.Join(dir, "*.1.gz"))
	if len(pages) == 0 {
		t.Fatal("no man pages")
	}
	// Every page rendered by groff with every warning on (an undefined
	// macro, a bad escape): not a word on stderr.
	for _, page := range pages {
		data, err := os.ReadFile(page)
		if err != nil {
			t.Fatal(err)
		}
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("%s: %v", page, err)
		}
		cmd := exec.Command("groff", "-man", "-Tutf8", "-ww")
		cmd.Stdin = zr
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil || stderr.Len() > 0 {
			t.Errorf("groff -man %s: %v\n%s", filepath.Base(page), err, stderr.String())
			continue
		}
		name := strings.TrimSuffix(filepath.Base(page), ".1.gz")                  // vmshadow-backup
		text := regexp.MustCompile(`.\x08`).ReplaceAllString(stdout.String(), "") // overstrike
		for _, re := range []string{`(?m)^NAME$`, `(?m)^SYNOPSIS$`, `(?m)^\s+` + regexp.QuoteMeta(name) + `\s+-\s`, regexp.QuoteMeta("vmshadow " + version)} {
			if !regexp.MustCompile(re).MatchString(text) {
				t.Errorf("man %s: nothing matches %s in\n%s", name, re, text)
				break
			}
		}
	}
	// man itself (the unit's Documentation=man:vmshadow(1)).
	testutil.NeedCommand(t, "man")
	cmd := exec.Command("man", "--warnings", "-l", filepath.Join(dir, "vmshadow.1.gz"))
	cmd.Env = append(os.Environ(), "MANWIDTH=80")
	out, err := cmd.Output()
	if err != nil || !bytes.Contains(out, []byte("vmshadow-backup(1)")) {
		t.Errorf("man -l vmshadow.1.gz: %v; no SEE ALSO vmshadow-backup(1) in\n%s", err, out)
	}
}

func checkCompletions(t *testing.T, p pkg) {
	share := filepath.Join(p.root, "usr", "share")
	bash := filepath.Join(share, "bash-completion", "completions", "vmshadow")
	zsh := filepath.Join(share, "zsh", "vendor-completions", "_vmshadow")
	fish := filepath.Join(share, "fish", "vendor_completions.d", "vmshadow.fish")
	// The scripts call the binary (vmshadow __complete ...): the packaged
	// one comes first on the PATH.
	path := []string{"PATH=" + filepath.Join(p.root, "usr", "bin") + ":" + os.Getenv("PATH")}

	t.Run("bash", func(t *testing.T) {
		testutil.NeedCommand(t, "bash")
		run(t, nil, "bash", "-n", bash)
		lib := "/usr/share/bash-completion/bash_completion"
		if _, err := os.Stat(lib); err != nil {
			if testutil.InCI() {
				t.Fatalf("%s missing (package bash-completion): run 'make deps'", lib)
			}
			t.Skipf("%s missing (package bash-completion)", lib)
		}
		script := `source ` + lib + `; source "$1"
COMP_WORDS=(vmshadow ba); COMP_CWORD=1; COMP_LINE="vmshadow ba"; COMP_POINT=${#COMP_LINE}
__start_vmshadow vmshadow ba vmshadow 2>/dev/null
printf '%s\n' "${COMPREPLY[@]}"`
		got := strings.Fields(run(t, path, "bash", "-c", script, "bash", bash))
		if !slices.Contains(got, "backup") || !slices.Contains(got, "backups") {
			t.Errorf("bash completes 'vmshadow ba' to %q, want backup and backups", got)
		}
	})
	t.Run("zsh", func(t *testing.T) {
		testutil.NeedCommand(t, "zsh")
		run(t, nil, "zsh", "-n", zsh)
		data, err := os.ReadFile(zsh)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(data, []byte("#compdef vmshadow\n")) {
			t.Errorf("%s does not start with '#compdef vmshadow': zsh's compinit would not load it", zsh)
		}
	})
	t.Run("fish", func(t *testing.T) {
		testutil.NeedCommand(t, "fish")
		run(t, nil, "fish", "--no-execute", fish)
		out := run(t, path, "fish", "--no-config", "-c", `source $argv[1]; complete -C "vmshadow backup --re"; complete -C "vmshadow ba"`, fish)
		for _, want := range []string{"--repo\t", "backup\t", "backups\t"} {
			if !strings.Contains(out, want) {
				t.Errorf("fish completions of 'vmshadow backup --re' and 'vmshadow ba' lack %q:\n%s", strings.TrimSpace(want), out)
			}
		}
	})
}

// checkInstall installs, upgrades, removes and purges the package in a
// throwaway root with dpkg --root (never on this machine), the maintainer
// scripts run chrootless with DPKG_ROOT set. systemd does not run here (it
// is not PID 1), so systemctl is a script that records its calls and says
// whether the unit is active ($STUB_ACTIVE): what the maintainer scripts
// ask of systemd is checked, not what systemd then does.
func checkInstall(t *testing.T, p pkg) {
	testutil.NeedCommand(t, "dpkg")
	root := filepath.Join(t.TempDir(), "root")
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "run/systemd/system", "var/lib/vmshadow"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "var/lib/dpkg/status"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	stub := t.TempDir()
	log := filepath.Join(stub, "log")
	systemctl := "#!/bin/sh\necho \"$*\" >>" + log + "\ncase \"$1\" in is-active) exit ${STUB_ACTIVE:-3} ;; esac\n"
	if err := os.WriteFile(filepath.Join(stub, "systemctl"), []byte(systemctl), 0o755); err != nil {
		t.Fatal(err)
	}
	hostState := "/var/lib/systemd/deb-systemd-helper-enabled/" + unitName + ".dsh-also"
	_, err := os.Stat(hostState)
	hostHadState := err == nil

	dpkg := func(env []string, args ...string) (calls []string, stderr string) {
		t.Helper()
		os.Remove(log)
		args = append([]string{"--root=" + root, "--force-script-chrootless", "--log=/dev/null"}, args...)
		cmd := exec.Command("dpkg", args...)
		cmd.Env = append(os.Environ(), append(env, "PATH="+stub+":"+os.Getenv("PATH"))...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("dpkg %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
		}
		data, _ := os.ReadFile(log)
		return strings.Split(strings.TrimSpace(string(data)), "\n"), errb.String()
	}
	noStartEnable := func(step string, calls []string) {
		t.Helper()
		for _, c := range calls {
			for _, bad := range []string{"enable", "start", "restart", "try-restart", "reload-or-restart"} {
				if strings.Fields(c + " x")[0] == bad {
					t.Errorf("%s: the maintainer script ran 'systemctl %s': the operator enables and starts the server after writing its configuration", step, c)
				}
			}
		}
	}

	calls, _ := dpkg(nil, "--install", p.deb)
	noStartEnable("install", calls)
	if !slices.Contains(calls, "--system daemon-reload") {
		t.Errorf("install: no systemctl daemon-reload (calls %q)", calls)
	}
	run(t, nil, "dpkg", "--root="+root, "--verify", "vmshadow")
	if _, err := os.Stat(filepath.Join(root, "etc/vmshadow/server.yaml")); err == nil {
		t.Error("install wrote /etc/vmshadow/server.yaml")
	}
	if _, err := exec.LookPath("deb-systemd-helper"); err == nil {
		if _, err := os.Stat(filepath.Join(root, hostState)); err != nil {
			t.Errorf("deb-systemd-helper kept no state in the package's root (purge would leave enable links behind): %v", err)
		}
		if _, err := os.Stat(hostState); err == nil && !hostHadState {
			t.Errorf("installing into %s wrote %s on this machine", root, hostState)
		}
	}

	// Upgrade while the server runs: not restarted (that would cut off
	// running backups), the operator told. The sample edited by the
	// operator is kept.
	sample := filepath.Join(root, "etc/vmshadow/server.yaml.sample")
	if err := os.WriteFile(sample, []byte("# the operator's notes\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	journal := filepath.Join(root, "var/lib/vmshadow/journal")
	if err := os.WriteFile(journal, []byte("set k2x7q4mdpa\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	calls, stderr := dpkg([]string{"STUB_ACTIVE=0"}, "--force-confold", "--install", p.deb)
	noStartEnable("upgrade", calls)
	if !strings.Contains(stderr, "systemctl restart vmshadow-server") {
		t.Errorf("upgrade with the server running: no word about restarting it; stderr:\n%s", stderr)
	}

	// Remove: the server stopped before its binary goes; the edited
	// sample and the state directory stay.
	calls, _ = dpkg(nil, "--remove", "vmshadow")
	if !slices.Contains(calls, "stop "+unitName) {
		t.Errorf("remove: the server was not stopped (calls %q)", calls)
	}
	noStartEnable("remove", calls)
	if _, err := os.Stat(filepath.Join(root, "usr/bin/vmshadow")); err == nil {
		t.Error("remove left /usr/bin/vmshadow")
	}
	if got, _ := os.ReadFile(sample); string(got) != "# the operator's notes\n" {
		t.Errorf("remove changed the edited conffile: %q", got)
	}

	// Purge: the configuration goes, the state directory stays (it holds
	// the journals 'vmshadow recover' needs).
	dpkg(nil, "--purge", "vmshadow")
	if _, err := os.Stat(sample); err == nil {
		t.Error("purge left /etc/vmshadow/server.yaml.sample")
	}
	if _, err := os.Stat(journal); err != nil {
		t.Errorf("purge removed /var/lib/vmshadow: %v", err)
	}
}
