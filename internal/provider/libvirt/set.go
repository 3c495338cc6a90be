package libvirt

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"html"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/nbdsource"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/tracking"
)

// maxSocketPath is the longest UNIX socket path the kernel accepts.
const maxSocketPath = 107

// state is the provider's journal record of a set.
type state struct {
	URI        string      `json:"uri"`
	Domain     string      `json:"domain_uuid"`
	DomainName string      `json:"domain"`
	Dir        string      `json:"dir"`        // the set's directory: scratch files and socket
	Socket     string      `json:"nbd_socket"` // libvirt's NBD server
	Begun      bool        `json:"begun"`      // virDomainBackupBegin was (or is about to be) called
	Disks      []diskState `json:"disks"`
	// Checkpoint is created at the instant; Incremental is the base the
	// changes are read against. Done: the backup reading the set succeeded,
	// the checkpoint stays (and supersedes Incremental).
	Checkpoint  string `json:"checkpoint,omitempty"`
	Incremental string `json:"incremental,omitempty"`
	Done        bool   `json:"done,omitempty"`
	// Storing: the backup's manifest is being written; without Done the
	// repository may or may not name Checkpoint, so Release keeps it and
	// Incremental (see Storing).
	Storing bool `json:"storing,omitempty"`
	// Stale are the repository's other checkpoints (of a broken chain):
	// deleted once the backup is stored (Done), kept until then.
	Stale []string `json:"stale,omitempty"`
}

type diskState struct {
	Disk
	Scratch     string `json:"scratch"`
	Incremental bool   `json:"incremental,omitempty"` // exported with the dirty bitmap since the base
	FullReason  string `json:"full_reason,omitempty"`
}

// ExportBitmap is the name of the dirty bitmap exported with a disk's
// shadow copy in an incremental set (libvirt's default, named explicitly):
// its NBD metadata context is qemu:dirty-bitmap:backup-<target>.
func ExportBitmap(target string) string { return "backup-" + target }

// Prepare implements coord.Provider: it checks that the domain has no
// backup or other job, plans change tracking, and makes the set's
// directory. Nothing touches the guest.
func (p *Provider) Prepare(ctx context.Context, set *coord.Set, rec coord.Recorder) error {
	if _, err := p.connect(ctx); err != nil {
		return err
	}
	if err := p.scan(ctx); err != nil { // fresh: a recover may have run since Identify
		return err
	}
	if len(p.leftovers) > 0 {
		return fmt.Errorf("domain %s carries an earlier vmshadow snapshot set (%s): run 'vmshadow recover --libvirt %s --vm %s': %w",
			p.dom.Name, strings.Join(p.leftovers, ", "), p.shownURI(), p.dom.Name, errs.ErrBusy)
	}
	if err := p.checkNoJob(ctx); err != nil {
		return err
	}
	if len(p.disks) == 0 {
		what := "no disks"
		if len(p.skipped) > 0 {
			what = "no writable disk (skipped: " + strings.Join(p.skipped, ", ") + ")"
		}
		return fmt.Errorf("domain %s has %s: nothing to snapshot: %w", p.dom.Name, what, errs.ErrNotFound)
	}
	for _, s := range p.skipped {
		p.warn("not captured: %s", s)
	}
	if !p.local() {
		return fmt.Errorf("libvirt at %s is on another host: its NBD exports are on a UNIX socket there, which vmshadow cannot read from here yet; run vmshadow on the libvirt host: %w", p.shownURI(), errs.ErrUnsupported)
	}
	dir, err := filepath.Abs(p.opts.ScratchDir)
	if err != nil {
		return err
	}
	if err := checkScratch(dir, p.disks, set, p.warn); err != nil {
		return err
	}
	st := &state{URI: p.opts.URI, Domain: uuidString(p.dom.UUID), DomainName: p.dom.Name,
		Dir: filepath.Join(dir, Prefix+set.ID)}
	st.Socket = filepath.Join(st.Dir, "nbd.sock")
	if len(st.Socket) > maxSocketPath {
		return fmt.Errorf("NBD socket path %s is longer than %d bytes: choose a shorter --scratch-dir: %w", st.Socket, maxSocketPath, errs.ErrUsage)
	}
	for _, d := range p.disks {
		st.Disks = append(st.Disks, diskState{Disk: d, Scratch: filepath.Join(st.Dir, d.Target+".scratch")})
	}
	if r := p.opts.Tracking; r != nil {
		if err := p.planCheckpoint(ctx, set, st, r); err != nil {
			return fmt.Errorf("change tracking: %w", err)
		}
	}
	// Everything the set may create is named in the journal first.
	if err := rec.Record(set, st); err != nil {
		return err
	}
	if err := os.Mkdir(st.Dir, 0o700); err != nil {
		return fmt.Errorf("create the set's directory: %w", err)
	}
	// libvirt runs QEMU as an unprivileged user (qemu.conf's user, the live
	// XML's DAC label) and QEMU creates the NBD socket itself: hand it the
	// directory. libvirt creates and labels the scratch files.
	if uid, gid, ok := p.live.qemuDAC(); ok && os.Geteuid() == 0 {
		if err := os.Chown(st.Dir, uid, gid); err != nil {
			return fmt.Errorf("give the set's directory %s to QEMU's user %d:%d: %w", st.Dir, uid, gid, err)
		}
	}
	return nil
}

// checkScratch makes sure dir exists and has room for the diff area.
func checkScratch(dir string, disks []Disk, set *coord.Set, warn func(string, ...any)) error {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return fmt.Errorf("scratch dir %s: %w (choose a writable --scratch-dir): %w", dir, err, errs.ErrUsage)
	}
	var need int64
	for _, d := range disks {
		need += d.Size
	}
	msg, err := coord.CheckScratch(dir, need, "libvirt fails the backup job")
	if err != nil {
		return err
	}
	if msg != "" {
		set.Warnings = append(set.Warnings, msg)
		warn("%s", msg)
	}
	return nil
}

// checkNoJob fails with errs.ErrBusy when the domain runs a job (another
// tool's backup, a migration): libvirt runs one at a time.
func (p *Provider) checkNoJob(ctx context.Context) error {
	job, err := p.backupJob(ctx)
	if err != nil {
		return err
	}
	if job != nil {
		return fmt.Errorf("domain %s already has %s (started by another tool, e.g. virtnbdbackup); libvirt runs one backup job at a time: wait for it or abort it with 'virsh domjobabort %s': %w",
			p.dom.Name, job.describe(), p.dom.Name, errs.ErrBusy)
	}
	l, dom := p.l, p.dom
	typ, params, err := call2(ctx, func() (int32, []golibvirt.TypedParam, error) { return l.DomainGetJobStats(dom, 0) })
	if err != nil {
		return fmt.Errorf("domain %s: get job: %w", dom.Name, classify(err))
	}
	if golibvirt.DomainJobType(typ) == golibvirt.DomainJobBounded || golibvirt.DomainJobType(typ) == golibvirt.DomainJobUnbounded {
		op := "a job"
		for _, tp := range params {
			if tp.Field == golibvirt.DomainJobOperationStr {
				if v, ok := tp.Value.I.(int32); ok {
					op = "a " + jobOperation(v) + " job"
				}
			}
		}
		return fmt.Errorf("domain %s is running %s; libvirt runs one job at a time: wait for it to finish: %w", dom.Name, op, errs.ErrBusy)
	}
	return nil
}

func jobOperation(v int32) string {
	names := []string{"unknown", "start", "save", "restore", "incoming migration", "outgoing migration",
		"snapshot", "snapshot revert", "dump", "backup", "snapshot delete"}
	if v >= 0 && int(v) < len(names) {
		return names[v]
	}
	return fmt.Sprintf("type-%d", v)
}

// checkpointXML is the part of a checkpoint definition vmshadow reads.
type checkpointXML struct {
	Name   string `xml:"name"`
	Parent struct {
		Name string `xml:"name"`
	} `xml:"parent"`
	Disks []struct {
		Name       string `xml:"name,attr"`
		Checkpoint string `xml:"checkpoint,attr"`
		Bitmap     string `xml:"bitmap,attr"`
	} `xml:"disks>disk"`
}

// planCheckpoint decides, per disk, whether its changes since its previous
// checkpoint can be read (a disk without persistent bitmaps never is; then
// the common reasons of r; then the checkpoint missing, pruned or not
// covering the disk),
// names the set's checkpoint, and notes the repository's other checkpoints
// (of a broken chain), deleted once the backup is stored.
func (p *Provider) planCheckpoint(ctx context.Context, set *coord.Set, st *state, r *tracking.Request) error {
	if r.Prefix == "" || !strings.HasPrefix(r.Prefix, Prefix) {
		return fmt.Errorf("checkpoint prefix %q must start with %q: %w", r.Prefix, Prefix, errs.ErrUsage)
	}
	st.Checkpoint = r.Prefix + "-" + set.ID
	names, err := p.Checkpoints(ctx)
	if err != nil {
		return err
	}
	ours := map[string]bool{}
	for _, n := range names {
		if strings.HasPrefix(n, r.Prefix+"-") {
			ours[n] = true
		}
	}
	// One backup job has one base: the previous checkpoint of the first
	// disk that has one (all disks share their set's checkpoint).
	base := ""
	for _, d := range st.Disks {
		if prev := r.Previous[d.Target].Checkpoint; prev != "" && r.Reason(d.Target, d.Size) == "" && d.Bitmaps {
			base = prev
			break
		}
	}
	lost := "" // why a checkpoint libvirt lost could not be put back
	if base != "" && !ours[base] && r.Saved != nil {
		if err := p.redefine(ctx, base, r.Saved); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			lost = err.Error()
		} else {
			ours[base] = true
		}
	}
	var baseXML *checkpointXML
	if base != "" && ours[base] {
		x, err := p.CheckpointXML(ctx, base)
		switch {
		case errors.Is(err, errs.ErrNotFound):
			delete(ours, base)
		case err != nil:
			return err
		default:
			baseXML = &checkpointXML{}
			if err := xml.Unmarshal([]byte(x), baseXML); err != nil {
				return fmt.Errorf("parse checkpoint %s: %v: %w", base, err, errs.ErrCorrupt)
			}
		}
	}
	other := ""
	for n := range ours {
		if n != base {
			st.Stale = append(st.Stale, n)
			other = n
		}
	}
	sort.Strings(st.Stale)
	for i := range st.Disks {
		d := &st.Disks[i]
		prev := r.Previous[d.Target].Checkpoint
		reason := r.Reason(d.Target, d.Size)
		switch {
		case !d.Bitmaps:
			reason = fmt.Sprintf("disk %s is %s without persistent dirty bitmaps (qcow2 v3 needed): read in full each time", d.Target, d.Format)
		case reason != "":
		case prev != base:
			reason = fmt.Sprintf("disk %s tracks changes since checkpoint %s, the other disks since %s: one backup job reads from one checkpoint", d.Target, prev, base)
		case baseXML == nil && other != "":
			reason = tracking.Pruned("checkpoint", other, prev)
		case baseXML == nil && lost != "":
			reason = fmt.Sprintf("checkpoint %s is missing from libvirt (the domain was undefined and defined again, or moved host) and could not be redefined from the last backup's copy: %s", prev, lost)
		case baseXML == nil:
			reason = fmt.Sprintf("checkpoint %s is missing from libvirt (the domain was undefined and defined again, or moved host, and the checkpoint was not redefined; or it was deleted)", prev)
		default:
			in := false
			for _, bd := range baseXML.Disks {
				if bd.Name == d.Target && bd.Checkpoint == "bitmap" {
					in = true
				}
			}
			if !in {
				reason = fmt.Sprintf("disk %s has no bitmap in checkpoint %s", d.Target, base)
			}
		}
		d.FullReason = reason
		if reason == "" {
			d.Incremental = true
			st.Incremental = base
		}
	}
	return nil
}

// redefine puts back checkpoint name, which libvirt lost, from the
// definition the repository's last backup stored (saved). It fails when
// that backup stored none, stored another checkpoint's, or the disks no
// longer hold the checkpoint's bitmaps (REDEFINE_VALIDATE).
func (p *Provider) redefine(ctx context.Context, name string, saved func(context.Context, string) ([]byte, error)) error {
	b, err := saved(ctx, repo.FileCheckpointXML)
	if err != nil {
		return fmt.Errorf("the backup's copy cannot be read: %w", err)
	}
	var cp struct {
		Name   string `xml:"name"`
		Parent struct {
			Name string `xml:"name"`
		} `xml:"parent"`
	}
	if err := xml.Unmarshal(b, &cp); err != nil {
		return fmt.Errorf("the backup's copy is not checkpoint XML: %v", err)
	}
	if cp.Name != name {
		return fmt.Errorf("the backup stored the definition of checkpoint %q, not %q", cp.Name, name)
	}
	def := string(b)
	if cp.Parent.Name != "" {
		// The copy was taken when the checkpoint was created; its parent
		// (the previous backup's) was deleted since, or lost with it.
		// libvirt refuses a missing parent: the checkpoint becomes a root.
		names, err := p.Checkpoints(ctx)
		if err != nil {
			return err
		}
		if !slices.Contains(names, cp.Parent.Name) {
			def = dropParent(def)
		}
	}
	if err := p.RedefineCheckpoint(ctx, def); err != nil {
		return err
	}
	p.warn("domain %s: checkpoint %s was missing from libvirt: redefined from the last backup's copy", p.dom.Name, name)
	return nil
}

// dropParent removes the <parent> element of a checkpoint definition (the
// first one, before the embedded <domain>, which has none).
func dropParent(def string) string {
	i := strings.Index(def, "<parent>")
	j := strings.Index(def, "</parent>")
	if d := strings.Index(def, "<domain "); i < 0 || j < i || d >= 0 && j > d {
		return def
	}
	return def[:i] + def[j+len("</parent>"):]
}

// backupXML builds the pull-mode backup definition of the set.
func (st *state) backupXML() string {
	var b strings.Builder
	b.WriteString("<domainbackup mode='pull'>\n")
	if st.Incremental != "" {
		fmt.Fprintf(&b, "  <incremental>%s</incremental>\n", html.EscapeString(st.Incremental))
	}
	fmt.Fprintf(&b, "  <server transport='unix' socket='%s'/>\n  <disks>\n", html.EscapeString(st.Socket))
	for _, d := range st.Disks {
		mode := ""
		if st.Incremental != "" {
			if d.Incremental {
				mode = fmt.Sprintf(" backupmode='incremental' incremental='%s' exportbitmap='%s'", html.EscapeString(st.Incremental), ExportBitmap(d.Target))
			} else {
				mode = " backupmode='full'"
			}
		}
		fmt.Fprintf(&b, "    <disk name='%s' backup='yes' type='file' exportname='%s'%s>\n      <scratch file='%s'/>\n    </disk>\n",
			d.Target, d.Target, mode, html.EscapeString(d.Scratch))
	}
	b.WriteString("  </disks>\n</domainbackup>\n")
	return b.String()
}

// checkpointDef builds the definition of the checkpoint created at the
// set's instant: a bitmap on every disk that can keep one.
func (st *state) checkpointDef(all []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "<domaincheckpoint>\n  <name>%s</name>\n  <description>vmshadow snapshot set</description>\n  <disks>\n", html.EscapeString(st.Checkpoint))
	with := map[string]bool{}
	for _, d := range st.Disks {
		if d.Bitmaps {
			with[d.Target] = true
		}
	}
	for _, t := range all {
		if with[t] {
			fmt.Fprintf(&b, "    <disk name='%s' checkpoint='bitmap'/>\n", t)
		} else {
			fmt.Fprintf(&b, "    <disk name='%s' checkpoint='no'/>\n", t)
		}
	}
	b.WriteString("  </disks>\n</domaincheckpoint>\n")
	return b.String()
}

// Commit implements coord.Provider: one virDomainBackupBegin starts every
// disk's pull-mode job and creates the checkpoint at one instant.
func (p *Provider) Commit(ctx context.Context, set *coord.Set, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("commit: no prepared state: %v", err)
	}
	st.Begun = true
	if err := rec.Record(set, st); err != nil {
		return err
	}
	var cpXML golibvirt.OptString
	if st.Checkpoint != "" {
		var all []string
		for _, d := range p.live.Devices.Disks {
			all = append(all, d.Target.Dev)
		}
		cpXML = golibvirt.OptString{st.checkpointDef(all)}
	}
	l, dom := p.l, p.dom
	if l == nil {
		return fmt.Errorf("commit: not connected to libvirt: %w", errs.ErrConnect)
	}
	bx := st.backupXML()
	if err := settle(ctx, func() error { return l.DomainBackupBegin(dom, bx, cpXML, 0) }); err != nil {
		return p.beginError(st, err)
	}
	crashpoint.Hit("libvirt-begun")
	return nil
}

// settleTimeout bounds the wait for a call that creates something to
// finish after its context ended.
const settleTimeout = time.Minute

// settle runs fn, a call that creates something. If ctx ends first (the
// freeze window), it still waits, bounded, for fn to finish before
// returning ctx's error: libvirt goes on with the call, and Release must
// find what it created rather than race it.
func settle(ctx context.Context, fn func() error) error {
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("%w (and the call failed: %v)", ctx.Err(), err)
		}
		return fmt.Errorf("%w (the call finished late)", ctx.Err())
	case <-time.After(settleTimeout):
		return fmt.Errorf("%w (and the call had not finished %s later)", ctx.Err(), settleTimeout)
	}
}

// beginError explains why virDomainBackupBegin failed.
func (p *Provider) beginError(st *state, err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "ermission denied"):
		return fmt.Errorf("begin backup job: %v: QEMU (running as libvirt's qemu user, confined by AppArmor or SELinux where enabled) may not create the NBD socket or scratch files in %s: choose a --scratch-dir QEMU may write (e.g. under /var/lib/libvirt/qemu), or allow it in the domain's security profile: %w",
			err, st.Dir, errs.ErrConnect)
	case strings.Contains(msg, "already exists") && strings.Contains(strings.ToLower(msg), "bitmap"):
		return fmt.Errorf("begin backup job: %v: QEMU still holds a bitmap of a checkpoint libvirt no longer knows (the domain was undefined and defined again, or moved host): redefine the checkpoint from its saved XML, or remove the bitmap: %w",
			err, errs.ErrBusy)
	case isCode(err, golibvirt.ErrOperationInvalid) && strings.Contains(msg, "job"):
		return fmt.Errorf("begin backup job: %v: %w", err, errs.ErrBusy)
	}
	return fmt.Errorf("begin backup job: %w", classify(err))
}

// Expose implements coord.Provider: libvirt's NBD server already serves
// the shadow copies; Expose checks the job and fills set.Shadows.
func (p *Provider) Expose(ctx context.Context, set *coord.Set, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("expose: no prepared state: %v", err)
	}
	job, err := p.backupJob(ctx)
	if err != nil {
		return err
	}
	if job == nil || job.Server.Socket != st.Socket {
		return fmt.Errorf("domain %s: the backup job of set %s is gone (the domain stopped, or someone aborted it)", p.dom.Name, set.ID)
	}
	set.Shadows = nil
	for i, d := range st.Disks {
		sh := coord.Shadow{
			ID: fmt.Sprintf("%s-%d", set.ID, i), Disk: d.Target, Node: d.Target, Size: d.Size,
			NBD:        "nbd+unix:///" + url.PathEscape(d.Target) + "?socket=" + st.Socket,
			Checkpoint: st.Checkpoint, FullReason: d.FullReason,
		}
		if d.Incremental {
			sh.Bitmap = ExportBitmap(d.Target)
		}
		set.Shadows = append(set.Shadows, sh)
	}
	return rec.Record(set, st)
}

// Alive implements coord.Provider: the set is alive while its backup job is.
func (p *Provider) Alive(ctx context.Context, set *coord.Set) (bool, error) {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return false, err
	}
	job, err := p.backupJob(ctx)
	if notRunning(err) {
		return false, nil // the domain stopped: its job is gone
	}
	if err != nil {
		return false, err
	}
	return job != nil && job.Server.Socket == st.Socket, nil
}

// Complete implements livebackup.Provider: it records that the backup
// reading the set succeeded and its manifest is durable. Release then keeps
// the set's checkpoint and deletes the base it supersedes (and the
// repository's stale checkpoints). Without this call Release deletes the
// set's checkpoint (the base's bitmap still holds every change since the
// base), so the next backup reads every change since the last one stored.
func (p *Provider) Complete(set *coord.Set, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("complete checkpoint: no state: %v", err)
	}
	st.Done = true
	return rec.Record(set, st)
}

// Storing implements livebackup.Storer: it notes that the backup reading
// the set is writing its manifest (storing), or did not after all. A set
// released with Storing but not Done (the process died between the
// manifest and Complete, or while writing the manifest) keeps its
// checkpoint and the base it would supersede: the next backup continues
// from whichever the repository's latest backup names (an incremental from
// the base reads the set's changes too, libvirt merging every later
// checkpoint's bitmap into it) and deletes the other once stored.
func (p *Provider) Storing(set *coord.Set, storing bool, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("note the manifest: no state: %v", err)
	}
	if st.Storing == storing {
		return nil
	}
	st.Storing = storing
	return rec.Record(set, st)
}

// Idle implements livebackup.Provider: the libvirt connection is not held
// while the shadow copies are read; Release reconnects.
func (p *Provider) Idle() { p.Close() }

// Open implements livebackup.Provider: it opens a shadow copy over
// libvirt's NBD server (sh.NBD, nbd+unix). With incremental, ranges the
// exported bitmap (qemu:dirty-bitmap:backup-<target>) does not mark are
// unchanged; otherwise every allocated range is read.
func (p *Provider) Open(ctx context.Context, sh coord.Shadow, incremental bool, conns int) (tracking.Source, error) {
	return nbdsource.OpenShadow(ctx, sh, incremental, conns,
		"the shadow copy is broken if its scratch file filled up or failed: give the set more scratch space with --scratch-dir")
}
