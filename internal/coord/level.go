package coord

import (
	"fmt"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// Level is how consistent a snapshot set is, from weakest to strongest.
type Level int

const (
	// Crash: the disks as after a power cut; no writer froze.
	Crash Level = iota
	// Filesystem: the guest's file systems were frozen (guest agent).
	Filesystem
	// Application: application writers (hooks) flushed and held their I/O
	// too, and the file systems were frozen where an agent was asked to.
	Application
)

var levelNames = []string{"crash", "filesystem", "application"}

func (l Level) String() string {
	if l < 0 || int(l) >= len(levelNames) {
		return fmt.Sprintf("level(%d)", int(l))
	}
	return levelNames[l]
}

// ParseLevel parses "crash", "filesystem" or "application".
func ParseLevel(s string) (Level, error) {
	for i, n := range levelNames {
		if s == n {
			return Level(i), nil
		}
	}
	return 0, fmt.Errorf("unknown consistency level %q (want crash, filesystem or application): %w", s, errs.ErrUsage)
}

// MarshalText makes a Level a JSON string.
func (l Level) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// UnmarshalText parses a Level from JSON.
func (l *Level) UnmarshalText(b []byte) error {
	v, err := ParseLevel(string(b))
	if err != nil {
		return err
	}
	*l = v
	return nil
}
