package fsproto

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func frame(typ byte, payload string) []byte {
	var b bytes.Buffer
	WriteFrame(&b, typ, []byte(payload))
	return b.Bytes()
}

func TestReadFrameBounds(t *testing.T) {
	for _, c := range []struct {
		name string
		in   []byte
		max  int
		want string
	}{
		{"unknown type", frame('X', "{}"), 0, "unknown frame type"},
		{"too large", []byte{'R', 0, 0x10, 0, 1}, 1 << 20, "exceeds"},
		{"over MaxPayload", []byte{'R', 0xff, 0xff, 0xff, 0xff}, 0, "exceeds"},
		{"truncated payload", frame('R', "{}")[:6], 0, "truncated frame"},
		{"truncated header", []byte{'R', 0}, 0, "truncated frame header"},
	} {
		_, _, err := ReadFrame(bytes.NewReader(c.in), c.max)
		if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want a protocol error saying %q", c.name, err, c.want)
		}
	}
	if _, _, err := ReadFrame(bytes.NewReader(nil), 0); err != io.EOF {
		t.Errorf("empty stream: %v, want EOF", err)
	}
	typ, p, err := ReadFrame(bytes.NewReader(frame(TypeData, "abc")), 0)
	if err != nil || typ != TypeData || string(p) != "abc" {
		t.Errorf("good frame: %c %q %v", typ, p, err)
	}
}

func TestChecksRefuseHostileEntries(t *testing.T) {
	good := Entry{Name: "a", Type: "file", Mode: 0o644}
	for _, e := range []Entry{
		{Name: "../x", Type: "file"}, {Name: "..", Type: "dir"}, {Name: ".", Type: "dir"}, {Name: "", Type: "file"},
		{Name: "a/b", Type: "file"}, {Name: "a\x00", Type: "file"}, {Name: strings.Repeat("a", 2000), Type: "file"},
		{Name: "a", Type: "door"}, {Name: "a", Type: "file", Size: -1}, {Name: "a", Type: "file", Mode: 0o170644},
		{Name: "a", Type: "file", Link: "/etc/passwd"}, {Name: "a", Type: "symlink", Link: "x\x00y"},
	} {
		if err := CheckEntry(&e, true); !errors.Is(err, ErrProtocol) {
			t.Errorf("CheckEntry(%+v): %v, want a protocol error", e, err)
		}
	}
	if err := CheckEntry(&good, true); err != nil {
		t.Errorf("CheckEntry(good): %v", err)
	}
	if err := CheckList(&List{Entries: make([]Entry, MaxEntries+1)}); !errors.Is(err, ErrProtocol) {
		t.Errorf("oversized page: %v", err)
	}
	if err := CheckHello(&Hello{Version: Version, Devices: []Device{{Dev: "../vda"}}}); !errors.Is(err, ErrProtocol) {
		t.Errorf("device with ..: %v", err)
	}
	if err := CheckHello(&Hello{Version: 99}); !errors.Is(err, ErrProtocol) {
		t.Errorf("other version: %v", err)
	}
	var e *Error
	err := DecodeReply(TypeError, []byte(`{"kind":"io","message":"bad\u001b[31m\nthing"}`), &struct{}{})
	if !errors.As(err, &e) || e.Kind != "io" || strings.ContainsAny(e.Message, "\x1b\n") {
		t.Errorf("error reply: %#v", err)
	}
}

// FuzzReplies feeds arbitrary bytes to the host's side of the protocol as
// the agent's replies: no panic, bounded allocations, and whatever is
// accepted satisfies the checks the host relies on to write files.
func FuzzReplies(f *testing.F) {
	f.Add(frame(TypeReply, `{"entries":[{"name":"a","type":"file","size":3,"mode":420}],"next":0}`))
	f.Add(frame(TypeReply, `{"version":1,"kernel":"6.1","devices":[{"dev":"vda","serial":"d0","size":1024,"table":"gpt"}]}`))
	f.Add(frame(TypeError, `{"kind":"notfound","message":"x"}`))
	f.Add(frame(TypeData, "bytes"))
	f.Add(append(frame(TypeReply, `{"entries":[{"name":"../../etc","type":"dir"}]}`), frame(TypeReply, `{}`)...))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		for i := 0; i < 8; i++ {
			typ, payload, err := ReadFrame(r, MaxPayload)
			if err != nil {
				return
			}
			if len(payload) > len(in) {
				t.Fatalf("payload of %d bytes from %d input bytes", len(payload), len(in))
			}
			var l List
			if err := DecodeReply(typ, payload, &l); err == nil && CheckList(&l) == nil {
				for _, e := range l.Entries {
					if e.Name == "" || e.Name == "." || e.Name == ".." || strings.ContainsAny(e.Name, "/\x00") {
						t.Fatalf("accepted entry name %q", e.Name)
					}
				}
			}
			var h Hello
			if err := DecodeReply(typ, payload, &h); err == nil && CheckHello(&h) == nil {
				for _, d := range h.Devices {
					if strings.Contains(d.Dev, "..") || d.Size < 0 {
						t.Fatalf("accepted device %+v", d)
					}
				}
			}
			var e Entry
			if err := DecodeReply(typ, payload, &e); err != nil {
				var pe *Error
				if errors.As(err, &pe) && strings.ContainsAny(pe.Message, "\n\x1b") {
					t.Fatalf("error message with control characters: %q", pe.Message)
				}
			}
		}
	})
}
