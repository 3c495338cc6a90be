package nbd

import (
	"errors"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

func TestParseURI(t *testing.T) {
	tests := []struct {
		uri  string
		want Target
	}{
		{"nbd://example.com/disk", Target{Network: "tcp", Address: "example.com:10809", Export: "disk"}},
		{"nbd://example.com:1234/disk", Target{Network: "tcp", Address: "example.com:1234", Export: "disk"}},
		{"nbd+tcp://10.0.0.1/disk", Target{Network: "tcp", Address: "10.0.0.1:10809", Export: "disk"}},
		{"nbd://example.com", Target{Network: "tcp", Address: "example.com:10809"}},
		{"nbd://example.com/", Target{Network: "tcp", Address: "example.com:10809"}},
		{"nbd://example.com//disk", Target{Network: "tcp", Address: "example.com:10809", Export: "/disk"}},
		{"nbd://example.com/hello%20world", Target{Network: "tcp", Address: "example.com:10809", Export: "hello world"}},
		{"nbd://[::1]:10810/d", Target{Network: "tcp", Address: "[::1]:10810", Export: "d"}},
		{"nbd://[fe80::1]/d", Target{Network: "tcp", Address: "[fe80::1]:10809", Export: "d"}},
		{"nbds://host/d", Target{Network: "tcp", Address: "host:10809", Export: "d", TLS: true}},
		{"nbds://host/d?tls-hostname=x.example&tls-verify-peer=1&tls-type=x509",
			Target{Network: "tcp", Address: "host:10809", Export: "d", TLS: true, TLSHostname: "x.example"}},
		{"nbd+unix:///disk?socket=/run/nbd.sock", Target{Network: "unix", Address: "/run/nbd.sock", Export: "disk"}},
		{"nbd+unix:///?socket=rel.sock", Target{Network: "unix", Address: "rel.sock"}},
		{"nbds+unix:///disk?socket=/s&tls-hostname=localhost", Target{Network: "unix", Address: "/s", Export: "disk", TLS: true, TLSHostname: "localhost"}},
		{"nbd+unix:///%2Fvdi%3Fsession_id%3DOpaqueRef:1?socket=/s", Target{Network: "unix", Address: "/s", Export: "/vdi?session_id=OpaqueRef:1"}},
		// QEMU's legacy syntax
		{"nbd:unix:/tmp/s.sock", Target{Network: "unix", Address: "/tmp/s.sock"}},
		{"nbd:unix:/tmp/s.sock:exportname=disk", Target{Network: "unix", Address: "/tmp/s.sock", Export: "disk"}},
		{"nbd:localhost:10809", Target{Network: "tcp", Address: "localhost:10809"}},
		{"nbd:127.0.0.1:1234:exportname=a:b", Target{Network: "tcp", Address: "127.0.0.1:1234", Export: "a:b"}},
		{"nbd:[::1]:1234:exportname=x", Target{Network: "tcp", Address: "[::1]:1234", Export: "x"}},
	}
	for _, tt := range tests {
		got, err := ParseURI(tt.uri)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", tt.uri, err)
			continue
		}
		if got != tt.want {
			t.Errorf("ParseURI(%q) = %+v, want %+v", tt.uri, got, tt.want)
		}
	}
}

func TestParseURIErrors(t *testing.T) {
	tests := []struct{ uri, want string }{
		{"", "no scheme"},
		{"/dev/nbd0", "no scheme"},
		{"http://host/disk", "not an NBD scheme"},
		{"nbd://", "no host"},
		{"nbd:///disk", "no host"},
		{"nbd://host:/d", "empty port"},
		{"nbd://host:0/d", "port"},
		{"nbd://host:70000/d", "port"},
		{"nbd://host:abc/d", ""},
		{"nbd://user@host/d", "user names"},
		{"nbd://host/d#frag", "fragments"},
		{"nbd://host/d?socket=/s", "socket= is only valid"},
		{"nbd://host/d?tls-hostname=x", "only valid with nbds"},
		{"nbd://host/d?foo=bar", "unknown query parameter"},
		{"nbds://host/d?tls-verify-peer=0", "always verified"},
		{"nbds://host/d?tls-type=psk", "only x509"},
		{"nbd+unix:///d", "missing socket"},
		{"nbd+unix://host/d?socket=/s", "has no host"},
		{"nbd+unix:///d?socket=/a&socket=/b", "given 2 times"},
		{"nbd+unix:///a%00b?socket=/s", "NUL"},
		{"nbd:unix:", "missing socket path"},
		{"nbd:host", "want nbd:HOST:PORT"},
		{"nbd:host:port", "port"},
		{"nbd:host:1:exportname=a\x00", "NUL"},
		{"nbd://host/" + strings.Repeat("x", 5000), "more than 4096"},
	}
	for _, tt := range tests {
		_, err := ParseURI(tt.uri)
		if err == nil {
			t.Errorf("ParseURI(%q) succeeded", tt.uri)
			continue
		}
		if !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseURI(%q): %v; want a usage error containing %q", tt.uri, err, tt.want)
		}
	}
}

func TestTargetStringRedactsSecrets(t *testing.T) {
	tgt := Target{Network: "tcp", Address: "xen1:10809", Export: "/4b5d-vdi?session_id=OpaqueRef:secret", TLS: true}
	s := tgt.String()
	if strings.Contains(s, "secret") || !strings.HasPrefix(s, "nbds://xen1:10809/") {
		t.Fatalf("String() = %q", s)
	}
	_, err := ParseURI("nbds://xen1/%2Fvdi%3Fsession_id%3DOpaqueRef:secret?bogus=1")
	if err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("parse error leaks the session: %v", err)
	}
	_, err = ParseURI("nbd://xen1/vdi?session_id=OpaqueRef:secret")
	if err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("parse error leaks the session: %v", err)
	}
	for _, uri := range []string{"nbd://user:secret@xen1/vdi", "nbd+unix:///vda?socket=/run/x.sock&token=secret", "nbds://xen1/vdi#secret"} {
		if _, err := ParseURI(uri); err == nil || strings.Contains(err.Error(), "secret") {
			t.Fatalf("ParseURI(%q): error leaks a secret: %v", uri, err)
		}
	}
	u := Target{Network: "unix", Address: "/run/a b.sock", Export: "d"}.String()
	back, err := ParseURI(u)
	if err != nil || back.Address != "/run/a b.sock" || back.Export != "d" {
		t.Fatalf("String() %q does not parse back: %+v, %v", u, back, err)
	}
}
