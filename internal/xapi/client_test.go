package xapi_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/xapi"
	"github.com/vmshadow/vmshadow/internal/xapitest"
)

func tlsFor(t *testing.T, caFile string) *tls.Config {
	t.Helper()
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &tls.Config{RootCAs: pool}
}

func login(t *testing.T, s *xapitest.Server) *xapi.Client {
	t.Helper()
	c, err := xapi.Login(context.Background(), xapi.Config{URL: s.URL, User: s.User, Password: []byte(s.Password),
		TLS: tlsFor(t, s.CAFile), PollInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Logout(context.Background()) })
	return c
}

func TestLogin(t *testing.T) {
	s := xapitest.New(t, xapitest.Options{NBD: "none"})
	ctx := context.Background()
	base := xapi.Config{URL: s.URL, User: s.User, Password: []byte(s.Password), TLS: tlsFor(t, s.CAFile)}

	c, err := xapi.Login(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	if s.Sessions() != 1 {
		t.Errorf("%d sessions after login", s.Sessions())
	}
	if err := c.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	if s.Sessions() != 0 {
		t.Errorf("%d sessions after logout", s.Sessions())
	}

	bad := base
	bad.Password = []byte("wrong-password-123")
	_, err = xapi.Login(ctx, bad)
	if !errors.Is(err, errs.ErrAuth) || !strings.Contains(err.Error(), "SESSION_AUTHENTICATION_FAILED") {
		t.Fatalf("wrong password: %v", err)
	}
	if strings.Contains(err.Error(), "wrong-password-123") || strings.Contains(err.Error(), s.Password) {
		t.Fatalf("error shows the password: %v", err)
	}

	untrusted := base
	untrusted.TLS = nil // system roots do not know the test CA
	if _, err := xapi.Login(ctx, untrusted); !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "--xapi-ca") {
		t.Fatalf("untrusted certificate: %v", err)
	}
	insecure := base
	insecure.TLS = &tls.Config{InsecureSkipVerify: true}
	if c, err := xapi.Login(ctx, insecure); err != nil {
		t.Fatalf("insecure: %v", err)
	} else {
		c.Logout(ctx)
	}

	for _, u := range []string{"http://" + strings.TrimPrefix(s.URL, "https://"), "ftp://x", "https://h/path", "https://user@h", "nohost"} {
		cfg := base
		cfg.URL = u
		if _, err := xapi.Login(ctx, cfg); !errors.Is(err, errs.ErrUsage) {
			t.Errorf("URL %q: %v, want a usage error", u, err)
		}
	}
	slave := xapitest.New(t, xapitest.Options{NBD: "none", Slave: "10.1.2.3"})
	cfg := base
	cfg.URL, cfg.TLS = slave.URL, tlsFor(t, slave.CAFile)
	if _, err := xapi.Login(ctx, cfg); !errors.Is(err, errs.ErrUsage) || !strings.Contains(err.Error(), "https://10.1.2.3") {
		t.Fatalf("pool member: %v", err)
	}
}

func TestErrors(t *testing.T) {
	s := xapitest.New(t, xapitest.Options{NBD: "none"})
	c := login(t, s)
	ctx := context.Background()
	_, err := c.VMByUUID(ctx, "00000000-0000-4000-8000-000000000000")
	if !errors.Is(err, errs.ErrNotFound) || !xapi.IsCode(err, "UUID_INVALID") || !xapi.IsGone(err) {
		t.Errorf("unknown UUID: %v", err)
	}
	_, err = c.VMRecord(ctx, "OpaqueRef:nonsense")
	if !errors.Is(err, errs.ErrNotFound) || !xapi.IsCode(err, "HANDLE_INVALID") {
		t.Errorf("unknown ref: %v", err)
	}
	if err := c.Call(ctx, "VM.no_such_call", nil); !errors.Is(err, errs.ErrUnsupported) {
		t.Errorf("unknown method: %v", err)
	}
	if err := c.Call(ctx, "VM.get_record", nil); !xapi.IsCode(err, "MESSAGE_PARAMETER_COUNT_MISMATCH") {
		t.Errorf("missing param: %v", err)
	}

	// A host that drops the connection.
	s.DropNext("VM.get_by_name_label", 1)
	_, err = c.VMsByName(ctx, "x")
	if !errors.Is(err, errs.ErrConnect) || !strings.Contains(err.Error(), "dropped the connection") {
		t.Errorf("dropped connection: %v", err)
	}
	// The next call works again.
	if _, err := c.VMsByName(ctx, "x"); err != nil {
		t.Errorf("after a drop: %v", err)
	}
}

// TestSessionRedacted: an error naming the session never shows it.
func TestSessionRedacted(t *testing.T) {
	var session string
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Method string `json:"method"`
			Params []any  `json:"params"`
			ID     int    `json:"id"`
		}
		jsonDecode(t, r, &req)
		w.Header().Set("Content-Type", "application/json")
		if req.Method == "session.login_with_password" {
			session = "OpaqueRef:11111111-2222-4333-8444-555555555555"
			writeJSON(w, map[string]any{"jsonrpc": "2.0", "result": session, "id": req.ID})
			return
		}
		writeJSON(w, map[string]any{"jsonrpc": "2.0", "id": req.ID,
			"error": map[string]any{"code": 1, "message": "SESSION_INVALID", "data": []string{req.Params[0].(string)}}})
	}))
	defer srv.Close()
	c, err := xapi.Login(context.Background(), xapi.Config{URL: srv.URL, User: "root", Password: []byte("pw"), TLS: &tls.Config{InsecureSkipVerify: true}})
	if err != nil {
		t.Fatal(err)
	}
	err = c.Call(context.Background(), "VM.get_all", nil)
	if !errors.Is(err, errs.ErrAuth) || strings.Contains(err.Error(), session) || !strings.Contains(err.Error(), "<session>") {
		t.Fatalf("error %v: want SESSION_INVALID with the session redacted", err)
	}
}

func TestRunAsync(t *testing.T) {
	s := xapitest.New(t, xapitest.Options{NBD: "none", SnapshotDelay: 300 * time.Millisecond})
	vmUUID, _ := s.AddVM("web", true, 1<<20)
	c := login(t, s)
	ctx := context.Background()
	vm, err := c.VMByUUID(ctx, vmUUID)
	if err != nil {
		t.Fatal(err)
	}
	var seen string
	snap, err := c.RunAsync(ctx, "VM.snapshot", func(task string) error { seen = task; return nil }, vm, "snap1")
	if err != nil {
		t.Fatal(err)
	}
	if seen == "" || !strings.HasPrefix(snap, "OpaqueRef:") {
		t.Fatalf("task %q, result %q", seen, snap)
	}
	r, err := c.VMRecord(ctx, snap)
	if err != nil || !r.IsASnapshot || r.NameLabel != "snap1" {
		t.Fatalf("snapshot record %+v: %v", r, err)
	}
	if s.PendingTasks() != 0 {
		t.Errorf("%d tasks left", s.PendingTasks())
	}

	// Interrupted: the task is cancelled before it works.
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = c.RunAsync(cctx, "VM.snapshot", nil, vm, "snap2")
	if err == nil || !errors.Is(err, context.DeadlineExceeded) && !xapi.IsCode(err, "TASK_CANCELLED") {
		t.Fatalf("interrupted snapshot: %v", err)
	}
	if refs, _ := c.VMsByName(ctx, "snap2"); len(refs) != 0 {
		t.Fatalf("cancelled snapshot exists")
	}

	// A failing task becomes an Error of the call.
	_, err = c.RunAsync(ctx, "VM.destroy", nil, vm)
	if !xapi.IsCode(err, "VM_BAD_POWER_STATE") {
		t.Fatalf("destroy of a running VM: %v", err)
	}
}

func TestImportRaw(t *testing.T) {
	s := xapitest.New(t, xapitest.Options{NBD: "none"})
	_, disks := s.AddVM("db", false, 1<<20)
	c := login(t, s)
	ctx := context.Background()
	ref, err := c.VDIByUUID(ctx, disks[0])
	if err != nil {
		t.Fatal(err)
	}
	img := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	if err := c.ImportRaw(ctx, "", "", ref, int64(len(img)), false, bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s.Read(disks[0]), img) {
		t.Fatal("raw import differs")
	}
	// Chunked: only two frames, the rest keeps its content.
	var body bytes.Buffer
	frame := func(off int64, data []byte) {
		var h [12]byte
		binary.LittleEndian.PutUint64(h[:8], uint64(off))
		binary.LittleEndian.PutUint32(h[8:], uint32(len(data)))
		body.Write(h[:])
		body.Write(data)
	}
	frame(4096, []byte("XXXX"))
	frame(1<<20-2, []byte("YY"))
	frame(0, nil)
	if err := c.ImportRaw(ctx, "", "", ref, int64(body.Len()), true, &body); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), img...)
	copy(want[4096:], "XXXX")
	copy(want[1<<20-2:], "YY")
	if !bytes.Equal(s.Read(disks[0]), want) {
		t.Fatal("chunked import differs")
	}
	// Too short a body: the task fails, the error says so.
	err = c.ImportRaw(ctx, "", "", ref, 100, true, bytes.NewReader(bytes.Repeat([]byte{1}, 100)))
	if err == nil || !strings.Contains(err.Error(), "import") {
		t.Fatalf("bad chunked stream: %v", err)
	}
	if s.PendingTasks() != 0 {
		t.Errorf("%d tasks left", s.PendingTasks())
	}
}

func jsonDecode(t *testing.T, r *http.Request, v any) {
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		t.Error(err)
	}
}

func writeJSON(w http.ResponseWriter, v any) { json.NewEncoder(w).Encode(v) }
