package web_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
	"github.com/vmshadow/vmshadow/internal/testutil"
	"github.com/vmshadow/vmshadow/internal/xapitest"
)

// TestBrowserXAPIRestore restores a QEMU VM's backup from the VM page
// into a XenServer pool (the project's XAPI test server) through the
// server's xapi connection: a new halted VM whose VDI holds the VM's
// disk.
func TestBrowserXAPIRestore(t *testing.T) {
	testutil.NeedCommand(t, "qemu-img")
	pool := xapitest.New(t, xapitest.Options{})
	t.Setenv("VMSHADOW_WEB_TEST_POOL_PW", pool.Password)
	g := newWebRigWith(t, fmt.Sprintf("  pool: {type: xapi, url: %q, user: %q, password_env: VMSHADOW_WEB_TEST_POOL_PW, ca: %q}\n",
		pool.URL, pool.User, pool.CAFile))
	g.runJob(t, "inventory", state.Succeeded)
	bs, err := g.s.Backups(context.Background(), api.BackupFilter{VM: "vm1"})
	if err != nil || len(bs) != 1 {
		t.Fatalf("backups: %v %v", bs, err)
	}
	row := `#backups tr[data-backup="` + bs[0].ID + `"]`
	ctx := browser(t, 1280, 900)
	run(t, ctx, "log in",
		chromedp.Navigate(g.url+"/"),
		chromedp.WaitVisible(chromedp.CSS("#token")),
		chromedp.SendKeys(chromedp.CSS("#token"), g.admin),
		chromedp.Submit(chromedp.CSS("#login-form")),
		chromedp.WaitVisible(chromedp.CSS(`#vms tr[data-vm="vm1"]`)),
		chromedp.Navigate(g.url+"/#/vm/vm1"),
		chromedp.WaitVisible(chromedp.CSS(row)))
	if n := count(t, ctx, row+` button[data-action="libvirt"]`); n != 0 {
		t.Errorf("a server without a libvirt connection offers a restore into libvirt")
	}
	run(t, ctx, "restore into the pool",
		chromedp.Click(chromedp.CSS(row+` button[data-action="xapi"]`)),
		chromedp.WaitVisible(chromedp.CSS("#xapi-form")),
		chromedp.SendKeys(chromedp.CSS("#xapi-sr"), "Local storage"),
		chromedp.SendKeys(chromedp.CSS("#xapi-name"), "from-the-web"),
		chromedp.Click(chromedp.CSS(`#xapi-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS("#xapi-done")))
	vms := pool.VMsNamed("from-the-web")
	if len(vms) != 1 {
		t.Fatalf("VMs named from-the-web in the pool: %v", vms)
	}
	if got := value(t, ctx, "VM UUID", chromedp.Text(chromedp.CSS("#xapi-done .vm-uuid"))); got != vms[0] {
		t.Errorf("the page names VM %q, the pool has %q", got, vms[0])
	}
	vdis := pool.VMDisks(vms[0])
	if len(vdis) != 1 || value(t, ctx, "VDI", chromedp.Text(chromedp.CSS("#xapi-form li .vdi"))) != vdis[0] {
		t.Fatalf("the new VM's disks %v and the page's VDI differ", vdis)
	}
	raw := filepath.Join(t.TempDir(), "vda.raw")
	if out, err := exec.Command("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", g.vm.Disk("vda").Path, raw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v: %s", err, out)
	}
	want, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(pool.Read(vdis[0]), want) {
		t.Fatal("the VDI restored into the pool differs from the VM's disk")
	}
}
