package filerestore

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/fsproto"
)

// fakeAgent answers the host's requests with the replies reply returns
// (a compromised helper VM), over an in-memory connection.
func fakeAgent(t *testing.T, reply func(req fsproto.Request) (byte, any)) *Session {
	host, agent := net.Pipe()
	t.Cleanup(func() { host.Close(); agent.Close() })
	go func() {
		r := bufio.NewReader(agent)
		for {
			_, p, err := fsproto.ReadFrame(r, 0)
			if err != nil {
				return
			}
			var req fsproto.Request
			json.Unmarshal(p, &req)
			typ, v := reply(req)
			if b, ok := v.([]byte); ok {
				fsproto.WriteFrame(agent, typ, b)
			} else {
				fsproto.WriteJSON(agent, typ, v)
			}
		}
	}()
	return &Session{opts: Options{RequestTimeout: 10 * time.Second}, conn: host, r: bufio.NewReader(host), exited: make(chan struct{})}
}

// TestHostileAgentCannotEscapeDestination: entry names and symlinks that
// would lead writes out of --to, sizes that lie, and oversized data are
// refused; nothing is written outside the destination.
func TestHostileAgentCannotEscapeDestination(t *testing.T) {
	dir := t.TempDir()
	to := filepath.Join(dir, "to")
	fs := &FS{Name: "vda1", dev: "vda1", usable: true}
	dirEntry := fsproto.Entry{Name: "d", Type: "dir", Mode: 0o755}
	for _, c := range []struct {
		name string
		list []fsproto.Entry
		data []byte
	}{
		{"parent name", []fsproto.Entry{{Name: "..", Type: "dir", Mode: 0o755}}, nil},
		{"name with a slash", []fsproto.Entry{{Name: "../../escaped", Type: "file", Size: 3, Mode: 0o644}}, []byte("bad")},
		{"absolute name", []fsproto.Entry{{Name: "/tmp/escaped", Type: "file", Size: 3, Mode: 0o644}}, []byte("bad")},
		{"more data than asked", []fsproto.Entry{{Name: "f", Type: "file", Size: 3, Mode: 0o644}}, []byte("too long")},
		{"mode with file type bits", []fsproto.Entry{{Name: "f", Type: "file", Size: 3, Mode: 0o100644}}, []byte("bad")},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := fakeAgent(t, func(req fsproto.Request) (byte, any) {
				switch req.Op {
				case fsproto.OpStat:
					return fsproto.TypeReply, dirEntry
				case fsproto.OpList:
					return fsproto.TypeReply, fsproto.List{Entries: c.list}
				default:
					return fsproto.TypeData, c.data
				}
			})
			os.RemoveAll(to)
			sink, err := NewDirSink(to)
			if err != nil {
				t.Fatal(err)
			}
			var st GetStats
			err = s.Get(context.Background(), fs, "/d", sink, &st, nil)
			if !errors.Is(err, fsproto.ErrProtocol) {
				t.Fatalf("Get: %v, want a protocol error", err)
			}
			var found []string
			filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
				if err == nil && !fi.IsDir() {
					found = append(found, p)
				}
				return nil
			})
			if len(found) > 0 {
				t.Errorf("files written: %v", found)
			}
		})
	}
	// A symlink in the backup is created as a symlink and never followed:
	// a later entry of the same name cannot write through it.
	s := fakeAgent(t, func(req fsproto.Request) (byte, any) {
		switch req.Op {
		case fsproto.OpStat:
			return fsproto.TypeReply, dirEntry
		case fsproto.OpList:
			return fsproto.TypeReply, fsproto.List{Entries: []fsproto.Entry{
				{Name: "x", Type: "symlink", Link: dir + "/outside"},
				{Name: "x", Type: "file", Size: 3, Mode: 0o644}}}
		default:
			return fsproto.TypeData, []byte("bad")
		}
	})
	os.RemoveAll(to)
	sink, _ := NewDirSink(to)
	var st GetStats
	if err := s.Get(context.Background(), fs, "/d", sink, &st, nil); err == nil {
		t.Errorf("a file over a symlink of the same name was accepted")
	}
	if _, err := os.Lstat(filepath.Join(dir, "outside")); err == nil {
		t.Errorf("a write went through the backup's symlink out of the destination")
	}
}
