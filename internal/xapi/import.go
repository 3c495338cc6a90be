package xapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// ImportRaw uploads a disk image into the VDI vdi with PUT
// /import_raw_vdi?session_id=..&task_id=..&vdi=..&format=raw, tracked by a
// task of its own. body yields exactly length bytes: the whole disk (raw),
// or with chunked the sparse "chunked" stream XAPI's vhd-tool reads
// (frames of a little-endian uint64 offset, uint32 length and data, ended by
// a zero frame), in which ranges not sent keep the VDI's content. host is
// "" for the pool master, or the pool member that has the VDI's SR attached
// when the SR is local to it: the master would answer with a redirect,
// which a streamed upload cannot follow. hostCert is then the member's
// certificate (PEM) as the master reports it (host.get_server_certificate),
// which the upload trusts exactly: each host has its own. XAPI does not
// accept chunked transfer encoding, hence the exact length.
func (c *Client) ImportRaw(ctx context.Context, host, hostCert, vdi string, length int64, chunked bool, body io.Reader) error {
	hc := c.http
	if host != "" && hostCert != "" {
		var err error
		if hc, err = c.pinnedClient(hostCert); err != nil {
			return fmt.Errorf("XAPI %s: certificate of host %s: %w", c.base.Host, host, err)
		}
		defer hc.CloseIdleConnections()
	}
	var task string
	if err := c.Call(ctx, "task.create", &task, "vmshadow import", "restore of a disk into VDI "+vdi); err != nil {
		return err
	}
	u := *c.base
	if host != "" {
		u.Host = host
	}
	u.Path = "/import_raw_vdi"
	q := url.Values{"session_id": {c.session}, "task_id": {task}, "vdi": {vdi}, "format": {"raw"}}
	if chunked {
		q.Set("chunked", "true")
	}
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, u.String(), body)
	if err != nil {
		c.destroyTask(ctx, task)
		return fmt.Errorf("XAPI %s: import: %s", u.Host, c.redact(err.Error()))
	}
	req.ContentLength = length
	if length == 0 {
		req.Body = http.NoBody
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("User-Agent", Originator)
	resp, err := hc.Do(req)
	if err != nil {
		c.CancelTask(context.WithoutCancel(ctx), task)
		c.destroyTask(ctx, task)
		return c.transportError(ctx, "PUT /import_raw_vdi", err)
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		c.destroyTask(ctx, task)
		to := "another host"
		if loc, err := url.Parse(resp.Header.Get("Location")); err == nil && loc.Host != "" {
			to = loc.Host
		}
		return fmt.Errorf("XAPI %s: PUT /import_raw_vdi: redirected to %s, which holds the storage repository: %w", u.Host, to, errs.ErrConnect)
	case resp.StatusCode != http.StatusOK:
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		terr := c.taskError(ctx, "import_raw_vdi", task)
		return fmt.Errorf("XAPI %s: PUT /import_raw_vdi: HTTP %s: %s%s: %w", u.Host, resp.Status, c.redact(snippet(msg)), terr, errs.ErrConnect)
	}
	// XAPI answers 200 (Connection: close) before it reads the data, and
	// closes the connection once it has written it all. (No "Expect:
	// 100-continue": on such an early final answer Go would not send the
	// body at all.)
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		c.CancelTask(context.WithoutCancel(ctx), task)
		return c.transportError(ctx, "PUT /import_raw_vdi", err)
	}
	if _, err := c.WaitTask(ctx, "import_raw_vdi", task); err != nil {
		return err
	}
	return nil
}

// taskError describes a failed task, for messages ("" when it did not fail).
func (c *Client) taskError(ctx context.Context, method, task string) string {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	var r Task
	if err := c.Call(cctx, "task.get_record", &r, task); err != nil || r.Status == "pending" {
		c.CancelTask(cctx, task)
		c.destroyTask(cctx, task)
		return ""
	}
	c.destroyTask(cctx, task)
	if len(r.ErrorInfo) > 0 {
		return fmt.Sprintf(" (task: %s %q)", r.ErrorInfo[0], c.redact(fmt.Sprint(r.ErrorInfo[1:])))
	}
	return ""
}

// pinnedClient is an HTTP client that trusts exactly the certificate pem
// (a pool member's, as the verified master reports it), whatever name or
// address it carries.
func (c *Client) pinnedClient(certPEM string) (*http.Client, error) {
	block, _ := pem.Decode([]byte(certPEM))
	if block == nil {
		return nil, fmt.Errorf("not PEM: %w", errs.ErrConnect)
	}
	tr := c.http.Transport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: true, // verified below, by pinning
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 || !bytes.Equal(raw[0], block.Bytes) {
				return fmt.Errorf("the host presented another certificate than the one the pool master reports for it: %w", errs.ErrConnect)
			}
			return nil
		}}
	return &http.Client{Transport: tr, CheckRedirect: c.http.CheckRedirect}, nil
}
