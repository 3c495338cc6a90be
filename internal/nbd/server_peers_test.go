package nbd

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// Our server against real clients: qemu-img, qemu-io, nbdinfo, nbdcopy and
// a QEMU VM attaching an export as a drive.

// serverFixture serves a 64 MiB raw file with data, holes and a 1 MiB run
// of 0x5a at 8 MiB: read-only as "disk", and a copy writable as "rw".
type serverFixture struct {
	path, rwPath string
	want         []byte
	layout       [][2]int64 // data ranges; the rest are holes
	sock, tcp    string
}

func newServerFixture(t *testing.T, opts *ServerOptions) *serverFixture {
	t.Helper()
	dir := t.TempDir()
	fx := &serverFixture{layout: [][2]int64{{0, 1 * MiB}, {4 * MiB, 4*MiB + 64*KiB}, {8 * MiB, 9 * MiB}, {30 * MiB, 34 * MiB}, {63 * MiB, 64 * MiB}}}
	fx.path, fx.want = sparseFile(t, dir, 64*MiB, 10, fx.layout...)
	pattern := bytes.Repeat([]byte{0x5a}, int(MiB))
	copy(fx.want[8*MiB:], pattern)
	if err := os.WriteFile(fx.path, fx.want, 0o644); err != nil { // rewrite whole: keep holes by punching below
		t.Fatal(err)
	}
	// os.WriteFile filled the holes: make them holes again
	f, err := os.OpenFile(fx.path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fe, err := NewFileExport(f)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testCtx(t)
	pos := int64(0)
	for _, r := range append(fx.layout, [2]int64{64 * MiB, 64 * MiB}) {
		if r[0] > pos {
			if err := fe.WriteZeroes(ctx, pos, r[0]-pos, true); err != nil {
				t.Fatal(err)
			}
		}
		pos = r[1]
	}
	f.Close()
	fx.rwPath = filepath.Join(dir, "rw.raw")
	run(t, "cp", "--sparse=always", fx.path, fx.rwPath)

	ro, err := os.Open(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ro.Close() })
	rw, err := os.OpenFile(fx.rwPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rw.Close() })
	roExp, err := NewFileExport(ro)
	if err != nil {
		t.Fatal(err)
	}
	rwExp, err := NewFileExport(rw)
	if err != nil {
		t.Fatal(err)
	}
	_, fx.sock, fx.tcp = startServer(t, opts, map[string]Export{"disk": roExp, "rw": rwExp},
		map[string]ExportOptions{"disk": {ReadOnly: true, Description: "backup disk"}})
	return fx
}

func (fx *serverFixture) uri(export string) string { return unixURI(fx.sock, export) }

func TestServerQemuImg(t *testing.T) {
	needCmd(t, "qemu-img")
	fx := newServerFixture(t, nil)

	var info struct {
		VirtualSize int64 `json:"virtual-size"`
		Format      string
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", fx.uri("disk"))), &info); err != nil {
		t.Fatal(err)
	}
	if info.VirtualSize != 64*MiB || info.Format != "raw" {
		t.Fatalf("qemu-img info: %+v", info)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", fx.path, fx.uri("disk"))
	// compare must be able to fail: change one byte in a copy
	other := filepath.Join(t.TempDir(), "other.raw")
	changed := slices.Clone(fx.want)
	changed[33*MiB+17] ^= 1 // qemu-img reports the 512-byte sector: 34603008
	if err := os.WriteFile(other, changed, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := runErr("qemu-img", "compare", "-f", "raw", "-F", "raw", other, fx.uri("disk")); err == nil || !strings.Contains(out, "Content mismatch at offset 34603008") {
		t.Fatalf("qemu-img compare did not notice a changed byte: %v: %s", err, out)
	}
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", "nbd://"+fx.tcp+"/disk", out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, fx.want) {
		t.Fatal("qemu-img convert over TCP produced different data")
	}

	// qemu-img map reads base:allocation
	var mapped []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", "-f", "raw", fx.uri("disk"))), &mapped); err != nil {
		t.Fatal(err)
	}
	var got []Extent
	for _, m := range mapped {
		flags := uint32(0)
		if !m.Data {
			flags |= StateHole
		}
		if m.Zero {
			flags |= StateZero
		}
		if k := len(got); k > 0 && got[k-1].Flags == flags {
			got[k-1].Length += m.Length
		} else {
			got = append(got, Extent{m.Start, m.Length, flags})
		}
	}
	if exp := extentsOf(64*MiB, 0, StateHole|StateZero, fx.layout...); !slices.Equal(got, exp) {
		t.Fatalf("qemu-img map\n got %v\nwant %v", got, exp)
	}
}

func TestServerQemuIO(t *testing.T) {
	needCmd(t, "qemu-io")
	fx := newServerFixture(t, nil)
	out := run(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 8M 1M", "-c", "read -P 0 2M 64k", fx.uri("disk"))
	if !strings.Contains(out, "read 1048576/1048576 bytes at offset 8388608") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io read: %s", out)
	}
	if out, _ := runErr("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5b 8M 4k", fx.uri("disk")); !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io did not notice the wrong pattern: %s", out)
	}
	// writes through the writable export land in its file
	out = run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 3M 128k", "-c", "write -z 30M 64k", "-c", "discard 63M 64k",
		"-c", "flush", "-c", "read -P 0x77 3M 128k", "nbd://"+fx.tcp+"/rw")
	if !strings.Contains(out, "wrote 131072/131072") || !strings.Contains(out, "read 131072/131072") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io writes: %s", out)
	}
	got, err := os.ReadFile(fx.rwPath)
	if err != nil {
		t.Fatal(err)
	}
	want := slices.Clone(fx.want)
	copy(want[3*MiB:], bytes.Repeat([]byte{0x77}, 128*1024))
	clear(want[30*MiB : 30*MiB+64*KiB])
	copy(got[63*MiB:63*MiB+64*KiB], want[63*MiB:63*MiB+64*KiB]) // discarded: contents undefined
	if !bytes.Equal(got, want) {
		t.Fatal("file behind the writable export does not hold what qemu-io wrote")
	}
	// QEMU sees the read-only flag and will not open the export for writing
	// (the server's own refusal is tested in TestClientServerReadOnly)
	if out, err := runErr("qemu-io", "-f", "raw", "-c", "write -P 0x99 0 4k", fx.uri("disk")); err == nil || !strings.Contains(out, "Permission denied") {
		t.Fatalf("write to the read-only export: %v: %s", err, out)
	}
	if got, _ := os.ReadFile(fx.path); !bytes.Equal(got, fx.want) {
		t.Fatal("the read-only export's file changed")
	}
}

func TestServerNbdinfoNbdcopy(t *testing.T) {
	needCmd(t, "nbdinfo", "nbdcopy")
	fx := newServerFixture(t, nil)
	var info struct {
		Exports []struct {
			Name     string   `json:"export-name"`
			Desc     string   `json:"description"`
			Size     int64    `json:"export-size"`
			ReadOnly bool     `json:"is_read_only"`
			MultiCon bool     `json:"can_multi_conn"`
			Contexts []string `json:"contexts"`
			MaxBlock int64    `json:"block_size_maximum"`
		}
	}
	if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--json", fx.uri("disk"))), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %+v", info)
	}
	e := info.Exports[0]
	if e.Name != "disk" || e.Desc != "backup disk" || e.Size != 64*MiB || !e.ReadOnly || !e.MultiCon || !slices.Contains(e.Contexts, ContextBaseAllocation) || e.MaxBlock != 32*MiB {
		t.Fatalf("nbdinfo: %+v", e)
	}
	list := run(t, "nbdinfo", "--list", "nbd+unix:///?socket="+fx.sock)
	if !strings.Contains(list, "export=\"disk\"") || !strings.Contains(list, "export=\"rw\"") {
		t.Fatalf("nbdinfo --list: %s", list)
	}
	// nbdinfo --map prints "offset length type description" per extent
	var got []Extent
	for _, line := range strings.Split(strings.TrimSpace(run(t, "nbdinfo", "--map", fx.uri("disk"))), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			t.Fatalf("nbdinfo --map line %q", line)
		}
		off, _ := strconv.ParseInt(f[0], 10, 64)
		n, _ := strconv.ParseInt(f[1], 10, 64)
		fl, _ := strconv.ParseUint(f[2], 10, 32)
		got = append(got, Extent{off, n, uint32(fl)})
	}
	if exp := extentsOf(64*MiB, 0, StateHole|StateZero, fx.layout...); !slices.Equal(got, exp) {
		t.Fatalf("nbdinfo --map\n got %v\nwant %v", got, exp)
	}
	// nbdcopy uses several connections at once (multi-conn)
	out := filepath.Join(t.TempDir(), "copy.raw")
	run(t, "nbdcopy", "--connections=4", "--requests=16", fx.uri("disk"), out)
	if b, _ := os.ReadFile(out); !bytes.Equal(b, fx.want) {
		t.Fatal("nbdcopy produced different data")
	}
}

func TestServerTLSWithQemuImg(t *testing.T) {
	needCmd(t, "qemu-img", "nbdinfo")
	p := testTLS(t)
	fx := newServerFixture(t, &ServerOptions{TLSConfig: p.serverConfig()})
	host, port, _ := strings.Cut(fx.tcp, ":")
	obj := "tls-creds-x509,id=tls0,endpoint=client,dir=" + p.dir
	nbdOpts := fmt.Sprintf("driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=%s,file.server.port=%s,file.export=disk,file.tls-creds=tls0", host, port)
	run(t, "qemu-img", "compare", "--object", obj, "--image-opts", nbdOpts, "driver=raw,file.driver=file,file.filename="+fx.path)
	// without TLS the server refuses
	if out, err := runErr("qemu-img", "info", "nbd://"+fx.tcp+"/disk"); err == nil {
		t.Fatalf("plain qemu-img against the TLS server succeeded: %s", out)
	}
	out := run(t, "nbdinfo", "--size", "nbds://"+fx.tcp+"/disk?tls-certificates="+p.dir)
	if strings.TrimSpace(out) != strconv.FormatInt(64*MiB, 10) {
		t.Fatalf("nbdinfo over TLS: %q", out)
	}
}

// TestServerQEMUDrive attaches exports to a (paused) QEMU VM as virtio-blk
// drives and reads and writes through the devices.
func TestServerQEMUDrive(t *testing.T) {
	needCmd(t, "qemu-system-x86_64")
	fx := newServerFixture(t, nil)
	q := startQEMU(t, "-machine", "pc",
		"-drive", "file="+fx.uri("disk")+",format=raw,if=none,id=d0,readonly=on", "-device", "virtio-blk-pci,drive=d0,id=vd0",
		"-drive", "file=nbd:unix:"+fx.sock+":exportname=rw,format=raw,if=none,id=d1,cache=writethrough", "-device", "virtio-blk-pci,drive=d1,id=vd1")
	info := q.hmp("info block")
	if !strings.Contains(info, "d0") || !strings.Contains(info, "nbd") || !strings.Contains(info, "d1") {
		t.Fatalf("info block: %s", info)
	}
	out := q.hmp(`qemu-io -d /machine/peripheral/vd0/virtio-backend "read -P 0x5a 8M 1M"`, "ops/sec")
	if !strings.Contains(out, "read 1048576/1048576 bytes at offset 8388608") || strings.Contains(out, "failed") {
		t.Fatalf("read through the VM's drive: %s", out)
	}
	out = q.hmp(`qemu-io -d /machine/peripheral/vd0/virtio-backend "read -P 0x11 8M 512"`, "Pattern verification failed")
	if !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("a wrong pattern was not noticed: %s", out)
	}
	out = q.hmp(`qemu-io -d /machine/peripheral/vd1/virtio-backend "write -P 0x3c 5M 64k"`, "ops/sec")
	if !strings.Contains(out, "wrote 65536/65536") {
		t.Fatalf("write through the VM's drive: %s", out)
	}
	q.hmp(`qemu-io -d /machine/peripheral/vd1/virtio-backend "flush"`)
	got, err := os.ReadFile(fx.rwPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[5*MiB:5*MiB+64*KiB], bytes.Repeat([]byte{0x3c}, 64*1024)) {
		t.Fatal("the VM's write did not reach the export")
	}
}
