package xapitest

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// cbtBlock is the granularity of changed block tracking.
const cbtBlock = 64 << 10

func (s *Server) tlsConfig() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{s.hostCert.TLS}, MinVersion: tls.VersionTLS12}
}

// method is one API call: the number of parameters after the session, and
// its implementation, run with s.mu held.
type method struct {
	n  int
	fn func(s *Server, session string, a []any) (any, *apiError)
}

var methods map[string]method

func init() {
	methods = map[string]method{
		"session.logout":              {0, (*Server).logout},
		"session.get_uuid":            {1, (*Server).sessionUUID},
		"VM.get_by_uuid":              {1, (*Server).vmByUUID},
		"VM.get_by_name_label":        {1, (*Server).vmsByName},
		"VM.get_record":               {1, (*Server).vmRecord},
		"VM.get_all_records":          {0, (*Server).vmRecords},
		"VM.snapshot":                 {2, (*Server).vmSnapshot},
		"VM.destroy":                  {1, (*Server).vmDestroy},
		"VM.pause":                    {1, (*Server).vmPause},
		"VM.unpause":                  {1, (*Server).vmUnpause},
		"VM.clone":                    {2, (*Server).vmClone},
		"VM.set_is_a_template":        {2, (*Server).vmSetTemplate},
		"VBD.get_record":              {1, (*Server).vbdRecord},
		"VBD.create":                  {1, (*Server).vbdCreate},
		"VDI.get_by_uuid":             {1, (*Server).vdiByUUID},
		"VDI.get_record":              {1, (*Server).vdiRecord},
		"VDI.create":                  {1, (*Server).vdiCreate},
		"VDI.destroy":                 {1, (*Server).vdiDestroy},
		"VDI.data_destroy":            {1, (*Server).vdiDataDestroy},
		"VDI.enable_cbt":              {1, (*Server).vdiEnableCBT},
		"VDI.disable_cbt":             {1, (*Server).vdiDisableCBT},
		"VDI.list_changed_blocks":     {2, (*Server).vdiListChangedBlocks},
		"VDI.get_nbd_info":            {1, (*Server).vdiNBDInfo},
		"VDI.add_to_other_config":     {3, (*Server).vdiAddOtherConfig},
		"SR.get_by_uuid":              {1, (*Server).srByUUID},
		"SR.get_by_name_label":        {1, (*Server).srsByName},
		"SR.get_record":               {1, (*Server).srRecord},
		"PBD.get_record":              {1, (*Server).pbdRecord},
		"host.get_record":             {1, (*Server).hostRecord},
		"host.get_server_certificate": {1, (*Server).hostCertificate},
		"network.get_all_records":     {0, (*Server).networkRecords},
		"task.create":                 {2, (*Server).taskCreate},
		"task.get_record":             {1, (*Server).taskRecord},
		"task.cancel":                 {1, (*Server).taskCancel},
		"task.destroy":                {1, (*Server).taskDestroy},
	}
}

// asyncOK lists the calls that have an Async form (not getters, setters,
// session or task calls).
var asyncOK = map[string]bool{"VM.snapshot": true, "VM.destroy": true, "VM.pause": true, "VM.unpause": true, "VM.clone": true, "VDI.destroy": true,
	"VDI.data_destroy": true, "VDI.enable_cbt": true, "VDI.create": true, "VBD.create": true, "VDI.list_changed_blocks": true}

func decodeParams(raw []json.RawMessage) ([]any, error) {
	out := make([]any, len(raw))
	for i, r := range raw {
		d := json.NewDecoder(bytes.NewReader(r))
		d.UseNumber()
		if err := d.Decode(&out[i]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (s *Server) call(name string, raw []json.RawMessage) (any, *apiError) {
	a, err := decodeParams(raw)
	if err != nil {
		return nil, fail("INTERNAL_ERROR", "cannot parse params: "+err.Error())
	}
	if name == "session.login_with_password" {
		if len(a) < 2 || len(a) > 4 {
			return nil, fail("MESSAGE_PARAMETER_COUNT_MISMATCH", name, "4", strconv.Itoa(len(a)))
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.login(a)
	}
	async := false
	base := name
	if b, ok := strings.CutPrefix(name, "Async."); ok {
		async, base = true, b
	}
	m, ok := methods[base]
	if !ok || (async && !asyncOK[base]) {
		return nil, fail("MESSAGE_METHOD_UNKNOWN", name)
	}
	if len(a) != m.n+1 {
		return nil, fail("MESSAGE_PARAMETER_COUNT_MISMATCH", name, strconv.Itoa(m.n+1), strconv.Itoa(len(a)))
	}
	session, _ := a[0].(string)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.sessions[session]; !ok {
		return nil, fail("SESSION_INVALID", session)
	}
	if e := s.permitted(name); e != nil {
		return nil, e
	}
	if !async {
		return m.fn(s, session, a[1:])
	}
	t := &task{ref: newRef(), uuid: newUUID(), label: "Async." + base, status: "pending"}
	s.tasks[t.ref] = t
	go s.runTask(t, base, m, session, a[1:])
	return t.ref, nil
}

// runTask does the work of an Async call and records its outcome.
func (s *Server) runTask(t *task, name string, m method, session string, a []any) {
	if name == "VM.snapshot" && s.opts.SnapshotDelay > 0 {
		time.Sleep(s.opts.SnapshotDelay)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.cancelled {
		t.status, t.errorInfo = "cancelled", []string{"TASK_CANCELLED", t.ref}
		return
	}
	res, aerr := m.fn(s, session, a)
	if aerr != nil {
		t.status, t.errorInfo = "failure", append([]string{aerr.code}, aerr.params...)
		return
	}
	t.status, t.progress = "success", 1
	if ref, ok := res.(string); ok && ref != "" {
		t.result = "<value>" + ref + "</value>"
	}
}

func str(v any, name string) (string, *apiError) {
	s, ok := v.(string)
	if !ok {
		return "", fail("FIELD_TYPE_ERROR", name)
	}
	return s, nil
}

func toInt(v any, name string) (int64, *apiError) {
	switch x := v.(type) {
	case json.Number:
		if n, err := x.Int64(); err == nil {
			return n, nil
		}
	case string:
		if n, err := strconv.ParseInt(x, 10, 64); err == nil {
			return n, nil
		}
	}
	return 0, fail("FIELD_TYPE_ERROR", name)
}

// roles are XAPI's roles, least privileged first (ocaml/idl/datamodel_roles.ml):
// a role has every permission of the roles before it.
var roles = []string{"read-only", "vm-operator", "vm-admin", "vm-power-admin", "pool-operator", "pool-admin"}

// leastRole is the least privileged role allowed each call that needs more
// than read-only, from the datamodel (ocaml/idl/datamodel_vm.ml,
// datamodel.ml: allowed_roles, or the class's messages_default_allowed_roles,
// _R_VM_ADMIN for VM, VBD and VDI). Getters and task calls need read-only.
var leastRole = map[string]string{
	"VM.snapshot": "vm-power-admin", "VM.pause": "vm-operator", "VM.unpause": "vm-operator",
	"VM.destroy": "vm-admin", "VM.clone": "vm-admin", "VM.set_is_a_template": "vm-admin",
	"VBD.create": "vm-admin", "VDI.create": "vm-admin", "VDI.destroy": "vm-admin", "VDI.data_destroy": "vm-admin",
	"VDI.enable_cbt": "vm-admin", "VDI.disable_cbt": "vm-admin", "VDI.get_nbd_info": "vm-admin",
	"VDI.add_to_other_config": "vm-admin", "VDI.list_changed_blocks": "vm-operator",
	// HTTP handlers (datamodel.ml, http_actions)
	"PUT /import_raw_vdi": "vm-admin", "GET /export_raw_vdi": "vm-admin",
}

// permitted checks the session's role as xapi's rbac.ml does, failing with
// RBAC_PERMISSION_DENIED [permission; message].
func (s *Server) permitted(method string) *apiError {
	need, ok := leastRole[strings.TrimPrefix(method, "Async.")]
	if !ok {
		return nil
	}
	if slices.Index(roles, s.opts.Role) >= slices.Index(roles, need) {
		return nil
	}
	allowed := strings.Join(roles[slices.Index(roles, need):], ", ")
	return fail("RBAC_PERMISSION_DENIED", strings.ToLower(strings.TrimPrefix(method, "Async.")),
		"No permission in user session. (Roles with this permission: "+allowed+")")
}

func (s *Server) login(a []any) (any, *apiError) {
	user, _ := a[0].(string)
	pw, _ := a[1].(string)
	if s.opts.Slave != "" {
		return nil, fail("HOST_IS_SLAVE", s.opts.Slave)
	}
	if user != s.opts.User || pw != s.opts.Password {
		// As xapi_session.ml's thread_delay_and_raise_error: a failed
		// login is answered after a delay (5 s).
		s.mu.Unlock()
		time.Sleep(s.opts.LoginFailDelay)
		s.mu.Lock()
		return nil, fail("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
	}
	ref := newRef()
	s.sessions[ref] = user
	return ref, nil
}

func (s *Server) logout(session string, _ []any) (any, *apiError) {
	delete(s.sessions, session)
	if s.nbd != nil {
		for name := range s.nbd.exports {
			if strings.HasSuffix(name, "?session_id="+session) {
				s.nbd.unexport(context.Background(), name)
			}
		}
	}
	return "", nil
}

func (s *Server) sessionUUID(_ string, a []any) (any, *apiError) {
	ref, _ := a[0].(string)
	if _, ok := s.sessions[ref]; !ok {
		return nil, fail("HANDLE_INVALID", "session", ref)
	}
	return strings.TrimPrefix(ref, "OpaqueRef:"), nil
}

// --- VMs ---

func (s *Server) getVM(v any) (*vm, *apiError) {
	ref, _ := v.(string)
	if x := s.vms[ref]; x != nil {
		return x, nil
	}
	return nil, fail("HANDLE_INVALID", "VM", ref)
}

func (s *Server) vmByUUID(_ string, a []any) (any, *apiError) {
	u, e := str(a[0], "uuid")
	if e != nil {
		return nil, e
	}
	for _, v := range s.vms {
		if v.uuid == u {
			return v.ref, nil
		}
	}
	return nil, fail("UUID_INVALID", "VM", u)
}

func (s *Server) vmsByName(_ string, a []any) (any, *apiError) {
	n, e := str(a[0], "label")
	if e != nil {
		return nil, e
	}
	refs := []string{}
	for _, v := range s.vms {
		if v.name == n {
			refs = append(refs, v.ref)
		}
	}
	sort.Strings(refs)
	return refs, nil
}

// vmRecords answers VM.get_all_records: every VM, template and snapshot,
// and, as on a real pool, the control domain of the master (dom0).
func (s *Server) vmRecords(m string, _ []any) (any, *apiError) {
	out := map[string]any{}
	for ref := range s.vms {
		rec, e := s.vmRecord(m, []any{ref})
		if e != nil {
			return nil, e
		}
		out[ref] = rec
	}
	out["OpaqueRef:control-domain-master"] = map[string]any{
		"uuid": "00000000-0000-0000-0000-00000000d0d0", "name_label": "Control domain on host: master", "power_state": "Running",
		"is_a_template": false, "is_a_snapshot": false, "snapshot_of": nullRef, "snapshots": []string{}, "VBDs": []string{},
		"VIFs": []string{}, "other_config": map[string]string{}, "is_control_domain": true,
	}
	return out, nil
}

func (s *Server) vmRecord(_ string, a []any) (any, *apiError) {
	v, e := s.getVM(a[0])
	if e != nil {
		return nil, e
	}
	of := v.snapshotOf
	if of == "" {
		of = nullRef
	}
	return map[string]any{
		"uuid": v.uuid, "name_label": v.name, "name_description": "", "power_state": v.power,
		"is_a_template": v.template, "is_a_snapshot": v.snapshot, "snapshot_of": of, "snapshots": nonNil(v.snapshots),
		"VBDs": nonNil(v.vbds), "VIFs": []string{}, "other_config": nonNilMap(v.other), "is_control_domain": false,
		"memory_static_max": 2 << 30, "VCPUs_max": 2, "resident_on": nullRef, "snapshot_time": "19700101T00:00:00Z",
		"allowed_operations": []string{}, "current_operations": map[string]string{},
	}, nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func nonNilMap(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

// vmSnapshot is VM.snapshot(vm, new_name): a snapshot VM whose disk VBDs
// point at snapshots of the VM's disks (crash-consistent: all disks are
// copied while the fake holds its lock).
func (s *Server) vmSnapshot(_ string, a []any) (any, *apiError) {
	v, e := s.getVM(a[0])
	if e != nil {
		return nil, e
	}
	name, e := str(a[1], "new_name")
	if e != nil {
		return nil, e
	}
	if v.template || v.snapshot {
		return nil, fail("OPERATION_NOT_ALLOWED", "VM is a template or a snapshot: "+v.ref)
	}
	snap := &vm{ref: newRef(), uuid: newUUID(), name: name, power: "Halted", snapshot: true, snapshotOf: v.ref, other: map[string]string{}}
	disks := 0
	for _, r := range slices.Clone(v.vbds) {
		b := s.vbds[r]
		nb := &vbd{ref: newRef(), uuid: newUUID(), vm: snap.ref, vdi: nullRef, userdevice: b.userdevice, typ: b.typ, mode: b.mode, empty: b.empty, bootable: b.bootable}
		if b.typ == "Disk" && !b.empty {
			// As xapi_vm_clone.ml's safe_clone_disks: one VDI.snapshot
			// after another, with no atomicity across disks: the guest
			// may write between them unless the VM is paused.
			if disks > 0 && s.opts.BetweenDiskSnapshots != nil {
				s.mu.Unlock()
				s.opts.BetweenDiskSnapshots()
				s.mu.Lock()
			}
			disks++
			d := s.vdis[b.vdi]
			sd, err := s.snapshotVDI(d)
			if err != nil {
				return nil, fail("SR_BACKEND_FAILURE_82", "", "snapshot failed: "+err.Error(), "")
			}
			nb.vdi = sd.ref
		}
		s.vbds[nb.ref] = nb
		snap.vbds = append(snap.vbds, nb.ref)
	}
	s.vms[snap.ref] = snap
	v.snapshots = append(v.snapshots, snap.ref)
	return snap.ref, nil
}

// snapshotVDI copies d's data and, when CBT is on, closes the chain's
// current delta: the blocks written since the previous snapshot.
func (s *Server) snapshotVDI(d *vdi) (*vdi, error) {
	sd := &vdi{ref: newRef(), uuid: newUUID(), name: d.name, sr: d.sr, typ: d.typ, size: d.size, snapshot: true,
		snapshotOf: d.ref, cbt: d.cbt, other: map[string]string{}}
	for k, v := range d.other {
		sd.other[k] = v
	}
	sd.path = filepath.Join(s.dir, sd.uuid+".raw")
	if err := copySparse(d.path, sd.path, d.size); err != nil {
		return nil, err
	}
	if d.cbt {
		s.chainSeq++
		sd.chain, sd.seq = d.chain, s.chainSeq
		s.chains[d.chain] = append(s.chains[d.chain], cbtDelta{seq: sd.seq, changed: d.dirty})
		d.dirty = map[int64]bool{}
	}
	s.vdis[sd.ref] = sd
	return sd, nil
}

func copySparse(from, to string, size int64) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(size); err != nil {
		return err
	}
	buf := make([]byte, cbtBlock)
	zero := make([]byte, cbtBlock)
	for off := int64(0); off < size; off += cbtBlock {
		n, err := in.ReadAt(buf[:min(cbtBlock, size-off)], off)
		if err != nil && n == 0 {
			return err
		}
		if !bytes.Equal(buf[:n], zero[:n]) {
			if _, err := out.WriteAt(buf[:n], off); err != nil {
				return err
			}
		}
	}
	return out.Sync()
}

func (s *Server) vmDestroy(_ string, a []any) (any, *apiError) {
	v, e := s.getVM(a[0])
	if e != nil {
		return nil, e
	}
	if v.power != "Halted" {
		return nil, fail("VM_BAD_POWER_STATE", v.ref, "halted", strings.ToLower(v.power))
	}
	for _, r := range slices.Clone(v.vbds) { // removeVBD edits v.vbds
		s.removeVBD(r)
	}
	if p := s.vms[v.snapshotOf]; p != nil {
		p.snapshots = remove(p.snapshots, v.ref)
	}
	delete(s.vms, v.ref)
	return "", nil
}

// vmPause and vmUnpause follow xapi_vm_lifecycle.ml: pause only from
// Running, unpause only from Paused, else VM_BAD_POWER_STATE [vm; expected;
// actual]. VM.snapshot is allowed in every power state, Paused included.
func (s *Server) vmPause(_ string, a []any) (any, *apiError) {
	v, e := s.getVM(a[0])
	if e != nil {
		return nil, e
	}
	if v.power != "Running" {
		return nil, fail("VM_BAD_POWER_STATE", v.ref, "running", strings.ToLower(v.power))
	}
	v.power = "Paused"
	s.pauses++
	return "", nil
}

func (s *Server) vmUnpause(_ string, a []any) (any, *apiError) {
	v, e := s.getVM(a[0])
	if e != nil {
		return nil, e
	}
	if v.power != "Paused" {
		return nil, fail("VM_BAD_POWER_STATE", v.ref, "paused", strings.ToLower(v.power))
	}
	v.power = "Running"
	return "", nil
}

func remove(list []string, x string) []string {
	out := list[:0]
	for _, y := range list {
		if y != x {
			out = append(out, y)
		}
	}
	return out
}

func (s *Server) vmClone(_ string, a []any) (any, *apiError) {
	v, e := s.getVM(a[0])
	if e != nil {
		return nil, e
	}
	name, e := str(a[1], "new_name")
	if e != nil {
		return nil, e
	}
	if len(v.vbds) > 0 {
		return nil, fail("INTERNAL_ERROR", "the fake clones VMs without disks only")
	}
	c := &vm{ref: newRef(), uuid: newUUID(), name: name, power: "Halted", template: v.template, other: map[string]string{}}
	s.vms[c.ref] = c
	return c.ref, nil
}

func (s *Server) vmSetTemplate(_ string, a []any) (any, *apiError) {
	v, e := s.getVM(a[0])
	if e != nil {
		return nil, e
	}
	b, ok := a[1].(bool)
	if !ok {
		return nil, fail("FIELD_TYPE_ERROR", "value")
	}
	v.template = b
	return "", nil
}

// --- VBDs ---

func (s *Server) vbdRecord(_ string, a []any) (any, *apiError) {
	ref, _ := a[0].(string)
	b := s.vbds[ref]
	if b == nil {
		return nil, fail("HANDLE_INVALID", "VBD", ref)
	}
	device := ""
	if n, err := strconv.Atoi(b.userdevice); err == nil && b.attached {
		device = "xvd" + string(rune('a'+n))
	}
	return map[string]any{"uuid": b.uuid, "VM": b.vm, "VDI": b.vdi, "userdevice": b.userdevice, "device": device,
		"type": b.typ, "mode": b.mode, "empty": b.empty, "bootable": b.bootable, "currently_attached": b.attached,
		"unpluggable": false, "other_config": map[string]string{}, "qos_algorithm_type": "", "qos_algorithm_params": map[string]string{},
		"storage_lock": false, "status_code": 0, "allowed_operations": []string{}, "current_operations": map[string]string{}}, nil
}

func (s *Server) removeVBD(ref string) {
	b := s.vbds[ref]
	if b == nil {
		return
	}
	if v := s.vms[b.vm]; v != nil {
		v.vbds = remove(v.vbds, ref)
	}
	delete(s.vbds, ref)
}

func (s *Server) vbdCreate(_ string, a []any) (any, *apiError) {
	rec, ok := a[0].(map[string]any)
	if !ok {
		return nil, fail("FIELD_TYPE_ERROR", "args")
	}
	for _, f := range []string{"VM", "VDI", "userdevice", "bootable", "mode", "type", "unpluggable", "empty", "other_config", "qos_algorithm_type", "qos_algorithm_params"} {
		if _, ok := rec[f]; !ok {
			return nil, fail("FIELD_TYPE_ERROR", f)
		}
	}
	v, e := s.getVM(rec["VM"])
	if e != nil {
		return nil, e
	}
	d, e := s.getVDI(rec["VDI"])
	if e != nil {
		return nil, e
	}
	ud, _ := rec["userdevice"].(string)
	for _, r := range v.vbds {
		if s.vbds[r].userdevice == ud {
			return nil, fail("DEVICE_ALREADY_EXISTS", ud)
		}
	}
	mode, _ := rec["mode"].(string)
	typ, _ := rec["type"].(string)
	boot, _ := rec["bootable"].(bool)
	b := &vbd{ref: newRef(), uuid: newUUID(), vm: v.ref, vdi: d.ref, userdevice: ud, typ: typ, mode: mode, bootable: boot}
	s.vbds[b.ref] = b
	v.vbds = append(v.vbds, b.ref)
	return b.ref, nil
}

// --- VDIs ---

func (s *Server) getVDI(v any) (*vdi, *apiError) {
	ref, _ := v.(string)
	if d := s.vdis[ref]; d != nil {
		return d, nil
	}
	return nil, fail("HANDLE_INVALID", "VDI", ref)
}

func (s *Server) vdiByUUID(_ string, a []any) (any, *apiError) {
	u, e := str(a[0], "uuid")
	if e != nil {
		return nil, e
	}
	for _, d := range s.vdis {
		if d.uuid == u {
			return d.ref, nil
		}
	}
	return nil, fail("UUID_INVALID", "VDI", u)
}

func (s *Server) vdiRecord(_ string, a []any) (any, *apiError) {
	d, e := s.getVDI(a[0])
	if e != nil {
		return nil, e
	}
	of := d.snapshotOf
	if of == "" {
		of = nullRef
	}
	var snaps, vbds []string
	for _, x := range s.vdis {
		if x.snapshotOf == d.ref {
			snaps = append(snaps, x.ref)
		}
	}
	for _, b := range s.vbds {
		if b.vdi == d.ref {
			vbds = append(vbds, b.ref)
		}
	}
	sort.Strings(snaps)
	sort.Strings(vbds)
	return map[string]any{
		"uuid": d.uuid, "name_label": d.name, "name_description": "", "SR": d.sr, "virtual_size": d.size,
		"physical_utilisation": d.size, "type": d.typ, "sharable": false, "read_only": false, "managed": true, "missing": false,
		"is_a_snapshot": d.snapshot, "snapshot_of": of, "snapshots": nonNil(snaps), "cbt_enabled": d.cbt, "VBDs": nonNil(vbds),
		"other_config": nonNilMap(d.other), "sm_config": map[string]string{}, "xenstore_data": map[string]string{}, "tags": []string{},
		"location": d.uuid, "on_boot": "persist", "allow_caching": false, "storage_lock": false, "parent": nullRef,
		"snapshot_time": "19700101T00:00:00Z", "allowed_operations": []string{}, "current_operations": map[string]string{},
	}, nil
}

func (s *Server) attached(d *vdi) bool {
	for _, b := range s.vbds {
		if b.vdi == d.ref && b.attached {
			return true
		}
	}
	return false
}

// dropData removes a VDI's data file and its NBD exports.
func (s *Server) dropData(d *vdi) {
	if s.nbd != nil {
		for name := range s.nbd.exports {
			if strings.HasPrefix(name, "/"+d.uuid+"?") {
				s.nbd.unexport(context.Background(), name)
			}
		}
	}
	if d.path != "" {
		os.Remove(d.path)
		d.path = ""
	}
	// As xapi: the VDI's VBDs go at once.
	for r, b := range s.vbds {
		if b.vdi == d.ref {
			s.removeVBD(r)
		}
	}
}

func (s *Server) vdiDestroy(_ string, a []any) (any, *apiError) {
	d, e := s.getVDI(a[0])
	if e != nil {
		return nil, e
	}
	if s.attached(d) {
		return nil, fail("VDI_IN_USE", d.ref, "destroy")
	}
	s.dropData(d)
	delete(s.vdis, d.ref)
	return "", nil
}

func (s *Server) vdiDataDestroy(_ string, a []any) (any, *apiError) {
	d, e := s.getVDI(a[0])
	if e != nil {
		return nil, e
	}
	switch {
	case d.typ == "cbt_metadata":
		return "", nil
	case !d.snapshot:
		return nil, fail("OPERATION_NOT_ALLOWED", "VDI is not a snapshot: "+d.ref)
	case !d.cbt:
		return nil, fail("VDI_NO_CBT_METADATA", d.ref)
	}
	// As xapi_vdi.ml's _data_destroy: the VDI is marked cbt_metadata at
	// once (no new VBD can use it), then wait_for_vbds_to_be_unplugged_and_
	// destroyed waits up to 4 s for every VBD of the VDI to be gone,
	// attached or not (a snapshot VM's VBDs count), and fails with
	// VDI_IN_USE [vdi; "data_destroy"]; on failure the type is restored.
	typ := d.typ
	d.typ = "cbt_metadata"
	deadline := time.Now().Add(s.opts.DataDestroyWait)
	for s.hasVBDs(d) && time.Now().Before(deadline) {
		s.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
		s.mu.Lock()
	}
	if s.vdis[d.ref] != d {
		return nil, fail("HANDLE_INVALID", "VDI", d.ref)
	}
	if s.hasVBDs(d) || s.attached(d) {
		d.typ = typ
		s.dataDestroyRefused++
		return nil, fail("VDI_IN_USE", d.ref, "data_destroy")
	}
	s.dropData(d)
	return "", nil
}

// hasVBDs reports whether any VBD, attached or not, refers to the VDI.
func (s *Server) hasVBDs(d *vdi) bool {
	for _, b := range s.vbds {
		if b.vdi == d.ref {
			return true
		}
	}
	return false
}

func (s *Server) vdiEnableCBT(_ string, a []any) (any, *apiError) {
	d, e := s.getVDI(a[0])
	if e != nil {
		return nil, e
	}
	switch {
	case s.opts.CBTUnlicensed:
		return nil, fail("LICENCE_RESTRICTION", "CBT")
	case d.snapshot:
		return nil, fail("OPERATION_NOT_ALLOWED", "VDI is a snapshot: "+d.ref)
	case d.typ != "user" && d.typ != "system":
		return nil, fail("VDI_INCOMPATIBLE_TYPE", d.ref, d.typ)
	case d.cbt:
		return "", nil
	}
	s.chainSeq++
	d.cbt, d.chain, d.dirty = true, s.chainSeq, map[int64]bool{}
	return "", nil
}

func (s *Server) vdiDisableCBT(_ string, a []any) (any, *apiError) {
	d, e := s.getVDI(a[0])
	if e != nil {
		return nil, e
	}
	d.cbt, d.chain, d.dirty = false, 0, nil
	return "", nil
}

// vdiListChangedBlocks answers from the deltas recorded by the snapshots
// of one CBT chain: the blocks written after from was taken, up to to.
func (s *Server) vdiListChangedBlocks(_ string, a []any) (any, *apiError) {
	from, e := s.getVDI(a[0])
	if e != nil {
		return nil, e
	}
	to, e := s.getVDI(a[1])
	if e != nil {
		return nil, e
	}
	for _, d := range []*vdi{from, to} {
		if !d.cbt {
			return nil, fail("VDI_NO_CBT_METADATA", d.ref)
		}
	}
	if !from.snapshot || !to.snapshot || from.chain == 0 || from.chain != to.chain || from.seq >= to.seq {
		return nil, fail("SR_BACKEND_FAILURE_460", "", "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]", "")
	}
	blocks := (to.size + cbtBlock - 1) / cbtBlock
	bits := make([]byte, (blocks+7)/8)
	for _, delta := range s.chains[to.chain] {
		if delta.seq <= from.seq || delta.seq > to.seq {
			continue
		}
		for b := range delta.changed {
			if b < blocks {
				bits[b/8] |= 0x80 >> (b % 8)
			}
		}
	}
	return base64.StdEncoding.EncodeToString(bits), nil
}

func (s *Server) vdiNBDInfo(session string, a []any) (any, *apiError) {
	d, e := s.getVDI(a[0])
	if e != nil {
		return nil, e
	}
	if d.path == "" {
		return nil, fail("VDI_INCOMPATIBLE_TYPE", d.ref, d.typ)
	}
	if s.opts.NBD == "none" {
		return []any{}, nil
	}
	n, err := s.nbdServer()
	if err != nil {
		return nil, fail("INTERNAL_ERROR", "NBD server: "+err.Error())
	}
	name := "/" + d.uuid + "?session_id=" + session
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.export(ctx, name, d.path); err != nil {
		return nil, fail("INTERNAL_ERROR", "NBD export: "+err.Error())
	}
	// As xapi_vdi.ml's _get_nbd_info: one record per address of the host
	// (IPv6 ones in CIDR form), each with the host's certificate and its
	// subject, whether the network's purpose is nbd or insecure_nbd.
	var out []any
	for _, addr := range s.opts.NBDAddresses {
		out = append(out, map[string]any{"address": addr, "port": n.port, "exportname": name,
			"cert": string(s.hostCert.CertPEM), "subject": "localhost"})
	}
	return out, nil
}

func (s *Server) vdiAddOtherConfig(_ string, a []any) (any, *apiError) {
	d, e := s.getVDI(a[0])
	if e != nil {
		return nil, e
	}
	k, e := str(a[1], "key")
	if e != nil {
		return nil, e
	}
	v, e := str(a[2], "value")
	if e != nil {
		return nil, e
	}
	if _, ok := d.other[k]; ok {
		return nil, fail("MAP_DUPLICATE_KEY", "VDI", "other_config", d.ref, k)
	}
	d.other[k] = v
	return "", nil
}

// vdiCreate is VDI.create(record). On SRs of type lvm the new VDI is not
// zeroed, as on xapi's legacy LVM storage: it holds old garbage.
func (s *Server) vdiCreate(_ string, a []any) (any, *apiError) {
	rec, ok := a[0].(map[string]any)
	if !ok {
		return nil, fail("FIELD_TYPE_ERROR", "args")
	}
	for _, f := range []string{"name_label", "name_description", "SR", "virtual_size", "type", "sharable", "read_only", "other_config", "xenstore_data", "sm_config", "tags"} {
		if _, ok := rec[f]; !ok {
			return nil, fail("FIELD_TYPE_ERROR", f)
		}
	}
	srRef, _ := rec["SR"].(string)
	r := s.srs[srRef]
	if r == nil {
		return nil, fail("HANDLE_INVALID", "SR", srRef)
	}
	size, e := toInt(rec["virtual_size"], "virtual_size")
	if e != nil {
		return nil, e
	}
	typ, _ := rec["type"].(string)
	if typ == "cbt_metadata" {
		return nil, fail("VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata")
	}
	name, _ := rec["name_label"].(string)
	d, err := s.newVDI(r, name, size, r.typ == "lvm")
	if err != nil {
		return nil, fail("SR_BACKEND_FAILURE_78", "", err.Error(), "")
	}
	if oc, ok := rec["other_config"].(map[string]any); ok {
		for k, v := range oc {
			d.other[k] = fmt.Sprint(v)
		}
	}
	return d.ref, nil
}

func (s *Server) newVDI(r *sr, name string, size int64, garbage bool) (*vdi, error) {
	d := &vdi{ref: newRef(), uuid: newUUID(), name: name, sr: r.ref, typ: "user", size: size, other: map[string]string{}}
	d.path = filepath.Join(s.dir, d.uuid+".raw")
	f, err := os.OpenFile(d.path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return nil, err
	}
	if garbage {
		junk := bytes.Repeat([]byte{0xAA}, 1<<20)
		for off := int64(0); off < size; off += int64(len(junk)) {
			if _, err := f.WriteAt(junk[:min(int64(len(junk)), size-off)], off); err != nil {
				return nil, err
			}
		}
	}
	s.vdis[d.ref] = d
	return d, nil
}

// --- SRs, PBDs, hosts, networks ---

func (s *Server) srByUUID(_ string, a []any) (any, *apiError) {
	u, e := str(a[0], "uuid")
	if e != nil {
		return nil, e
	}
	for _, r := range s.srs {
		if r.uuid == u {
			return r.ref, nil
		}
	}
	return nil, fail("UUID_INVALID", "SR", u)
}

func (s *Server) srsByName(_ string, a []any) (any, *apiError) {
	n, e := str(a[0], "label")
	if e != nil {
		return nil, e
	}
	refs := []string{}
	for _, r := range s.srs {
		if r.name == n {
			refs = append(refs, r.ref)
		}
	}
	sort.Strings(refs)
	return refs, nil
}

func (s *Server) srRecord(_ string, a []any) (any, *apiError) {
	ref, _ := a[0].(string)
	r := s.srs[ref]
	if r == nil {
		return nil, fail("HANDLE_INVALID", "SR", ref)
	}
	var vdis []string
	for _, d := range s.vdis {
		if d.sr == r.ref {
			vdis = append(vdis, d.ref)
		}
	}
	return map[string]any{"uuid": r.uuid, "name_label": r.name, "name_description": "", "type": r.typ, "content_type": "user",
		"shared": r.shared, "VDIs": nonNil(vdis), "PBDs": []string{r.pbd}, "physical_size": 1 << 40, "physical_utilisation": 0,
		"virtual_allocation": 0, "other_config": map[string]string{}, "sm_config": map[string]string{}}, nil
}

func (s *Server) pbdRecord(_ string, a []any) (any, *apiError) {
	ref, _ := a[0].(string)
	p := s.pbds[ref]
	if p == nil {
		return nil, fail("HANDLE_INVALID", "PBD", ref)
	}
	return map[string]any{"uuid": p.uuid, "host": p.host, "SR": p.sr, "currently_attached": true, "device_config": map[string]string{}}, nil
}

func (s *Server) hostRecord(_ string, a []any) (any, *apiError) {
	h, e := s.getHost(a[0])
	if e != nil {
		return nil, e
	}
	return map[string]any{"uuid": h.uuid, "name_label": h.name, "address": h.address, "hostname": h.name, "enabled": true}, nil
}

func (s *Server) getHost(v any) (*host, *apiError) {
	ref, _ := v.(string)
	for _, h := range []*host{s.host, s.member} {
		if h != nil && h.ref == ref {
			return h, nil
		}
	}
	return nil, fail("HANDLE_INVALID", "host", ref)
}

// hostCertificate is host.get_server_certificate: the PEM of the host's
// TLS certificate.
func (s *Server) hostCertificate(_ string, a []any) (any, *apiError) {
	h, e := s.getHost(a[0])
	if e != nil {
		return nil, e
	}
	return string(h.cert.CertPEM), nil
}

func (s *Server) networkRecords(_ string, _ []any) (any, *apiError) {
	out := map[string]any{}
	for _, n := range s.nets {
		out[n.ref] = map[string]any{"uuid": n.uuid, "name_label": n.name, "purpose": nonNil(n.purpose), "bridge": "xenbr0",
			"PIFs": []string{}, "VIFs": []string{}, "MTU": 1500, "other_config": map[string]string{}}
	}
	return out, nil
}

// --- tasks ---

func (s *Server) taskCreate(_ string, a []any) (any, *apiError) {
	label, e := str(a[0], "label")
	if e != nil {
		return nil, e
	}
	t := &task{ref: newRef(), uuid: newUUID(), label: label, status: "pending"}
	s.tasks[t.ref] = t
	return t.ref, nil
}

func (s *Server) getTask(v any) (*task, *apiError) {
	ref, _ := v.(string)
	if t := s.tasks[ref]; t != nil {
		return t, nil
	}
	return nil, fail("HANDLE_INVALID", "task", ref)
}

func (s *Server) taskRecord(_ string, a []any) (any, *apiError) {
	t, e := s.getTask(a[0])
	if e != nil {
		return nil, e
	}
	return map[string]any{"uuid": t.uuid, "name_label": t.label, "name_description": "", "status": t.status, "progress": t.progress,
		"result": t.result, "error_info": nonNil(t.errorInfo), "created": "19700101T00:00:00Z", "finished": "19700101T00:00:00Z",
		"type": "", "other_config": map[string]string{}, "resident_on": s.host.ref, "subtask_of": nullRef,
		"allowed_operations": []string{"cancel"}, "current_operations": map[string]string{}}, nil
}

func (s *Server) taskCancel(_ string, a []any) (any, *apiError) {
	t, e := s.getTask(a[0])
	if e != nil {
		return nil, e
	}
	if t.status == "pending" {
		t.cancelled = true
	}
	return "", nil
}

func (s *Server) taskDestroy(_ string, a []any) (any, *apiError) {
	t, e := s.getTask(a[0])
	if e != nil {
		return nil, e
	}
	delete(s.tasks, t.ref)
	return "", nil
}
