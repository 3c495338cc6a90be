package xapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/nbd"
	api "github.com/vmshadow/vmshadow/internal/xapi"
)

// Prepare implements coord.Provider: it checks that the VM carries no
// leftovers, that the pool serves VDIs over NBD, and, for a backup, plans
// the change tracking (turning CBT on where it is off).
func (p *Provider) Prepare(ctx context.Context, set *coord.Set, rec coord.Recorder) error {
	if err := p.scan(ctx); err != nil { // fresh: a recover may have run since Identify
		return err
	}
	if len(p.leftovers) > 0 {
		return fmt.Errorf("VM %s carries objects of an earlier vmshadow snapshot set (%s): run 'vmshadow recover --xapi %s --vm %s': %w",
			p.vm.NameLabel, strings.Join(p.leftovers, ", "), p.opts.Pool.URL, p.vm.UUID, errs.ErrBusy)
	}
	if len(p.disks) == 0 {
		return fmt.Errorf("VM %s has no disks: nothing to snapshot: %w", p.vm.NameLabel, errs.ErrNotFound)
	}
	if err := p.checkNBD(ctx); err != nil {
		return err
	}
	st := &state{Pool: p.c.Host(), VM: p.vm.UUID, Snapshot: Prefix + set.ID}
	for _, d := range p.disks {
		st.Disks = append(st.Disks, diskState{Disk: d})
	}
	if t := p.opts.Tracking; t != nil {
		st.Prefix = t.Prefix
		if err := p.planTracking(ctx, st); err != nil {
			return fmt.Errorf("change tracking: %w", err)
		}
	}
	return rec.Record(set, st)
}

// checkNBD fails unless a network of the pool has the nbd purpose (or
// insecure_nbd, when allowed).
func (p *Provider) checkNBD(ctx context.Context) error {
	nets, err := p.c.Networks(ctx)
	if err != nil {
		return fmt.Errorf("list networks: %w", err)
	}
	insecure := false
	for _, n := range nets {
		for _, pu := range n.Purpose {
			switch pu {
			case "nbd":
				p.nbdTLS = true
				return nil
			case "insecure_nbd":
				insecure = true
			}
		}
	}
	p.nbdTLS = false
	if insecure {
		if p.opts.Insecure {
			p.warn("the pool serves NBD without TLS (insecure_nbd): disk data and the session cross the network in clear")
			return nil
		}
		return fmt.Errorf("pool %s serves NBD only without TLS (network purpose insecure_nbd), which sends the session and the disks in clear: give the network the nbd purpose instead (xe network-param-add param-name=purpose param-key=nbd uuid=NETWORK), or allow it with --insecure: %w",
			p.c.Host(), errs.ErrUnsupported)
	}
	return fmt.Errorf("no network of pool %s is enabled for NBD, which vmshadow reads disks through: enable it on a network the backup host reaches (xe network-param-add param-name=purpose param-key=nbd uuid=NETWORK; wait 10 s for it to apply): %w",
		p.c.Host(), errs.ErrUnsupported)
}

// Commit implements coord.Provider: Async.VM.snapshot captures the VM's
// disks. XAPI snapshots them one after another (xapi_vm_clone.ml,
// safe_clone_disks; message_forwarding.ml: "We don't give any atomicity
// guarantees"), so a running VM with several disks is paused around the
// snapshot (VM.pause is allowed on a running VM, VM.snapshot in every
// power state: xapi_vm_lifecycle.ml) and unpaused at once after it, so
// that every disk is taken at one instant; set.Instant says which it was.
// The pause is journaled before it is asked for, so Release unpauses a VM
// a killed process left paused. The task is journaled while it runs; when
// the freeze window ends first, the task is asked to cancel and Commit
// returns, so the writers thaw (and the VM runs) at once (Release waits
// for the task). Reading the snapshot's details waits for Expose.
func (p *Provider) Commit(ctx context.Context, set *coord.Set, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("commit: no prepared state: %v", err)
	}
	switch {
	case len(st.Disks) == 1:
		set.Instant = coord.InstantOneDisk
	case p.vm.PowerState != "Running":
		set.Instant = coord.InstantNotRunning
	case p.opts.NoPause:
		set.Instant = coord.InstantPerDisk
	default:
		if err := p.pause(ctx, set, st, rec); err != nil {
			return err
		}
	}
	if set.Instant == coord.InstantPerDisk {
		p.warn("the %d disks of VM %s were snapshotted one after another while it ran (XAPI's VM.snapshot is not atomic across disks): each disk is crash-consistent on its own, not with the others", len(st.Disks), p.vm.NameLabel)
		set.Warnings = append(set.Warnings, fmt.Sprintf("disks snapshotted one after another while the VM ran (%s): not at one instant", coord.InstantPerDisk))
	}
	started := func(task string) error {
		st.Task = task
		if err := rec.Record(set, st); err != nil {
			return err
		}
		crashpoint.Hit("xapi-snapshot-started")
		return nil
	}
	snap, err := p.c.RunAsync(ctx, "VM.snapshot", started, p.vmRef, st.Snapshot)
	if uerr := p.unpause(ctx, set, st, rec); uerr != nil {
		return errors.Join(err, uerr)
	}
	if err != nil {
		return fmt.Errorf("VM.snapshot: %w", err)
	}
	crashpoint.Hit("xapi-snapshot-taken")
	p.snapRef, st.Task = snap, ""
	return rec.Record(set, st)
}

// pause pauses the VM for the snapshot; if XAPI refuses (the VM stopped
// running, or the account may not pause it), the disks are snapshotted one
// after another and the set says so.
func (p *Provider) pause(ctx context.Context, set *coord.Set, st *state, rec coord.Recorder) error {
	st.Paused = true
	if err := rec.Record(set, st); err != nil {
		return err
	}
	crashpoint.Hit("xapi-pausing")
	if err := p.c.Call(ctx, "VM.pause", nil, p.vmRef); err != nil {
		if ctx.Err() != nil {
			return err // Release unpauses if the pause happened after all
		}
		st.Paused = false
		if err := rec.Record(set, st); err != nil {
			return err
		}
		p.warn("VM %s could not be paused for the snapshot (%v)", p.vm.NameLabel, err)
		set.Instant = coord.InstantPerDisk
		return nil
	}
	p.pausedAt = time.Now()
	set.Instant = coord.InstantPaused
	return nil
}

// unpause lets the VM run again after the snapshot, whatever became of it,
// and records how long it was paused.
func (p *Provider) unpause(ctx context.Context, set *coord.Set, st *state, rec coord.Recorder) error {
	if !st.Paused || p.pausedAt.IsZero() {
		return nil
	}
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	err := p.c.Call(uctx, "VM.unpause", nil, p.vmRef)
	set.PauseMS = time.Since(p.pausedAt).Milliseconds()
	p.pausedAt = time.Time{}
	if err != nil && !api.IsCode(err, "VM_BAD_POWER_STATE") {
		return fmt.Errorf("VM %s was paused for the snapshot and could not be unpaused (%v): unpause it (xe vm-unpause uuid=%s) or run 'vmshadow recover'", p.vm.NameLabel, err, p.vm.UUID)
	}
	st.Paused = false
	return rec.Record(set, st)
}

// recordSnapshot journals the snapshot VM's UUID and its disks' VDIs.
func (p *Provider) recordSnapshot(ctx context.Context, set *coord.Set, st *state, ref string, rec coord.Recorder) error {
	r, err := p.c.VMRecord(ctx, ref)
	if err != nil {
		return fmt.Errorf("read snapshot %s: %w", st.Snapshot, err)
	}
	st.SnapshotUUID = r.UUID
	byDevice := map[string]string{}
	for _, vref := range r.VBDs {
		b, err := p.c.VBDRecord(ctx, vref)
		if err != nil {
			return fmt.Errorf("read VBD of snapshot %s: %w", st.Snapshot, err)
		}
		if b.Type == "Disk" && !api.IsNull(b.VDI) {
			d, err := p.c.VDIRecord(ctx, b.VDI)
			if err != nil {
				return fmt.Errorf("read snapshot VDI: %w", err)
			}
			byDevice[b.Userdevice] = d.UUID
		}
	}
	var missing []string
	for i := range st.Disks {
		d := &st.Disks[i]
		if d.SnapshotVDI = byDevice[d.Userdevice]; d.SnapshotVDI == "" {
			missing = append(missing, d.Name)
		}
	}
	if err := rec.Record(set, st); err != nil {
		return err
	}
	if len(missing) > 0 {
		return fmt.Errorf("snapshot %s has no copy of disks %v", st.Snapshot, missing)
	}
	return nil
}

// Expose implements coord.Provider: each snapshot VDI is tagged as the
// set's, its NBD connection details are fetched, and for a backup the
// changed blocks since the previous checkpoint are listed.
func (p *Provider) Expose(ctx context.Context, set *coord.Set, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("expose: no state: %v", err)
	}
	if err := p.recordSnapshot(ctx, set, st, p.snapRef, rec); err != nil {
		return err
	}
	set.Shadows = nil
	for i := range st.Disks {
		d := &st.Disks[i]
		ref, err := p.c.VDIByUUID(ctx, d.SnapshotVDI)
		if err != nil {
			return fmt.Errorf("disk %s: snapshot VDI %s: %w", d.Name, d.SnapshotVDI, err)
		}
		tags := map[string]string{keySet: set.ID}
		if st.Prefix != "" {
			tags[keyChain] = st.Prefix
		}
		for k, v := range tags {
			if err := p.c.Call(ctx, "VDI.add_to_other_config", nil, ref, k, v); err != nil && !api.IsCode(err, "MAP_DUPLICATE_KEY") {
				return fmt.Errorf("disk %s: tag snapshot VDI: %w", d.Name, err)
			}
		}
		infos, err := p.c.NBDInfo(ctx, ref)
		if err != nil {
			return fmt.Errorf("disk %s: NBD connection details of snapshot VDI %s: %w", d.Name, d.SnapshotVDI, err)
		}
		if len(infos) == 0 {
			return fmt.Errorf("disk %s: the pool offers no NBD connection to snapshot VDI %s: is a network with the nbd purpose connected to the host that holds its storage? %w",
				d.Name, d.SnapshotVDI, errs.ErrUnsupported)
		}
		if !p.nbdTLS && !p.opts.Insecure {
			return fmt.Errorf("disk %s: the pool serves NBD without TLS (insecure_nbd): allow it with --insecure: %w", d.Name, errs.ErrUnsupported)
		}
		p.nbd[d.SnapshotVDI] = infos
		sh := coord.Shadow{ID: fmt.Sprintf("%s-%d", set.ID, i), Disk: d.Name, Node: d.SnapshotVDI, Size: d.Size}
		if st.Prefix != "" {
			if d.CBT {
				sh.Checkpoint = d.SnapshotVDI
			}
			p.listChanges(ctx, d, ref)
			sh.Bitmap, sh.FullReason = d.Base, d.FullReason
		}
		set.Shadows = append(set.Shadows, sh)
	}
	crashpoint.Hit("xapi-exposed")
	return rec.Record(set, st)
}

// listChanges asks for the blocks changed since the disk's previous
// checkpoint; anything that makes the answer unusable turns the disk's
// read into a full one, with the reason.
func (p *Provider) listChanges(ctx context.Context, d *diskState, snapRef string) {
	if d.Base == "" {
		return
	}
	full := func(format string, args ...any) {
		d.FullReason, d.Base = fmt.Sprintf(format, args...), ""
	}
	prev, err := p.c.VDIByUUID(ctx, d.Base)
	if err != nil {
		full("the previous checkpoint VDI %s cannot be read (%v)", d.Base, err)
		return
	}
	b64, err := p.c.ListChangedBlocks(ctx, prev, snapRef)
	if err != nil {
		full("CBT cannot compare the disk with the previous checkpoint VDI %s (%v)", d.Base, err)
		return
	}
	cb, err := api.ParseChangedBlocks(b64, d.Size)
	if err != nil {
		full("XAPI's list of changed blocks since checkpoint VDI %s is unusable (%v)", d.Base, err)
		return
	}
	p.cbt[d.SnapshotVDI] = cb
}

// Alive implements coord.Provider: the set is alive while its snapshot VM
// exists.
func (p *Provider) Alive(ctx context.Context, set *coord.Set) (bool, error) {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil || st.SnapshotUUID == "" {
		return false, err
	}
	_, err = p.c.VMByUUID(ctx, st.SnapshotUUID)
	if api.IsGone(err) {
		return false, nil
	}
	return err == nil, err
}

// Idle is called once the set exists and before its shadow copies are
// read. The session must stay logged in: the NBD exports live with it.
func (p *Provider) Idle() {}

// NBD returns how to read a shadow copy of the set exposed by this
// process: the target (its export name holds the session) and the TLS
// configuration, which trusts exactly the certificate XAPI reported for
// the NBD server (nil for insecure_nbd). It is the first of NBDTargets.
func (p *Provider) NBD(sh coord.Shadow) (nbd.Target, *tls.Config, error) {
	ts, err := p.NBDTargets(sh)
	if err != nil {
		return nbd.Target{}, nil, err
	}
	return ts[0].Target, ts[0].TLS, nil
}

// NBDTarget is one way to read a shadow copy.
type NBDTarget struct {
	Target nbd.Target
	TLS    *tls.Config
}

// NBDTargets lists the ways to read a shadow copy, best first. XAPI gives
// one entry per IP address of each host that has the VDI's SR attached, on
// networks with the nbd or insecure_nbd purpose (xapi_vdi.ml,
// _get_nbd_info): a PIF's IPv4 address, then its IPv6 ones in CIDR form
// ("2001:db8::5/64"), whose prefix length is dropped here. xapi-nbd
// listens on IPv4 only (ocaml/nbd/src/main.ml binds a PF_INET socket), so
// IPv4 addresses come first. TLS follows the network's purpose, not the
// certificate, which XAPI reports in both cases: nbd is NBD over TLS,
// insecure_nbd plain NBD (xapi-nbd's xapi_says_use_tls).
func (p *Provider) NBDTargets(sh coord.Shadow) ([]NBDTarget, error) {
	infos, ok := p.nbd[sh.Node]
	if !ok || len(infos) == 0 {
		return nil, fmt.Errorf("disk %s: snapshot VDI %s was not exposed by this process", sh.Disk, sh.Node)
	}
	var v4, v6 []NBDTarget
	var firstErr error
	for _, info := range infos {
		addr, _, _ := strings.Cut(info.Address, "/")
		ip := net.ParseIP(addr)
		t := nbd.Target{Network: "tcp", Address: net.JoinHostPort(addr, strconv.FormatInt(int64(info.Port), 10)), Export: info.ExportName}
		if addr == "" || info.Port <= 0 || info.Port > 65535 {
			if firstErr == nil {
				firstErr = fmt.Errorf("disk %s: XAPI reported an unusable NBD address %q port %d: %w", sh.Disk, info.Address, info.Port, errs.ErrConnect)
			}
			continue
		}
		var cfg *tls.Config
		if p.nbdTLS {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM([]byte(info.Cert)) {
				if firstErr == nil {
					firstErr = fmt.Errorf("disk %s: the NBD server certificate XAPI reported for %s is not PEM: %w", sh.Disk, addr, errs.ErrConnect)
				}
				continue
			}
			t.TLS = true
			t.TLSHostname = info.Subject
			if t.TLSHostname == "" {
				t.TLSHostname = addr
			}
			cfg = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		}
		if ip != nil && ip.To4() == nil {
			v6 = append(v6, NBDTarget{t, cfg})
		} else {
			v4 = append(v4, NBDTarget{t, cfg})
		}
	}
	if out := append(v4, v6...); len(out) > 0 {
		return out, nil
	}
	return nil, firstErr
}

// ChangedBlocks returns the changes of a shadow copy since its previous
// checkpoint (sh.Bitmap), listed when the set was exposed.
func (p *Provider) ChangedBlocks(sh coord.Shadow) (*api.ChangedBlocks, error) {
	cb, ok := p.cbt[sh.Node]
	if !ok {
		return nil, fmt.Errorf("disk %s: no list of changed blocks for snapshot VDI %s", sh.Disk, sh.Node)
	}
	return cb, nil
}

// VHDAllocation finds which blocks of a shadow copy hold data without
// reading them: xapi-nbd reports no allocation (it answers structured
// replies and NBD_OPT_GO with "unsupported", xapi-project/nbd
// lib/server.ml), but GET /export_raw_vdi?format=vhd streams the VDI as a
// dynamic VHD whose block allocation table comes first (xapi's
// export_raw_vdi.ml runs vhd-tool): only that head is read.
//
// Only SRs that store VDIs as VHD files or VHD on LVM are asked (vhdSRTypes):
// for others vhd-tool would have to read the whole disk to make the table.
// The head must come within a minute.
func (p *Provider) VHDAllocation(ctx context.Context, sh coord.Shadow) (*api.VHDAllocation, error) {
	ref, err := p.c.VDIByUUID(ctx, sh.Node)
	if err != nil {
		return nil, fmt.Errorf("disk %s: snapshot VDI %s: %w", sh.Disk, sh.Node, err)
	}
	d, err := p.c.VDIRecord(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("disk %s: snapshot VDI %s: %w", sh.Disk, sh.Node, err)
	}
	sr, err := p.c.SRRecord(ctx, d.SR)
	if err != nil {
		return nil, fmt.Errorf("disk %s: SR of snapshot VDI %s: %w", sh.Disk, sh.Node, err)
	}
	if !slices.Contains(vhdSRTypes, sr.Type) {
		return nil, fmt.Errorf("disk %s: SR %s of type %s does not store VDIs as VHD: %w", sh.Disk, sr.NameLabel, sr.Type, errs.ErrUnsupported)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	a, err := p.c.ExportVHDAllocation(ctx, ref, sh.Size)
	if err != nil {
		return nil, fmt.Errorf("disk %s: allocation of snapshot VDI %s: %w", sh.Disk, sh.Node, err)
	}
	return a, nil
}

// vhdSRTypes are the SR types whose VDIs are VHD files (ext, nfs, smb) or
// VHD on logical volumes (lvm, lvmoiscsi, lvmohba), as sm's drivers store
// them.
var vhdSRTypes = []string{"ext", "nfs", "smb", "cifs", "lvm", "lvmoiscsi", "lvmohba", "file"}

// Reconnect logs in again when the pool has ended the session (it expires
// idle sessions, and xapi-nbd refuses new connections of a dead session),
// and fetches the NBD details of the exposed snapshot VDIs anew, their
// export names holding the new session. It does nothing while the session
// lives.
func (p *Provider) Reconnect(ctx context.Context) error {
	if p.c == nil {
		_, err := p.Client(ctx)
		return err
	}
	ok, err := p.c.SessionValid(ctx)
	if ok || err != nil {
		return err
	}
	p.warn("the pool ended vmshadow's XAPI session (expired): logging in again")
	p.c.Logout(ctx) // closes the old client's connections; the session is gone already
	p.c = nil
	c, err := p.Client(ctx)
	if err != nil {
		return fmt.Errorf("log in again after the session expired: %w", err)
	}
	for uuid := range p.nbd {
		ref, err := c.VDIByUUID(ctx, uuid)
		if err != nil {
			return fmt.Errorf("snapshot VDI %s: %w", uuid, err)
		}
		infos, err := c.NBDInfo(ctx, ref)
		if err != nil {
			return fmt.Errorf("NBD connection details of snapshot VDI %s: %w", uuid, err)
		}
		p.nbd[uuid] = infos
	}
	return nil
}
