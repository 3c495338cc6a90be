// Package xenpool is the restore target of a XenServer / XCP-ng pool: each
// disk of a backup becomes a new VDI on a storage repository, uploaded
// through XAPI (import_raw_vdi: only the stored chunks on SRs whose new
// VDIs read as zeros), optionally attached to a new halted VM; a failed
// restore destroys every VDI and VM it created. Package restore selects
// the disks, loads and verifies their chunks and drives the Target.
package xenpool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
	api "github.com/vmshadow/vmshadow/internal/xapi"
)

// Options say where a backup's disks go on a pool.
type Options struct {
	// SR is the storage repository (name-label or UUID) of the new VDIs.
	SR string
	// VMName, if set, creates a halted VM with the restored disks, cloned
	// from Template (default "Other install media": BIOS boot, the
	// template's CPU and memory; no network interface).
	VMName   string
	Template string
}

// RestoredDisk is the outcome of one disk's restore.
type RestoredDisk struct {
	Name       string  `json:"name"`
	VDI        string  `json:"vdi"` // UUID of the new VDI
	Size       int64   `json:"size"`
	Userdevice string  `json:"userdevice,omitempty"`
	Sparse     bool    `json:"sparse_upload"` // only the stored chunks were sent
	BytesSent  int64   `json:"bytes_sent"`
	Verified   bool    `json:"verified"`
	Seconds    float64 `json:"duration_s"`
	restore.Stats
}

// Result is what a restore into the pool made.
type Result struct {
	SR    string         `json:"sr"` // UUID
	VM    string         `json:"vm_uuid,omitempty"`
	Disks []RestoredDisk `json:"disks"`
}

// zeroedSRTypes are the SR types whose new VDIs read as zeros (file-based
// and thin storage): uploads to them send only the stored chunks (the
// import's "chunked" format). On others (legacy LVM, thick arrays) a new
// VDI may hold old data, and the whole disk is sent.
var zeroedSRTypes = []string{"ext", "nfs", "smb", "file", "xfs", "zfs", "btrfs", "cephfs", "glusterfs", "moosefs", "gfs2"}

// Target implements restore.Target for an SR of a pool.
type Target struct {
	c        *api.Client
	m        *repo.Manifest
	opts     Options
	sr       string // ref
	rec      api.SR
	host     string // where uploads go ("" the master)
	hostCert string // its certificate, for a member host
	sparse   bool
	template string // ref, with VMName

	created []string // VDI refs, one per disk
	disks   []repo.ManifestDisk
	uploads []*uploader
	vdis    []string // UUIDs
	vmRef   string
	vm      string // UUID
}

// New logs in to the pool, finds the SR (and with opts.VMName the
// template, refusing a name a VM has) before anything is created. The
// backup's manifest m names the new VDIs. Restore into it with
// restore.Run, which ends it (Finish or Abort); if Run is not called,
// call Abort.
func New(ctx context.Context, pool api.Config, m *repo.Manifest, opts Options) (t *Target, err error) {
	c, err := api.Login(ctx, pool)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			c.Logout(context.WithoutCancel(ctx))
		}
	}()
	sr, rec, err := findSR(ctx, c, opts.SR)
	if err != nil {
		return nil, err
	}
	host, hostCert, err := uploadHost(ctx, c, rec)
	if err != nil {
		return nil, err
	}
	if opts.Template == "" {
		opts.Template = "Other install media"
	}
	t = &Target{c: c, m: m, opts: opts, sr: sr, rec: rec, host: host, hostCert: hostCert, sparse: slices.Contains(zeroedSRTypes, rec.Type)}
	if opts.VMName != "" {
		if t.template, err = checkVMName(ctx, c, opts.VMName, opts.Template); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// Create implements restore.Target: a new VDI of the disk's size on the
// SR, and the upload into it.
func (t *Target) Create(ctx context.Context, d repo.ManifestDisk, x *repo.Index) (restore.ImageWriter, string, error) {
	name := fmt.Sprintf("%s %s", t.m.VM, d.Name)
	desc := fmt.Sprintf("restored by vmshadow from backup of %s taken %s", t.m.VM, t.m.Time.Format(time.RFC3339))
	vdi, err := t.c.VDICreate(ctx, t.sr, name, desc, d.Size, nil)
	if err != nil {
		return nil, "", fmt.Errorf("create VDI on SR %s: %w", t.rec.NameLabel, err)
	}
	t.created = append(t.created, vdi)
	vr, err := t.c.VDIRecord(ctx, vdi)
	if err != nil {
		return nil, "", err
	}
	w := upload(ctx, t.c, t.host, t.hostCert, vdi, x, t.sparse)
	t.disks = append(t.disks, d)
	t.uploads = append(t.uploads, w)
	t.vdis = append(t.vdis, vr.UUID)
	return w, "VDI " + vr.UUID, nil
}

// Finish implements restore.Target: with Options.VMName, a halted VM with
// the disks.
func (t *Target) Finish(ctx context.Context) error {
	if t.opts.VMName == "" {
		t.c.Logout(ctx)
		return nil
	}
	var err error
	t.vmRef, err = t.c.RunAsync(ctx, "VM.clone", nil, t.template, t.opts.VMName)
	if err != nil {
		return fmt.Errorf("create VM %s from template %s: %w", t.opts.VMName, t.opts.Template, err)
	}
	if err := t.c.Call(ctx, "VM.set_is_a_template", nil, t.vmRef, false); err != nil {
		return fmt.Errorf("create VM %s: %w", t.opts.VMName, err)
	}
	for i, d := range t.disks {
		if _, err := t.c.VBDCreate(ctx, t.vmRef, t.created[i], userdevice(t.disks, i), i == 0); err != nil {
			return fmt.Errorf("attach disk %s to VM %s: %w", d.Name, t.opts.VMName, err)
		}
	}
	vr, err := t.c.VMRecord(ctx, t.vmRef)
	if err != nil {
		return err
	}
	t.vm = vr.UUID
	t.c.Logout(ctx)
	return nil
}

// Abort implements restore.Target: every VDI and VM the restore created is
// destroyed.
func (t *Target) Abort(ctx context.Context) {
	if t.vmRef != "" {
		t.c.Call(ctx, "VM.destroy", nil, t.vmRef)
	}
	for _, v := range t.created {
		t.c.RunAsync(ctx, "VDI.destroy", nil, v)
	}
	t.c.Logout(ctx)
}

// Result says what the restore made, from restore.Run's results.
func (t *Target) Result(res []restore.DiskResult) *Result {
	out := &Result{SR: t.rec.UUID, VM: t.vm}
	for i, d := range res {
		rd := RestoredDisk{Name: d.Name, VDI: t.vdis[i], Size: d.Size, Sparse: t.sparse, BytesSent: t.uploads[i].sent,
			Verified: d.Verified, Seconds: d.Seconds, Stats: d.Stats}
		if t.vm != "" {
			rd.Userdevice = userdevice(t.disks, i)
		}
		out.Disks = append(out.Disks, rd)
	}
	return out
}

// findSR finds an SR by UUID or name-label.
func findSR(ctx context.Context, c *api.Client, want string) (string, api.SR, error) {
	if want == "" {
		return "", api.SR{}, fmt.Errorf("no storage repository: give --sr NAME|UUID: %w", errs.ErrUsage)
	}
	var refs []string
	if api.LooksLikeUUID(want) {
		ref, err := c.SRByUUID(ctx, want)
		if err == nil {
			refs = []string{ref}
		} else if !api.IsGone(err) {
			return "", api.SR{}, err
		}
	}
	if refs == nil {
		var err error
		if refs, err = c.SRsByName(ctx, want); err != nil {
			return "", api.SR{}, err
		}
	}
	switch len(refs) {
	case 0:
		return "", api.SR{}, fmt.Errorf("no storage repository named or with UUID %q on pool %s: %w", want, c.Host(), errs.ErrNotFound)
	case 1:
		rec, err := c.SRRecord(ctx, refs[0])
		if err != nil {
			return "", api.SR{}, err
		}
		if rec.ContentType == "iso" {
			return "", api.SR{}, fmt.Errorf("storage repository %q holds ISO images, not disks: %w", want, errs.ErrUsage)
		}
		return refs[0], rec, nil
	}
	var uuids []string
	for _, ref := range refs {
		if rec, err := c.SRRecord(ctx, ref); err == nil {
			uuids = append(uuids, rec.UUID)
		}
	}
	return "", api.SR{}, fmt.Errorf("%d storage repositories are named %q (UUIDs %s): give the UUID with --sr: %w", len(refs), want, strings.Join(uuids, ", "), errs.ErrUsage)
}

// uploadHost is "" (the pool master) for a shared SR, else the address of
// the host that has the SR attached, and that host's certificate as the
// master reports it (host.get_server_certificate): the master would
// redirect an upload into a local SR of another host there
// (import_raw_vdi.ml via importexport.ml's return_302_redirect), which a
// streamed upload cannot follow, and each host has its own certificate.
func uploadHost(ctx context.Context, c *api.Client, sr api.SR) (string, string, error) {
	if sr.Shared {
		return "", "", nil
	}
	for _, ref := range sr.PBDs {
		var pbd struct {
			Host     string `json:"host"`
			Attached bool   `json:"currently_attached"`
		}
		if err := c.Call(ctx, "PBD.get_record", &pbd, ref); err != nil {
			return "", "", err
		}
		if !pbd.Attached {
			continue
		}
		var h struct {
			Address string `json:"address"`
		}
		if err := c.Call(ctx, "host.get_record", &h, pbd.Host); err != nil {
			return "", "", err
		}
		var cert string
		if err := c.Call(ctx, "host.get_server_certificate", &cert, pbd.Host); err != nil {
			return "", "", fmt.Errorf("certificate of host %s: %w", h.Address, err)
		}
		// Members listen on the same port as the master.
		if _, port, err := net.SplitHostPort(c.Host()); err == nil {
			return net.JoinHostPort(h.Address, port), cert, nil
		}
		return h.Address, cert, nil
	}
	return "", "", fmt.Errorf("storage repository %s is not attached to any host: %w", sr.NameLabel, errs.ErrUnsupported)
}

// checkVMName refuses a name a VM already has and finds the template.
func checkVMName(ctx context.Context, c *api.Client, name, template string) (string, error) {
	refs, err := c.VMsByName(ctx, name)
	if err != nil {
		return "", err
	}
	for _, ref := range refs {
		if r, err := c.VMRecord(ctx, ref); err == nil && !r.IsASnapshot {
			return "", fmt.Errorf("a VM or template named %q exists on pool %s: choose another --vm-name: %w", name, c.Host(), errs.ErrUsage)
		}
	}
	refs, err = c.VMsByName(ctx, template)
	if err != nil {
		return "", err
	}
	for _, ref := range refs {
		if r, err := c.VMRecord(ctx, ref); err == nil && r.IsATemplate {
			return ref, nil
		}
	}
	return "", fmt.Errorf("no template named %q on pool %s to create the VM from: %w", template, c.Host(), errs.ErrNotFound)
}

// userdevice is the position of disk i: see userdevices.
func userdevice(disks []repo.ManifestDisk, i int) string { return userdevices(disks)[i] }

// userdevices places the disks: xvdX names keep their position, others
// take the free positions in order.
func userdevices(disks []repo.ManifestDisk) []string {
	out := make([]string, len(disks))
	used := map[int]bool{}
	for i, d := range disks {
		if n, ok := strings.CutPrefix(d.Name, "xvd"); ok && len(n) == 1 && n[0] >= 'a' && n[0] <= 'z' && !used[int(n[0]-'a')] {
			out[i] = strconv.Itoa(int(n[0] - 'a'))
			used[int(n[0]-'a')] = true
		}
	}
	next := 0
	for i := range out {
		if out[i] != "" {
			continue
		}
		for used[next] || next == 3 { // 3 is where XenServer puts the CD drive
			next++
		}
		out[i] = strconv.Itoa(next)
		used[next] = true
	}
	return out
}

// upload starts streaming a disk of index x into the VDI and returns the
// writer restore.Run writes the disk into (in order, every chunk
// verified): it turns the writes into the import's body.
func upload(ctx context.Context, c *api.Client, host, hostCert, vdi string, x *repo.Index, sparse bool) *uploader {
	ctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	w := &uploader{pw: pw, size: x.Size(), chunked: sparse, done: make(chan error, 1), cancel: cancel}
	length := x.Size()
	if sparse {
		for i := range x.Len() {
			if !x.ID(i).IsZero() {
				off, n := x.Range(i)
				w.frames = append(w.frames, frame{off, n})
			}
		}
		length = int64(len(w.frames)+1) * frameHeader
		for _, f := range w.frames {
			length += f.n
		}
	}
	w.length = length
	go func() {
		err := c.ImportRaw(ctx, host, hostCert, vdi, length, sparse, pr)
		pr.CloseWithError(errUploadEnded{err})
		w.done <- err
	}()
	return w
}

// Abort implements restore.Aborter: the upload is cancelled.
func (u *uploader) Abort() {
	if u.closed {
		return
	}
	u.closed = true
	u.pw.CloseWithError(errors.New("restore failed"))
	u.cancel()
	<-u.done
}

// errUploadEnded is what writes get once the upload is over.
type errUploadEnded struct{ err error }

// Unwrap is the upload's error: a write that failed because the upload
// ended fails for the upload's reason.
func (e errUploadEnded) Unwrap() error { return e.err }

func (e errUploadEnded) Error() string {
	if e.err == nil {
		return "upload ended"
	}
	return "upload ended: " + e.err.Error()
}

const frameHeader = 12

type frame struct{ off, n int64 }

// uploader is a restore.ImageWriter whose output is an import_raw_vdi
// body: the raw disk with its holes filled with zeros, or, chunked, one
// frame per stored chunk (holes inside a chunk filled with zeros) and a
// zero frame at the end, exactly as long as announced.
type uploader struct {
	pw      *io.PipeWriter
	cancel  context.CancelFunc
	size    int64
	chunked bool
	frames  []frame
	length  int64
	done    chan error

	pos    int64 // raw: next offset; chunked: next offset inside the open frame
	cur    int   // chunked: index of the open frame, or of the next one when none is open
	open   bool
	sent   int64
	zeros  []byte
	closed bool
}

func (u *uploader) write(p []byte) error {
	n, err := u.pw.Write(p)
	u.sent += int64(n)
	return err
}

func (u *uploader) zero(n int64) error {
	if u.zeros == nil {
		u.zeros = make([]byte, 1<<20)
	}
	for n > 0 {
		m := min(n, int64(len(u.zeros)))
		if err := u.write(u.zeros[:m]); err != nil {
			return err
		}
		n -= m
	}
	return nil
}

func (u *uploader) header(off, n int64) error {
	var h [frameHeader]byte
	binary.LittleEndian.PutUint64(h[:8], uint64(off))
	binary.LittleEndian.PutUint32(h[8:], uint32(n))
	return u.write(h[:])
}

// closeFrame fills the open frame to its end.
func (u *uploader) closeFrame() error {
	if !u.open {
		return nil
	}
	f := u.frames[u.cur]
	if err := u.zero(f.off + f.n - u.pos); err != nil {
		return err
	}
	u.open = false
	u.cur++
	return nil
}

// openFrame opens the next frame, after sending the frames before it
// (chunks that brought no data, zero-filled) up to the one holding off.
func (u *uploader) openFrame(off int64) error {
	for u.cur < len(u.frames) {
		f := u.frames[u.cur]
		if err := u.header(f.off, f.n); err != nil {
			return err
		}
		u.open, u.pos = true, f.off
		if off < f.off+f.n {
			if off < f.off {
				return fmt.Errorf("restore wrote at offset %d, in a chunk the index says is zero", off)
			}
			return nil
		}
		if err := u.closeFrame(); err != nil {
			return err
		}
	}
	return fmt.Errorf("restore wrote at offset %d, past the last stored chunk", off)
}

// WriteAt implements restore.ImageWriter (offsets only increase).
func (u *uploader) WriteAt(p []byte, off int64) (int, error) {
	done := 0
	for len(p) > 0 {
		if !u.chunked {
			if off < u.pos || off+int64(len(p)) > u.size {
				return done, fmt.Errorf("restore wrote %d bytes at offset %d out of order", len(p), off)
			}
			if err := u.zero(off - u.pos); err != nil {
				return done, err
			}
			if err := u.write(p); err != nil {
				return done, err
			}
			u.pos = off + int64(len(p))
			return done + len(p), nil
		}
		if u.open && off >= u.frames[u.cur].off+u.frames[u.cur].n {
			if err := u.closeFrame(); err != nil {
				return done, err
			}
		}
		if !u.open {
			if err := u.openFrame(off); err != nil {
				return done, err
			}
		}
		f := u.frames[u.cur]
		if off < u.pos {
			return done, fmt.Errorf("restore wrote at offset %d out of order", off)
		}
		if err := u.zero(off - u.pos); err != nil {
			return done, err
		}
		n := min(int64(len(p)), f.off+f.n-off)
		if err := u.write(p[:n]); err != nil {
			return done, err
		}
		u.pos = off + n
		p, off, done = p[n:], off+n, done+int(n)
	}
	return done, nil
}

// Close sends the rest of the body and waits for the pool to have written
// it into the VDI.
func (u *uploader) Close() error {
	if u.closed {
		return nil
	}
	u.closed = true
	defer u.cancel()
	var err error
	if !u.chunked {
		err = u.zero(u.size - u.pos)
	} else {
		err = u.closeFrame()
		for err == nil && u.cur < len(u.frames) {
			f := u.frames[u.cur]
			if err = u.header(f.off, f.n); err == nil {
				u.open, u.pos = true, f.off
				err = u.closeFrame()
			}
		}
		if err == nil {
			err = u.header(0, 0)
		}
	}
	if err != nil {
		u.pw.CloseWithError(err)
		if uerr := <-u.done; uerr != nil {
			return uerr
		}
		return err
	}
	u.pw.Close()
	if err := <-u.done; err != nil {
		return err
	}
	if u.sent != u.length {
		return fmt.Errorf("sent %d bytes, announced %d", u.sent, u.length)
	}
	return nil
}
