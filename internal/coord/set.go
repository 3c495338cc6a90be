package coord

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Shadow is one disk's shadow copy: a read-only view of the disk at the
// set's instant.
type Shadow struct {
	ID   string `json:"id"`
	Disk string `json:"disk"` // device's qdev id, or node name when the device has none
	Node string `json:"node"` // the hypervisor's node the shadow copy reads
	Size int64  `json:"size"` // bytes
	NBD  string `json:"nbd"`  // read-only NBD URI accepted by qemu-img and qemu-io

	// Set only when the set was asked to rotate change tracking (backups).
	Bitmap     string `json:"bitmap,omitempty"`      // exported dirty bitmap: changes since the previous checkpoint
	Checkpoint string `json:"checkpoint,omitempty"`  // bitmap started at this set's instant
	FullReason string `json:"full_reason,omitempty"` // why changes since the previous checkpoint are unknown
}

// WriterState is what became of one writer in a set.
type WriterState struct {
	Name  string     `json:"name"`
	Level Level      `json:"level"`
	Spec  WriterSpec `json:"spec"`
	// State: pending, freezing (freeze attempted, not yet thawed),
	// thawed, or failed (prepare or freeze failed; Error says why).
	State WriterStatus `json:"state"`
	Error string       `json:"error,omitempty"`
}

// Set is a snapshot set. It is also the journal record: it is saved before
// each step that creates something, so that Recover can undo a set left
// behind by a process that was killed.
type Set struct {
	Version     int       `json:"version"`
	ID          string    `json:"set_id"`
	VM          string    `json:"vm"`
	Provider    string    `json:"provider"`
	Consistency Level     `json:"consistency"`
	Created     time.Time `json:"created"`
	FreezeMS    int64     `json:"freeze_ms"`
	// Instant says how the disks were captured together, when a provider
	// cannot take them all in one atomic step (InstantPaused, ...); empty
	// when the provider's commit is atomic across disks. PauseMS is how
	// long the VM was paused for it.
	Instant  string        `json:"instant,omitempty"`
	PauseMS  int64         `json:"pause_ms,omitempty"`
	Shadows  []Shadow      `json:"shadows"`
	Writers  []WriterState `json:"writers"`
	Warnings []string      `json:"warnings,omitempty"`
	// Phase: preparing, freezing, committed, thawed, exposed, releasing.
	Phase Phase `json:"phase"`
	// PID of the vmshadow process that created the set.
	PID int `json:"pid"`
	// Ephemeral: the set lives only while its creator holds the VM's lock.
	Ephemeral bool `json:"ephemeral,omitempty"`
	// Group is set when the set is one VM's part of a set across several
	// VMs (a consistency group): all members share the set's ID.
	Group *GroupRef `json:"group,omitempty"`
	// Paused: the group set paused this VM (recorded before the pause)
	// and has not let it run again yet; Delete and Recover resume it.
	Paused bool `json:"paused,omitempty"`
	// ProviderState is the provider's own record of what it created.
	ProviderState json.RawMessage `json:"provider_state,omitempty"`
}

// Info is the public view of a set: the "snapshot create" summary and each
// element of "snapshot list".
type Info struct {
	ID          string        `json:"set_id"`
	VM          string        `json:"vm"`
	Consistency Level         `json:"consistency"`
	Created     string        `json:"created"`
	FreezeMS    int64         `json:"freeze_ms"`
	Instant     string        `json:"instant,omitempty"`
	PauseMS     int64         `json:"pause_ms,omitempty"`
	Shadows     []Shadow      `json:"shadows"`
	Writers     []WriterState `json:"writers"`
	Warnings    []string      `json:"warnings,omitempty"`
	Phase       Phase         `json:"phase"`
	Group       *GroupRef     `json:"group,omitempty"`
}

// How a provider whose commit is not atomic across disks captured them
// (Set.Instant).
const (
	// InstantPaused: the VM was paused from before the first disk's
	// snapshot to after the last: all disks at one instant.
	InstantPaused = "vm-paused"
	// InstantOneDisk: the VM has one disk: one instant.
	InstantOneDisk = "one-disk"
	// InstantNotRunning: the VM was not running: nothing changed between
	// the disks' snapshots.
	InstantNotRunning = "not-running"
	// InstantPerDisk: the disks were captured one after another while the
	// VM ran: each disk is crash-consistent on its own, not with the others.
	InstantPerDisk = "per-disk"
)

// Info returns the public view of the set.
func (s *Set) Info() Info {
	shadows := s.Shadows
	if shadows == nil {
		shadows = []Shadow{}
	}
	writers := s.Writers
	if writers == nil {
		writers = []WriterState{}
	}
	return Info{ID: s.ID, VM: s.VM, Consistency: s.Consistency, Created: s.Created.Format(time.RFC3339),
		FreezeMS: s.FreezeMS, Instant: s.Instant, PauseMS: s.PauseMS, Shadows: shadows, Writers: writers, Warnings: s.Warnings, Phase: s.Phase, Group: s.Group}
}

// NewSetID returns a fresh set id: 10 lower-case base32 characters, short
// enough to fit QEMU's 31-byte node names with a prefix.
func NewSetID() string {
	var b [7]byte
	rand.Read(b[:])
	const alphabet = "abcdefghijklmnopqrstuvwxyz234567"
	var sb strings.Builder
	v := uint64(0)
	for _, x := range b {
		v = v<<8 | uint64(x)
	}
	for i := 0; i < 10; i++ {
		sb.WriteByte(alphabet[v&31])
		v >>= 5
	}
	return sb.String()
}

// ProviderStateOf decodes set's provider state as a T: nil when the set is
// nil or has none, errs.ErrCorrupt when the journal holds something else.
func ProviderStateOf[T any](set *Set) (*T, error) {
	if set == nil || len(set.ProviderState) == 0 {
		return nil, nil
	}
	var st T
	if err := json.Unmarshal(set.ProviderState, &st); err != nil {
		return nil, fmt.Errorf("journal of set %s: provider state: %w: %w", set.ID, err, errs.ErrCorrupt)
	}
	return &st, nil
}

// Recorder writes snapshot sets' journal records. Providers receive one
// in each call that may create something in the VM and record, in one
// call, what they are about to create BEFORE creating it, so that Release
// can always find and remove it, even from a record left by a process that
// was killed (docs/snapshot-sets.md, "The journal").
type Recorder interface {
	// Record makes state (JSON-encoded) set's provider state and writes
	// the whole set durably to the journal.
	Record(set *Set, state any) error
}

// Recorder returns the Recorder that writes sets to j under key.
func (j *Journal) Recorder(key string) Recorder { return journalRecorder{j, key} }

type journalRecorder struct {
	j   *Journal
	key string
}

func (r journalRecorder) Record(set *Set, state any) error {
	b, err := json.Marshal(state)
	if err != nil {
		return fmt.Errorf("record provider state of set %s: %w", set.ID, err)
	}
	set.ProviderState = b
	return r.save(set)
}

// save writes set as it is: the coordinator's own records (phases,
// writer states).
func (r journalRecorder) save(set *Set) error { return r.j.Save(r.key, set) }
