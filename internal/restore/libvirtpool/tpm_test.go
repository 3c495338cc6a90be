package libvirtpool

import (
	"errors"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// TestRewriteWithTPMState: when the restore puts TPM state back, the new
// definition carries the UUID the state's directory is named after (right
// after <name>) and no "TPM starts empty" warning; without state, no UUID
// and the warning.
func TestRewriteWithTPMState(t *testing.T) {
	const in = `<domain type='qemu'><name>a</name><uuid>0b3f6c36-0000-4000-8000-000000000001</uuid><memory>1</memory><devices><disk><target dev='vda'/></disk><tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm></devices></domain>`
	vda := newDisk{Target: "vda", Type: "file", Path: "/p/n-vda.qcow2", Format: "qcow2"}
	const uuid = "5d1c8f0e-3b7a-4c2e-9f10-aabbccddeeff"
	root, err := parseDefinition([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if info := inspect(root); !info.TPM || info.TPMVersion != "2.0" {
		t.Fatalf("inspect: %+v", info)
	}
	warnings, err := rewrite(root, "n", []newDisk{vda}, "", uuid, true)
	if err != nil {
		t.Fatal(err)
	}
	out := string(root.marshal())
	if !strings.Contains(out, "<name>n</name><uuid>"+uuid+"</uuid><memory>") || strings.Contains(out, "0b3f6c36") {
		t.Errorf("definition does not carry exactly the new UUID after <name>:\n%s", out)
	}
	if len(warnings) != 0 {
		t.Errorf("warnings %q with the TPM state put back", warnings)
	}

	root, _ = parseDefinition([]byte(in))
	warnings, err = rewrite(root, "n", []newDisk{vda}, "", "", false)
	if err != nil {
		t.Fatal(err)
	}
	if out := string(root.marshal()); strings.Contains(out, "<uuid>") {
		t.Errorf("definition keeps a UUID without TPM state:\n%s", out)
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "emulated TPM starts empty") {
		t.Errorf("warnings %q, want the TPM one", warnings)
	}
}

func TestTPMSubdir(t *testing.T) {
	for _, c := range []struct {
		version string
		names   []string
		want    string
		err     error
		msg     string
	}{
		{"2.0", []string{"tpm2-00.permall"}, "tpm2", nil, ""},
		{"", []string{"tpm2-00.permall", "tpm2-00.volatilestate"}, "tpm2", nil, ""},
		{"1.2", []string{"tpm-00.permall"}, "tpm1.2", nil, ""},
		{"", []string{"tpm-00.permall"}, "tpm1.2", nil, ""},
		{"1.2", []string{"other"}, "tpm1.2", nil, ""},
		{"2.0", []string{"tpm-00.permall"}, "", errs.ErrCorrupt, "TPM 1.2's (tpm-00.permall), but the stored definition's TPM is version 2.0"},
		{"1.2", []string{"tpm2-00.permall"}, "", errs.ErrCorrupt, "version 1.2"},
		{"", []string{"tpm-00.permall", "tpm2-00.permall"}, "", errs.ErrCorrupt, "mixes TPM 1.2 and TPM 2.0"},
		{"", []string{"other"}, "", errs.ErrCorrupt, "neither the definition nor the files"},
		{"3.0", []string{"tpm3-00.permall"}, "", errs.ErrUnsupported, `version "3.0"`},
		{"2.0", []string{""}, "", errs.ErrCorrupt, "invalid file name"},
	} {
		got, err := tpmSubdir(c.version, c.names)
		if got != c.want || (c.err == nil) != (err == nil) || (c.err != nil && (!errors.Is(err, c.err) || !strings.Contains(err.Error(), c.msg))) {
			t.Errorf("tpmSubdir(%q, %q) = %q, %v; want %q, %v saying %q", c.version, c.names, got, err, c.want, c.err, c.msg)
		}
	}
}

// TestSWTPMOwner: qemu.conf's swtpm_user and swtpm_group (names, +UID, a
// trailing comment), commented-out lines ignored, libvirt's default tss
// (root without one), an unknown user refused naming the file.
func TestSWTPMOwner(t *testing.T) {
	tssUID, tssGID := 0, 0
	if u, err := user.Lookup("tss"); err == nil {
		tssUID, _ = strconv.Atoi(u.Uid)
	}
	if g, err := user.LookupGroup("tss"); err == nil {
		tssGID, _ = strconv.Atoi(g.Gid)
	}
	dir := t.TempDir()
	for _, c := range []struct {
		name, conf string
		uid, gid   int
		msg        string
	}{
		{"missing file", "", tssUID, tssGID, ""},
		{"commented out", "#swtpm_user = \"root\"\n# swtpm_group = \"root\"\n", tssUID, tssGID, ""},
		{"names", "swtpm_user = \"root\"\nswtpm_group=\"root\" # a comment\n", 0, 0, ""},
		{"numbers", "swtpm_user = \"+4242\"\nswtpm_group = \"+4343\"\n", 4242, 4343, ""},
		{"unknown user", "swtpm_user = \"vmshadow-no-such-user\"\n", 0, 0, `swtpm_user "vmshadow-no-such-user"`},
		{"unquoted", "swtpm_user = root\n", 0, 0, "not a quoted name"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, c.name+".conf")
			if c.conf != "" {
				os.WriteFile(path, []byte(c.conf), 0o644)
			}
			uid, gid, err := swtpmOwner(path)
			if c.msg != "" {
				if !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), c.msg) || !strings.Contains(err.Error(), path) {
					t.Fatalf("error %v, want ErrUsage naming %s and saying %q", err, path, c.msg)
				}
				return
			}
			if err != nil || uid != c.uid || gid != c.gid {
				t.Fatalf("swtpmOwner = %d, %d, %v; want %d, %d", uid, gid, err, c.uid, c.gid)
			}
		})
	}
}
