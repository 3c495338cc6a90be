package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/libvirttest"
	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/qga/qgatest"
	"github.com/vmshadow/vmshadow/internal/xapitest"
)

// groupVMs starts the three VMs of the group tests: A (two disks) and B
// running, C paused by its operator (a group set must leave it paused).
func groupVMs(t *testing.T) []*qemutest.VM {
	a := qemutest.Start(t, qemutest.Options{Name: "grpa", Running: true, Disks: []qemutest.Disk{{ID: "vda"}, {ID: "vdb", Format: "raw", Legacy: true}}})
	b := qemutest.Start(t, qemutest.Options{Name: "grpb", Running: true, Disks: []qemutest.Disk{{ID: "vda"}}})
	c := qemutest.Start(t, qemutest.Options{Name: "grpc", Running: true, Disks: []qemutest.Disk{{ID: "vda"}}})
	c.Pause()
	return []*qemutest.VM{a, b, c}
}

// groupArgs are the flags naming the VMs, A and B with a guest agent each.
func groupArgs(vms []*qemutest.VM, agents ...*qgatest.Agent) []string {
	var args []string
	for i, vm := range vms {
		qga := ""
		if i < len(agents) {
			qga = agents[i].Path
		}
		args = append(args, "--qmp", vm.QMPPath, "--qga", qga)
	}
	return args
}

// TestGroupRecoverAfterKill kills vmshadow (SIGKILL) at every phase of a
// snapshot set across three VMs, and checks that recover, given the three
// VMs, leaves every one exactly as it was (A and B running, C still paused
// as its operator left it; thawed; nothing of the set left), and that the
// next group set works.
func TestGroupRecoverAfterKill(t *testing.T) {
	vms := groupVMs(t)
	points := []struct {
		point  string
		frozen bool // the writers' freeze was attempted before the kill
	}{
		{"prepared", false}, {"frozen", true}, {"group-pausing", true}, {"group-paused", true},
		{"qemu-inserted", true}, {"committed", true}, {"thawed", true}, {"qemu-exported", true},
	}
	for _, p := range points {
		t.Run(p.point, func(t *testing.T) {
			state, env := stateEnv(t)
			var before []qemutest.Baseline
			for _, vm := range vms {
				before = append(before, vm.Baseline(scratchOf(t, env)))
			}
			log := filepath.Join(t.TempDir(), "writers.log")
			agA, agB := qgatest.Start(t, qgatest.OK, log), qgatest.Start(t, qgatest.OK, log)
			hook := hookScript(t, "db", log, "ok")
			args := append([]string{"snapshot", "create", "--group", "shop", "--hook", hook}, groupArgs(vms, agA, agB)...)
			r := vmshadow(t, append(env, "VMSHADOW_CRASH_AT="+p.point), args...)
			if r.code != 137 {
				t.Fatalf("vmshadow was not killed at %s: exit %d %s", p.point, r.code, r.errorMessage())
			}
			vms[0].Write("vda", byte(len(p.point)), 0, 8<<20)
			r = vmshadow(t, env, "recover", "--qmp", vms[0].QMPPath, "--qmp", vms[1].QMPPath, "--qmp", vms[2].QMPPath)
			if r.code != 0 {
				t.Fatalf("recover: exit %d: %s", r.code, r.errorMessage())
			}
			for i, vm := range vms {
				vm.AssertAsBefore(t, before[i])
			}
			if agA.Frozen() || agB.Frozen() {
				t.Error("guest file systems left frozen")
			}
			calls := readLog(t, log)
			if p.frozen {
				if len(calls) == 0 || calls[len(calls)-1] != "hook db thaw" {
					t.Errorf("hook not thawed last: %q", calls)
				}
			} else if len(calls) != 0 {
				t.Errorf("writers called before freeze: %q", calls)
			}
			if left, _ := filepath.Glob(filepath.Join(state, "scratch", "vmshadow-*")); len(left) > 0 {
				t.Errorf("scratch files left: %v", left)
			}
			if left, _ := filepath.Glob(filepath.Join(state, "journal", "*.json")); len(left) > 0 {
				t.Errorf("journal left: %v", left)
			}
			r = vmshadow(t, env, append([]string{"snapshot", "create", "--group", "shop"}, groupArgs(vms)...)...)
			if r.code != 0 {
				t.Fatalf("create after recover: %s", r.errorMessage())
			}
			args = []string{"snapshot", "delete"}
			for _, vm := range vms {
				args = append(args, "--qmp", vm.QMPPath)
			}
			if d := vmshadow(t, env, append(args, fmt.Sprint(r.summary(t)["set_id"]))...); d.code != 0 {
				t.Fatal(d.errorMessage())
			}
			for i, vm := range vms {
				vm.AssertAsBefore(t, before[i])
			}
		})
	}
}

// TestGroupBackup backs up three VMs as a group: one set, every VM paused
// together, each VM's backup in its own chain (the second group backup is
// incremental), each restorable alone with the data of the instant; a
// member whose guest agent hangs aborts the whole group within the freeze
// limit and leaves every VM as it was.
func TestGroupBackup(t *testing.T) {
	vms := groupVMs(t)
	state, env := stateEnv(t)
	env = append(env, "VMSHADOW_PASSWORD=test-password")
	repo := filepath.Join(state, "repo")
	if res := vmshadow(t, env, "repo", "init", "--repo", repo); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	// A backup moves each VM's change tracking on; nothing else may change.
	var before []qemutest.Baseline
	for _, vm := range vms {
		before = append(before, vm.Baseline(scratchOf(t, env)).WithChains())
	}
	for i, vm := range vms {
		vm.Write("vda", byte(0x51+i), 0, 4<<20)
	}
	backup := func(args ...string) result {
		return vmshadow(t, env, append([]string{"backup", "--repo", repo, "--group", "shop"}, append(groupArgs(vms), args...)...)...)
	}
	r := backup()
	if r.code != 0 {
		t.Fatalf("group backup: %s", r.errorMessage())
	}
	first := r.summary(t)
	members, _ := first["members"].([]any)
	if len(members) != 3 || first["group"] != "shop" || first["set_id"] == "" {
		t.Fatalf("group summary: %v", first)
	}
	for i, m := range members {
		mm := m.(map[string]any)
		if mm["vm"] != []string{"grpa", "grpb", "grpc"}[i] || mm["set_id"] != first["set_id"] || mm["mode"] != "full" {
			t.Errorf("member %d: %v", i, mm)
		}
	}
	// A paused VM C stays paused; A and B run again.
	for i, vm := range vms {
		vm.AssertAsBefore(t, before[i])
	}

	// Each member restores alone, with the data of the group's instant.
	vms[1].Write("vda", 0x61, 0, 4<<20)
	r = backup()
	if r.code != 0 {
		t.Fatalf("second group backup: %s", r.errorMessage())
	}
	for i, m := range r.summary(t)["members"].([]any) {
		if mode := m.(map[string]any)["mode"]; mode != "incremental" {
			t.Errorf("member %d of the second group backup: %v, want incremental", i, mode)
		}
	}
	id := fmt.Sprint(r.summary(t)["members"].([]any)[1].(map[string]any)["backup_id"])
	dir := t.TempDir()
	if res := vmshadow(t, env, "restore", "--repo", repo, id, "--to", dir); res.code != 0 {
		t.Fatalf("restore member B: %s", res.errorMessage())
	}
	vms[1].Write("vda", 0x62, 0, 4<<20) // after the backup: not in it
	hasPattern := func(img string, p byte) {
		t.Helper()
		if out, err := exec.Command("qemu-io", "-f", "raw", "-c", fmt.Sprintf("read -P 0x%x 0 4M", p), img).CombinedOutput(); err != nil || strings.Contains(string(out), "fail") {
			t.Errorf("%s lacks the data of the group's instant (0x%x): %v %s", img, p, err, out)
		}
	}
	hasPattern(filepath.Join(dir, "vda.raw"), 0x61)
	// The group restores as a whole, each VM into its own directory.
	gid := fmt.Sprint(r.summary(t)["group_backup_id"])
	all := filepath.Join(t.TempDir(), "shop")
	if res := vmshadow(t, env, "restore", "--repo", repo, "--group", gid, "--to", all); res.code != 0 {
		t.Fatalf("restore --group: %s", res.errorMessage())
	}
	hasPattern(filepath.Join(all, "grpa", "vda.raw"), 0x51)
	hasPattern(filepath.Join(all, "grpb", "vda.raw"), 0x61)
	hasPattern(filepath.Join(all, "grpc", "vda.raw"), 0x53)
	if res := vmshadow(t, env, "backups", "--repo", repo, "--group", "shop"); res.code != 0 || len(res.summary(t)["groups"].([]any)) != 2 {
		t.Errorf("backups --group: exit %d %v", res.code, res.msgs)
	}

	// A member whose agent hangs: the whole group aborts within the
	// limits (the freeze window, then each writer's thaw), every guest
	// thawed (the hung one through a new connection).
	agA, agB := qgatest.Start(t, qgatest.OK, ""), qgatest.Start(t, qgatest.HangFreeze, "")
	start := time.Now()
	r = vmshadow(t, env, append([]string{"backup", "--repo", repo, "--group", "shop", "--freeze-timeout", "2s", "--writer-timeout", "2s"}, groupArgs(vms, agA, agB)...)...)
	if r.code != 5 || !strings.Contains(r.errorMessage(), "grpb") {
		t.Fatalf("group with a hanging agent: exit %d %s, want 5 naming grpb", r.code, r.errorMessage())
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("the group took %s to abort with 2 s limits", took)
	}
	if agA.Frozen() || agB.Frozen() {
		t.Error("a guest was left frozen")
	}
	for i, vm := range vms {
		vm.AssertAsBefore(t, before[i])
	}
	if left, _ := filepath.Glob(filepath.Join(state, "journal", "*.json")); len(left) > 0 {
		t.Errorf("journal left: %v", left)
	}
}

// TestGroupMixedXAPI: a QEMU VM and a XenServer VM (of xapitest's pool)
// backed up as one group, the XenServer VM committed last while the QEMU
// VM stays paused; both come back as they were and restore bit-identical.
// Two XenServer VMs in one group are refused before anything is done.
func TestGroupMixedXAPI(t *testing.T) {
	x := newXRig(t, xapitest.Options{}, 8<<20, 4<<20)
	q := qemutest.Start(t, qemutest.Options{Name: "grpq", Running: true, Disks: []qemutest.Disk{{ID: "vda"}}})
	q.Write("vda", 0x71, 0, 4<<20)
	x.fill(0, 0, 1<<20)
	env := x.env
	before := q.Baseline(scratchOf(t, env)).WithChains()
	pool := x.s.Dump()
	want := x.expected()
	r := x.run("backup", "--repo", x.repo, "--group", "mix", "--qmp", q.QMPPath, "--xapi", x.s.URL, "--xapi-ca", x.s.CAFile, "--vm", x.vm)
	if r.code != 0 {
		t.Fatalf("mixed group backup: exit %d: %s", r.code, r.errorMessage())
	}
	q.AssertAsBefore(t, before)
	x.clean(pool)
	sum := r.summary(t)
	members := sum["members"].([]any)
	if len(members) != 2 {
		t.Fatalf("members: %v", members)
	}
	// The QEMU VM first (paused), the XenServer VM last.
	if members[0].(map[string]any)["source"] != "qemu" || members[1].(map[string]any)["source"] != "xapi" {
		t.Errorf("members: %v", members)
	}
	x.restoreCompare(fmt.Sprint(members[1].(map[string]any)["backup_id"]), want)
	dir := t.TempDir()
	if res := x.run("restore", "--repo", x.repo, fmt.Sprint(members[0].(map[string]any)["backup_id"]), "--to", dir); res.code != 0 {
		t.Fatalf("restore the QEMU member: %s", res.errorMessage())
	}
	if out, err := exec.Command("qemu-io", "-f", "raw", "-c", "read -P 0x71 0 4M", filepath.Join(dir, "vda.raw")).CombinedOutput(); err != nil || strings.Contains(string(out), "fail") {
		t.Errorf("restored QEMU member: %v %s", err, out)
	}

	other, _ := x.s.AddVM("web server 2", true, 4<<20)
	pool = x.s.Dump()
	r = x.run("backup", "--repo", x.repo, "--group", "mix", "--qmp", q.QMPPath, "--xapi", x.s.URL, "--xapi-ca", x.s.CAFile, "--vm", x.vm, "--vm", other)
	if r.code != 2 || !strings.Contains(r.errorMessage(), "cannot be paused together") {
		t.Fatalf("two XenServer VMs in a group: exit %d %s, want 2", r.code, r.errorMessage())
	}
	q.AssertAsBefore(t, before)
	x.clean(pool)
}

// TestLibvirtGroup: two running libvirt domains backed up as one group
// through libvirt's API (suspended together around the backup jobs'
// start, resumed after), both running again with no job left and not
// tainted, each restoring bit-identical; vmshadow killed while the
// domains are suspended leaves them so, and recover with both resumes
// them and releases everything.
func TestLibvirtGroup(t *testing.T) {
	libvirttest.Need(t)
	var doms []*libvirttest.Domain
	for i := range 2 {
		d := libvirttest.NewDomain(t, libvirttest.Options{Disks: []libvirttest.Disk{{Target: "vda", Size: 16 * mibLV}}})
		d.Write(t, "vda", byte(0x31+i), 0, 2*mibLV)
		d.Start(t)
		doms = append(doms, d)
	}
	state, env := stateEnv(t)
	env = append(env, "VMSHADOW_PASSWORD=test-password")
	repo := filepath.Join(state, "repo")
	if res := vmshadow(t, env, "repo", "init", "--repo", repo, "--encryption", "none"); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	args := []string{"backup", "--repo", repo, "--group", "pair", "--libvirt", libvirttest.URI, "--scratch-dir", libvirttest.TempDir(t)}
	for _, d := range doms {
		args = append(args, "--vm", d.Name)
	}
	running := func(when string) {
		t.Helper()
		for _, d := range doms {
			if st := strings.TrimSpace(libvirttest.Virsh(t, "domstate", d.Name)); st != "running" {
				t.Errorf("%s: domain %s is %q, want running", when, d.Name, st)
			}
			if out := libvirttest.Virsh(t, "domjobinfo", d.Name); !strings.Contains(out, "None") {
				t.Errorf("%s: domain %s still has a job:\n%s", when, d.Name, out)
			}
			if lines := d.Tainted(); len(lines) > 0 {
				t.Errorf("%s: domain %s tainted:\n%s", when, d.Name, strings.Join(lines, "\n"))
			}
		}
	}
	r := vmshadow(t, env, args...)
	if r.code != 0 {
		t.Fatalf("group backup of two domains: %s", r.errorMessage())
	}
	running("after the group backup")
	members := r.summary(t)["members"].([]any)
	if len(members) != 2 || num(r.summary(t)["pause_ms"]) <= 0 {
		t.Fatalf("group summary: %v", r.summary(t))
	}
	for i, m := range members {
		dir := t.TempDir()
		if res := vmshadow(t, env, "restore", "--repo", repo, fmt.Sprint(m.(map[string]any)["backup_id"]), "--to", dir); res.code != 0 {
			t.Fatalf("restore %s: %s", doms[i].Name, res.errorMessage())
		}
		if out, err := exec.Command("qemu-io", "-f", "raw", "-c", fmt.Sprintf("read -P 0x%x 0 2M", 0x31+i), filepath.Join(dir, "vda.raw")).CombinedOutput(); err != nil || strings.Contains(string(out), "fail") {
			t.Errorf("restored %s: %v %s", doms[i].Name, err, out)
		}
	}

	r = vmshadow(t, append(env, "VMSHADOW_CRASH_AT=group-paused"), args...)
	if r.code != 137 {
		t.Fatalf("vmshadow was not killed: exit %d %s", r.code, r.errorMessage())
	}
	for _, d := range doms {
		if st := strings.TrimSpace(libvirttest.Virsh(t, "domstate", d.Name)); st != "paused" {
			t.Errorf("killed with the group suspended: domain %s is %q", d.Name, st)
		}
	}
	rec := []string{"recover", "--libvirt", libvirttest.URI}
	for _, d := range doms {
		rec = append(rec, "--vm", d.Name)
	}
	if res := vmshadow(t, env, rec...); res.code != 0 {
		t.Fatalf("recover: %s", res.errorMessage())
	}
	running("after recover")
	if left, _ := filepath.Glob(filepath.Join(state, "journal", "*.json")); len(left) > 0 {
		t.Errorf("journal left: %v", left)
	}
	// The next group backup works, incremental for both.
	r = vmshadow(t, env, args...)
	if r.code != 0 {
		t.Fatalf("group backup after recover: %s", r.errorMessage())
	}
	for _, m := range r.summary(t)["members"].([]any) {
		if mode := m.(map[string]any)["mode"]; mode != "incremental" {
			t.Errorf("member %v after recover: %v, want incremental", m.(map[string]any)["vm"], mode)
		}
	}
	running("after the last group backup")
}
