package qemu_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/tracking"
)

// dirtyExtents reads an exported dirty bitmap with qemu-img map and returns
// the dirty ranges as "off+len" strings.
func dirtyExtents(t *testing.T, sh coord.Shadow) []string {
	t.Helper()
	sock := sh.NBD[strings.Index(sh.NBD, "socket=")+len("socket="):]
	opts := fmt.Sprintf("driver=nbd,export=%s,server.type=unix,server.path=%s,x-dirty-bitmap=qemu:dirty-bitmap:%s", sh.Disk, sock, sh.Bitmap)
	out, err := exec.Command("qemu-img", "map", "--output=json", "--image-opts", opts).Output()
	if err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	var ext []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal(out, &ext); err != nil {
		t.Fatal(err)
	}
	var dirty []string
	for _, e := range ext {
		if !e.Data { // with x-dirty-bitmap, a dirty range reads as "no data"
			dirty = append(dirty, fmt.Sprintf("%d+%d", e.Start, e.Length))
		}
	}
	return dirty
}

type rig struct {
	t       *testing.T
	vm      *qemutest.VM
	journal *coord.Journal
	scratch string
}

// set takes a set with the given checkpoint request, runs fn on it, then
// completes the checkpoint if ok and deletes the set, which must give back
// everything it took (the chain's bitmaps may move on).
func (r *rig) set(cp *tracking.Request, ok bool, fn func(set *coord.Set)) *coord.Set {
	r.t.Helper()
	before := r.vm.Baseline(r.scratch).WithChains()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p := qemu.New(qemu.Options{QMPPath: r.vm.QMPPath, ScratchDir: r.scratch, Tracking: cp})
	s, err := (&coord.Coordinator{Provider: p, Journal: r.journal}).Open(ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	defer s.Close()
	set, err := s.Create(ctx)
	if err != nil {
		r.t.Fatal(err)
	}
	fn(set)
	if ok {
		if err := p.Complete(set, s); err != nil {
			r.t.Fatal(err)
		}
	}
	if _, err := s.Delete(ctx, set.ID); err != nil {
		r.t.Fatal(err)
	}
	r.vm.AssertAsBefore(r.t, before)
	return set
}

func bitmaps(vm *qemutest.VM) string {
	return strings.Join(vm.Graph().Bitmaps, " ")
}

func TestCheckpointChain(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda"}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
	dir, _ := os.MkdirTemp("", "vscp")
	defer os.RemoveAll(dir)
	r := &rig{t: t, vm: vm, journal: &coord.Journal{Dir: dir + "/j"}, scratch: dir + "/s"}
	prefix := "vmshadow-repo1"
	prev := func(set *coord.Set) map[string]tracking.Previous {
		m := map[string]tracking.Previous{}
		for _, sh := range set.Shadows {
			m[sh.Disk] = tracking.Previous{Checkpoint: sh.Checkpoint, Size: sh.Size}
		}
		return m
	}

	// First backup: full, a new bitmap per disk.
	s1 := r.set(&tracking.Request{Prefix: prefix}, true, func(set *coord.Set) {
		for _, sh := range set.Shadows {
			if sh.Bitmap != "" || !strings.Contains(sh.FullReason, "first backup") || sh.Checkpoint != prefix+"-"+set.ID {
				t.Errorf("first set: %+v", sh)
			}
		}
	})
	if got, want := bitmaps(vm), fmt.Sprintf("fmt-vda/%s-%s fmt-vdb/%s-%s", prefix, s1.ID, prefix, s1.ID); got != want {
		t.Fatalf("bitmaps after first backup = %q, want %q", got, want)
	}

	// Changes, then a second backup that fails: it exports exactly those
	// changes, and afterwards they are tracked again.
	vm.Write("vda", 1, 1<<20, 64<<10)
	vm.Write("vdb", 2, 4<<20, 128<<10)
	s2 := r.set(&tracking.Request{Prefix: prefix, Previous: prev(s1)}, false, func(set *coord.Set) {
		vm.Write("vda", 3, 8<<20, 64<<10) // after the instant: not in this backup
		for _, sh := range set.Shadows {
			if sh.FullReason != "" || sh.Bitmap != prefix+"-"+s1.ID {
				t.Errorf("second set: %+v", sh)
			}
			want := map[string]string{"vda": "1048576+65536", "vdb": "4194304+131072"}[sh.Disk]
			if got := strings.Join(dirtyExtents(t, sh), ","); got != want {
				t.Errorf("%s: dirty = %s, want %s", sh.Disk, got, want)
			}
		}
	})
	if got, want := bitmaps(vm), fmt.Sprintf("fmt-vda/%s-%s fmt-vdb/%s-%s", prefix, s1.ID, prefix, s1.ID); got != want {
		t.Fatalf("bitmaps after failed backup = %q, want %q (set %s merged back)", got, want, s2.ID)
	}

	// Third backup from the first checkpoint: sees changes from before and
	// during the failed one, and succeeds.
	s3 := r.set(&tracking.Request{Prefix: prefix, Previous: prev(s1)}, true, func(set *coord.Set) {
		for _, sh := range set.Shadows {
			want := map[string]string{"vda": "1048576+65536,8388608+65536", "vdb": "4194304+131072"}[sh.Disk]
			if got := strings.Join(dirtyExtents(t, sh), ","); got != want {
				t.Errorf("%s: dirty = %s, want %s", sh.Disk, got, want)
			}
		}
	})
	if got, want := bitmaps(vm), fmt.Sprintf("fmt-vda/%s-%s fmt-vdb/%s-%s", prefix, s3.ID, prefix, s3.ID); got != want {
		t.Fatalf("bitmaps after third backup = %q, want %q", got, want)
	}

	// Chain breaks: a resized disk, a bitmap that is gone, --full, a second
	// repository on the same VM (its own chain, ours untouched).
	p3 := prev(s3)
	p3["vdb"] = tracking.Previous{Checkpoint: p3["vdb"].Checkpoint, Size: 1}
	vm.Exec("block-dirty-bitmap-remove", map[string]string{"node": "fmt-vda", "name": p3["vda"].Checkpoint}, nil)
	r.set(&tracking.Request{Prefix: prefix, Previous: p3}, false, func(set *coord.Set) {
		for _, sh := range set.Shadows {
			want := map[string]string{"vda": "is missing", "vdb": "resized"}[sh.Disk]
			if !strings.Contains(sh.FullReason, want) || sh.Bitmap != "" {
				t.Errorf("%s: reason %q, want %q", sh.Disk, sh.FullReason, want)
			}
		}
	})
	// That backup was not stored: the broken chain's bitmaps stay (the next
	// backup gives the same reasons); a stored full backup removes them.
	if got, want := bitmaps(vm), fmt.Sprintf("fmt-vdb/%s-%s", prefix, s3.ID); got != want {
		t.Errorf("bitmaps after a failed full backup = %q, want %q", got, want)
	}
	s5 := r.set(&tracking.Request{Prefix: prefix}, true, func(*coord.Set) {})
	if got, want := bitmaps(vm), fmt.Sprintf("fmt-vda/%s-%s fmt-vdb/%s-%s", prefix, s5.ID, prefix, s5.ID); got != want {
		t.Errorf("bitmaps after a stored full backup = %q, want %q", got, want)
	}
	other := r.set(&tracking.Request{Prefix: "vmshadow-repo2"}, true, func(*coord.Set) {})
	r.set(&tracking.Request{Prefix: "vmshadow-repo2", Previous: prev(other), Full: true}, true, func(set *coord.Set) {
		for _, sh := range set.Shadows {
			if !strings.Contains(sh.FullReason, "--full") {
				t.Errorf("%s: reason %q", sh.Disk, sh.FullReason)
			}
		}
	})
	if got := bitmaps(vm); !strings.Contains(got, "fmt-vda/"+prefix+"-"+s5.ID) || !strings.Contains(got, "fmt-vdb/"+prefix+"-"+s5.ID) {
		t.Errorf("repository 2 touched repository 1's chain: %s", got)
	}
}

// TestCheckpointOldQcow2: a qcow2 v2 image cannot store bitmaps; its change
// tracking lives in memory, and backups still work.
func TestCheckpointOldQcow2(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Disks: []qemutest.Disk{{ID: "vda", CreateOptions: "compat=0.10"}}})
	dir, _ := os.MkdirTemp("", "vscp")
	defer os.RemoveAll(dir)
	r := &rig{t: t, vm: vm, journal: &coord.Journal{Dir: dir + "/j"}, scratch: dir + "/s"}
	set := r.set(&tracking.Request{Prefix: "vmshadow-old"}, true, func(*coord.Set) {})
	var nodes []struct {
		NodeName     string `json:"node-name"`
		DirtyBitmaps []struct {
			Name       string `json:"name"`
			Persistent bool   `json:"persistent"`
		} `json:"dirty-bitmaps"`
	}
	vm.Exec("query-named-block-nodes", map[string]bool{"flat": true}, &nodes)
	found := false
	for _, n := range nodes {
		for _, b := range n.DirtyBitmaps {
			if b.Name == "vmshadow-old-"+set.ID {
				found = true
				if b.Persistent {
					t.Error("bitmap on a qcow2 v2 image marked persistent")
				}
			}
		}
	}
	if !found {
		t.Fatal("no change-tracking bitmap on the qcow2 v2 disk")
	}
}

// TestCheckpointFullInterrupted: a --full backup that is not stored leaves
// the chain where the last stored backup left it (the next backup is
// incremental and sees every change since that backup, those made during
// the --full one included); a stored --full backup moves the chain on.
func TestCheckpointFullInterrupted(t *testing.T) {
	vm := qemutest.Start(t, qemutest.Options{Running: true, Disks: []qemutest.Disk{{ID: "vda"}}})
	dir, _ := os.MkdirTemp("", "vscp")
	defer os.RemoveAll(dir)
	r := &rig{t: t, vm: vm, journal: &coord.Journal{Dir: dir + "/j"}, scratch: dir + "/s"}
	prefix := "vmshadow-repo1"
	prev := func(set *coord.Set) map[string]tracking.Previous {
		return map[string]tracking.Previous{"vda": {Checkpoint: set.Shadows[0].Checkpoint, Size: set.Shadows[0].Size}}
	}
	s1 := r.set(&tracking.Request{Prefix: prefix}, true, func(*coord.Set) {})
	vm.Write("vda", 1, 1<<20, 64<<10)
	r.set(&tracking.Request{Prefix: prefix, Previous: prev(s1), Full: true}, false, func(set *coord.Set) {
		sh := set.Shadows[0]
		if sh.Bitmap != "" || !strings.Contains(sh.FullReason, "--full") {
			t.Errorf("--full set: bitmap %q reason %q, want a full read for --full", sh.Bitmap, sh.FullReason)
		}
		vm.Write("vda", 2, 8<<20, 64<<10) // during the backup that is not stored
	})
	if got, want := bitmaps(vm), "fmt-vda/"+prefix+"-"+s1.ID; got != want {
		t.Fatalf("bitmaps after an interrupted --full backup = %q, want %q", got, want)
	}
	s3 := r.set(&tracking.Request{Prefix: prefix, Previous: prev(s1)}, true, func(set *coord.Set) {
		sh := set.Shadows[0]
		if sh.FullReason != "" || sh.Bitmap != prefix+"-"+s1.ID {
			t.Fatalf("backup after an interrupted --full: bitmap %q reason %q, want incremental from %s", sh.Bitmap, sh.FullReason, s1.ID)
		}
		if got, want := strings.Join(dirtyExtents(t, sh), ","), "1048576+65536,8388608+65536"; got != want {
			t.Errorf("dirty = %s, want %s", got, want)
		}
	})
	s4 := r.set(&tracking.Request{Prefix: prefix, Previous: prev(s3), Full: true}, true, func(*coord.Set) {})
	if got, want := bitmaps(vm), "fmt-vda/"+prefix+"-"+s4.ID; got != want {
		t.Fatalf("bitmaps after a stored --full backup = %q, want %q", got, want)
	}
}
