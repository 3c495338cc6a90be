package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// cbwTimeout bounds how long a guest write may wait for its old data to be
// copied to the diff area; past it the shadow copy breaks and the guest
// goes on.
const cbwTimeout = 30

// maxSocketPath is the longest UNIX socket path the kernel accepts.
const maxSocketPath = 107

func names(setID string, i int) (tgt, cbw, snap string) {
	base := fmt.Sprintf("%s%s-%d", Prefix, setID, i)
	return base + "-tgt", base + "-cbw", base + "-snap"
}

// Prepare implements coord.Provider: it checks the diff area and creates
// the scratch files and the copy-before-write filters (not yet in the I/O
// path, so the guest is untouched).
func (p *Provider) Prepare(ctx context.Context, set *coord.Set, rec coord.Recorder) error {
	if err := p.scan(ctx); err != nil { // fresh: a recover may have run since Identify
		return err
	}
	if len(p.leftovers) > 0 {
		return fmt.Errorf("the VM carries objects of an earlier vmshadow snapshot set (%s): run 'vmshadow recover --qmp %s': %w",
			strings.Join(p.leftovers, ", "), p.opts.QMPPath, errs.ErrBusy)
	}
	if len(p.disks) == 0 {
		what := "no block devices with a medium"
		if len(p.skipped) > 0 {
			what = "no writable disk attached to a device (skipped: " + strings.Join(p.skipped, ", ") + ")"
		}
		return fmt.Errorf("VM %s has %s: nothing to snapshot: %w", p.vm.Name, what, errs.ErrNotFound)
	}
	for _, s := range p.skipped {
		p.warn("not captured: %s", s)
	}
	dir, err := filepath.Abs(p.opts.ScratchDir)
	if err != nil {
		return err
	}
	if err := checkScratch(dir); err != nil {
		return err
	}
	var need int64
	for _, d := range p.disks {
		need += d.Size
	}
	msg, err := coord.CheckScratch(dir, need, "the shadow copies break (their reads fail) and the guest goes on")
	if err != nil {
		return err
	}
	if msg != "" {
		set.Warnings = append(set.Warnings, msg)
		p.warn("%s", msg)
	}
	c, err := p.QMP(ctx)
	if err != nil {
		return err
	}
	var status struct {
		Running bool `json:"running"`
	}
	if err := p.exec(ctx, "query-status", nil, &status); err != nil {
		return err
	}
	st := &state{QMP: p.opts.QMPPath, QEMUPID: c.PID(), ScratchDir: dir,
		Socket: filepath.Join(dir, Prefix+set.ID+".sock")}
	if len(st.Socket) > maxSocketPath {
		return fmt.Errorf("NBD socket path %s is longer than %d bytes: choose a shorter --scratch-dir: %w", st.Socket, maxSocketPath, errs.ErrUsage)
	}
	for i, d := range p.disks {
		tgt, cbw, snap := names(set.ID, i)
		st.Disks = append(st.Disks, diskState{Disk: d, Target: tgt, CBW: cbw, Snap: snap, Export: snap,
			Scratch: filepath.Join(dir, fmt.Sprintf("%s%s-%d.cow", Prefix, set.ID, i)), ByPath: !status.Running})
	}
	if p.opts.Tracking != nil {
		if err := p.planCheckpoint(ctx, set, st); err != nil {
			return fmt.Errorf("change tracking: %w", err)
		}
	}
	// Everything this set may create is named in the journal first.
	if err := rec.Record(set, st); err != nil {
		return err
	}
	for _, d := range st.Disks {
		if err := p.addTarget(ctx, set.ID, d); err != nil {
			return fmt.Errorf("disk %s: diff area: %w", d.Name, err)
		}
		err := p.exec(ctx, "blockdev-add", map[string]any{
			"driver": "copy-before-write", "node-name": d.CBW, "file": d.Node, "target": d.Target,
			"on-cbw-error": "break-snapshot", "cbw-timeout": cbwTimeout,
		}, nil)
		if err != nil {
			return fmt.Errorf("disk %s: add copy-before-write filter: %w", d.Name, err)
		}
		crashpoint.Hit("qemu-filter-added")
	}
	return nil
}

// checkScratch makes sure dir exists (creating it) and is writable.
func checkScratch(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("scratch dir %s: %w (choose a writable --scratch-dir): %w", dir, err, errs.ErrUsage)
	}
	f, err := os.CreateTemp(dir, ".vmshadow-probe-*")
	if err != nil {
		return fmt.Errorf("scratch dir %s is not writable: %w (choose a writable --scratch-dir): %w", dir, err, errs.ErrUsage)
	}
	f.Close()
	return os.Remove(f.Name())
}

// addTarget creates the sparse scratch file and opens it in QEMU as the
// target node. A running VM gets it as a passed file descriptor, so QEMU
// needs no access to the scratch directory. A paused VM opens it by path:
// QEMU before 9.1 closes a passed descriptor only while the VM runs
// (monitor_fdset_cleanup checks runstate_is_running, even after remove-fd),
// so a descriptor passed to a paused VM would keep the file, and every
// block the guest rewrote while the set existed, until the VM runs again.
func (p *Provider) addTarget(ctx context.Context, setID string, d diskState) error {
	f, err := os.OpenFile(d.Scratch, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(d.Size); err != nil {
		return err
	}
	if d.ByPath {
		f.Close()
		err := p.exec(ctx, "blockdev-add", map[string]any{"driver": "file", "node-name": d.Target, "filename": d.Scratch}, nil)
		if err != nil {
			return fmt.Errorf("QEMU opens the scratch file %s itself while the VM is paused (a descriptor passed to a paused VM stays open in QEMU until the VM runs again): %w (give QEMU's user access to --scratch-dir, or resume the VM)", d.Scratch, err)
		}
		return nil
	}
	c, err := p.QMP(ctx)
	if err != nil {
		return err
	}
	var fdset struct {
		FDSetID int `json:"fdset-id"`
	}
	if err := c.ExecuteWithFile(ctx, "add-fd", map[string]any{"opaque": d.Target}, &fdset, f); err != nil {
		return fmt.Errorf("pass scratch file to QEMU: %w", err)
	}
	err = p.exec(ctx, "blockdev-add", map[string]any{
		"driver": "file", "node-name": d.Target, "filename": fmt.Sprintf("/dev/fdset/%d", fdset.FDSetID),
	}, nil)
	// The node holds its own duplicate; the set itself is no longer needed.
	if rerr := p.exec(ctx, "remove-fd", map[string]any{"fdset-id": fdset.FDSetID}, nil); rerr != nil && err == nil {
		err = rerr
	}
	return err
}

// Commit implements coord.Provider: with the VM paused, every device is
// switched onto its copy-before-write filter, so all disks are captured at
// the same instant.
func (p *Provider) Commit(ctx context.Context, set *coord.Set, rec coord.Recorder) (err error) {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("commit: no prepared state: %v", err)
	}
	var status struct {
		Running bool `json:"running"`
	}
	if err := p.exec(ctx, "query-status", nil, &status); err != nil {
		return err
	}
	if status.Running {
		st.Paused = true
		if err := rec.Record(set, st); err != nil {
			return err
		}
		if err := p.exec(ctx, "stop", nil, nil); err != nil {
			return fmt.Errorf("pause VM: %w", err)
		}
		crashpoint.Hit("qemu-paused")
		defer func() {
			// Resume whatever happened; the deadline may have passed.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			defer cancel()
			if cerr := p.exec(cctx, "cont", nil, nil); cerr != nil {
				if err == nil {
					err = fmt.Errorf("resume VM: %w", cerr)
				}
				return
			}
			st.Paused = false
			if serr := rec.Record(set, st); serr != nil && err == nil {
				err = serr
			}
		}()
	}
	for i := range st.Disks {
		st.Disks[i].Inserted = true
	}
	if err := rec.Record(set, st); err != nil {
		return err
	}
	for i, d := range st.Disks {
		if err := p.setDrive(ctx, d.QOM, d.CBW); err != nil {
			p.detach(context.WithoutCancel(ctx), st.Disks[:i])
			return fmt.Errorf("disk %s: insert copy-before-write filter: %w", d.Name, err)
		}
		crashpoint.Hit("qemu-inserted")
	}
	// Change tracking rotates at the same instant, atomically for all disks.
	if acts := rotateActions(st); len(acts) > 0 {
		if err := p.exec(ctx, "transaction", map[string]any{"actions": acts}, nil); err != nil {
			p.detach(context.WithoutCancel(ctx), st.Disks)
			for i := range st.Disks {
				st.Disks[i].Checkpoint = nil // nothing of the transaction happened
			}
			rec.Record(set, st)
			return fmt.Errorf("rotate change-tracking bitmaps: %w", err)
		}
		crashpoint.Hit("qemu-rotated")
	}
	return nil
}

func (p *Provider) setDrive(ctx context.Context, qom, node string) error {
	return p.exec(ctx, "qom-set", map[string]any{"path": qom, "property": "drive", "value": node}, nil)
}

// detach puts devices that are attached to their filter back on their disk.
func (p *Provider) detach(ctx context.Context, disks []diskState) error {
	var blocks []blockInfo
	if err := p.exec(ctx, "query-block", nil, &blocks); err != nil {
		return err
	}
	var errList []error
	for _, d := range disks {
		for _, b := range blocks {
			if b.Qdev == d.QOM && b.Inserted != nil && b.Inserted.NodeName == d.CBW {
				if err := p.setDrive(ctx, d.QOM, d.Node); err != nil {
					errList = append(errList, fmt.Errorf("disk %s: reattach to %s: %w", d.Name, d.Node, err))
				}
			}
		}
	}
	return errors.Join(errList...)
}

// Expose implements coord.Provider: a snapshot-access node per disk,
// exported read-only on an NBD server listening on a socket vmshadow made.
func (p *Provider) Expose(ctx context.Context, set *coord.Set, rec coord.Recorder) error {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return fmt.Errorf("expose: no prepared state: %v", err)
	}
	st.Server = true
	if err := rec.Record(set, st); err != nil {
		return err
	}
	if err := p.startServer(ctx, set.ID, st.Socket); err != nil {
		st.Server = !errors.Is(err, errServerRunning)
		rec.Record(set, st)
		return err
	}
	crashpoint.Hit("qemu-server")
	set.Shadows = nil
	for i, d := range st.Disks {
		if err := p.exec(ctx, "blockdev-add", map[string]any{"driver": "snapshot-access", "node-name": d.Snap, "file": d.CBW}, nil); err != nil {
			return fmt.Errorf("disk %s: add snapshot-access node: %w", d.Name, err)
		}
		export := map[string]any{"type": "nbd", "id": d.Export, "node-name": d.Snap, "name": d.Name, "writable": false}
		sh := coord.Shadow{
			ID: fmt.Sprintf("%s-%d", set.ID, i), Disk: d.Name, Node: d.Snap, Size: d.Size,
			NBD:        "nbd+unix:///" + url.PathEscape(d.Name) + "?socket=" + st.Socket,
			FullReason: d.FullReason,
		}
		if cp := d.Checkpoint; cp != nil {
			sh.Checkpoint = cp.New
			if cp.Previous != "" && d.FullReason == "" {
				sh.Bitmap = cp.Previous
				export["bitmaps"] = []any{map[string]string{"node": d.Node, "name": cp.Previous}}
			}
		}
		if err := p.exec(ctx, "block-export-add", export, nil); err != nil {
			return fmt.Errorf("disk %s: export: %w", d.Name, err)
		}
		crashpoint.Hit("qemu-exported")
		set.Shadows = append(set.Shadows, sh)
	}
	return rec.Record(set, st)
}

var errServerRunning = errors.New("NBD server already running")

// startServer starts QEMU's NBD server on a listening UNIX socket that
// vmshadow creates and passes as a file descriptor.
func (p *Provider) startServer(ctx context.Context, setID, path string) error {
	os.Remove(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("create NBD socket: %w", err)
	}
	ln.SetUnlinkOnClose(false)
	defer ln.Close()
	os.Chmod(path, 0o600)
	f, err := ln.File()
	if err != nil {
		return err
	}
	defer f.Close()
	c, err := p.QMP(ctx)
	if err != nil {
		return err
	}
	fdname := Prefix + setID
	if err := c.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": fdname}, nil, f); err != nil {
		return fmt.Errorf("pass NBD socket to QEMU: %w", err)
	}
	err = p.exec(ctx, "nbd-server-start", map[string]any{"addr": map[string]any{"type": "fd", "data": map[string]any{"str": fdname}}}, nil)
	if err != nil {
		p.exec(ctx, "closefd", map[string]any{"fdname": fdname}, nil)
		if strings.Contains(err.Error(), "already running") {
			return fmt.Errorf("QEMU's NBD server is already running (started by another tool, e.g. libvirt during a migration or backup); vmshadow needs it to expose shadow copies: %w: %w", errServerRunning, errs.ErrBusy)
		}
		return fmt.Errorf("start NBD server: %w", err)
	}
	return nil
}

// Alive implements coord.Provider: the set is alive when QEMU still has its
// shadow-copy nodes.
func (p *Provider) Alive(ctx context.Context, set *coord.Set) (bool, error) {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil || st == nil {
		return false, err
	}
	nodes, err := p.namedNodes(ctx)
	if err != nil {
		return false, err
	}
	have := map[string]bool{}
	for _, n := range nodes {
		have[n.NodeName] = true
	}
	for _, d := range st.Disks {
		if !have[d.Snap] {
			return false, nil
		}
	}
	return true, nil
}
