package coord

import (
	"context"
	"errors"

	"os"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// fakeProvider records calls; it is for testing the sequence logic only
// (the QEMU provider is tested against real QEMU).
type fakeProvider struct {
	calls     []string
	commitErr error
	commitDur time.Duration
	released  int
}

func (p *fakeProvider) Kind() string { return "fake" }
func (p *fakeProvider) Identify(context.Context) (VMInfo, error) {
	return VMInfo{Name: "vm", Key: "fake-vm"}, nil
}
func (p *fakeProvider) Prepare(_ context.Context, set *Set, rec Recorder) error {
	p.calls = append(p.calls, "prepare")
	return rec.Record(set, []string{"prepared"})
}
func (p *fakeProvider) Commit(ctx context.Context, set *Set, rec Recorder) error {
	p.calls = append(p.calls, "commit")
	select {
	case <-time.After(p.commitDur):
	case <-ctx.Done():
		return ctx.Err()
	}
	return p.commitErr
}
func (p *fakeProvider) Expose(_ context.Context, set *Set, rec Recorder) error {
	p.calls = append(p.calls, "expose")
	set.Shadows = []Shadow{{ID: set.ID + "-0", Disk: "vda"}}
	return nil
}
func (p *fakeProvider) Release(context.Context, *Set) ([]string, error) {
	p.calls = append(p.calls, "release")
	p.released++
	return nil, nil
}
func (p *fakeProvider) Alive(context.Context, *Set) (bool, error) { return true, nil }
func (p *fakeProvider) Close() error                              { return nil }

type fakeWriter struct {
	name      string
	level     Level
	log       *[]string
	prepErr   error
	freezeErr error
	freezeDur time.Duration
	thawErr   error
}

func (w *fakeWriter) Name() string                              { return w.name }
func (w *fakeWriter) Level() Level                              { return w.level }
func (w *fakeWriter) Spec() WriterSpec                          { return WriterSpec{Kind: "fake", Path: w.name} }
func (w *fakeWriter) Close() error                              { return nil }
func (w *fakeWriter) Prepare(context.Context, SetContext) error { return w.prepErr }
func (w *fakeWriter) Freeze(ctx context.Context) error {
	*w.log = append(*w.log, w.name+" freeze")
	select {
	case <-time.After(w.freezeDur):
	case <-ctx.Done():
		return ctx.Err()
	}
	return w.freezeErr
}
func (w *fakeWriter) Thaw(context.Context) error {
	*w.log = append(*w.log, w.name+" thaw")
	return w.thawErr
}

func TestCreateSequence(t *testing.T) {
	boom := errors.New("boom")
	tests := []struct {
		name    string
		writers func(log *[]string) []Writer
		require Level
		freeze  time.Duration
		commit  error
		level   Level
		class   error // expected error class, nil for success
		log     string
	}{
		{name: "no writers", writers: func(*[]string) []Writer { return nil }, level: Crash},
		{name: "app then fs", level: Application,
			writers: func(l *[]string) []Writer {
				return []Writer{&fakeWriter{name: "h", level: Application, log: l}, &fakeWriter{name: "a", level: Filesystem, log: l}}
			},
			log: "h freeze,a freeze,a thaw,h thaw"},
		{name: "agent unreachable at prepare", level: Crash,
			writers: func(l *[]string) []Writer {
				return []Writer{&fakeWriter{name: "a", level: Filesystem, log: l, prepErr: boom}}
			}},
		{name: "agent unreachable, required", require: Filesystem, class: errs.ErrConsistency,
			writers: func(l *[]string) []Writer {
				return []Writer{&fakeWriter{name: "a", level: Filesystem, log: l, prepErr: boom}}
			}},
		{name: "hook fails, fs required", require: Filesystem, level: Filesystem,
			writers: func(l *[]string) []Writer {
				return []Writer{&fakeWriter{name: "h", level: Application, log: l, freezeErr: boom}, &fakeWriter{name: "a", level: Filesystem, log: l}}
			},
			log: "h freeze,a freeze,a thaw,h thaw"},
		{name: "thaw fails", class: nil, level: Crash,
			writers: func(l *[]string) []Writer {
				return []Writer{&fakeWriter{name: "h", level: Application, log: l, thawErr: boom}}
			},
			log: "h freeze,h thaw"},
		{name: "freeze window missed", freeze: 50 * time.Millisecond, class: errs.ErrTimeout,
			writers: func(l *[]string) []Writer {
				return []Writer{&fakeWriter{name: "h", level: Application, log: l, freezeDur: time.Second}}
			},
			log: "h freeze,h thaw"},
		{name: "commit fails", commit: boom, class: boom,
			writers: func(l *[]string) []Writer {
				return []Writer{&fakeWriter{name: "a", level: Filesystem, log: l}}
			},
			log: "a freeze,a thaw"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var log []string
			p := &fakeProvider{commitErr: tt.commit}
			c := &Coordinator{Provider: p, Writers: tt.writers(&log), Journal: &Journal{Dir: t.TempDir()},
				Options: Options{Require: tt.require, FreezeTimeout: tt.freeze}}
			s, err := c.Open(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			set, err := s.Create(context.Background())
			if got := strings.Join(log, ","); got != tt.log {
				t.Errorf("writer calls = %q, want %q", got, tt.log)
			}
			if tt.name == "thaw fails" {
				// A writer that may still be frozen fails the set and
				// keeps the journal for recover.
				if err == nil || !strings.Contains(err.Error(), "recover") {
					t.Fatalf("err = %v", err)
				}
				if cur, _ := s.Current(); cur == nil {
					t.Fatal("journal removed although a writer may be frozen")
				}
				return
			}
			if tt.class != nil {
				if !errors.Is(err, tt.class) {
					t.Fatalf("err = %v, want %v", err, tt.class)
				}
				if p.released != 1 {
					t.Errorf("released %d times, want 1", p.released)
				}
				if cur, _ := s.Current(); cur != nil {
					t.Errorf("journal left after a clean failure: %+v", cur)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if set.Consistency != tt.level {
				t.Errorf("level = %v, want %v", set.Consistency, tt.level)
			}
			if len(log) == 0 && set.FreezeMS != 0 {
				t.Errorf("freeze_ms = %d with nothing frozen", set.FreezeMS)
			}
			if _, err := s.Create(context.Background()); !errors.Is(err, errs.ErrBusy) {
				t.Errorf("second create: %v, want busy", err)
			}
			if _, err := s.Delete(context.Background(), set.ID); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Delete(context.Background(), set.ID); !errors.Is(err, errs.ErrNotFound) {
				t.Errorf("second delete: %v, want not found", err)
			}
		})
	}
}

func TestLockIsExclusive(t *testing.T) {
	j := &Journal{Dir: t.TempDir()}
	unlock, err := j.Lock("vm")
	if err != nil {
		t.Fatal(err)
	}
	// flock locks are per open file description: a second open conflicts
	// even within one process, as between processes.
	if _, err := j.Lock("vm"); !errors.Is(err, errs.ErrBusy) {
		t.Fatalf("second lock: %v, want busy", err)
	}
	unlock()
	unlock2, err := j.Lock("vm")
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	unlock2()
}

func TestJournalRejectsDamage(t *testing.T) {
	j := &Journal{Dir: t.TempDir()}
	if err := j.Save("vm", &Set{ID: "x"}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		content string
		class   error
	}{{`{"version": 1, "set_id": `, errs.ErrCorrupt}, {`{"version": 9}`, errs.ErrUnsupported}} {
		if err := writeFile(j.path("vm", ".json"), tc.content); err != nil {
			t.Fatal(err)
		}
		if _, err := j.Load("vm"); !errors.Is(err, tc.class) {
			t.Errorf("load %q: %v, want %v", tc.content, err, tc.class)
		}
	}
}

func TestLevelText(t *testing.T) {
	for _, l := range []Level{Crash, Filesystem, Application} {
		b, _ := l.MarshalText()
		var back Level
		if err := back.UnmarshalText(b); err != nil || back != l {
			t.Errorf("%v round trip: %v %v", l, back, err)
		}
	}
	if _, err := ParseLevel("total"); !errors.Is(err, errs.ErrUsage) {
		t.Errorf("bad level: %v", err)
	}
	if id := NewSetID(); len(id) != 10 || strings.Trim(id, "abcdefghijklmnopqrstuvwxyz234567") != "" {
		t.Errorf("set id %q", id)
	}

}

func writeFile(path, content string) error { return os.WriteFile(path, []byte(content), 0o600) }
