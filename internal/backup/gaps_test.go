package backup

import (
	"bytes"
	"testing"
)

// A reused chunk buffer holds the previous chunk: every byte the spans do
// not cover must come out zero, every byte they cover untouched.
func TestClearGaps(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spans []span
	}{
		{"whole", []span{{0, 16}}},
		{"none", nil},
		{"head and tail gaps", []span{{4, 8}}},
		{"several", []span{{0, 2}, {5, 3}, {10, 6}}},
		{"adjacent", []span{{0, 4}, {4, 4}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			buf := bytes.Repeat([]byte{0xaa}, 16)
			clearGaps(buf, tc.spans)
			want := make([]byte, 16)
			for _, s := range tc.spans {
				copy(want[s.off:s.off+s.n], bytes.Repeat([]byte{0xaa}, int(s.n)))
			}
			if !bytes.Equal(buf, want) {
				t.Fatalf("got %x, want %x", buf, want)
			}
		})
	}
}
