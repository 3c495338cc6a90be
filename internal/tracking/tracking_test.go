package tracking

import (
	"strings"
	"testing"
)

func TestReason(t *testing.T) {
	prev := map[string]Previous{"vda": {Checkpoint: "vmshadow-r-1", Size: 100}, "vdb": {Size: 50}}
	for _, c := range []struct {
		name string
		r    Request
		disk string
		size int64
		want string // substring; "" means no common reason
	}{
		{"chain holds", Request{Previous: prev}, "vda", 100, ""},
		{"--full", Request{Previous: prev, Full: true}, "vda", 100, "--full"},
		{"first backup", Request{}, "vda", 100, "first backup"},
		{"disk added", Request{Previous: prev}, "vdc", 100, "disk added"},
		{"disk without checkpoint", Request{Previous: prev}, "vdb", 50, "disk added"},
		{"resized", Request{Previous: prev}, "vda", 200, "resized from 100 to 200 bytes"},
	} {
		got := c.r.Reason(c.disk, c.size)
		if c.want == "" && got != "" || c.want != "" && !strings.Contains(got, c.want) {
			t.Errorf("%s: Reason = %q, want %q", c.name, got, c.want)
		}
	}
	if got := Pruned("checkpoint VDI", "u1", "u2"); !strings.Contains(got, "checkpoint VDI u1, whose backup is no longer in the repository") || !strings.HasSuffix(got, "checkpoint u2") {
		t.Errorf("Pruned = %q", got)
	}
}
