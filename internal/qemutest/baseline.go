package qemutest

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qmp"
)

// Peer is a QEMU process a test inspects through a QMP socket of its own:
// a VM of Start (VM.Peer), or one started otherwise (Attach), such as the
// real test guest.
type Peer struct {
	t    testing.TB
	exec func(string, any, any)
	pid  func() int
}

// Peer is the VM as a Peer.
func (vm *VM) Peer() *Peer { return &Peer{t: vm.t, exec: vm.Exec, pid: vm.PID} }

// Attach connects to the QMP socket qmpPath of the QEMU process pid (a
// socket nothing else uses); the connection closes when the test ends.
func Attach(t testing.TB, qmpPath string, pid int) *Peer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, qmpPath)
	if err != nil {
		t.Fatalf("test qmp %s: %v", qmpPath, err)
	}
	t.Cleanup(func() { c.Close() })
	exec := func(command string, args, result any) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.Execute(ctx, command, args, result); err != nil {
			t.Fatalf("%s: %v", command, err)
		}
	}
	return &Peer{t: t, exec: exec, pid: func() int { return pid }}
}

// Exec runs a QMP command and fails the test on error.
func (p *Peer) Exec(command string, args, result any) {
	p.t.Helper()
	p.exec(command, args, result)
}

// Baseline is everything a snapshot set takes from QEMU and the host while
// it exists, as it was before the set: a set gives all of it back.
type Baseline struct {
	Graph      Graph    // nodes, devices, exports, jobs, bitmaps, run state
	FDSets     []string // query-fdsets: "fdset N fd F opaque O"
	FDs        []string // QEMU's descriptors into the scratch dir, on deleted vmshadow-* files, or on sockets bound in the scratch dir
	Scratch    []string // the scratch dir's files: "name: N bytes allocated"
	ScratchDir string

	chains bool
}

// Baseline records what a set may take; scratchDir is the set's diff area
// (it need not exist yet).
func (vm *VM) Baseline(scratchDir string) Baseline {
	vm.t.Helper()
	return vm.Peer().Baseline(scratchDir)
}

// AssertAsBefore fails t when anything in b differs now.
func (vm *VM) AssertAsBefore(t testing.TB, b Baseline) {
	t.Helper()
	vm.Peer().AssertAsBefore(t, b)
}

// Baseline records what a set may take; scratchDir is the set's diff area.
func (p *Peer) Baseline(scratchDir string) Baseline {
	p.t.Helper()
	dir, err := filepath.Abs(scratchDir)
	if err != nil {
		p.t.Fatal(err)
	}
	b := Baseline{Graph: p.Graph(), ScratchDir: dir}
	var sets []struct {
		FDSetID int `json:"fdset-id"`
		FDs     []struct {
			FD     int    `json:"fd"`
			Opaque string `json:"opaque"`
		} `json:"fds"`
	}
	p.Exec("query-fdsets", nil, &sets)
	for _, s := range sets {
		for _, fd := range s.FDs {
			b.FDSets = append(b.FDSets, fmt.Sprintf("fdset %d fd %d opaque %q", s.FDSetID, fd.FD, fd.Opaque))
		}
		if len(s.FDs) == 0 {
			b.FDSets = append(b.FDSets, fmt.Sprintf("fdset %d (only duplicates open)", s.FDSetID))
		}
	}
	b.FDs = qemuFDs(p.t, p.pid(), dir)
	b.Scratch = scratchFiles(p.t, dir)
	return b
}

// WithChains allows the set to move the backup chains on: dirty bitmaps
// named vmshadow-<repository>-<set> may change, as long as every node
// carries at most one per repository and keeps the repositories it had.
// Every other bitmap stays as it was.
func (b Baseline) WithChains() Baseline {
	b.chains = true
	return b
}

// AssertAsBefore fails t, listing every difference, when anything in b
// differs now.
func (p *Peer) AssertAsBefore(t testing.TB, b Baseline) {
	t.Helper()
	now := p.Baseline(b.ScratchDir)
	var diffs []string
	cmp := func(what string, want, got any) {
		if w, g := fmt.Sprintf("%q", want), fmt.Sprintf("%q", got); w != g {
			diffs = append(diffs, fmt.Sprintf("%s: was %s, now %s", what, w, g))
		}
	}
	wg, gg := b.Graph, now.Graph
	cmp("block nodes", wg.Nodes, gg.Nodes)
	cmp("devices", wg.Devices, gg.Devices)
	cmp("exports", wg.Exports, gg.Exports)
	cmp("jobs", wg.Jobs, gg.Jobs)
	cmp("run state", wg.Status, gg.Status)
	if b.chains {
		wo, wc := splitChains(wg.Bitmaps)
		go_, gc := splitChains(gg.Bitmaps)
		cmp("dirty bitmaps", wo, go_)
		for key, names := range gc {
			if len(names) > 1 {
				diffs = append(diffs, fmt.Sprintf("dirty bitmaps: %s carries %d bitmaps of one chain: %q", key, len(names), names))
			}
		}
		for key := range wc {
			if _, ok := gc[key]; !ok {
				diffs = append(diffs, fmt.Sprintf("dirty bitmaps: the chain %s is gone (had %q)", key, wc[key]))
			}
		}
	} else {
		cmp("dirty bitmaps", wg.Bitmaps, gg.Bitmaps)
	}
	cmp("fdsets", b.FDSets, now.FDSets)
	cmp("QEMU's open descriptors", b.FDs, now.FDs)
	cmp("scratch dir "+b.ScratchDir, b.Scratch, now.Scratch)
	if len(diffs) > 0 {
		t.Fatalf("the VM is not as it was before the set:\n  %s", strings.Join(diffs, "\n  "))
	}
}

// splitChains separates bitmaps named vmshadow-<repository>-<set> from the
// others, grouping them by node and repository.
func splitChains(bitmaps []string) (others []string, chains map[string][]string) {
	chains = map[string][]string{}
	for _, nb := range bitmaps {
		node, name, _ := strings.Cut(nb, "/")
		if !strings.HasPrefix(name, "vmshadow-") {
			others = append(others, nb)
			continue
		}
		repo := name
		if i := strings.LastIndex(name, "-"); i > len("vmshadow") {
			repo = name[:i]
		}
		chains[node+"/"+repo] = append(chains[node+"/"+repo], name)
	}
	return others, chains
}

// qemuFDs lists the descriptors of process pid that point into dir, at a
// deleted vmshadow-* file, or at a UNIX socket bound in dir.
func qemuFDs(t testing.TB, pid int, dir string) []string {
	t.Helper()
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(fdDir)
	if err != nil {
		t.Fatalf("QEMU's descriptors: %v", err)
	}
	var sockets map[string]string
	var out []string
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(fdDir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		if strings.HasPrefix(target, "socket:[") {
			if sockets == nil {
				sockets = unixSocketPaths(pid)
			}
			if p := sockets[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")]; p != "" && strings.HasPrefix(p, dir+"/") {
				out = append(out, "socket "+p)
			}
			continue
		}
		deleted := strings.HasSuffix(target, " (deleted)")
		if strings.HasPrefix(target, dir+"/") || deleted && strings.HasPrefix(filepath.Base(strings.TrimSuffix(target, " (deleted)")), "vmshadow-") {
			out = append(out, target)
		}
	}
	slices.Sort(out)
	return out
}

// unixSocketPaths maps socket inodes to the path they are bound to.
func unixSocketPaths(pid int) map[string]string {
	m := map[string]string{}
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/unix", pid))
	if err != nil {
		return m
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Num RefCount Protocol Flags Type St Inode Path
		fields := strings.Fields(sc.Text())
		if len(fields) >= 8 {
			m[fields[6]] = fields[7]
		}
	}
	return m
}

// scratchFiles lists dir's files with the space each takes on disk.
func scratchFiles(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatalf("scratch dir: %v", err)
	}
	var out []string
	for _, e := range ents {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(dir, e.Name()), &st); err != nil {
			continue
		}
		out = append(out, fmt.Sprintf("%s: %d bytes allocated", e.Name(), st.Blocks*512))
	}
	return out
}
