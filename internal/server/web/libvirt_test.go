package web_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/vmshadow/vmshadow/internal/libvirttest"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// TestMain stops the libvirt daemons this binary started, if it was the
// last to use them.
func TestMain(m *testing.M) { os.Exit(libvirttest.Main(m)) }

// lvName is a libvirt object name unique to this branch's test and run.
func lvName(what string) string {
	var b [4]byte
	rand.Read(b[:])
	return "vmshadow-web-" + what + "-" + hex.EncodeToString(b[:])
}

// TestBrowserLibvirtRestore restores a backup into libvirt from the VM
// page, through the server's libvirt connection: a new volume in a real
// storage pool holding the VM's disk, and a new domain on it; a server
// without a libvirt connection offers no such button (TestBrowser's
// admin sees three buttons per backup).
func TestBrowserLibvirtRestore(t *testing.T) {
	uri := libvirttest.Need(t)
	pool, dom := lvName("pool"), lvName("dom")
	dir := libvirttest.TempDir(t)
	libvirttest.Virsh(t, "pool-define-as", pool, "dir", "--target", dir)
	t.Cleanup(func() {
		if _, err := libvirttest.VirshErr("domstate", dom); err == nil {
			libvirttest.VirshErr("destroy", dom)
			if _, err := libvirttest.VirshErr("undefine", dom); err != nil {
				t.Logf("undefine %s: %v", dom, err)
			}
		}
		out, _ := libvirttest.VirshErr("vol-list", pool)
		rows := false
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) > 0 && strings.HasPrefix(f[0], "---") {
				rows = true
			} else if rows && len(f) > 0 {
				libvirttest.VirshErr("vol-delete", f[0], "--pool", pool)
			}
		}
		libvirttest.VirshErr("pool-destroy", pool)
		if _, err := libvirttest.VirshErr("pool-undefine", pool); err != nil {
			t.Logf("pool-undefine %s: %v", pool, err)
		}
	})
	libvirttest.Virsh(t, "pool-start", pool)

	g := newWebRigWith(t, "  kvm: {type: libvirt, uri: \""+uri+"\"}\n")
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
	run(t, ctx, "restore into libvirt",
		chromedp.Click(chromedp.CSS(row+` button[data-action="libvirt"]`)),
		chromedp.WaitVisible(chromedp.CSS("#libvirt-form")),
		chromedp.SendKeys(chromedp.CSS("#libvirt-pool"), pool),
		chromedp.SendKeys(chromedp.CSS("#libvirt-name"), dom),
		chromedp.Click(chromedp.CSS(`#libvirt-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS("#libvirt-done")))
	if got := value(t, ctx, "domain", chromedp.Text(chromedp.CSS("#libvirt-done .domain"))); got != dom {
		t.Fatalf("the page names domain %q, want %q", got, dom)
	}
	if st := strings.TrimSpace(libvirttest.Virsh(t, "domstate", dom)); st != "shut off" {
		t.Errorf("the new domain is %q, want shut off (not started)", st)
	}
	vol := value(t, ctx, "volume", chromedp.Text(chromedp.CSS("#libvirt-form li code")))
	path := strings.TrimSpace(libvirttest.Virsh(t, "vol-path", "--pool", pool, vol))
	if xml := libvirttest.Virsh(t, "dumpxml", dom); !strings.Contains(xml, path) {
		t.Errorf("domain %s does not use the restored volume %s:\n%s", dom, path, xml)
	}
	if out, err := exec.Command("qemu-img", "compare", "-U", g.vm.Disk("vda").Path, path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare of the VM's disk and the restored volume: %v: %s", err, out)
	}
}
