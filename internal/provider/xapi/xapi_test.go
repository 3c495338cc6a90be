package xapi_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/nbd"
	xapiprov "github.com/vmshadow/vmshadow/internal/provider/xapi"
	"github.com/vmshadow/vmshadow/internal/testutil"
	"github.com/vmshadow/vmshadow/internal/tracking"
	"github.com/vmshadow/vmshadow/internal/xapi"
	"github.com/vmshadow/vmshadow/internal/xapitest"
)

const MiB = 1 << 20

func poolConfig(t *testing.T, s *xapitest.Server) xapi.Config {
	t.Helper()
	pem, err := os.ReadFile(s.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return xapi.Config{URL: s.URL, User: s.User, Password: []byte(s.Password), TLS: &tls.Config{RootCAs: pool}, PollInterval: 10 * time.Millisecond}
}

type rig struct {
	t       *testing.T
	s       *xapitest.Server
	journal *coord.Journal
}

func newRig(t *testing.T, opts xapitest.Options) *rig {
	testutil.SkipShort(t) // the fake pool's NBD server is qemu-storage-daemon
	return &rig{t: t, s: xapitest.New(t, opts), journal: &coord.Journal{Dir: t.TempDir()}}
}

func (r *rig) coordinator(vm string, o func(*xapiprov.Options)) (*coord.Coordinator, *xapiprov.Provider) {
	opts := xapiprov.Options{Pool: poolConfig(r.t, r.s), VM: vm}
	if o != nil {
		o(&opts)
	}
	p := xapiprov.New(opts)
	return &coord.Coordinator{Provider: p, Journal: r.journal}, p
}

func randomData(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// readShadow reads a shadow copy through the provider's NBD details.
func readShadow(t *testing.T, p *xapiprov.Provider, sh coord.Shadow) ([]byte, error) {
	t.Helper()
	target, cfg, err := p.NBD(sh)
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	c, err := nbd.Dial(ctx, target, &nbd.Options{TLSConfig: cfg})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	buf := make([]byte, c.Size())
	_, err = c.ReadAt(ctx, buf, 0)
	return buf, err
}

// TestSetCreateDelete: a set captures every disk at the instant, its
// shadow copies read over NBD with TLS, and deleting it leaves the pool
// exactly as it was, with no session or task left.
func TestSetCreateDelete(t *testing.T) {
	r := newRig(t, xapitest.Options{})
	vmUUID, disks := r.s.AddVM("web 1", true, 8*MiB, 4*MiB)
	want := [][]byte{randomData(1, 8*MiB), randomData(2, 4*MiB)}
	for i, d := range disks {
		r.s.Write(d, 0, want[i])
	}
	before := r.s.Dump()
	ctx := context.Background()
	c, p := r.coordinator("web 1", nil)
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s.VM().Name != "web 1" || s.VM().Key != "xapi-"+vmUUID {
		t.Errorf("VM %+v", s.VM())
	}
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if set.Consistency != coord.Crash || set.Provider != "xapi" || len(set.Shadows) != 2 {
		t.Fatalf("set %+v", set)
	}
	// The guest writes after the instant.
	r.s.Write(disks[0], 0, bytes.Repeat([]byte{0xee}, MiB))
	for i, sh := range set.Shadows {
		if sh.Disk != []string{"xvda", "xvdb"}[i] || sh.Size != int64(len(want[i])) || sh.Node == disks[i] {
			t.Errorf("shadow %+v", sh)
		}
		got, err := readShadow(t, p, sh)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want[i]) {
			t.Errorf("disk %s: shadow copy differs from the disk at the instant", sh.Disk)
		}
	}
	if !strings.Contains(r.s.Dump(), `"vmshadow-`+set.ID+`"`) {
		t.Errorf("no snapshot named vmshadow-%s:\n%s", set.ID, r.s.Dump())
	}
	if alive, err := c.Provider.Alive(ctx, set); !alive || err != nil {
		t.Errorf("alive %v %v", alive, err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	s.Close()
	r.s.CheckAsBefore(t, before, xapitest.Expect{})
}

func TestBadInput(t *testing.T) {
	r := newRig(t, xapitest.Options{})
	r.s.AddVM("twin", true, MiB)
	r.s.AddVM("twin", false, MiB)
	r.s.AddVM("solo", true, MiB)
	r.s.AddVM("diskless", true)
	ctx := context.Background()
	tests := []struct {
		name, vm string
		opt      func(*xapiprov.Options)
		class    error
		want     string
	}{
		{"wrong password", "solo", func(o *xapiprov.Options) { o.Pool.Password = []byte("nope") }, errs.ErrAuth, "SESSION_AUTHENTICATION_FAILED"},
		{"not found", "nosuch", nil, errs.ErrNotFound, "no VM named"},
		{"unknown UUID", "00000000-0000-4000-8000-000000000001", nil, errs.ErrNotFound, "no VM named"},
		{"found twice", "twin", nil, errs.ErrUsage, "2 VMs are named"},
		{"a template", "Other install media", nil, errs.ErrNotFound, "no VM named"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, _ := r.coordinator(tt.vm, tt.opt)
			_, err := c.Open(ctx)
			if !errors.Is(err, tt.class) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want %q (%v)", err, tt.want, tt.class)
			}
		})
	}
	// Found twice by name, but one UUID is enough.
	uuids := r.s.VMsNamed("twin")
	c, _ := r.coordinator(uuids[1], nil)
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	before := r.s.Dump()
	c, _ = r.coordinator("diskless", nil)
	s, err = c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx); !errors.Is(err, errs.ErrNotFound) || !strings.Contains(err.Error(), "no disks") {
		t.Fatalf("VM without disks: %v", err)
	}
	s.Close()

	r.s.SetNBDPurpose("none")
	c, _ = r.coordinator("solo", nil)
	s, err = c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx); !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), "param-key=nbd") {
		t.Fatalf("pool without NBD: %v", err)
	}
	s.Close()
	r.s.SetNBDPurpose("insecure_nbd")
	c, _ = r.coordinator("solo", nil)
	s, _ = c.Open(ctx)
	if _, err := s.Create(ctx); !errors.Is(err, errs.ErrUnsupported) || !strings.Contains(err.Error(), "--insecure") {
		t.Fatalf("insecure NBD without --insecure: %v", err)
	}
	s.Close()
	r.s.CheckAsBefore(t, before, xapitest.Expect{})
}

// TestInsecureNBD: with Insecure, an insecure_nbd pool is read without TLS.
func TestInsecureNBD(t *testing.T) {
	r := newRig(t, xapitest.Options{NBD: "insecure_nbd"})
	_, disks := r.s.AddVM("plain", true, 2*MiB)
	data := randomData(3, 2*MiB)
	r.s.Write(disks[0], 0, data)
	before := r.s.Dump()
	ctx := context.Background()
	c, p := r.coordinator("plain", func(o *xapiprov.Options) { o.Insecure = true })
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := readShadow(t, p, set.Shadows[0])
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %v", err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	r.s.CheckAsBefore(t, before, xapitest.Expect{Sessions: 1})
}

// TestWrongNBDCertificate: an NBD server presenting another certificate
// than the one XAPI reports is refused, even one signed by the same CA.
func TestWrongNBDCertificate(t *testing.T) {
	r := newRig(t, xapitest.Options{WrongNBDCert: true})
	r.s.AddVM("web", true, MiB)
	before := r.s.Dump()
	ctx := context.Background()
	c, p := r.coordinator("web", nil)
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, err = readShadow(t, p, set.Shadows[0])
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("read with the wrong certificate: %v", err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
	r.s.CheckAsBefore(t, before, xapitest.Expect{Sessions: 1})
}

// TestLeftovers: a set whose journal is lost is found by name, refuses a
// new set (busy), and recover removes it.
func TestLeftovers(t *testing.T) {
	r := newRig(t, xapitest.Options{})
	r.s.AddVM("db", true, MiB, MiB)
	before := r.s.Dump()
	ctx := context.Background()
	c1, _ := r.coordinator("db", nil)
	s1, err := c1.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s1.Create(ctx); err != nil {
		t.Fatal(err)
	}
	s1.Close()

	other := &coord.Journal{Dir: t.TempDir()}
	c2, _ := r.coordinator("db", nil)
	c2.Journal = other
	s2, err := c2.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.Create(ctx); !errors.Is(err, errs.ErrBusy) || !strings.Contains(err.Error(), "vmshadow recover") {
		t.Fatalf("create over a leftover: %v", err)
	}
	rep, err := s2.Recover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 3 { // two snapshot VDIs and the snapshot
		t.Errorf("removed %v", rep.Removed)
	}
	r.s.CheckAsBefore(t, before, xapitest.Expect{Sessions: 1}) // s2's
	// On a clean VM recover does nothing.
	rep, err = s2.Recover(ctx)
	if err != nil || len(rep.Removed) != 0 {
		t.Fatalf("second recover: %v %v", rep, err)
	}
}

// TestHostDropsConnection: a host that drops the connection during the
// snapshot fails the set with a clear error; recover cleans up what the
// pool made anyway.
func TestHostDropsConnection(t *testing.T) {
	r := newRig(t, xapitest.Options{})
	r.s.AddVM("web", true, MiB)
	before := r.s.Dump()
	ctx := context.Background()
	c, _ := r.coordinator("web", nil)
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r.s.DropNext("task.get_record", 1)
	_, err = s.Create(ctx)
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "dropped the connection") {
		t.Fatalf("dropped connection: %v", err)
	}
	s.Close()
	// The set failed; its cleanup ran; the pool is as it was.
	r.s.CheckAsBefore(t, before, xapitest.Expect{})
}

// TestFreezeWindowExceeded: a snapshot slower than the freeze limit fails
// the set at the limit (the writers thaw then), its task is cancelled, and
// the release waits for the pool to stop it: nothing is left.
func TestFreezeWindowExceeded(t *testing.T) {
	r := newRig(t, xapitest.Options{SnapshotDelay: 700 * time.Millisecond})
	r.s.AddVM("slow", true, MiB)
	before := r.s.Dump()
	ctx := context.Background()
	c, _ := r.coordinator("slow", nil)
	c.FreezeTimeout = 200 * time.Millisecond
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	start := time.Now()
	_, err = s.Create(ctx)
	if !errors.Is(err, errs.ErrTimeout) || !strings.Contains(err.Error(), "freeze limit") {
		t.Fatalf("slow snapshot: %v", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("failing took %s", d)
	}
	r.s.CheckAsBefore(t, before, xapitest.Expect{Sessions: 1}) // s is still open
}

// TestReleaseAfterStoredBackup: after a stored backup, release keeps each
// snapshot VDI's CBT metadata as the checkpoint and frees its data. In xapi
// VDI.data_destroy waits up to 4 s for every VBD of the VDI to go, attached
// or not, then fails with VDI_IN_USE (ocaml/xapi/xapi_vdi.ml,
// wait_for_vbds_to_be_unplugged_and_destroyed), and the snapshot VM holds
// VBDs on its VDIs until VM.destroy (ocaml/xapi/xapi_vm_helpers.ml): the
// snapshot VM must go first, or every disk waits 4 s and keeps its data.
func TestReleaseAfterStoredBackup(t *testing.T) {
	r := newRig(t, xapitest.Options{})
	_, disks := r.s.AddVM("db", true, 4*MiB, 2*MiB)
	for i, d := range disks {
		r.s.Write(d, 0, randomData(uint64(i), MiB))
	}
	before := r.s.Dump()
	ctx := context.Background()
	c, p := r.coordinator("db", nil)
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	p.Track(tracking.Request{Prefix: "vmshadow-test", Previous: map[string]tracking.Previous{}})
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Complete(set, s); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatalf("release after a stored backup: %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("release took %s: data_destroy waited for VBDs", d)
	}
	if n := r.s.DataDestroyRefused(); n != 0 {
		t.Errorf("VDI.data_destroy was refused %d times (VDI_IN_USE): called while the snapshot VM held VBDs on the VDI", n)
	}
	for _, sh := range set.Shadows {
		found := false
		for _, v := range r.s.VDIs() {
			if v.UUID == sh.Checkpoint {
				found = true
				if v.Data || v.Type != "cbt_metadata" {
					t.Errorf("disk %s: checkpoint VDI %s still holds data (type %s)", sh.Disk, v.UUID, v.Type)
				}
			}
		}
		if !found {
			t.Errorf("disk %s: checkpoint VDI %s is gone", sh.Disk, sh.Checkpoint)
		}
	}
	r.s.CheckAsBefore(t, before, xapitest.Expect{Sessions: 1, Checkpoints: true})
}

// TestSnapshotOneInstant: XAPI snapshots a VM's disks one after another
// (ocaml/xapi/xapi_vm_clone.ml, safe_clone_disks; message_forwarding.ml:
// "We don't give any atomicity guarantees"); the fake lets the guest write
// between two disks' snapshots, as a real pool does. A guest transaction
// that writes to both disks must be in both shadow copies or in neither:
// the provider pauses the VM around VM.snapshot (xapi_vm_lifecycle.ml
// allows VM.pause when Running and VM.snapshot when Paused), and the set
// says so. With NoPause the disks are torn, and the set says that too.
func TestSnapshotOneInstant(t *testing.T) {
	var s *xapitest.Server
	var disks []string
	marker := bytes.Repeat([]byte("TXN-42"), 512)
	guestWrote := make(chan bool, 1)
	opts := xapitest.Options{BetweenDiskSnapshots: func() {
		// The guest commits a transaction spread over both disks; a paused
		// guest does not run until it is unpaused.
		done := make(chan struct{})
		go func() {
			s.Write(disks[0], 0, marker)
			s.Write(disks[1], 0, marker)
			close(done)
		}()
		select {
		case <-done:
			guestWrote <- true
		case <-time.After(300 * time.Millisecond):
			guestWrote <- false
		}
	}}
	r := newRig(t, opts)
	s = r.s
	_, disks = r.s.AddVM("db", true, 2*MiB, 2*MiB)
	ctx := context.Background()
	for _, noPause := range []bool{false, true} {
		before := r.s.Dump()
		c, p := r.coordinator("db", func(o *xapiprov.Options) { o.NoPause = noPause })
		sess, err := c.Open(ctx)
		if err != nil {
			t.Fatal(err)
		}
		set, err := sess.Create(ctx)
		if err != nil {
			t.Fatal(err)
		}
		wrote := <-guestWrote
		var has []bool
		for _, sh := range set.Shadows {
			got, err := readShadow(t, p, sh)
			if err != nil {
				t.Fatal(err)
			}
			has = append(has, bytes.Equal(got[:len(marker)], marker))
		}
		switch noPause {
		case false:
			if has[0] != has[1] {
				t.Errorf("torn snapshot: the guest's transaction is in the shadow copies %v", has)
			}
			if wrote {
				t.Errorf("the guest ran between the disks' snapshots")
			}
			if set.Instant != coord.InstantPaused || r.s.Pauses() != 1 {
				t.Errorf("instant %q, %d pauses; want %q, 1", set.Instant, r.s.Pauses(), coord.InstantPaused)
			}
			t.Logf("VM paused %d ms for the snapshot of 2 disks (the fake pool's figure)", set.PauseMS)
		case true:
			if !wrote || has[0] || !has[1] {
				t.Errorf("without a pause the fake should tear the disks: wrote %v, shadows %v", wrote, has)
			}
			if set.Instant != coord.InstantPerDisk || !strings.Contains(strings.Join(set.Warnings, " "), "one after another") {
				t.Errorf("instant %q, warnings %v", set.Instant, set.Warnings)
			}
		}
		if _, err := sess.Delete(ctx, set.ID); err != nil {
			t.Fatal(err)
		}
		sess.Close()
		r.s.CheckAsBefore(t, before, xapitest.Expect{})
		r.s.Write(disks[0], 0, make([]byte, len(marker)))
		r.s.Write(disks[1], 0, make([]byte, len(marker)))
	}
}

// TestNBDAddresses: VDI.get_nbd_info gives one record per address of the
// host, IPv6 ones in CIDR form as PIF.IPv6 holds them (xapi_vdi.ml,
// _get_nbd_info; helpers.ml writes "addr/plen"), and xapi-nbd listens on
// IPv4 only (ocaml/nbd/src/main.ml: a PF_INET socket). The provider drops
// the prefix length and tries IPv4 addresses first.
func TestNBDAddresses(t *testing.T) {
	r := newRig(t, xapitest.Options{NBDAddresses: []string{"fd00::5/64", "127.0.0.1"}})
	_, disks := r.s.AddVM("v6", true, MiB)
	data := randomData(9, MiB)
	r.s.Write(disks[0], 0, data)
	ctx := context.Background()
	c, p := r.coordinator("v6", nil)
	s, err := c.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	set, err := s.Create(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ts, err := p.NBDTargets(set.Shadows[0])
	if err != nil || len(ts) != 2 || !strings.HasPrefix(ts[0].Target.Address, "127.0.0.1:") || !strings.HasPrefix(ts[1].Target.Address, "[fd00::5]:") {
		t.Fatalf("targets %+v %v: want 127.0.0.1 first, then [fd00::5] without its prefix length", ts, err)
	}
	got, err := readShadow(t, p, set.Shadows[0])
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %v", err)
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		t.Fatal(err)
	}
}
