package api

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// runEvents streams a run's events as Server-Sent Events:
//
//	event: TYPE
//	id: LOG-LINE-ID        (log events only)
//	data: JSON
//	(blank line)
//
// each flushed as it comes, a comment line (": heartbeat") when nothing
// came for Options.Heartbeat, and the stream ends after the "end" event.
// A client that reconnects with Last-Event-ID (the last log line it got)
// first gets the log lines after it, then the live events, without
// repeating a log line.
func (h *handler) runEvents(c *call) error {
	id, err := c.runID()
	if err != nil {
		return err
	}
	var last int64 = -1
	if s := c.r.Header.Get("Last-Event-ID"); s != "" {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			return fmt.Errorf("Last-Event-ID %q: want the ID of a log line (a whole number): %w", s, errs.ErrUsage)
		}
		last = n
	}
	// Watch before reading the backlog, so no line falls between.
	events, err := h.svc.Watch(c.ctx, id)
	if err != nil {
		return err
	}
	var backlog []state.LogLine
	for after := last; after >= 0; {
		lines, err := h.svc.RunLog(c.ctx, id, after, maxLogLimit)
		if err != nil {
			return err
		}
		backlog = append(backlog, lines...)
		if len(lines) < maxLogLimit {
			break
		}
		after = lines[len(lines)-1].ID
	}

	hd := c.w.Header()
	hd.Set("Content-Type", "text/event-stream")
	hd.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	rc := http.NewResponseController(c.w)
	rc.SetWriteDeadline(time.Time{}) // the server's write timeout is not for streams
	c.w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return fmt.Errorf("event stream: %w", err)
	}
	send := func(ev Event) error {
		if ev.Type == "log" {
			if id, ok := logID(ev.Data); ok {
				if id <= last {
					return nil // sent from the backlog already
				}
				last = id
			}
		}
		frame, err := sseFrame(ev)
		if err != nil {
			return err
		}
		if _, err := c.w.Write(frame); err != nil {
			return err
		}
		return rc.Flush()
	}
	for _, l := range backlog {
		if err := send(Event{Type: "log", Data: l}); err != nil {
			return fmt.Errorf("event stream: %w", err)
		}
	}
	tick := time.NewTicker(h.opts.Heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return nil // the client went away
		case <-tick.C:
			if _, err := c.w.Write([]byte(": heartbeat\n\n")); err != nil {
				return fmt.Errorf("event stream: %w", err)
			}
			if err := rc.Flush(); err != nil {
				return fmt.Errorf("event stream: %w", err)
			}
		case ev, ok := <-events:
			if !ok {
				return nil
			}
			if err := send(ev); err != nil {
				return fmt.Errorf("event stream: %w", err)
			}
			if ev.Type == "end" {
				return nil
			}
			tick.Reset(h.opts.Heartbeat)
		}
	}
}

// logID is the line ID of a log event's data (none when the line has no
// ID: 0).
func logID(d any) (int64, bool) {
	switch l := d.(type) {
	case state.LogLine:
		return l.ID, l.ID > 0
	case *state.LogLine:
		if l != nil {
			return l.ID, l.ID > 0
		}
	}
	return 0, false
}

// sseFrame encodes one event. JSON has no raw newline, so data is one line;
// the type is cleaned of line breaks all the same.
func sseFrame(ev Event) ([]byte, error) {
	data, err := json.Marshal(ev.Data)
	if err != nil {
		return nil, fmt.Errorf("encode a %s event: %w", ev.Type, err)
	}
	typ := strings.NewReplacer("\r", "", "\n", "").Replace(ev.Type)
	var b strings.Builder
	b.WriteString("event: " + typ + "\n")
	if id, ok := logID(ev.Data); ok && ev.Type == "log" {
		b.WriteString("id: " + strconv.FormatInt(id, 10) + "\n")
	}
	b.WriteString("data: ")
	b.Write(data)
	b.WriteString("\n\n")
	return []byte(b.String()), nil
}
