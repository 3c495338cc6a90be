package repo

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
)

// Health check results (vmshadow healthcheck) are kept per backup in one
// sealed blob, health/<backup ID> (magic "vsHC"), holding the latest
// MaxHealthResults results, newest last. A new result replaces the blob
// atomically (read, append, put: two checks of the same backup at the same
// time may keep only one of the two). The blob belongs to its backup:
// prune and DeleteBackup delete it with the manifest, and gc deletes any
// whose backup no longer exists. verify opens the records of the backups it
// checks. copy does not copy them: a health check proves that the backup
// boots from the repository it was read from.

// magicHealth marks a sealed health record blob.
var magicHealth = [4]byte{'v', 's', 'H', 'C'}

// MaxHealthResults is how many results a backup's health record keeps.
const MaxHealthResults = 10

// maxHealthPlain bounds a health record: ten results of a few KiB.
const maxHealthPlain = 1 << 20

// Health results.
const (
	HealthPassed = "passed"
	HealthFailed = "failed"
)

// HealthResult is the outcome of one health check of a backup.
type HealthResult struct {
	Result string    `json:"result"` // HealthPassed or HealthFailed
	Time   time.Time `json:"time"`   // when the check started
	// AnswerS is the seconds from starting the VM to the guest agent's
	// first answer (0 when it never answered).
	AnswerS float64 `json:"answer_s"`
	// Reason says why it failed, or what passed ("guest-ping answered",
	// "script exited 0").
	Reason string `json:"reason,omitempty"`
	// Boot says where the VM's hardware came from: "definition" (the
	// backup's libvirt domain XML) or "defaults".
	Boot    string `json:"boot,omitempty"`
	Accel   string `json:"accel,omitempty"`   // "kvm" or "tcg"
	Version string `json:"version,omitempty"` // of the vmshadow that checked
	// Script is the --script command run in the guest, ScriptExit its
	// exit code (nil when none ran to the end).
	Script     string `json:"script,omitempty"`
	ScriptExit *int   `json:"script_exit,omitempty"`
}

// HealthRecord is the stored record of a backup's health checks.
type HealthRecord struct {
	Backup  string         `json:"backup"`  // the backup's ID
	Results []HealthResult `json:"results"` // oldest first, at most MaxHealthResults
}

// Latest is the newest result, or nil.
func (h *HealthRecord) Latest() *HealthResult {
	if h == nil || len(h.Results) == 0 {
		return nil
	}
	return &h.Results[len(h.Results)-1]
}

// LastPassed is the newest passed result, or nil.
func (h *HealthRecord) LastPassed() *HealthResult {
	if h == nil {
		return nil
	}
	for i := len(h.Results) - 1; i >= 0; i-- {
		if h.Results[i].Result == HealthPassed {
			return &h.Results[i]
		}
	}
	return nil
}

func healthHandle(id ID) backend.Handle {
	return backend.Handle{Kind: backend.KindHealth, Name: id.String()}
}

// LoadHealth returns backup id's health record, or nil (and no error) when
// it was never checked.
func (r *Repo) LoadHealth(ctx context.Context, id ID) (*HealthRecord, error) {
	h := healthHandle(id)
	blob, err := r.be.Get(ctx, h, 0, -1)
	if err != nil {
		if backend.IsNotExist(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("read health record of backup %s: %w", id.Short(), err)
	}
	p, err := r.codec.open(nil, magicHealth, h.Name, blob, maxHealthPlain)
	if err != nil {
		return nil, fmt.Errorf("health record of backup %s: %w", id.Short(), err)
	}
	var rec HealthRecord
	if err := json.Unmarshal(p, &rec); err != nil {
		return nil, fmt.Errorf("health record of backup %s: %v: %w", id.Short(), err, errs.ErrCorrupt)
	}
	if rec.Backup != id.String() {
		return nil, fmt.Errorf("health record of backup %s names backup %q: %w", id.Short(), rec.Backup, errs.ErrCorrupt)
	}
	return &rec, nil
}

// AddHealth appends res to backup id's health record (keeping the newest
// MaxHealthResults) and stores it durably. The backup must exist. A damaged
// record is replaced. Hold a shared lock.
func (r *Repo) AddHealth(ctx context.Context, id ID, res HealthResult) (*HealthRecord, error) {
	if res.Result != HealthPassed && res.Result != HealthFailed {
		return nil, fmt.Errorf("health result %q: want %q or %q: %w", res.Result, HealthPassed, HealthFailed, errs.ErrUsage)
	}
	if _, err := r.be.Stat(ctx, backend.Handle{Kind: backend.KindBackups, Name: id.String()}); err != nil {
		if backend.IsNotExist(err) {
			return nil, fmt.Errorf("record health of backup %s: the backup no longer exists: %w", id.Short(), errs.ErrNotFound)
		}
		return nil, fmt.Errorf("record health of backup %s: %w", id.Short(), err)
	}
	rec, err := r.LoadHealth(ctx, id)
	if err != nil || rec == nil {
		rec = &HealthRecord{Backup: id.String()}
	}
	rec.Results = append(rec.Results, res)
	if n := len(rec.Results); n > MaxHealthResults {
		rec.Results = append([]HealthResult(nil), rec.Results[n-MaxHealthResults:]...)
	}
	plain, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	h := healthHandle(id)
	if err := r.be.Put(ctx, h, r.codec.seal(nil, magicHealth, h.Name, plain, true)); err != nil {
		return nil, fmt.Errorf("store health record of backup %s: %w", id.Short(), err)
	}
	if err := r.be.Sync(ctx); err != nil {
		return nil, fmt.Errorf("make health record of backup %s durable: %w", id.Short(), err)
	}
	return rec, nil
}

// deleteHealth removes backup id's health record, if any.
func (r *Repo) deleteHealth(ctx context.Context, id string) error {
	err := r.be.Delete(ctx, backend.Handle{Kind: backend.KindHealth, Name: id})
	if err != nil && !backend.IsNotExist(err) {
		return fmt.Errorf("remove health record of backup %.8s: %w", id, err)
	}
	return nil
}

// orphanHealth lists the health records whose backup is not in backups.
func (r *Repo) orphanHealth(ctx context.Context, backups map[string]bool) ([]backend.Info, error) {
	var out []backend.Info
	err := r.be.List(ctx, backend.KindHealth, "", func(fi backend.Info) error {
		if _, err := ParseID(fi.Name); err == nil && !backups[fi.Name] {
			out = append(out, fi)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list health records: %w", err)
	}
	return out, nil
}

// HealthRecords loads every stored health record (one listing, then one
// read per record: backups never checked cost nothing), keyed by backup
// ID; records that cannot be read are returned in bad. Retention rules
// and `backups` use it.
func (r *Repo) HealthRecords(ctx context.Context) (recs map[ID]*HealthRecord, bad map[ID]error, err error) {
	var ids []ID
	err = r.be.List(ctx, backend.KindHealth, "", func(fi backend.Info) error {
		if id, err := ParseID(fi.Name); err == nil {
			ids = append(ids, id)
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list health records: %w", err)
	}
	recs, bad = map[ID]*HealthRecord{}, map[ID]error{}
	for _, id := range ids {
		rec, err := r.LoadHealth(ctx, id)
		switch {
		case ctx.Err() != nil:
			return nil, nil, ctx.Err()
		case err != nil:
			bad[id] = err
		case rec != nil:
			recs[id] = rec
		}
	}
	return recs, bad, nil
}
