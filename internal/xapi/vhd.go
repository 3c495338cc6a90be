package xapi

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"iter"
	"net/http"
	"net/url"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// VHDAllocation is which blocks of a disk hold data, read from the block
// allocation table (BAT) at the head of a dynamic VHD: what GET
// /export_raw_vdi?format=vhd streams for a VDI (xapi's export_raw_vdi.ml
// runs vhd-tool, which sends the footer, the dynamic header and the BAT
// before any data block). A block the BAT does not allocate reads as zeros.
type VHDAllocation struct {
	Size      int64 // the disk's size (the footer's current size)
	BlockSize int64
	allocated []bool
}

// VHD layout (Microsoft's VHD specification, as ocaml-vhd writes it).
const (
	vhdFooterSize   = 512
	vhdHeaderSize   = 1024
	vhdDynamic      = 3
	vhdUnused       = 0xFFFFFFFF
	vhdMaxHeadBytes = 64 << 20 // the BAT must start within the stream's first 64 MiB
	vhdMaxEntries   = 1 << 22  // 4 Mi blocks: 8 TiB of 2 MiB blocks (XAPI's VHD limit is 2 TiB)
)

func vhdChecksum(b []byte, at int) uint32 {
	var sum uint32
	for i, x := range b {
		if i < at || i >= at+4 {
			sum += uint32(x)
		}
	}
	return ^sum
}

// ParseVHDAllocation reads the head of a VHD stream for a disk of size
// bytes: the footer copy, the dynamic header and the BAT, and nothing
// after the BAT. It accepts dynamic VHDs only (a differencing VHD's
// unallocated blocks come from its parent, not zeros). Memory is 1 byte
// per block of the disk (512 KiB per TiB with 2 MiB blocks).
func ParseVHDAllocation(r io.Reader, size int64) (*VHDAllocation, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("VHD stream: "+format+": %w", append(args, errs.ErrCorrupt)...)
	}
	var footer [vhdFooterSize]byte
	if _, err := io.ReadFull(r, footer[:]); err != nil {
		return nil, bad("footer: %v", err)
	}
	if !bytes.Equal(footer[:8], []byte("conectix")) {
		return nil, bad("no footer cookie")
	}
	if got, want := binary.BigEndian.Uint32(footer[64:]), vhdChecksum(footer[:], 64); got != want {
		return nil, bad("footer checksum %08x, computed %08x", got, want)
	}
	if t := binary.BigEndian.Uint32(footer[60:]); t != vhdDynamic {
		return nil, bad("disk type %d, want a dynamic VHD (3)", t)
	}
	current := binary.BigEndian.Uint64(footer[48:])
	if size >= 0 && current != uint64(size) {
		return nil, bad("disk size %d, the VDI has %d bytes", current, size)
	}
	headerOff := binary.BigEndian.Uint64(footer[16:])
	if headerOff < vhdFooterSize || headerOff > vhdMaxHeadBytes {
		return nil, bad("dynamic header at offset %d", headerOff)
	}
	pos := uint64(vhdFooterSize)
	skip := func(to uint64) error {
		n, err := io.CopyN(io.Discard, r, int64(to-pos))
		pos += uint64(n)
		return err
	}
	if err := skip(headerOff); err != nil {
		return nil, bad("before the dynamic header: %v", err)
	}
	var header [vhdHeaderSize]byte
	if _, err := io.ReadFull(r, header[:]); err != nil {
		return nil, bad("dynamic header: %v", err)
	}
	pos += vhdHeaderSize
	if !bytes.Equal(header[:8], []byte("cxsparse")) {
		return nil, bad("no dynamic header cookie")
	}
	if got, want := binary.BigEndian.Uint32(header[36:]), vhdChecksum(header[:], 36); got != want {
		return nil, bad("dynamic header checksum %08x, computed %08x", got, want)
	}
	batOff := binary.BigEndian.Uint64(header[16:])
	entries := uint64(binary.BigEndian.Uint32(header[28:]))
	block := uint64(binary.BigEndian.Uint32(header[32:]))
	if block < 512 || block&(block-1) != 0 {
		return nil, bad("block size %d", block)
	}
	if entries > vhdMaxEntries || entries*block < current {
		return nil, bad("%d blocks of %d bytes for a %d-byte disk", entries, block, current)
	}
	if batOff < pos || batOff > vhdMaxHeadBytes {
		return nil, bad("block allocation table at offset %d", batOff)
	}
	if err := skip(batOff); err != nil {
		return nil, bad("before the block allocation table: %v", err)
	}
	blocks := (current + block - 1) / block
	a := &VHDAllocation{Size: int64(current), BlockSize: int64(block), allocated: make([]bool, blocks)}
	var buf [4096]byte
	for i := uint64(0); i < blocks; {
		n := min(uint64(len(buf))/4, blocks-i)
		if _, err := io.ReadFull(r, buf[:4*n]); err != nil {
			return nil, bad("block allocation table: %v", err)
		}
		for j := range n {
			a.allocated[i+j] = binary.BigEndian.Uint32(buf[4*j:]) != vhdUnused
		}
		i += n
	}
	return a, nil
}

// Allocated reports the bytes of the disk in allocated blocks.
func (a *VHDAllocation) Allocated() int64 {
	var n int64
	for r := range a.Runs() {
		if r.Changed {
			n += r.Len
		}
	}
	return n
}

// Runs yields the disk as ranges, Changed meaning "allocated", in order.
func (a *VHDAllocation) Runs() iter.Seq[Run] {
	return func(yield func(Run) bool) {
		var cur Run
		for i, al := range a.allocated {
			off := int64(i) * a.BlockSize
			n := min(a.BlockSize, a.Size-off)
			if cur.Len > 0 && cur.Changed == al {
				cur.Len += n
				continue
			}
			if cur.Len > 0 && !yield(cur) {
				return
			}
			cur = Run{Off: off, Len: n, Changed: al}
		}
		if cur.Len > 0 {
			yield(cur)
		}
	}
}

// ExportVHDAllocation asks the pool for the VDI as a VHD stream
// (GET /export_raw_vdi?format=vhd) and reads only its head, the block
// allocation table, then drops the connection. A redirect to the host that
// holds the VDI's SR (xapi answers 302 when the master cannot see a local
// SR) is followed once. vdi is the VDI's reference or UUID.
func (c *Client) ExportVHDAllocation(ctx context.Context, vdi string, size int64) (*VHDAllocation, error) {
	u := *c.base
	u.Path = "/export_raw_vdi"
	u.RawQuery = url.Values{"session_id": {c.session}, "vdi": {vdi}, "format": {"vhd"}}.Encode()
	for hop := 0; ; hop++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return nil, fmt.Errorf("XAPI %s: export_raw_vdi: %s", u.Host, c.redact(err.Error()))
		}
		req.Header.Set("User-Agent", Originator)
		resp, err := c.http.Do(req)
		if err != nil {
			return nil, c.transportError(ctx, "GET /export_raw_vdi", err)
		}
		if resp.StatusCode >= 300 && resp.StatusCode < 400 && hop == 0 {
			loc, err := url.Parse(resp.Header.Get("Location"))
			resp.Body.Close()
			if err != nil || loc.Host == "" {
				return nil, fmt.Errorf("XAPI %s: GET /export_raw_vdi: redirect without a usable Location: %w", u.Host, errs.ErrConnect)
			}
			u.Host = loc.Host
			continue
		}
		defer resp.Body.Close() // before the end of the stream: the connection is dropped
		if resp.StatusCode != http.StatusOK {
			msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			return nil, fmt.Errorf("XAPI %s: GET /export_raw_vdi?format=vhd: HTTP %s: %s: %w", u.Host, resp.Status, c.redact(snippet(msg)), errs.ErrUnsupported)
		}
		a, err := ParseVHDAllocation(resp.Body, size)
		if err != nil {
			return nil, fmt.Errorf("XAPI %s: VDI exported as VHD: %w", u.Host, err)
		}
		return a, nil
	}
}
