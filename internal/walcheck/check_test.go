package walcheck

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// logOf returns records first..last.
func logOf(first, last uint64) []byte {
	var b []byte
	for s := first; s <= last; s++ {
		b = AppendRecord(b, s)
	}
	return b
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func TestRecordFormat(t *testing.T) {
	r := AppendRecord(nil, 7)
	if len(r) != RecordLen(7) || string(r[:4]) != Magic {
		t.Fatalf("record 7: %d bytes, magic %q", len(r), r[:4])
	}
	if seq := binary.LittleEndian.Uint64(r[4:12]); seq != 7 {
		t.Errorf("seq field %d", seq)
	}
	if n := binary.LittleEndian.Uint32(r[12:16]); int(n) != PayloadLen(7) {
		t.Errorf("length field %d, want %d", n, PayloadLen(7))
	}
	crc := binary.LittleEndian.Uint32(r[len(r)-4:])
	if crc != crc32.Checksum(r[:len(r)-4], crc32.MakeTable(crc32.Castagnoli)) {
		t.Error("CRC field is not CRC-32C of the rest")
	}
	if !bytes.Equal(r, AppendRecord(nil, 7)) {
		t.Error("record not deterministic")
	}
	lens := map[int]bool{}
	for s := uint64(1); s <= 200; s++ {
		n := PayloadLen(s)
		if n < MinPayload || n > MaxPayload {
			t.Fatalf("payload length %d of record %d out of range", n, s)
		}
		lens[n] = true
	}
	if len(lens) < 100 {
		t.Errorf("payload lengths hardly vary: %d distinct in 200 records", len(lens))
	}
}

func TestCheck(t *testing.T) {
	good := logOf(1, 100)
	end50 := int64(len(logOf(1, 50)))
	rec51 := AppendRecord(nil, 51)
	flipped := bytes.Clone(good)
	flipped[end50+HeaderSize+3] ^= 0x10 // a payload bit of record 51
	flippedLast := bytes.Clone(good)
	flippedLast[len(good)-10] ^= 1 // inside the last record: still corrupt, not torn
	badMagic := bytes.Clone(good)
	badMagic[end50] = 'X'
	// A hole of zeros in the middle (lost write) followed by good records.
	hole := bytes.Clone(good)
	copy(hole[end50:], make([]byte, len(rec51)))

	tests := []struct {
		name     string
		log      []byte
		last     uint64
		partial  bool
		bytes    int64
		corrupt  string // substring of the error; "" for none
		corrupAt int64
	}{
		{name: "empty", log: nil},
		{name: "good", log: good, last: 100, bytes: int64(len(good))},
		{name: "torn tail", log: cat(logOf(1, 50), rec51[:17]), last: 50, partial: true, bytes: end50},
		{name: "torn in header", log: cat(logOf(1, 50), rec51[:3]), last: 50, partial: true, bytes: end50},
		{name: "torn then zeros", log: cat(logOf(1, 50), rec51[:40], make([]byte, 4096)), last: 50, partial: true, bytes: end50},
		{name: "zero tail", log: cat(logOf(1, 50), make([]byte, 100)), last: 50, partial: true, bytes: end50},
		{name: "zero block longer than a record", log: cat(logOf(1, 50), make([]byte, 8192)), last: 50, partial: true, bytes: end50},
		{name: "flipped bit", log: flipped, last: 50, corrupt: "CRC-32C mismatch", corrupAt: end50},
		{name: "flipped bit in last record", log: flippedLast, last: 99, corrupt: "CRC-32C mismatch", corrupAt: int64(len(logOf(1, 99)))},
		{name: "gap", log: cat(logOf(1, 50), logOf(52, 60)), last: 50, corrupt: "sequence gap: found record 52", corrupAt: end50},
		{name: "duplicate", log: cat(logOf(1, 50), logOf(50, 60)), last: 50, corrupt: "sequence gap: found record 50", corrupAt: end50},
		{name: "not starting at 1", log: logOf(2, 10), corrupt: "sequence gap: found record 2"},
		{name: "bad magic", log: badMagic, last: 50, corrupt: "bad magic", corrupAt: end50},
		{name: "hole then records", log: hole, last: 50, corrupt: "bad magic", corrupAt: end50},
		{name: "garbage tail", log: cat(logOf(1, 50), []byte("garbage")), last: 50, corrupt: "not a prefix", corrupAt: end50},
		{name: "torn then garbage", log: cat(logOf(1, 50), rec51[:30], []byte{0, 0, 1}), last: 50, corrupt: "cut short", corrupAt: end50},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res, err := Check(bytes.NewReader(tc.log))
			if res.LastSeq != tc.last {
				t.Errorf("LastSeq %d, want %d", res.LastSeq, tc.last)
			}
			if tc.corrupt != "" {
				var ce *CorruptError
				if !errors.As(err, &ce) || !errors.Is(err, errs.ErrCorrupt) {
					t.Fatalf("err = %v, want a CorruptError", err)
				}
				if !strings.Contains(ce.Reason, tc.corrupt) || ce.Offset != tc.corrupAt || ce.Seq != tc.last+1 {
					t.Errorf("err = %v; want %q at offset %d, record %d", err, tc.corrupt, tc.corrupAt, tc.last+1)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if res.TrailingPartial != tc.partial || res.Bytes != tc.bytes || res.Size != int64(len(tc.log)) {
				t.Errorf("got %+v, want partial %v, bytes %d, size %d", res, tc.partial, tc.bytes, len(tc.log))
			}
			if res.TrailingBytes() != int64(len(tc.log))-tc.bytes {
				t.Errorf("TrailingBytes %d", res.TrailingBytes())
			}
		})
	}
}

// oneByteReader returns one byte per Read, to exercise short reads.
type oneByteReader struct{ b []byte }

func (r *oneByteReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	p[0] = r.b[0]
	r.b = r.b[1:]
	return 1, nil
}

func TestCheckShortReads(t *testing.T) {
	log := cat(logOf(1, 20), AppendRecord(nil, 21)[:9], make([]byte, 50))
	res, err := Check(&oneByteReader{log})
	if err != nil || res.LastSeq != 20 || !res.TrailingPartial || res.Size != int64(len(log)) {
		t.Fatalf("got %+v, %v", res, err)
	}
}

func TestCheckFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "wal.log")
	if err := os.WriteFile(p, logOf(1, 3), 0o644); err != nil {
		t.Fatal(err)
	}
	if res, err := CheckFile(p); err != nil || res.LastSeq != 3 {
		t.Fatalf("got %+v, %v", res, err)
	}
	if _, err := CheckFile(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// FuzzCheck: no input makes Check panic, and what it accepts is exactly
// records 1..LastSeq followed by a prefix of the next one and zeros.
//
// The input describes a log instead of being one, so that it stays a few
// bytes long: valid records are up to a KiB each, and Go's minimizer is
// quadratic in the input length (fuzzing raw logs spent whole runs
// minimizing, at about one counted execution a second). See fuzzLog.
func FuzzCheck(f *testing.F) {
	f.Add([]byte{3})                          // three records
	f.Add([]byte{2, 10, 0})                   // two, then 10 bytes of the third
	f.Add([]byte{2, 10, 0, 0, 0, 0, 0, 0, 0}) // a torn third record, then zeros
	f.Add([]byte{3, 0, 0, 100, 0, 0x40})      // byte 100 corrupted
	f.Add([]byte{0, 0, 0, 0, 0, 0, 'W', 'A', 'L', 'R'})
	f.Add(make([]byte, 46))
	f.Fuzz(func(t *testing.T, in []byte) {
		b := fuzzLog(in)
		res, err := Check(bytes.NewReader(b))
		if err != nil {
			var ce *CorruptError
			if !errors.As(err, &ce) {
				t.Fatalf("non-corruption error on in-memory input: %v", err)
			}
			return
		}
		good := logOf(1, res.LastSeq)
		if !bytes.HasPrefix(b, good) || res.Bytes != int64(len(good)) || res.Size != int64(len(b)) {
			t.Fatalf("accepted %d bytes as %+v", len(b), res)
		}
		if res.TrailingPartial != (len(b) > len(good)) {
			t.Fatalf("TrailingPartial %v with %d trailing bytes", res.TrailingPartial, len(b)-len(good))
		}
	})
}

// fuzzLog builds the log an input of FuzzCheck describes: in[0]%8 valid
// records from 1; then the first in[1:3] bytes (little endian, modulo its
// length) of the next record, a torn write; byte in[3:5] (modulo the
// length) xored with in[5]; then in[6:] as it is.
func fuzzLog(in []byte) []byte {
	var h [6]byte
	copy(h[:], in)
	n := uint64(h[0] % 8)
	b := logOf(1, n)
	next := AppendRecord(nil, n+1)
	b = append(b, next[:int(binary.LittleEndian.Uint16(h[1:3]))%len(next)]...)
	if h[5] != 0 && len(b) > 0 {
		b[int(binary.LittleEndian.Uint16(h[3:5]))%len(b)] ^= h[5]
	}
	if len(in) > 6 {
		b = append(b, in[6:]...)
	}
	return b
}
