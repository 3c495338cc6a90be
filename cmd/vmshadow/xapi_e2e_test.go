package main

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/testutil"
	"github.com/vmshadow/vmshadow/internal/xapitest"
)

// These tests run the vmshadow binary against a fake XAPI pool
// (internal/xapitest) whose disks are served over NBD with TLS by a real
// qemu-storage-daemon: the XAPI server itself is the only fake.

// xrig is a fake pool with one VM, and a repository.
type xrig struct {
	t     *testing.T
	s     *xapitest.Server
	vm    string   // UUID
	disks []string // VDI UUIDs
	env   []string
	repo  string
	rng   *rand.Rand
	// killed counts the vmshadow processes killed: each leaves its session
	// logged in, until the pool expires it.
	killed int
}

func newXRig(t *testing.T, opts xapitest.Options, sizes ...int64) *xrig {
	t.Helper()
	testutil.SkipShort(t)
	s := xapitest.New(t, opts)
	vm, disks := s.AddVM("web server 1", true, sizes...)
	state, env := stateEnv(t)
	r := &xrig{t: t, s: s, vm: vm, disks: disks, repo: filepath.Join(state, "repo"), rng: rand.New(rand.NewPCG(3, 5)),
		env: append(env, "VMSHADOW_PASSWORD=test-password", "VMSHADOW_XAPI_PASSWORD="+s.Password)}
	if res := r.run("repo", "init", "--repo", r.repo, "--encryption", "none"); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	t.Cleanup(func() { callsDocumented(t, s) })
	return r
}

// callsDocumented checks that every XAPI call vmshadow made is in the
// list of README.md.
func callsDocumented(t *testing.T, s *xapitest.Server) {
	doc, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, list, _ := strings.Cut(string(doc), "### Every XAPI call vmshadow makes")
	list, _, _ = strings.Cut(list, "###")
	for _, c := range s.Calls() {
		if !strings.Contains(list, "`"+c+"`") {
			t.Errorf("vmshadow called %s, which README.md does not list", c)
		}
	}
}

// pool adds the flags that name the pool and the VM.
func (r *xrig) pool(args ...string) []string {
	return append(args, "--xapi", r.s.URL, "--xapi-ca", r.s.CAFile, "--vm", r.vm)
}

func (r *xrig) run(args ...string) result {
	r.t.Helper()
	res := vmshadow(r.t, r.env, args...)
	for _, out := range []string{res.stderr, fmt.Sprint(res.msgs)} {
		if strings.Contains(out, r.s.Password) {
			r.t.Fatalf("vmshadow printed the XAPI password: %s", out)
		}
		if strings.Contains(out, "session_id=OpaqueRef") {
			r.t.Fatalf("vmshadow printed a session reference: %s", out)
		}
	}
	return res
}

func (r *xrig) backup(extra ...string) map[string]any {
	r.t.Helper()
	before := r.s.Dump()
	res := r.run(r.pool(append([]string{"backup", "--repo", r.repo}, extra...)...)...)
	if res.code != 0 {
		r.t.Fatalf("backup: exit %d: %s", res.code, res.errorMessage())
	}
	r.clean(before)
	return res.summary(r.t)
}

// clean checks that the pool is as in before (a Dump), but for the
// repository's checkpoints (CBT metadata, no data: one per disk and
// repository), with no session but those of killed processes and no task
// left: xapitest's one check of what a set gives back.
func (r *xrig) clean(before string) {
	r.t.Helper()
	r.s.CheckAsBefore(r.t, before, xapitest.Expect{Sessions: r.killed, Checkpoints: true})
}

// expected is every disk's content now.
func (r *xrig) expected() map[string][]byte {
	m := map[string][]byte{}
	for i, u := range r.s.VMDisks(r.vm) {
		m[fmt.Sprintf("xvd%c", 'a'+i)] = r.s.Read(u)
	}
	return m
}

func (r *xrig) restoreCompare(id string, want map[string][]byte) {
	r.t.Helper()
	dir := filepath.Join(r.t.TempDir(), "restore")
	to := dir
	if len(want) == 1 {
		os.Mkdir(dir, 0o700)
		for disk := range want {
			to = filepath.Join(dir, disk+".raw")
		}
	}
	if res := r.run("restore", "--repo", r.repo, id, "--to", to); res.code != 0 {
		r.t.Fatalf("restore %s: %s", id, res.errorMessage())
	}
	for disk, w := range want {
		got, err := os.ReadFile(filepath.Join(dir, disk+".raw"))
		if err != nil {
			r.t.Fatalf("restore %s: %v", id, err)
		}
		if !bytes.Equal(got, w) {
			r.t.Errorf("backup %s, disk %s: restored image differs from the disk at the snapshot instant", id, disk)
		}
	}
}

// fill writes random data over a range of a disk.
func (r *xrig) fill(disk int, off, n int64) {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.rng.Uint32())
	}
	r.s.Write(r.s.VMDisks(r.vm)[disk], off, b)
}

// scatter writes n random ranges into a disk and records the 4 MiB chunks
// they touch.
func (r *xrig) scatter(disk, n int, touched map[int64]bool) {
	size := int64(len(r.s.Read(r.s.VMDisks(r.vm)[disk])))
	for range n {
		length := int64(4096 * (1 + r.rng.IntN(64)))
		off := r.rng.Int64N(size-length) &^ 4095
		r.fill(disk, off, length)
		for c := off / testChunk; c <= (off+length-1)/testChunk; c++ {
			touched[c] = true
		}
	}
}

// TestXAPIBackupIncrementalRounds: a first backup reads only what the
// disks hold; then rounds of scattered writes, each incremental reading
// exactly the changed chunks (CBT), every backup restoring bit-identical.
func TestXAPIBackupIncrementalRounds(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 32<<20, 16<<20)
	r.fill(0, 0, 32<<20)
	r.fill(1, 8<<20, 4<<20) // xvdb holds 4 MiB; the rest was never written
	want := r.expected()
	sum := r.backup()
	if sum["mode"] != "full" || sum["source"] != "xapi" || sum["consistency"] != "crash" || sum["vm"] != "web_server_1" ||
		!strings.Contains(fmt.Sprint(sum["reason"]), "first backup") {
		t.Fatalf("first backup: %v", sum)
	}
	// Two disks of a running VM: paused around VM.snapshot, one instant.
	if sum["instant"] != "vm-paused" || sum["pause_ms"] == nil {
		t.Errorf("first backup: instant %v, pause_ms %v; want vm-paused", sum["instant"], sum["pause_ms"])
	}
	t.Logf("VM paused %v ms for the snapshot of 2 disks (fake pool)", sum["pause_ms"])
	disks := diskSummaries(t, sum)
	if num(disks["xvda"]["bytes_read"]) != 32<<20 || num(disks["xvdb"]["bytes_read"]) != 4<<20 {
		t.Errorf("first backup read %d + %d bytes, want 32 MiB + 4 MiB (allocated data only)", num(disks["xvda"]["bytes_read"]), num(disks["xvdb"]["bytes_read"]))
	}
	// The checkpoints are the snapshot VDIs, kept as CBT metadata.
	for _, d := range disks {
		found := false
		for _, v := range r.s.VDIs() {
			if v.UUID == d["checkpoint"] && v.Type == "cbt_metadata" && !v.Data && strings.HasPrefix(v.OtherConfig["vmshadow-chain"], "vmshadow-") {
				found = true
			}
		}
		if !found {
			t.Errorf("disk %s: checkpoint %v is not a CBT metadata VDI of the repository's chain", d["name"], d["checkpoint"])
		}
	}
	ids, wants := []string{sum["backup_id"].(string)}, []map[string][]byte{want}
	r.fill(1, 0, 16<<20) // now every chunk of both disks holds data
	touched := []map[int64]bool{{}, {0: true, 1: true, 2: true, 3: true}}
	for round := 1; round <= 3; round++ {
		r.scatter(0, 5+round, touched[0])
		if round != 2 {
			r.scatter(1, 2, touched[1])
		}
		want := r.expected()
		sum := r.backup()
		if sum["mode"] != "incremental" {
			t.Fatalf("round %d: mode %v (%v)", round, sum["mode"], sum["reason"])
		}
		for i, name := range []string{"xvda", "xvdb"} {
			d := diskSummaries(t, sum)[name]
			if d["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched[i]))*testChunk {
				t.Errorf("round %d, disk %s: %v read %d bytes, want %d (%d chunks touched)", round, name, d["mode"], num(d["bytes_read"]), int64(len(touched[i]))*testChunk, len(touched[i]))
			}
			clear(touched[i])
		}
		ids, wants = append(ids, sum["backup_id"].(string)), append(wants, want)
	}
	for i, id := range ids {
		r.restoreCompare(id, wants[i])
	}
	if res := r.run("verify", "--repo", r.repo); res.code != 0 {
		t.Fatalf("verify: %s", res.errorMessage())
	}
}

// TestXAPIChainBreaks: everything that breaks the CBT chain gives a full
// read of the disk concerned, with the reason, and a right backup.
func TestXAPIChainBreaks(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 16<<20, 8<<20)
	r.fill(0, 0, 16<<20)
	r.fill(1, 0, 8<<20)
	r.backup()
	check := func(step string, modes, reasons map[string]string, args ...string) string {
		t.Helper()
		r.scatter(0, 2, map[int64]bool{})
		want := r.expected()
		sum := r.backup(args...)
		for name, d := range diskSummaries(t, sum) {
			if d["mode"] != modes[name] || !strings.Contains(fmt.Sprint(d["reason"]), reasons[name]) {
				t.Errorf("%s: disk %s: mode %v reason %q, want %s %q", step, name, d["mode"], d["reason"], modes[name], reasons[name])
			}
		}
		if len(diskSummaries(t, sum)) != len(modes) {
			t.Errorf("%s: disks %v", step, diskSummaries(t, sum))
		}
		r.restoreCompare(sum["backup_id"].(string), want)
		return sum["backup_id"].(string)
	}
	inc := map[string]string{"xvda": "incremental", "xvdb": "incremental"}
	check("steady", inc, nil)
	check("--full", map[string]string{"xvda": "full", "xvdb": "full"}, map[string]string{"xvda": "--full", "xvdb": "--full"}, "--full")
	check("after --full", inc, nil)

	r.s.AddDisk(r.vm, 4<<20)
	r.fill(2, 0, 1<<20)
	check("disk added", map[string]string{"xvda": "incremental", "xvdb": "incremental", "xvdc": "full"}, map[string]string{"xvdc": "disk added"})

	r.s.ResizeVDI(r.disks[1], 12<<20)
	check("resized", map[string]string{"xvda": "incremental", "xvdb": "full", "xvdc": "incremental"}, map[string]string{"xvdb": "resized"})

	r.s.DisableCBT(r.disks[1])
	check("CBT disabled", map[string]string{"xvda": "incremental", "xvdb": "full", "xvdc": "incremental"}, map[string]string{"xvdb": "changed block tracking is off"})

	// Turned off and on again by hand: a new chain, unrelated to the
	// checkpoint.
	r.s.DisableCBT(r.disks[1])
	r.s.EnableCBT(r.disks[1])
	check("CBT restarted", map[string]string{"xvda": "incremental", "xvdb": "full", "xvdc": "incremental"}, map[string]string{"xvdb": "CBT cannot compare"})

	r.disks[1] = r.s.MigrateVDI(r.disks[1])
	check("storage migration", map[string]string{"xvda": "incremental", "xvdb": "full", "xvdc": "incremental"}, map[string]string{"xvdb": "changed block tracking is off"})

	// The checkpoint VDI deleted on the pool.
	for _, v := range r.s.VDIs() {
		if v.Type == "cbt_metadata" && v.SnapshotOf == r.disks[0] {
			r.s.DestroyVDI(v.UUID)
		}
	}
	check("checkpoint gone", map[string]string{"xvda": "full", "xvdb": "incremental", "xvdc": "incremental"}, map[string]string{"xvda": "gone from the pool"})

	// The latest backup deleted from the repository (pruned): the disks'
	// checkpoints belong to it.
	last := check("before prune", map[string]string{"xvda": "incremental", "xvdb": "incremental", "xvdc": "incremental"}, nil)
	manifests, _ := filepath.Glob(filepath.Join(r.repo, "*", last+"*"))
	if len(manifests) == 0 {
		manifests, _ = filepath.Glob(filepath.Join(r.repo, "*", "*", last+"*"))
	}
	if len(manifests) != 1 {
		t.Fatalf("manifest of %s: %v", last, manifests)
	}
	os.Remove(manifests[0])
	pruned := "no longer in the repository"
	check("pruned", map[string]string{"xvda": "full", "xvdb": "full", "xvdc": "full"}, map[string]string{"xvda": pruned, "xvdb": pruned, "xvdc": pruned})

	// A second repository keeps its own chain; the first one's goes on.
	state, _ := stateEnv(t)
	repo2 := filepath.Join(state, "repo2")
	if res := r.run("repo", "init", "--repo", repo2, "--encryption", "none"); res.code != 0 {
		t.Fatal(res.errorMessage())
	}
	if res := r.run(r.pool("backup", "--repo", repo2)...); res.code != 0 || res.summary(t)["mode"] != "full" {
		t.Fatalf("second repository: %s", res.errorMessage())
	}
	check("after another repository", map[string]string{"xvda": "incremental", "xvdb": "incremental", "xvdc": "incremental"}, nil)
	if res := r.run(r.pool("backup", "--repo", repo2)...); res.code != 0 || res.summary(t)["mode"] != "incremental" {
		t.Fatalf("second repository, second backup: %v %s", res.summary(t)["reason"], res.errorMessage())
	}
}

// TestXAPIBackupKilled: vmshadow killed (SIGKILL) at each step of a backup;
// recover leaves the pool exactly as before, and the next backup is a good
// incremental that reads the changes since the last stored backup.
func TestXAPIBackupKilled(t *testing.T) {
	// The snapshot task takes a while, so a kill while it runs leaves it
	// running on the pool: recover cancels it and waits.
	r := newXRig(t, xapitest.Options{SnapshotDelay: 300 * time.Millisecond}, 16<<20, 8<<20)
	r.fill(0, 0, 16<<20)
	r.fill(1, 0, 8<<20)
	r.backup()
	touched := map[int64]bool{}
	for _, point := range []string{"prepared", "xapi-pausing", "xapi-snapshot-started", "xapi-snapshot-taken", "committed", "xapi-exposed", "backup-read"} {
		t.Run(point, func(t *testing.T) {
			r.scatter(0, 2, touched)
			before := r.s.Dump()
			res := vmshadow(t, append(r.env, "VMSHADOW_CRASH_AT="+point), r.pool("backup", "--repo", r.repo)...)
			if res.code != 137 {
				t.Fatalf("vmshadow was not killed at %s: exit %d %s", point, res.code, res.errorMessage())
			}
			r.killed++
			res = r.run(r.pool("recover")...)
			if res.code != 0 {
				t.Fatalf("recover: exit %d: %s", res.code, res.errorMessage())
			}
			r.s.CheckAsBefore(t, before, xapitest.Expect{Sessions: r.killed})
		})
	}
	// The chain stayed where the last stored backup left it: the next
	// backup reads every change since then.
	want := r.expected()
	sum := r.backup()
	d := diskSummaries(t, sum)["xvda"]
	if sum["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched))*testChunk {
		t.Errorf("after the kills: %v, xvda read %d, want %d", sum["mode"], num(d["bytes_read"]), int64(len(touched))*testChunk)
	}
	r.restoreCompare(sum["backup_id"].(string), want)

	// Killed again: the next backup recovers the set by itself.
	r.scatter(1, 1, map[int64]bool{})
	before := r.s.Dump()
	res := vmshadow(t, append(r.env, "VMSHADOW_CRASH_AT=backup-read"), r.pool("backup", "--repo", r.repo)...)
	if res.code != 137 {
		t.Fatalf("not killed: %d", res.code)
	}
	r.killed++
	res = r.run(r.pool("backup", "--repo", r.repo)...)
	if res.code != 0 || !strings.Contains(strings.Join(res.warnings(), "\n"), "recovering snapshot set") {
		t.Fatalf("backup after a kill: exit %d %s %v", res.code, res.errorMessage(), res.warnings())
	}
	r.clean(before)
}

// TestXAPISnapshotCommands: snapshot create / list / delete with a hook
// (application-consistent), and recover on a clean VM.
func TestXAPISnapshotCommands(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 8<<20)
	r.fill(0, 0, 8<<20)
	before := r.s.Dump()
	log := filepath.Join(t.TempDir(), "hook.log")
	res := r.run(r.pool("snapshot", "create", "--hook", hookScript(t, "db", log, "ok"))...)
	if res.code != 0 {
		t.Fatalf("create: %s", res.errorMessage())
	}
	sum := res.summary(t)
	if sum["consistency"] != "application" || sum["phase"] != "exposed" || sum["vm"] != "web server 1" {
		t.Fatalf("summary %v", sum)
	}
	if got := readLog(t, log); strings.Join(got, ",") != "hook db freeze,hook db thaw" {
		t.Errorf("hook calls %v", got)
	}
	sh := shadows(t, sum)["xvda"]
	found := false
	for _, v := range r.s.VDIs() {
		found = found || v.UUID == sh["node"] && v.Snapshot && v.Data
	}
	if !found {
		t.Errorf("shadow %v is not a snapshot VDI with data", sh)
	}
	setID := fmt.Sprint(sum["set_id"])
	res = r.run(r.pool("snapshot", "list")...)
	if sets := res.summary(t)["sets"].([]any); len(sets) != 1 || sets[0].(map[string]any)["set_id"] != setID {
		t.Fatalf("list: %v", res.msgs)
	}
	if res := r.run(r.pool("snapshot", "create")...); res.code != 3 {
		t.Fatalf("second create: exit %d %s", res.code, res.errorMessage())
	}
	if res := r.run(r.pool("snapshot", "delete", setID)...); res.code != 0 {
		t.Fatalf("delete: %s", res.errorMessage())
	}
	r.s.CheckAsBefore(t, before, xapitest.Expect{})
	res = r.run(r.pool("recover")...)
	if res.code != 0 || len(res.summary(t)["removed"].([]any)) != 0 {
		t.Fatalf("recover on a clean VM: %v", res.msgs)
	}
	r.s.CheckAsBefore(t, before, xapitest.Expect{})
}

// TestXAPIErrors: bad input and unusable pools give clear errors with the
// right exit codes, and leave the pool as it was.
func TestXAPIErrors(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 4<<20)
	r.s.AddVM("twin", true, 1<<20)
	r.s.AddVM("twin", true, 1<<20)
	before := r.s.Dump()
	pw := filepath.Join(t.TempDir(), "pw")
	os.WriteFile(pw, []byte("not-the-password\n"), 0o600)
	noPW := []string{}
	for _, e := range r.env {
		if !strings.HasPrefix(e, "VMSHADOW_XAPI_PASSWORD=") {
			noPW = append(noPW, e)
		}
	}
	base := []string{"backup", "--repo", r.repo, "--xapi", r.s.URL, "--xapi-ca", r.s.CAFile}
	tests := []struct {
		name string
		env  []string
		args []string
		code int
		want string
	}{
		{"wrong password", noPW, append(base, "--vm", r.vm, "--xapi-password-file", pw), 7, "SESSION_AUTHENTICATION_FAILED"},
		{"no password", noPW, append(base, "--vm", r.vm), 2, "VMSHADOW_XAPI_PASSWORD"},
		{"VM not found", r.env, append(base, "--vm", "nosuch"), 6, "no VM named"},
		{"VM found twice", r.env, append(base, "--vm", "twin"), 2, "2 VMs are named"},
		{"no --vm", r.env, base, 2, "--vm"},
		{"untrusted certificate", r.env, []string{"backup", "--repo", r.repo, "--xapi", r.s.URL, "--vm", r.vm}, 10, "--xapi-ca"},
		{"plain http", r.env, []string{"backup", "--repo", r.repo, "--xapi", "http://127.0.0.1:1", "--vm", r.vm}, 2, "https"},
		{"guest agent", r.env, append(base, "--vm", r.vm, "--qga", "/x.sock"), 2, "--hook"},
		{"both hypervisors", r.env, append(base, "--vm", r.vm, "--qmp", "/x.sock"), 2, "not both"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := vmshadow(t, tt.env, tt.args...)
			if res.code != tt.code || !strings.Contains(res.errorMessage(), tt.want) {
				t.Fatalf("exit %d (want %d), error %q (want %q)", res.code, tt.code, res.errorMessage(), tt.want)
			}
			if strings.Contains(res.stderr+fmt.Sprint(res.msgs), "not-the-password") {
				t.Fatal("the password was printed")
			}
		})
	}

	t.Run("pool without NBD", func(t *testing.T) {
		r.s.SetNBDPurpose("none")
		defer r.s.SetNBDPurpose("nbd")
		res := r.run(r.pool("backup", "--repo", r.repo)...)
		if res.code != 9 || !strings.Contains(res.errorMessage(), "enabled for NBD") {
			t.Fatalf("exit %d %q", res.code, res.errorMessage())
		}
	})
	t.Run("CBT not licensed", func(t *testing.T) {
		r.s.SetCBTLicensed(false)
		defer r.s.SetCBTLicensed(true)
		res := r.run(r.pool("backup", "--repo", r.repo)...)
		if res.code != 9 || !strings.Contains(res.errorMessage(), "not licensed") || !strings.Contains(res.errorMessage(), "--full") {
			t.Fatalf("exit %d %q", res.code, res.errorMessage())
		}
		r.s.CheckAsBefore(t, before, xapitest.Expect{})
		// --full works without CBT, and leaves no checkpoint.
		want := r.expected()
		res = r.run(r.pool("backup", "--repo", r.repo, "--full")...)
		if res.code != 0 || !strings.Contains(strings.Join(res.warnings(), " "), "not licensed") {
			t.Fatalf("--full without CBT: exit %d %s %v", res.code, res.errorMessage(), res.warnings())
		}
		r.s.CheckAsBefore(t, before, xapitest.Expect{})
		r.restoreCompare(res.summary(t)["backup_id"].(string), want)
	})
	t.Run("host drops the connection", func(t *testing.T) {
		r.s.DropNext("VM.get_record", 1)
		res := r.run(r.pool("backup", "--repo", r.repo)...)
		if res.code != 10 || !strings.Contains(res.errorMessage(), "dropped the connection") {
			t.Fatalf("exit %d %q", res.code, res.errorMessage())
		}
	})
	r.s.CheckAsBefore(t, before, xapitest.Expect{})
}

// TestXAPIWrongNBDCertificate: an NBD server whose certificate is not the
// one XAPI reports is refused; the set is released.
func TestXAPIWrongNBDCertificate(t *testing.T) {
	r := newXRig(t, xapitest.Options{WrongNBDCert: true}, 4<<20)
	r.fill(0, 0, 1<<20)
	before := r.s.Dump()
	res := r.run(r.pool("backup", "--repo", r.repo)...)
	if res.code == 0 || !strings.Contains(res.errorMessage(), "certificate") {
		t.Fatalf("exit %d %q", res.code, res.errorMessage())
	}
	r.clean(before)
}

// TestXAPIRestoreBothWays: a XenServer disk restored to a QEMU image (raw
// and qcow2) and back into a pool; a QEMU VM's backup restored into a pool
// as a new VM, on thin storage (only stored chunks sent) and on LVM
// storage (whole disk sent: new VDIs there are not zeroed).
func TestXAPIRestoreBothWays(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 16<<20, 8<<20)
	r.fill(0, 0, 6<<20)
	r.fill(1, 4<<20, 1<<20)
	want := r.expected()
	id := r.backup()["backup_id"].(string)

	// To QEMU images.
	r.restoreCompare(id, want)
	dir := filepath.Join(t.TempDir(), "q")
	if res := r.run("restore", "--repo", r.repo, id, "--to", dir, "--format", "qcow2"); res.code != 0 {
		t.Fatalf("restore qcow2: %s", res.errorMessage())
	}
	for disk, w := range want {
		raw := filepath.Join(t.TempDir(), disk+".raw")
		os.WriteFile(raw, w, 0o600)
		if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", filepath.Join(dir, disk+".qcow2"), raw).CombinedOutput(); err != nil {
			t.Errorf("qemu-img compare %s: %v: %s", disk, err, out)
		}
	}

	// Back into the pool, as new VDIs and a new VM.
	lvm := r.s.AddSR("lvm storage", "lvm", false)
	for _, sr := range []string{"Local storage", lvm} {
		name := "restored-" + sr[:3]
		res := r.run("restore", "--repo", r.repo, id, "--to-xapi", r.s.URL, "--xapi-ca", r.s.CAFile, "--sr", sr, "--vm-name", name)
		if res.code != 0 {
			t.Fatalf("restore to SR %s: %s", sr, res.errorMessage())
		}
		sum := res.summary(t)
		vms := r.s.VMsNamed(name)
		if len(vms) != 1 || sum["vm_uuid"] != vms[0] {
			t.Fatalf("restored VM %v, summary %v", vms, sum)
		}
		got := r.s.VMDisks(vms[0])
		if len(got) != 2 {
			t.Fatalf("restored VM has disks %v", got)
		}
		for i, disk := range []string{"xvda", "xvdb"} {
			if !bytes.Equal(r.s.Read(got[i]), want[disk]) {
				t.Errorf("SR %s: disk %s restored into VDI %s differs", sr, disk, got[i])
			}
		}
		d := diskSummaries(t, sum)["xvdb"]
		sparse := sr == "Local storage"
		if d["sparse_upload"] != sparse || (sparse && num(d["bytes_sent"]) >= 8<<20) || (!sparse && num(d["bytes_sent"]) != 8<<20) {
			t.Errorf("SR %s: xvdb upload %v", sr, d)
		}
	}

	// A QEMU VM's backup into the pool.
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda", Size: 16 << 20}}})
	vm.Write("vda", 0x5a, 1<<20, 3<<20)
	live, err := os.ReadFile(vm.Snapshot("vda"))
	if err != nil {
		t.Fatal(err)
	}
	res := r.run("backup", "--repo", r.repo, "--qmp", vm.QMPPath, "--vm", "qemuvm")
	if res.code != 0 {
		t.Fatalf("QEMU backup: %s", res.errorMessage())
	}
	qid := res.summary(t)["backup_id"].(string)
	res = r.run("restore", "--repo", r.repo, qid, "--to-xapi", r.s.URL, "--xapi-ca", r.s.CAFile, "--sr", "Local storage", "--vm-name", "from-qemu")
	if res.code != 0 {
		t.Fatalf("restore QEMU backup to the pool: %s", res.errorMessage())
	}
	vms := r.s.VMsNamed("from-qemu")
	if len(vms) != 1 || !bytes.Equal(r.s.Read(r.s.VMDisks(vms[0])[0]), live) {
		t.Fatalf("QEMU disk restored to the pool differs (VMs %v)", vms)
	}
	// Bad targets.
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--sr", "nosuch"}, 6, "no storage repository"},
		{[]string{"--sr", "Local storage", "--vm-name", "from-qemu"}, 2, "exists"},
		{nil, 2, "--sr"},
	} {
		res := r.run(append([]string{"restore", "--repo", r.repo, qid, "--to-xapi", r.s.URL, "--xapi-ca", r.s.CAFile}, tt.args...)...)
		if res.code != tt.code || !strings.Contains(res.errorMessage(), tt.want) {
			t.Errorf("restore %v: exit %d %q, want %d %q", tt.args, res.code, res.errorMessage(), tt.code, tt.want)
		}
	}
	if r.s.Sessions() != 0 || r.s.PendingTasks() != 0 {
		t.Errorf("%d sessions, %d tasks left", r.s.Sessions(), r.s.PendingTasks())
	}
}

// TestXAPICheckpointLost: CBT turned off on a snapshot VDI while the backup
// reads it: the backup is stored, the VDI (without CBT metadata to keep) is
// destroyed with a warning, and the next backup reads that disk in full.
func TestXAPICheckpointLost(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 8<<20, 8<<20)
	r.fill(0, 0, 8<<20)
	r.fill(1, 0, 8<<20)
	r.backup()
	r.scatter(0, 1, map[int64]bool{})
	r.scatter(1, 1, map[int64]bool{})
	before := r.s.Dump()
	resume := r.pausedBackup("backup-read")
	lost := ""
	for _, v := range r.s.VDIs() {
		if v.Snapshot && v.Data && v.SnapshotOf == r.disks[1] {
			lost = v.UUID
			r.s.DisableCBT(v.UUID)
		}
	}
	if lost == "" {
		t.Fatal("no snapshot VDI of xvdb during the backup")
	}
	res := resume()
	if res.code != 0 || !strings.Contains(strings.Join(res.warnings(), "\n"), "lost its changed block tracking metadata") {
		t.Fatalf("backup: exit %d %s %v", res.code, res.errorMessage(), res.warnings())
	}
	r.clean(before)
	want := r.expected()
	sum := r.backup()
	disks := diskSummaries(t, sum)
	if disks["xvda"]["mode"] != "incremental" || disks["xvdb"]["mode"] != "full" || !strings.Contains(fmt.Sprint(disks["xvdb"]["reason"]), "gone from the pool") {
		t.Fatalf("next backup: %v", disks)
	}
	r.restoreCompare(sum["backup_id"].(string), want)
}

// pausedBackup starts a backup that pauses at point; it returns once the
// backup got there, with the function that lets it go on and waits for
// its end.
func (r *xrig) pausedBackup(point string) (resume func() result) {
	r.t.Helper()
	pause := filepath.Join(r.t.TempDir(), "pause")
	done := make(chan result, 1)
	go func() {
		done <- vmshadow(r.t, append(r.env, "VMSHADOW_PAUSE_AT="+point, "VMSHADOW_PAUSE_FILE="+pause), r.pool("backup", "--repo", r.repo)...)
	}()
	for deadline := time.Now().Add(2 * time.Minute); ; {
		if _, err := os.Stat(pause); err == nil {
			break
		}
		select {
		case res := <-done:
			r.t.Fatalf("backup ended before %s: exit %d %s", point, res.code, res.errorMessage())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("backup did not reach %s", point)
		}
	}
	return func() result {
		os.Remove(pause)
		return <-done
	}
}

// TestXAPINBDDrops: the pool's NBD server goes away while the backup
// reads: the backup fails with a clear error and stores nothing, the
// snapshot is released, and the next backup reads every change since the
// last stored one.
func TestXAPINBDDrops(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 16<<20)
	r.fill(0, 0, 16<<20)
	r.backup()
	touched := map[int64]bool{}
	r.scatter(0, 3, touched)
	before := r.s.Dump()
	resume := r.pausedBackup("backup-read")
	r.s.StopNBD()
	res := resume()
	if res.code != 10 || !strings.Contains(res.errorMessage(), "shadow copy of disk xvda") {
		t.Fatalf("backup with the NBD server gone: exit %d %q", res.code, res.errorMessage())
	}
	r.clean(before)
	want := r.expected()
	sum := r.backup()
	if d := diskSummaries(t, sum)["xvda"]; sum["mode"] != "incremental" || num(d["bytes_read"]) != int64(len(touched))*testChunk {
		t.Fatalf("next backup: %v read %d, want %d", sum["mode"], num(d["bytes_read"]), int64(len(touched))*testChunk)
	}
	r.restoreCompare(sum["backup_id"].(string), want)
}

// TestXAPIManyDisks: xapi-nbd serves at most 16 connections per host, all
// clients counted, and closes the others before the NBD greeting
// (ocaml/nbd/lib/consts.ml connection_limit, ocaml/nbd/src/main.ml); the
// fake pool's NBD server does the same. A VM with six disks is backed up
// within the per-host budget (disks connect one after another), and when
// other clients hold most of the connections, with fewer and a warning.
func TestXAPIManyDisks(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 4<<20, 4<<20, 4<<20, 4<<20, 4<<20, 4<<20)
	for i := range r.disks {
		r.fill(i, int64(i%4)<<20, 1<<20)
	}
	want := r.expected()
	sum := r.backup()
	_, peak, refused := r.s.NBDConnections()
	if peak > 8 || refused != 0 {
		t.Errorf("backup of 6 disks: %d NBD connections at once, %d refused; want at most the 8 of the per-host budget", peak, refused)
	}
	t.Logf("6 disks: at most %d NBD connections at once", peak)
	r.restoreCompare(sum["backup_id"].(string), want)

	// Another client holds 14 of the host's 16 connections.
	r.s.OtherNBDClients(14)
	defer r.s.OtherNBDClients(-14)
	for i := range r.disks {
		r.fill(i, 0, 64<<10)
	}
	want = r.expected()
	before := r.s.Dump()
	res := r.run(r.pool("backup", "--repo", r.repo)...)
	if res.code != 0 {
		t.Fatalf("backup with 2 NBD connections free: exit %d %s", res.code, res.errorMessage())
	}
	r.clean(before)
	if w := strings.Join(res.warnings(), "\n"); !strings.Contains(w, "read over 2 NBD connections instead of 4") {
		t.Errorf("warnings %q, want one about fewer connections", w)
	}
	r.restoreCompare(res.summary(t)["backup_id"].(string), want)
	if res := r.run(r.pool("backup", "--repo", r.repo, "--xapi-nbd-connections", "17")...); res.code != 2 || !strings.Contains(res.errorMessage(), "1..16") {
		t.Errorf("--xapi-nbd-connections 17: exit %d %q", res.code, res.errorMessage())
	}
}

// TestXAPIFullReadAllocation: xapi-nbd answers NBD_OPT_GO and structured
// replies "unsupported" and so reports no allocation (xapi-project/nbd
// lib/server.ml; the fake's NBD server negotiates the same way). A full
// backup finds the allocated blocks in the block allocation table at the
// head of GET /export_raw_vdi?format=vhd (ocaml/xapi/export_raw_vdi.ml,
// vhd-tool) and reads only them.
func TestXAPIFullReadAllocation(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 256<<20)
	r.fill(0, 0, 8<<20)
	r.fill(0, 100<<20, 8<<20)
	want := r.expected()
	sum := r.backup()
	d := diskSummaries(t, sum)["xvda"]
	if num(d["bytes_read"]) != 16<<20 {
		t.Errorf("full backup of a 256 MiB disk holding 16 MiB read %d bytes", num(d["bytes_read"]))
	}
	t.Logf("full backup, 256 MiB disk, 16 MiB of data: read %d bytes in %.2f s", num(d["bytes_read"]), sum["duration_s"])
	exported := false
	for _, c := range r.s.Calls() {
		exported = exported || c == "GET /export_raw_vdi"
	}
	if !exported {
		t.Error("the allocation was not read from the VHD export")
	}
	r.restoreCompare(sum["backup_id"].(string), want)
}

// TestXAPIRoles: the least privileged role that can back up a VM is
// vm-power-admin, which VM.snapshot needs (ocaml/idl/datamodel_vm.ml); the
// fake checks each call's role as ocaml/xapi/rbac.ml does. With vm-admin
// the backup fails with an error naming the role, and leaves the pool as
// it was; with vm-power-admin it works, pause included.
func TestXAPIRoles(t *testing.T) {
	r := newXRig(t, xapitest.Options{Role: "vm-admin"}, 4<<20, 4<<20)
	r.fill(0, 0, 1<<20)
	before := r.s.Dump()
	res := r.run(r.pool("backup", "--repo", r.repo)...)
	if res.code != 7 || !strings.Contains(res.errorMessage(), "RBAC_PERMISSION_DENIED") || !strings.Contains(res.errorMessage(), "vm-power-admin") {
		t.Fatalf("backup as vm-admin: exit %d %q", res.code, res.errorMessage())
	}
	r.s.CheckAsBefore(t, before, xapitest.Expect{Checkpoints: true})

	r = newXRig(t, xapitest.Options{Role: "vm-power-admin"}, 4<<20, 4<<20)
	r.fill(0, 0, 1<<20)
	want := r.expected()
	sum := r.backup()
	if sum["instant"] != "vm-paused" {
		t.Errorf("instant %v", sum["instant"])
	}
	r.restoreCompare(sum["backup_id"].(string), want)
}

// TestXAPISessionExpires: the pool ends vmshadow's session while a backup
// reads its first disk (sessions expire; xapi-nbd checks the session of
// each new connection, ocaml/nbd/src/main.ml with_session). The disks read
// later connect with a new session, the backup is stored, and the release
// works: the pool is left as it was.
func TestXAPISessionExpires(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 4<<20, 4<<20, 4<<20)
	for i := range r.disks {
		r.fill(i, 0, 2<<20)
	}
	want := r.expected()
	before := r.s.Dump()
	resume := r.pausedBackup("backup-read")
	r.s.ExpireSessions()
	res := resume()
	if res.code != 0 {
		t.Fatalf("backup with its session expired: exit %d %s", res.code, res.errorMessage())
	}
	if !strings.Contains(strings.Join(res.warnings(), "\n"), "logging in again") {
		t.Errorf("warnings %v", res.warnings())
	}
	r.clean(before)
	r.restoreCompare(res.summary(t)["backup_id"].(string), want)
}

// TestXAPIPoolMember: a pool with a member host that has its own
// certificate (each XenServer host has one) and a local SR. vmshadow
// pointed at the member is told which host is the master (HOST_IS_SLAVE,
// ocaml/xapi/xapi_session.ml); a restore into the member's local SR goes
// to the member, as the master would redirect it there
// (ocaml/xapi/import_raw_vdi.ml, importexport.ml return_302_redirect),
// trusting exactly the certificate the master reports for the member
// (host.get_server_certificate), not the --xapi-ca of the master.
func TestXAPIPoolMember(t *testing.T) {
	r := newXRig(t, xapitest.Options{Member: true}, 8<<20, 4<<20)
	r.fill(0, 0, 8<<20)
	r.fill(1, 1<<20, 1<<20)
	want := r.expected()
	sum := r.backup()
	res := r.run("backup", "--repo", r.repo, "--xapi", r.s.MemberURL, "--insecure", "--vm", r.vm)
	if res.code != 2 || !strings.Contains(res.errorMessage(), "pool member") || !strings.Contains(res.errorMessage(), "https://127.0.0.1") {
		t.Errorf("backup through a member: exit %d %q", res.code, res.errorMessage())
	}
	res = r.run("restore", "--repo", r.repo, sum["backup_id"].(string), "--to-xapi", r.s.URL, "--xapi-ca", r.s.CAFile, "--sr", "Member storage", "--vm-name", "on-member")
	if res.code != 0 {
		t.Fatalf("restore into the member's local SR: exit %d %s", res.code, res.errorMessage())
	}
	vms := r.s.VMsNamed("on-member")
	if len(vms) != 1 {
		t.Fatalf("restored VMs %v", vms)
	}
	for i, u := range r.s.VMDisks(vms[0]) {
		if !bytes.Equal(r.s.Read(u), want[fmt.Sprintf("xvd%c", 'a'+i)]) {
			t.Errorf("disk %d restored on the member differs", i)
		}
	}
	if r.s.Sessions() != 0 || r.s.PendingTasks() != 0 {
		t.Errorf("%d sessions, %d tasks left", r.s.Sessions(), r.s.PendingTasks())
	}
}

// TestXAPISharedLabel: two VMs of the pool share a name-label; the CLI
// names each LABEL-UUID8 in the repository, as the server does, so each
// keeps a chain of its own (its second backup incremental) instead of
// taking the other's backups for its previous ones.
func TestXAPISharedLabel(t *testing.T) {
	r := newXRig(t, xapitest.Options{}, 8<<20)
	twin, _ := r.s.AddVM("web server 1", true, 8<<20)
	backup := func(uuid string) map[string]any {
		t.Helper()
		res := r.run("backup", "--repo", r.repo, "--xapi", r.s.URL, "--xapi-ca", r.s.CAFile, "--vm", uuid)
		if res.code != 0 {
			t.Fatalf("backup of %s: %s", uuid, res.errorMessage())
		}
		if w := strings.Join(res.warnings(), "\n"); !strings.Contains(w, "would be named web_server_1") {
			t.Errorf("no warning says why the VM got its name: %q", w)
		}
		return res.summary(t)
	}
	for _, round := range []string{"full", "incremental"} {
		for _, uuid := range []string{r.vm, twin} {
			sum := backup(uuid)
			want := "web_server_1-" + strings.ReplaceAll(uuid, "-", "")[:8]
			if sum["vm"] != want || sum["mode"] != round {
				t.Errorf("backup of %s: vm %v, mode %v; want %s, %s (reason %v)", uuid, sum["vm"], sum["mode"], want, round, sum["reason"])
			}
		}
	}
}
