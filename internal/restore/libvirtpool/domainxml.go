package libvirtpool

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Limits on a stored definition: libvirt's own are larger, but a domain
// definition is a few KiB; anything near these is not one.
const (
	maxDefinitionBytes = 4 << 20
	maxDepth           = 64
	maxNodes           = 100_000
)

// node is an element of a domain definition, kept as parsed (prefixes
// unresolved, attribute order, comments) so that what vmshadow does not
// rewrite goes to libvirt unchanged.
type node struct {
	name xml.Name // Space is the prefix as written (qemu:commandline)
	attr []xml.Attr
	kids []any // *node, xml.CharData or xml.Comment
}

// parseDefinition parses a stored domain definition. It refuses what a
// libvirt domain XML never holds (a DTD, a root other than <domain>,
// mismatched tags, excessive size or nesting) with errs.ErrCorrupt.
func parseDefinition(b []byte) (*node, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("stored domain definition: %s: %w", fmt.Sprintf(format, args...), errs.ErrCorrupt)
	}
	if len(b) > maxDefinitionBytes {
		return nil, bad("%d bytes, more than the %d a domain definition can be", len(b), maxDefinitionBytes)
	}
	d := xml.NewDecoder(bytes.NewReader(b))
	d.Strict = true
	var root *node
	var stack []*node
	n := 0
	for {
		tok, err := d.RawToken()
		if err == io.EOF {
			break
		}
		if err != nil {
			var se *xml.SyntaxError
			if errors.As(err, &se) {
				return nil, bad("line %d: %s", se.Line, se.Msg)
			}
			return nil, bad("%v", err)
		}
		if n++; n > maxNodes {
			return nil, bad("more than %d XML tokens", maxNodes)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			el := &node{name: t.Name, attr: append([]xml.Attr(nil), t.Attr...)}
			switch {
			case len(stack) > 0:
				p := stack[len(stack)-1]
				p.kids = append(p.kids, el)
			case root != nil:
				return nil, bad("a second root element <%s>", qname(t.Name))
			case t.Name.Space != "" || t.Name.Local != "domain":
				return nil, bad("root element is <%s>, not <domain>", qname(t.Name))
			default:
				root = el
			}
			if stack = append(stack, el); len(stack) > maxDepth {
				return nil, bad("elements nested more than %d deep", maxDepth)
			}
		case xml.EndElement:
			if len(stack) == 0 || stack[len(stack)-1].name != t.Name {
				line, _ := d.InputPos()
				return nil, bad("line %d: unexpected </%s>", line, qname(t.Name))
			}
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if len(stack) == 0 {
				if len(bytes.TrimSpace(t)) > 0 {
					return nil, bad("text outside the root element")
				}
				continue
			}
			p := stack[len(stack)-1]
			p.kids = append(p.kids, xml.CharData(bytes.Clone(t)))
		case xml.Comment:
			if len(stack) > 0 {
				p := stack[len(stack)-1]
				p.kids = append(p.kids, xml.Comment(bytes.Clone(t)))
			}
		case xml.ProcInst:
			if t.Target != "xml" || root != nil {
				return nil, bad("processing instruction <?%s?>", t.Target)
			}
		case xml.Directive:
			return nil, bad("a <!%s> directive (a DTD has no place in a domain definition)", firstWord(t))
		}
	}
	if root == nil {
		return nil, bad("no <domain> element")
	}
	if len(stack) > 0 {
		return nil, bad("<%s> is not closed", qname(stack[len(stack)-1].name))
	}
	return root, nil
}

func firstWord(b []byte) string {
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return ""
	}
	return f[0]
}

func qname(n xml.Name) string {
	if n.Space != "" {
		return n.Space + ":" + n.Local
	}
	return n.Local
}

// marshal writes the tree as XML.
func (n *node) marshal() []byte {
	var b bytes.Buffer
	n.write(&b)
	b.WriteByte('\n')
	return b.Bytes()
}

func (n *node) write(b *bytes.Buffer) {
	b.WriteByte('<')
	b.WriteString(qname(n.name))
	for _, a := range n.attr {
		b.WriteByte(' ')
		b.WriteString(qname(a.Name))
		b.WriteString(`="`)
		xml.EscapeText(b, []byte(a.Value))
		b.WriteByte('"')
	}
	if len(n.kids) == 0 {
		b.WriteString("/>")
		return
	}
	b.WriteByte('>')
	for _, k := range n.kids {
		switch k := k.(type) {
		case *node:
			k.write(b)
		case xml.CharData:
			xml.EscapeText(b, k)
		case xml.Comment:
			b.WriteString("<!--")
			b.Write(k)
			b.WriteString("-->")
		}
	}
	b.WriteString("</")
	b.WriteString(qname(n.name))
	b.WriteByte('>')
}

// child returns the first child element named local (no prefix), or nil.
func (n *node) child(local string) *node {
	for _, k := range n.kids {
		if c, ok := k.(*node); ok && c.name.Space == "" && c.name.Local == local {
			return c
		}
	}
	return nil
}

// children returns the child elements named local.
func (n *node) children(local string) []*node {
	var out []*node
	for _, k := range n.kids {
		if c, ok := k.(*node); ok && c.name.Space == "" && c.name.Local == local {
			out = append(out, c)
		}
	}
	return out
}

// remove drops the child elements named local.
func (n *node) remove(local string) {
	kids := n.kids[:0]
	for _, k := range n.kids {
		if c, ok := k.(*node); ok && c.name.Space == "" && c.name.Local == local {
			continue
		}
		kids = append(kids, k)
	}
	n.kids = kids
}

// removeNode drops the child element c.
func (n *node) removeNode(c *node) {
	for i, k := range n.kids {
		if k == any(c) {
			n.kids = append(n.kids[:i], n.kids[i+1:]...)
			return
		}
	}
}

// text is the element's character data.
func (n *node) text() string {
	var s strings.Builder
	for _, k := range n.kids {
		if c, ok := k.(xml.CharData); ok {
			s.Write(c)
		}
	}
	return strings.TrimSpace(s.String())
}

// setText replaces the element's content by s.
func (n *node) setText(s string) { n.kids = []any{xml.CharData(s)} }

// get is the value of the unprefixed attribute local, or "".
func (n *node) get(local string) string {
	for _, a := range n.attr {
		if a.Name.Space == "" && a.Name.Local == local {
			return a.Value
		}
	}
	return ""
}

// set sets the unprefixed attribute local, adding it if needed.
func (n *node) set(local, value string) {
	for i, a := range n.attr {
		if a.Name.Space == "" && a.Name.Local == local {
			n.attr[i].Value = value
			return
		}
	}
	n.attr = append(n.attr, xml.Attr{Name: xml.Name{Local: local}, Value: value})
}

// elem makes an element with attributes given as name, value pairs.
func elem(local string, attrs ...string) *node {
	n := &node{name: xml.Name{Local: local}}
	for i := 0; i+1 < len(attrs); i += 2 {
		n.set(attrs[i], attrs[i+1])
	}
	return n
}

func (n *node) add(kids ...*node) *node {
	for _, k := range kids {
		n.kids = append(n.kids, k)
	}
	return n
}

// newDisk is where a restored disk now lives.
type newDisk struct {
	Target string // the backup's disk name, the definition's <target dev>
	Type   string // "file" or "block"
	Path   string
	Format string // "qcow2" or "raw"
}

// source is the disk's new <source>.
func (d newDisk) source() *node {
	if d.Type == "block" {
		return elem("source", "dev", d.Path)
	}
	return elem("source", "file", d.Path)
}

// definitionInfo is what the restore needs to know of a stored definition
// before it creates anything.
type definitionInfo struct {
	Targets []string // <target dev> of the definition's disks
	NVRAM   string   // the <nvram> file path, "" if none
	TPM     bool     // an emulated TPM (its state lives outside the definition)
	// TPMVersion is the emulated TPM's <backend version> ("2.0", "1.2"),
	// "" when the definition does not say.
	TPMVersion string
}

func inspect(root *node) definitionInfo {
	var info definitionInfo
	if devs := root.child("devices"); devs != nil {
		for _, d := range devs.children("disk") {
			if t := d.child("target"); t != nil && t.get("dev") != "" {
				info.Targets = append(info.Targets, t.get("dev"))
			}
		}
		for _, tpm := range devs.children("tpm") {
			if b := tpm.child("backend"); b != nil && b.get("type") == "emulator" {
				info.TPM = true
				info.TPMVersion = b.get("version")
			}
		}
	}
	if n := nvramNode(root); n != nil {
		info.NVRAM = nvramPath(n)
	}
	return info
}

func nvramNode(root *node) *node {
	if os := root.child("os"); os != nil {
		return os.child("nvram")
	}
	return nil
}

// nvramPath is the file of an <nvram>: its text, or <source file> (libvirt
// 8.5's form).
func nvramPath(n *node) string {
	if s := n.child("source"); s != nil {
		return s.get("file")
	}
	return n.text()
}

// newNVRAMPath is the new domain's NVRAM file: next to the old one, named
// as libvirt names its own (NAME_VARS.fd).
func newNVRAMPath(old, name string) string {
	return filepath.Join(filepath.Dir(old), name+"_VARS.fd")
}

// rewrite turns a stored definition into the new domain's: name, the UUID
// uuid or, when it is "", none (libvirt makes one), no MAC addresses
// (libvirt makes new ones), a new VM generation ID, each restored disk on
// its new volume; disks that were not restored are left out and CD-ROM /
// floppy drives kept empty (each with a warning); the NVRAM file moved to
// nvram when set. An emulated TPM is warned about unless tpmState says its
// state is put back. Every restored disk must be in the definition.
func rewrite(root *node, name string, disks []newDisk, nvram, uuid string, tpmState bool) (warnings []string, err error) {
	if n := root.child("name"); n != nil {
		n.setText(name)
	} else {
		n := elem("name")
		n.setText(name)
		root.kids = append([]any{n}, root.kids...)
	}
	root.remove("uuid")
	if uuid != "" { // after <name>
		u := elem("uuid")
		u.setText(uuid)
		i := slices.IndexFunc(root.kids, func(k any) bool { return k == any(root.child("name")) })
		root.kids = slices.Insert(root.kids, i+1, any(u))
	}
	if g := root.child("genid"); g != nil {
		g.kids = nil // an empty <genid/>: libvirt generates a new one
	}
	if n := nvramNode(root); n != nil && nvram != "" {
		if s := n.child("source"); s != nil {
			s.set("file", nvram)
		} else {
			n.setText(nvram)
		}
	}
	devs := root.child("devices")
	byTarget := map[string]newDisk{}
	for _, d := range disks {
		byTarget[d.Target] = d
	}
	found := map[string]bool{}
	if devs != nil {
		for _, iface := range devs.children("interface") {
			iface.remove("mac")
			iface.remove("target") // vnetN: the host's tap name of the old domain
		}
		for _, disk := range devs.children("disk") {
			dev := ""
			if t := disk.child("target"); t != nil {
				dev = t.get("dev")
			}
			nd, ok := byTarget[dev]
			if ok && !found[dev] {
				found[dev] = true
				disk.set("type", nd.Type)
				disk.remove("backingStore")
				src := nd.source()
				if old := disk.child("source"); old != nil {
					*old = *src
				} else {
					disk.kids = append(disk.kids, src)
				}
				if drv := disk.child("driver"); drv != nil {
					drv.set("type", nd.Format)
				} else {
					disk.kids = append([]any{elem("driver", "name", "qemu", "type", nd.Format)}, disk.kids...)
				}
				continue
			}
			switch device := disk.get("device"); device {
			case "cdrom", "floppy":
				if disk.child("source") != nil {
					disk.remove("source")
					disk.remove("backingStore")
					disk.set("type", "file")
					warnings = append(warnings, fmt.Sprintf("%s %s of the definition is kept empty: its media is not in the backup", device, dev))
				}
			default:
				devs.removeNode(disk)
				warnings = append(warnings, fmt.Sprintf("disk %s of the definition is left out of the new domain: it is not in the restore (not backed up, or not selected with --disk)", dev))
			}
		}
		for _, tpm := range devs.children("tpm") {
			if b := tpm.child("backend"); b != nil && b.get("type") == "emulator" && !tpmState {
				warnings = append(warnings, "the new domain's emulated TPM starts empty: the backup holds no TPM state (taken over a remote connection, or by an older vmshadow); keys sealed to it, e.g. BitLocker or LUKS, need their recovery key")
			}
		}
	}
	for _, d := range disks {
		if !found[d.Target] {
			return warnings, fmt.Errorf("stored domain definition has no disk with <target dev='%s'>, a disk of the backup: %w", d.Target, errs.ErrCorrupt)
		}
	}
	return warnings, nil
}

// minimal is the definition of a new domain for a backup that stores none
// (QEMU and XenServer sources): virtio disks vda, vdb, ... in backup
// order, a virtio NIC on the network 'default' when network is true, a
// serial console, BIOS boot from the first disk.
type minimal struct {
	Name     string
	Type     string // "kvm" or "qemu"
	Arch     string
	MemoryMB int
	VCPUs    int
	Disks    []newDisk
	Network  bool
}

func (m minimal) build() *node {
	d := elem("domain", "type", m.Type)
	name := elem("name")
	name.setText(m.Name)
	mem := elem("memory", "unit", "MiB")
	mem.setText(fmt.Sprint(m.MemoryMB))
	vcpu := elem("vcpu")
	vcpu.setText(fmt.Sprint(m.VCPUs))
	typ := elem("type", "arch", m.Arch)
	typ.setText("hvm")
	d.add(name, mem, vcpu,
		elem("os").add(typ, elem("boot", "dev", "hd")),
		elem("features").add(elem("acpi"), elem("apic")))
	devs := elem("devices")
	for i, disk := range m.Disks {
		devs.add(elem("disk", "type", disk.Type, "device", "disk").add(
			elem("driver", "name", "qemu", "type", disk.Format),
			disk.source(),
			elem("target", "dev", virtioName(i), "bus", "virtio")))
	}
	if m.Network {
		devs.add(elem("interface", "type", "network").add(elem("source", "network", "default"), elem("model", "type", "virtio")))
	}
	devs.add(elem("serial", "type", "pty").add(elem("target", "port", "0")),
		elem("console", "type", "pty").add(elem("target", "type", "serial", "port", "0")))
	d.add(devs)
	return d
}

// virtioName is the i-th virtio disk's name: vda ... vdz, vdaa, vdab ...
func virtioName(i int) string {
	s := ""
	for i++; i > 0; i = (i - 1) / 26 {
		s = string(rune('a'+(i-1)%26)) + s
	}
	return "vd" + s
}
