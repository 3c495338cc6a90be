package libvirt_test

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/libvirttest"
	"github.com/vmshadow/vmshadow/internal/provider/libvirt"
)

// TestRedefineCheckpoint: libvirt loses a checkpoint's metadata (as when
// the domain is undefined and defined again) while QEMU keeps its bitmap.
// The next incremental reads in full, saying why; once the checkpoint is
// redefined from the XML kept with the backup, an incremental reports
// exactly the changes since it again.
func TestRedefineCheckpoint(t *testing.T) {
	r := newRig(t)
	ctx := ctxFor(t)
	p := r.provider(&checkpoint{Prefix: "vmshadow-repo3"})
	s := r.open(ctx, p)
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Complete(set, s); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	first := "vmshadow-repo3-" + set.ID
	saved, err := p.CheckpointXML(ctx, first)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(saved, "<name>"+first+"</name>") || !strings.Contains(saved, "<domain") {
		t.Fatalf("checkpoint XML lacks its name or domain:\n%s", saved)
	}
	s.Close()

	libvirttest.Virsh(t, "checkpoint-delete", r.dom.Name, first, "--metadata")
	r.dom.GuestWrite(t, "vda", 0x77, 12*mib, 192<<10)

	p2 := r.provider(&checkpoint{Prefix: "vmshadow-repo3", Incremental: first})
	s2 := r.open(ctx, p2)
	if _, err := p2.CheckpointXML(ctx, first); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("checkpoint XML of a lost checkpoint: %v, want ErrNotFound", err)
	}
	set2, err := s2.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sh := shadow(t, set2, "vda"); sh.Bitmap != "" || !strings.Contains(sh.FullReason, "missing from libvirt") {
		t.Fatalf("without the checkpoint: bitmap %q, full reason %q", sh.Bitmap, sh.FullReason)
	}
	if _, err := s2.Delete(ctx, set2.ID); err != nil { // not completed
		t.Fatal(err)
	}

	bogus := strings.ReplaceAll(saved, first, "vmshadow-repo3-bogus")
	if err := p2.RedefineCheckpoint(ctx, bogus); !errors.Is(err, errs.ErrNotFound) {
		t.Fatalf("redefine a checkpoint whose bitmaps do not exist: %v, want ErrNotFound", err)
	}
	if err := p2.RedefineCheckpoint(ctx, saved); err != nil {
		t.Fatal(err)
	}
	if got := r.checkpoints(); !slices.Equal(got, []string{first}) {
		t.Fatalf("checkpoints after redefine = %v, want [%s]", got, first)
	}
	set3, err := s2.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sh := shadow(t, set3, "vda")
	want := []string{fmt.Sprint(12*mib, "+", 192<<10)}
	if got := dirty(t, ctx, sh); sh.Bitmap == "" || !slices.Equal(got, want) {
		t.Fatalf("after redefine: bitmap %q, dirty %v, want %v", sh.Bitmap, got, want)
	}
	if _, err := s2.Delete(ctx, set3.ID); err != nil {
		t.Fatal(err)
	}
	r.noJob()
}

// TestDomainXMLAndOldQcow2: the stored definition carries no password; a
// qcow2 v2 disk (no persistent bitmaps) takes part in the set without a
// bitmap, with its reason, instead of failing the whole backup job.
func TestDomainXMLAndOldQcow2(t *testing.T) {
	dom := libvirttest.NewDomain(t, libvirttest.Options{Disks: []libvirttest.Disk{
		{Target: "vda"}, {Target: "vdb", CreateOptions: "compat=0.10"},
	}, Devices: "    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1' passwd='s3cretpw'/>\n"})
	dom.Start(t)
	ctx := ctxFor(t)
	dir := libvirttest.TempDir(t)
	p := libvirt.New(libvirt.Options{URI: libvirttest.URI, Domain: dom.Name, ScratchDir: filepath.Join(dir, "scratch")})
	p.Track((&checkpoint{Prefix: "vmshadow-repo4"}).request(nil))
	s, err := (&coord.Coordinator{Provider: p, Journal: &coord.Journal{Dir: filepath.Join(dir, "journal")}}).Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, inactive := range []bool{true, false} {
		x, err := p.DomainXML(ctx, inactive)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(x, "<name>"+dom.Name+"</name>") || !strings.Contains(x, dom.Disks[1].Path) || !strings.Contains(x, "<graphics type='vnc'") {
			t.Fatalf("domain XML (inactive %v) lacks name, disk or graphics:\n%s", inactive, x)
		}
		if strings.Contains(x, "s3cretpw") {
			t.Fatalf("domain XML (inactive %v) carries the VNC password", inactive)
		}
		if live := strings.Contains(x, "<alias name="); live == inactive {
			t.Fatalf("inactive %v: live aliases present %v", inactive, live)
		}
	}
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sh := shadow(t, set, "vdb"); !strings.Contains(sh.FullReason, "qcow2 v3 needed") {
		t.Fatalf("qcow2 v2 disk: full reason %q", sh.FullReason)
	}
	x := libvirttest.Virsh(t, "checkpoint-dumpxml", dom.Name, "vmshadow-repo4-"+set.ID, "--no-domain")
	if !strings.Contains(x, "<disk name='vda' checkpoint='bitmap'") || !strings.Contains(x, "<disk name='vdb' checkpoint='no'/>") {
		t.Fatalf("checkpoint XML:\n%s", x)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
}
