package restore_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// memTarget records how Run drives a Target, its disks kept in memory.
type memTarget struct {
	failCreate       bool
	disks            map[string]*orderedWriter
	finished, aborts int
}

func (m *memTarget) Create(ctx context.Context, d repo.ManifestDisk, x *repo.Index) (restore.ImageWriter, string, error) {
	if m.failCreate {
		return nil, "", errors.New("no room")
	}
	if m.disks == nil {
		m.disks = map[string]*orderedWriter{}
	}
	w := &orderedWriter{buf: make([]byte, x.Size())}
	m.disks[d.Name] = w
	return w, "memory:" + d.Name, nil
}

func (m *memTarget) Finish(context.Context) error { m.finished++; return nil }
func (m *memTarget) Abort(context.Context)        { m.aborts++ }

// TestRunDrivesTarget: Run writes each selected disk into the writer its
// target gave, verified, then finishes the target; any failure aborts it
// once, and a manifest that disagrees with the index is damage.
func TestRunDrivesTarget(t *testing.T) {
	r, _, img, _ := setup(t, 9*cs+7)
	ctx := context.Background()
	backups, _, err := r.ListBackups(ctx)
	if err != nil || len(backups) != 1 {
		t.Fatal(backups, err)
	}
	m := backups[0].Manifest
	sel, err := restore.Select(m, []string{"sda"})
	if err != nil {
		t.Fatal(err)
	}

	var ok memTarget
	res, err := restore.Run(ctx, r, sel, &ok, restore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ok.finished != 1 || ok.aborts != 0 || len(res) != 1 || res[0].Path != "memory:sda" || !res[0].Verified {
		t.Fatalf("success: finished %d aborted %d results %+v", ok.finished, ok.aborts, res)
	}
	if w := ok.disks["sda"]; w.bad || !bytes.Equal(w.buf, img) {
		t.Fatal("restored bytes differ or came out of order")
	}

	bad := memTarget{failCreate: true}
	if _, err := restore.Run(ctx, r, sel, &bad, restore.Options{}); err == nil || !strings.Contains(err.Error(), "disk sda: no room") {
		t.Fatalf("failing Create: %v", err)
	}
	if bad.finished != 0 || bad.aborts != 1 {
		t.Fatalf("failing Create: finished %d aborted %d, want 0 and 1", bad.finished, bad.aborts)
	}

	wrong := sel[0]
	wrong.Size++
	var dmg memTarget
	if _, err := restore.Run(ctx, r, []repo.ManifestDisk{wrong}, &dmg, restore.Options{}); !errors.Is(err, errs.ErrCorrupt) {
		t.Fatalf("manifest size unlike the index: %v, want ErrCorrupt", err)
	}
	if dmg.disks != nil || dmg.aborts != 1 {
		t.Fatalf("manifest size unlike the index: created %v, aborted %d", dmg.disks, dmg.aborts)
	}
}
