package server

import (
	"context"
	"fmt"
	"maps"
	"slices"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
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
	c, err := s.restoreConnection(lt.Connection, config.Libvirt, "a restore into libvirt needs a libvirt connection")
	if err != nil {
		return nil, err
	}
	src, err := s.openRestore(ctx, req)
	if err != nil {
		return nil, err
	}
	defer src.close()
	r, bid, m, sel, lctx := src.r, src.bid, src.m, src.sel, src.ctx
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
	c, err := s.restoreConnection(xt.Connection, config.XAPI, "a restore into a XenServer pool needs an xapi connection")
	if err != nil {
		return nil, err
	}
	pool, err := xapiConfig(c)
	if err != nil {
		return nil, err
	}
	src, err := s.openRestore(ctx, req)
	if err != nil {
		return nil, err
	}
	defer src.close()
	r, bid, m, sel, lctx := src.r, src.bid, src.m, src.sel, src.ctx
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

// restoreConnection is the configuration's connection name, which a
// restore target needs of type typ (why says so).
func (s *Server) restoreConnection(name, typ, why string) (*config.Connection, error) {
	c := s.Config().Connections[name]
	switch {
	case c == nil:
		return nil, fmt.Errorf("no connection %q in the configuration (list them with GET %s/connections): %w", name, api.Prefix, errs.ErrNotFound)
	case c.Type != typ:
		return nil, fmt.Errorf("connection %s is of type %s: %s: %w", name, c.Type, why, errs.ErrUsage)
	}
	return c, nil
}

// restoreSource is a backup opened for a restore: its repository (held,
// and locked shared), manifest and selected disks, and the lock's context
// to restore under.
type restoreSource struct {
	r     *repo.Repo
	bid   repo.ID
	m     *repo.Manifest
	sel   []repo.ManifestDisk
	ctx   context.Context
	close func()
}

// openRestore finds req's backup, selects its disks and takes the
// repository's shared lock; close releases both.
func (s *Server) openRestore(ctx context.Context, req api.RestoreRequest) (*restoreSource, error) {
	r, release, bid, m, err := s.findBackup(ctx, req.Repository, req.Backup)
	if err != nil {
		return nil, err
	}
	sel, err := restore.Select(m, req.Disks)
	if err != nil {
		release()
		return nil, err
	}
	l, lctx, err := r.Lock(ctx, false, "restore")
	if err != nil {
		release()
		return nil, err
	}
	return &restoreSource{r: r, bid: bid, m: m, sel: sel, ctx: lctx, close: func() { l.Unlock(); release() }}, nil
}
