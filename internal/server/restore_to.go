package server

import (
	"context"
	"fmt"
	"maps"
	"slices"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/restore"
	"github.com/vmshadow/vmshadow/internal/restore/libvirtpool"
	"github.com/vmshadow/vmshadow/internal/restore/xenpool"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/config"
)

// Connections implements api.Service: names and types only.
func (s *Server) Connections(ctx context.Context) ([]api.Connection, error) {
	cfg := s.Config()
	out := []api.Connection{}
	for _, n := range slices.Sorted(maps.Keys(cfg.Connections)) {
		out = append(out, api.Connection{Name: n, Type: cfg.Connections[n].Type})
	}
	return out, nil
}

// restoreToLibvirt restores a backup's disks into new volumes of a
// storage pool and a new domain (the backup's stored definition, else a
// minimal one) through a libvirt connection of the configuration, as
// 'vmshadow restore --to-libvirt' does (package restore/libvirtpool).
func (s *Server) restoreToLibvirt(ctx context.Context, req api.RestoreRequest) (*api.RestoreResult, error) {
	lt := req.Libvirt
	c := s.Config().Connections[lt.Connection]
	switch {
	case c == nil:
		return nil, fmt.Errorf("no connection %q in the configuration (list them with GET %s/connections): %w", lt.Connection, api.Prefix, errs.ErrNotFound)
	case c.Type != config.Libvirt:
		return nil, fmt.Errorf("connection %s is of type %s: a restore into libvirt needs a libvirt connection: %w", lt.Connection, c.Type, errs.ErrUsage)
	}
	r, release, bid, m, err := s.findBackup(ctx, req.Repository, req.Backup)
	if err != nil {
		return nil, err
	}
	defer release()
	sel, err := restore.Select(m, req.Disks)
	if err != nil {
		return nil, err
	}
	l, lctx, err := r.Lock(ctx, false, "restore")
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	out := &api.LibvirtResult{Connection: lt.Connection}
	o := libvirtpool.Options{URI: c.URI, Pool: lt.Pool, VMName: lt.VMName,
		Warn: func(w string) {
			out.Warnings = append(out.Warnings, w)
			s.log.Warn("restore into libvirt: "+w, "backup", bid.Short(), "connection", lt.Connection)
		}}
	if err := o.Stored(lctx, r, m); err != nil {
		return nil, err
	}
	t, err := libvirtpool.New(lctx, m, sel, o)
	if err != nil {
		return nil, err
	}
	defer t.Close()
	if _, err := restore.Run(lctx, r, sel, t, restore.Options{}); err != nil {
		return nil, err
	}
	if lt.Start {
		if err := t.Start(lctx); err != nil {
			return nil, fmt.Errorf("the disks are restored and domain defined, but it did not start: %w", err)
		}
	}
	res := t.Result()
	out.Pool, out.Domain, out.UUID, out.Definition, out.Started = res.Pool, res.Domain, res.UUID, res.Definition, res.Started
	for _, v := range res.Volumes {
		out.Volumes = append(out.Volumes, api.LibvirtVolume{Disk: v.Disk, Volume: v.Volume, Path: v.Path, Format: v.Format, Target: v.Target})
	}
	s.log.Info("restored into libvirt", "backup", bid.Short(), "connection", lt.Connection, "pool", out.Pool, "domain", out.Domain)
	return &api.RestoreResult{Files: []api.RestoredFile{}, Libvirt: out}, nil
}

// restoreToXAPI restores a backup's disks into new VDIs on a storage
// repository of a XenServer / XCP-ng pool (and, with a VM name, a new
// halted VM with them) through an xapi connection of the configuration,
// as 'vmshadow restore --to-xapi' does (package restore/xenpool).
func (s *Server) restoreToXAPI(ctx context.Context, req api.RestoreRequest) (*api.RestoreResult, error) {
	xt := req.XAPI
	c := s.Config().Connections[xt.Connection]
	switch {
	case c == nil:
		return nil, fmt.Errorf("no connection %q in the configuration (list them with GET %s/connections): %w", xt.Connection, api.Prefix, errs.ErrNotFound)
	case c.Type != config.XAPI:
		return nil, fmt.Errorf("connection %s is of type %s: a restore into a XenServer pool needs an xapi connection: %w", xt.Connection, c.Type, errs.ErrUsage)
	}
	pool, err := xapiConfig(c)
	if err != nil {
		return nil, err
	}
	r, release, bid, m, err := s.findBackup(ctx, req.Repository, req.Backup)
	if err != nil {
		return nil, err
	}
	defer release()
	sel, err := restore.Select(m, req.Disks)
	if err != nil {
		return nil, err
	}
	l, lctx, err := r.Lock(ctx, false, "restore")
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	t, err := xenpool.New(lctx, *pool, m, xenpool.Options{SR: xt.SR, VMName: xt.VMName})
	if err != nil {
		return nil, err
	}
	res, err := restore.Run(lctx, r, sel, t, restore.Options{})
	if err != nil {
		return nil, err
	}
	xr := t.Result(res)
	out := &api.XAPIResult{Connection: xt.Connection, SR: xr.SR, VM: xr.VM, Disks: []api.XAPIDisk{}}
	for _, d := range xr.Disks {
		out.Disks = append(out.Disks, api.XAPIDisk{Name: d.Name, VDI: d.VDI, Size: d.Size})
	}
	s.log.Info("restored into a XenServer pool", "backup", bid.Short(), "connection", xt.Connection, "sr", out.SR, "vm", out.VM)
	return &api.RestoreResult{Files: []api.RestoredFile{}, XAPI: out}, nil
}
