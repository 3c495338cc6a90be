package xapitest

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// What tests do to the pool "by hand", as an administrator or the guest
// would. Each helper fails the test on misuse.

// AddSR adds a storage repository with a PBD on the pool's host and
// returns its UUID. VDIs created on an SR of type "lvm" are not zeroed.
func (s *Server) AddSR(name, typ string, shared bool) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := &sr{ref: newRef(), uuid: newUUID(), name: name, typ: typ, shared: shared}
	p := &pbd{ref: newRef(), uuid: newUUID(), sr: r.ref, host: s.host.ref}
	r.pbd = p.ref
	s.srs[r.ref], s.pbds[p.ref] = r, p
	return r.uuid
}

// AddVM adds a VM named name with one disk per size (on the first SR,
// userdevices 0, 1, ...) and, when running, attached VBDs. It returns the
// VM's UUID and its disks' VDI UUIDs.
func (s *Server) AddVM(name string, running bool, sizes ...int64) (string, []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var first *sr
	for _, r := range s.srs {
		if r.name == "Local storage" {
			first = r
		}
	}
	power := "Halted"
	if running {
		power = "Running"
	}
	v := &vm{ref: newRef(), uuid: newUUID(), name: name, power: power, other: map[string]string{}}
	cd := &vbd{ref: newRef(), uuid: newUUID(), vm: v.ref, vdi: nullRef, userdevice: "3", typ: "CD", mode: "RO", empty: true, attached: running}
	s.vbds[cd.ref] = cd
	var uuids []string
	for i, size := range sizes {
		d, err := s.newVDI(first, fmt.Sprintf("%s disk %d", name, i), size, false)
		if err != nil {
			s.t.Fatal(err)
		}
		b := &vbd{ref: newRef(), uuid: newUUID(), vm: v.ref, vdi: d.ref, userdevice: strconv.Itoa(i), typ: "Disk", mode: "RW",
			attached: running, bootable: i == 0}
		s.vbds[b.ref] = b
		v.vbds = append(v.vbds, b.ref)
		uuids = append(uuids, d.uuid)
	}
	v.vbds = append(v.vbds, cd.ref)
	s.vms[v.ref] = v
	return v.uuid, uuids
}

func (s *Server) vdiByUUIDLocked(uuid string) *vdi {
	for _, d := range s.vdis {
		if d.uuid == uuid {
			return d
		}
	}
	s.t.Fatalf("xapitest: no VDI %s", uuid)
	return nil
}

// Write writes data into the VDI at off, as the guest would, and records
// the 64 KiB blocks it touches for changed block tracking. While the VM
// that has the disk attached is paused, the write waits (a paused guest
// does not run).
func (s *Server) Write(uuid string, off int64, data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for deadline := time.Now().Add(time.Minute); s.pausedVDI(uuid); {
		if time.Now().After(deadline) {
			s.t.Errorf("xapitest: the VM of VDI %s stayed paused for a minute", uuid)
			return
		}
		s.mu.Unlock()
		time.Sleep(5 * time.Millisecond)
		s.mu.Lock()
	}
	d := s.vdiByUUIDLocked(uuid)
	if d.path == "" || off < 0 || off+int64(len(data)) > d.size {
		s.t.Fatalf("xapitest: write %d bytes at %d into VDI %s of %d bytes (data %v)", len(data), off, uuid, d.size, d.path != "")
	}
	f, err := os.OpenFile(d.path, os.O_WRONLY, 0)
	if err != nil {
		s.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		s.t.Fatal(err)
	}
	if d.cbt && len(data) > 0 {
		for b := off / cbtBlock; b <= (off+int64(len(data))-1)/cbtBlock; b++ {
			d.dirty[b] = true
		}
	}
}

// Read returns the VDI's content.
func (s *Server) Read(uuid string) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.vdiByUUIDLocked(uuid)
	if d.path == "" {
		s.t.Fatalf("xapitest: VDI %s has no data (%s)", uuid, d.typ)
	}
	b, err := os.ReadFile(d.path)
	if err != nil {
		s.t.Fatal(err)
	}
	return b
}

// VDI describes a VDI for tests.
type VDI struct {
	UUID, Name, Type, SnapshotOf string
	Size                         int64
	CBT, Snapshot, Data          bool
	OtherConfig                  map[string]string
}

// VDIs lists the pool's VDIs, sorted by UUID.
func (s *Server) VDIs() []VDI {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []VDI
	for _, d := range s.vdis {
		x := VDI{UUID: d.uuid, Name: d.name, Type: d.typ, Size: d.size, CBT: d.cbt, Snapshot: d.snapshot, Data: d.path != "", OtherConfig: map[string]string{}}
		if p := s.vdis[d.snapshotOf]; p != nil {
			x.SnapshotOf = p.uuid
		}
		for k, v := range d.other {
			x.OtherConfig[k] = v
		}
		out = append(out, x)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].UUID < out[j].UUID })
	return out
}

// VMDisks returns the VDI UUIDs of a VM's disks in userdevice order.
func (s *Server) VMDisks(vmUUID string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.vms {
		if v.uuid != vmUUID {
			continue
		}
		type ud struct {
			n    int
			uuid string
		}
		var disks []ud
		for _, r := range v.vbds {
			b := s.vbds[r]
			if d := s.vdis[b.vdi]; b.typ == "Disk" && d != nil {
				n, _ := strconv.Atoi(b.userdevice)
				disks = append(disks, ud{n, d.uuid})
			}
		}
		sort.Slice(disks, func(i, j int) bool { return disks[i].n < disks[j].n })
		var out []string
		for _, d := range disks {
			out = append(out, d.uuid)
		}
		return out
	}
	return nil
}

// VMsNamed returns the UUIDs of the VMs (not templates or snapshots) named name.
func (s *Server) VMsNamed(name string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, v := range s.vms {
		if v.name == name && !v.template && !v.snapshot {
			out = append(out, v.uuid)
		}
	}
	sort.Strings(out)
	return out
}

// DisableCBT turns changed block tracking off on a VDI (an administrator's
// vdi-disable-cbt): the chain is broken.
func (s *Server) DisableCBT(uuid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.vdiByUUIDLocked(uuid)
	d.cbt, d.chain, d.dirty = false, 0, nil
}

// MigrateVDI moves a VDI to another SR as storage migration does: the disk
// gets a new VDI (new UUID and reference, same data) without changed block
// tracking, and the old one is gone. It returns the new UUID.
func (s *Server) MigrateVDI(uuid string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.vdiByUUIDLocked(uuid)
	nd := &vdi{ref: newRef(), uuid: newUUID(), name: d.name, sr: d.sr, typ: d.typ, size: d.size, other: map[string]string{}, path: d.path}
	nd.path = d.path + ".migrated"
	if err := copySparse(d.path, nd.path, d.size); err != nil {
		s.t.Fatal(err)
	}
	for _, b := range s.vbds {
		if b.vdi == d.ref {
			b.vdi = nd.ref
		}
	}
	os.Remove(d.path)
	delete(s.vdis, d.ref)
	s.vdis[nd.ref] = nd
	return nd.uuid
}

// ResizeVDI changes a disk's size (growing or shrinking its file).
func (s *Server) ResizeVDI(uuid string, size int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.vdiByUUIDLocked(uuid)
	if err := os.Truncate(d.path, size); err != nil {
		s.t.Fatal(err)
	}
	d.size = size
}

// DestroyVDI removes a VDI (an administrator deleting a snapshot).
func (s *Server) DestroyVDI(uuid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.vdiByUUIDLocked(uuid)
	s.dropData(d)
	delete(s.vdis, d.ref)
}

// Sessions is the number of sessions logged in.
func (s *Server) Sessions() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

// PendingTasks is the number of tasks not destroyed.
func (s *Server) PendingTasks() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.tasks)
}

// AddDisk gives a VM one more disk (next free userdevice, attached if the
// VM runs) and returns its VDI UUID.
func (s *Server) AddDisk(vmUUID string, size int64) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.vms {
		if v.uuid != vmUUID {
			continue
		}
		used := map[string]bool{}
		var sr *sr
		for _, r := range v.vbds {
			b := s.vbds[r]
			used[b.userdevice] = true
			if d := s.vdis[b.vdi]; d != nil && sr == nil {
				sr = s.srs[d.sr]
			}
		}
		n := 0
		for used[strconv.Itoa(n)] {
			n++
		}
		d, err := s.newVDI(sr, fmt.Sprintf("%s disk %d", v.name, n), size, false)
		if err != nil {
			s.t.Fatal(err)
		}
		b := &vbd{ref: newRef(), uuid: newUUID(), vm: v.ref, vdi: d.ref, userdevice: strconv.Itoa(n), typ: "Disk", mode: "RW", attached: v.power == "Running"}
		s.vbds[b.ref] = b
		v.vbds = append(v.vbds, b.ref)
		return d.uuid
	}
	s.t.Fatalf("xapitest: no VM %s", vmUUID)
	return ""
}

// VMs lists the VMs (not templates) as "name-label uuid snapshot=BOOL",
// sorted.
func (s *Server) VMs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, v := range s.vms {
		if !v.template {
			out = append(out, fmt.Sprintf("%s %s snapshot=%v", v.name, v.uuid, v.snapshot))
		}
	}
	sort.Strings(out)
	return out
}

// EnableCBT turns changed block tracking on (an administrator's
// vdi-enable-cbt): a new chain, unrelated to earlier snapshots.
func (s *Server) EnableCBT(uuid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.vdiByUUIDLocked(uuid)
	s.chainSeq++
	d.cbt, d.chain, d.dirty = true, s.chainSeq, map[int64]bool{}
}

// DataDestroyRefused is the number of VDI.data_destroy calls refused with
// VDI_IN_USE because VBDs still referred to the VDI.
func (s *Server) DataDestroyRefused() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dataDestroyRefused
}

// Expect says what a finished vmshadow command may leave on the pool
// compared with before it ran (CheckAsBefore).
type Expect struct {
	// Sessions is how many sessions may stay logged in: those of killed
	// processes, which the pool expires later.
	Sessions int
	// Checkpoints: a stored backup keeps one checkpoint per disk and
	// repository (a snapshot VDI reduced to CBT metadata, no data, tagged
	// vmshadow-chain), supersedes earlier ones, and turns CBT on.
	Checkpoints bool
}

// CheckAsBefore fails the test unless the pool is as Dump described it in
// before: the same VMs (power state included: a VM vmshadow paused is
// running again), snapshots, VBDs, VDIs with or without data and their
// other_config tags; no session but e.Sessions logged in; every task
// destroyed. With e.Checkpoints, checkpoints may differ, but at most one
// per disk and repository, of a disk that exists. Every test of a XAPI
// snapshot, backup or recover checks the pool with it.
func (s *Server) CheckAsBefore(t testing.TB, before string, e Expect) {
	t.Helper()
	after := s.Dump()
	norm := func(dump string) string {
		if !e.Checkpoints {
			return dump
		}
		var out []string
		for _, l := range strings.Split(dump, "\n") {
			if strings.HasPrefix(l, "VDI ") && strings.Contains(l, " snapshot=true ") && strings.Contains(l, " type=cbt_metadata ") &&
				strings.Contains(l, " data=false ") && strings.Contains(l, "vmshadow-chain=") {
				continue
			}
			if strings.HasPrefix(l, "VDI ") && strings.Contains(l, " snapshot=false ") {
				l = strings.Replace(strings.Replace(l, " cbt=false ", " cbt=* ", 1), " cbt=true ", " cbt=* ", 1)
			}
			out = append(out, l)
		}
		return strings.Join(out, "\n")
	}
	if b, a := norm(before), norm(after); a != b {
		t.Errorf("the pool is not as it was:\n--- before\n%s\n--- after\n%s", b, a)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	chains := map[string]int{}
	for _, d := range s.vdis {
		if !d.snapshot || d.typ != "cbt_metadata" {
			continue
		}
		if s.vdis[d.snapshotOf] == nil {
			t.Errorf("checkpoint VDI %s of a disk that is gone left on the pool", d.uuid)
		}
		if k := d.snapshotOf + " " + d.other["vmshadow-chain"]; chains[k]+1 > 1 {
			t.Errorf("more than one checkpoint of disk VDI %s for repository %s", d.snapshotOf, d.other["vmshadow-chain"])
		} else {
			chains[k]++
		}
	}
	if len(s.sessions) != e.Sessions {
		t.Errorf("%d sessions logged in, want %d (of killed processes)", len(s.sessions), e.Sessions)
	}
	if len(s.tasks) != 0 {
		var labels []string
		for _, tk := range s.tasks {
			labels = append(labels, tk.label+" "+tk.status)
		}
		sort.Strings(labels)
		t.Errorf("%d tasks not destroyed: %v", len(s.tasks), labels)
	}
}

// pausedVDI reports whether the VDI is attached to a paused VM.
func (s *Server) pausedVDI(uuid string) bool {
	for _, b := range s.vbds {
		if d := s.vdis[b.vdi]; d != nil && d.uuid == uuid && b.attached {
			if v := s.vms[b.vm]; v != nil && v.power == "Paused" {
				return true
			}
		}
	}
	return false
}

// Pauses is the number of times a VM was paused (VM.pause).
func (s *Server) Pauses() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pauses
}

// NBDConnections reports the NBD server's client connections: open now,
// the most open at once, and how many were refused for being beyond the
// limit (all zero while no NBD server runs).
func (s *Server) NBDConnections() (open, peak, refused int) {
	s.mu.Lock()
	n := s.nbd
	s.mu.Unlock()
	if n == nil {
		return 0, 0, 0
	}
	n.cmu.Lock()
	defer n.cmu.Unlock()
	return n.open, n.peak, n.refused
}

// NBDAddress is the host:port of the NBD server, starting it if needed
// (for tests that play another client of the host).
func (s *Server) NBDAddress() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.nbdServer()
	if err != nil {
		s.t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", n.port)
}

// OtherNBDClients makes n connections of other clients (another backup
// tool) count against the NBD server's limit, as xapi-nbd counts every
// client of the host; a negative n ends them.
func (s *Server) OtherNBDClients(n int) {
	s.mu.Lock()
	nb, err := s.nbdServer()
	s.mu.Unlock()
	if err != nil {
		s.t.Fatal(err)
	}
	nb.cmu.Lock()
	defer nb.cmu.Unlock()
	nb.open += n
	nb.peak = max(nb.peak, nb.open)
}

// ExpireSessions ends every session as the pool's session expiry does
// (xapi destroys sessions idle too long, and the oldest of an
// originator's sessions beyond its limit): calls with them fail with
// SESSION_INVALID and the NBD server refuses their new connections; NBD
// connections already open go on (xapi-nbd checks the session when a
// client connects).
func (s *Server) ExpireSessions() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.sessions)
}
