package libvirt_test

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/guestvm"
	"github.com/vmshadow/vmshadow/internal/libvirttest"
	"github.com/vmshadow/vmshadow/internal/provider/libvirt"
)

// TestFSFreezeGuest boots the real test guest (qemu-ga with its fsfreeze
// hook) as a libvirt domain and takes a set with the FSFreeze writer: the
// file systems are frozen and thawed through libvirt (the hook logs both on
// the console), the set reaches filesystem consistency, and the domain is
// not tainted.
func TestFSFreezeGuest(t *testing.T) {
	libvirttest.Need(t)
	ctx := ctxFor(t)
	dir := libvirttest.TempDir(t)
	data := filepath.Join(dir, "data.qcow2")
	if err := guestvm.MakeDataDisk(ctx, data, 64*mib, "qcow2"); err != nil {
		t.Fatal(err)
	}
	opts := libvirttest.GuestOptions(t, libvirttest.Disk{Target: "vda", Format: "qcow2", Path: data})
	dom := libvirttest.NewDomain(t, opts)
	dom.Start(t)
	dom.WaitConsole(t, guestvm.ReadyMarker, 5*time.Minute)
	// libvirt sees the agent once it opened its port.
	w := libvirt.NewFSFreeze(libvirttest.URI, dom.Name, nil)
	deadline := time.Now().Add(time.Minute)
	for {
		err := w.Prepare(ctx, coord.SetContext{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent never connected: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}

	journal := &coord.Journal{Dir: filepath.Join(dir, "journal")}
	p := libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: dom.Name, ScratchDir: filepath.Join(dir, "scratch")})
	c := &coord.Coordinator{Provider: p, Journal: journal, Writers: []coord.Writer{w}}
	c.Require = coord.Filesystem
	c.FreezeTimeout = time.Minute // TCG under load
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatalf("%v\nconsole:\n%s", err, dom.Console())
	}
	if set.Consistency != coord.Filesystem || set.Writers[0].State != coord.WriterThawed {
		t.Fatalf("set consistency %s, writer %+v", set.Consistency, set.Writers[0])
	}
	con := dom.Console()
	fi, ti := strings.Index(con, "fsfreeze-hook: freeze"), strings.LastIndex(con, "fsfreeze-hook: thaw")
	if fi < 0 || ti < fi {
		t.Fatalf("the guest's fsfreeze hook did not log a freeze then a thaw:\n%s", con)
	}
	if len(set.Shadows) != 1 || set.Shadows[0].Disk != "vda" {
		t.Fatalf("shadows %+v", set.Shadows)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	if lines := dom.Tainted(); len(lines) > 0 {
		t.Fatalf("domain tainted:\n%s", strings.Join(lines, "\n"))
	}
}

// TestFSFreezeNoAgent: a domain without an agent channel is refused with a
// clear error before anything is frozen.
func TestFSFreezeNoAgent(t *testing.T) {
	dom := libvirttest.NewDomain(t, libvirttest.Options{Disks: []libvirttest.Disk{{}}, Paused: true})
	dom.Start(t)
	ctx := ctxFor(t)
	w := libvirt.NewFSFreeze(libvirttest.URI, dom.UUID, nil)
	defer w.Close()
	err := w.Prepare(ctx, coord.SetContext{})
	if !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), "org.qemu.guest_agent.0") {
		t.Fatalf("no agent channel: %v", err)
	}
	if s := w.Spec(); s.Kind != libvirt.WriterKind || s.Path != dom.UUID || s.Socket != libvirttest.URI {
		t.Fatalf("spec %+v", s)
	}
}
