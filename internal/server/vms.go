package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"maps"
	"os"
	"path"
	"slices"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
	xapiprov "github.com/vmshadow/vmshadow/internal/provider/xapi"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/vmconn"
	"github.com/vmshadow/vmshadow/internal/xapi"
)

// vmRef is one VM a backup job selects.
type vmRef struct {
	Name   string // its name in the repository
	Listed string // how its connection reaches it: its name, a XenServer VM's UUID
	UUID   string // a XenServer VM's UUID
	Note   string // why Name is not the VM's plain name, for the run's log
	Conn   *config.Connection
	Target vmconn.Target
}

// key identifies the VM across jobs: never two sets on one VM at once.
func (v vmRef) key() string { return v.Conn.Name + "/" + v.Listed }

// selectVMs lists the VMs job j selects now: each selector's names and
// globs matched against what its connection reaches (a VM that appeared
// since the last run is included). A selector naming a VM that cannot be
// found, or several, or a connection that cannot be listed, is an error
// for that selector; the other selectors' VMs are still returned. A VM
// two selectors pick is selected once; two VMs that would get one name in
// the repository are refused (the second one): their chains would mix.
func (s *Server) selectVMs(ctx context.Context, cfg *config.Config, j *config.Job) ([]vmRef, []error) {
	var out []vmRef
	var problems []error
	seen := map[string]string{}
	for _, sel := range j.VMs {
		c := cfg.Connections[sel.Connection]
		if c == nil {
			problems = append(problems, fmt.Errorf("connection %q is not in the configuration: %w", sel.Connection, errs.ErrUsage))
			continue
		}
		refs, err := listConnection(ctx, c, sel.Names)
		if err != nil {
			problems = append(problems, fmt.Errorf("connection %s: %w", c.Name, err))
			continue
		}
		for _, r := range refs {
			if prev, ok := seen[r.Name]; ok {
				if prev != r.key() {
					problems = append(problems, fmt.Errorf("VMs %s and %s would both be named %s in the repository, which would mix their backups: select one of them, or rename one: %w", prev, r.key(), r.Name, errs.ErrUsage))
				}
				continue
			}
			seen[r.Name] = r.key()
			out = append(out, r)
		}
	}
	return out, problems
}

// listedVM is one VM a connection reaches.
type listedVM struct {
	id    string // how the connection reaches it: its name, a XenServer VM's UUID
	label string // what names and globs match: its name, a XenServer VM's name-label
	uuid  string // a XenServer VM's UUID, which a name matches exactly too
	repo  string // its name in the repository
	note  string // why repo is not the VM's plain name
}

// listConnection returns the VMs of c that names select: each name or
// glob matches a VM's name (a XenServer VM's name-label); a name that is
// a XenServer VM's UUID (in any case) picks that VM. No names: every VM.
// A name (not a glob) that matches no VM, or several, is an error.
func listConnection(ctx context.Context, c *config.Connection, names []string) ([]vmRef, error) {
	vms, sockets, err := listVMs(ctx, c)
	if err != nil {
		return nil, err
	}
	uuids := map[string]bool{}
	for _, vm := range vms {
		if vm.uuid != "" {
			uuids[strings.ToLower(vm.uuid)] = true
		}
	}
	matches := func(n string, vm listedVM) bool {
		switch {
		case isGlob(n):
			ok, _ := path.Match(n, vm.label)
			return ok
		case uuids[strings.ToLower(n)]:
			return strings.EqualFold(n, vm.uuid)
		}
		return n == vm.label
	}
	var out []vmRef
	for _, vm := range vms {
		if len(names) > 0 && !slices.ContainsFunc(names, func(n string) bool { return matches(n, vm) }) {
			continue
		}
		t, err := target(c, vm.id, sockets[vm.id])
		if err != nil {
			return nil, err
		}
		out = append(out, vmRef{Name: vm.repo, Listed: vm.id, UUID: vm.uuid, Note: vm.note, Conn: c, Target: t})
	}
	for _, n := range names {
		if isGlob(n) {
			continue
		}
		var hit []string
		for _, vm := range vms {
			if matches(n, vm) {
				hit = append(hit, vm.uuid)
			}
		}
		switch {
		case len(hit) == 0 && c.Type == config.XAPI:
			return out, fmt.Errorf("VM %q is not found (%d VMs reachable): give a VM's name-label or UUID (templates, snapshots and control domains are not backed up): %w", n, len(vms), errs.ErrNotFound)
		case len(hit) == 0:
			return out, fmt.Errorf("VM %q is not found (%d VMs reachable): %w", n, len(vms), errs.ErrNotFound)
		case len(hit) > 1:
			return out, fmt.Errorf("%d VMs of the pool are named %q (UUIDs %s): a name must pick one VM: select one by its UUID (vms: [%s]), or rename them: %w",
				len(hit), n, strings.Join(hit, ", "), hit[0], errs.ErrUsage)
		}
	}
	return out, nil
}

// selected tells whether vm matches one of names (none: every VM).
func selected(vm string, names []string) bool {
	if len(names) == 0 {
		return true
	}
	for _, n := range names {
		if ok, _ := path.Match(n, vm); ok {
			return true
		}
	}
	return false
}

// isGlob tells whether a selector's name is a glob.
func isGlob(n string) bool { return strings.ContainsAny(n, "*?[") }

// listVMs lists every VM c reaches, with, for a QMP connection, their
// sockets by name. XenServer VMs are named in the repository by
// vmconn.XAPIRepoNames (a name-label several VMs share gets the UUID's
// first digits), as the CLI names them.
func listVMs(ctx context.Context, c *config.Connection) ([]listedVM, map[string]string, error) {
	var out []listedVM
	plain := func(names []string) {
		for _, n := range names {
			out = append(out, listedVM{id: n, label: n, repo: xapiprov.RepoName(n)})
		}
	}
	switch c.Type {
	case config.QMP:
		sockets, err := vmconn.QMPSockets(c.Sockets)
		if err != nil {
			return nil, nil, err
		}
		plain(slices.Sorted(maps.Keys(sockets)))
		return out, sockets, nil
	case config.Libvirt:
		doms, err := vmconn.LibvirtDomains(ctx, c.URI)
		if err != nil {
			return nil, nil, err
		}
		plain(doms)
		return out, nil, nil
	case config.XAPI:
		cfg, err := xapiConfig(c)
		if err != nil {
			return nil, nil, err
		}
		vms, err := vmconn.XAPIVMs(ctx, *cfg)
		if err != nil {
			return nil, nil, err
		}
		names := vmconn.XAPIRepoNames(vms)
		for _, v := range vms {
			n := names[strings.ToLower(v.UUID)]
			out = append(out, listedVM{id: v.UUID, label: v.NameLabel, uuid: v.UUID, repo: n.Repo, note: n.Note})
		}
		return out, nil, nil
	}
	return nil, nil, fmt.Errorf("connection type %q: %w", c.Type, errs.ErrUnsupported)
}

// target is how to reach vm of connection c.
func target(c *config.Connection, vm, socket string) (vmconn.Target, error) {
	switch c.Type {
	case config.QMP:
		return vmconn.Target{QMP: socket}, nil
	case config.Libvirt:
		return vmconn.Target{Libvirt: c.URI, VM: vm}, nil
	default:
		cfg, err := xapiConfig(c)
		if err != nil {
			return vmconn.Target{}, err
		}
		return vmconn.Target{XAPI: cfg, XAPIInsecure: c.Insecure, VM: vm}, nil
	}
}

// xapiConfig is the client configuration of a XenServer connection, its
// password read now (a changed password file takes effect on the next
// run).
func xapiConfig(c *config.Connection) (*xapi.Config, error) {
	pw, err := c.Password.Read()
	if err != nil {
		return nil, fmt.Errorf("pool password: %w", err)
	}
	cfg := &xapi.Config{URL: c.URL, User: c.User, Password: pw}
	switch {
	case c.Insecure:
		cfg.TLS = &tls.Config{InsecureSkipVerify: true}
	case c.CA != "":
		pem, err := os.ReadFile(c.CA)
		if err != nil {
			return nil, fmt.Errorf("pool CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("pool CA %s holds no PEM certificate: %w", c.CA, errs.ErrUsage)
		}
		cfg.TLS = &tls.Config{RootCAs: pool}
	}
	return cfg, nil
}

// writers are job j's writers for a VM of connection c.
func writers(j *config.Job, c *config.Connection, vm string) vmconn.Writers {
	w := vmconn.Writers{Hooks: j.Hooks, GuestHooks: j.GuestHooks}
	if j.GuestAgent {
		switch c.Type {
		case config.QMP:
			w.QGA = c.GuestAgentPath(vm)
		case config.Libvirt:
			w.GuestAgent = true
		}
	}
	return w
}
