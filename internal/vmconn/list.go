package vmconn

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"

	libvirtprov "github.com/vmshadow/vmshadow/internal/provider/libvirt"
	xapiprov "github.com/vmshadow/vmshadow/internal/provider/xapi"
	"github.com/vmshadow/vmshadow/internal/xapi"
)

// QMPSockets lists the QMP sockets that paths (paths or globs) match
// now, by VM name: the socket file's name without its extension
// (/run/qemu/db1.qmp is db1). Two sockets giving one name are an error.
func QMPSockets(paths []string) (map[string]string, error) {
	out := map[string]string{}
	for _, p := range paths {
		matches, err := filepath.Glob(p)
		if err != nil {
			return nil, fmt.Errorf("socket glob %q: %w", p, err)
		}
		for _, m := range matches {
			name := strings.TrimSuffix(filepath.Base(m), filepath.Ext(m))
			if prev, ok := out[name]; ok && prev != m {
				return nil, fmt.Errorf("sockets %s and %s both name a VM %q: name each VM's socket after the VM", prev, m, name)
			}
			out[name] = m
		}
	}
	return out, nil
}

// LibvirtDomains lists the names of the persistent and running domains of
// the libvirt at uri, sorted.
func LibvirtDomains(ctx context.Context, uri string) ([]string, error) {
	l, err := libvirtprov.Connect(ctx, uri)
	if err != nil {
		return nil, err
	}
	defer l.Disconnect()
	doms, err := libvirtprov.Call(ctx, func() ([]golibvirt.Domain, error) {
		d, _, err := l.ConnectListAllDomains(1, 0)
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("list libvirt's domains: %w", libvirtprov.Classify(err))
	}
	names := make([]string, 0, len(doms))
	for _, d := range doms {
		names = append(names, d.Name)
	}
	sort.Strings(names)
	return names, nil
}

// XAPIVM is a XenServer / XCP-ng pool's VM as listed.
type XAPIVM struct {
	UUID      string
	NameLabel string
}

// XAPIVMs lists a XenServer / XCP-ng pool's VMs that can be backed up:
// not templates, snapshots or control domains, sorted by name-label then
// UUID. Several VMs may share a name-label.
func XAPIVMs(ctx context.Context, cfg xapi.Config) ([]XAPIVM, error) {
	c, err := xapi.Login(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer c.Logout(context.WithoutCancel(ctx))
	recs, err := c.VMRecords(ctx)
	if err != nil {
		return nil, fmt.Errorf("list the pool's VMs: %w", err)
	}
	var out []XAPIVM
	for _, v := range recs {
		if v.IsATemplate || v.IsASnapshot || v.IsControlDomain {
			continue
		}
		out = append(out, XAPIVM{UUID: v.UUID, NameLabel: v.NameLabel})
	}
	sort.Slice(out, func(i, k int) bool {
		if out[i].NameLabel != out[k].NameLabel {
			return out[i].NameLabel < out[k].NameLabel
		}
		return out[i].UUID < out[k].UUID
	})
	return out, nil
}

// XAPIName is a XenServer VM's name in the repository, and why it is not
// its plain name-label (Note, empty when it is).
type XAPIName struct {
	Repo, Note string
}

// XAPIRepoNames names each VM of a pool in the repository (keyed by its
// UUID in lower case), the one rule for the CLI and the server: its
// name-label made a repository name (xapi.RepoName), unless another VM of
// the pool gets that name too; then LABEL-UUID8 (its UUID's first 8 hex
// digits), or LABEL-UUID when that name is another VM's or two such VMs'
// UUIDs start alike. So every VM keeps a chain of its own.
func XAPIRepoNames(vms []XAPIVM) map[string]XAPIName {
	shared := map[string][]string{} // repository name: UUIDs
	for _, v := range vms {
		n := xapiprov.RepoName(v.NameLabel)
		shared[n] = append(shared[n], v.UUID)
	}
	short := map[string]int{} // LABEL-UUID8 names: how many VMs would get each
	for n, uuids := range shared {
		if len(uuids) > 1 {
			for _, u := range uuids {
				short[n+"-"+uuid8(u)]++
			}
		}
	}
	out := map[string]XAPIName{}
	for _, v := range vms {
		name := XAPIName{Repo: xapiprov.RepoName(v.NameLabel)}
		if others := shared[name.Repo]; len(others) > 1 {
			base := name.Repo                      // at most 64 characters
			name.Repo = base + "-" + uuid8(v.UUID) // at most 73
			if short[name.Repo] > 1 || len(shared[name.Repo]) > 0 {
				// Taken by another VM's label, or two UUIDs share 8
				// digits: the whole UUID (at most 101 characters).
				name.Repo = base + "-" + xapiprov.RepoName(strings.ToLower(v.UUID))
			}
			name.Note = fmt.Sprintf("VM %s is named %s in the repository: %d VMs of the pool (UUIDs %s) would be named %s after their name-labels", v.UUID, name.Repo, len(others), strings.Join(others, ", "), base)
		}
		out[strings.ToLower(v.UUID)] = name
	}
	return out
}

// uuid8 is the first 8 hex digits of a UUID, in lower case.
func uuid8(uuid string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(uuid) {
		if b.Len() < 8 && (r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			b.WriteRune(r)
		}
	}
	return b.String()
}
