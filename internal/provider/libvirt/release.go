package libvirt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/crashpoint"
	"github.com/vmshadow/vmshadow/internal/errs"
)

// Release implements coord.Provider. It aborts the set's backup job (a
// pull-mode job ends only so; libvirt then removes the scratch files),
// deletes the set's checkpoint unless the backup completed (the base
// checkpoint's bitmap still holds every change since the base, so none is
// lost) or deletes
// the base it superseded if it did (keeping both when the backup may have
// been stored: see Storing), and removes the set's directory. With a
// nil set it aborts a backup job serving a vmshadow directory and, when
// Options.Recorded is set, deletes vmshadow checkpoints no repository
// records. What is already gone is no error.
func (p *Provider) Release(ctx context.Context, set *coord.Set) ([]string, error) {
	st, err := coord.ProviderStateOf[state](set)
	if err != nil {
		return nil, err
	}
	r := &releaser{p: p}
	if _, err := p.connect(ctx); err != nil {
		return nil, err
	}
	if p.dom.Name == "" {
		name := p.opts.Domain
		if st != nil {
			name = st.Domain
		}
		dom, err := lookup(ctx, p.l, name)
		if err != nil {
			if errors.Is(err, errs.ErrNotFound) && st != nil {
				// The domain is gone, and with it its job and checkpoints.
				r.removeDir(st.Dir)
				return r.removed, errors.Join(r.errs...)
			}
			return nil, err
		}
		p.dom = dom
	}
	if st != nil {
		r.state(ctx, st)
	}
	r.leftovers(ctx, st)
	return r.removed, errors.Join(r.errs...)
}

type releaser struct {
	p       *Provider
	removed []string
	errs    []error
}

func (r *releaser) state(ctx context.Context, st *state) {
	p := r.p
	if st.Begun {
		job, err := p.backupJob(ctx)
		switch {
		case err != nil && !notRunning(err):
			r.errs = append(r.errs, err)
		case job != nil && job.Server.Socket == st.Socket:
			r.abort(ctx)
			crashpoint.Hit("libvirt-aborted")
		}
	}
	if st.Checkpoint != "" {
		if st.Done {
			if st.Incremental != "" && st.Incremental != st.Checkpoint {
				r.deleteCheckpoint(ctx, st.Incremental, "checkpoint "+st.Incremental+" (superseded by "+st.Checkpoint+")")
			}
			for _, n := range st.Stale {
				if n != st.Checkpoint && n != st.Incremental {
					r.deleteCheckpoint(ctx, n, "checkpoint "+n+" (of a broken chain)")
				}
			}
		} else if st.Begun && !st.Storing {
			r.deleteCheckpoint(ctx, st.Checkpoint, "checkpoint "+st.Checkpoint+" (its parent still records every change since it)")
		}
		// Storing without Done: the manifest may be stored; both the
		// set's checkpoint and its base stay (see Storing).
	}
	r.removeDir(st.Dir)
}

// notRunning reports the error libvirt gives for a job query on a domain
// that stopped: it has no job then.
func notRunning(err error) bool {
	return isCode(err, golibvirt.ErrOperationInvalid) && strings.Contains(err.Error(), "not running")
}

// abort ends the domain's backup job and waits until libvirt has let go
// of it.
func (r *releaser) abort(ctx context.Context) {
	p := r.p
	l, dom := p.l, p.dom
	err := do(ctx, func() error { return l.DomainAbortJob(dom) })
	if err != nil && !isCode(err, golibvirt.ErrOperationInvalid) {
		r.errs = append(r.errs, fmt.Errorf("abort backup job of domain %s: %w", dom.Name, classify(err)))
		return
	}
	for {
		job, err := p.backupJob(ctx)
		if err != nil && !notRunning(err) {
			r.errs = append(r.errs, err)
			return
		}
		if job == nil || err != nil {
			r.removed = append(r.removed, "backup job")
			return
		}
		select {
		case <-ctx.Done():
			r.errs = append(r.errs, fmt.Errorf("backup job of domain %s still there after abort: %w", dom.Name, ctx.Err()))
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (r *releaser) deleteCheckpoint(ctx context.Context, name, what string) {
	l, dom := r.p.l, r.p.dom
	cp, err := call(ctx, func() (golibvirt.DomainCheckpoint, error) { return l.DomainCheckpointLookupByName(dom, name, 0) })
	if isCode(err, golibvirt.ErrNoDomainCheckpoint) {
		return
	}
	if err == nil {
		err = do(ctx, func() error { return l.DomainCheckpointDelete(cp, 0) })
	}
	if err != nil && !isCode(err, golibvirt.ErrNoDomainCheckpoint) {
		if strings.Contains(err.Error(), "inactive domain") {
			// Dropping only the metadata would lose the changes its bitmap
			// holds: the checkpoint stays until the domain runs again.
			err = fmt.Errorf("%w: domain %s is not running and libvirt deletes checkpoints of running domains only: start it, then run 'vmshadow recover --libvirt %s --vm %s' (until then the checkpoint stays, and no change is lost)",
				classify(err), dom.Name, r.p.shownURI(), dom.Name)
		} else {
			err = classify(err)
		}
		r.errs = append(r.errs, fmt.Errorf("delete %s: %w", what, err))
		return
	}
	r.removed = append(r.removed, what)
}

func (r *releaser) removeDir(dir string) {
	if dir == "" || !strings.HasPrefix(filepath.Base(dir), Prefix) {
		return
	}
	if _, err := os.Lstat(dir); err != nil {
		return
	}
	if err := os.RemoveAll(dir); err != nil {
		r.errs = append(r.errs, fmt.Errorf("remove %s: %w", dir, err))
		return
	}
	r.removed = append(r.removed, dir)
}

// leftovers removes what no journal accounts for: a backup job serving a
// vmshadow directory, and with Options.Recorded the vmshadow checkpoints no
// repository needs.
func (r *releaser) leftovers(ctx context.Context, st *state) {
	p := r.p
	job, err := p.backupJob(ctx)
	if err != nil && !notRunning(err) {
		r.errs = append(r.errs, err)
		return
	}
	if job != nil && job.ours() {
		r.abort(ctx)
		r.removeDir(filepath.Dir(job.Server.Socket))
	}
	if p.opts.Recorded == nil {
		return
	}
	names, err := p.Checkpoints(ctx)
	if err != nil {
		r.errs = append(r.errs, err)
		return
	}
	for _, n := range names {
		if !strings.HasPrefix(n, Prefix) || p.opts.Recorded(n) || st != nil && n == st.Checkpoint && (st.Done || st.Storing) {
			continue
		}
		r.deleteCheckpoint(ctx, n, "checkpoint "+n+" (no backup records it)")
	}
}

// Checkpoints lists the names of the domain's checkpoints, parents first.
func (p *Provider) Checkpoints(ctx context.Context) ([]string, error) {
	l, dom := p.l, p.dom
	// VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL (2): parents before children.
	cps, _, err := call2(ctx, func() ([]golibvirt.DomainCheckpoint, int32, error) { return l.DomainListAllCheckpoints(dom, 1, 2) })
	if err != nil {
		return nil, fmt.Errorf("domain %s: list checkpoints: %w", dom.Name, classify(err))
	}
	names := make([]string, len(cps))
	for i, c := range cps {
		names[i] = c.Name
	}
	return names, nil
}
