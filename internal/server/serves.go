package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/instant"
	"github.com/vmshadow/vmshadow/internal/restore"
	"github.com/vmshadow/vmshadow/internal/server/api"
)

// serveCache bounds the decoded chunks an instant restore caches per disk.
const serveCache = 256 << 20

// serve is a running instant restore: an NBD server on a UNIX socket in
// STATE_DIR/serve, holding a shared lock on its repository so gc keeps
// the chunks it serves.
type serve struct {
	info api.Serve
	stop func()
}

// StartServe implements api.Service.
func (s *Server) StartServe(ctx context.Context, req api.ServeRequest) (*api.Serve, error) {
	r, release, bid, m, err := s.findBackup(ctx, req.Repository, req.Backup)
	if err != nil {
		return nil, err
	}
	var names []string
	if req.Disk != "" {
		names = []string{req.Disk}
	}
	sel, err := restore.Select(m, names)
	if err != nil {
		release()
		return nil, err
	}
	if len(sel) == 0 {
		release()
		return nil, fmt.Errorf("backup %s has no disk to serve: %w", bid.Short(), errs.ErrUsage)
	}
	sel = sel[:1]
	ok := false
	defer func() {
		if !ok {
			release()
		}
	}()
	l, lctx, err := r.Lock(s.ctx, false, "serve")
	if err != nil {
		return nil, err
	}
	defer func() {
		if !ok {
			l.Unlock()
		}
	}()
	id := newServeID()
	dir := filepath.Join(s.Config().StateDir, "serve")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	srv, err := instant.NewServer(lctx, r, bid, m, instant.ServeOptions{Disks: sel, CacheBytes: serveCache, Writable: req.Writable,
		OverlayDir: dir, Warn: func(msg string) { s.log.Warn(msg, "serve", id) }})
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, id+".sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		srv.Close()
		return nil, fmt.Errorf("listen on %s: %w", sock, err)
	}
	info := api.Serve{ID: id, Repository: req.Repository, Backup: bid.String(), Disk: sel[0].Name,
		URI: "nbd+unix:///" + url.PathEscape(sel[0].Name) + "?socket=" + sock, Writable: req.Writable, Started: time.Now()}
	done := make(chan struct{})
	go func() { srv.Serve(ln); close(done) }()
	sv := &serve{info: info}
	sv.stop = func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		<-done
		srv.Close()
		os.Remove(sock)
		l.Unlock()
		release()
	}
	s.mu.Lock()
	s.serves[id] = sv
	s.mu.Unlock()
	ok = true
	s.log.Info("instant restore started", "serve", id, "backup", bid.Short(), "disk", info.Disk, "uri", info.URI)
	return &info, nil
}

func newServeID() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// StopServe implements api.Service.
func (s *Server) StopServe(ctx context.Context, id string) error {
	s.mu.Lock()
	sv := s.serves[id]
	delete(s.serves, id)
	s.mu.Unlock()
	if sv == nil {
		return fmt.Errorf("no instant restore %q: %w", id, errs.ErrNotFound)
	}
	sv.stop()
	return nil
}

// Serves implements api.Service.
func (s *Server) Serves(ctx context.Context) ([]api.Serve, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []api.Serve{}
	for _, sv := range s.serves {
		out = append(out, sv.info)
	}
	sort.Slice(out, func(i, k int) bool { return out[i].Started.Before(out[k].Started) })
	return out, nil
}
