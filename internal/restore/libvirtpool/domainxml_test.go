package libvirtpool

import (
	"bytes"
	"encoding/xml"
	"errors"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// storedXML is an inactive domain definition as libvirt writes it, with
// what a restore must change and what it must keep.
const storedXML = `<?xml version="1.0"?>
<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>0b3f6c36-7f3e-4a53-9d55-2d1f4a0e5a11</uuid>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <!-- a comment & kept -->
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/libvirt/images/web1.img'/>
      <backingStore type='file'><format type='raw'/><source file='/base.img'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <source dev='/dev/vg0/web1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/scratch.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:ab:cd:ef'/>
      <source bridge='br0'/>
    </interface>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <serial type='pty'><target port='0'/></serial>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-set'/>
    <qemu:arg value='a=&quot;b&apos;&amp;c'/>
  </qemu:commandline>
</domain>
`

// parsedDomain is what the tests read back from a rewritten definition.
type parsedDomain struct {
	Type  string    `xml:"type,attr"`
	Name  string    `xml:"name"`
	UUID  *struct{} `xml:"uuid"`
	GenID *struct {
		Text string `xml:",chardata"`
	} `xml:"genid"`
	Memory string `xml:"memory"`
	NVRAM  struct {
		Template string `xml:"template,attr"`
		Path     string `xml:",chardata"`
	} `xml:"os>nvram"`
	Disks []struct {
		Type   string `xml:"type,attr"`
		Device string `xml:"device,attr"`
		Driver struct {
			Type  string `xml:"type,attr"`
			Cache string `xml:"cache,attr"`
		} `xml:"driver"`
		Source *struct {
			File string `xml:"file,attr"`
			Dev  string `xml:"dev,attr"`
		} `xml:"source"`
		Backing *struct{} `xml:"backingStore"`
		Target  struct {
			Dev string `xml:"dev,attr"`
		} `xml:"target"`
		Boot *struct{} `xml:"boot"`
	} `xml:"devices>disk"`
	Interfaces []struct {
		MAC    *struct{} `xml:"mac"`
		Target *struct{} `xml:"target"`
		Source struct {
			Network string `xml:"network,attr"`
			Bridge  string `xml:"bridge,attr"`
		} `xml:"source"`
	} `xml:"devices>interface"`
	Args []struct {
		Value string `xml:"value,attr"`
	} `xml:"http://libvirt.org/schemas/domain/qemu/1.0 commandline>arg"`
}

func TestRewriteStoredDefinition(t *testing.T) {
	root, err := parseDefinition([]byte(storedXML))
	if err != nil {
		t.Fatal(err)
	}
	info := inspect(root)
	if strings.Join(info.Targets, ",") != "vda,vdb,vdc,sda" || info.NVRAM != "/var/lib/libvirt/qemu/nvram/web1_VARS.fd" || !info.TPM {
		t.Fatalf("inspect: %+v", info)
	}
	nv := newNVRAMPath(info.NVRAM, "web1-restored")
	disks := []newDisk{
		{Target: "vda", Type: "file", Path: "/pool/web1-restored-vda.qcow2", Format: "qcow2"},
		{Target: "vdb", Type: "block", Path: "/dev/vg1/web1-restored-vdb", Format: "raw"},
	}
	warnings, err := rewrite(root, "web1-restored", disks, nv, "", false)
	if err != nil {
		t.Fatal(err)
	}
	out := root.marshal()
	var d parsedDomain
	if err := xml.Unmarshal(out, &d); err != nil {
		t.Fatalf("rewritten definition does not parse: %v\n%s", err, out)
	}
	if d.Type != "kvm" || d.Name != "web1-restored" || d.UUID != nil || d.GenID == nil || d.GenID.Text != "" || d.Memory != "2097152" {
		t.Errorf("type %q name %q uuid %v genid %+v memory %q", d.Type, d.Name, d.UUID, d.GenID, d.Memory)
	}
	if d.NVRAM.Path != "/var/lib/libvirt/qemu/nvram/web1-restored_VARS.fd" || d.NVRAM.Template != "/usr/share/OVMF/OVMF_VARS_4M.fd" {
		t.Errorf("nvram %+v", d.NVRAM)
	}
	if len(d.Disks) != 3 {
		t.Fatalf("%d disks, want vda, vdb and the cdrom (vdc left out):\n%s", len(d.Disks), out)
	}
	vda, vdb, cd := d.Disks[0], d.Disks[1], d.Disks[2]
	if vda.Target.Dev != "vda" || vda.Type != "file" || vda.Source == nil || vda.Source.File != disks[0].Path || vda.Driver.Type != "qcow2" || vda.Driver.Cache != "none" || vda.Backing != nil || vda.Boot == nil {
		t.Errorf("vda rewritten to %+v", vda)
	}
	if vdb.Target.Dev != "vdb" || vdb.Type != "block" || vdb.Source == nil || vdb.Source.Dev != disks[1].Path || vdb.Source.File != "" || vdb.Driver.Type != "raw" {
		t.Errorf("vdb rewritten to %+v", vdb)
	}
	if cd.Target.Dev != "sda" || cd.Device != "cdrom" || cd.Source != nil {
		t.Errorf("cdrom rewritten to %+v", cd)
	}
	if len(d.Interfaces) != 2 {
		t.Fatalf("%d interfaces", len(d.Interfaces))
	}
	for _, i := range d.Interfaces {
		if i.MAC != nil || i.Target != nil {
			t.Errorf("interface %+v keeps its MAC or tap name", i)
		}
	}
	if d.Interfaces[0].Source.Network != "default" || d.Interfaces[1].Source.Bridge != "br0" {
		t.Errorf("interfaces %+v lost their source", d.Interfaces)
	}
	if len(d.Args) != 2 || d.Args[1].Value != `a="b'&c` {
		t.Errorf("qemu:commandline args %+v", d.Args)
	}
	for _, keep := range []string{`xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"`, "<qemu:commandline>", `<libosinfo:os id="http://debian.org/debian/12"/>`, "<!-- a comment & kept -->"} {
		if !bytes.Contains(out, []byte(keep)) {
			t.Errorf("rewritten definition lost %s:\n%s", keep, out)
		}
	}
	for _, gone := range []string{"52:54:00", "0b3f6c36", "43dc0cf8", "/base.img", "/iso/debian.iso", "scratch.qcow2", "vnet3"} {
		if bytes.Contains(out, []byte(gone)) {
			t.Errorf("rewritten definition still holds %s:\n%s", gone, out)
		}
	}
	want := []string{"disk vdc of the definition is left out", "cdrom sda of the definition is kept empty", "emulated TPM starts empty"}
	if len(warnings) != len(want) {
		t.Fatalf("warnings %q, want %d", warnings, len(want))
	}
	for i, w := range want {
		if !strings.Contains(warnings[i], w) {
			t.Errorf("warning %d = %q, want it to say %q", i, warnings[i], w)
		}
	}
	// The output parses again to the same document.
	again, err := parseDefinition(out)
	if err != nil || !bytes.Equal(again.marshal(), out) {
		t.Fatalf("rewritten definition does not round-trip: %v", err)
	}
}

func TestRewriteCases(t *testing.T) {
	vda := newDisk{Target: "vda", Type: "file", Path: "/p/n-vda.qcow2", Format: "qcow2"}
	cases := []struct {
		name, in string
		disks    []newDisk
		want     []string // substrings of the output
		notWant  []string
		err      string
	}{
		{name: "no name element gets one", in: `<domain type='qemu'><devices><disk><target dev='vda'/></disk></devices></domain>`, disks: []newDisk{vda},
			want: []string{"<name>n</name>", `<disk type="file"><driver name="qemu" type="qcow2"/><target dev="vda"/><source file="/p/n-vda.qcow2"/></disk>`}},
		{name: "nvram in source form", in: `<domain><name>a</name><os><nvram type='file'><source file='/nv/a_VARS.fd'/></nvram></os><devices><disk><source file='/x'/><target dev='vda'/></disk></devices></domain>`,
			disks: []newDisk{vda}, want: []string{`<source file="/nv/n_VARS.fd"/>`}, notWant: []string{"/nv/a_VARS.fd", `"/x"`}},
		{name: "disk missing from the definition", in: `<domain><name>a</name><devices><disk><target dev='vdb'/></disk></devices></domain>`,
			disks: []newDisk{vda}, err: "no disk with <target dev='vda'>"},
		{name: "no devices", in: `<domain><name>a</name></domain>`, disks: []newDisk{vda}, err: "no disk with <target dev='vda'>"},
		{name: "same target twice: the second is left out", in: `<domain><devices><disk><source file='/1'/><target dev='vda'/></disk><disk><source file='/2'/><target dev='vda'/></disk></devices></domain>`,
			disks: []newDisk{vda}, notWant: []string{`"/1"`, `"/2"`}},
		{name: "hostile names are escaped", in: `<domain><name>a</name><devices><disk><target dev='vda'/></disk></devices></domain>`,
			disks: []newDisk{{Target: "vda", Type: "file", Path: `/p/"><evil/>&`, Format: "raw"}},
			want:  []string{`file="/p/&#34;&gt;&lt;evil/&gt;&amp;"`}, notWant: []string{"<evil/>"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			root, err := parseDefinition([]byte(c.in))
			if err != nil {
				t.Fatal(err)
			}
			nv := ""
			if info := inspect(root); info.NVRAM != "" {
				nv = newNVRAMPath(info.NVRAM, "n")
			}
			_, err = rewrite(root, "n", c.disks, nv, "", false)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) || !errors.Is(err, errs.ErrCorrupt) {
					t.Fatalf("error %v, want ErrCorrupt saying %q", err, c.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			out := string(root.marshal())
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %s:\n%s", w, out)
				}
			}
			for _, w := range c.notWant {
				if strings.Contains(out, w) {
					t.Errorf("output holds %s:\n%s", w, out)
				}
			}
			if _, err := parseDefinition([]byte(out)); err != nil {
				t.Errorf("output does not parse: %v", err)
			}
		})
	}
}

// TestParseRefusesHostileDefinitions: what is not a libvirt domain XML is
// refused with ErrCorrupt and a message naming the problem.
func TestParseRefusesHostileDefinitions(t *testing.T) {
	deep := strings.Repeat("<a>", 100) + strings.Repeat("</a>", 100)
	cases := []struct{ name, in, want string }{
		{"empty", "", "no <domain> element"},
		{"not xml", "hello", "text outside the root element"},
		{"other root", "<pool type='dir'/>", "root element is <pool>, not <domain>"},
		{"prefixed root", "<x:domain xmlns:x='u'/>", "root element is <x:domain>"},
		{"two roots", "<domain/><domain/>", "a second root element <domain>"},
		{"mismatched", "<domain><name>x</domain>", "line 1"},
		{"unclosed", "<domain><devices>", "not closed"},
		{"doctype", `<!DOCTYPE domain SYSTEM "file:///etc/passwd"><domain/>`, "<!DOCTYPE> directive"},
		{"billion laughs", `<!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><domain><name>&b;</name></domain>`, "<!DOCTYPE> directive"},
		{"undefined entity", "<domain><name>&xxe;</name></domain>", "invalid character entity &xxe;"},
		{"processing instruction", "<domain><?php system('x') ?></domain>", "processing instruction <?php?>"},
		{"too deep", "<domain>" + deep + "</domain>", "nested more than 64 deep"},
		{"too large", "<domain>" + strings.Repeat(" ", maxDefinitionBytes) + "</domain>", "more than the 4194304"},
		{"too many tokens", "<domain>" + strings.Repeat("<a/>", maxNodes) + "</domain>", "more than 100000 XML tokens"},
		{"binary", "<domain>\x00\x01</domain>", "illegal character code U+0000"},
		{"bad attribute", "<domain type=kvm/>", "unquoted or missing attribute value"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := parseDefinition([]byte(c.in))
			if err == nil || !errors.Is(err, errs.ErrCorrupt) || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "stored domain definition: ") {
				t.Fatalf("error %v, want ErrCorrupt saying %q", err, c.want)
			}
		})
	}
}

func TestMinimalDefinition(t *testing.T) {
	m := minimal{Name: "db<1>", Type: "qemu", Arch: "x86_64", MemoryMB: 512, VCPUs: 3, Network: true, Disks: []newDisk{
		{Target: "drive0", Type: "file", Path: "/p/a.qcow2", Format: "qcow2"},
		{Target: "drive1", Type: "block", Path: "/dev/vg/b", Format: "raw"},
	}}
	out := m.build().marshal()
	var d struct {
		Type   string `xml:"type,attr"`
		Name   string `xml:"name"`
		Memory struct {
			Unit  string `xml:"unit,attr"`
			Value string `xml:",chardata"`
		} `xml:"memory"`
		VCPU string `xml:"vcpu"`
		OS   struct {
			Arch string `xml:"arch,attr"`
		} `xml:"os>type"`
		Disks []struct {
			Type   string `xml:"type,attr"`
			Driver struct {
				Type string `xml:"type,attr"`
			} `xml:"driver"`
			Source struct {
				File string `xml:"file,attr"`
				Dev  string `xml:"dev,attr"`
			} `xml:"source"`
			Target struct {
				Dev string `xml:"dev,attr"`
				Bus string `xml:"bus,attr"`
			} `xml:"target"`
		} `xml:"devices>disk"`
		Nets []struct {
			Source struct {
				Network string `xml:"network,attr"`
			} `xml:"source"`
			Model struct {
				Type string `xml:"type,attr"`
			} `xml:"model"`
		} `xml:"devices>interface"`
		Serial *struct{} `xml:"devices>serial"`
	}
	if err := xml.Unmarshal(out, &d); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if d.Type != "qemu" || d.Name != "db<1>" || d.Memory.Unit != "MiB" || d.Memory.Value != "512" || d.VCPU != "3" || d.OS.Arch != "x86_64" || d.Serial == nil {
		t.Errorf("minimal definition %+v", d)
	}
	if len(d.Disks) != 2 || d.Disks[0].Target.Dev != "vda" || d.Disks[0].Target.Bus != "virtio" || d.Disks[0].Source.File != "/p/a.qcow2" || d.Disks[0].Driver.Type != "qcow2" ||
		d.Disks[1].Target.Dev != "vdb" || d.Disks[1].Type != "block" || d.Disks[1].Source.Dev != "/dev/vg/b" || d.Disks[1].Driver.Type != "raw" {
		t.Errorf("disks %+v", d.Disks)
	}
	if len(d.Nets) != 1 || d.Nets[0].Source.Network != "default" || d.Nets[0].Model.Type != "virtio" {
		t.Errorf("interfaces %+v", d.Nets)
	}
	m.Network = false
	if bytes.Contains(m.build().marshal(), []byte("<interface")) {
		t.Error("an interface without the network 'default'")
	}
	for i, want := range map[int]string{0: "vda", 25: "vdz", 26: "vdaa", 27: "vdab", 701: "vdzz", 702: "vdaaa"} {
		if got := virtioName(i); got != want {
			t.Errorf("virtioName(%d) = %s, want %s", i, got, want)
		}
	}
}

func TestDomainType(t *testing.T) {
	caps := func(host string, guests ...string) string {
		return "<capabilities><host><cpu><arch>" + host + "</arch></cpu></host>" + strings.Join(guests, "") + "</capabilities>"
	}
	guest := func(os, arch string, types ...string) string {
		s := "<guest><os_type>" + os + "</os_type><arch name='" + arch + "'><wordsize>64</wordsize>"
		for _, ty := range types {
			s += "<domain type='" + ty + "'/>"
		}
		return s + "</arch></guest>"
	}
	cases := []struct{ name, caps, typ, err string }{
		{"kvm", caps("x86_64", guest("hvm", "i686", "qemu", "kvm"), guest("hvm", "x86_64", "qemu", "kvm")), "kvm", ""},
		{"tcg only", caps("x86_64", guest("hvm", "x86_64", "qemu"), guest("hvm", "aarch64", "qemu", "kvm")), "qemu", ""},
		{"other arch only", caps("x86_64", guest("hvm", "aarch64", "qemu")), "", `architecture "x86_64"`},
		{"xen guests", caps("x86_64", guest("xen", "x86_64", "xen")), "", "install qemu-system"},
		{"garbage", "<capabilities><host>", "", "parse libvirt's capabilities"},
	}
	for _, c := range cases {
		typ, arch, err := domainType(c.caps)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s: %s, %v; want error %q", c.name, typ, err, c.err)
			}
			continue
		}
		if err != nil || typ != c.typ || arch != "x86_64" {
			t.Errorf("%s: %s %s %v; want %s x86_64", c.name, typ, arch, err, c.typ)
		}
	}
}

func TestVolumeName(t *testing.T) {
	for _, c := range []struct{ vm, disk, format, want string }{
		{"web1-restored", "vda", "qcow2", "web1-restored-vda.qcow2"},
		{"web 1/ü", "xvd:a", "raw", "web_1__-xvd_a"},
	} {
		if got := volumeName(c.vm, c.disk, c.format); got != c.want {
			t.Errorf("volumeName(%q, %q, %s) = %q, want %q", c.vm, c.disk, c.format, got, c.want)
		}
	}
}

// FuzzParseDefinition: the parser never panics, and what it accepts
// marshals to XML it accepts again, unchanged; rewriting never panics.
func FuzzParseDefinition(f *testing.F) {
	f.Add([]byte(storedXML))
	f.Add([]byte(`<domain><name>a</name><devices><disk><target dev='vda'/></disk></devices></domain>`))
	f.Add([]byte(`<domain xmlns:q="u"><q:a q:b="&amp;"/><!--c--></domain>`))
	f.Fuzz(func(t *testing.T, b []byte) {
		root, err := parseDefinition(b)
		if err != nil {
			if !errors.Is(err, errs.ErrCorrupt) {
				t.Fatalf("error not ErrCorrupt: %v", err)
			}
			return
		}
		out := root.marshal()
		again, err := parseDefinition(out)
		if err != nil {
			t.Fatalf("marshalled definition refused: %v\n%q", err, out)
		}
		if !bytes.Equal(again.marshal(), out) {
			t.Fatalf("marshal not stable:\n%q\n%q", out, again.marshal())
		}
		info := inspect(root)
		var disks []newDisk
		for _, tg := range info.Targets {
			disks = append(disks, newDisk{Target: tg, Type: "file", Path: "/p/" + tg, Format: "qcow2"})
		}
		rewrite(root, "n", disks, "/nv/n_VARS.fd", "", false)
		if _, err := parseDefinition(root.marshal()); err != nil {
			t.Fatalf("rewritten definition refused: %v", err)
		}
	})
}
