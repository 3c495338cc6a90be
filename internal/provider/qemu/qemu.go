// Package qemu is the snapshot-set provider for QEMU, driven over QMP alone
// (no libvirt). It owns the mapping of the shadow-copy model onto QEMU's
// block layer:
//
//   - diff area: one sparse scratch file per disk, created by vmshadow and
//     handed to QEMU as a file descriptor when the VM runs (so QEMU needs no
//     permission on the scratch directory), opened by QEMU by path when it
//     is paused (QEMU before 9.1 closes passed descriptors only while the
//     VM runs); released with its node, then emptied and deleted;
//   - copy-on-write: a copy-before-write filter node above each disk, with
//     on-cbw-error=break-snapshot, so a full or failing diff area breaks the
//     shadow copy (its reads fail) instead of the guest's writes, and a
//     broken shadow copy can never return newer data;
//   - the instant: the filters are switched into the devices' I/O path
//     (qom-set of the device's "drive") while the VM is paused, so every
//     disk is captured at the same point;
//   - the shadow copy: a snapshot-access node on each filter, exported
//     read-only by QEMU's NBD server on a UNIX socket vmshadow created.
//
// Every object is named vmshadow-<set>-<n>-<role>, and recorded in the
// set's journal before it is created, so Release can always remove it.
// It needs QEMU 7.1 or newer (copy-before-write's on-cbw-error).
package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/qmp"
	"github.com/vmshadow/vmshadow/internal/tracking"
)

// Prefix starts the name of every object vmshadow creates in QEMU.
const Prefix = "vmshadow-"

// Options configure the provider.
type Options struct {
	// QMPPath is the VM's QMP socket.
	QMPPath string
	// ScratchDir holds the diff area (scratch files) and the NBD socket.
	ScratchDir string
	// Warn is told of problems that do not stop the set.
	Warn func(string)
	// Tracking, if set, rotates change tracking at the set's instant and
	// exports the previous bitmap with each shadow copy (backups).
	Tracking *tracking.Request
}

// Provider implements coord.Provider for one QEMU VM.
type Provider struct {
	opts Options
	c    *qmp.Client

	vm        coord.VMInfo
	disks     []Disk
	skipped   []string
	leftovers []string
}

// New returns a provider for the VM behind opts.QMPPath. It connects on
// first use.
func New(opts Options) *Provider { return &Provider{opts: opts} }

// Disk is one of the VM's disks as QEMU reports it.
type Disk struct {
	Name   string `json:"name"`   // qdev id, or node name when the device has none
	QOM    string `json:"qom"`    // device path for qom-set
	Node   string `json:"node"`   // the device's root node before vmshadow touched it
	Format string `json:"format"` // driver of the root node (qcow2, raw, ...)
	Size   int64  `json:"size"`
	// Persistent: the image can keep dirty bitmaps across QEMU restarts
	// (qcow2 v3); on others they live as long as the QEMU process.
	Persistent bool `json:"persistent_bitmaps"`
}

// Track sets the change-tracking request of the next set (before Create;
// the backup learns the VM's name from Identify first). Checkpoints are
// persistent dirty bitmaps (checkpoint.go).
func (p *Provider) Track(r tracking.Request) { p.opts.Tracking = &r }

// Kind implements coord.Provider.
func (p *Provider) Kind() string { return "qemu" }

// Disks returns the disks found by Identify.
func (p *Provider) Disks() []Disk { return p.disks }

// QMP returns the connection, opening it if needed. Once QEMU was found
// not answering (qmp.ErrStalled) it returns that error, without redialling.
func (p *Provider) QMP(ctx context.Context) (*qmp.Client, error) {
	if p.c != nil {
		select {
		case <-p.c.Done():
			if err := p.c.Err(); errors.Is(err, qmp.ErrStalled) {
				return nil, err // a hung monitor: waiting on it again would only hang again
			}
			p.c = nil
		default:
			return p.c, nil
		}
	}
	c, err := qmp.Dial(ctx, p.opts.QMPPath)
	if err != nil {
		return nil, err
	}
	p.c = c
	return c, nil
}

// Close implements coord.Provider.
func (p *Provider) Close() error {
	if p.c == nil {
		return nil
	}
	err := p.c.Close()
	p.c = nil
	return err
}

func (p *Provider) exec(ctx context.Context, cmd string, args, result any) error {
	c, err := p.QMP(ctx)
	if err != nil {
		return err
	}
	return c.Execute(ctx, cmd, args, result)
}

func (p *Provider) warn(format string, args ...any) {
	if p.opts.Warn != nil {
		p.opts.Warn(fmt.Sprintf(format, args...))
	}
}

// blockInfo is the part of query-block vmshadow reads.
type blockInfo struct {
	Device   string `json:"device"`
	Qdev     string `json:"qdev"`
	Inserted *struct {
		NodeName string `json:"node-name"`
		Drv      string `json:"drv"`
		RO       bool   `json:"ro"`
		Image    struct {
			VirtualSize    int64 `json:"virtual-size"`
			FormatSpecific struct {
				Type string `json:"type"`
				Data struct {
					Compat string `json:"compat"`
				} `json:"data"`
			} `json:"format-specific"`
		} `json:"image"`
	} `json:"inserted"`
}

var peripheral = regexp.MustCompile(`^/machine/peripheral/([^/]+)(/|$)`)

// Identify implements coord.Provider.
func (p *Provider) Identify(ctx context.Context) (coord.VMInfo, error) {
	c, err := p.QMP(ctx)
	if err != nil {
		return coord.VMInfo{}, err
	}
	if v := c.Version(); !v.AtLeast(7, 1) {
		return coord.VMInfo{}, fmt.Errorf("QEMU %s is too old: vmshadow needs QEMU 7.1 or newer (copy-before-write with on-cbw-error, snapshot-access): %w", v, errs.ErrUnsupported)
	}
	var name struct {
		Name string `json:"name"`
	}
	if err := c.Execute(ctx, "query-name", nil, &name); err != nil {
		return coord.VMInfo{}, fmt.Errorf("query VM name: %w", err)
	}
	abs, _ := filepath.Abs(p.opts.QMPPath)
	if name.Name == "" {
		name.Name = strings.TrimSuffix(filepath.Base(abs), filepath.Ext(abs))
	}
	sum := sha256.Sum256([]byte(abs))
	p.vm = coord.VMInfo{Name: name.Name, Key: "qemu-" + coord.SafeName(name.Name, 40) + "-" + hex.EncodeToString(sum[:6])}
	if err := p.scan(ctx); err != nil {
		return coord.VMInfo{}, err
	}
	return p.vm, nil
}

// scan reads the VM's disks and notes objects left by vmshadow.
func (p *Provider) scan(ctx context.Context) error {
	var blocks []blockInfo
	if err := p.exec(ctx, "query-block", nil, &blocks); err != nil {
		return fmt.Errorf("query-block: %w", err)
	}
	p.disks, p.skipped, p.leftovers = nil, nil, nil
	for _, b := range blocks {
		if b.Inserted == nil {
			continue // no medium
		}
		in := b.Inserted
		if strings.HasPrefix(in.NodeName, Prefix) || in.Drv == "copy-before-write" {
			p.leftovers = append(p.leftovers, fmt.Sprintf("device %s is attached to %s", b.Qdev, in.NodeName))
			continue
		}
		if b.Qdev == "" {
			p.skipped = append(p.skipped, fmt.Sprintf("%s (no guest device)", in.NodeName))
			continue
		}
		if in.RO {
			p.skipped = append(p.skipped, fmt.Sprintf("%s (read-only medium)", b.Qdev))
			continue
		}
		d := Disk{QOM: b.Qdev, Node: in.NodeName, Format: in.Drv, Size: in.Image.VirtualSize}
		// Only qcow2 v3 images store bitmaps; v2 (compat=0.10) refuse them.
		fs := in.Image.FormatSpecific
		d.Persistent = in.Drv == "qcow2" && fs.Type == "qcow2" && fs.Data.Compat != "0.10"
		if m := peripheral.FindStringSubmatch(b.Qdev); m != nil {
			d.Name = m[1]
		} else {
			d.Name = in.NodeName
		}
		p.disks = append(p.disks, d)
	}
	nodes, err := p.namedNodes(ctx)
	if err != nil {
		return err
	}
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, Prefix) {
			p.leftovers = append(p.leftovers, "node "+n.NodeName)
		}
	}
	exports, err := p.exports(ctx)
	if err != nil {
		return err
	}
	for _, e := range exports {
		if strings.HasPrefix(e, Prefix) {
			p.leftovers = append(p.leftovers, "export "+e)
		}
	}
	return nil
}

type namedNode struct {
	NodeName     string       `json:"node-name"`
	Drv          string       `json:"drv"`
	File         string       `json:"file"` // the image's file name`
	DirtyBitmaps []bitmapInfo `json:"dirty-bitmaps"`
}

type bitmapInfo struct {
	Name         string `json:"name"`
	Recording    bool   `json:"recording"`
	Persistent   bool   `json:"persistent"`
	Inconsistent bool   `json:"inconsistent"`
	Count        int64  `json:"count"`
	Granularity  int64  `json:"granularity"`
}

func (p *Provider) namedNodes(ctx context.Context) ([]namedNode, error) {
	var nodes []namedNode
	if err := p.exec(ctx, "query-named-block-nodes", map[string]bool{"flat": true}, &nodes); err != nil {
		return nil, fmt.Errorf("query-named-block-nodes: %w", err)
	}
	return nodes, nil
}

func (p *Provider) exports(ctx context.Context) ([]string, error) {
	var exports []struct {
		ID string `json:"id"`
	}
	if err := p.exec(ctx, "query-block-exports", nil, &exports); err != nil {
		return nil, fmt.Errorf("query-block-exports: %w", err)
	}
	ids := make([]string, len(exports))
	for i, e := range exports {
		ids[i] = e.ID
	}
	return ids, nil
}

// state is the provider's journal record of a set.
type state struct {
	QMP        string      `json:"qmp"`
	QEMUPID    int         `json:"qemu_pid"`
	ScratchDir string      `json:"scratch_dir"`
	Socket     string      `json:"nbd_socket"`
	Server     bool        `json:"nbd_server"` // nbd-server-start was (or is about to be) issued by vmshadow
	Paused     bool        `json:"paused"`     // vmshadow stopped the VM and has not resumed it
	Disks      []diskState `json:"disks"`
}

type diskState struct {
	Disk
	Scratch  string `json:"scratch"`
	ByPath   bool   `json:"scratch_by_path,omitempty"` // QEMU opened Scratch by path (the VM was paused), not through a passed descriptor
	Target   string `json:"target_node"`
	CBW      string `json:"cbw_node"`
	Snap     string `json:"snap_node"`
	Export   string `json:"export"`
	Inserted bool   `json:"inserted"` // the device may be attached to CBW

	Checkpoint *checkpointState `json:"checkpoint,omitempty"`
	FullReason string           `json:"full_reason,omitempty"`
}

// isMissing reports a QMP error that means the object is already gone.
func isMissing(err error) bool {
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		return false
	}
	d := strings.ToLower(qe.Desc)
	return qe.Class == "DeviceNotFound" || strings.Contains(d, "not found") || strings.Contains(d, "failed to find") || strings.Contains(d, "cannot find") ||
		strings.Contains(d, "no such") || strings.Contains(d, "not running") || strings.Contains(d, "does not exist")
}
