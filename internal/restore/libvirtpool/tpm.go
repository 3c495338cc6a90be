package libvirtpool

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmshadow/vmshadow/internal/errs"
	lv "github.com/vmshadow/vmshadow/internal/provider/libvirt"
	"github.com/vmshadow/vmshadow/internal/repo"
)

// Where libvirt's swtpm keeps TPM state and where its user is configured
// (variables for the unit tests of swtpmOwner).
var (
	swtpmRoot = lv.SWTPMStateDir
	qemuConf  = "/etc/libvirt/qemu.conf"
)

// tpmPlan is where the restore puts back the stored TPM state: as libvirt
// 9.0 (src/qemu/qemu_tpm.c) lays it out for a domain it starts, so that it
// finds the state and does not manufacture a new TPM (it runs swtpm_setup
// only when the state directory is missing or empty):
// SWTPMStateDir/UUID (mode 0711, root's) / tpm2 or tpm1.2 (0700, swtpm's
// user and group) / swtpm's files (0600, swtpm's user and group).
type tpmPlan struct {
	uuid        string // the new domain's UUID, chosen by the restore
	dir         string // swtpmRoot/uuid, removed by Abort
	sub         string // "tpm2" or "tpm1.2"
	uid, gid    int    // swtpm's user and group
	rootCreated bool   // swtpmRoot did not exist and was created
	created     bool   // dir was created
}

// state is the directory that holds the state files.
func (p *tpmPlan) state() string { return filepath.Join(p.dir, p.sub) }

// tpmSubdir is libvirt's directory for the state of an emulated TPM of
// version (the definition's <backend version>, "" if it says none), as
// the stored files' names show it too: swtpm names TPM 2.0 state
// tpm2-00.*, TPM 1.2 state tpm-00.*. Files that disagree with the
// definition, or with each other, are refused.
func tpmSubdir(version string, names []string) (string, error) {
	state := ""
	for _, n := range names {
		if err := repo.ValidName("file", n); err != nil {
			return "", fmt.Errorf("stored TPM state: %v: %w", err, errs.ErrCorrupt)
		}
		v := ""
		switch {
		case strings.HasPrefix(n, "tpm2-"):
			v = "2.0"
		case strings.HasPrefix(n, "tpm-"):
			v = "1.2"
		default:
			continue
		}
		if state != "" && v != state {
			return "", fmt.Errorf("stored TPM state mixes TPM 1.2 and TPM 2.0 files (%s): %w", strings.Join(names, ", "), errs.ErrCorrupt)
		}
		state = v
	}
	switch {
	case version == "" && state == "":
		return "", fmt.Errorf("stored TPM state (%s): neither the definition nor the files say whether it is a TPM 1.2 or 2.0: %w", strings.Join(names, ", "), errs.ErrCorrupt)
	case version == "":
		version = state
	case state != "" && state != version:
		return "", fmt.Errorf("stored TPM state is a TPM %s's (%s), but the stored definition's TPM is version %s: %w", state, strings.Join(names, ", "), version, errs.ErrCorrupt)
	}
	switch version {
	case "2.0":
		return "tpm2", nil
	case "1.2":
		return "tpm1.2", nil
	}
	return "", fmt.Errorf("the stored definition's emulated TPM has version %q, which vmshadow cannot put state back for (1.2 or 2.0): %w", version, errs.ErrUnsupported)
}

// swtpmOwner is the user and group libvirt runs swtpm as: swtpm_user and
// swtpm_group of its qemu.conf at conf, by default tss (root when the
// system has no tss), as libvirt's qemu_conf.c decides.
func swtpmOwner(conf string) (uid, gid int, err error) {
	userName, groupName := "", ""
	f, err := os.Open(conf)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, 0, fmt.Errorf("read libvirt's %s (swtpm_user): %w", conf, err)
	}
	if err == nil {
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), "=")
			k = strings.TrimSpace(k)
			if !ok || (k != "swtpm_user" && k != "swtpm_group") {
				continue
			}
			// virConf: key = "value", a comment may follow
			v = strings.TrimSpace(v)
			end := strings.IndexByte(v[min(1, len(v)):], '"')
			if !strings.HasPrefix(v, `"`) || end < 0 {
				return 0, 0, fmt.Errorf("%s: %s = %s: not a quoted name: %w", conf, k, v, errs.ErrUsage)
			}
			s := v[1 : end+1]
			if k == "swtpm_user" {
				userName = s
			} else {
				groupName = s
			}
		}
		if err := sc.Err(); err != nil {
			return 0, 0, fmt.Errorf("read %s: %w", conf, err)
		}
	}
	id := func(what, name string, lookup func(string) (string, error)) (int, error) {
		if name == "" { // libvirt's default: tss, else root
			s, err := lookup("tss")
			if err != nil {
				return 0, nil
			}
			return strconv.Atoi(s)
		}
		if n, ok := strings.CutPrefix(name, "+"); ok {
			if i, err := strconv.Atoi(n); err == nil && i >= 0 {
				return i, nil
			}
		}
		s, err := lookup(name)
		if err != nil {
			return 0, fmt.Errorf("%s: swtpm_%s %q: %v (libvirt could not start the TPM either): %w", conf, what, name, err, errs.ErrUsage)
		}
		return strconv.Atoi(s)
	}
	if uid, err = id("user", userName, func(n string) (string, error) {
		u, err := user.Lookup(n)
		if err != nil {
			return "", err
		}
		return u.Uid, nil
	}); err != nil {
		return 0, 0, err
	}
	if gid, err = id("group", groupName, func(n string) (string, error) {
		g, err := user.LookupGroup(n)
		if err != nil {
			return "", err
		}
		return g.Gid, nil
	}); err != nil {
		return 0, 0, err
	}
	return uid, gid, nil
}

// newUUID is a random (version 4) UUID.
func newUUID() (golibvirt.UUID, string) {
	var u golibvirt.UUID
	rand.Read(u[:])
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return u, uuidString(u)
}

// planTPM prepares putting back the stored TPM state: its directory from
// the definition's TPM version and the files, swtpm's owner, and a new
// UUID for the domain that no domain and no TPM state directory has.
func (t *Target) planTPM(ctx context.Context) error {
	sub, err := tpmSubdir(t.info.TPMVersion, slices.Sorted(maps.Keys(t.o.TPMState)))
	if err != nil {
		return err
	}
	uid, gid, err := swtpmOwner(qemuConf)
	if err != nil {
		return err
	}
	p := &tpmPlan{sub: sub, uid: uid, gid: gid}
	for tries := 0; p.uuid == ""; tries++ {
		if tries == 10 {
			return fmt.Errorf("found no free domain UUID for the restored TPM state in %s", swtpmRoot)
		}
		u, s := newUUID()
		_, err := lv.Call(ctx, func() (golibvirt.Domain, error) { return t.l.DomainLookupByUUID(u) })
		if err == nil {
			continue
		} else if code(err) != golibvirt.ErrNoDomain {
			return fmt.Errorf("look up domain UUID %s: %w", s, lv.Classify(err))
		}
		if _, err := os.Lstat(filepath.Join(swtpmRoot, s)); !errors.Is(err, fs.ErrNotExist) {
			continue
		}
		p.uuid, p.dir = s, filepath.Join(swtpmRoot, s)
	}
	t.tpm = p
	return nil
}

// writeTPM writes the stored TPM state where libvirt's swtpm finds it for
// the new domain's UUID. The directory must not exist; whatever is
// created is recorded for removeTPM.
func (t *Target) writeTPM() error {
	p := t.tpm
	fail := func(what string, err error) error {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("%s: %w: vmshadow writes the TPM state where libvirt keeps it: run it as root: %w", what, err, errs.ErrUsage)
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	if _, err := os.Stat(swtpmRoot); errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(swtpmRoot, 0o711); err != nil {
			return fail("create libvirt's TPM state directory "+swtpmRoot, err)
		}
		p.rootCreated = true
		if err := os.Chmod(swtpmRoot, 0o711); err != nil {
			return fail("create libvirt's TPM state directory "+swtpmRoot, err)
		}
	}
	if err := os.Mkdir(p.dir, 0o711); err != nil {
		return fail("create the new domain's TPM state directory", err)
	}
	p.created = true
	dir := p.state()
	if err := os.Chmod(p.dir, 0o711); err != nil {
		return fail("create the new domain's TPM state directory", err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fail("create the new domain's TPM state directory", err)
	}
	if err := os.Chown(dir, p.uid, p.gid); err != nil {
		return fail("give the TPM state directory to swtpm's user", err)
	}
	for _, name := range slices.Sorted(maps.Keys(t.o.TPMState)) {
		path := filepath.Join(dir, name)
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return fail("write TPM state", err)
		}
		_, err = f.Write(t.o.TPMState[name])
		if err == nil {
			err = f.Chown(p.uid, p.gid)
		}
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fail("write TPM state "+path, err)
		}
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// removeTPM removes what writeTPM created.
func (t *Target) removeTPM() {
	p := t.tpm
	if p == nil {
		return
	}
	if p.created {
		if err := os.RemoveAll(p.dir); err != nil {
			t.warn("remove TPM state %s after the failed restore: %v", p.dir, err)
		} else {
			p.created = false
		}
	}
	if p.rootCreated {
		os.Remove(swtpmRoot) // only if nothing else is in it
		p.rootCreated = false
	}
}
