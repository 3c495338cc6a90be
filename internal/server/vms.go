package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path"
	"sort"
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
	Listed string // its name on the connection
	Conn   *config.Connection
	Target vmconn.Target
}

// key identifies the VM across jobs: never two sets on one VM at once.
func (v vmRef) key() string { return v.Conn.Name + "/" + v.Listed }

// selectVMs lists the VMs job j selects now: each selector's names and
// globs matched against what its connection reaches (a VM that appeared
// since the last run is included). A selector naming a VM that cannot be
// found, or a connection that cannot be listed, is an error for that
// selector; the other selectors' VMs are still returned.
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
					problems = append(problems, fmt.Errorf("VM name %s is selected on two connections (%s and %s); the repository would mix their backups: select it once", r.Name, prev, r.key()))
				}
				continue
			}
			seen[r.Name] = r.key()
			out = append(out, r)
		}
	}
	return out, problems
}

// listConnection returns the VMs of c that names (names or globs; none:
// every VM) select.
func listConnection(ctx context.Context, c *config.Connection, names []string) ([]vmRef, error) {
	var all []string
	var sockets map[string]string
	switch c.Type {
	case config.QMP:
		var err error
		if sockets, err = vmconn.QMPSockets(c.Sockets); err != nil {
			return nil, err
		}
		for n := range sockets {
			all = append(all, n)
		}
		sort.Strings(all)
	case config.Libvirt:
		var err error
		if all, err = vmconn.LibvirtDomains(ctx, c.URI); err != nil {
			return nil, err
		}
	case config.XAPI:
		cfg, err := xapiConfig(c)
		if err != nil {
			return nil, err
		}
		var dup map[string]int
		if all, dup, err = vmconn.XAPIVMs(ctx, *cfg); err != nil {
			return nil, err
		}
		for n, k := range dup {
			if selected(n, names) {
				return nil, fmt.Errorf("%d VMs of the pool are named %q: a name must pick one VM; rename them or select them by UUID in a job of their own: %w", k, n, errs.ErrUsage)
			}
		}
	default:
		return nil, fmt.Errorf("connection type %q: %w", c.Type, errs.ErrUnsupported)
	}
	var out []vmRef
	matched := map[string]bool{}
	for _, vm := range all {
		if !selected(vm, names) {
			continue
		}
		t, err := target(c, vm, sockets[vm])
		if err != nil {
			return nil, err
		}
		out = append(out, vmRef{Name: xapiprov.RepoName(vm), Listed: vm, Conn: c, Target: t})
		matched[vm] = true
	}
	for _, n := range names {
		if !strings.ContainsAny(n, "*?[") && !matched[n] {
			return out, fmt.Errorf("VM %q is not found (%d VMs reachable): %w", n, len(all), errs.ErrNotFound)
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
