package xapi

import (
	"context"
	"regexp"
)

// The typed calls vmshadow makes. Each is one XAPI call with the session
// first; the names are the API's (docs: xapi-project.github.io/xen-api).

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

// LooksLikeUUID reports whether s has the form of a UUID.
func LooksLikeUUID(s string) bool { return uuidRE.MatchString(s) }

// VMByUUID is VM.get_by_uuid.
func (c *Client) VMByUUID(ctx context.Context, uuid string) (string, error) {
	var ref string
	return ref, c.Call(ctx, "VM.get_by_uuid", &ref, uuid)
}

// VMsByName is VM.get_by_name_label (templates and snapshots included).
func (c *Client) VMsByName(ctx context.Context, name string) ([]string, error) {
	var refs []string
	return refs, c.Call(ctx, "VM.get_by_name_label", &refs, name)
}

// VMRecord is VM.get_record.
// VMRecords returns every VM record of the pool by ref (VM.get_all_records:
// templates, snapshots and control domains included).
func (c *Client) VMRecords(ctx context.Context) (map[string]VM, error) {
	var out map[string]VM
	err := c.Call(ctx, "VM.get_all_records", &out)
	return out, err
}

func (c *Client) VMRecord(ctx context.Context, ref string) (VM, error) {
	var r VM
	return r, c.Call(ctx, "VM.get_record", &r, ref)
}

// VBDRecord is VBD.get_record.
func (c *Client) VBDRecord(ctx context.Context, ref string) (VBD, error) {
	var r VBD
	return r, c.Call(ctx, "VBD.get_record", &r, ref)
}

// VDIByUUID is VDI.get_by_uuid.
func (c *Client) VDIByUUID(ctx context.Context, uuid string) (string, error) {
	var ref string
	return ref, c.Call(ctx, "VDI.get_by_uuid", &ref, uuid)
}

// VDIRecord is VDI.get_record.
func (c *Client) VDIRecord(ctx context.Context, ref string) (VDI, error) {
	var r VDI
	return r, c.Call(ctx, "VDI.get_record", &r, ref)
}

// NBDInfo is VDI.get_nbd_info: how to read the VDI over NBD in this
// session; empty when no network has the nbd or insecure_nbd purpose.
func (c *Client) NBDInfo(ctx context.Context, vdi string) ([]NBDInfo, error) {
	var r []NBDInfo
	return r, c.Call(ctx, "VDI.get_nbd_info", &r, vdi)
}

// ListChangedBlocks is VDI.list_changed_blocks(vdi_from, vdi_to): the
// base64 bitmap of the 64 KiB blocks that differ.
func (c *Client) ListChangedBlocks(ctx context.Context, from, to string) (string, error) {
	var s string
	return s, c.Call(ctx, "VDI.list_changed_blocks", &s, from, to)
}

// Networks is network.get_all_records.
func (c *Client) Networks(ctx context.Context) (map[string]Network, error) {
	var r map[string]Network
	return r, c.Call(ctx, "network.get_all_records", &r)
}

// SRByUUID is SR.get_by_uuid.
func (c *Client) SRByUUID(ctx context.Context, uuid string) (string, error) {
	var ref string
	return ref, c.Call(ctx, "SR.get_by_uuid", &ref, uuid)
}

// SRsByName is SR.get_by_name_label.
func (c *Client) SRsByName(ctx context.Context, name string) ([]string, error) {
	var refs []string
	return refs, c.Call(ctx, "SR.get_by_name_label", &refs, name)
}

// SRRecord is SR.get_record.
func (c *Client) SRRecord(ctx context.Context, ref string) (SR, error) {
	var r SR
	return r, c.Call(ctx, "SR.get_record", &r, ref)
}

// VDICreate is VDI.create with a record for an empty user disk.
func (c *Client) VDICreate(ctx context.Context, sr, name, description string, size int64, otherConfig map[string]string) (string, error) {
	if otherConfig == nil {
		otherConfig = map[string]string{}
	}
	rec := map[string]any{
		"name_label": name, "name_description": description, "SR": sr, "virtual_size": size,
		"type": "user", "sharable": false, "read_only": false,
		"other_config": otherConfig, "xenstore_data": map[string]string{}, "sm_config": map[string]string{}, "tags": []string{},
	}
	var ref string
	return ref, c.Call(ctx, "VDI.create", &ref, rec)
}

// VBDCreate is VBD.create attaching vdi to vm as a read-write disk at
// userdevice (not plugged: the VM is halted).
func (c *Client) VBDCreate(ctx context.Context, vm, vdi, userdevice string, bootable bool) (string, error) {
	rec := map[string]any{
		"VM": vm, "VDI": vdi, "userdevice": userdevice, "bootable": bootable, "mode": "RW", "type": "Disk",
		"unpluggable": false, "empty": false, "other_config": map[string]string{},
		"qos_algorithm_type": "", "qos_algorithm_params": map[string]string{},
	}
	var ref string
	return ref, c.Call(ctx, "VBD.create", &ref, rec)
}

// SessionValid reports whether the session is still alive on the pool
// (session.get_uuid of itself): the pool destroys sessions left idle for a
// day and the oldest of an originator's sessions beyond its limit, and
// xapi-nbd checks the session of each new NBD connection.
func (c *Client) SessionValid(ctx context.Context) (bool, error) {
	err := c.Call(ctx, "session.get_uuid", nil, c.session)
	if IsCode(err, "SESSION_INVALID", "HANDLE_INVALID") {
		return false, nil
	}
	return err == nil, err
}
