package grouptest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// Member is one VM of a restored group, in the workload's order.
type Member struct {
	Name  string // for messages
	Image string // the restored log disk, a raw image
}

// ReadLog returns the highest record of the log in the raw image at path,
// written by the VM at position vm (1-based): 0 for an empty log. Records
// must be contiguous from 1 (a gap is an error), each intact, numbered for
// its slot and written by that VM. Memory is bounded whatever the image size.
func ReadLog(path string, vm int) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("read the log of VM %d: %w", vm, err)
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 64<<10)
	slot := make([]byte, RecordSize)
	var last uint64 // highest record, contiguous from 1
	var end bool    // an empty slot was seen after record last
	for s := uint64(1); ; s++ {
		if _, err := io.ReadFull(r, slot); err != nil {
			if errors.Is(err, io.EOF) {
				return last, nil
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return 0, fmt.Errorf("log %s of VM %d: the image ends in the middle of slot %d: its size is not a multiple of %d", path, vm, s, RecordSize)
			}
			return 0, fmt.Errorf("read the log %s of VM %d: %w", path, vm, err)
		}
		n, who, empty, err := parseRecord(slot)
		switch {
		case empty:
			end = true
			continue
		case err != nil:
			return 0, fmt.Errorf("log %s of VM %d: slot %d (offset %d): %w", path, vm, s, Offset(s), err)
		case end:
			return 0, fmt.Errorf("log %s of VM %d: a gap: the records end at %d, but slot %d holds record %d", path, vm, last, s, n)
		case n != s:
			return 0, fmt.Errorf("log %s of VM %d: slot %d holds record %d", path, vm, s, n)
		case who != vm:
			return 0, fmt.Errorf("log %s of VM %d: record %d was written for VM %d (images given in the wrong order?)", path, vm, n, who)
		}
		last = n
	}
}

// Result is what Check read: each member's highest record, in order.
type Result struct {
	Members []Member
	Max     []uint64
}

func (r Result) String() string {
	var b strings.Builder
	for i, m := range r.Members {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s=%d", m.Name, r.Max[i])
	}
	return b.String()
}

// InvariantError says which pair of VMs breaks the cross-VM invariant: the
// restored group is not one instant of the workload.
type InvariantError struct {
	Result
	// Earlier and Later are the positions (0-based) of the pair: either
	// Later = Earlier+1 and Later's log is ahead of Earlier's, or Earlier is
	// the last VM and Later the first, and the first VM's log is more than
	// one record ahead of the last's.
	Earlier, Later int
}

func (e *InvariantError) Error() string {
	a, b := e.Members[e.Earlier], e.Members[e.Later]
	ma, mb := e.Max[e.Earlier], e.Max[e.Later]
	if e.Later > e.Earlier {
		return fmt.Sprintf("the cut is not one instant: VM %d (%s) holds record %d, which VM %d (%s) before it lacks (its log ends at %d), though %s's write of %d came only after %s's [%s]",
			e.Later+1, b.Name, mb, e.Earlier+1, a.Name, ma, b.Name, mb, a.Name, e.Result)
	}
	return fmt.Sprintf("the cut is not one instant: VM %d (%s) holds record %d, written only after VM %d (%s) wrote record %d, which %s's log lacks (it ends at %d) [%s]",
		e.Later+1, b.Name, mb, e.Earlier+1, a.Name, mb-1, a.Name, ma, e.Result)
}

// Check reads the members' logs (see ReadLog) and checks the cross-VM
// invariant. It returns an *InvariantError when the logs are intact but do
// not come from one instant, and another error when a log is damaged.
func Check(members []Member) (Result, error) {
	res := Result{Members: members}
	if len(members) == 0 {
		return res, errors.New("check a group: no members")
	}
	for i, m := range members {
		max, err := ReadLog(m.Image, i+1)
		if err != nil {
			return res, fmt.Errorf("%s: %w", m.Name, err)
		}
		res.Max = append(res.Max, max)
	}
	for k := 0; k+1 < len(members); k++ {
		if res.Max[k+1] > res.Max[k] {
			return res, &InvariantError{Result: res, Earlier: k, Later: k + 1}
		}
	}
	last := len(members) - 1
	if res.Max[0] > res.Max[last]+1 {
		return res, &InvariantError{Result: res, Earlier: last, Later: 0}
	}
	return res, nil
}
