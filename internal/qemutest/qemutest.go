// Package qemutest starts real QEMU virtual machines for tests: TCG, no guest
// OS (paused with -S unless asked otherwise), any number of virtio disks in
// qcow2 or raw, a QMP socket for the code under test and a second QMP socket
// for the test itself (QEMU serves one client per monitor socket).
//
// Guest writes are made the way a guest would make them, through the
// device (HMP "qemu-io -d <qdev>"), so that they pass through any filter
// vmshadow inserted above the disk; writing to the node would bypass it.
//
// It also owns the check every snapshot and backup test ends with: a set
// gives back everything it took (Baseline, AssertAsBefore), for these VMs
// and, through Attach, for any QEMU process.
package qemutest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/qmp"
	"github.com/vmshadow/vmshadow/internal/testutil"
)

// Disk describes one disk of a test VM.
type Disk struct {
	ID     string // qdev id of the virtio-blk device; also the disk's name
	Format string // "qcow2" (default) or "raw"
	Size   int64  // bytes; default 64 MiB
	// Legacy attaches the image with -drive if=none (auto-named nodes, a
	// named BlockBackend) instead of -blockdev.
	Legacy bool
	// CreateOptions are passed to qemu-img create -o (e.g. "compat=0.10").
	CreateOptions string

	Path string // image file, set by Start
	Node string // format node name (-blockdev only), set by Start
}

// Options for Start.
type Options struct {
	Disks []Disk
	// Running starts the guest CPUs (there is no OS: the firmware spins).
	// The default is paused (-S), which is enough for block-layer tests.
	Running bool
	// Agent adds a virtio-serial port org.qemu.guest_agent.0 whose host
	// side is the UNIX socket AgentPath (nothing answers inside).
	Agent bool
	Extra []string // more QEMU arguments
	Name  string   // -name; default "testvm"
}

// VM is a running QEMU process.
type VM struct {
	Dir         string
	Name        string
	QMPPath     string // for the code under test
	TestQMPPath string // for the test's own inspection
	AgentPath   string
	StdoutPath  string // QEMU's stdout: qemu-io reports land here
	Disks       []Disk

	t       testing.TB
	bin     string
	args    []string
	initial int // disks on the command line (AddDisk adds more)
	cmd     *exec.Cmd
	qmp     *qmp.Client
	exit    chan error
}

// Start boots a VM and registers its shutdown with t.Cleanup.
func Start(t testing.TB, opts Options) *VM {
	t.Helper()
	testutil.SkipShort(t)
	bin := testutil.NeedCommand(t, "qemu-system-x86_64")
	testutil.NeedCommand(t, "qemu-img")
	// UNIX socket paths are limited to 108 bytes: keep the directory short.
	dir, err := os.MkdirTemp("", "vmst")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	vm := &VM{
		Dir:         dir,
		Name:        opts.Name,
		QMPPath:     filepath.Join(dir, "qmp.sock"),
		TestQMPPath: filepath.Join(dir, "test-qmp.sock"),
		StdoutPath:  filepath.Join(dir, "qemu.out"),
		t:           t,
	}
	if vm.Name == "" {
		vm.Name = "testvm"
	}
	args := []string{
		"-name", vm.Name, "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-m", "64",
		"-qmp", "unix:" + vm.QMPPath + ",server=on,wait=off",
		"-qmp", "unix:" + vm.TestQMPPath + ",server=on,wait=off",
	}
	if !opts.Running {
		args = append(args, "-S")
	}
	if opts.Agent {
		vm.AgentPath = filepath.Join(dir, "qga.sock")
		args = append(args,
			"-chardev", "socket,id=qga0,path="+vm.AgentPath+",server=on,wait=off",
			"-device", "virtio-serial-pci,id=vser0",
			"-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
	}
	for i, d := range opts.Disks {
		if d.ID == "" {
			d.ID = fmt.Sprintf("disk%d", i)
		}
		if d.Format == "" {
			d.Format = "qcow2"
		}
		if d.Size == 0 {
			d.Size = 64 << 20
		}
		d.Path = filepath.Join(dir, d.ID+"."+d.Format)
		create := []string{"create", "-q", "-f", d.Format}
		if d.CreateOptions != "" {
			create = append(create, "-o", d.CreateOptions)
		}
		if out, err := exec.Command("qemu-img", append(create, d.Path, fmt.Sprint(d.Size))...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create %s: %v: %s", d.Path, err, out)
		}
		if d.Legacy {
			args = append(args, "-drive", fmt.Sprintf("file=%s,format=%s,if=none,id=drv-%s", d.Path, d.Format, d.ID),
				"-device", fmt.Sprintf("virtio-blk-pci,drive=drv-%s,id=%s,share-rw=on", d.ID, d.ID))
		} else {
			d.Node = "fmt-" + d.ID
			args = append(args,
				"-blockdev", fmt.Sprintf("driver=file,filename=%s,node-name=file-%s", d.Path, d.ID),
				"-blockdev", fmt.Sprintf("driver=%s,file=file-%s,node-name=%s", d.Format, d.ID, d.Node),
				"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,id=%s,share-rw=on", d.Node, d.ID))
		}
		vm.Disks = append(vm.Disks, d)
	}
	args = append(args, opts.Extra...)
	vm.bin, vm.args, vm.initial = bin, args, len(vm.Disks)
	vm.launch()
	t.Cleanup(vm.Kill)
	return vm
}

// launch starts QEMU with vm.args and waits for its QMP sockets.
func (vm *VM) launch() {
	t := vm.t
	t.Helper()
	os.Remove(vm.QMPPath)
	os.Remove(vm.TestQMPPath)
	out, err := os.OpenFile(vm.StdoutPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	vm.cmd = exec.Command(vm.bin, vm.args...)
	vm.cmd.Stdout = out
	vm.cmd.Stderr = out
	vm.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := vm.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	vm.exit = make(chan error, 1)
	go func(cmd *exec.Cmd, exit chan error) { exit <- cmd.Wait() }(vm.cmd, vm.exit)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, e1 := os.Stat(vm.QMPPath)
		_, e2 := os.Stat(vm.TestQMPPath)
		if e1 == nil && e2 == nil {
			break
		}
		select {
		case err := <-vm.exit:
			b, _ := os.ReadFile(vm.StdoutPath)
			t.Fatalf("qemu exited at start: %v\n%s", err, b)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu did not create its QMP sockets within 30s")
		}
	}
	// The sockets exist before QEMU listens on them (bind, then listen)
	// and before the machine is set up; QMP answers after.
	for vm.qmp == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := qmp.Dial(ctx, vm.TestQMPPath)
		cancel()
		if err == nil {
			vm.qmp = c
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("test qmp: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var status struct{ Status string }
	vm.Exec("query-status", nil, &status)
}

// Restart shuts QEMU down cleanly (persistent bitmaps are saved into qcow2
// images) and starts it again with the same disks, as an operator would.
// Disks added with AddDisk are not part of the restarted VM.
func (vm *VM) Restart() {
	vm.t.Helper()
	vm.QMP().Execute(context.Background(), "quit", nil, nil)
	vm.wait()
	vm.Disks = vm.Disks[:vm.initial]
	vm.launch()
}

// CrashRestart kills QEMU (SIGKILL: bitmaps in qcow2 images are left
// marked in use, and load as inconsistent) and starts it again.
func (vm *VM) CrashRestart() {
	vm.t.Helper()
	vm.Kill()
	vm.Disks = vm.Disks[:vm.initial]
	vm.launch()
}

func (vm *VM) wait() {
	if vm.qmp != nil {
		vm.qmp.Close()
		vm.qmp = nil
	}
	select {
	case <-vm.exit:
	case <-time.After(30 * time.Second):
		vm.t.Fatal("qemu did not exit")
	}
}

// AddDisk hot-plugs a new qcow2 disk (blockdev-add and device_add).
func (vm *VM) AddDisk(d Disk) Disk {
	vm.t.Helper()
	if d.Size == 0 {
		d.Size = 64 << 20
	}
	d.Format = "qcow2"
	d.Path = filepath.Join(vm.Dir, d.ID+".qcow2")
	d.Node = "fmt-" + d.ID
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", d.Path, fmt.Sprint(d.Size)).CombinedOutput(); err != nil {
		vm.t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	vm.Exec("blockdev-add", map[string]any{"driver": "file", "filename": d.Path, "node-name": "file-" + d.ID}, nil)
	vm.Exec("blockdev-add", map[string]any{"driver": "qcow2", "file": "file-" + d.ID, "node-name": d.Node}, nil)
	vm.Exec("device_add", map[string]any{"driver": "virtio-blk-pci", "drive": d.Node, "id": d.ID, "share-rw": true}, nil)
	vm.Disks = append(vm.Disks, d)
	return d
}

// Resize grows a disk (block_resize), as an operator would.
func (vm *VM) Resize(id string, size int64) {
	vm.t.Helper()
	d := vm.Disk(id)
	args := map[string]any{"size": size}
	if d.Node != "" {
		args["node-name"] = d.Node
	} else {
		args["device"] = "drv-" + id
	}
	vm.Exec("block_resize", args, nil)
	for i := range vm.Disks {
		if vm.Disks[i].ID == id {
			vm.Disks[i].Size = size
		}
	}
}

// Pause stops the guest's CPUs (QMP stop), as an operator suspending the
// VM would: the VM is then "paused". (Start without Running leaves it in
// "prelaunch", never run; Pause runs it for a moment first.)
func (vm *VM) Pause() {
	vm.t.Helper()
	var status struct{ Status string }
	vm.Exec("query-status", nil, &status)
	if status.Status == "prelaunch" {
		vm.Exec("cont", nil, nil)
	}
	vm.Exec("stop", nil, nil)
}

// Kill stops QEMU (SIGKILL) and waits for it. Safe to call twice.
func (vm *VM) Kill() {
	if vm.qmp != nil {
		vm.qmp.Close()
		vm.qmp = nil
	}
	if vm.cmd != nil && vm.cmd.ProcessState == nil {
		vm.cmd.Process.Kill()
		select {
		case <-vm.exit:
		case <-time.After(10 * time.Second):
		}
	}
}

// PID is QEMU's process id.
func (vm *VM) PID() int { return vm.cmd.Process.Pid }

// QMP is the test's own QMP connection (on TestQMPPath).
func (vm *VM) QMP() *qmp.Client {
	vm.t.Helper()
	if vm.qmp == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := qmp.Dial(ctx, vm.TestQMPPath)
		if err != nil {
			vm.t.Fatalf("test qmp: %v", err)
		}
		vm.qmp = c
	}
	return vm.qmp
}

// Exec runs a QMP command on the test connection and fails the test on error.
func (vm *VM) Exec(command string, args, result any) {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := vm.QMP().Execute(ctx, command, args, result); err != nil {
		vm.t.Fatalf("%s: %v", command, err)
	}
}

// Disk returns the disk with the given id.
func (vm *VM) Disk(id string) Disk {
	vm.t.Helper()
	for _, d := range vm.Disks {
		if d.ID == id {
			return d
		}
	}
	vm.t.Fatalf("no disk %q", id)
	return Disk{}
}

// QOMPath is the qdev path of a disk's virtio-blk backend.
func QOMPath(id string) string { return "/machine/peripheral/" + id + "/virtio-backend" }

// GuestIO runs a qemu-io command (e.g. "write -P 0xab 0 1M") through the
// disk's device, as the guest would, and returns the error qemu-io reported.
func (vm *VM) GuestIO(id, command string) error {
	vm.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	before, _ := os.ReadFile(vm.StdoutPath)
	out, err := vm.QMP().HMP(ctx, fmt.Sprintf("qemu-io -d %s %q", QOMPath(id), command))
	if err != nil {
		return err
	}
	if strings.TrimSpace(out) != "" {
		return fmt.Errorf("qemu-io %s: %s", command, strings.TrimSpace(out))
	}
	after, _ := os.ReadFile(vm.StdoutPath)
	if len(after) >= len(before) {
		report := string(after[len(before):])
		if strings.Contains(report, "failed") || strings.Contains(report, "error") {
			return fmt.Errorf("qemu-io %s: %s", command, strings.TrimSpace(report))
		}
	}
	return nil
}

// Write writes length bytes of pattern at off through the device.
func (vm *VM) Write(id string, pattern byte, off, length int64) {
	vm.t.Helper()
	if err := vm.GuestIO(id, fmt.Sprintf("write -P 0x%02x %d %d", pattern, off, length)); err != nil {
		vm.t.Fatal(err)
	}
}

// Snapshot copies a disk's current content to a raw file with qemu-img
// (sharing the image with the running QEMU). Take it while the VM is paused
// and nothing writes, to get the expected image of a point in time.
func (vm *VM) Snapshot(id string) string {
	vm.t.Helper()
	d := vm.Disk(id)
	dst := filepath.Join(vm.Dir, fmt.Sprintf("%s-expected-%d.raw", id, time.Now().UnixNano()))
	// Flush QEMU's caches (qcow2 metadata) so the file holds what the guest wrote.
	if err := vm.GuestIO(id, "flush"); err != nil {
		vm.t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "convert", "-U", "-f", d.Format, "-O", "raw", d.Path, dst).CombinedOutput(); err != nil {
		vm.t.Fatalf("qemu-img convert %s: %v: %s", d.Path, err, out)
	}
	return dst
}

// Graph is a comparable description of the VM's block graph: what vmshadow
// must leave exactly as it found it.
type Graph struct {
	Nodes   []string          // node names (auto-generated "#block" names included)
	Devices map[string]string // qdev path -> root node name
	Exports []string
	Jobs    []string
	Bitmaps []string // node/bitmap
	Status  string
}

// Graph reads the current block graph.
func (vm *VM) Graph() Graph {
	vm.t.Helper()
	return readGraph(vm.Exec)
}

// Graph reads the current block graph.
func (p *Peer) Graph() Graph {
	p.t.Helper()
	return readGraph(p.Exec)
}

func readGraph(exec func(string, any, any)) Graph {
	var nodes []struct {
		NodeName     string `json:"node-name"`
		DirtyBitmaps []struct {
			Name      string `json:"name"`
			Recording bool   `json:"recording"`
		} `json:"dirty-bitmaps"`
	}
	exec("query-named-block-nodes", map[string]bool{"flat": true}, &nodes)
	var blocks []struct {
		Qdev     string `json:"qdev"`
		Inserted *struct {
			NodeName string `json:"node-name"`
		} `json:"inserted"`
	}
	exec("query-block", nil, &blocks)
	var exports []struct {
		ID string `json:"id"`
	}
	exec("query-block-exports", nil, &exports)
	var jobs []struct {
		ID string `json:"id"`
	}
	exec("query-block-jobs", nil, &jobs)
	var anyJobs []struct {
		ID string `json:"id"`
	}
	exec("query-jobs", nil, &anyJobs)
	var status struct{ Status string }
	exec("query-status", nil, &status)
	g := Graph{Devices: map[string]string{}, Status: status.Status}
	for _, n := range nodes {
		g.Nodes = append(g.Nodes, n.NodeName)
		for _, b := range n.DirtyBitmaps {
			g.Bitmaps = append(g.Bitmaps, n.NodeName+"/"+b.Name)
		}
	}
	for _, b := range blocks {
		if b.Inserted != nil {
			g.Devices[b.Qdev] = b.Inserted.NodeName
		}
	}
	for _, e := range exports {
		g.Exports = append(g.Exports, e.ID)
	}
	for _, j := range jobs {
		g.Jobs = append(g.Jobs, j.ID)
	}
	for _, j := range anyJobs {
		if !slices.Contains(g.Jobs, j.ID) {
			g.Jobs = append(g.Jobs, j.ID)
		}
	}
	slices.Sort(g.Nodes)
	slices.Sort(g.Bitmaps)
	slices.Sort(g.Exports)
	slices.Sort(g.Jobs)
	return g
}

// String renders the graph for test failure messages.
func (g Graph) String() string {
	b, _ := json.MarshalIndent(g, "", "  ")
	return string(b)
}

// Equal reports whether two graphs are the same.
func (g Graph) Equal(o Graph) bool {
	a, _ := json.Marshal(g)
	b, _ := json.Marshal(o)
	return bytes.Equal(a, b)
}

// SameGraph fails the test when the VM's block graph differs from want.
func (vm *VM) SameGraph(want Graph) {
	vm.t.Helper()
	if got := vm.Graph(); !got.Equal(want) {
		vm.t.Fatalf("block graph changed:\nwant %s\ngot  %s", want, got)
	}
}
