// Package grouptest owns the proof harness of consistency groups (issue 17):
// a Workload that writes sequence numbers to a log on each of several VMs in
// turn (n to VM 1, then n to VM 2, ... then n to VM N, then n+1 to VM 1),
// the Targets it writes through (a real guest's qemu-ga, a second one of
// the workload's own that backups do not hold; QEMU's qemu-io for a VM
// without an OS), and Check, which reads the logs back from restored raw
// disk images and tests the cross-VM invariant a set taken at one instant
// keeps: for VMs in order 1..N,
//
//	max(1) >= max(2) >= ... >= max(N) >= max(1) - 1
//
// since a write to VM k+1 starts only once VM k's is done, and VM 1's n+1
// only once VM N's n is done. Backups of the VMs one after another break it.
//
// The log is a dedicated disk of each VM (no file system): record n is the
// RecordSize bytes at offset (n-1)*RecordSize, written as one direct,
// synchronous write. A checker reads it from a raw image without mounting.
package grouptest

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// RecordSize is the size of one log record: one sector, so that the guest
// writes it with a single direct I/O.
const RecordSize = 512

// magic starts every record.
const magic = "VSGRPLOG"

// Record layout (little endian):
//
//	0..8     magic "VSGRPLOG"
//	8..16    n, the sequence number (1, 2, ...)
//	16..20   the VM's position in the order (1-based)
//	20..508  filler: byte (n*31 + position) repeated, so that a record torn
//	         between an old and a new write fails its checksum
//	508..512 CRC-32C of bytes 0..508
const (
	offN      = 8
	offVM     = 16
	offFiller = 20
	offCRC    = RecordSize - 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record returns record n of the VM at position vm (1-based).
func Record(vm int, n uint64) []byte {
	b := make([]byte, RecordSize)
	copy(b, magic)
	binary.LittleEndian.PutUint64(b[offN:], n)
	binary.LittleEndian.PutUint32(b[offVM:], uint32(vm))
	fill := byte(n*31 + uint64(vm))
	for i := offFiller; i < offCRC; i++ {
		b[i] = fill
	}
	binary.LittleEndian.PutUint32(b[offCRC:], crc32.Checksum(b[:offCRC], castagnoli))
	return b
}

// Offset is where record n starts on the log disk.
func Offset(n uint64) int64 { return int64(n-1) * RecordSize }

// parseRecord decodes one slot: empty reports an all-zero slot; otherwise
// the record's n and VM position, or an error saying what is wrong with it.
func parseRecord(b []byte) (n uint64, vm int, empty bool, err error) {
	empty = true
	for _, c := range b {
		if c != 0 {
			empty = false
			break
		}
	}
	if empty {
		return 0, 0, true, nil
	}
	if string(b[:len(magic)]) != magic {
		return 0, 0, false, fmt.Errorf("no record magic (starts %x)", b[:16])
	}
	if got, want := binary.LittleEndian.Uint32(b[offCRC:]), crc32.Checksum(b[:offCRC], castagnoli); got != want {
		return 0, 0, false, fmt.Errorf("checksum %08x, computed %08x: a torn or corrupt record", got, want)
	}
	return binary.LittleEndian.Uint64(b[offN:]), int(binary.LittleEndian.Uint32(b[offVM:])), false, nil
}
