// Package walcheck owns the format of the test guest workload's write-ahead
// log (written by guest/walapp) and checks such a log, typically one taken out
// of a restored disk image: every record complete, uncorrupted and in sequence
// from 1, with at most a partial record at the end, which is reported, not
// judged (crash-consistent images may have one, application-consistent ones
// must not). It also runs e2fsck on images.
//
// A record is, little endian:
//
//	magic   [4]byte  "WALR"
//	seq     uint64   1, 2, 3, ...
//	length  uint32   payload length, MinPayload..MaxPayload
//	payload [length]byte = Payload(seq)
//	crc     uint32   CRC-32C (Castagnoli) of magic, seq, length and payload
//
// The payload is a pure function of seq, so the checker knows every byte a
// record must have and recognises a torn tail as a prefix of the expected
// next record.
package walcheck

import (
	"encoding/binary"
	"hash/crc32"
)

const (
	// Magic starts every record.
	Magic = "WALR"
	// HeaderSize is the size of magic, seq and length.
	HeaderSize = 16
	// TrailerSize is the size of the CRC after the payload.
	TrailerSize = 4
	// MinPayload and MaxPayload bound the payload length.
	MinPayload = 32
	MaxPayload = MinPayload + 1023
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// splitmix64 is a small, well-mixed generator; the payload depends on nothing
// but seq.
func splitmix64(x *uint64) uint64 {
	*x += 0x9e3779b97f4a7c15
	z := *x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// PayloadLen is the payload length of record seq.
func PayloadLen(seq uint64) int {
	s := seq
	return MinPayload + int(splitmix64(&s)%(MaxPayload-MinPayload+1))
}

// RecordLen is the encoded size of record seq.
func RecordLen(seq uint64) int { return HeaderSize + PayloadLen(seq) + TrailerSize }

// AppendRecord appends the encoding of record seq to dst.
func AppendRecord(dst []byte, seq uint64) []byte {
	start := len(dst)
	n := PayloadLen(seq)
	dst = append(dst, Magic...)
	dst = binary.LittleEndian.AppendUint64(dst, seq)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(n))
	s := seq ^ 0x5741_4c52 // "WALR": a different stream than the length's
	for i := 0; i < n; i += 8 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], splitmix64(&s))
		dst = append(dst, w[:min(8, n-i)]...)
	}
	return binary.LittleEndian.AppendUint32(dst, crc32.Checksum(dst[start:], castagnoli))
}
