package grouptest

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// logImage writes a raw log image of VM vm holding records 1..last, of
// slots slots, and returns its path.
func logImage(t *testing.T, vm int, last uint64, slots int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "log.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(slots * RecordSize); err != nil {
		t.Fatal(err)
	}
	for n := uint64(1); n <= last; n++ {
		if _, err := f.WriteAt(Record(vm, n), Offset(n)); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

func group(t *testing.T, maxes ...uint64) []Member {
	t.Helper()
	var ms []Member
	for i, m := range maxes {
		ms = append(ms, Member{Name: string(rune('a' + i)), Image: logImage(t, i+1, m, 256)})
	}
	return ms
}

func TestCheckConsistentCuts(t *testing.T) {
	for _, maxes := range [][]uint64{
		{0, 0, 0}, // empty logs: nothing written yet
		{1, 0, 0},
		{5, 5, 5},
		{6, 5, 5},
		{6, 6, 5},
		{256, 256, 255}, // the whole image full
		{7},
	} {
		res, err := Check(group(t, maxes...))
		if err != nil {
			t.Errorf("%v: %v", maxes, err)
			continue
		}
		for i := range maxes {
			if res.Max[i] != maxes[i] {
				t.Errorf("%v: read %v", maxes, res.Max)
				break
			}
		}
	}
}

func TestCheckBrokenCuts(t *testing.T) {
	for _, tc := range []struct {
		maxes          []uint64
		earlier, later int
		msg            string
	}{
		// A later VM ahead of an earlier one: the per-VM backups taken
		// one after another, the later ones when the workload had moved on.
		{[]uint64{5, 6, 6}, 0, 1, "VM 2 (b) holds record 6, which VM 1 (a) before it lacks (its log ends at 5)"},
		{[]uint64{6, 6, 7}, 1, 2, "VM 3 (c) holds record 7, which VM 2 (b) before it lacks (its log ends at 6)"},
		{[]uint64{0, 0, 1}, 1, 2, "VM 3 (c) holds record 1"},
		// The first VM more than one ahead of the last: VM 1 wrote 7
		// only after VM 3 wrote 6.
		{[]uint64{7, 7, 5}, 2, 0, "VM 1 (a) holds record 7, written only after VM 3 (c) wrote record 6, which c's log lacks (it ends at 5)"},
		{[]uint64{2, 0, 0}, 2, 0, "VM 1 (a) holds record 2"},
	} {
		_, err := Check(group(t, tc.maxes...))
		var ie *InvariantError
		if !errors.As(err, &ie) {
			t.Errorf("%v: %v, want an InvariantError", tc.maxes, err)
			continue
		}
		if ie.Earlier != tc.earlier || ie.Later != tc.later || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%v: pair %d,%d, %q; want pair %d,%d and %q", tc.maxes, ie.Earlier, ie.Later, err, tc.earlier, tc.later, tc.msg)
		}
	}
}

// damaged writes raw bytes over a log image.
func damaged(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestCheckDamagedLogs(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, path string)
		msg    string
	}{
		{"gap", func(t *testing.T, path string) {
			damaged(t, path, Offset(3), make([]byte, RecordSize)) // record 3 missing, 4 and 5 there
		}, "a gap: the records end at 2, but slot 4 holds record 4"},
		{"record far after the end", func(t *testing.T, path string) {
			damaged(t, path, Offset(100), Record(1, 100))
		}, "a gap: the records end at 5, but slot 100 holds record 100"},
		{"torn record", func(t *testing.T, path string) {
			// The first half of record 6 over the second half of nothing.
			damaged(t, path, Offset(6), Record(1, 6)[:RecordSize/2])
		}, "slot 6 (offset 2560): checksum"},
		{"torn over an older record", func(t *testing.T, path string) {
			// The second half of record 4 still holds record 3's bytes.
			rec := Record(1, 4)
			copy(rec[RecordSize/2:], Record(1, 3)[RecordSize/2:])
			damaged(t, path, Offset(4), rec)
		}, "slot 4 (offset 1536): checksum"},
		{"garbage", func(t *testing.T, path string) {
			damaged(t, path, Offset(2)+100, []byte{1})
		}, "slot 2 (offset 512): checksum"},
		{"no magic", func(t *testing.T, path string) {
			damaged(t, path, Offset(5), []byte("XX"))
		}, "slot 5 (offset 2048): no record magic"},
		{"record in the wrong slot", func(t *testing.T, path string) {
			damaged(t, path, Offset(2), Record(1, 7))
		}, "slot 2 holds record 7"},
		{"another VM's log", func(t *testing.T, path string) {
			for n := uint64(1); n <= 5; n++ {
				damaged(t, path, Offset(n), Record(2, n))
			}
		}, "record 1 was written for VM 2"},
		{"image cut in a slot", func(t *testing.T, path string) {
			if err := os.Truncate(path, 256*RecordSize-100); err != nil {
				t.Fatal(err)
			}
		}, "the image ends in the middle of slot 256"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ms := group(t, 5, 5, 5)
			tc.damage(t, ms[0].Image)
			_, err := Check(ms)
			var ie *InvariantError
			if err == nil || errors.As(err, &ie) {
				t.Fatalf("Check = %v, want a damaged log", err)
			}
			if !strings.Contains(err.Error(), tc.msg) || !strings.HasPrefix(err.Error(), "a: ") {
				t.Fatalf("Check = %q, want %q about a", err, tc.msg)
			}
		})
	}
	if _, err := Check([]Member{{Name: "gone", Image: filepath.Join(t.TempDir(), "none.raw")}}); err == nil || !strings.Contains(err.Error(), "none.raw") {
		t.Errorf("missing image: %v", err)
	}
	if _, err := Check(nil); err == nil {
		t.Error("Check of no members succeeded")
	}
}
