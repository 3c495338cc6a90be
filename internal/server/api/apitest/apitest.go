// Package apitest holds the vmshadow server's API to its OpenAPI document
// in tests: [Doc] loads and checks the document the API serves, and
// [Validate] checks one real response (status, content type, headers and
// body; each event of an event stream) against it, with
// github.com/getkin/kin-openapi. The API's own tests use it with a fake
// service; the server's end-to-end tests use it against the real server.
package apitest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"

	"github.com/vmshadow/vmshadow/internal/server/api"
)

// Doc loads the API's OpenAPI document and checks that it is a valid
// OpenAPI 3 document.
func Doc(t testing.TB) *openapi3.T {
	t.Helper()
	doc, err := Load(api.OpenAPI())
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

// Load parses and validates an OpenAPI document.
func Load(data []byte) (*openapi3.T, error) {
	loader := openapi3.NewLoader()
	doc, err := loader.LoadFromData(data)
	if err != nil {
		return nil, fmt.Errorf("load the OpenAPI document: %w", err)
	}
	if err := doc.Validate(context.Background()); err != nil {
		return nil, fmt.Errorf("the OpenAPI document is invalid: %w", err)
	}
	return doc, nil
}

// Find returns the document's path template and path item that match a
// request path (its query, if any, ignored), and the path parameters.
func Find(doc *openapi3.T, path string) (string, *openapi3.PathItem, map[string]string, bool) {
	path, _, _ = strings.Cut(path, "?")
	segs := strings.Split(path, "/")
	for tmpl, item := range doc.Paths.Map() {
		ts := strings.Split(tmpl, "/")
		if len(ts) != len(segs) {
			continue
		}
		params := map[string]string{}
		ok := true
		for i, s := range ts {
			if strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}") {
				v, err := url.PathUnescape(segs[i])
				if err != nil || v == "" {
					ok = false
					break
				}
				params[s[1:len(s)-1]] = v
				continue
			}
			if s != segs[i] {
				ok = false
				break
			}
		}
		if ok {
			return tmpl, item, params, true
		}
	}
	return "", nil, nil, false
}

// Validate checks a response to method path (status, JSON body) against
// the document: the status must be documented for the operation and the
// body valid against its schema. The content type is the one the
// document gives for that response (application/json for the API's).
func Validate(t testing.TB, doc *openapi3.T, method, path string, status int, body []byte) {
	t.Helper()
	h := http.Header{}
	if len(body) > 0 {
		h.Set("Content-Type", "application/json")
	}
	if err := check(doc, method, path, status, h, body); err != nil {
		t.Errorf("%s %s → %d: %v\nbody: %s", method, path, status, err, clip(body))
	}
}

// ValidateResponse checks a real response (its status, headers, content
// type and body, already read into body) to method path against the
// document. A text/event-stream body is checked frame by frame: each
// event's type must be one the operation's x-events names and its data
// valid against that schema.
func ValidateResponse(t testing.TB, doc *openapi3.T, method, path string, resp *http.Response, body []byte) {
	t.Helper()
	if err := check(doc, method, path, resp.StatusCode, resp.Header, body); err != nil {
		t.Errorf("%s %s → %d: %v\nbody: %s", method, path, resp.StatusCode, err, clip(body))
	}
}

// ValidateRecorder is ValidateResponse for an httptest.ResponseRecorder.
func ValidateRecorder(t testing.TB, doc *openapi3.T, method, path string, rec *httptest.ResponseRecorder) {
	t.Helper()
	if err := check(doc, method, path, rec.Code, rec.Header(), rec.Body.Bytes()); err != nil {
		t.Errorf("%s %s → %d: %v\nbody: %s", method, path, rec.Code, err, clip(rec.Body.Bytes()))
	}
}

func clip(b []byte) string {
	if len(b) > 2000 {
		return string(b[:2000]) + "..."
	}
	return string(b)
}

func check(doc *openapi3.T, method, path string, status int, header http.Header, body []byte) error {
	tmpl, item, params, ok := Find(doc, path)
	if !ok {
		return fmt.Errorf("path not in the OpenAPI document")
	}
	op := item.GetOperation(method)
	if op == nil {
		return fmt.Errorf("%s %s not in the OpenAPI document", method, tmpl)
	}
	req, err := http.NewRequest(method, "http://vmshadow/", nil)
	if err != nil {
		return err
	}
	req.URL.RawPath, _, _ = strings.Cut(path, "?")
	req.URL.Path, _ = url.PathUnescape(req.URL.RawPath)
	sse := strings.HasPrefix(header.Get("Content-Type"), "text/event-stream")
	in := &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{
			Request:    req,
			PathParams: params,
			Route:      &routers.Route{Spec: doc, Path: tmpl, PathItem: item, Method: method, Operation: op},
		},
		Status:  status,
		Header:  header,
		Body:    io.NopCloser(bytes.NewReader(body)),
		Options: &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true, ExcludeResponseBody: sse},
	}
	if err := openapi3filter.ValidateResponse(context.Background(), in); err != nil {
		return err
	}
	if !sse {
		return nil
	}
	if r := op.Responses.Status(status); r == nil || r.Value.Content.Get("text/event-stream") == nil {
		return fmt.Errorf("an event stream where the document has none")
	}
	events, err := ParseEvents(body)
	if err != nil {
		return err
	}
	for _, ev := range events {
		if err := CheckEvent(doc, op, ev); err != nil {
			return err
		}
	}
	return nil
}

// Event is one Server-Sent Event as sent.
type Event struct {
	Type string
	ID   string
	Data string
}

// ParseEvents splits an event stream into its events (comments dropped),
// refusing a frame that is not "event:", "id:", "data:" lines (one data
// line each) or an unterminated last frame.
func ParseEvents(body []byte) ([]Event, error) {
	var out []Event
	var cur Event
	var lines int
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		l := sc.Text()
		switch {
		case l == "":
			if lines > 0 {
				if cur.Type == "" || cur.Data == "" {
					return out, fmt.Errorf("event %d has no event: or data: line", len(out)+1)
				}
				out = append(out, cur)
			}
			cur, lines = Event{}, 0
			continue
		case strings.HasPrefix(l, ":"):
			continue
		case strings.HasPrefix(l, "event: "):
			cur.Type = l[len("event: "):]
		case strings.HasPrefix(l, "id: "):
			cur.ID = l[len("id: "):]
		case strings.HasPrefix(l, "data: "):
			if cur.Data != "" {
				return out, fmt.Errorf("event %d has two data: lines", len(out)+1)
			}
			cur.Data = l[len("data: "):]
		default:
			return out, fmt.Errorf("event stream line %q is not event:, id:, data: or a comment", l)
		}
		lines++
	}
	if err := sc.Err(); err != nil {
		return out, err
	}
	if lines > 0 {
		return out, fmt.Errorf("the last event is not ended by a blank line")
	}
	return out, nil
}

// CheckEvent checks one event of an operation's stream: its type is one
// of the operation's x-events and its data valid against that type's
// schema.
func CheckEvent(doc *openapi3.T, op *openapi3.Operation, ev Event) error {
	types, _ := op.Extensions["x-events"].(map[string]any)
	name, ok := types[ev.Type].(string)
	if !ok {
		return fmt.Errorf("event type %q is not in the operation's x-events", ev.Type)
	}
	sr := doc.Components.Schemas[name]
	if sr == nil || sr.Value == nil {
		return fmt.Errorf("x-events names schema %q, which the document lacks", name)
	}
	var v any
	if err := json.Unmarshal([]byte(ev.Data), &v); err != nil {
		return fmt.Errorf("%s event: data is not JSON: %v", ev.Type, err)
	}
	if err := sr.Value.VisitJSON(v, openapi3.MultiErrors()); err != nil {
		return fmt.Errorf("%s event data %s: %v", ev.Type, ev.Data, err)
	}
	if ev.Type == "log" && ev.ID == "" {
		return fmt.Errorf("log event without an id: line")
	}
	return nil
}
