package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
)

// Release implements coord.Provider. It removes, in order, exports, the NBD
// server, snapshot-access nodes, the filters from the devices' I/O path
// (resuming the VM if vmshadow left it paused), filter and target nodes,
// and scratch files; then anything else named vmshadow-* that QEMU still
// has. Objects already gone are skipped.
func (p *Provider) Release(ctx context.Context, set *coord.Set) ([]string, error) {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil {
		return nil, err
	}
	r := &releaser{p: p, kept: map[int]bool{}}
	if st != nil {
		r.state(ctx, set.ID, st)
	}
	r.leftovers(ctx)
	return r.removed, joinErrs(r.errs)
}

func joinErrs(list []error) error { return errors.Join(list...) }

type releaser struct {
	p       *Provider
	removed []string
	errs    []error
	kept    map[int]bool // fdsets QEMU keeps (warned about once)
}

func (r *releaser) try(what string, err error) {
	switch {
	case err == nil:
		r.removed = append(r.removed, what)
	case isMissing(err):
	default:
		r.errs = append(r.errs, fmt.Errorf("remove %s: %w", what, err))
	}
}

func (r *releaser) state(ctx context.Context, setID string, st *state) {
	p := r.p
	var exports []string
	for _, d := range st.Disks {
		exports = append(exports, d.Export)
	}
	r.delExports(ctx, exports)
	if st.Server {
		r.try("nbd server", p.exec(ctx, "nbd-server-stop", nil, nil))
		// A getfd that never reached nbd-server-start leaves a named fd.
		if err := p.exec(ctx, "closefd", map[string]any{"fdname": Prefix + setID}, nil); err == nil {
			r.removed = append(r.removed, "fd "+Prefix+setID)
		}
	}
	if st.Socket != "" {
		if err := os.Remove(st.Socket); err == nil {
			r.removed = append(r.removed, st.Socket)
		}
	}
	for _, d := range st.Disks {
		r.try("node "+d.Snap, p.exec(ctx, "blockdev-del", map[string]any{"node-name": d.Snap}, nil))
	}
	var inserted []diskState
	for _, d := range st.Disks {
		if d.Inserted {
			inserted = append(inserted, d)
		}
	}
	if len(inserted) > 0 {
		if err := p.detach(ctx, inserted); err != nil {
			r.errs = append(r.errs, err)
		}
	}
	if st.Paused {
		var status struct {
			Running bool   `json:"running"`
			Status  string `json:"status"`
		}
		if err := p.exec(ctx, "query-status", nil, &status); err == nil && !status.Running && status.Status == "paused" {
			r.try("pause (VM resumed)", p.exec(ctx, "cont", nil, nil))
		}
	}
	r.checkpoints(ctx, st)
	for _, d := range st.Disks {
		r.try("node "+d.CBW, p.exec(ctx, "blockdev-del", map[string]any{"node-name": d.CBW}, nil))
		r.try("node "+d.Target, p.exec(ctx, "blockdev-del", map[string]any{"node-name": d.Target}, nil))
	}
	r.fdsets(ctx, func(opaque string) bool {
		return slices.ContainsFunc(st.Disks, func(d diskState) bool { return d.Target == opaque })
	})
	nodes, err := p.namedNodes(ctx)
	if err != nil {
		r.errs = append(r.errs, err)
		if !processGone(st.QEMUPID) {
			return // the scratch files may still be in use
		}
	}
	for _, d := range st.Disks {
		if slices.ContainsFunc(nodes, func(n namedNode) bool { return n.NodeName == d.Target }) {
			r.errs = append(r.errs, fmt.Errorf("scratch file %s kept: QEMU still has its node %s", d.Scratch, d.Target))
			continue
		}
		r.scratchFile(d.Scratch)
	}
	if st.QEMUPID != 0 && st.QEMUPID == r.pid(ctx) {
		r.stillOpen(st.QEMUPID, func(path string) bool {
			return slices.ContainsFunc(st.Disks, func(d diskState) bool { return d.Scratch == path })
		})
	}
}

// processGone reports whether process pid has ended (nothing it held is
// open any more).
func processGone(pid int) bool {
	return pid > 0 && errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}

// pid is the QEMU process id of the provider's connection (0 if unknown).
func (r *releaser) pid(ctx context.Context) int {
	c, err := r.p.QMP(ctx)
	if err != nil {
		return 0
	}
	return c.PID()
}

// scratchFile empties and removes a scratch file whose node QEMU no longer
// has. Emptying it first gives its space back even if a descriptor on it
// is still open somewhere.
func (r *releaser) scratchFile(path string) {
	if err := os.Truncate(path, 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		r.errs = append(r.errs, fmt.Errorf("empty scratch file: %w", err))
	}
	if err := os.Remove(path); err == nil {
		r.removed = append(r.removed, path)
	} else if !errors.Is(err, os.ErrNotExist) {
		r.errs = append(r.errs, fmt.Errorf("remove scratch file: %w", err))
	}
}

// stillOpen reports, as a warning, scratch files QEMU (process pid) still
// has open after their nodes are gone. It looks only when it may read the
// process's descriptors (same user, or root).
func (r *releaser) stillOpen(pid int, ours func(path string) bool) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		if path := strings.TrimSuffix(target, " (deleted)"); ours(path) {
			r.p.warn("QEMU (pid %d) still holds descriptor %s on scratch file %s; it was emptied, and QEMU closes it when the VM runs again", pid, e.Name(), path)
		}
	}
}

// delExports removes exports (dropping their clients) and waits until QEMU
// has let go of them.
func (r *releaser) delExports(ctx context.Context, ids []string) {
	p := r.p
	for _, id := range ids {
		r.try("export "+id, p.exec(ctx, "block-export-del", map[string]any{"id": id, "mode": "hard"}, nil))
	}
	for {
		live, err := p.exports(ctx)
		if err != nil {
			r.errs = append(r.errs, err)
			return
		}
		if !slices.ContainsFunc(live, func(e string) bool { return slices.Contains(ids, e) }) {
			return
		}
		select {
		case <-ctx.Done():
			r.errs = append(r.errs, fmt.Errorf("exports still in use: %w", ctx.Err()))
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// fdsets removes the fdsets holding descriptors vmshadow passed (matched
// by their opaque) and reports those QEMU really closed: before QEMU 9.1 it
// closes them only while the VM runs, so on a paused VM they stay, and are
// reported as a warning, not as removed.
func (r *releaser) fdsets(ctx context.Context, match func(opaque string) bool) {
	ours := func() (map[int]string, error) {
		var sets []struct {
			FDSetID int `json:"fdset-id"`
			FDs     []struct {
				Opaque string `json:"opaque"`
			} `json:"fds"`
		}
		if err := r.p.exec(ctx, "query-fdsets", nil, &sets); err != nil {
			return nil, err
		}
		m := map[int]string{}
		for _, s := range sets {
			for _, fd := range s.FDs {
				if match(fd.Opaque) {
					m[s.FDSetID] = fd.Opaque
				}
			}
		}
		return m, nil
	}
	before, err := ours()
	if err != nil {
		r.errs = append(r.errs, err)
		return
	}
	if len(before) == 0 {
		return
	}
	for id := range before {
		if err := r.p.exec(ctx, "remove-fd", map[string]any{"fdset-id": id}, nil); err != nil && !isMissing(err) {
			r.errs = append(r.errs, fmt.Errorf("remove fdset %d: %w", id, err))
		}
	}
	after, err := ours()
	if err != nil {
		r.errs = append(r.errs, err)
		return
	}
	for id, opaque := range before {
		if _, left := after[id]; left {
			if !r.kept[id] {
				r.p.warn("QEMU keeps fdset %d (%s) open while the VM is paused; it closes it when the VM runs again", id, opaque)
			}
			r.kept[id] = true
			continue
		}
		r.removed = append(r.removed, fmt.Sprintf("fdset %d", id))
	}
}

// leftovers removes vmshadow-* objects no journal accounts for: devices
// attached to a vmshadow filter go back to the filter's child, then the
// exports and nodes go.
func (r *releaser) leftovers(ctx context.Context) {
	p := r.p
	exports, err := p.exports(ctx)
	if err != nil {
		r.errs = append(r.errs, err)
		return
	}
	var ours []string
	for _, e := range exports {
		if strings.HasPrefix(e, Prefix) {
			ours = append(ours, e)
		}
	}
	if len(ours) > 0 {
		r.delExports(ctx, ours)
	}
	// A set whose journal is lost may have left QEMU's NBD server running:
	// it is vmshadow's when it listens on a socket named vmshadow-*.sock.
	if sock := r.serverSocket(ctx); sock != "" {
		r.try("nbd server (on "+sock+")", p.exec(ctx, "nbd-server-stop", nil, nil))
		if os.Remove(sock) == nil {
			r.removed = append(r.removed, sock)
		}
	}
	var blocks []blockInfo
	if err := p.exec(ctx, "query-block", nil, &blocks); err != nil {
		r.errs = append(r.errs, err)
		return
	}
	var graph struct {
		Nodes []struct {
			ID   int    `json:"id"`
			Name string `json:"name"`
		} `json:"nodes"`
		Edges []struct {
			Parent int    `json:"parent"`
			Child  int    `json:"child"`
			Name   string `json:"name"`
		} `json:"edges"`
	}
	for _, b := range blocks {
		if b.Inserted == nil || b.Qdev == "" || !strings.HasPrefix(b.Inserted.NodeName, Prefix) {
			continue
		}
		if graph.Nodes == nil {
			if err := p.exec(ctx, "x-debug-query-block-graph", nil, &graph); err != nil {
				r.errs = append(r.errs, err)
				return
			}
		}
		child := ""
		for _, n := range graph.Nodes {
			if n.Name != b.Inserted.NodeName {
				continue
			}
			for _, e := range graph.Edges {
				if e.Parent == n.ID && e.Name == "file" {
					for _, c := range graph.Nodes {
						if c.ID == e.Child {
							child = c.Name
						}
					}
				}
			}
		}
		if child == "" {
			r.errs = append(r.errs, fmt.Errorf("device %s is attached to %s and its disk cannot be found", b.Qdev, b.Inserted.NodeName))
			continue
		}
		r.try(fmt.Sprintf("filter of %s (reattached to %s)", b.Qdev, child), p.setDrive(ctx, b.Qdev, child))
	}
	nodes, err := p.namedNodes(ctx)
	if err != nil {
		r.errs = append(r.errs, err)
		return
	}
	// A set of another state directory has its scratch files elsewhere:
	// QEMU knows them, by the target node's file name (opened by path) or
	// by its open descriptors (passed).
	files := r.openScratchFiles(ctx, nodes)
	// Parents before children: snapshot-access, then filters, then targets.
	sets := map[string]bool{}
	for _, suffix := range []string{"-snap", "-cbw", "-tgt"} {
		for _, n := range nodes {
			if strings.HasPrefix(n.NodeName, Prefix) && strings.HasSuffix(n.NodeName, suffix) {
				r.try("node "+n.NodeName, p.exec(ctx, "blockdev-del", map[string]any{"node-name": n.NodeName}, nil))
				if id, _, ok := strings.Cut(strings.TrimPrefix(n.NodeName, Prefix), "-"); ok {
					sets[id] = true
				}
			}
		}
	}
	r.fdsets(ctx, func(opaque string) bool { return strings.HasPrefix(opaque, Prefix) })
	if len(sets) == 0 {
		return
	}
	if nodes, err = p.namedNodes(ctx); err != nil {
		r.errs = append(r.errs, err)
		return
	}
	for id := range sets {
		if slices.ContainsFunc(nodes, func(n namedNode) bool { return strings.HasPrefix(n.NodeName, Prefix+id+"-") }) {
			continue // not removed: an error was reported for the node
		}
		r.scratchFiles(id)
		for _, f := range files {
			if strings.HasPrefix(filepath.Base(f), Prefix+id+"-") && !slices.Contains(r.removed, f) {
				r.scratchFile(f)
			}
		}
	}
}

// serverSocket returns the path of a UNIX socket named vmshadow-*.sock
// that QEMU has open (its NBD server's, started by vmshadow), or "" when
// there is none or QEMU's descriptors may not be read.
func (r *releaser) serverSocket(ctx context.Context) string {
	pid := r.pid(ctx)
	if pid == 0 {
		return ""
	}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return ""
	}
	inodes := map[string]bool{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if ino, ok := strings.CutPrefix(target, "socket:["); err == nil && ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	table, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(table), "\n") {
		// Num RefCount Protocol Flags Type St Inode Path
		f := strings.Fields(line)
		if len(f) < 8 || !inodes[f[6]] {
			continue
		}
		if base := filepath.Base(f[7]); filepath.IsAbs(f[7]) && strings.HasPrefix(base, Prefix) && strings.HasSuffix(base, ".sock") {
			return f[7]
		}
	}
	return ""
}

// openScratchFiles returns the scratch files (vmshadow-*.cow) QEMU has
// open: the file names of vmshadow's target nodes, and the files of QEMU's
// descriptors when they may be read (same user, or root).
func (r *releaser) openScratchFiles(ctx context.Context, nodes []namedNode) []string {
	isScratch := func(path string) bool {
		base := filepath.Base(path)
		return filepath.IsAbs(path) && strings.HasPrefix(base, Prefix) && strings.HasSuffix(base, ".cow")
	}
	var files []string
	for _, n := range nodes {
		if strings.HasPrefix(n.NodeName, Prefix) && strings.HasSuffix(n.NodeName, "-tgt") && isScratch(n.File) {
			files = append(files, n.File)
		}
	}
	pid := r.pid(ctx)
	if pid == 0 {
		return files
	}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err == nil && isScratch(target) && !slices.Contains(files, target) {
			files = append(files, target)
		}
	}
	return files
}

// scratchFiles removes the scratch files and socket of set id from the
// scratch directory (other VMs' sets may share the directory).
func (r *releaser) scratchFiles(id string) {
	if r.p.opts.ScratchDir == "" {
		return
	}
	matches, _ := filepath.Glob(filepath.Join(r.p.opts.ScratchDir, Prefix+id+"-*.cow"))
	for _, m := range matches {
		r.scratchFile(m)
	}
	if sock := filepath.Join(r.p.opts.ScratchDir, Prefix+id+".sock"); os.Remove(sock) == nil {
		r.removed = append(r.removed, sock)
	}
}
