package nbdsource

import (
	"errors"
	"fmt"
	"iter"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/nbd"
)

func seq(exts ...nbd.Extent) iter.Seq2[nbd.Extent, error] {
	return func(yield func(nbd.Extent, error) bool) {
		for _, e := range exts {
			if !yield(e, nil) {
				return
			}
		}
	}
}

func x(off, n int64, flags uint32) nbd.Extent {
	return nbd.Extent{Offset: off, Length: n, Flags: flags}
}

func render(it iter.Seq2[backup.Extent, error]) string {
	var parts []string
	for e, err := range it {
		if err != nil {
			return "error: " + err.Error()
		}
		parts = append(parts, fmt.Sprintf("%d+%d:%v", e.Off, e.Len, e.Kind))
	}
	return strings.Join(parts, " ")
}

func TestMerge(t *testing.T) {
	const Z, H, D = nbd.StateZero, nbd.StateHole, nbd.StateDirty
	tests := []struct {
		name         string
		alloc, dirty []nbd.Extent
		want         string
	}{
		{"nothing dirty",
			[]nbd.Extent{x(0, 100, 0)}, []nbd.Extent{x(0, 100, 0)},
			"0+100:unchanged"},
		{"dirty data and dirty zeros",
			[]nbd.Extent{x(0, 40, 0), x(40, 60, Z|H)}, []nbd.Extent{x(0, 10, 0), x(10, 50, D), x(60, 40, 0)},
			"0+10:unchanged 10+30:data 40+20:zero 60+40:unchanged"},
		{"hole without the zero flag is read",
			[]nbd.Extent{x(0, 100, H)}, []nbd.Extent{x(0, 100, D)},
			"0+100:data"},
		{"adjacent equal kinds merge",
			[]nbd.Extent{x(0, 50, 0), x(50, 50, 0)}, []nbd.Extent{x(0, 30, D), x(30, 70, D)},
			"0+100:data"},
		{"gap in bitmap extents",
			[]nbd.Extent{x(0, 100, 0)}, []nbd.Extent{x(0, 30, D), x(40, 60, 0)},
			"error: disk vda: dirty bitmap extents do not cover offset 30"},
		{"bitmap ends early",
			[]nbd.Extent{x(0, 100, 0)}, []nbd.Extent{x(0, 30, D)},
			"error: disk vda: dirty bitmap extents do not cover offset 30"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := render(merge(seq(tt.alloc...), seq(tt.dirty...), 100, "vda")); got != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
		})
	}
	failing := func(yield func(nbd.Extent, error) bool) { yield(nbd.Extent{}, errors.New("connection reset")) }
	if got := render(merge(seq(nbd.Extent{Offset: 0, Length: 100}), failing, 100, "vda")); !strings.Contains(got, "connection reset") {
		t.Errorf("error not passed on: %s", got)
	}
}
