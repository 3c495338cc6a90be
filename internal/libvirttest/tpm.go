package libvirttest

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

// SWTPMLog is the log libvirt's swtpm (and swtpm_setup, when libvirt
// manufactures a TPM) writes for domain name.
func SWTPMLog(name string) string {
	return filepath.Join("/var/log/swtpm/libvirt/qemu", name+"-swtpm.log")
}

// SWTPM is a swtpm serving a TPM 2.0 state directory (a stopped domain's,
// or a copy) to the test over a UNIX socket, outside libvirt, so that the
// test can put something identifiable into a TPM's NV storage and read it
// back. It speaks raw TPM 2.0 commands (no tpm2-tools needed).
type SWTPM struct {
	cmd  *exec.Cmd
	ctrl string
	conn net.Conn
}

// StartSWTPM runs swtpm on the TPM 2.0 state in dir (TPM2_Startup done by
// swtpm itself). Close it to have swtpm store its state and exit.
func StartSWTPM(t testing.TB, dir string) *SWTPM {
	t.Helper()
	testutil.NeedCommand(t, "swtpm")
	testutil.NeedCommand(t, "swtpm_ioctl")
	sdir := TempDir(t)
	sock, ctrl := filepath.Join(sdir, "tpm.sock"), filepath.Join(sdir, "ctrl.sock")
	s := &SWTPM{ctrl: ctrl}
	s.cmd = exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--server", "type=unixio,path="+sock, "--ctrl", "type=unixio,path="+ctrl,
		"--flags", "not-need-init,startup-clear", "--log", "file="+filepath.Join(sdir, "swtpm.log"))
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("swtpm: %v", err)
	}
	t.Cleanup(func() { s.Close(t) })
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			s.conn = c
			return s
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(sdir, "swtpm.log"))
			t.Fatalf("swtpm on %s: its socket does not answer: %v; log:\n%s", dir, err, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Close shuts swtpm down (it saves its state) and waits for it.
func (s *SWTPM) Close(t testing.TB) {
	if s.cmd == nil {
		return
	}
	if s.conn != nil {
		s.conn.Close()
	}
	if out, err := exec.Command("swtpm_ioctl", "--unix", s.ctrl, "-s").CombinedOutput(); err != nil {
		t.Logf("swtpm_ioctl -s: %v: %s", err, out)
		s.cmd.Process.Kill()
	}
	s.cmd.Wait()
	s.cmd = nil
}

// TPM 2.0 constants (TCG TPM 2.0 Library, Part 2).
const (
	tpmSTNoSessions = 0x8001
	tpmSTSessions   = 0x8002
	tpmRHOwner      = 0x40000001
	tpmRSPW         = 0x40000009
	tpmAlgSHA256    = 0x000b
	// TPMA_NV: OWNERWRITE | AUTHWRITE | OWNERREAD | AUTHREAD | NO_DA
	nvAttributes = 0x2 | 0x4 | 0x20000 | 0x40000 | 0x2000000
)

// TPMError is a TPM response code other than success.
type TPMError uint32

func (e TPMError) Error() string { return fmt.Sprintf("TPM response code 0x%x", uint32(e)) }

// command sends one TPM 2.0 command and returns the response's body (after
// its 10-byte header).
func (s *SWTPM) command(code uint32, handles []uint32, params []byte) ([]byte, error) {
	var b []byte
	tag := uint16(tpmSTNoSessions)
	if len(handles) > 0 {
		tag = tpmSTSessions
	}
	b = binary.BigEndian.AppendUint16(b, tag)
	b = binary.BigEndian.AppendUint32(b, 0) // size, set below
	b = binary.BigEndian.AppendUint32(b, code)
	for _, h := range handles {
		b = binary.BigEndian.AppendUint32(b, h)
	}
	if len(handles) > 0 { // one empty password session (TPM_RS_PW)
		b = binary.BigEndian.AppendUint32(b, 9)
		b = binary.BigEndian.AppendUint32(b, tpmRSPW)
		b = append(b, 0, 0, 0, 0, 0) // nonce, attributes, hmac
	}
	b = append(b, params...)
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	s.conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := s.conn.Write(b); err != nil {
		return nil, fmt.Errorf("send TPM command 0x%x: %w", code, err)
	}
	var h [10]byte
	if _, err := io.ReadFull(s.conn, h[:]); err != nil {
		return nil, fmt.Errorf("TPM response to 0x%x: %w", code, err)
	}
	size := binary.BigEndian.Uint32(h[2:])
	if size < 10 || size > 1<<16 {
		return nil, fmt.Errorf("TPM response to 0x%x: size %d", code, size)
	}
	body := make([]byte, size-10)
	if _, err := io.ReadFull(s.conn, body); err != nil {
		return nil, fmt.Errorf("TPM response to 0x%x: %w", code, err)
	}
	if rc := binary.BigEndian.Uint32(h[6:]); rc != 0 {
		return nil, fmt.Errorf("TPM command 0x%x: %w", code, TPMError(rc))
	}
	return body, nil
}

// NVWrite defines NV index (owner authorization, empty passwords) with
// data's size and writes data into it (at most 1024 bytes).
func (s *SWTPM) NVWrite(index uint32, data []byte) error {
	var pub []byte
	pub = binary.BigEndian.AppendUint32(pub, index)
	pub = binary.BigEndian.AppendUint16(pub, tpmAlgSHA256)
	pub = binary.BigEndian.AppendUint32(pub, nvAttributes)
	pub = binary.BigEndian.AppendUint16(pub, 0) // authPolicy
	pub = binary.BigEndian.AppendUint16(pub, uint16(len(data)))
	var p []byte
	p = binary.BigEndian.AppendUint16(p, 0) // auth
	p = binary.BigEndian.AppendUint16(p, uint16(len(pub)))
	p = append(p, pub...)
	if _, err := s.command(0x12a, []uint32{tpmRHOwner}, p); err != nil { // TPM2_NV_DefineSpace
		return fmt.Errorf("define NV index 0x%x: %w", index, err)
	}
	p = binary.BigEndian.AppendUint16(nil, uint16(len(data)))
	p = append(p, data...)
	p = binary.BigEndian.AppendUint16(p, 0)                                // offset
	if _, err := s.command(0x137, []uint32{index, index}, p); err != nil { // TPM2_NV_Write
		return fmt.Errorf("write NV index 0x%x: %w", index, err)
	}
	return nil
}

// NVRead reads size bytes of NV index (at most 1024). An index the TPM
// does not have fails with a TPMError (TPM_RC_HANDLE).
func (s *SWTPM) NVRead(index uint32, size int) ([]byte, error) {
	p := binary.BigEndian.AppendUint16(nil, uint16(size))
	p = binary.BigEndian.AppendUint16(p, 0)
	body, err := s.command(0x14e, []uint32{index, index}, p) // TPM2_NV_Read
	if err != nil {
		return nil, fmt.Errorf("read NV index 0x%x: %w", index, err)
	}
	// parameterSize, then TPM2B_MAX_NV_BUFFER
	if len(body) < 6 {
		return nil, fmt.Errorf("read NV index 0x%x: short response", index)
	}
	n := int(binary.BigEndian.Uint16(body[4:]))
	if len(body) < 6+n {
		return nil, fmt.Errorf("read NV index 0x%x: short response", index)
	}
	return body[6 : 6+n], nil
}
