// Package xapi is the snapshot-set provider for XenServer and XCP-ng VMs,
// driven through the pool's management API (XAPI, internal/xapi). It owns
// the mapping of the shadow-copy model onto XAPI:
//
//   - the instant: VM.snapshot (Async, a task) into a snapshot VM named
//     vmshadow-<set id>. XAPI snapshots the disks one after another, so a
//     running VM with several disks is paused (VM.pause) for the duration
//     and unpaused at once: crash-consistent across disks; hooks (writers)
//     frozen around it make it application-consistent
//     (VM.snapshot_with_quiesce was removed in Citrix Hypervisor 8.1);
//   - the shadow copies: the snapshot VM's VDIs, read over NBD through
//     VDI.get_nbd_info, with TLS pinned to the certificate XAPI reports;
//   - change tracking for backups (Track): CBT on each disk's VDI
//     (VDI.enable_cbt), VDI.list_changed_blocks between the previous
//     backup's snapshot VDI and the new one, and VDI.data_destroy after a
//     stored backup, which keeps the snapshot's CBT metadata as the base of
//     the next comparison;
//   - release: the VM unpaused if a killed process left it paused, snapshot
//     VDIs destroyed, the snapshot VM record destroyed, and after a stored
//     backup then the data of the snapshot VDIs kept as checkpoints
//     (VDI.data_destroy refuses a VDI any VBD still refers to); nothing
//     else is left.
//
// Everything is recorded in the set's journal before it is created, by
// name (vmshadow-<set id>) and later by UUID, so Release finds it from a
// record left by a killed process; snapshots named vmshadow-* and snapshot
// VDIs tagged vmshadow-set that no journal accounts for are leftovers that
// Release(nil) removes.
package xapi

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/tracking"
	api "github.com/vmshadow/vmshadow/internal/xapi"
)

// Prefix starts the name of every snapshot vmshadow creates.
const Prefix = "vmshadow-"

// Keys of the other_config entries vmshadow puts on snapshot VDIs.
const (
	keySet   = "vmshadow-set"   // the set that created the snapshot VDI
	keyChain = "vmshadow-chain" // the repository whose checkpoint it is
)

// Options configure the provider.
type Options struct {
	// Pool is how to reach and log in to the pool master.
	Pool api.Config
	// VM is the VM's name-label or UUID.
	VM string
	// Insecure allows NBD without TLS (networks with the insecure_nbd
	// purpose), which sends the session in clear.
	Insecure bool
	// Warn is told of problems that do not stop the set.
	Warn func(string)
	// Tracking, if set, rotates change tracking (backups).
	Tracking *tracking.Request
	// NoPause: a running VM with several disks is not paused around
	// VM.snapshot; its disks are then taken one after another.
	NoPause bool
	// HostConns is the budget of NBD connections per pool host for all
	// disks of a set read together (default DefaultHostConns); each disk
	// uses at most the connections its read asks for.
	HostConns int
}

// Provider implements coord.Provider for one VM of a pool.
type Provider struct {
	opts Options
	c    *api.Client

	vmRef     string
	vm        api.VM
	snapRef   string // the set's snapshot, from Commit to Expose
	pausedAt  time.Time
	disks     []Disk
	leftovers []string

	// For the read, in this process only: never journaled (the export
	// names hold the session).
	nbd    map[string][]api.NBDInfo      // snapshot VDI UUID -> NBD info
	nbdTLS bool                          // the pool's NBD network has the nbd purpose (TLS), not insecure_nbd
	cbt    map[string]*api.ChangedBlocks // snapshot VDI UUID -> changes since the previous checkpoint
	// budgets are the NBD connections per host the set's reads share.
	budgets *budgets
}

// New returns a provider; it logs in on first use.
func New(opts Options) *Provider {
	return &Provider{opts: opts, nbd: map[string][]api.NBDInfo{}, cbt: map[string]*api.ChangedBlocks{}}
}

// Disk is one of the VM's disks.
type Disk struct {
	Name       string `json:"name"`       // xvda, xvdb, ... from the VBD's userdevice
	Userdevice string `json:"userdevice"` // the VBD's position
	VDI        string `json:"vdi"`        // the disk's VDI UUID
	Size       int64  `json:"size"`
	ref        string
}

// Kind implements coord.Provider.
func (p *Provider) Kind() string { return "xapi" }

// Client returns the logged-in client, logging in if needed.
func (p *Provider) Client(ctx context.Context) (*api.Client, error) {
	if p.c != nil {
		return p.c, nil
	}
	c, err := api.Login(ctx, p.opts.Pool)
	if err != nil {
		return nil, err
	}
	p.c = c
	return c, nil
}

// Close implements coord.Provider: it logs out.
func (p *Provider) Close() error {
	if p.c == nil {
		return nil
	}
	err := p.c.Logout(context.Background())
	p.c = nil
	return err
}

func (p *Provider) warn(format string, args ...any) {
	if p.opts.Warn != nil {
		p.opts.Warn(fmt.Sprintf(format, args...))
	}
}

// DiskName is the name of the disk at a VBD userdevice: xvda for 0, xvdb
// for 1, ..., xvdz; disk<N> beyond.
func DiskName(userdevice string) string {
	n, err := strconv.Atoi(userdevice)
	switch {
	case err != nil:
		return "disk-" + coord.SafeName(userdevice, 64)
	case n >= 0 && n < 26:
		return "xvd" + string(rune('a'+n))
	}
	return "disk" + userdevice
}

// RepoName is a VM name-label made a valid repository name: characters
// other than letters, digits, '.', '_' and '-' become '_'.
func RepoName(label string) string {
	s := coord.SafeName(label, 64)
	s = strings.TrimLeft(s, ".-")
	if s == "" {
		s = "vm"
	}
	return s
}

// Identify implements coord.Provider: it logs in, finds the VM by UUID or
// name-label, lists its disks and notes vmshadow's leftovers. On failure
// it logs out again.
func (p *Provider) Identify(ctx context.Context) (coord.VMInfo, error) {
	c, err := p.Client(ctx)
	if err != nil {
		return coord.VMInfo{}, err
	}
	if p.vmRef, err = p.findVM(ctx, c); err == nil {
		err = p.scan(ctx)
	}
	if err != nil {
		p.Close()
		return coord.VMInfo{}, err
	}
	return coord.VMInfo{Name: p.vm.NameLabel, Key: keyPrefix + p.vm.UUID}, nil
}

func (p *Provider) findVM(ctx context.Context, c *api.Client) (string, error) {
	want := p.opts.VM
	if want == "" {
		return "", fmt.Errorf("no VM given: name the VM with --vm NAME|UUID: %w", errs.ErrUsage)
	}
	if api.LooksLikeUUID(want) {
		ref, err := c.VMByUUID(ctx, want)
		if err == nil {
			return p.checkVM(ctx, c, ref)
		}
		if !api.IsGone(err) {
			return "", err
		}
	}
	refs, err := c.VMsByName(ctx, want)
	if err != nil {
		return "", err
	}
	var found []string
	var uuids []string
	for _, ref := range refs {
		r, err := c.VMRecord(ctx, ref)
		if api.IsGone(err) {
			continue
		}
		if err != nil {
			return "", err
		}
		if r.IsATemplate || r.IsASnapshot {
			continue
		}
		found = append(found, ref)
		uuids = append(uuids, r.UUID)
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("no VM named or with UUID %q on pool %s (names are case-sensitive; templates and snapshots are not VMs): %w", want, c.Host(), errs.ErrNotFound)
	case 1:
		return p.checkVM(ctx, c, found[0])
	}
	sort.Strings(uuids)
	return "", fmt.Errorf("%d VMs are named %q on pool %s (UUIDs %s): give the UUID with --vm: %w", len(found), want, c.Host(), strings.Join(uuids, ", "), errs.ErrUsage)
}

func (p *Provider) checkVM(ctx context.Context, c *api.Client, ref string) (string, error) {
	r, err := c.VMRecord(ctx, ref)
	if err != nil {
		return "", err
	}
	if r.IsATemplate || r.IsASnapshot {
		return "", fmt.Errorf("%s is a template or a snapshot, not a VM: %w", r.UUID, errs.ErrUsage)
	}
	p.vm = r
	return ref, nil
}

// scan reads the VM's disks and notes vmshadow's leftovers: snapshots
// named vmshadow-* and snapshot VDIs with data tagged vmshadow-set.
func (p *Provider) scan(ctx context.Context) error {
	c := p.c
	r, err := c.VMRecord(ctx, p.vmRef)
	if err != nil {
		return fmt.Errorf("read VM %s: %w", p.vm.UUID, err)
	}
	p.vm = r
	p.disks, p.leftovers = nil, nil
	for _, vref := range r.VBDs {
		b, err := c.VBDRecord(ctx, vref)
		if api.IsGone(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read VBD: %w", err)
		}
		if b.Type != "Disk" || b.Empty || api.IsNull(b.VDI) {
			continue
		}
		d, err := c.VDIRecord(ctx, b.VDI)
		if err != nil {
			return fmt.Errorf("read VDI of disk %s: %w", b.Userdevice, err)
		}
		p.disks = append(p.disks, Disk{Name: DiskName(b.Userdevice), Userdevice: b.Userdevice, VDI: d.UUID, Size: int64(d.VirtualSize), ref: b.VDI})
	}
	sort.Slice(p.disks, func(i, j int) bool {
		a, _ := strconv.Atoi(p.disks[i].Userdevice)
		b, _ := strconv.Atoi(p.disks[j].Userdevice)
		return a < b
	})
	lo, err := p.findLeftovers(ctx)
	if err != nil {
		return err
	}
	for _, l := range lo {
		p.leftovers = append(p.leftovers, l.what)
	}
	return nil
}

// leftover is an object of vmshadow's that no journal may account for.
type leftover struct {
	what   string
	vm     string   // snapshot VM ref, or ""
	vdis   []string // data-bearing snapshot VDI refs
	labels []string // their UUIDs, for messages
}

func (p *Provider) findLeftovers(ctx context.Context) ([]leftover, error) {
	c := p.c
	var out []leftover
	seen := map[string]bool{}
	for _, sref := range p.vm.Snapshots {
		s, err := c.VMRecord(ctx, sref)
		if api.IsGone(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read snapshot of VM %s: %w", p.vm.UUID, err)
		}
		if !strings.HasPrefix(s.NameLabel, Prefix) {
			continue
		}
		l := leftover{what: fmt.Sprintf("snapshot %s (%s)", s.NameLabel, s.UUID), vm: sref}
		for _, vref := range s.VBDs {
			b, err := c.VBDRecord(ctx, vref)
			if err != nil || b.Type != "Disk" || api.IsNull(b.VDI) {
				continue
			}
			if d, err := c.VDIRecord(ctx, b.VDI); err == nil && d.Type != "cbt_metadata" {
				l.vdis = append(l.vdis, b.VDI)
				l.labels = append(l.labels, d.UUID)
				seen[b.VDI] = true
			}
		}
		out = append(out, l)
	}
	for _, d := range p.disks {
		live, err := c.VDIRecord(ctx, d.ref)
		if err != nil {
			return nil, fmt.Errorf("read VDI %s: %w", d.VDI, err)
		}
		for _, sref := range live.Snapshots {
			if seen[sref] {
				continue
			}
			s, err := c.VDIRecord(ctx, sref)
			if api.IsGone(err) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("read snapshot VDI: %w", err)
			}
			if _, ours := s.OtherConfig[keySet]; ours && s.Type != "cbt_metadata" {
				out = append(out, leftover{what: "snapshot VDI " + s.UUID + " of disk " + d.Name, vdis: []string{sref}, labels: []string{s.UUID}})
			}
		}
	}
	return out, nil
}

// state is the provider's journal record of a set.
type state struct {
	Pool         string      `json:"pool"`
	VM           string      `json:"vm_uuid"`
	Snapshot     string      `json:"snapshot_name"`           // vmshadow-<set id>
	SnapshotUUID string      `json:"snapshot_uuid,omitempty"` // once VM.snapshot returned
	Task         string      `json:"task,omitempty"`          // Async.VM.snapshot in flight
	Paused       bool        `json:"paused,omitempty"`        // VM.pause asked for, VM.unpause not yet done
	Disks        []diskState `json:"disks"`
	// Tracking: Prefix names the repository's checkpoints; Done says the
	// backup is stored, so Release keeps the new checkpoints' CBT metadata
	// and removes the previous ones.
	Prefix string `json:"prefix,omitempty"`
	Done   bool   `json:"done,omitempty"`
}

type diskState struct {
	Disk
	SnapshotVDI string `json:"snapshot_vdi,omitempty"`
	// Previous is the last backup's checkpoint (snapshot VDI UUID) when it
	// is usable; a stored backup supersedes it. Base is the checkpoint the
	// changes are listed against: Previous, or empty for a full read
	// (FullReason says why).
	Previous   string `json:"previous,omitempty"`
	Base       string `json:"base,omitempty"`
	FullReason string `json:"full_reason,omitempty"`
	// CBT: the disk tracks changes, so its snapshot keeps CBT metadata.
	CBT bool `json:"cbt,omitempty"`
}

// keyPrefix starts the key (coord.VMInfo.Key) of a XenServer VM: its UUID
// follows.
const keyPrefix = "xapi-"

// UUIDOf returns the UUID of the XenServer VM Identify reported as vm;
// false for a VM of another provider.
func UUIDOf(vm coord.VMInfo) (string, bool) {
	return strings.CutPrefix(vm.Key, keyPrefix)
}
