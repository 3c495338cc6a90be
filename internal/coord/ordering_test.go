package coord

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/crashpoint"
)

// The tests here check the journal protocol with failure injection: a
// provider and writers whose "VM" is a directory of files (one file per
// object created, one per frozen writer). The provider's Release removes
// only what the journal names, so anything created before it was recorded
// is left behind and the tests fail. The real providers are tested
// against real QEMU, XAPI's test server and libvirt (cmd/vmshadow
// TestRecoverAfterKill and the provider packages).

// worldState is the fake provider's journal record.
type worldState struct {
	Objects []string `json:"objects"`
}

// worldProvider creates objects as files in dir, recording each through
// the Recorder before creating it. check, when set, is called at the start
// of each step (with the step's name) and before each object is created.
type worldProvider struct {
	dir   string
	check func(obj string, set *Set)
}

func (p *worldProvider) Kind() string { return "world" }
func (p *worldProvider) Identify(context.Context) (VMInfo, error) {
	return VMInfo{Name: "vm", Key: "world-vm"}, nil
}

func (p *worldProvider) create(set *Set, rec Recorder, step string, objs ...string) error {
	st, err := ProviderStateOf[worldState](set)
	if err != nil {
		return err
	}
	if st == nil {
		st = &worldState{}
	}
	if p.check != nil {
		p.check(step, set)
	}
	for _, o := range objs {
		st.Objects = append(st.Objects, o)
		if err := rec.Record(set, st); err != nil {
			return err
		}
		crashpoint.Hit("world-" + step + "-recorded")
		if p.check != nil {
			p.check(o, set)
		}
		if err := os.WriteFile(filepath.Join(p.dir, o), nil, 0o600); err != nil {
			return err
		}
		crashpoint.Hit("world-" + step + "-created")
	}
	return nil
}

func (p *worldProvider) Prepare(_ context.Context, set *Set, rec Recorder) error {
	return p.create(set, rec, "prepare", "tgt-0", "tgt-1")
}
func (p *worldProvider) Commit(_ context.Context, set *Set, rec Recorder) error {
	return p.create(set, rec, "commit", "cbw-0", "cbw-1")
}
func (p *worldProvider) Expose(_ context.Context, set *Set, rec Recorder) error {
	return p.create(set, rec, "expose", "export-0", "export-1")
}

// Release removes what the journal names and exists, and nothing else.
func (p *worldProvider) Release(_ context.Context, set *Set) ([]string, error) {
	st, err := ProviderStateOf[worldState](set)
	if err != nil || st == nil {
		return nil, err
	}
	var removed []string
	for _, o := range slices.Backward(st.Objects) {
		if err := os.Remove(filepath.Join(p.dir, o)); err == nil {
			removed = append(removed, o)
		} else if !errors.Is(err, os.ErrNotExist) {
			return removed, err
		}
	}
	return removed, nil
}
func (p *worldProvider) Alive(context.Context, *Set) (bool, error) { return true, nil }
func (p *worldProvider) Close() error                              { return nil }

// objects lists what exists in the fake VM.
func (p *worldProvider) objects(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir(p.dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// fileWriter is frozen while its file exists.
type fileWriter struct {
	path  string
	check func(w *fileWriter)
}

func (w *fileWriter) Name() string                              { return "file:" + filepath.Base(w.path) }
func (w *fileWriter) Level() Level                              { return Filesystem }
func (w *fileWriter) Spec() WriterSpec                          { return WriterSpec{Kind: "file", Path: w.path} }
func (w *fileWriter) Close() error                              { return nil }
func (w *fileWriter) Prepare(context.Context, SetContext) error { return nil }
func (w *fileWriter) Freeze(context.Context) error {
	if w.check != nil {
		w.check(w)
	}
	return os.WriteFile(w.path, nil, 0o600)
}
func (w *fileWriter) Thaw(context.Context) error {
	if err := os.Remove(w.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func worldCoordinator(dir string, p *worldProvider, writers ...Writer) *Coordinator {
	return &Coordinator{Provider: p, Writers: writers, Journal: &Journal{Dir: filepath.Join(dir, "journal")},
		Rebuild: func(s WriterSpec) (Writer, error) { return &fileWriter{path: s.Path}, nil }}
}

// TestJournalOrdering: the journal holds the set before anything is
// created, names each object before it is created, and records the phase
// (and each writer as freezing) before the step that acts in it.
func TestJournalOrdering(t *testing.T) {
	for _, nwriters := range []int{0, 2} {
		t.Run(fmt.Sprintf("%d writers", nwriters), func(t *testing.T) {
			dir := t.TempDir()
			vm := filepath.Join(dir, "vm")
			os.Mkdir(vm, 0o700)
			p := &worldProvider{dir: vm}
			var writers []Writer
			for i := range nwriters {
				writers = append(writers, &fileWriter{path: filepath.Join(dir, fmt.Sprintf("frozen-%d", i))})
			}
			c := worldCoordinator(dir, p, writers...)
			s, err := c.Open(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			wantPhase := map[string]Phase{"tgt": PhasePreparing, "cbw": PhaseFreezing, "export": PhaseThawed,
				"prepare": PhasePreparing, "commit": PhaseFreezing, "expose": PhaseThawed}
			var checked []string
			p.check = func(obj string, set *Set) {
				checked = append(checked, obj)
				rec, err := c.Journal.Load("world-vm")
				if err != nil || rec == nil {
					t.Fatalf("before creating %s: journal %v, %v", obj, rec, err)
				}
				if rec.ID != set.ID {
					t.Errorf("before creating %s: journal holds set %s, not %s", obj, rec.ID, set.ID)
				}
				// At the start of a step (no "-"), nothing of it is recorded yet.
				isStep := !strings.Contains(obj, "-")
				st, err := ProviderStateOf[worldState](rec)
				if !isStep && (err != nil || st == nil || !slices.Contains(st.Objects, obj)) {
					t.Errorf("%s created before the journal named it (journal: %+v, %v)", obj, st, err)
				}
				want := wantPhase[strings.Split(obj, "-")[0]]
				if rec.Phase != want {
					t.Errorf("before creating %s: journal phase %v, want %v", obj, rec.Phase, want)
				}
				if want == PhaseFreezing {
					for _, w := range rec.Writers {
						if w.State != WriterFreezing {
							t.Errorf("commit with writer %s recorded %v, want freezing", w.Name, w.State)
						}
					}
				}
			}
			for i, w := range writers {
				w.(*fileWriter).check = func(w *fileWriter) {
					rec, err := c.Journal.Load("world-vm")
					if err != nil || rec == nil {
						t.Fatalf("freeze of %s: journal %v, %v", w.Name(), rec, err)
					}
					if rec.Phase != PhaseFreezing || rec.Writers[i].State != WriterFreezing {
						t.Errorf("freeze of %s: journal phase %v, writer %v; want freezing, freezing", w.Name(), rec.Phase, rec.Writers[i].State)
					}
					checked = append(checked, w.Name())
				}
			}
			set, err := s.Create(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if want := 9 + nwriters; len(checked) != want {
				t.Errorf("checked %v, want %d steps", checked, want)
			}
			rec, err := c.Journal.Load("world-vm")
			if err != nil || rec == nil || rec.Phase != PhaseExposed {
				t.Fatalf("journal after create: %+v, %v", rec, err)
			}
			if _, err := s.Delete(context.Background(), set.ID); err != nil {
				t.Fatal(err)
			}
			if objs := p.objects(t); len(objs) > 0 {
				t.Errorf("left after delete: %v", objs)
			}
		})
	}
}

// crashHelperEnv makes the test binary run one Create in the directory it
// names and exit: the parent test kills it at a crashpoint.
const crashHelperEnv = "VMSHADOW_COORD_CRASH_HELPER"

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashHelperEnv); dir != "" {
		p := &worldProvider{dir: filepath.Join(dir, "vm")}
		c := worldCoordinator(dir, p, &fileWriter{path: filepath.Join(dir, "frozen-0")}, &fileWriter{path: filepath.Join(dir, "frozen-1")})
		s, err := c.Open(context.Background())
		if err == nil {
			_, err = s.Create(context.Background())
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestRecoverAfterCrash kills a process running Create (SIGKILL) at every
// crashpoint and checks that Recover, from the journal alone, thaws every
// writer left frozen and removes exactly what exists.
func TestRecoverAfterCrash(t *testing.T) {
	points := []struct {
		point string
		phase Phase // the journal's phase at the kill
	}{
		{"world-prepare-recorded", PhasePreparing}, {"world-prepare-created", PhasePreparing}, {"prepared", PhasePreparing},
		{"frozen", PhaseFreezing}, {"world-commit-recorded", PhaseFreezing}, {"world-commit-created", PhaseFreezing},
		{"committed", PhaseFreezing}, {"thawed", PhaseCommitted},
		{"world-expose-recorded", PhaseThawed}, {"world-expose-created", PhaseThawed},
	}
	for _, pt := range points {
		t.Run(pt.point, func(t *testing.T) {
			dir := t.TempDir()
			vm := filepath.Join(dir, "vm")
			os.Mkdir(vm, 0o700)
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), crashHelperEnv+"="+dir, "VMSHADOW_CRASH_AT="+pt.point)
			out, err := cmd.CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ProcessState.String() != "signal: killed" {
				t.Fatalf("helper was not killed at %s: %v\n%s", pt.point, err, out)
			}
			p := &worldProvider{dir: vm}
			c := worldCoordinator(dir, p, &fileWriter{path: filepath.Join(dir, "frozen-0")}, &fileWriter{path: filepath.Join(dir, "frozen-1")})
			rec, err := c.Journal.Load("world-vm")
			if err != nil || rec == nil {
				t.Fatalf("journal after the kill: %+v, %v", rec, err)
			}
			if rec.Phase != pt.phase {
				t.Errorf("journal phase %v, want %v", rec.Phase, pt.phase)
			}
			existed := p.objects(t)
			var frozen []string
			for i := range 2 {
				if _, err := os.Stat(filepath.Join(dir, fmt.Sprintf("frozen-%d", i))); err == nil {
					frozen = append(frozen, fmt.Sprintf("file:frozen-%d", i))
				}
			}
			s, err := c.Open(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			rep, err := s.Recover(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if left := p.objects(t); len(left) > 0 {
				t.Errorf("recover left %v", left)
			}
			removed := slices.Sorted(slices.Values(rep.Removed))
			if !slices.Equal(removed, existed) {
				t.Errorf("recover removed %v, the VM had %v", removed, existed)
			}
			for _, f := range frozen {
				if !slices.Contains(rep.Thawed, f) {
					t.Errorf("%s was frozen, recover thawed only %v", f, rep.Thawed)
				}
			}
			for i := range 2 {
				if _, err := os.Stat(filepath.Join(dir, fmt.Sprintf("frozen-%d", i))); err == nil {
					t.Errorf("writer %d still frozen after recover", i)
				}
			}
			if rec, _ := c.Journal.Load("world-vm"); rec != nil {
				t.Errorf("journal left after recover: %+v", rec)
			}
			b, _ := json.Marshal(rep)
			t.Logf("at %s: existed %v frozen %v; recover %s", pt.point, existed, frozen, b)
		})
	}
}
