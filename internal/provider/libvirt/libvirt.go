// Package libvirt is the snapshot-set provider for libvirt domains, driven
// through libvirt's own API only (go-libvirt's pure-Go RPC client over
// libvirtd's socket), never through qemu-monitor-command, which taints the
// domain and races libvirt for QEMU's monitor. It owns the mapping of the
// shadow-copy model onto libvirt's backup API:
//
//   - the instant: one virDomainBackupBegin call in pull mode, with the
//     checkpoint XML in the same call, so libvirt puts every disk's backup
//     job and the new checkpoint's bitmaps into one QMP transaction;
//     BackupBegin has no quiesce flag, so the coordinator freezes the
//     writers, Commit begins the job, and the writers are thawed after;
//   - diff area: one scratch file per disk, created and deleted by libvirt
//     (<scratch file=...>), in a directory vmshadow makes per set under
//     Options.ScratchDir and hands to the user libvirt runs QEMU as (the DAC
//     label of the live XML), so that QEMU may create the NBD socket there;
//   - the shadow copy: libvirt's NBD server on the UNIX socket
//     SCRATCH/vmshadow-<set>/nbd.sock, one read-only export per disk named
//     after the disk's target (vda), with, for an incremental, the dirty
//     bitmap qemu:dirty-bitmap:backup-<target> of the changes since the
//     base checkpoint;
//   - release: a pull-mode job ends only with virDomainAbortJob; libvirt
//     then deletes the scratch files, vmshadow the directory. A set that did
//     not complete deletes the checkpoint it created; the base checkpoint's
//     bitmap has recorded every write since the base all along (libvirt
//     6.0 on keeps one active bitmap per checkpoint and merges nothing on
//     deletion), so no change is ever lost.
//
// Change tracking: checkpoints are named <prefix>-<set id>, with the
// prefix vmshadow-<repository id> chosen by the caller (Track), so
// each repository has its own chain. Checkpoint metadata lives in libvirtd's
// state directory; it is lost when the domain is undefined and defined again
// or moves host, while QEMU keeps the bitmaps. CheckpointXML and
// RedefineCheckpoint let the backup keep each checkpoint's XML and put it
// back (REDEFINE with REDEFINE_VALIDATE) before the next incremental.
//
// Writers: FSFreeze freezes the guest's file systems with
// virDomainFSFreeze/virDomainFSThaw rather than the backup's QUIESCE flag
// (virDomainBackupBegin has none, and the checkpoint's QUIESCE flag applies
// to checkpoint-only creation): separate calls fit the coordinator's
// freeze-commit-thaw sequence, its time limits and its journal (recover can
// thaw a guest left frozen), and hooks run between them as for QEMU.
//
// Permissions: libvirtd (root on a system connection) creates and labels
// the scratch files; QEMU, running as qemu.conf's user (Debian:
// libvirt-qemu), creates the NBD socket. Prepare gives the set's directory
// to that user (the DAC label of the live XML), but every directory above
// it must let that user through (no 0700 parent such as /root), and where
// AppArmor or SELinux confine QEMU the scratch directory must be allowed in
// the domain's profile (e.g. a directory under /var/lib/libvirt/qemu). A
// denial fails the set with errs.ErrConnect saying so, and leaves nothing.
//
// Needs libvirt 7.2 or newer (pull-mode backup enabled for QEMU). An
// incremental set in which some disks cannot be incremental (raw, qcow2 v2,
// added since the base) marks those disks backupmode='full', an attribute of
// later libvirt releases (tested with 9.0, Debian 12's).
package libvirt

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"syscall"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/redact"
	"github.com/vmshadow/vmshadow/internal/tracking"
)

// Prefix starts the name of everything vmshadow creates through libvirt.
const Prefix = "vmshadow-"

// DefaultURI is the connection URI when none is given.
const DefaultURI = "qemu:///system"

// MinVersion is the oldest libvirt whose QEMU driver does pull-mode backups.
const MinVersion = 7_002_000

// Options configure the provider.
type Options struct {
	// URI is libvirt's connection URI (default qemu:///system):
	// qemu:///system, qemu+unix:///system?socket=PATH, qemu+tls://HOST/system,
	// qemu+ssh://USER@HOST/system, qemu+libssh://... as go-libvirt dials
	// them. Shadow copies are NBD exports on a UNIX socket on the libvirt
	// host, so only local URIs can expose them.
	URI string
	// Domain is the domain's name or UUID.
	Domain string
	// ScratchDir holds each set's directory (scratch files, NBD socket) on
	// the libvirt host.
	ScratchDir string
	// Warn is told of problems that do not stop the set.
	Warn func(string)
	// Tracking, if set, creates a checkpoint at the set's instant and reads
	// only the changes since the previous one where the chain holds (see
	// Track).
	Tracking *tracking.Request
	// Recorded, if set, tells Release(nil) which vmshadow checkpoints a
	// repository still needs; the others are deleted. Without it
	// checkpoints are never deleted by Release(nil).
	Recorded func(name string) bool
}

// Provider implements coord.Provider for one libvirt domain.
type Provider struct {
	opts Options
	l    *golibvirt.Libvirt
	dom  golibvirt.Domain

	vm        coord.VMInfo
	version   uint64
	live      *domainXML
	disks     []Disk
	skipped   []string
	leftovers []string
}

// New returns a provider for the domain opts.Domain. It connects on first use.
func New(opts Options) *Provider {
	if opts.URI == "" {
		opts.URI = DefaultURI
	}
	return &Provider{opts: opts}
}

// Track implements livebackup.Provider: the next set creates the
// checkpoint r.Prefix-<set id> at its instant and exports, for each disk
// whose chain holds, the changes since its previous checkpoint.
func (p *Provider) Track(r tracking.Request) { p.opts.Tracking = &r }

// Kind implements coord.Provider.
func (p *Provider) Kind() string { return "libvirt" }

// Disks returns the disks found by Identify that a set captures.
func (p *Provider) Disks() []Disk { return p.disks }

// Domain is the domain found by Identify.
func (p *Provider) Domain() golibvirt.Domain { return p.dom }

// Version is libvirt's version as major*1,000,000+minor*1,000+release.
func (p *Provider) Version() uint64 { return p.version }

// shownURI is the connection URI as errors show it (internal/redact).
func (p *Provider) shownURI() string { return redact.URL(p.opts.URI, "socket") }

func (p *Provider) warn(format string, args ...any) {
	if p.opts.Warn != nil {
		p.opts.Warn(fmt.Sprintf(format, args...))
	}
}

// ParseURI checks a libvirt connection URI: the QEMU driver over a
// transport go-libvirt dials. It reports whether the libvirt host is this
// machine (a UNIX-socket transport).
func ParseURI(uri string) (u *url.URL, local bool, err error) {
	s := redact.URL(uri, "socket") // as shown in errors
	u, err = url.Parse(uri)
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err // without the URI
	}
	if err != nil {
		return nil, false, fmt.Errorf("libvirt URI %q: %v: %w", s, err, errs.ErrUsage)
	}
	driver, transport, _ := strings.Cut(u.Scheme, "+")
	if driver != "qemu" {
		return nil, false, fmt.Errorf("libvirt URI %q: driver %q is not supported: vmshadow backs up QEMU domains (qemu:///system, qemu+unix, qemu+tls, qemu+ssh, qemu+libssh): %w", s, driver, errs.ErrUsage)
	}
	if transport == "" && u.Host != "" {
		transport = "tls"
	}
	switch transport {
	case "", "unix":
		local = true
	case "tls", "tcp", "ssh", "libssh", "libssh2":
	default:
		return nil, false, fmt.Errorf("libvirt URI %q: transport %q is not supported (unix, tls, tcp, ssh, libssh): %w", s, transport, errs.ErrUsage)
	}
	if u.Path != "/system" && u.Path != "/session" {
		return nil, false, fmt.Errorf("libvirt URI %q: path must be /system or /session: %w", s, errs.ErrUsage)
	}
	return u, local, nil
}

// socketPath is the libvirtd socket a local URI dials.
func socketPath(u *url.URL) string {
	if s := u.Query().Get("socket"); s != "" {
		return s
	}
	return "/var/run/libvirt/libvirt-sock"
}

// connect opens the connection, honouring ctx (go-libvirt's calls do not
// take one).
func (p *Provider) connect(ctx context.Context) (*golibvirt.Libvirt, error) {
	if p.l != nil {
		select {
		case <-p.l.Disconnected():
			p.l = nil
		default:
			return p.l, nil
		}
	}
	l, ver, err := dial(ctx, p.opts.URI)
	if err != nil {
		return nil, err
	}
	p.l, p.version = l, ver
	return l, nil
}

// Connect opens a connection to the libvirt at uri (see ParseURI), with
// the errors, version check and ctx handling of the provider's own, for
// the other packages that drive libvirt (the restore target
// internal/restore/libvirtpool). The caller disconnects it.
func Connect(ctx context.Context, uri string) (*golibvirt.Libvirt, error) {
	l, _, err := dial(ctx, uri)
	return l, err
}

func dial(ctx context.Context, uri string) (*golibvirt.Libvirt, uint64, error) {
	u, local, err := ParseURI(uri)
	if err != nil {
		return nil, 0, err
	}
	shown := redact.URL(uri, "socket")
	l, err := call(ctx, func() (*golibvirt.Libvirt, error) { return golibvirt.ConnectToURI(u) })
	if err != nil {
		return nil, 0, connectError(shown, u, local, err)
	}
	ver, err := call(ctx, l.ConnectGetLibVersion)
	if err != nil {
		l.Disconnect()
		return nil, 0, fmt.Errorf("libvirt at %s: get version: %w", shown, classify(err))
	}
	if err := checkVersion(shown, ver); err != nil {
		l.Disconnect()
		return nil, 0, err
	}
	return l, ver, nil
}

func connectError(s string, u *url.URL, local bool, err error) error {
	if local && errors.Is(err, syscall.EACCES) {
		return fmt.Errorf("connect to libvirt at %s: permission denied on %s: run as root or as a member of the libvirt group: %v: %w", s, socketPath(u), err, errs.ErrConnect)
	}
	if local && (errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)) {
		return fmt.Errorf("connect to libvirt at %s: libvirtd is not running (no %s): start it (systemctl start libvirtd, or libvirtd -d): %v: %w", s, socketPath(u), err, errs.ErrConnect)
	}
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("connect to libvirt at %s: %v: %w", s, err, errs.ErrConnect)
	}
	return fmt.Errorf("connect to libvirt at %s: %w", s, classify(err))
}

// checkVersion refuses a libvirt too old for pull-mode backups.
func checkVersion(uri string, ver uint64) error {
	if ver < MinVersion {
		return fmt.Errorf("libvirt at %s is version %s: vmshadow needs libvirt %s or newer (pull-mode backups of QEMU domains with virDomainBackupBegin): upgrade libvirt: %w",
			uri, versionString(ver), versionString(MinVersion), errs.ErrUnsupported)
	}
	return nil
}

func versionString(v uint64) string {
	return fmt.Sprintf("%d.%d.%d", v/1_000_000, v/1000%1000, v%1000)
}

// call runs fn and returns its result, or ctx's error if ctx ends first
// (fn then finishes in the background).
func call[T any](ctx context.Context, fn func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		v, err := fn()
		ch <- result{v, err}
	}()
	select {
	case r := <-ch:
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

// Call runs a go-libvirt call fn, whose calls take no context, and
// returns its result, or ctx's error if ctx ends first (fn then finishes
// in the background).
func Call[T any](ctx context.Context, fn func() (T, error)) (T, error) { return call(ctx, fn) }

// Do is Call for calls that return only an error.
func Do(ctx context.Context, fn func() error) error { return do(ctx, fn) }

// Classify wraps a libvirt error with the internal/errs class that fits
// (not found, unsupported, access denied, connection lost).
func Classify(err error) error { return classify(err) }

func do(ctx context.Context, fn func() error) error {
	_, err := call(ctx, func() (struct{}, error) { return struct{}{}, fn() })
	return err
}

// libvirtCode is the error number of a libvirt error, or -1.
func libvirtCode(err error) int {
	var le golibvirt.Error
	if errors.As(err, &le) {
		return int(le.Code)
	}
	return -1
}

func isCode(err error, code golibvirt.ErrorNumber) bool { return libvirtCode(err) == int(code) }

// classify wraps a libvirt error with the internal/errs class that fits.
func classify(err error) error {
	if err == nil {
		return nil
	}
	switch golibvirt.ErrorNumber(libvirtCode(err)) {
	case golibvirt.ErrNoDomain, golibvirt.ErrNoDomainCheckpoint, golibvirt.ErrNoDomainBackup:
		return fmt.Errorf("%w: %w", err, errs.ErrNotFound)
	case golibvirt.ErrNoSupport, golibvirt.ErrOperationUnsupported:
		return fmt.Errorf("%w: %w", err, errs.ErrUnsupported)
	case golibvirt.ErrAgentUnresponsive, golibvirt.ErrAgentUnsynced:
		return fmt.Errorf("%w: %w", err, errs.ErrConnect)
	case golibvirt.ErrAccessDenied, golibvirt.ErrAuthFailed:
		return fmt.Errorf("%w (libvirt denied access: check polkit/ACLs for this user): %w", err, errs.ErrAuth)
	}
	if errors.Is(err, golibvirt.ErrInterrupted) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("%w: %w", err, errs.ErrConnect)
	}
	return err
}

// Close implements coord.Provider.
func (p *Provider) Close() error {
	if p.l == nil {
		return nil
	}
	err := p.l.Disconnect()
	p.l = nil
	return err
}

// Identify implements coord.Provider: it connects, finds the domain by name
// or UUID, checks that it runs, and lists its disks.
func (p *Provider) Identify(ctx context.Context) (coord.VMInfo, error) {
	l, err := p.connect(ctx)
	if err != nil {
		return coord.VMInfo{}, err
	}
	if p.opts.Domain == "" {
		return coord.VMInfo{}, fmt.Errorf("no libvirt domain given (--vm NAME or UUID): %w", errs.ErrUsage)
	}
	dom, err := lookup(ctx, l, p.opts.Domain)
	if err != nil {
		return coord.VMInfo{}, err
	}
	p.dom = dom
	state, _, err := call2(ctx, func() (int32, int32, error) { return l.DomainGetState(dom, 0) })
	if err != nil {
		return coord.VMInfo{}, fmt.Errorf("domain %s: get state: %w", dom.Name, classify(err))
	}
	switch golibvirt.DomainState(state) {
	case golibvirt.DomainRunning, golibvirt.DomainPaused:
	default:
		return coord.VMInfo{}, fmt.Errorf("domain %s is %s, not running: a snapshot set needs a running (or paused) domain; start it with 'virsh start %s': %w",
			dom.Name, stateName(state), dom.Name, errs.ErrNotFound)
	}
	uuid := uuidString(dom.UUID)
	sum := sha256.Sum256([]byte(p.opts.URI + "\x00" + uuid))
	p.vm = coord.VMInfo{Name: dom.Name, Key: "libvirt-" + coord.SafeName(dom.Name, 40) + "-" + hex.EncodeToString(sum[:6])}
	if err := p.scan(ctx); err != nil {
		return coord.VMInfo{}, err
	}
	return p.vm, nil
}

func call2[A, B any](ctx context.Context, fn func() (A, B, error)) (A, B, error) {
	type ab struct {
		a A
		b B
	}
	r, err := call(ctx, func() (ab, error) {
		a, b, err := fn()
		return ab{a, b}, err
	})
	return r.a, r.b, err
}

func stateName(s int32) string {
	names := map[golibvirt.DomainState]string{golibvirt.DomainNostate: "in no state", golibvirt.DomainRunning: "running",
		golibvirt.DomainBlocked: "blocked", golibvirt.DomainPaused: "paused", golibvirt.DomainShutdown: "shutting down",
		golibvirt.DomainShutoff: "shut off", golibvirt.DomainCrashed: "crashed", golibvirt.DomainPmsuspended: "suspended by the guest"}
	if n, ok := names[golibvirt.DomainState(s)]; ok {
		return n
	}
	return fmt.Sprintf("in state %d", s)
}

// lookup finds a domain by UUID (when name parses as one) or by name.
func lookup(ctx context.Context, l *golibvirt.Libvirt, name string) (golibvirt.Domain, error) {
	if u, ok := parseUUID(name); ok {
		dom, err := call(ctx, func() (golibvirt.Domain, error) { return l.DomainLookupByUUID(u) })
		if err == nil {
			return dom, nil
		}
		if !golibvirt.IsNotFound(err) {
			return golibvirt.Domain{}, fmt.Errorf("look up domain %s: %w", name, classify(err))
		}
	}
	dom, err := call(ctx, func() (golibvirt.Domain, error) { return l.DomainLookupByName(name) })
	if err != nil {
		if golibvirt.IsNotFound(err) {
			return golibvirt.Domain{}, fmt.Errorf("no libvirt domain named %q (see 'virsh list --all'): %w", name, errs.ErrNotFound)
		}
		return golibvirt.Domain{}, fmt.Errorf("look up domain %s: %w", name, classify(err))
	}
	return dom, nil
}

func parseUUID(s string) (golibvirt.UUID, bool) {
	var u golibvirt.UUID
	h := strings.ReplaceAll(s, "-", "")
	if len(h) != 32 {
		return u, false
	}
	b, err := hex.DecodeString(h)
	if err != nil {
		return u, false
	}
	copy(u[:], b)
	return u, true
}

func uuidString(u golibvirt.UUID) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// local reports whether the libvirt host is this machine.
func (p *Provider) local() bool {
	_, local, _ := ParseURI(p.opts.URI)
	return local
}
