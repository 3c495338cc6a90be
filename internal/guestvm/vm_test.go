package guestvm

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

func TestParseStatus(t *testing.T) {
	st, err := parseStatus("agent=running app=running refuse_freeze=off paused=1 seq=1600 durable=1599 state=paused")
	if err != nil {
		t.Fatal(err)
	}
	want := Status{Agent: true, App: true, Paused: true, Seq: 1600, Durable: 1599, State: "paused"}
	if st != want {
		t.Errorf("got %+v, want %+v", st, want)
	}
	// Before walapp wrote its status file the fields are missing.
	if st, err := parseStatus("agent=stopped app=stopped refuse_freeze=on paused=0"); err != nil || st != (Status{RefuseFreeze: true}) {
		t.Errorf("got %+v, %v", st, err)
	}
	for _, bad := range []string{"seq=x", "garbage", "durable=-1"} {
		if _, err := parseStatus(bad); err == nil {
			t.Errorf("parseStatus(%q) accepted", bad)
		}
	}
}

func TestQEMUArgs(t *testing.T) {
	dir := "/tmp/a,b"
	vm := &VM{QMPSocket: dir + "/qmp.sock", TestQMPSocket: dir + "/qmp-test.sock", AgentSocket: dir + "/qga.sock",
		ControlSocket: dir + "/control.sock", ConsoleLog: dir + "/console.log",
		Disks: []Disk{{Path: dir + "/d0.qcow2", Format: "qcow2", NodeName: "disk0", DeviceID: "vdisk0"}}}
	g := &Guest{Kernel: "/k/vmlinux", Initrd: "/k/initrd.img"}
	args, err := vm.qemuArgs(g, Options{Accel: "tcg", KernelArgs: []string{"vmshadow.noagent=1"}})
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-accel tcg", "-kernel /k/vmlinux", "-initrd /k/initrd.img",
		"console=ttyS0 panic=-1 quiet no_timer_check vmshadow.noagent=1",
		"path=/tmp/a,,b/qmp.sock,server=on,wait=off", "-mon chardev=qmp,mode=control",
		"-mon chardev=qmptest,mode=control",
		"virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
		"virtserialport,chardev=control0,name=org.vmshadow.control",
		"virtio-blk-pci,drive=disk0,id=vdisk0",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("QEMU arguments lack %q:\n%s", want, joined)
		}
	}
	i := slices.Index(args, "-blockdev")
	var node map[string]any
	if i < 0 || json.Unmarshal([]byte(args[i+1]), &node) != nil {
		t.Fatalf("no JSON -blockdev in %q", args)
	}
	file, _ := node["file"].(map[string]any)
	if node["driver"] != "qcow2" || node["node-name"] != "disk0" || file["driver"] != "file" ||
		file["filename"] != dir+"/d0.qcow2" || file["node-name"] != "disk0-file" {
		t.Errorf("-blockdev %s", args[i+1])
	}

	for _, o := range []Options{
		{Accel: "hvf"},
		{Accel: "tcg", KernelArgs: []string{"a b"}},
	} {
		if _, err := vm.qemuArgs(g, o); err == nil {
			t.Errorf("options %+v accepted", o)
		}
	}
	vm.Disks[0].Format = "vmdk"
	if _, err := vm.qemuArgs(g, Options{Accel: "tcg"}); err == nil {
		t.Error("vmdk disk accepted")
	}
}

func TestStartRejects(t *testing.T) {
	ctx := context.Background()
	g := &Guest{Kernel: "/nonexistent"}
	if _, err := Start(ctx, g, Options{Accel: "tcg"}); err == nil || !strings.Contains(err.Error(), "Dir") {
		t.Errorf("no Dir: %v", err)
	}
	long := "/tmp/" + strings.Repeat("x", 100)
	if _, err := Start(ctx, g, Options{Accel: "tcg", Dir: long}); err == nil || !strings.Contains(err.Error(), "too long") {
		t.Errorf("long Dir: %v", err)
	}
	if _, err := Start(ctx, g, Options{Accel: "tcg", Dir: t.TempDir(), DataDisks: []Disk{{Path: "/nonexistent.raw"}}}); err == nil {
		t.Error("missing data disk accepted")
	}
}

func TestMakeDataDisk(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	if err := MakeDataDisk(ctx, filepath.Join(dir, "tiny"), 1<<20, "raw"); err == nil {
		t.Error("1 MiB disk accepted")
	}
	if err := MakeDataDisk(ctx, filepath.Join(dir, "x"), 64<<20, "vmdk"); err == nil {
		t.Error("vmdk accepted")
	}
	testutil.SkipShort(t)
	testutil.NeedCommand(t, "mkfs.ext4")
	testutil.NeedCommand(t, "qemu-img")
	for _, format := range []string{"raw", "qcow2"} {
		p := filepath.Join(dir, "data."+format)
		if err := MakeDataDisk(ctx, p, 64<<20, format); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 4)
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		f.Read(b)
		f.Close()
		if (format == "qcow2") != (string(b) == "QFI\xfb") {
			t.Errorf("%s disk starts with %q", format, b)
		}
		if _, err := os.Stat(p + ".raw.tmp"); err == nil {
			t.Errorf("%s: temporary raw image left behind", format)
		}
	}
}
