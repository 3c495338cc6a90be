package report

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

func TestJSONMessages(t *testing.T) {
	var out, errOut bytes.Buffer
	p := New(true, &out, &errOut)
	p.Status(struct {
		Phase string `json:"phase"`
	}{"freeze"}, "freezing")
	p.Warn("writer %s failed", "qga")
	p.Error(fmt.Errorf("create: %w", errs.ErrBusy))
	p.Summary(struct{}{}, nil)
	p.Summary(map[string]int{"n": 1}, nil)
	if errOut.Len() != 0 {
		t.Errorf("JSON mode wrote to stderr: %q", errOut.String())
	}
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	want := []string{
		`{"message_type":"status","phase":"freeze"}`,
		`{"message_type":"warning","message":"writer qga failed"}`,
		`{"message_type":"error","message":"create: busy","class":"busy","exit_code":3}`,
		`{"message_type":"summary"}`,
		`{"message_type":"summary","n":1}`,
	}
	if len(lines) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(lines), len(want), out.String())
	}
	for i := range want {
		if lines[i] != want[i] {
			t.Errorf("line %d = %s, want %s", i, lines[i], want[i])
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(lines[i]), &m); err != nil {
			t.Errorf("line %d not JSON: %v", i, err)
		}
	}
}

func TestHumanMessages(t *testing.T) {
	var out, errOut bytes.Buffer
	p := New(false, &out, &errOut)
	p.Status(nil, "freezing")
	p.Warn("crash consistent")
	p.Error(errors.New("boom"))
	p.Summary(nil, func(w io.Writer) { fmt.Fprint(w, "done\n") })
	if got, want := errOut.String(), "freezing\nwarning: crash consistent\nvmshadow: boom\n"; got != want {
		t.Errorf("stderr = %q, want %q", got, want)
	}
	if out.String() != "done\n" {
		t.Errorf("stdout = %q", out.String())
	}
}

func TestEncodeRejectsNonObject(t *testing.T) {
	if _, err := Encode("summary", []int{1}); err == nil {
		t.Fatal("Encode of a JSON array succeeded")
	}
}
