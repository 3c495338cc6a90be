package walcheck

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Result describes a log that passed the check.
type Result struct {
	// LastSeq is the sequence number of the last complete record (0: none).
	// The complete records are exactly 1..LastSeq.
	LastSeq uint64
	// Bytes is the length of the complete records.
	Bytes int64
	// Size is the length of the whole log.
	Size int64
	// TrailingPartial reports bytes after the last complete record: a prefix
	// of record LastSeq+1, possibly followed by zero bytes, up to the end.
	// A crash can leave one; an application-consistent image must not have
	// one. The caller decides.
	TrailingPartial bool
}

// TrailingBytes is the number of bytes after the last complete record.
func (r Result) TrailingBytes() int64 { return r.Size - r.Bytes }

// CorruptError says where and how a log is corrupt. It wraps errs.ErrCorrupt.
type CorruptError struct {
	Offset int64  // where the bad record starts
	Seq    uint64 // the sequence number expected there
	Reason string
}

func (e *CorruptError) Error() string {
	return fmt.Sprintf("log corrupt at offset %d (expected record %d): %s", e.Offset, e.Seq, e.Reason)
}

// Unwrap makes errors.Is(err, errs.ErrCorrupt) true.
func (e *CorruptError) Unwrap() error { return errs.ErrCorrupt }

// Check reads a whole log from r and checks every record against the record
// expected at its place. It returns a *CorruptError (wrapping errs.ErrCorrupt)
// for a bad record, and other errors for read failures. Memory use is bounded
// by the record size, whatever the log's length.
func Check(r io.Reader) (Result, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var res Result
	want := make([]byte, 0, HeaderSize+MaxPayload+TrailerSize)
	got := make([]byte, HeaderSize+MaxPayload+TrailerSize)
	for seq := uint64(1); ; seq++ {
		want = AppendRecord(want[:0], seq)
		n, err := io.ReadFull(br, got[:len(want)])
		if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
			return res, fmt.Errorf("read log at offset %d: %w", res.Bytes, err)
		}
		if n == len(want) && bytes.Equal(got[:n], want) {
			res.LastSeq = seq
			res.Bytes += int64(n)
			res.Size = res.Bytes
			continue
		}
		res.Size = res.Bytes + int64(n)
		if n == 0 {
			return res, nil
		}
		// Not the expected record: the tail of a write cut short (a prefix of
		// it, then possibly zeros up to the end), or corruption.
		k := commonPrefix(got[:n], want)
		if allZero(got[k:n]) {
			rest, zero, err := zerosToEnd(br)
			res.Size += rest
			if err != nil {
				return res, fmt.Errorf("read log at offset %d: %w", res.Size, err)
			}
			if zero {
				res.TrailingPartial = true
				return res, nil
			}
		}
		return res, &CorruptError{Offset: res.Bytes, Seq: seq, Reason: diagnose(got[:n], seq)}
	}
}

// CheckFile checks the log in the named file.
func CheckFile(path string) (Result, error) {
	f, err := os.Open(path)
	if err != nil {
		return Result{}, fmt.Errorf("open log: %w", err)
	}
	defer f.Close()
	res, err := Check(f)
	if err != nil {
		return res, fmt.Errorf("check %s: %w", path, err)
	}
	return res, nil
}

// diagnose says how got differs from record seq, for the error message.
func diagnose(got []byte, seq uint64) string {
	if len(got) < HeaderSize {
		return fmt.Sprintf("%d bytes at the end are not a prefix of record %d", len(got), seq)
	}
	if string(got[:4]) != Magic {
		return fmt.Sprintf("bad magic %q", got[:4])
	}
	gotSeq := binary.LittleEndian.Uint64(got[4:12])
	gotLen := int(binary.LittleEndian.Uint32(got[12:16]))
	if gotSeq != seq {
		return fmt.Sprintf("sequence gap: found record %d", gotSeq)
	}
	if gotLen != PayloadLen(seq) {
		return fmt.Sprintf("payload length %d, want %d", gotLen, PayloadLen(seq))
	}
	end := HeaderSize + gotLen + TrailerSize
	if len(got) < end {
		return "record cut short and followed by non-zero bytes"
	}
	stored := binary.LittleEndian.Uint32(got[end-TrailerSize : end])
	if crc32.Checksum(got[:end-TrailerSize], castagnoli) != stored {
		return "CRC-32C mismatch"
	}
	return "checksum matches but the payload is not the one written for this sequence number"
}

func commonPrefix(a, b []byte) int {
	n := 0
	for n < len(a) && n < len(b) && a[n] == b[n] {
		n++
	}
	return n
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// zerosToEnd reads r to its end and reports how many bytes it read and
// whether they were all zero. It stops at the first non-zero byte.
func zerosToEnd(r io.Reader) (int64, bool, error) {
	buf := make([]byte, 32<<10)
	var total int64
	for {
		n, err := r.Read(buf)
		total += int64(n)
		if !allZero(buf[:n]) {
			return total, false, nil
		}
		if errors.Is(err, io.EOF) {
			return total, true, nil
		}
		if err != nil {
			return total, false, err
		}
	}
}
