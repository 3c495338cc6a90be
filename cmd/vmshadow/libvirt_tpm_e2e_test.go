package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/libvirttest"
	lv "github.com/vmshadow/vmshadow/internal/provider/libvirt"
)

// tpmTestName is a libvirt object name unique to these tests.
func tpmTestName(what string) string {
	var b [4]byte
	rand.Read(b[:])
	return "vmshadow-tpm-" + what + "-" + hex.EncodeToString(b[:])
}

// tpmTestIndex is the NV index the test writes into the source's TPM.
const tpmTestIndex = 0x01000aa5

// TestLibvirtRestoreTPMState: a domain with an emulated TPM 2.0 whose TPM
// holds a random value in an NV index is backed up; restored into a pool,
// the new domain (new UUID) gets the backed-up TPM state in swtpm's
// directory for its UUID, laid out as libvirt lays it out (owner tss,
// modes 0711/0700/0600), without the "TPM starts empty" warning; started,
// libvirt does not manufacture a new TPM (swtpm_setup's log stays silent),
// and after it ran the TPM still holds the value.
func TestLibvirtRestoreTPMState(t *testing.T) {
	pool, _ := lvRestorePool(t)
	src := libvirttest.NewDomain(t, libvirttest.Options{Name: tpmTestName("src"), TPM: true,
		Disks: []libvirttest.Disk{{Target: "vda", Format: "qcow2", Size: 8 << 20}}})
	src.Write(t, "vda", 0x5a, 1<<20, 1<<20)
	src.Start(t) // libvirt manufactures the TPM
	libvirttest.Virsh(t, "destroy", src.Name)
	var secret [32]byte
	rand.Read(secret[:])
	sw := libvirttest.StartSWTPM(t, filepath.Join(lv.SWTPMStateDir, src.UUID, "tpm2"))
	if err := sw.NVWrite(tpmTestIndex, secret[:]); err != nil {
		t.Fatal(err)
	}
	sw.Close(t)
	libvirttest.Virsh(t, "start", src.Name)

	state, env := stateEnv(t)
	env = append(env, "VMSHADOW_PASSWORD=test-password")
	repoDir := filepath.Join(state, "repo")
	if res := vmshadow(t, env, "repo", "init", "--repo", repoDir, "--encryption", "none"); res.code != 0 {
		t.Fatalf("repo init: %s", res.errorMessage())
	}
	res := vmshadow(t, env, "backup", "--repo", repoDir, "--libvirt", libvirttest.URI, "--vm", src.Name, "--scratch-dir", libvirttest.TempDir(t))
	if res.code != 0 {
		t.Fatalf("backup: exit %d: %s", res.code, res.errorMessage())
	}
	id := res.summary(t)["backup_id"].(string)
	libvirttest.Virsh(t, "destroy", src.Name)
	files := t.TempDir() + "/"
	if res := vmshadow(t, env, "restore", "--repo", repoDir, id, "--to", files); res.code != 0 {
		t.Fatalf("restore --to: %s", res.errorMessage())
	}
	stored, err := os.ReadFile(filepath.Join(files, src.Name+".tpm-tpm2-00.permall"))
	if err != nil || len(stored) == 0 {
		t.Fatalf("the backup stores no TPM state: %v", err)
	}

	name := tpmTestName("dom")
	lvRestoreCleanup(t, name)
	res = vmshadow(t, env, "restore", "--repo", repoDir, id, "--to-libvirt", libvirttest.URI, "--pool", pool, "--vm-name", name)
	if res.code != 0 {
		t.Fatalf("restore --to-libvirt: exit %d: %s", res.code, res.errorMessage())
	}
	if out := fmt.Sprint(res.msgs) + res.stderr; strings.Contains(out, "TPM starts empty") {
		t.Errorf("restore warns that the TPM starts empty:\n%s", out)
	}
	sum := res.summary(t)
	uuid, _ := sum["domain_uuid"].(string)
	if d := lvDump(t, name); uuid == "" || d.UUID != uuid || uuid == src.UUID {
		t.Fatalf("restored domain's UUID %s, summary's %v, source's %s", d.UUID, sum["domain_uuid"], src.UUID)
	}
	dir := filepath.Join(lv.SWTPMStateDir, uuid)
	t.Cleanup(func() { os.RemoveAll(dir) })
	tpmDir := filepath.Join(dir, "tpm2")
	if sum["tpm_state"] != tpmDir {
		t.Fatalf("summary's tpm_state %v, want %s", sum["tpm_state"], tpmDir)
	}
	uid, gid := 0, 0
	if u, err := user.Lookup("tss"); err == nil {
		uid, _ = strconv.Atoi(u.Uid)
	}
	if g, err := user.LookupGroup("tss"); err == nil {
		gid, _ = strconv.Atoi(g.Gid)
	}
	for _, c := range []struct {
		path     string
		mode     os.FileMode
		uid, gid int
	}{
		{dir, os.ModeDir | 0o711, 0, 0},
		{tpmDir, os.ModeDir | 0o700, uid, gid},
		{filepath.Join(tpmDir, "tpm2-00.permall"), 0o600, uid, gid},
	} {
		st, err := os.Stat(c.path)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if st.Mode() != c.mode || int(sys.Uid) != c.uid || int(sys.Gid) != c.gid {
			t.Errorf("%s: mode %v owner %d:%d, want %v %d:%d (as libvirt makes it)", c.path, st.Mode(), sys.Uid, sys.Gid, c.mode, c.uid, c.gid)
		}
	}
	if got, err := os.ReadFile(filepath.Join(tpmDir, "tpm2-00.permall")); err != nil || !bytes.Equal(got, stored) {
		t.Fatalf("restored TPM state differs from the backed-up one (%v)", err)
	}

	// libvirt starts the new domain on the restored state: no new TPM
	// manufactured, and the TPM keeps what the source's held.
	libvirttest.Virsh(t, "start", name)
	time.Sleep(3 * time.Second) // the firmware talks to the TPM
	if s := libvirttest.Virsh(t, "domstate", name); !strings.Contains(s, "running") {
		t.Fatalf("restored domain is %s", s)
	}
	libvirttest.Virsh(t, "destroy", name)
	if log, err := os.ReadFile(libvirttest.SWTPMLog(name)); err == nil && strings.Contains(string(log), "manufacturing") {
		t.Fatalf("libvirt manufactured a new TPM for the restored domain:\n%s", log)
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	cp := libvirttest.TempDir(t)
	if out, err := exec.Command("cp", "-a", tpmDir+"/.", cp).CombinedOutput(); err != nil {
		t.Fatalf("copy the TPM state: %v: %s", err, out)
	}
	sw = libvirttest.StartSWTPM(t, cp)
	got, err := sw.NVRead(tpmTestIndex, len(secret))
	if err != nil || !bytes.Equal(got, secret[:]) {
		t.Fatalf("the restored domain's TPM: NV index 0x%x holds %x (%v), the source's held %x", tpmTestIndex, got, err, secret)
	}
}
