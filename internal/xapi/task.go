package xapi

import (
	"context"
	"encoding/xml"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// RunAsync calls Async.<method> with params and waits for its task. started,
// if not nil, is told the task reference before the wait (callers record it
// in their journal, so that a process killed meanwhile leaves a trace of
// the work still running on the pool). When ctx ends first, the task is
// asked to cancel and RunAsync returns at once, without waiting for the
// pool to stop it (a caller that needs to know waits with WaitTask). The
// finished task is destroyed. The result is the call's return value: a
// reference, or "" for calls that return nothing.
func (c *Client) RunAsync(ctx context.Context, method string, started func(task string) error, params ...any) (string, error) {
	var task string
	if err := c.Call(ctx, "Async."+method, &task, params...); err != nil {
		return "", err
	}
	if started != nil {
		if err := started(task); err != nil {
			c.CancelTask(context.WithoutCancel(ctx), task)
			return "", err
		}
	}
	res, err := c.WaitTask(ctx, method, task)
	if err != nil && ctx.Err() != nil && !IsCode(err) {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		c.CancelTask(cctx, task)
	}
	return res, err
}

// WaitTask polls the task until it is no longer pending and destroys it.
// A failed task becomes an *Error of method.
func (c *Client) WaitTask(ctx context.Context, method, task string) (string, error) {
	t := time.NewTicker(c.cfg.PollInterval)
	defer t.Stop()
	for {
		var r Task
		if err := c.Call(ctx, "task.get_record", &r, task); err != nil {
			return "", err
		}
		switch r.Status {
		case "pending", "cancelling":
		case "success":
			c.destroyTask(ctx, task)
			return parseTaskResult(r.Result)
		case "failure", "cancelled":
			c.destroyTask(ctx, task)
			e := &Error{Method: method, Host: c.base.Host, Code: "TASK_CANCELLED"}
			if len(r.ErrorInfo) > 0 {
				e.Code = r.ErrorInfo[0]
				for _, p := range r.ErrorInfo[1:] {
					e.Params = append(e.Params, c.redact(p))
				}
			}
			return "", e
		default:
			return "", fmt.Errorf("XAPI %s: task of %s has unknown status %q: %w", c.base.Host, method, r.Status, errs.ErrConnect)
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("XAPI %s: waiting for %s: %w", c.base.Host, method, ctx.Err())
		case <-t.C:
		}
	}
}

// CancelTask asks the pool to cancel a task (task.cancel); a task that
// finished or cannot be cancelled is left as it is.
func (c *Client) CancelTask(ctx context.Context, task string) error {
	return c.Call(ctx, "task.cancel", nil, task)
}

// TaskStatus is the task's status, or "" when the task no longer exists.
func (c *Client) TaskStatus(ctx context.Context, task string) (string, error) {
	var r Task
	err := c.Call(ctx, "task.get_record", &r, task)
	if IsGone(err) {
		return "", nil
	}
	return r.Status, err
}

func (c *Client) destroyTask(ctx context.Context, task string) {
	c.Call(context.WithoutCancel(ctx), "task.destroy", nil, task)
}

// parseTaskResult decodes a task's result field: empty, a bare reference,
// or an XML-RPC value such as <value>OpaqueRef:...</value>.
func parseTaskResult(s string) (string, error) {
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, "<") {
		return s, nil
	}
	d := xml.NewDecoder(strings.NewReader(s))
	var text strings.Builder
	depth := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", fmt.Errorf("task result %q is not an XML-RPC value: %v: %w", snippet([]byte(s)), err, errs.ErrConnect)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			switch t.Name.Local {
			case "value", "string":
			default:
				return "", fmt.Errorf("task result %q is not a single value: %w", snippet([]byte(s)), errs.ErrConnect)
			}
			depth++
		case xml.EndElement:
			depth--
		case xml.CharData:
			if depth > 0 {
				text.Write(t)
			}
		}
	}
	return strings.TrimSpace(text.String()), nil
}
