package repo

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Locks are blobs of kind "locks", so they work on any backend, including
// object storage without file locks. Backup, restore and verify take shared
// locks; prune, gc and passwd take exclusive ones. A holder rewrites its
// lock every LockRefresh (under a new name each time, see refresh). A lock is stale, and ignored (and removed by the
// next locker), when
//
//   - it was last refreshed more than LockStale ago (its holder died or lost
//     the repository), or
//   - it was taken on this host by a process that no longer exists (kill -9):
//     detected at once with kill(pid, 0). "This host" means the same boot of
//     the same kernel and the same PID namespace (LockInfo.Instance), so a
//     container with the same host name never judges another's PIDs.
var (
	LockRefresh = 5 * time.Minute
	LockStale   = 30 * time.Minute
)

// LockInfo is the content of a lock blob.
type LockInfo struct {
	Version   int    `json:"version"`
	Exclusive bool   `json:"exclusive"`
	Op        string `json:"op"`
	Host      string `json:"host"`
	PID       int    `json:"pid"`
	// Instance identifies the kernel boot and PID namespace the PID belongs to.
	Instance  string    `json:"instance,omitempty"`
	Created   time.Time `json:"created"`
	Refreshed time.Time `json:"refreshed"`
}

func (li LockInfo) String() string {
	kind := "shared"
	if li.Exclusive {
		kind = "exclusive"
	}
	return fmt.Sprintf("%s lock of %s by pid %d on %s since %s", kind, li.Op, li.PID, li.Host, li.Created.Format(time.RFC3339))
}

// DecodeLock parses lock plaintext.
func DecodeLock(b []byte) (LockInfo, error) {
	var li LockInfo
	if err := json.Unmarshal(b, &li); err != nil {
		return li, fmt.Errorf("lock is not valid JSON (%v): %w", err, errs.ErrCorrupt)
	}
	if li.Version != 1 {
		return li, fmt.Errorf("lock has unsupported version %d: %w", li.Version, errs.ErrUnsupported)
	}
	return li, nil
}

// pidInstance identifies this process's PID space: the kernel boot ID and
// the PID namespace. Empty when unknown (then PIDs are never judged).
var pidInstance = func() string {
	boot, err1 := os.ReadFile("/proc/sys/kernel/random/boot_id")
	ns, err2 := os.Readlink("/proc/self/ns/pid")
	if err1 != nil || err2 != nil {
		return ""
	}
	return strings.TrimSpace(string(boot)) + "/" + ns
}()

// stale reports whether a lock no longer protects anything.
func (li LockInfo) stale(now time.Time, host string) bool {
	if now.Sub(li.Refreshed) > LockStale {
		return true
	}
	if li.Host == host && li.PID > 0 && li.Instance != "" && li.Instance == pidInstance {
		err := syscall.Kill(li.PID, 0)
		return errors.Is(err, syscall.ESRCH)
	}
	return false
}

// Lock is a held repository lock.
type Lock struct {
	r      *Repo
	h      backend.Handle
	info   LockInfo
	cancel context.CancelCauseFunc
	stop   chan struct{}
	done   chan struct{}
	once   sync.Once
}

// Lock takes a shared or exclusive lock for op ("backup", "gc", ...). It
// fails with errs.ErrBusy naming the holder when a conflicting lock that is
// not stale exists. The returned context is cancelled if the lock is lost
// (refreshing it failed for longer than LockStale, or it was removed);
// run the locked operation under it and call Unlock when done.
func (r *Repo) Lock(ctx context.Context, exclusive bool, op string) (*Lock, context.Context, error) {
	var n [16]byte
	rand.Read(n[:])
	now := time.Now().UTC()
	l := &Lock{r: r, h: backend.Handle{Kind: backend.KindLocks, Name: fmt.Sprintf("%x", n)},
		info: LockInfo{Version: 1, Exclusive: exclusive, Op: op, Host: hostname(), PID: os.Getpid(), Instance: pidInstance, Created: now, Refreshed: now},
		stop: make(chan struct{}), done: make(chan struct{})}
	if err := l.write(ctx); err != nil {
		return nil, nil, fmt.Errorf("take %s lock: %w", op, err)
	}
	if err := l.checkConflicts(ctx); err != nil {
		r.be.Delete(context.WithoutCancel(ctx), l.h)
		return nil, nil, err
	}
	lctx, cancel := context.WithCancelCause(ctx)
	l.cancel = cancel
	go l.refresh(lctx)
	return l, lctx, nil
}

func (l *Lock) write(ctx context.Context) error {
	plain, err := json.Marshal(l.info)
	if err != nil {
		return err
	}
	return l.r.be.Put(ctx, l.h, l.r.codec.seal(nil, magicLock, l.h.Name, plain, false))
}

// readLock returns a lock's content; an unreadable lock is reported with its
// blob's modification time as its refresh time.
func (r *Repo) readLock(ctx context.Context, fi backend.Info) (LockInfo, error) {
	h := backend.Handle{Kind: backend.KindLocks, Name: fi.Name}
	blob, err := r.be.Get(ctx, h, 0, -1)
	if err != nil {
		return LockInfo{}, err
	}
	p, err := r.codec.open(nil, magicLock, h.Name, blob, 1<<20)
	if err == nil {
		var li LockInfo
		if li, err = DecodeLock(p); err == nil {
			return li, nil
		}
	}
	return LockInfo{Version: 1, Exclusive: true, Op: "unknown (unreadable lock " + fi.Name + ")", Created: fi.ModTime, Refreshed: fi.ModTime}, nil
}

func (l *Lock) checkConflicts(ctx context.Context) error {
	host := hostname()
	now := time.Now()
	var conflict error
	err := l.r.be.List(ctx, backend.KindLocks, "", func(fi backend.Info) error {
		if fi.Name == l.h.Name {
			return nil
		}
		li, err := l.r.readLock(ctx, fi)
		if backend.IsNotExist(err) {
			return nil // released meanwhile
		}
		if err != nil {
			return fmt.Errorf("read lock %s: %w", fi.Name, err)
		}
		if li.stale(now, host) {
			// Best effort: a stale lock protects nothing.
			l.r.be.Delete(ctx, backend.Handle{Kind: backend.KindLocks, Name: fi.Name})
			return nil
		}
		if l.info.Exclusive || li.Exclusive {
			conflict = fmt.Errorf("repository %s is locked: %s (it becomes stale %s after its last refresh, or at once if that process is gone): %w",
				l.r.be.Location(), li, LockStale, errs.ErrBusy)
			return conflict
		}
		return nil
	})
	if conflict != nil {
		return conflict
	}
	if err != nil {
		return fmt.Errorf("list locks: %w", err)
	}
	return nil
}

// refresh rewrites the lock every LockRefresh until Unlock or the lock is
// lost. Each refresh writes the lock under a new name, then checks that the
// old one still exists before removing it (as restic does): rewriting in
// place could resurrect a lock that another process removed, thinking it
// stale, between the check and the write, and both would then go on.
func (l *Lock) refresh(ctx context.Context) {
	defer close(l.done)
	t := time.NewTicker(LockRefresh)
	defer t.Stop()
	last := time.Now()
	for {
		select {
		case <-l.stop:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		lost, err := l.renew(ctx)
		if lost != nil {
			l.cancel(lost)
			return
		}
		if err != nil {
			if time.Since(last) > LockStale-LockRefresh {
				l.cancel(fmt.Errorf("could not refresh lock for %s: %w", time.Since(last).Round(time.Second), err))
				return
			}
			continue
		}
		last = time.Now()
	}
}

// renew moves the lock to a fresh blob. It returns lost when the old blob
// was removed by someone else (the new one is removed again), err when the
// storage failed (the old blob is kept, to be retried).
func (l *Lock) renew(ctx context.Context) (lost, err error) {
	old := l.h
	var n [16]byte
	rand.Read(n[:])
	l.h = backend.Handle{Kind: backend.KindLocks, Name: fmt.Sprintf("%x", n)}
	l.info.Refreshed = time.Now().UTC()
	keepOld := func(err error) (error, error) {
		l.r.be.Delete(context.WithoutCancel(ctx), l.h)
		l.h = old
		return nil, err
	}
	if err := l.write(ctx); err != nil {
		return keepOld(err)
	}
	if _, err := l.r.be.Stat(ctx, old); err != nil {
		if backend.IsNotExist(err) {
			l.r.be.Delete(context.WithoutCancel(ctx), l.h)
			l.h = old
			return fmt.Errorf("lock %s was removed by another process (it thought it stale): %w", old.Name, errs.ErrBusy), nil
		}
		return keepOld(err)
	}
	if err := l.r.be.Delete(ctx, old); err != nil && !backend.IsNotExist(err) {
		return keepOld(err)
	}
	return nil, nil
}

// Unlock releases the lock. It is safe to call more than once.
func (l *Lock) Unlock() error {
	var err error
	l.once.Do(func() {
		close(l.stop)
		<-l.done
		l.cancel(context.Canceled)
		err = l.r.be.Delete(context.Background(), l.h)
		if backend.IsNotExist(err) {
			err = nil
		}
	})
	return err
}
