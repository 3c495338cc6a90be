package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/guestvm"
	"github.com/vmshadow/vmshadow/internal/libvirttest"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/walcheck"
)

// The proofs of issue 12 for libvirt backups, on one domain running the
// project's test guest (qemu-ga with its fsfreeze hook, walapp writing a
// log on the ext4 disk vda) and a second disk vdb the guest never touches:
// the test writes into vdb through the guest's device (HMP qemu-io, which
// taints the domain, so the taint checks come first) and knows its content
// at every instant; vda is checked with e2fsck and walcheck.

const (
	proofChunk = 256 << 10 // the repository's chunk size
	proofVDB   = 16 * mibLV
)

// lvProof is the running guest domain and its repository.
type lvProof struct {
	*lvRig
	ctx     context.Context
	vdb     []byte         // vdb's content now
	pending map[int64]bool // vdb chunks written since the last stored backup
	next    int64          // offset of the next write into vdb
	lastID  string         // the last stored backup
	lastCP  string         // its checkpoint
	hookLog string
	hook    string
	warns   []string      // the last backup's warnings
	took    time.Duration // how long the last backup ran
}

func newLVProof(t *testing.T) *lvProof {
	t.Helper()
	libvirttest.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	t.Cleanup(cancel)
	dir := libvirttest.TempDir(t)
	data := filepath.Join(dir, "data.qcow2")
	if err := guestvm.MakeDataDisk(ctx, data, 32*mibLV, "qcow2"); err != nil {
		t.Fatal(err)
	}
	opts := libvirttest.GuestOptions(t,
		libvirttest.Disk{Target: "vda", Format: "qcow2", Path: data},
		libvirttest.Disk{Target: "vdb", Size: proofVDB})
	var b [4]byte
	rand.Read(b[:])
	opts.Name = "vmshadow-lve2e-" + hex.EncodeToString(b[:])
	dom := libvirttest.NewDomain(t, opts)
	dom.Write(t, "vdb", 0x31, 0, 2*mibLV)
	dom.Start(t)
	dom.WaitConsole(t, guestvm.ReadyMarker, 5*time.Minute)
	state, env := stateEnv(t)
	p := &lvProof{
		lvRig: &lvRig{t: t, dom: dom, env: append(env, "VMSHADOW_PASSWORD=test-password"), scratch: libvirttest.TempDir(t), repo: filepath.Join(state, "repo")},
		ctx:   ctx, vdb: make([]byte, proofVDB), pending: map[int64]bool{}, next: 4 * mibLV,
		hookLog: filepath.Join(state, "hook.log"), hook: filepath.Join(state, "hook.sh"),
	}
	copy(p.vdb, bytes.Repeat([]byte{0x31}, 2*mibLV))
	if err := os.WriteFile(p.hook, []byte("#!/bin/sh\necho \"$1 $VMSHADOW_SET_ID\" >>"+p.hookLog+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if res := p.run("repo", "init", "--repo", p.repo, "--encryption", "none", "--chunk-size", fmt.Sprint(proofChunk)); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	// libvirt talks to the agent once qemu-ga opened its port.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		_, err := libvirttest.VirshErr("domfsinfo", dom.Name)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest agent does not answer: %v\nconsole:\n%s", err, dom.Console())
		}
		time.Sleep(500 * time.Millisecond)
	}
	return p
}

// set points the rig at the (sub)test t.
func (p *lvProof) set(t *testing.T) { p.lvRig.t = t }

// backupArgs are a backup's arguments: through the guest agent, which
// must freeze (TCG under load: a generous freeze limit).
func (p *lvProof) backupArgs(extra ...string) []string {
	return p.domain(append([]string{"backup", "--repo", p.repo, "--guest-agent", "--require", "filesystem", "--freeze-timeout", "2m"}, extra...)...)
}

// write writes 64 KiB of a new pattern into the next chunk of vdb through
// the guest's device.
func (p *lvProof) write() {
	p.t.Helper()
	off := p.next
	p.next += 2 * proofChunk
	if p.next+proofChunk > proofVDB {
		p.next = 4 * mibLV
	}
	pattern := byte(0x40 + off/(2*proofChunk)%0xb0)
	p.dom.GuestWrite(p.t, "vdb", pattern, off, 64<<10)
	copy(p.vdb[off:off+64<<10], bytes.Repeat([]byte{pattern}, 64<<10))
	p.pending[off/proofChunk*proofChunk] = true
}

// stored notes a backup stored with the content vdb had at its instant.
func (p *lvProof) stored(id, checkpoint string) {
	p.lastID, p.lastCP = id, checkpoint
	clear(p.pending)
}

// backup runs a backup that must succeed in mode (incremental: vdb reads
// exactly the chunks written since the last stored backup, vda only what
// changed), restores it and checks it; it returns the summary.
func (p *lvProof) backup(mode string, extra ...string) map[string]any {
	p.t.Helper()
	want := slices.Clone(p.vdb)
	readVDB := int64(len(p.pending)) * proofChunk
	began := time.Now()
	res := p.run(p.backupArgs(extra...)...)
	p.took = time.Since(began)
	if res.code != 0 {
		p.t.Fatalf("backup: exit %d: %s\nconsole:\n%s", res.code, res.errorMessage(), tail(p.dom.Console(), 2000))
	}
	sum := res.summary(p.t)
	p.warns = res.warnings()
	if sum["source"] != "libvirt" || sum["mode"] != mode {
		p.t.Fatalf("backup: source %v, mode %v (reason %v); want libvirt, %s", sum["source"], sum["mode"], sum["reason"], mode)
	}
	disks := diskSummaries(p.t, sum)
	if mode == "incremental" {
		for name, d := range disks {
			if d["mode"] != "incremental" || d["reason"] != nil {
				p.t.Errorf("disk %s: mode %v, reason %v; want incremental", name, d["mode"], d["reason"])
			}
		}
		if got := num(disks["vdb"]["bytes_read"]); got != readVDB {
			p.t.Errorf("vdb read %d bytes, want %d: the %d chunks written since the last stored backup %s", got, readVDB, len(p.pending), p.lastID)
		}
		if got := num(disks["vda"]["bytes_read"]); got >= 32*mibLV/2 {
			p.t.Errorf("vda read %d bytes of 32 MiB in an incremental", got)
		}
	}
	id := fmt.Sprint(sum["backup_id"])
	cp := fmt.Sprint(disks["vdb"]["checkpoint"])
	if !strings.HasPrefix(cp, "vmshadow-") || disks["vda"]["checkpoint"] != cp {
		p.t.Fatalf("backup %s: checkpoints vda %v, vdb %v; want one vmshadow checkpoint", id, disks["vda"]["checkpoint"], cp)
	}
	p.stored(id, cp)
	p.restoreCheck(id, want)
	return sum
}

// restoreCheck restores a backup: vdb must equal want, vda's file system
// must be clean and its log complete.
func (p *lvProof) restoreCheck(id string, want []byte) {
	p.t.Helper()
	dir := filepath.Join(p.t.TempDir(), "restore")
	if res := p.run("restore", "--repo", p.repo, id, "--to", dir); res.code != 0 {
		p.t.Fatalf("restore %s: %s", id, res.errorMessage())
	}
	got, err := os.ReadFile(filepath.Join(dir, "vdb.raw"))
	if err != nil {
		p.t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		at := -1
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				at = i
				break
			}
		}
		p.t.Errorf("backup %s: restored vdb (%d bytes) differs from the disk at the instant (%d bytes) first at %d", id, len(got), len(want), at)
	}
	img := filepath.Join(dir, "vda.raw")
	fsck, err := walcheck.Fsck(p.ctx, img)
	if err != nil || !fsck.Clean {
		p.t.Fatalf("backup %s: e2fsck -fn of the restored vda is not clean (%v):\n%s", id, err, fsck.Output)
	}
	wal, err := walcheck.CheckImage(p.ctx, img, "")
	if err != nil {
		p.t.Fatalf("backup %s: the workload's log is damaged: %v", id, err)
	}
	if wal.LastSeq == 0 || wal.TrailingPartial {
		p.t.Errorf("backup %s: the log ends at record %d, torn %v (the guest was frozen with its hook)", id, wal.LastSeq, wal.TrailingPartial)
	}
}

// thawed fails unless the guest's file systems are thawed: libvirt's
// virDomainGetFSInfo goes to qemu-ga, which refuses it while frozen (see
// TestLibvirtProof's check of this check), and the guest's fsfreeze hook
// logged no freeze after its last thaw.
func (p *lvProof) thawed(after string) {
	p.t.Helper()
	if _, err := libvirttest.VirshErr("domfsinfo", p.dom.Name); err != nil {
		p.t.Fatalf("after %s the guest's file systems look frozen: %v", after, err)
	}
	con := p.dom.Console()
	if f, th := strings.LastIndex(con, "fsfreeze-hook: freeze"), strings.LastIndex(con, "fsfreeze-hook: thaw"); f > th {
		p.t.Fatalf("after %s the guest's fsfreeze hook froze last:\n%s", after, tail(con, 2000))
	}
}

// asBefore checks libvirt and vmshadow's state between backups: no job,
// the last stored backup's checkpoint and no other vmshadow checkpoint
// (want, when given, lists them all, parents first), the guest thawed, no
// set in the journal, the scratch directory empty.
func (p *lvProof) asBefore(after string, want ...string) {
	p.t.Helper()
	p.noJob()
	if want == nil {
		want = []string{p.lastCP}
	}
	if got := p.checkpoints(); !slices.Equal(got, want) {
		p.t.Errorf("after %s the domain's checkpoints are %v, want %v (the last stored backup is %s)", after, got, want, p.lastID)
	}
	p.thawed(after)
	if sets := p.run(p.domain("snapshot", "list")...).summary(p.t)["sets"].([]any); len(sets) != 0 {
		p.t.Errorf("after %s the journal holds sets %v", after, sets)
	}
	if entries, _ := os.ReadDir(p.scratch); len(entries) > 0 {
		p.t.Errorf("after %s the scratch directory holds %v", after, entries)
	}
}

// notTainted checks the domain's log and virsh dominfo.
func (p *lvProof) notTainted(after string) {
	p.t.Helper()
	p.lvRig.notTainted(after)
	if info := libvirttest.Virsh(p.t, "dominfo", p.dom.Name); strings.Contains(info, "tainted") {
		p.t.Fatalf("virsh dominfo says the domain is tainted after %s:\n%s", after, info)
	}
}

// latest is the repository's newest backup of the domain.
func (p *lvProof) latest() *repo.Backup {
	p.t.Helper()
	be, err := local.Open(p.repo)
	if err != nil {
		p.t.Fatal(err)
	}
	r, err := repo.Open(p.ctx, be, nil)
	if err != nil {
		p.t.Fatal(err)
	}
	defer r.Close()
	b, err := r.LatestBackup(p.ctx, p.dom.Name, nil)
	if err != nil {
		p.t.Fatal(err)
	}
	return b
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// TestLibvirtProof: the guest agent through libvirt (filesystem, and
// application with a hook) restoring clean file systems, no taint; kill -9
// at every step of a backup, then recover or the next backup; libvirtd
// restarted between two backups.
func TestLibvirtProof(t *testing.T) {
	p := newLVProof(t)
	start := time.Now()

	t.Run("guest agent", func(t *testing.T) {
		p.set(t)
		sum := p.backup("full")
		if sum["consistency"] != "filesystem" {
			t.Errorf("backup --guest-agent: consistency %v, want filesystem", sum["consistency"])
		}
		if m := p.latest(); m.Consistency != "filesystem" || m.ID.String() != sum["backup_id"] {
			t.Errorf("manifest of %v: consistency %q, want filesystem (latest %s)", sum["backup_id"], m.Consistency, m.ID)
		}
		con := p.dom.Console()
		if !strings.Contains(con, "fsfreeze-hook: freeze") {
			t.Errorf("the guest's fsfreeze hook never ran: libvirt did not freeze through qemu-ga:\n%s", tail(con, 2000))
		}
		p.asBefore("a backup with --guest-agent")
		p.notTainted("a backup with --guest-agent")

		// A host hook too: application consistency, hook frozen around
		// the agent's freeze.
		sum = p.backup("incremental", "--hook", p.hook, "--require", "application")
		if sum["consistency"] != "application" {
			t.Errorf("backup --guest-agent --hook: consistency %v, want application", sum["consistency"])
		}
		if m := p.latest(); m.Consistency != "application" {
			t.Errorf("manifest: consistency %q, want application", m.Consistency)
		}
		b, _ := os.ReadFile(p.hookLog)
		set := fmt.Sprint(sum["set_id"])
		if want := "freeze " + set + "\nthaw " + set + "\n"; string(b) != want {
			t.Errorf("hook log %q, want %q", b, want)
		}
		p.asBefore("a backup with --guest-agent and --hook")
		p.notTainted("a backup with --guest-agent and --hook")

		// The thaw check can fail: frozen through libvirt (no taint),
		// virDomainGetFSInfo is refused.
		libvirttest.Virsh(t, "domfsfreeze", p.dom.Name)
		_, err := libvirttest.VirshErr("domfsinfo", p.dom.Name)
		libvirttest.Virsh(t, "domfsthaw", p.dom.Name)
		if err == nil {
			t.Fatal("virsh domfsinfo works while the guest is frozen: the thaw check checks nothing")
		}
		p.notTainted("virsh domfsfreeze and domfsthaw")
	})
	if t.Failed() {
		return
	}
	t.Logf("guest agent: %.1f s", time.Since(start).Seconds())

	// The taint check can fail: the test's writes through HMP taint.
	p.write()
	if len(p.dom.Tainted()) == 0 || !strings.Contains(libvirttest.Virsh(t, "dominfo", p.dom.Name), "tainted") {
		t.Fatalf("a qemu-monitor-command write did not show as a taint: the taint checks check nothing (dominfo:\n%s)", libvirttest.Virsh(t, "dominfo", p.dom.Name))
	}
	p.backup("incremental")

	// kill -9 at every step of a backup (every crashpoint it passes), then
	// recover (as documented, without --guest-agent: it thaws what the
	// journal says may be frozen), or straight the next backup, which
	// recovers the killed one's set by itself.
	for _, row := range []struct {
		point   string
		recover bool
		stored  bool // killed after its manifest was stored
		frozen  bool // killed with the guest frozen
	}{
		{"prepared", true, false, false},
		{"frozen", true, false, true},
		{"libvirt-begun", true, false, true},
		{"committed", true, false, true},
		{"thawed", true, false, false},
		{"backup-read", true, false, false},
		{"backup-manifest", true, false, false},
		{"backup-stored", true, true, false},
		{"backup-completed", true, true, false},
		{"libvirt-aborted", true, true, false},
		{"frozen", false, false, true},
		{"libvirt-begun", false, false, true},
		{"backup-read", false, false, false},
		{"backup-manifest", false, false, false},
		{"backup-stored", false, true, false},
	} {
		name := row.point + map[bool]string{true: " then recover", false: " then backup"}[row.recover]
		t.Run(name, func(t *testing.T) {
			p.set(t)
			rowStart := time.Now()
			p.asBefore("the previous row")
			p.write()
			atKill := slices.Clone(p.vdb)
			killed := vmshadow(t, append(p.env, "VMSHADOW_CRASH_AT="+row.point), p.backupArgs()...)
			if killed.code != 137 {
				t.Fatalf("backup not killed at %s: exit %d %s", row.point, killed.code, killed.errorMessage())
			}
			if _, err := libvirttest.VirshErr("domfsinfo", p.dom.Name); row.frozen != (err != nil) {
				t.Fatalf("killed at %s: the guest frozen %v, want %v", row.point, err != nil, row.frozen)
			}
			var want []string // the checkpoints recover leaves; nil: the last stored backup's
			prevCP := p.lastCP
			if last := p.latest(); row.stored != (last.ID.String() != p.lastID) {
				t.Fatalf("killed at %s: the latest backup is %s (before: %s)", row.point, last.ID, p.lastID)
			} else if row.stored {
				p.stored(last.ID.String(), last.Disks[0].Checkpoint)
				p.restoreCheck(last.ID.String(), atKill)
			}
			switch row.point {
			case "backup-stored":
				// Killed between the manifest and the journal saying so:
				// recover cannot know which of the set's checkpoint and its
				// base the repository names, and keeps both.
				want = []string{prevCP, p.lastCP}
			case "backup-manifest":
				// Killed while the manifest was being written (not stored):
				// the same, the set's checkpoint stays too, until the next
				// backup (which reads from the base through it).
				if cps := p.checkpoints(); len(cps) == 2 && cps[0] == p.lastCP && strings.HasPrefix(cps[1], "vmshadow-") {
					want = cps
				} else {
					t.Fatalf("killed writing the manifest: checkpoints %v, want %s and the killed set's", cps, p.lastCP)
				}
			}
			if row.recover {
				res := p.run(p.domain("recover")...)
				if res.code != 0 {
					t.Fatalf("recover: exit %d: %s", res.code, res.errorMessage())
				}
				if thawed := fmt.Sprint(res.summary(t)["thawed"]); row.frozen != strings.Contains(thawed, "guest-agent") {
					t.Errorf("recover after a kill at %s thawed %s", row.point, thawed)
				}
				p.asBefore("recover", want...)
				p.write()
				p.backup("incremental")
			} else {
				p.write()
				p.backup("incremental")
				if w := strings.Join(p.warns, " "); !strings.Contains(w, "interrupted backup") {
					t.Errorf("the next backup did not say it recovered the killed one's set: warnings %q", w)
				}
			}
			p.asBefore("the next backup")
			t.Logf("%s: %.1f s", name, time.Since(rowStart).Seconds())
		})
		if t.Failed() {
			return
		}
	}

	// kill -9 after seeded random delays, between the crashpoints too (in
	// a thaw, a checkpoint deletion, ...): recover or the next backup
	// leaves libvirt as the repository needs it.
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv("VMSHADOW_FAULT_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("VMSHADOW_FAULT_SEED=%q: %v", v, err)
		}
		seed = n
	}
	t.Logf("random kills: seed %d (replay with VMSHADOW_FAULT_SEED=%d)", seed, seed)
	rng := mrand.New(mrand.NewPCG(seed, 2))
	for i := range 4 {
		recover := i%2 == 0
		t.Run(fmt.Sprintf("random %d then %s", i, map[bool]string{true: "recover", false: "backup"}[recover]), func(t *testing.T) {
			p.set(t)
			p.asBefore("the previous row")
			p.write()
			atKill := slices.Clone(p.vdb)
			prevCP := p.lastCP
			delay := time.Duration(rng.Int64N(int64(p.took))) + 1
			res, killed := runKilled(t, p.env, delay, p.backupArgs()...)
			t.Logf("kill after %v of a %v backup: killed %v", delay.Round(time.Millisecond), p.took.Round(time.Millisecond), killed)
			if !killed && res.code != 0 {
				t.Fatalf("backup not killed: exit %d %s", res.code, res.errorMessage())
			}
			if last := p.latest(); last.ID.String() != p.lastID {
				p.stored(last.ID.String(), last.Disks[0].Checkpoint)
				p.restoreCheck(last.ID.String(), atKill)
			} else if !killed {
				t.Fatal("a backup that succeeded is not the repository's latest")
			}
			if recover {
				if res := p.run(p.domain("recover")...); res.code != 0 {
					t.Fatalf("recover: exit %d: %s", res.code, res.errorMessage())
				}
				// The last stored backup's checkpoint, and at most one
				// other: the base, or the killed set's, when the kill came
				// while the manifest was being stored.
				cps := p.checkpoints()
				if !slices.Contains(cps, p.lastCP) || len(cps) > 2 || len(cps) == 2 && cps[0] != prevCP && cps[0] != p.lastCP {
					t.Fatalf("after recover the checkpoints are %v; want %s (and perhaps %s or the killed set's)", cps, p.lastCP, prevCP)
				}
				p.asBefore("recover", cps...)
			}
			p.write()
			p.backup("incremental")
			p.asBefore("the next backup")
		})
		if t.Failed() {
			return
		}
	}

	// libvirtd restarted between two backups: the checkpoint survives, the
	// next backup is incremental and reads only what changed.
	t.Run("libvirtd restart", func(t *testing.T) {
		p.set(t)
		p.write()
		pid, _ := os.ReadFile("/run/libvirtd.pid")
		libvirttest.RestartLibvirtd(t)
		if now, _ := os.ReadFile("/run/libvirtd.pid"); len(pid) == 0 || bytes.Equal(now, pid) {
			t.Fatalf("libvirtd's pid was %q and is %q: not restarted", pid, now)
		}
		p.asBefore("libvirtd restarted")
		p.write()
		p.backup("incremental")
		p.asBefore("the backup after the restart")
	})
	t.Logf("total %.1f s", time.Since(start).Seconds())
}
