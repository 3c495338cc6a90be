package web_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/server"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
	"github.com/vmshadow/vmshadow/internal/server/web"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// ScreenshotsEnv, set to 1, makes TestBrowser write its screenshots to
// docs/screenshots (they are committed; a normal run leaves them alone).
const ScreenshotsEnv = "VMSHADOW_SCREENSHOTS"

type testLog struct{ t *testing.T }

func (w testLog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// webRig is a real server core (real QEMU VM behind a QMP glob, a real
// repository, the state database) behind the API and the web interface
// on a loopback HTTP server.
type webRig struct {
	dir   string
	vm    *qemutest.VM
	s     *server.Server
	url   string
	admin string
	view  string
}

func newWebRig(t *testing.T) *webRig { return newWebRigWith(t, "") }

// newWebRigWith adds connections (YAML lines under connections:) to the
// rig's configuration.
func newWebRigWith(t *testing.T, conns string) *webRig {
	t.Helper()
	g := &webRig{dir: t.TempDir()}
	socks := filepath.Join(g.dir, "sockets")
	if err := os.MkdirAll(socks, 0o700); err != nil {
		t.Fatal(err)
	}
	g.vm = qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda", Size: 32 << 20}}, Name: "vm1"})
	g.vm.Write("vda", 0xa5, 1<<20, 4<<20)
	g.vm.Write("vda", 0x3c, 20<<20, 1<<20)
	if err := os.Symlink(g.vm.QMPPath, filepath.Join(socks, "vm1.qmp")); err != nil {
		t.Fatal(err)
	}
	pw := filepath.Join(g.dir, "pw")
	if err := os.WriteFile(pw, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	be, err := local.Create(filepath.Join(g.dir, "main"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := repo.Init(context.Background(), be, repo.InitOptions{Password: []byte("s3cret"), ChunkSize: repo.MinChunkSize,
		KDF: &repo.KDFParams{Name: "argon2id", Time: 1, MemoryKiB: 8 << 10, Threads: 1}})
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	be.Close()
	cfg := filepath.Join(g.dir, "server.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`listen: [{address: "unix:%[1]s/api.sock"}]
state_dir: %[1]s/state
repositories:
  main: {location: %[1]s/main, password_file: %[1]s/pw}
connections:
  lab:
    type: qmp
    sockets: [%[1]s/sockets/*.qmp]
%[2]sjobs:
  # The server lists the VMs its backup jobs select: this one (run only
  # by hand, never run here) makes vm1 known, unprotected.
  - {name: inventory, type: backup, repository: main, vms: [{connection: lab}]}
  - {name: tidy, type: gc, repository: main}
  - {name: check, type: verify, repository: main}
`, g.dir, conns)), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s, err := server.New(ctx, server.Options{ConfigPath: cfg, Log: slog.New(slog.NewTextHandler(testLog{t}, nil))})
	if err != nil {
		t.Fatal(err)
	}
	g.s = s
	t.Cleanup(func() {
		cancel()
		cctx, ccancel := context.WithTimeout(context.Background(), time.Minute)
		defer ccancel()
		if err := s.Close(cctx); err != nil {
			t.Error(err)
		}
	})
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if g.admin, err = s.DB().CreateToken(ctx, "ops", state.Admin, time.Now()); err != nil {
		t.Fatal(err)
	}
	if g.view, err = s.DB().CreateToken(ctx, "grafana", state.Viewer, time.Now()); err != nil {
		t.Fatal(err)
	}
	ui := web.New(s, web.Options{Version: "test"})
	hs := httptest.NewServer(web.Mount(ui, api.New(s, api.Options{Sessions: ui, Metrics: s.MetricsHandler(), Logf: t.Logf})))
	t.Cleanup(hs.Close)
	g.url = hs.URL
	return g
}

// browser starts headless Chromium (as root without its sandbox).
func browser(t *testing.T, width, height int) context.Context {
	t.Helper()
	bin := testutil.NeedCommand(t, "chromium")
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(bin), chromedp.WindowSize(width, height),
		chromedp.Flag("disable-gpu", true))
	if os.Geteuid() == 0 {
		opts = append(opts, chromedp.NoSandbox)
	}
	actx, acancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(acancel)
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(cancel)
	ctx, tcancel := context.WithTimeout(ctx, 5*time.Minute)
	t.Cleanup(tcancel)
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return ctx
}

func run(t *testing.T, ctx context.Context, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatalf("%s: %v\npage: %s", what, err, pageHTML(ctx))
	}
}

// get runs an action that gives a value.
func value[T any](t *testing.T, ctx context.Context, what string, a chromedp.Action[T]) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("%s: %v\npage: %s", what, err, pageHTML(ctx))
	}
	return v
}

func pageHTML(ctx context.Context) string {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	html, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`(document.querySelector("main") || document.body).outerHTML`))
	return html
}

// waitText waits until the text of sel is want.
func waitText(t *testing.T, ctx context.Context, sel, want string) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var got string
	for time.Now().Before(deadline) {
		var err error
		got, err = chromedp.Run(ctx, chromedp.Evaluate[string](fmt.Sprintf(`(document.querySelector(%q) || {}).textContent || ""`, sel)))
		if err == nil && strings.TrimSpace(got) == want {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: text %q, want %q", sel, got, want)
}

// fetchStatus calls the API from the page with its session and returns
// the HTTP status.
func fetchStatus(t *testing.T, ctx context.Context, method, path string) int {
	t.Helper()
	js := fmt.Sprintf(`fetch(%q, {method: %q, headers: {'X-CSRF-Token': document.querySelector('meta[name="csrf-token"]').content}}).then(r => r.status)`, path, method)
	return value(t, ctx, "fetch "+path, chromedp.Evaluate[int](js, chromedp.EvalAwaitPromise))
}

func screenshot(t *testing.T, ctx context.Context, name string) {
	t.Helper()
	if os.Getenv(ScreenshotsEnv) != "1" {
		return
	}
	value(t, ctx, "hide the toast", chromedp.Evaluate[string](`document.getElementById("toast").className = ""`))
	png := value(t, ctx, "screenshot "+name, chromedp.FullScreenshot(100))
	dir := filepath.Join("..", "..", "..", "docs", "screenshots")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), png, 0o644); err != nil {
		t.Fatal(err)
	}
}

func count(t *testing.T, ctx context.Context, sel string) int {
	t.Helper()
	return value(t, ctx, "count "+sel, chromedp.Evaluate[int](fmt.Sprintf(`document.querySelectorAll(%q).length`, sel)))
}

// TestBrowser drives the web interface in headless Chromium against a
// real server core and a real QEMU VM: a wrong token is refused; an
// admin logs in, sees the VM unprotected, creates a backup job in the
// form, runs it and watches the run page reach success through the event
// stream, sees the backup on the VM page, starts an instant restore and
// the NBD URI on the page serves the disk; a viewer sees no button that
// changes anything and the API refuses those changes anyway.
func TestBrowser(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	g := newWebRig(t)
	ctx := browser(t, 1280, 900)

	// A hook that holds the freeze until the test opens the gate (a
	// minute at most), so that the pages see the run running.
	hook, gate := filepath.Join(g.dir, "hold.sh"), filepath.Join(g.dir, "gate")
	if err := os.WriteFile(hook, []byte("#!/bin/sh\n[ \"$1\" = freeze ] || exit 0\ni=0\nwhile [ ! -e "+gate+" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"), 0o755); err != nil {
		t.Fatal(err)
	}

	// A wrong token is refused.
	run(t, ctx, "wrong token",
		chromedp.Navigate(g.url+"/"),
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), "vmsh_"+strings.Repeat("0", 64)),
		chromedp.Submit(chromedp.CSS("#login-form")),
		chromedp.WaitVisible(chromedp.CSS("#login-error")))
	waitText(t, ctx, "#login-error", "Unknown or revoked API token: check it, or list tokens with 'vmshadow server token list'.")

	// The admin logs in: the VM is there, never backed up.
	run(t, ctx, "log in",
		chromedp.SendKeys(chromedp.CSS("#token"), g.admin),
		chromedp.Submit(chromedp.CSS("#login-form")),
		chromedp.WaitVisible(chromedp.CSS(`#vms tr[data-vm="vm1"]`)))
	waitText(t, ctx, `#vms tr[data-vm="vm1"] .status`, "never")
	waitText(t, ctx, "#fleet", "never 1 — 1 VMs")

	// A job from the form.
	run(t, ctx, "create a job",
		chromedp.Click(chromedp.CSS(`nav a[href="#/jobs"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#new-job`)),
		chromedp.Click(chromedp.CSS(`#new-job`)),
		chromedp.WaitVisible(chromedp.CSS("#job-form")),
		chromedp.SendKeys(chromedp.CSS("#job-name"), "web-nightly"),
		chromedp.SendKeys(chromedp.CSS("#job-vms"), "vm*"),
		chromedp.SendKeys(chromedp.CSS("#job-schedule"), "@daily"),
		chromedp.SendKeys(chromedp.CSS("#job-keep-last"), "3"),
		chromedp.SendKeys(chromedp.CSS("#job-hooks"), hook))
	waitText(t, ctx, "#job-preview", "Selects now: vm1")
	// The server matches the selection: a VM it cannot find is named.
	setInput(t, ctx, "#job-vms", "vm*, nosuch")
	waitContains(t, ctx, "#job-selection-problems", `VM "nosuch" is not found`)
	setInput(t, ctx, "#job-vms", "vm*")
	waitText(t, ctx, "#job-selection-problems", "")
	waitText(t, ctx, "#job-preview", "Selects now: vm1")
	// The schedule's next five times, computed by the server; a bad
	// schedule is named; a time zone is taken.
	waitCount(t, ctx, "#schedule-preview ol.next li", 5)
	setInput(t, ctx, "#job-schedule", "0 25 * * *")
	waitContains(t, ctx, "#schedule-error", `"0 25 * * *": hour 25 out of range 0-23`)
	setInput(t, ctx, "#job-timezone", "Mars/Base")
	setInput(t, ctx, "#job-schedule", "@daily")
	waitContains(t, ctx, "#schedule-error", `time zone "Mars/Base": unknown`)
	setInput(t, ctx, "#job-timezone", "Europe/Berlin")
	waitContains(t, ctx, "#schedule-preview p", "Next runs (Europe/Berlin)")
	setInput(t, ctx, "#job-timezone", "")
	waitContains(t, ctx, "#schedule-preview p", "Next runs (UTC)")
	waitCount(t, ctx, "#schedule-preview ol.next li", 5)
	// No backup yet: the retention has nothing to decide.
	waitContains(t, ctx, "#retention-box", "Would remove 0 and keep 0 backups of vm1")
	run(t, ctx, "submit the job",
		chromedp.Click(chromedp.CSS(`#job-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#jobs tr[data-job="web-nightly"] button.run`)))
	j, err := g.s.Job(context.Background(), "web-nightly")
	if err != nil {
		t.Fatalf("the form's job: %v", err)
	}
	if j.Source != "api" || j.Schedule != "@daily" || fmt.Sprint(j.VMs) != "[vm1]" {
		t.Fatalf("the form's job: %+v", j)
	}

	// The jobs page lists its next five times; it can be disabled and
	// enabled again, and edited (its keys as JSON).
	if n := count(t, ctx, `#jobs tr[data-job="web-nightly"] ol.next li`); n != 5 {
		t.Fatalf("next run times on the jobs page: %d, want 5", n)
	}
	toggle := chromedp.CSS(`#jobs tr[data-job="web-nightly"] button[data-action="toggle"]`)
	run(t, ctx, "disable", chromedp.Click(toggle))
	waitText(t, ctx, `#jobs tr[data-job="web-nightly"] td:nth-child(4)`, "disabled")
	if j, err := g.s.Job(context.Background(), "web-nightly"); err != nil || j.Enabled {
		t.Fatalf("job after Disable: %+v %v", j, err)
	}
	run(t, ctx, "enable", chromedp.Click(toggle))
	waitText(t, ctx, `#jobs tr[data-job="web-nightly"] td:nth-child(4)`, "enabled")
	run(t, ctx, "edit",
		chromedp.Click(chromedp.CSS(`#jobs tr[data-job="web-nightly"] a[href="#/jobs/edit/web-nightly"]`)),
		chromedp.WaitVisible(chromedp.CSS("#job-spec")))
	// The edit page previews its settings too, and follows them.
	waitText(t, ctx, "#job-preview", "Selects now: vm1")
	waitCount(t, ctx, "#schedule-preview ol.next li", 5)
	waitContains(t, ctx, "#retention-box", "Would remove 0 and keep 0 backups of vm1")
	value(t, ctx, "change the schedule", chromedp.Evaluate[string](`(() => { const ta = document.getElementById("job-spec");
		const spec = JSON.parse(ta.value); spec.schedule = "@weekly"; ta.value = JSON.stringify(spec);
		ta.dispatchEvent(new Event("input", {bubbles: true})); return ta.value; })()`))
	waitWeekly := time.Now().Add(90 * time.Second)
	for {
		ts := value(t, ctx, "previewed times", chromedp.Evaluate[[]string](`[...document.querySelectorAll("#schedule-preview time")].map((e) => e.getAttribute("datetime"))`))
		weekly := len(ts) == 5
		for i := 1; weekly && i < len(ts); i++ {
			a, err1 := time.Parse(time.RFC3339, ts[i-1])
			b, err2 := time.Parse(time.RFC3339, ts[i])
			weekly = err1 == nil && err2 == nil && b.Sub(a) == 7*24*time.Hour
		}
		if weekly {
			break
		}
		if time.Now().After(waitWeekly) {
			t.Fatalf("the edit page's schedule preview after @weekly: %v", ts)
		}
		time.Sleep(200 * time.Millisecond)
	}
	run(t, ctx, "save", chromedp.Click(chromedp.CSS(`#edit-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#jobs tr[data-job="web-nightly"] button.run`)))
	waitText(t, ctx, `#jobs tr[data-job="web-nightly"] td:nth-child(3)`, "@weekly")
	if j, err := g.s.Job(context.Background(), "web-nightly"); err != nil || j.Schedule != "@weekly" || !j.Enabled {
		t.Fatalf("job after the edit: %+v %v", j, err)
	}

	// Run it; the run page follows it live to its end.
	run(t, ctx, "run now",
		chromedp.Click(chromedp.CSS(`#jobs tr[data-job="web-nightly"] button.run`)),
		chromedp.WaitVisible(chromedp.CSS("#run-status")))
	first := value(t, ctx, "run status", chromedp.Text(chromedp.CSS("#run-status")))
	if first != "running" {
		t.Fatalf("the run page opened on a run in state %q, want running (the hook holds it)", first)
	}
	run(t, ctx, "live progress", chromedp.WaitVisible(chromedp.CSS(`#progress tbody tr`)))
	screenshot(t, ctx, "run.png")
	// The dashboard, in another tab, shows it running with its progress.
	hash := value(t, ctx, "run page's address", chromedp.Evaluate[string](`location.hash`))
	tab, closeTab := chromedp.NewContext(ctx)
	run(t, tab, "dashboard while running", chromedp.Navigate(g.url+"/"),
		chromedp.WaitVisible(chromedp.CSS(`#running a[href="`+hash+`"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#running td.live progress`)))
	closeTab()
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// Only the event stream changes the status on this page.
	waitText(t, ctx, "#run-status", "succeeded")
	run(t, ctx, "the VM's result", chromedp.WaitVisible(chromedp.CSS(`#run-vms tr[data-vm="vm1"]`)))
	waitText(t, ctx, `#run-vms tr[data-vm="vm1"] td:nth-child(2)`, "succeeded")
	if n := count(t, ctx, "#log li"); n == 0 {
		t.Fatal("the run page shows no log line")
	}
	if n := count(t, ctx, "#cancel"); n != 0 {
		t.Fatal("a finished run still offers Cancel")
	}

	// The backup on the VM page.
	bs, err := g.s.Backups(context.Background(), api.BackupFilter{VM: "vm1"})
	if err != nil || len(bs) != 1 {
		t.Fatalf("backups: %v %v", bs, err)
	}
	row := fmt.Sprintf(`#backups tr[data-backup="%s"]`, bs[0].ID)
	run(t, ctx, "VM page",
		chromedp.Click(chromedp.CSS(`#run-vms tr[data-vm="vm1"] a`)),
		chromedp.WaitVisible(chromedp.CSS(row)))
	waitText(t, ctx, row+" td:nth-child(2)", bs[0].ShortID)

	// Instant restore: the URI on the page serves the disk.
	run(t, ctx, "instant restore",
		chromedp.Click(chromedp.CSS(row+" button.serve")),
		chromedp.WaitVisible(chromedp.CSS(".serve-uri")))
	uri := value(t, ctx, "NBD URI", chromedp.Text(chromedp.CSS(".serve-uri")))
	if !strings.HasPrefix(uri, "nbd+unix:///vda?socket=") {
		t.Fatalf("NBD URI on the page: %q", uri)
	}
	snippet := value(t, ctx, "snippet", chromedp.Text(chromedp.CSS(".serve-box pre")))
	if !strings.Contains(snippet, "qemu-system-x86_64") || !strings.Contains(snippet, "-drive file="+uri+",") {
		t.Fatalf("snippet: %q", snippet)
	}
	out, err := exec.Command("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", g.vm.Disk("vda").Path, uri).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img compare of the disk and the page's NBD URI: %v: %s", err, out)
	}
	// The libvirt domain on the page boots from that NBD socket: a valid
	// domain XML, its disk the served export.
	domXML := value(t, ctx, "virsh snippet", chromedp.Text(chromedp.CSS(".serve-box pre.virsh")))
	sock := strings.TrimPrefix(uri, "nbd+unix:///vda?socket=")
	for _, want := range []string{uri, "<source protocol='nbd' name='vda'>", "<host transport='unix' socket='" + sock + "'/>"} {
		if !strings.Contains(domXML, want) {
			t.Errorf("domain XML lacks %q:\n%s", want, domXML)
		}
	}
	if cmd := value(t, ctx, "virsh command", chromedp.Text(chromedp.CSS(".serve-box .virsh-cmd"))); cmd != "virsh create vda-instant.xml" {
		t.Errorf("virsh command %q", cmd)
	}
	xmlFile := filepath.Join(g.dir, "vda-instant.xml")
	if err := os.WriteFile(xmlFile, []byte(domXML), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(testutil.NeedCommand(t, "virt-xml-validate"), xmlFile, "domain").CombinedOutput(); err != nil {
		t.Fatalf("the page's domain XML does not validate: %v: %s\n%s", err, out, domXML)
	}
	screenshot(t, ctx, "vm.png")
	run(t, ctx, "stop the serve",
		chromedp.Click(chromedp.CSS(".serve-box button.danger")),
		chromedp.WaitNotPresent(chromedp.CSS(".serve-box")))
	if sv, err := g.s.Serves(context.Background()); err != nil || len(sv) != 0 {
		t.Fatalf("serves after Stop: %v %v", sv, err)
	}

	// Restore to a directory on the server.
	to := filepath.Join(g.dir, "restored")
	run(t, ctx, "restore",
		chromedp.Click(chromedp.CSS(row+` button[data-action="restore"]`)),
		chromedp.WaitVisible(chromedp.CSS("#restore-to")),
		chromedp.SendKeys(chromedp.CSS("#restore-to"), to),
		chromedp.Click(chromedp.CSS(`#action-panel button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS("#restored li code")))
	file := value(t, ctx, "restored file", chromedp.Text(chromedp.CSS("#restored li code")))
	if filepath.Dir(file) != to {
		t.Fatalf("restored file %q not in %s", file, to)
	}
	if out, err := exec.Command("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", g.vm.Disk("vda").Path, file).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare of the disk and the restored file: %v: %s", err, out)
	}

	// The dashboard shows it protected.
	run(t, ctx, "dashboard",
		chromedp.Navigate(g.url+"/#/"),
		chromedp.WaitVisible(chromedp.CSS(`#vms tr[data-vm="vm1"]`)))
	waitText(t, ctx, `#vms tr[data-vm="vm1"] .status`, "fresh")
	waitText(t, ctx, "#fleet", "fresh 1 — 1 VMs")
	// The usage chart: the points the server recorded, the last one the
	// repository's statistics after the backup.
	pts := usageAfter(t, g, bs[0].Time)
	run(t, ctx, "dashboard again", chromedp.Navigate(g.url+"/#/jobs"), chromedp.WaitVisible(chromedp.CSS("#jobs")),
		chromedp.Navigate(g.url+"/#/"), chromedp.WaitVisible(chromedp.CSS(`figure.usage[data-repo="main"] svg`)))
	checkChart(t, ctx, pts)
	screenshot(t, ctx, "dashboard.png")

	// A second backup, and a verify.
	g.runJob(t, "web-nightly", state.Succeeded)
	checkRun := g.runJob(t, "check", state.Succeeded)
	bs2, err := g.s.Backups(context.Background(), api.BackupFilter{VM: "vm1"})
	if err != nil || len(bs2) != 2 {
		t.Fatalf("backups after the second run: %v %v", bs2, err)
	}

	// The VM page: both on the timeline, with their freeze times and
	// verification.
	run(t, ctx, "VM page with two backups", chromedp.Navigate(g.url+"/#/vm/vm1"),
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`#backups tr[data-backup="%s"]`, bs2[0].ID))))
	if n := count(t, ctx, "figure.timeline circle.mark"); n != 2 {
		t.Errorf("timeline marks: %d, want 2", n)
	}
	for _, b := range bs2 {
		r := fmt.Sprintf(`#backups tr[data-backup="%s"]`, b.ID)
		if b.FreezeMS <= 0 || b.Run == 0 {
			t.Fatalf("backup %s: freeze %d ms, run %d: the API lacks them", b.ShortID, b.FreezeMS, b.Run)
		}
		waitText(t, ctx, r+" td.freeze", fmt.Sprintf("%d ms", b.FreezeMS))
		if b.Verified.IsZero() {
			t.Fatalf("backup %s not verified after run %d", b.ShortID, checkRun)
		}
		if v := value(t, ctx, "verified", chromedp.Evaluate[string](fmt.Sprintf(`document.querySelector(%q).getAttribute("datetime")`, r+" td.verified time"))); v == "" {
			t.Errorf("backup %s: no verification time on the page", b.ShortID)
		}
		if n := count(t, ctx, fmt.Sprintf(`figure.timeline circle.c-%s[data-backup="%s"]`, b.Consistency, b.ID)); n != 1 {
			t.Errorf("backup %s (%s) not on the timeline in its colour", b.ShortID, b.Consistency)
		}
	}

	// The job form previews what a retention of the last backup removes:
	// the older one.
	run(t, ctx, "new job form", chromedp.Navigate(g.url+"/#/jobs/new"), chromedp.WaitVisible(chromedp.CSS("#job-form")),
		chromedp.SendKeys(chromedp.CSS("#job-vms"), "vm1"), chromedp.SendKeys(chromedp.CSS("#job-keep-last"), "1"))
	run(t, ctx, "retention preview", chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`#retention-preview tr.remove[data-backup="%s"]`, bs2[1].ID))))
	waitContains(t, ctx, "#retention-preview .summary", "Would remove 1 and keep 1 backups of vm1 in main.")
	waitText(t, ctx, fmt.Sprintf(`#retention-preview tr[data-backup="%s"] td:nth-child(5)`, bs2[0].ID), "kept by last")
	setInput(t, ctx, "#job-name", "vm1-nightly")
	setInput(t, ctx, "#job-schedule", "0 2 * * *")
	waitCount(t, ctx, "#schedule-preview ol.next li", 5)
	screenshot(t, ctx, "job-form.png")

	// The repository page: its size history, the verify run, the
	// retention of web-nightly (keep_last 3: both stay) and gc's dry run.
	pts = usageAfter(t, g, bs2[0].Time)
	run(t, ctx, "repository page", chromedp.Navigate(g.url+"/#/repo/main"), chromedp.WaitVisible(chromedp.CSS("#verifies")))
	checkChart(t, ctx, pts)
	waitText(t, ctx, `#verifies tbody tr td:nth-child(2)`, fmt.Sprintf("#%d", checkRun))
	waitText(t, ctx, `#verifies tbody tr td:nth-child(5)`, "good")
	run(t, ctx, "retention of web-nightly", chromedp.Click(chromedp.CSS(`#prune-preview ~ * button, button.preview-job[data-job="web-nightly"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#job-preview-web-nightly .verdicts`)))
	waitContains(t, ctx, "#job-preview-web-nightly .summary", "Would remove 0 and keep 2 backups of vm1 in main.")
	run(t, ctx, "gc preview", chromedp.Click(chromedp.CSS("#gc-preview-button")), chromedp.WaitVisible(chromedp.CSS("#gc-would")))
	waitContains(t, ctx, "#gc-would", "0 chunks and 0 indexes")
	screenshot(t, ctx, "repository.png")

	// The admin sees the destructive buttons; a viewer none, and the API
	// refuses them anyway.
	run(t, ctx, "VM page as admin", chromedp.Navigate(g.url+"/#/vm/vm1"), chromedp.WaitVisible(chromedp.CSS(row)))
	if n := count(t, ctx, row+" button"); n != 3 {
		t.Fatalf("admin sees %d buttons on a backup, want 3 (restore, instant restore, delete)", n)
	}
	run(t, ctx, "log out",
		chromedp.Click(chromedp.CSS("header .who button")),
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), g.view),
		chromedp.Submit(chromedp.CSS("#login-form")),
		chromedp.WaitVisible(chromedp.CSS(`#vms tr[data-vm="vm1"]`)))
	run(t, ctx, "VM page as viewer", chromedp.Navigate(g.url+"/#/vm/vm1"), chromedp.WaitVisible(chromedp.CSS(row)))
	if n := count(t, ctx, "main button"); n != 0 {
		t.Fatalf("viewer sees %d buttons on the VM page", n)
	}
	run(t, ctx, "jobs as viewer", chromedp.Navigate(g.url+"/#/jobs"), chromedp.WaitVisible(chromedp.CSS(`#jobs tr[data-job="web-nightly"]`)))
	if n := count(t, ctx, "main button, #new-job"); n != 0 {
		t.Fatalf("viewer sees %d buttons on the jobs page", n)
	}
	if st := fetchStatus(t, ctx, "POST", "/api/v1/jobs/web-nightly/run"); st != 403 {
		t.Fatalf("viewer runs a job through the API: %d", st)
	}
	if st := fetchStatus(t, ctx, "DELETE", "/api/v1/repositories/main/backups/"+bs[0].ID); st != 403 {
		t.Fatalf("viewer deletes a backup through the API: %d", st)
	}
	if st := fetchStatus(t, ctx, "GET", "/api/v1/vms"); st != 200 {
		t.Fatalf("viewer reads the VMs: %d", st)
	}
	if bs, err := g.s.Backups(context.Background(), api.BackupFilter{VM: "vm1"}); err != nil || len(bs) != 2 {
		t.Fatalf("backups after the viewer's tries: %v %v", bs, err)
	}

	// The runs list is paged: 24 runs, 20 on the first page, the 4
	// oldest on the next.
	for range 21 {
		r, err := g.s.RunJob(context.Background(), "tidy")
		if err != nil {
			t.Fatal(err)
		}
		for {
			d, err := g.s.Run(context.Background(), r.ID)
			if err != nil {
				t.Fatal(err)
			}
			if d.Status != state.Running {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	run(t, ctx, "runs", chromedp.Navigate(g.url+"/#/runs"), chromedp.WaitVisible(chromedp.CSS(`#runs tr[data-run="24"]`)))
	if n := count(t, ctx, "#runs tbody tr"); n != 20 {
		t.Fatalf("first page of runs: %d rows, want 20", n)
	}
	run(t, ctx, "older runs", chromedp.Click(chromedp.CSS("#older")), chromedp.WaitVisible(chromedp.CSS(`#runs tr[data-run="1"]`)))
	if n := count(t, ctx, "#runs tbody tr"); n != 4 {
		t.Fatalf("second page of runs: %d rows, want 4", n)
	}
	run(t, ctx, "filter by job",
		chromedp.Navigate(g.url+"/#/runs"), chromedp.WaitVisible(chromedp.CSS(`#runs tr[data-run="24"]`)),
		chromedp.SetValue(chromedp.CSS("#filter-job"), "web-nightly"),
		chromedp.Click(chromedp.CSS(`.filters button[type="submit"]`)),
		chromedp.WaitNotPresent(chromedp.CSS(`#runs tr[data-run="24"]`)))
	if got := runIDs(t, ctx); got != "[2 1]" {
		t.Fatalf("runs filtered by job web-nightly: %s, want runs 2 and 1", got)
	}
	// The server filters by VM and by status, page by page.
	run(t, ctx, "filter by VM", chromedp.Navigate(g.url+"/#/runs"), chromedp.WaitVisible(chromedp.CSS(`#runs tr[data-run="24"]`)),
		chromedp.SetValue(chromedp.CSS("#filter-job"), ""), chromedp.SetValue(chromedp.CSS("#filter-vm"), "vm1"),
		chromedp.Click(chromedp.CSS(`.filters button[type="submit"]`)), chromedp.WaitNotPresent(chromedp.CSS(`#runs tr[data-run="24"]`)))
	if got := runIDs(t, ctx); got != "[2 1]" {
		t.Fatalf("runs that backed up vm1: %s, want runs 2 and 1", got)
	}
	ok, err := g.s.Runs(context.Background(), state.RunFilter{Status: state.Succeeded, Limit: 1000})
	if err != nil || len(ok) <= 20 {
		t.Fatalf("succeeded runs: %d %v", len(ok), err)
	}
	run(t, ctx, "filter by status", chromedp.Navigate(g.url+"/#/runs?status=succeeded"), chromedp.WaitVisible(chromedp.CSS(`#runs tr[data-run="24"]`)))
	if n := count(t, ctx, "#runs tbody tr"); n != 20 {
		t.Fatalf("first page of succeeded runs: %d rows, want 20", n)
	}
	run(t, ctx, "older succeeded runs", chromedp.Click(chromedp.CSS("#older")), chromedp.WaitVisible(chromedp.CSS(`#runs tr[data-run="1"]`)))
	if n := count(t, ctx, "#runs tbody tr"); n != len(ok)-20 {
		t.Fatalf("second page of succeeded runs: %d rows, want %d", n, len(ok)-20)
	}
	if v := value(t, ctx, "status filter kept", chromedp.Evaluate[string](`document.getElementById("filter-status").value`)); v != "succeeded" {
		t.Fatalf("the second page's status filter shows %q", v)
	}

	// The admin deletes the backup, after a confirmation: dismissed
	// first (nothing deleted), then accepted.
	// Each dialog is answered by the next answer, accepted only if it
	// asks what the answer expects.
	type answer struct {
		accept bool
		asks   string
	}
	answers := make(chan answer, 2)
	dialogs := chromedp.Events(ctx, page.JavascriptDialogOpening)
	go func() {
		for ev, err := range dialogs {
			if err != nil {
				return
			}
			a := <-answers
			chromedp.Call(ctx, page.HandleJavaScriptDialog, page.HandleJavaScriptDialogParams{Accept: a.accept && strings.Contains(ev.Message, a.asks)})
		}
	}()
	run(t, ctx, "log in as admin again",
		chromedp.Navigate(g.url+"/#/"), chromedp.WaitVisible(chromedp.CSS(`#vms tr[data-vm="vm1"]`)),
		chromedp.Click(chromedp.CSS("header .who button")),
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), g.admin),
		chromedp.Submit(chromedp.CSS("#login-form")),
		chromedp.WaitVisible(chromedp.CSS(`#vms tr[data-vm="vm1"]`)),
		chromedp.Navigate(g.url+"/#/vm/vm1"), chromedp.WaitVisible(chromedp.CSS(row)))
	answers <- answer{false, "Delete backup " + bs[0].ShortID}
	run(t, ctx, "delete, dismissed", chromedp.Click(chromedp.CSS(row+" button.danger")))
	time.Sleep(time.Second)
	if bs, err := g.s.Backups(context.Background(), api.BackupFilter{VM: "vm1"}); err != nil || len(bs) != 2 {
		t.Fatalf("backups after a dismissed delete: %v %v", bs, err)
	}
	answers <- answer{true, "Delete backup " + bs[0].ShortID}
	run(t, ctx, "delete, accepted", chromedp.Click(chromedp.CSS(row+" button.danger")), chromedp.WaitNotPresent(chromedp.CSS(row)))
	if bs, err := g.s.Backups(context.Background(), api.BackupFilter{VM: "vm1"}); err != nil || len(bs) != 1 {
		t.Fatalf("backups after the delete: %v %v", bs, err)
	}

	// A run held by the hook, cancelled from its page.
	if err := os.Remove(gate); err != nil {
		t.Fatal(err)
	}
	run(t, ctx, "run again",
		chromedp.Navigate(g.url+"/#/jobs"),
		chromedp.WaitVisible(chromedp.CSS(`#jobs tr[data-job="web-nightly"] button.run`)),
		chromedp.Click(chromedp.CSS(`#jobs tr[data-job="web-nightly"] button.run`)),
		chromedp.WaitVisible(chromedp.CSS("#cancel")))
	hash = value(t, ctx, "run page's address", chromedp.Evaluate[string](`location.hash`))
	answers <- answer{true, "Cancel run #"}
	run(t, ctx, "cancel", chromedp.Click(chromedp.CSS("#cancel")))
	waitText(t, ctx, "#run-status", state.Cancelled)
	id, _ := strconv.ParseInt(strings.TrimPrefix(hash, "#/run/"), 10, 64)
	if d, err := g.s.Run(context.Background(), id); err != nil || d.Status != state.Cancelled {
		t.Fatalf("run %s after Cancel: %+v %v", hash, d, err)
	}
	run(t, ctx, "cancelled runs", chromedp.Navigate(g.url+"/#/runs?status=cancelled"), chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`#runs tr[data-run="%d"]`, id))))
	if got := runIDs(t, ctx); got != fmt.Sprintf("[%d]", id) {
		t.Fatalf("cancelled runs: %s, want %d alone", got, id)
	}
	// The VM's cancelled try on its timeline, beside its backup.
	run(t, ctx, "VM page after the cancel", chromedp.Navigate(g.url+"/#/vm/vm1"),
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`figure.timeline rect.c-stopped[data-run="%d"]`, id))))
	if n := count(t, ctx, "figure.timeline .mark"); n != 2 {
		t.Errorf("timeline marks after the cancel: %d, want the backup and the cancelled try", n)
	}

	// A damaged repository: its verify's findings on the repository page.
	chunks := filepath.Join(g.dir, "main", "chunks")
	removed := 0
	filepath.WalkDir(chunks, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && os.Remove(p) == nil {
			removed++
		}
		return nil
	})
	if removed == 0 {
		t.Fatalf("no chunk file under %s", chunks)
	}
	bad := g.runJob(t, "check", state.Failed)
	run(t, ctx, "repository page with findings", chromedp.Navigate(g.url+"/#/repo/main"),
		chromedp.WaitVisible(chromedp.CSS(fmt.Sprintf(`#verifies tr td a[href="#/run/%d"]`, bad))))
	findings := value(t, ctx, "findings", chromedp.Text(chromedp.CSS(`#verifies tbody tr:first-child td.findings`)))
	lines, total, err := g.s.DB().LogLinesAt(context.Background(), bad, "error", 1)
	if err != nil || total == 0 || !strings.Contains(findings, lines[0].Message) {
		t.Fatalf("findings on the page %q; the run's first error line %v (%d in all) %v", findings, lines, total, err)
	}
	if !strings.Contains(findings, "missing") {
		t.Errorf("findings %q name no missing chunk", findings)
	}
	if v := value(t, ctx, "problems", chromedp.Text(chromedp.CSS(`#verifies tbody tr:first-child td:nth-child(5)`))); !strings.HasSuffix(v, " problems") || v == "0 problems" {
		t.Errorf("the failed verify's result: %q", v)
	}

	// A long list is shown a page at a time: 25 jobs, 20 and then 5.
	for i := range 21 {
		if _, err := g.s.CreateJob(context.Background(), []byte(fmt.Sprintf(`{"name":"extra-%02d","type":"gc","repository":"main"}`, i))); err != nil {
			t.Fatal(err)
		}
	}
	run(t, ctx, "many jobs", chromedp.Navigate(g.url+"/#/jobs"), chromedp.WaitVisible(chromedp.CSS(`#jobs tr[data-job="extra-00"]`)))
	if n := count(t, ctx, "#jobs tbody tr"); n != 20 {
		t.Fatalf("first page of jobs: %d rows, want 20", n)
	}
	waitText(t, ctx, ".pager .hint", "1–20 of 25")
	run(t, ctx, "next jobs", chromedp.Click(chromedp.CSS(".pager button.next")), chromedp.WaitVisible(chromedp.CSS(`#jobs tr[data-job="web-nightly"]`)))
	waitText(t, ctx, ".pager .hint", "21–25 of 25")
	if n := count(t, ctx, "#jobs tbody tr"); n != 5 {
		t.Fatalf("second page of jobs: %d rows, want 5", n)
	}

	// A phone's width: nothing wider than the screen (tables scroll in
	// their own box).
	for _, page := range []string{"/#/", "/#/vm/vm1", "/#/run/1", "/#/jobs", "/#/jobs/new", "/#/runs", "/#/repo/main"} {
		run(t, ctx, "narrow "+page, chromedp.EmulateViewport(390, 844), chromedp.Navigate(g.url+page), chromedp.WaitVisible(chromedp.CSS("main h1")))
		if w := value(t, ctx, "width", chromedp.Evaluate[int](`document.documentElement.scrollWidth - window.innerWidth`)); w > 0 {
			t.Errorf("%s at 390 px: %d px wider than the screen", page, w)
		}
	}
}

// waitCount waits until sel matches n elements.
func waitCount(t *testing.T, ctx context.Context, sel string, n int) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	got := -1
	for time.Now().Before(deadline) {
		var err error
		got, err = chromedp.Run(ctx, chromedp.Evaluate[int](fmt.Sprintf(`document.querySelectorAll(%q).length`, sel)))
		if err == nil && got == n {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: %d elements, want %d\npage: %s", sel, got, n, pageHTML(ctx))
}

// waitContains waits until the text of sel contains want.
func waitContains(t *testing.T, ctx context.Context, sel, want string) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	var got string
	for time.Now().Before(deadline) {
		var err error
		got, err = chromedp.Run(ctx, chromedp.Evaluate[string](fmt.Sprintf(`(document.querySelector(%q) || {}).textContent || ""`, sel)))
		if err == nil && strings.Contains(got, want) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: text %q, want it to contain %q", sel, got, want)
}

// setInput replaces an input's value as typing would (an input event).
func setInput(t *testing.T, ctx context.Context, sel, v string) {
	t.Helper()
	value(t, ctx, "set "+sel, chromedp.Evaluate[bool](fmt.Sprintf(`(() => { const i = document.querySelector(%q); i.value = %q;
		i.dispatchEvent(new Event("input", {bubbles: true})); return true; })()`, sel, v)))
}

// runIDs lists the runs of the runs page.
func runIDs(t *testing.T, ctx context.Context) string {
	t.Helper()
	return value(t, ctx, "run IDs", chromedp.Evaluate[string](`"[" + [...document.querySelectorAll("#runs tbody tr")].map((r) => r.dataset.run).join(" ") + "]"`))
}

// runJob runs a job through the server and waits for its end, which must
// have status want; it returns the run's ID.
func (g *webRig) runJob(t *testing.T, job, want string) int64 {
	t.Helper()
	r, err := g.s.RunJob(context.Background(), job)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		d, err := g.s.Run(context.Background(), r.ID)
		if err != nil {
			t.Fatal(err)
		}
		if d.Status != state.Running {
			if d.Status != want {
				t.Fatalf("run %d of %s: %s (%s), want %s", r.ID, job, d.Status, d.Error, want)
			}
			return r.ID
		}
		if time.Now().After(deadline) {
			t.Fatalf("run %d of %s still running", r.ID, job)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// usageAfter waits until the server recorded a usage point of repository
// main counting the backup taken at b (its statistics are computed in
// the background after each job) and returns the points the API gives.
func usageAfter(t *testing.T, g *webRig, b time.Time) []state.Usage {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		pts, err := g.s.UsageHistory(context.Background(), "main", time.Now().Add(-api.DefaultUsageSince))
		if err != nil {
			t.Fatal(err)
		}
		bs, err := g.s.Backups(context.Background(), api.BackupFilter{Repository: "main"})
		if err != nil {
			t.Fatal(err)
		}
		if n := len(pts); n > 0 && pts[n-1].Time.After(b) && pts[n-1].Backups == int64(len(bs)) {
			return pts
		}
		if time.Now().After(deadline) {
			t.Fatalf("no usage point of main after the backup of %v: %+v", b, pts)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkChart checks the page's usage chart of main: a point per recorded
// point, the last one the repository's latest stored bytes.
func checkChart(t *testing.T, ctx context.Context, pts []state.Usage) {
	t.Helper()
	sel := `figure.usage[data-repo="main"] circle.pt`
	if n := count(t, ctx, sel); n != len(pts) {
		t.Fatalf("usage chart: %d points, the server recorded %d", n, len(pts))
	}
	last := pts[len(pts)-1]
	got := value(t, ctx, "last point", chromedp.Evaluate[string](fmt.Sprintf(`[...document.querySelectorAll(%q)].pop().dataset.stored`, sel)))
	if last.StoredBytes <= 0 || got != strconv.FormatInt(last.StoredBytes, 10) {
		t.Fatalf("usage chart's last point: %s stored bytes, the server recorded %d", got, last.StoredBytes)
	}
	if c := value(t, ctx, "caption", chromedp.Text(chromedp.CSS(`figure.usage[data-repo="main"] figcaption`))); !strings.Contains(c, "deduplication") {
		t.Errorf("usage chart caption %q", c)
	}
}
