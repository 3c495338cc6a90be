// Package xapitest is a fake XenServer / XCP-ng pool for tests: an HTTPS
// server speaking XAPI's documented JSON-RPC wire format (POST /jsonrpc,
// positional params with the session reference first, errors as
// {"error":{"code":1,"message":"<API error code>","data":[...]}}), with
// state for hosts, SRs, VMs, VBDs, VDIs, snapshots, networks with purposes,
// sessions and tasks, and the HTTP handlers PUT /import_raw_vdi and GET
// /export_raw_vdi.
//
// Its VDIs are raw files. Tests write into them with Server.Write, which
// also records the changed 64 KiB blocks for changed block tracking, so
// VDI.list_changed_blocks answers from what the test really wrote. VDIs are
// read over NBD from a real peer: a qemu-storage-daemon serving each
// VDI.get_nbd_info request as an export named "/<vdi-uuid>?session_id=<ref>",
// behind a front that negotiates as xapi-nbd does (TLS with a certificate
// made by the test's own CA, NBD_OPT_EXPORT_NAME only: no structured
// replies, so no allocation) and closes connections beyond 16 per host.
// GET /export_raw_vdi?format=vhd streams a dynamic VHD made by qemu-img.
//
// It models what vmshadow relies on, following xapi's code and docs
// (ocaml/xapi/xapi_vdi.ml, xapi_vm_snapshot.ml, xapi_vm_clone.ml,
// xapi_vm_lifecycle.ml, import_raw_vdi.ml, rbac.ml, ocaml/nbd): refs are
// opaque and differ from UUIDs; unknown refs are HANDLE_INVALID, unknown
// UUIDs UUID_INVALID; data_destroy needs a CBT-enabled snapshot, waits for
// every VBD of the VDI to go and turns it into a cbt_metadata VDI;
// enable_cbt is subject to the licence; attached VDIs cannot be destroyed;
// VM.snapshot takes the disks one after another; VM.pause/unpause; each
// call needs a role; failed logins wait 5 s; sessions can expire; logout
// ends the session's NBD exports; optionally a member host with its own
// certificate and local SR. CheckAsBefore is the one check that a test
// left the pool as it was.
package xapitest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

// Options configure a fake pool.
type Options struct {
	// User and Password are the only valid credentials (default root and
	// "xapi-secret").
	User, Password string
	// NBD is the purpose of the pool's network: "nbd" (TLS, the default),
	// "insecure_nbd", or "none" (no network enabled for NBD).
	NBD string
	// CBTUnlicensed makes VDI.enable_cbt fail with LICENCE_RESTRICTION.
	CBTUnlicensed bool
	// WrongNBDCert makes the NBD server present a certificate other than
	// the one VDI.get_nbd_info reports (signed by the same CA).
	WrongNBDCert bool
	// Slave makes login fail with HOST_IS_SLAVE naming this master.
	Slave string
	// SnapshotDelay is how long an Async.VM.snapshot waits before it works.
	SnapshotDelay time.Duration
	// DataDestroyWait is how long VDI.data_destroy waits for the VDI's
	// VBDs to go before it fails with VDI_IN_USE: 4 s by default, as
	// data_destroy's timeout in ocaml/xapi/xapi_vdi.ml.
	DataDestroyWait time.Duration
	// BetweenDiskSnapshots, if set, runs between the snapshots of two disks
	// of a VM.snapshot (without the fake's lock), where xapi snapshots one
	// VDI after another (xapi_vm_clone.ml, safe_clone_disks).
	BetweenDiskSnapshots func()
	// NBDConnectionLimit is how many client connections the host's NBD
	// server serves at once: 16 by default, as xapi-nbd
	// (ocaml/nbd/lib/consts.ml, connection_limit).
	NBDConnectionLimit int
	// NBDAddresses are the addresses VDI.get_nbd_info reports, in order
	// (default 127.0.0.1). As xapi gives a PIF's IPv6 addresses, give them
	// in CIDR form ("fd00::5/64"); the NBD server listens on 127.0.0.1
	// only, as xapi-nbd listens on IPv4 only (ocaml/nbd/src/main.ml).
	NBDAddresses []string
	// Role is the RBAC role of the user (default pool-admin): calls it
	// does not allow fail with RBAC_PERMISSION_DENIED (rbac.ml).
	Role string
	// LoginFailDelay is how long a failed login waits before its answer:
	// 5 s by default, as xapi_session.ml. Negative: none.
	LoginFailDelay time.Duration
	// Member adds a pool member at 127.0.0.2 (same port as the master,
	// its own self-signed certificate, as each XenServer host has) with a
	// local SR "Member storage": its JSON-RPC answers logins with
	// HOST_IS_SLAVE, and the master redirects uploads and exports of VDIs
	// on that SR to it (import_raw_vdi.ml, export_raw_vdi.ml).
	Member bool
}

// Server is a fake pool. Its methods are safe for concurrent use.
type Server struct {
	URL      string // https://127.0.0.1:PORT
	CAFile   string // PEM of the CA that signed the pool's certificate
	Password string
	User     string

	t        testing.TB
	opts     Options
	dir      string
	pki      *PKI
	hostCert *Cert
	srv      *httptest.Server

	mu        sync.Mutex
	vms       map[string]*vm
	vbds      map[string]*vbd
	vdis      map[string]*vdi
	srs       map[string]*sr
	pbds      map[string]*pbd
	host      *host
	member    *host
	memberSrv *httptest.Server
	MemberURL string // https://127.0.0.2:PORT, with Options.Member
	nets      map[string]*network
	sessions  map[string]string // ref -> user
	tasks     map[string]*task
	calls     []string
	drop      map[string]int
	nbd       *nbdServer
	chains    map[int][]cbtDelta // chain -> snapshots' deltas in order
	chainSeq  int
	// dataDestroyRefused counts VDI.data_destroy calls refused because
	// the VDI still had VBDs.
	dataDestroyRefused int
	pauses             int // VM.pause calls that paused a VM
}

type vm struct {
	ref, uuid, name, power string
	template, snapshot     bool
	snapshotOf             string
	snapshots, vbds        []string
	other                  map[string]string
}

type vbd struct {
	ref, uuid, vm, vdi, userdevice, typ, mode string
	empty, attached, bootable                 bool
}

type vdi struct {
	ref, uuid, name, sr, typ string
	size                     int64
	snapshot, cbt            bool
	snapshotOf               string
	other                    map[string]string
	path                     string // data file; "" once the data is destroyed
	chain, seq               int    // CBT chain and position of a snapshot in it
	dirty                    map[int64]bool
}

type sr struct {
	ref, uuid, name, typ string
	shared               bool
	pbd                  string
}

type pbd struct{ ref, uuid, sr, host string }

type host struct {
	ref, uuid, name, address string
	cert                     *Cert // its TLS certificate (host.get_server_certificate)
}

type network struct {
	ref, uuid, name string
	purpose         []string
}

type task struct {
	ref, uuid, label, status, result string
	errorInfo                        []string
	progress                         float64
	cancelled                        bool
}

// cbtDelta is what changed between a chain's previous snapshot and one.
type cbtDelta struct {
	seq     int
	changed map[int64]bool
}

// New starts a fake pool with one host, an SR named "Local storage" (type
// ext) and a network with the NBD purpose of opts. It is stopped when the
// test ends.
func New(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.User == "" {
		opts.User = "root"
	}
	if opts.Password == "" {
		opts.Password = "xapi-secret"
	}
	if opts.NBD == "" {
		opts.NBD = "nbd"
	}
	if opts.Role == "" {
		opts.Role = "pool-admin"
	}
	if opts.LoginFailDelay == 0 {
		opts.LoginFailDelay = 5 * time.Second
	}
	if len(opts.NBDAddresses) == 0 {
		opts.NBDAddresses = []string{"127.0.0.1"}
	}
	if opts.NBDConnectionLimit == 0 {
		opts.NBDConnectionLimit = 16
	}
	if opts.DataDestroyWait == 0 {
		opts.DataDestroyWait = 4 * time.Second
	}
	if opts.NBD != "none" {
		testutil.NeedCommand(t, "qemu-storage-daemon")
	}
	// A short directory: the QMP socket path must fit in 107 bytes.
	dir, err := os.MkdirTemp("", "xapitest")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{t: t, opts: opts, dir: dir, User: opts.User, Password: opts.Password,
		vms: map[string]*vm{}, vbds: map[string]*vbd{}, vdis: map[string]*vdi{}, srs: map[string]*sr{}, pbds: map[string]*pbd{},
		nets: map[string]*network{}, sessions: map[string]string{}, tasks: map[string]*task{}, drop: map[string]int{},
		chains: map[int][]cbtDelta{}}
	if s.pki, err = NewPKI("xapitest CA"); err == nil {
		s.hostCert, err = s.pki.Issue("localhost", net.ParseIP("127.0.0.1"))
	}
	if err != nil {
		t.Fatal(err)
	}
	s.CAFile = filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(s.CAFile, s.pki.CAPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	s.host = &host{ref: newRef(), uuid: newUUID(), name: "xapitest-host", address: "127.0.0.1", cert: s.hostCert}
	s.AddSR("Local storage", "ext", false)
	purpose := []string{}
	if opts.NBD != "none" {
		purpose = []string{opts.NBD}
	}
	n := &network{ref: newRef(), uuid: newUUID(), name: "Pool-wide network associated with eth0", purpose: purpose}
	s.nets[n.ref] = n
	tmpl := &vm{ref: newRef(), uuid: newUUID(), name: "Other install media", power: "Halted", template: true,
		other: map[string]string{"default_template": "true"}}
	s.vms[tmpl.ref] = tmpl

	mux := http.NewServeMux()
	mux.HandleFunc("/jsonrpc", s.serveRPC)
	mux.HandleFunc("/import_raw_vdi", s.serveImport)
	mux.HandleFunc("/export_raw_vdi", s.serveExport)
	s.srv = httptest.NewUnstartedServer(mux)
	s.srv.TLS = s.tlsConfig()
	s.srv.StartTLS()
	s.URL = s.srv.URL
	t.Cleanup(s.close)
	if opts.Member {
		s.startMember()
	}
	return s
}

// startMember starts the pool member of Options.Member.
func (s *Server) startMember() {
	pki, err := NewPKI("xapitest-member self-signed")
	var cert *Cert
	if err == nil {
		cert, err = pki.Issue("xapitest-member", net.ParseIP("127.0.0.2"))
	}
	if err != nil {
		s.t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(s.srv.Listener.Addr().String())
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.2", port))
	if err != nil {
		s.t.Fatalf("xapitest: member host on 127.0.0.2:%s: %v", port, err)
	}
	s.mu.Lock()
	s.member = &host{ref: newRef(), uuid: newUUID(), name: "xapitest-member", address: "127.0.0.2", cert: cert}
	s.mu.Unlock()
	s.AddSR("Member storage", "ext", false)
	s.mu.Lock()
	for _, r := range s.srs {
		if r.name == "Member storage" {
			s.pbds[r.pbd].host = s.member.ref
		}
	}
	s.mu.Unlock()
	mux := http.NewServeMux()
	mux.HandleFunc("/jsonrpc", func(w http.ResponseWriter, r *http.Request) {
		// A member answers logins with the master's address (the fake
		// forwards nothing else).
		w.Header().Set("Content-Type", "application/json")
		var req rpcRequest
		json.NewDecoder(r.Body).Decode(&req)
		json.NewEncoder(w).Encode(map[string]any{"jsonrpc": "2.0", "id": req.ID,
			"error": map[string]any{"code": 1, "message": "HOST_IS_SLAVE", "data": []string{s.host.address}}})
	})
	mux.HandleFunc("/import_raw_vdi", func(w http.ResponseWriter, r *http.Request) { s.serveImportOn(w, r, s.member) })
	mux.HandleFunc("/export_raw_vdi", func(w http.ResponseWriter, r *http.Request) { s.serveExportOn(w, r, s.member) })
	s.memberSrv = &httptest.Server{Listener: ln, Config: &http.Server{Handler: mux}}
	s.memberSrv.TLS = &tls.Config{Certificates: []tls.Certificate{cert.TLS}, MinVersion: tls.VersionTLS12}
	s.memberSrv.StartTLS()
	s.MemberURL = "https://" + ln.Addr().String()
	s.t.Cleanup(s.memberSrv.Close)
}

// hostOfVDILocked is the host whose PBD attaches the VDI's SR.
func (s *Server) hostOfVDILocked(d *vdi) *host {
	if r := s.srs[d.sr]; r != nil && s.member != nil && s.pbds[r.pbd].host == s.member.ref {
		return s.member
	}
	return s.host
}

func (s *Server) close() {
	s.srv.Close()
	s.mu.Lock()
	if s.nbd != nil {
		s.nbd.stop()
		s.nbd = nil
	}
	s.mu.Unlock()
	os.RemoveAll(s.dir)
}

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func newRef() string { return "OpaqueRef:" + newUUID() }

const nullRef = "OpaqueRef:NULL"

// apiError is an XAPI error: code and parameters.
type apiError struct {
	code   string
	params []string
}

func fail(code string, params ...string) *apiError { return &apiError{code, params} }

// Calls lists the methods called so far, in order (login included).
func (s *Server) Calls() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.calls...)
}

// DropNext makes the next n calls of method end with the connection
// closed, without an answer, as a host that crashes or loses its network.
func (s *Server) DropNext(method string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.drop[method] = n
}

// SetNBDPurpose changes the purpose of the pool's network: "nbd",
// "insecure_nbd" or "none".
func (s *Server) SetNBDPurpose(p string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.nets {
		n.purpose = nil
		if p != "none" {
			n.purpose = []string{p}
		}
	}
	s.opts.NBD = p
}

// SetCBTLicensed changes whether the pool's licence allows CBT.
func (s *Server) SetCBTLicensed(ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opts.CBTUnlicensed = !ok
}

// StopNBD kills the NBD server, as a host that goes away while a backup
// reads; the next VDI.get_nbd_info starts a new one.
func (s *Server) StopNBD() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.nbd != nil {
		s.nbd.stop()
		s.nbd = nil
	}
}

// nbdServer returns the running NBD server, starting it if needed.
func (s *Server) nbdServer() (*nbdServer, error) {
	if s.nbd != nil {
		return s.nbd, nil
	}
	var tlsConfig *tls.Config
	if s.opts.NBD == "nbd" {
		cert := s.hostCert
		if s.opts.WrongNBDCert {
			var err error
			if cert, err = s.pki.Issue("localhost", net.ParseIP("127.0.0.1")); err != nil {
				return nil, err
			}
		}
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert.TLS}, MinVersion: tls.VersionTLS12}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n, err := startNBD(ctx, s.dir, tlsConfig, s.opts.NBDConnectionLimit)
	if err != nil {
		return nil, err
	}
	n.validSession = func(ref string) bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		_, ok := s.sessions[ref]
		return ok
	}
	s.nbd = n
	return n, nil
}

// Dump describes the pool's VMs, VBDs and VDIs in a canonical form, so
// tests can check that the pool is exactly as it was.
func (s *Server) Dump() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var lines []string
	for _, v := range s.vms {
		if v.template {
			continue
		}
		of := ""
		if p := s.vms[v.snapshotOf]; p != nil {
			of = p.uuid
		}
		lines = append(lines, fmt.Sprintf("VM %s %q power=%s snapshot=%v of=%s", v.uuid, v.name, v.power, v.snapshot, of))
		for _, r := range v.vbds {
			b := s.vbds[r]
			u := ""
			if d := s.vdis[b.vdi]; d != nil {
				u = d.uuid
			}
			lines = append(lines, fmt.Sprintf("VM %s VBD %s type=%s vdi=%s attached=%v", v.uuid, b.userdevice, b.typ, u, b.attached))
		}
	}
	for _, d := range s.vdis {
		of := ""
		if p := s.vdis[d.snapshotOf]; p != nil {
			of = p.uuid
		} else if d.snapshotOf != "" {
			of = "(gone)"
		}
		var oc []string
		for k, v := range d.other {
			oc = append(oc, k+"="+v)
		}
		sort.Strings(oc)
		lines = append(lines, fmt.Sprintf("VDI %s %q type=%s size=%d snapshot=%v of=%s cbt=%v data=%v other_config=%s",
			d.uuid, d.name, d.typ, d.size, d.snapshot, of, d.cbt, d.path != "", strings.Join(oc, ",")))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// rpcRequest is a JSON-RPC call as XAPI accepts it (v1 or v2).
type rpcRequest struct {
	JSONRPC string            `json:"jsonrpc"`
	Method  string            `json:"method"`
	Params  []json.RawMessage `json:"params"`
	ID      json.RawMessage   `json:"id"`
}

func (s *Server) serveRPC(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	var req rpcRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Method == "" || len(req.ID) == 0 || string(req.ID) == "null" {
		// As xapi: a malformed call is an HTTP 500 with an HTML page.
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusInternalServerError)
		fmt.Fprint(w, "<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; please wait a while and try again.<h1> Additional information </h1>Jsonrpc.Malformed_method_request</body></html>")
		return
	}
	s.mu.Lock()
	s.calls = append(s.calls, req.Method)
	dropIt := s.drop[req.Method] > 0
	if dropIt {
		s.drop[req.Method]--
	}
	s.mu.Unlock()
	if dropIt {
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				conn.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	result, aerr := s.call(req.Method, req.Params)
	resp := map[string]any{"id": req.ID}
	if req.JSONRPC == "2.0" {
		resp["jsonrpc"] = "2.0"
		if aerr != nil {
			data := aerr.params
			if data == nil {
				data = []string{}
			}
			resp["error"] = map[string]any{"code": 1, "message": aerr.code, "data": data}
		} else {
			resp["result"] = result
		}
	} else { // JSON-RPC 1.0
		if aerr != nil {
			resp["result"] = nil
			resp["error"] = append([]string{aerr.code}, aerr.params...)
		} else {
			resp["result"], resp["error"] = result, nil
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(resp)
}
