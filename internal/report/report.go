// Package report owns what vmshadow commands print. With JSON on, every
// message is one JSON object on its own line (NDJSON) carrying a
// "message_type": "status" for progress, "warning" for things the user should
// know, "error" for the failure that ends the command, and "summary" as the
// last object of a successful command. Without JSON, summaries are written as
// human text to stdout, and status, warnings and errors go to stderr.
//
// The JSON field names are a contract with users' scripts: add, never rename.
package report

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"sync"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Printer writes a command's messages. It is safe for concurrent use.
type Printer struct {
	JSON   bool
	Out    io.Writer // summaries (and every JSON message)
	ErrOut io.Writer // human status, warnings and errors

	mu sync.Mutex
}

// New returns a printer writing to out and errOut.
func New(jsonOut bool, out, errOut io.Writer) *Printer {
	return &Printer{JSON: jsonOut, Out: out, ErrOut: errOut}
}

// Status prints a progress or phase message. v must marshal to a JSON object;
// human is the line shown on a terminal (empty: nothing shown).
func (p *Printer) Status(v any, human string) {
	if p.JSON {
		p.emit("status", v)
		return
	}
	if human != "" {
		p.line(p.ErrOut, human)
	}
}

// Warning is something the user must know that did not stop the command,
// such as a snapshot set that fell back to crash consistency.
type Warning struct {
	Message string `json:"message"`
}

// Warn prints a warning.
func (p *Printer) Warn(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if p.JSON {
		p.emit("warning", Warning{Message: msg})
		return
	}
	p.line(p.ErrOut, "warning: "+msg)
}

// ErrorMessage is the JSON shape of a failure.
type ErrorMessage struct {
	Message  string `json:"message"`
	Class    string `json:"class"`
	ExitCode int    `json:"exit_code"`
}

// Error prints the error that ends the command.
func (p *Printer) Error(err error) {
	if p.JSON {
		p.emit("error", ErrorMessage{Message: err.Error(), Class: errs.ClassName(err), ExitCode: errs.ExitCode(err)})
		return
	}
	p.line(p.ErrOut, "vmshadow: "+err.Error())
}

// Summary prints the command's result: v as JSON, or human(w) as text.
func (p *Printer) Summary(v any, human func(w io.Writer)) {
	if p.JSON {
		p.emit("summary", v)
		return
	}
	if human != nil {
		p.mu.Lock()
		defer p.mu.Unlock()
		human(p.Out)
	}
}

func (p *Printer) line(w io.Writer, s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintln(w, s)
}

// emit writes {"message_type":typ, ...fields of v} on one line.
func (p *Printer) emit(typ string, v any) {
	line, err := Encode(typ, v)
	if err != nil {
		line, _ = Encode("error", ErrorMessage{Message: "internal: cannot encode " + typ + ": " + err.Error(), Class: "error", ExitCode: 1})
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.Out.Write(line)
}

// Encode returns v as one NDJSON line with "message_type" as its first field.
// v must marshal to a JSON object.
func Encode(typ string, v any) ([]byte, error) {
	body, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	body = bytes.TrimSpace(body)
	if len(body) < 2 || body[0] != '{' {
		return nil, fmt.Errorf("report: %T does not encode to a JSON object", v)
	}
	var b bytes.Buffer
	b.WriteString(`{"message_type":`)
	t, _ := json.Marshal(typ)
	b.Write(t)
	if rest := bytes.TrimSpace(body[1 : len(body)-1]); len(rest) > 0 {
		b.WriteByte(',')
		b.Write(rest)
	}
	b.WriteString("}\n")
	return b.Bytes(), nil
}
