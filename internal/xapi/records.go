package xapi

import (
	"fmt"
	"strconv"
	"strings"
)

// Int is an API int (64-bit). The JSON-RPC wire format sends it as a number;
// a string of digits (as the XML-RPC mapping does) is accepted too.
type Int int64

// UnmarshalJSON accepts 123 and "123".
func (i *Int) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("int %s: %w", snippet(b), err)
	}
	*i = Int(v)
	return nil
}

// VM is the part of a VM record vmshadow reads.
type VM struct {
	UUID        string            `json:"uuid"`
	NameLabel   string            `json:"name_label"`
	PowerState  string            `json:"power_state"`
	IsATemplate bool              `json:"is_a_template"`
	IsASnapshot bool              `json:"is_a_snapshot"`
	SnapshotOf  string            `json:"snapshot_of"`
	Snapshots   []string          `json:"snapshots"`
	VBDs        []string          `json:"VBDs"`
	OtherConfig map[string]string `json:"other_config"`
	// IsControlDomain marks a host's dom0, which is never backed up.
	IsControlDomain bool `json:"is_control_domain"`
}

// VBD is the part of a VBD record vmshadow reads.
type VBD struct {
	UUID              string `json:"uuid"`
	VM                string `json:"VM"`
	VDI               string `json:"VDI"`
	Userdevice        string `json:"userdevice"`
	Device            string `json:"device"`
	Type              string `json:"type"` // Disk, CD, Floppy
	Mode              string `json:"mode"` // RW, RO
	Empty             bool   `json:"empty"`
	CurrentlyAttached bool   `json:"currently_attached"`
}

// VDI is the part of a VDI record vmshadow reads.
type VDI struct {
	UUID        string            `json:"uuid"`
	NameLabel   string            `json:"name_label"`
	SR          string            `json:"SR"`
	VirtualSize Int               `json:"virtual_size"`
	Type        string            `json:"type"` // user, system, cbt_metadata, ...
	IsASnapshot bool              `json:"is_a_snapshot"`
	SnapshotOf  string            `json:"snapshot_of"`
	Snapshots   []string          `json:"snapshots"`
	CBTEnabled  bool              `json:"cbt_enabled"`
	VBDs        []string          `json:"VBDs"`
	ReadOnly    bool              `json:"read_only"`
	Sharable    bool              `json:"sharable"`
	OtherConfig map[string]string `json:"other_config"`
}

// SR is the part of an SR record vmshadow reads.
type SR struct {
	UUID        string   `json:"uuid"`
	NameLabel   string   `json:"name_label"`
	Type        string   `json:"type"`
	ContentType string   `json:"content_type"`
	Shared      bool     `json:"shared"`
	PBDs        []string `json:"PBDs"`
}

// Network is the part of a network record vmshadow reads.
type Network struct {
	UUID      string   `json:"uuid"`
	NameLabel string   `json:"name_label"`
	Purpose   []string `json:"purpose"` // nbd, insecure_nbd
}

// NBDInfo is one vdi_nbd_server_info record of VDI.get_nbd_info. The
// export name holds the session: never log it.
type NBDInfo struct {
	Address    string `json:"address"`
	Port       Int    `json:"port"`
	Cert       string `json:"cert"` // PEM; empty for insecure_nbd networks
	ExportName string `json:"exportname"`
	Subject    string `json:"subject"` // a DNS name the certificate carries
}

// Task is the part of a task record vmshadow reads.
type Task struct {
	UUID      string   `json:"uuid"`
	Status    string   `json:"status"` // pending, success, failure, cancelling, cancelled
	Progress  float64  `json:"progress"`
	Result    string   `json:"result"`
	ErrorInfo []string `json:"error_info"`
}

// IsNull reports whether ref is empty or the null reference.
func IsNull(ref string) bool { return ref == "" || ref == NullRef }
