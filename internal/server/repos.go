package server

import (
	"context"
	"fmt"
	"sync"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/storage"
	"github.com/vmshadow/vmshadow/internal/server/config"
)

// repoHandle is a repository opened once: its key is derived from the
// password on first use and kept, so later runs pay no key derivation.
// Runs hold a reference while they use it; a handle retired by a reload
// (its settings changed) closes when the last run lets go.
type repoHandle struct {
	cfg *config.Repository

	mu      sync.Mutex
	r       *repo.Repo
	refs    int
	retired bool
}

// repository returns the open repository name, opening it on first use.
// Call the returned release when done with it.
func (s *Server) repository(ctx context.Context, name string) (*repo.Repo, func(), error) {
	s.mu.Lock()
	h := s.repos[name]
	if h == nil {
		rc := s.cfg.Repositories[name]
		if rc == nil {
			s.mu.Unlock()
			return nil, nil, fmt.Errorf("no repository %q in the configuration: %w", name, errs.ErrNotFound)
		}
		h = &repoHandle{cfg: rc}
		s.repos[name] = h
	}
	s.mu.Unlock()
	return h.acquire(ctx)
}

func (h *repoHandle) acquire(ctx context.Context) (*repo.Repo, func(), error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.r == nil {
		r, err := openRepo(ctx, h.cfg)
		if err != nil {
			return nil, nil, fmt.Errorf("repository %s: %w", h.cfg.Name, err)
		}
		h.r = r
	}
	h.refs++
	var once sync.Once
	return h.r, func() { once.Do(h.release) }, nil
}

func (h *repoHandle) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.refs--
	if h.retired && h.refs == 0 {
		h.close()
	}
}

// retire closes the handle once no run uses it.
func (h *repoHandle) retire() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.retired = true
	if h.refs == 0 {
		h.close()
	}
}

func (h *repoHandle) close() {
	if h.r != nil {
		h.r.Close()
		h.r.Backend().Close()
		h.r = nil
	}
}

// openRepo opens the repository c describes: a directory or S3 storage
// (credentials and addressing from the environment, as for the CLI).
func openRepo(ctx context.Context, c *config.Repository) (*repo.Repo, error) {
	be, err := storage.Open(ctx, c.Location, storage.Options{CAFile: c.S3CA})
	if err != nil {
		return nil, err
	}
	r, err := repo.Open(ctx, be, c.Password.Read)
	if err != nil {
		be.Close()
		return nil, err
	}
	return r, nil
}
