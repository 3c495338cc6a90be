// Package fsproto owns the framed protocol between vmshadow and the file
// restore agent (guest/fshelper/agent) that runs inside the helper VM and
// reads the backup's file systems. Everything the agent sends is untrusted
// (it runs next to a possibly hostile file system): ReadFrame bounds every
// frame, and the Check functions refuse names and values that could make
// the host write outside the destination it was given.
//
// A frame is one type byte, a 4-byte big-endian payload length and the
// payload (at most MaxPayload bytes). The host sends TypeRequest frames
// (a JSON Request); the agent answers each with exactly one frame: a
// TypeReply (JSON, see the reply types), TypeData (raw file bytes, for
// OpRead) or TypeError (a JSON Error).
package fsproto

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Frame types.
const (
	TypeRequest = 'Q'
	TypeReply   = 'R'
	TypeData    = 'D'
	TypeError   = 'E'
)

// MaxPayload bounds a frame's payload; MaxRead bounds one OpRead.
const (
	MaxPayload = 4 << 20
	MaxRead    = 1 << 20
	// MaxEntries bounds the entries of one OpList reply.
	MaxEntries = 1000
)

// Version is the protocol version the hello reply carries.
const Version = 1

// Operations.
const (
	OpHello = "hello" // -> Hello
	OpList  = "list"  // FS, Path, Cookie -> List
	OpStat  = "stat"  // FS, Path -> Entry (not following a final symlink)
	OpRead  = "read"  // FS, Path, Offset, Length -> data
	OpQuit  = "quit"  // -> empty reply, then the agent powers off
)

// Request is what the host asks.
type Request struct {
	Op     string `json:"op"`
	FS     string `json:"fs,omitempty"`   // guest device: "vda1", "mapper/vg0-root"
	Path   string `json:"path,omitempty"` // absolute, inside the file system
	Cookie int    `json:"cookie,omitempty"`
	Offset int64  `json:"offset,omitempty"`
	Length int    `json:"length,omitempty"`
}

// Hello describes what the agent found.
type Hello struct {
	Version int      `json:"version"`
	Kernel  string   `json:"kernel"`
	Devices []Device `json:"devices"`
	// Notes are what the agent could not do (a module that did not load,
	// LVM activation that failed), shown to the user as warnings.
	Notes []string `json:"notes,omitempty"`
}

// Device is one block device the agent sees: a disk (whose virtio serial
// the host chose), a partition of it, or an LVM logical volume.
type Device struct {
	Dev    string `json:"dev"`              // "vda", "vda1", "mapper/vg0-root"
	Serial string `json:"serial,omitempty"` // disks: the serial the host gave
	Parent string `json:"parent,omitempty"` // partitions: the disk
	Number int    `json:"number,omitempty"` // partitions: 1, 2, ...
	LV     string `json:"lv,omitempty"`     // logical volumes: "vg0/root"
	Size   int64  `json:"size"`
	Table  string `json:"table,omitempty"`  // disks: "gpt", "mbr" or ""
	FSType string `json:"fstype,omitempty"` // "ext4", "xfs", "vfat", "ntfs", "LVM2_member", ""
	Label  string `json:"label,omitempty"`
	// Found says what was found when FSType is empty (first bytes, "zeros").
	Found string `json:"found,omitempty"`
}

// Entry is one directory entry (or the result of OpStat).
type Entry struct {
	Name  string `json:"name"`
	Type  string `json:"type"` // file, dir, symlink, char, block, fifo, socket
	Size  int64  `json:"size"`
	Mode  uint32 `json:"mode"` // permission bits with setuid/setgid/sticky
	UID   uint32 `json:"uid"`
	GID   uint32 `json:"gid"`
	Mtime int64  `json:"mtime_ns"`
	Atime int64  `json:"atime_ns"`
	Link  string `json:"link,omitempty"` // symlinks: the target
}

// List is one page of a directory.
type List struct {
	Entries []Entry `json:"entries"`
	// Next is the cookie of the next page, 0 when this was the last.
	Next int `json:"next,omitempty"`
}

// Error is the agent's refusal or failure.
type Error struct {
	// Kind: "notfound", "notdir", "isdir", "io" (an I/O error from the
	// disk), "mount" (the file system did not mount), "usage", "other".
	Kind    string `json:"kind"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Message }

// Entry types.
var entryTypes = map[string]bool{"file": true, "dir": true, "symlink": true, "char": true, "block": true, "fifo": true, "socket": true}

// WriteFrame writes one frame.
func WriteFrame(w io.Writer, typ byte, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("frame of %d bytes exceeds %d", len(payload), MaxPayload)
	}
	buf := make([]byte, 5+len(payload))
	buf[0] = typ
	binary.BigEndian.PutUint32(buf[1:5], uint32(len(payload)))
	copy(buf[5:], payload)
	_, err := w.Write(buf)
	return err
}

// WriteJSON writes v as one frame of type typ.
func WriteJSON(w io.Writer, typ byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return WriteFrame(w, typ, b)
}

// ErrProtocol marks a frame or reply that breaks the protocol.
var ErrProtocol = errors.New("file restore agent protocol error")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrProtocol)
}

// ReadFrame reads one frame, refusing unknown types and payloads larger
// than max (at most MaxPayload).
func ReadFrame(r io.Reader, max int) (typ byte, payload []byte, err error) {
	var h [5]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, protoErr("truncated frame header")
		}
		return 0, nil, err
	}
	typ = h[0]
	switch typ {
	case TypeRequest, TypeReply, TypeData, TypeError:
	default:
		return 0, nil, protoErr("unknown frame type 0x%02x", typ)
	}
	n := binary.BigEndian.Uint32(h[1:])
	if max <= 0 || max > MaxPayload {
		max = MaxPayload
	}
	if int64(n) > int64(max) {
		return 0, nil, protoErr("frame of %d bytes exceeds the %d allowed", n, max)
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, protoErr("truncated frame (%d bytes announced): %v", n, err)
	}
	return typ, payload, nil
}

// DecodeReply decodes a TypeReply payload into v, or a TypeError payload
// into an *Error returned as the error; any other type is a protocol error.
func DecodeReply(typ byte, payload []byte, v any) error {
	switch typ {
	case TypeReply:
		if err := json.Unmarshal(payload, v); err != nil {
			return protoErr("malformed reply: %v", err)
		}
		return nil
	case TypeError:
		e := &Error{}
		if err := json.Unmarshal(payload, e); err != nil {
			return protoErr("malformed error reply: %v", err)
		}
		if e.Kind == "" {
			e.Kind = "other"
		}
		e.Message = Printable(e.Message, 1000)
		return e
	default:
		return protoErr("unexpected frame type %q in reply", typ)
	}
}

// CheckName refuses a directory entry name that is not one plain path
// element (empty, ".", "..", with a slash or NUL, or too long).
func CheckName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return protoErr("entry name %q", name)
	case strings.ContainsAny(name, "/\x00"):
		return protoErr("entry name %q has a slash or NUL", Printable(name, 300))
	case len(name) > 1024:
		return protoErr("entry name of %d bytes", len(name))
	}
	return nil
}

// CheckEntry checks an entry received from the agent; named says whether
// it must carry a plain name (list entries do, stat replies may not).
func CheckEntry(e *Entry, named bool) error {
	if named {
		if err := CheckName(e.Name); err != nil {
			return err
		}
	}
	if !entryTypes[e.Type] {
		return protoErr("entry %q: unknown type %q", Printable(e.Name, 300), Printable(e.Type, 40))
	}
	if e.Size < 0 {
		return protoErr("entry %q: negative size %d", Printable(e.Name, 300), e.Size)
	}
	if e.Mode&^0o7777 != 0 {
		return protoErr("entry %q: mode %#o has bits beyond 07777", Printable(e.Name, 300), e.Mode)
	}
	if e.Type != "symlink" && e.Link != "" {
		return protoErr("entry %q: a %s with a link target", Printable(e.Name, 300), e.Type)
	}
	if strings.ContainsRune(e.Link, 0) || len(e.Link) > 4096 {
		return protoErr("entry %q: malformed link target", Printable(e.Name, 300))
	}
	return nil
}

// CheckList checks a list page.
func CheckList(l *List) error {
	if len(l.Entries) > MaxEntries {
		return protoErr("%d entries in one page, more than %d", len(l.Entries), MaxEntries)
	}
	if l.Next < 0 {
		return protoErr("negative cookie %d", l.Next)
	}
	for i := range l.Entries {
		if err := CheckEntry(&l.Entries[i], true); err != nil {
			return err
		}
	}
	return nil
}

// CheckHello checks the agent's inventory.
func CheckHello(h *Hello) error {
	if h.Version != Version {
		return protoErr("agent speaks version %d, want %d", h.Version, Version)
	}
	if len(h.Devices) > 4096 || len(h.Notes) > 256 {
		return protoErr("%d devices, %d notes: too many", len(h.Devices), len(h.Notes))
	}
	for _, d := range h.Devices {
		if d.Dev == "" || len(d.Dev) > 128 || strings.ContainsAny(d.Dev, "\x00:") || strings.Contains(d.Dev, "..") {
			return protoErr("device name %q", Printable(d.Dev, 200))
		}
		if d.Size < 0 {
			return protoErr("device %s: negative size", d.Dev)
		}
	}
	return nil
}

// Printable returns s cut to max bytes with control characters and invalid
// UTF-8 replaced, for messages that came from the agent.
func Printable(s string, max int) string {
	if len(s) > max {
		s = s[:max] + "..."
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f || r == 0xfffd {
			return '?'
		}
		return r
	}, strings.ToValidUTF8(s, "?"))
}
