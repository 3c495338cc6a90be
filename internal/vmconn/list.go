package vmconn

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"

	libvirtprov "github.com/vmshadow/vmshadow/internal/provider/libvirt"
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
