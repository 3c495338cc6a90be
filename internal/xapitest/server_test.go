package xapitest

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// rawCall posts a JSON-RPC request and returns the decoded response.
func rawCall(t *testing.T, c *http.Client, s *Server, body string) map[string]any {
	t.Helper()
	resp, err := c.Post(s.URL+"/jsonrpc", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatalf("%s: %v", body, err)
	}
	return m
}

func client(s *Server) *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(s.pki.CAPEM)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// TestWireFormat checks the fake's answers against the documented wire
// format: JSON-RPC 2.0 errors as objects with the API error code as the
// message, 1.0 errors as arrays, a malformed call as an HTTP 500.
func TestWireFormat(t *testing.T) {
	s := New(t, Options{NBD: "none"})
	c := client(s)
	m := rawCall(t, c, s, `{"jsonrpc":"2.0","method":"session.login_with_password","params":["root","bad"],"id":7}`)
	e := m["error"].(map[string]any)
	if m["jsonrpc"] != "2.0" || m["id"] != 7.0 || e["message"] != "SESSION_AUTHENTICATION_FAILED" || e["data"].([]any)[0] != "root" {
		t.Fatalf("v2 error: %v", m)
	}
	m = rawCall(t, c, s, `{"method":"VM.no_such_call","params":["OpaqueRef:x"],"id":"a"}`)
	if m["result"] != nil || m["error"].([]any)[0] != "MESSAGE_METHOD_UNKNOWN" {
		t.Fatalf("v1 error: %v", m)
	}
	resp, err := c.Post(s.URL+"/jsonrpc", "application/json", strings.NewReader(`{"jsonrpc":"2.0","id":0}`))
	if err != nil || resp.StatusCode != http.StatusInternalServerError {
		t.Fatalf("malformed call: %v %v", resp.Status, err)
	}
	resp.Body.Close()
}

// TestExportRawVDI: GET /export_raw_vdi gives the VDI's content to a
// logged-in session only.
func TestExportRawVDI(t *testing.T) {
	s := New(t, Options{NBD: "none"})
	_, disks := s.AddVM("vm", false, 1<<20)
	data := bytes.Repeat([]byte("vmshadow"), 1<<17)
	s.Write(disks[0], 0, data)
	c := client(s)
	session := rawCall(t, c, s, `{"jsonrpc":"2.0","method":"session.login_with_password","params":["root","xapi-secret"],"id":1}`)["result"].(string)
	get := func(session string) (int, []byte) {
		resp, err := c.Get(s.URL + "/export_raw_vdi?format=raw&vdi=" + disks[0] + "&session_id=" + session)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	if code, b := get(session); code != 200 || !bytes.Equal(b, data) {
		t.Fatalf("export: %d, %d bytes", code, len(b))
	}
	if code, _ := get("OpaqueRef:nobody"); code != http.StatusForbidden {
		t.Fatalf("export without a session: %d", code)
	}
}

// TestDataDestroyWaitsForVBDs: as ocaml/xapi/xapi_vdi.ml (_data_destroy,
// wait_for_vbds_to_be_unplugged_and_destroyed), VDI.data_destroy of a
// snapshot VDI that a snapshot VM still refers to (a VBD that is not
// attached) waits for the VBD to go, then fails with VDI_IN_USE
// [vdi; "data_destroy"] and leaves the VDI as it was; once the snapshot VM
// is destroyed it succeeds.
func TestDataDestroyWaitsForVBDs(t *testing.T) {
	s := New(t, Options{NBD: "none", DataDestroyWait: 300 * time.Millisecond})
	vmUUID, disks := s.AddVM("vm", true, 1<<20)
	s.EnableCBT(disks[0])
	c := client(s)
	call := func(method string, params ...string) map[string]any {
		t.Helper()
		b, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
		return rawCall(t, c, s, string(b))
	}
	session := call("session.login_with_password", "root", "xapi-secret")["result"].(string)
	vm := call("VM.get_by_uuid", session, vmUUID)["result"].(string)
	snap := call("VM.snapshot", session, vm, "snap")["result"].(string)
	var snapVDI string
	for _, d := range s.VDIs() {
		if d.Snapshot {
			snapVDI = d.UUID
		}
	}
	ref := call("VDI.get_by_uuid", session, snapVDI)["result"].(string)
	start := time.Now()
	m := call("VDI.data_destroy", session, ref)
	e, _ := m["error"].(map[string]any)
	if e == nil || e["message"] != "VDI_IN_USE" || e["data"].([]any)[1] != "data_destroy" {
		t.Fatalf("data_destroy with the snapshot VM's VBD: %v", m)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("refused after %s, without waiting for the VBDs", d)
	}
	for _, d := range s.VDIs() {
		if d.UUID == snapVDI && (!d.Data || d.Type != "user") {
			t.Errorf("refused data_destroy changed the VDI: %+v", d)
		}
	}
	if m := call("VM.destroy", session, snap); m["error"] != nil {
		t.Fatal(m)
	}
	if m := call("VDI.data_destroy", session, ref); m["error"] != nil {
		t.Fatalf("data_destroy without VBDs: %v", m)
	}
	for _, d := range s.VDIs() {
		if d.UUID == snapVDI && (d.Data || d.Type != "cbt_metadata") {
			t.Errorf("after data_destroy: %+v", d)
		}
	}
}
