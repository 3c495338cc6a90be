package coord

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// The tests here check the sequence of a set across several VMs against
// fake providers and writers that log every call to one shared log (the
// real providers are proven against real QEMU and libvirt in cmd/vmshadow).

// vmProvider is a fake provider of one VM that logs into a shared log.
type vmProvider struct {
	name      string
	log       *[]string
	running   bool
	commitErr error
	resumeErr error
	released  int
}

func (p *vmProvider) Kind() string { return "fake" }
func (p *vmProvider) Identify(context.Context) (VMInfo, error) {
	return VMInfo{Name: p.name, Key: "fake-" + p.name}, nil
}

// logMu guards the shared log: the members of a group are paused,
// committed and resumed concurrently.
var logMu sync.Mutex

func (p *vmProvider) add(what string) {
	logMu.Lock()
	defer logMu.Unlock()
	*p.log = append(*p.log, p.name+" "+what)
}
func (p *vmProvider) Prepare(_ context.Context, set *Set, rec Recorder) error {
	p.add("prepare")
	return rec.Record(set, []string{"prepared"})
}
func (p *vmProvider) Commit(ctx context.Context, set *Set, rec Recorder) error {
	p.add("commit")
	return p.commitErr
}
func (p *vmProvider) Expose(_ context.Context, set *Set, rec Recorder) error {
	set.Shadows = []Shadow{{ID: set.ID + "-0", Disk: "vda"}}
	return nil
}
func (p *vmProvider) Release(context.Context, *Set) ([]string, error) {
	p.add("release")
	p.released++
	return nil, nil
}
func (p *vmProvider) Alive(context.Context, *Set) (bool, error) { return true, nil }
func (p *vmProvider) Close() error                              { return nil }

// pausableVM is a vmProvider that implements Pauser.
type pausableVM struct{ vmProvider }

func (p *pausableVM) Running(context.Context) (bool, error) { return p.running, nil }
func (p *pausableVM) Pause(context.Context) error {
	p.add("pause")
	p.running = false
	return nil
}
func (p *pausableVM) Resume(context.Context) error {
	p.add("resume")
	if p.resumeErr != nil {
		return p.resumeErr
	}
	p.running = true
	return nil
}

// groupVM is one VM of a test group.
type groupVM struct {
	p       Provider
	writers []Writer
}

// openGroup opens a session per VM on one journal directory.
func openGroup(t *testing.T, dir string, opts Options, vms ...groupVM) []*Session {
	t.Helper()
	var ss []*Session
	for _, vm := range vms {
		c := &Coordinator{Provider: vm.p, Writers: vm.writers, Journal: &Journal{Dir: dir}, Options: opts}
		s, err := c.Open(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		ss = append(ss, s)
	}
	return ss
}

func pvm(name string, log *[]string) *pausableVM {
	return &pausableVM{vmProvider{name: name, log: log, running: true}}
}

// hookAndAgent are a VM's application hook and file-system agent.
func hookAndAgent(vm string, log *[]string) []Writer {
	return []Writer{&fakeWriter{name: vm + ".hook", level: Application, log: log}, &fakeWriter{name: vm + ".agent", level: Filesystem, log: log}}
}

func TestGroupSequence(t *testing.T) {
	var log []string
	a, b, c := pvm("A", &log), pvm("B", &log), pvm("C", &log)
	dir := t.TempDir()
	ss := openGroup(t, dir, Options{},
		groupVM{a, hookAndAgent("A", &log)}, groupVM{b, hookAndAgent("B", &log)}, groupVM{c, []Writer{&fakeWriter{name: "C.agent", level: Filesystem, log: &log}}})
	sets, err := CreateGroup(context.Background(), "shop", ss)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"A prepare", "B prepare", "C prepare",
		// Application writers of every VM first, then the file systems.
		"A.hook freeze", "B.hook freeze", "A.agent freeze", "B.agent freeze", "C.agent freeze",
		// Every VM paused before the first commit, resumed after the last
		// (each step for all VMs at once: in any order within it).
		"* pause", "* pause", "* pause", "* commit", "* commit", "* commit", "* resume", "* resume", "* resume",
		"C.agent thaw", "B.agent thaw", "A.agent thaw", "B.hook thaw", "A.hook thaw"}
	got := slices.Clone(log)
	for i := range got {
		if vm, what, ok := strings.Cut(got[i], " "); ok && len(vm) == 1 && (what == "pause" || what == "commit" || what == "resume") {
			got[i] = "* " + what
		}
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("calls:\n got %s\nwant %s", strings.Join(log, ","), strings.Join(want, ","))
	}
	for _, step := range []string{"pause", "commit", "resume"} {
		for _, vm := range []string{"A", "B", "C"} {
			if !slices.Contains(log, vm+" "+step) {
				t.Errorf("no %s of %s: %v", step, vm, log)
			}
		}
	}
	for i, set := range sets {
		if set.Group == nil || set.Group.Name != "shop" || strings.Join(set.Group.Members, ",") != "A,B,C" {
			t.Fatalf("member %d: group %+v", i, set.Group)
		}
		if set.Group.SetID != sets[0].ID || set.FreezeMS != sets[0].FreezeMS || (i > 0 && set.ID == sets[0].ID) {
			t.Errorf("member %d: set %s of group set %s, freeze %d ms; want its own ID in the group's %s, %d ms", i, set.ID, set.Group.SetID, set.FreezeMS, sets[0].ID, sets[0].FreezeMS)
		}
		// C has no application writer: the group is filesystem-consistent.
		if set.Group.Consistency != Filesystem || set.Paused || set.Phase != PhaseExposed {
			t.Errorf("member %d: group level %s, paused %v, phase %s", i, set.Group.Consistency, set.Paused, set.Phase)
		}
		if cur, err := ss[i].Current(); err != nil || cur == nil || cur.ID != set.ID {
			t.Errorf("member %d: journal %+v, %v", i, cur, err)
		}
	}
	if sets[0].Consistency != Application || sets[2].Consistency != Filesystem {
		t.Errorf("member levels %s, %s", sets[0].Consistency, sets[2].Consistency)
	}
	for _, s := range ss {
		// Each member's part is deleted by the group's set ID.
		if _, err := s.Delete(context.Background(), sets[0].Group.SetID); err != nil {
			t.Fatal(err)
		}
	}
}

// TestGroupAbort: any member failing in any phase aborts the set for all:
// every VM resumed, thawed, released, and its journal record removed.
func TestGroupAbort(t *testing.T) {
	boom := errors.New("boom")
	tests := []struct {
		name   string
		setup  func(b *pausableVM, bw []Writer)
		freeze time.Duration
		class  error
		paused bool // were the VMs paused before the failure
	}{
		{name: "commit fails", setup: func(b *pausableVM, _ []Writer) { b.commitErr = boom }, class: boom, paused: true},
		{name: "agent hangs", setup: func(_ *pausableVM, bw []Writer) { bw[1].(*fakeWriter).freezeDur = time.Hour },
			freeze: 100 * time.Millisecond, class: errs.ErrTimeout},
		{name: "required hook fails", setup: func(_ *pausableVM, bw []Writer) { bw[0].(*fakeWriter).freezeErr = boom },
			class: errs.ErrConsistency},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var log []string
			a, b := pvm("A", &log), pvm("B", &log)
			aw, bw := hookAndAgent("A", &log), hookAndAgent("B", &log)
			tt.setup(b, bw)
			ss := openGroup(t, t.TempDir(), Options{FreezeTimeout: tt.freeze, Require: Application}, groupVM{a, aw}, groupVM{b, bw})
			start := time.Now()
			_, err := CreateGroup(context.Background(), "g", ss)
			if !errors.Is(err, tt.class) || !strings.Contains(err.Error(), "VM B") {
				t.Fatalf("err = %v, want %v naming VM B", err, tt.class)
			}
			if tt.freeze > 0 && time.Since(start) > tt.freeze+5*time.Second {
				t.Errorf("the group took %s to abort, limit %s", time.Since(start), tt.freeze)
			}
			got := strings.Join(log, ",")
			for _, w := range []string{"A.hook", "A.agent", "B.hook", "B.agent"} {
				if strings.Count(got, w+" freeze") != strings.Count(got, w+" thaw") {
					t.Errorf("%s frozen and not thawed: %s", w, got)
				}
			}
			if tt.paused != strings.Contains(got, "A pause") {
				t.Errorf("paused = %v, want %v: %s", !tt.paused, tt.paused, got)
			}
			for _, p := range []*pausableVM{a, b} {
				if !p.running || p.released != 1 {
					t.Errorf("VM %s: running %v, released %d times: %s", p.name, p.running, p.released, got)
				}
			}
			for _, s := range ss {
				if cur, _ := s.Current(); cur != nil {
					t.Errorf("journal of %s left after a clean abort: %+v", s.VM().Name, cur)
				}
			}
		})
	}
}

// TestGroupResumeFailure: a VM that could not be resumed keeps its record
// (paused), and Recover resumes it.
func TestGroupResumeFailure(t *testing.T) {
	var log []string
	a, b := pvm("A", &log), pvm("B", &log)
	b.resumeErr = errors.New("monitor gone")
	dir := t.TempDir()
	ss := openGroup(t, dir, Options{}, groupVM{a, hookAndAgent("A", &log)}, groupVM{b, nil})
	if _, err := CreateGroup(context.Background(), "g", ss); err == nil || !strings.Contains(err.Error(), "could not be resumed") {
		t.Fatalf("err = %v", err)
	}
	cur, err := ss[1].Current()
	if err != nil || cur == nil || !cur.Paused {
		t.Fatalf("B's record after a failed resume: %+v, %v", cur, err)
	}
	if cur, _ := ss[0].Current(); cur != nil {
		t.Errorf("A's record kept: %+v", cur)
	}
	b.resumeErr = nil
	rep, err := ss[1].Recover(context.Background())
	if err != nil || !rep.Resumed || !b.running {
		t.Fatalf("recover: %+v, %v; running %v", rep, err, b.running)
	}
	if cur, _ := ss[1].Current(); cur != nil {
		t.Errorf("record left after recover: %+v", cur)
	}
}

func TestGroupMembers(t *testing.T) {
	var log []string
	unpausable := func(name string) *vmProvider { return &vmProvider{name: name, log: &log, running: true} }
	t.Run("one VM that cannot pause is committed last", func(t *testing.T) {
		log = nil
		x, a := unpausable("X"), pvm("A", &log)
		ss := openGroup(t, t.TempDir(), Options{}, groupVM{x, nil}, groupVM{a, nil})
		sets, err := CreateGroup(context.Background(), "g", ss)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := strings.Join(log, ","), "X prepare,A prepare,A pause,A commit,X commit,A resume"; got != want {
			t.Errorf("calls %s, want %s", got, want)
		}
		if sets[0].VM != "X" || sets[1].VM != "A" {
			t.Errorf("sets not in the order given: %s, %s", sets[0].VM, sets[1].VM)
		}
	})
	t.Run("two VMs that cannot pause", func(t *testing.T) {
		log = nil
		dir := t.TempDir()
		ss := openGroup(t, dir, Options{}, groupVM{unpausable("X"), nil}, groupVM{unpausable("Y"), nil}, groupVM{pvm("A", &log), nil})
		if _, err := CreateGroup(context.Background(), "g", ss); !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "X (fake)") {
			t.Fatalf("err = %v, want usage naming X", err)
		}
		if len(log) != 0 {
			t.Errorf("something was done: %v", log)
		}
	})
	t.Run("the same VM twice", func(t *testing.T) {
		p := pvm("A", &log)
		c1 := &Coordinator{Provider: p, Journal: &Journal{Dir: t.TempDir()}}
		s1, err := c1.Open(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer s1.Close()
		s2 := &Session{c: c1, vm: s1.vm, unlock: func() {}}
		if _, err := CreateGroup(context.Background(), "g", []*Session{s1, s2}); !errors.Is(err, errs.ErrUsage) {
			t.Fatalf("err = %v, want usage", err)
		}
	})
	t.Run("several VMs need a name", func(t *testing.T) {
		ss := openGroup(t, t.TempDir(), Options{}, groupVM{pvm("A", &log), nil}, groupVM{pvm("B", &log), nil})
		if _, err := CreateGroup(context.Background(), "", ss); !errors.Is(err, errs.ErrUsage) {
			t.Fatalf("err = %v, want usage", err)
		}
	})
}
