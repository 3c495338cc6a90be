package apitest

import (
	"fmt"
	"strings"
	"testing"
)

// recorder is a testing.TB that keeps the errors reported.
type recorder struct {
	testing.TB
	errs []string
}

func (r *recorder) Helper() {}
func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

// TestValidateCatches: the validator refuses what the document does not
// allow, so that a test that validates and passes means something.
func TestValidateCatches(t *testing.T) {
	doc := Doc(t)
	const serve = `{"id":"s1","repository":"r","backup":"ab","disk":"vda","uri":"nbd+unix:///vda?socket=/s","writable":false,"started":"2026-12-01T00:00:00Z"}`
	for _, tc := range []struct {
		name, method, path string
		status             int
		body, want         string
	}{
		{"valid", "GET", "/api/v1/serves", 200, `{"serves":[` + serve + `]}`, ""},
		{"missing required field", "GET", "/api/v1/serves", 200, `{"serves":[` + strings.Replace(serve, `"uri":"nbd+unix:///vda?socket=/s",`, "", 1) + `]}`, `property "uri" is missing`},
		{"undocumented field", "GET", "/api/v1/serves", 200, `{"serves":[],"total":0}`, `property "total" is unsupported`},
		{"null for a list", "GET", "/api/v1/serves", 200, `{"serves":null}`, "not nullable"},
		{"wrong type", "GET", "/api/v1/runs/1", 200, `{"id":"1","job":"j","kind":"backup","trigger":"manual","status":"running","started":"2026-12-01T00:00:00Z","vms":[]}`, "must be an integer"},
		{"value not in enum", "GET", "/api/v1/runs/1", 200, `{"id":1,"job":"j","kind":"backup","trigger":"manual","status":"exploded","started":"2026-12-01T00:00:00Z","vms":[]}`, "exploded"},
		{"bad time", "GET", "/api/v1/runs/1", 200, `{"id":1,"job":"j","kind":"backup","trigger":"manual","status":"running","started":"yesterday","vms":[]}`, "date-time"},
		{"undocumented status", "GET", "/api/v1/vms", 418, `{"error":{"code":"internal","message":"x"}}`, "status is not supported"},
		{"error with a bad code", "GET", "/api/v1/vms", 500, `{"error":{"code":"oops","message":"x"}}`, "oops"},
		{"undocumented path", "GET", "/api/v1/nope", 200, `{}`, "path not in the OpenAPI document"},
		{"undocumented method", "PATCH", "/api/v1/vms", 200, `{}`, "PATCH /api/v1/vms not in"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &recorder{TB: t}
			Validate(r, doc, tc.method, tc.path, tc.status, []byte(tc.body))
			got := strings.Join(r.errs, "\n")
			if tc.want == "" && got != "" {
				t.Errorf("valid response refused: %s", got)
			}
			if tc.want != "" && !strings.Contains(got, tc.want) {
				t.Errorf("errors %q, want one containing %q", got, tc.want)
			}
		})
	}
}

// TestParseEventsCatches: malformed event streams and event data the
// document does not allow are refused.
func TestParseEventsCatches(t *testing.T) {
	doc := Doc(t)
	_, item, _, _ := Find(doc, "/api/v1/runs/1/events")
	op := item.Get
	for _, tc := range []struct{ name, stream, want string }{
		{"valid", ": hi\n\nevent: log\nid: 1\ndata: {\"id\":1,\"time\":\"2026-12-01T00:00:00Z\",\"level\":\"info\",\"message\":\"m\"}\n\n", ""},
		{"unterminated", "event: end\ndata: {}\n", "not ended by a blank line"},
		{"two data lines", "event: end\ndata: {}\ndata: {}\n\n", "two data: lines"},
		{"no event line", "data: {}\n\n", "no event: or data: line"},
		{"unknown line", "event: end\nretry: 5\ndata: {}\n\n", `"retry: 5"`},
		{"unknown type", "event: boom\ndata: {}\n\n", `"boom" is not in the operation's x-events`},
		{"bad data", "event: progress\ndata: {\"phase\":1}\n\n", "progress event data"},
		{"log without id", "event: log\ndata: {\"id\":1,\"time\":\"2026-12-01T00:00:00Z\",\"level\":\"info\",\"message\":\"m\"}\n\n", "without an id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			evs, err := ParseEvents([]byte(tc.stream))
			for _, ev := range evs {
				if err == nil {
					err = CheckEvent(doc, op, ev)
				}
			}
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("valid stream refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}
