package walcheck

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// LogPath is where walapp's log lies in the data disk's file system (the
// guest mounts the disk on /data and writes /data/wal.log).
const LogPath = "/wal.log"

// CheckImage extracts the log at path (LogPath if empty) from the raw ext4
// image file with debugfs, without mounting it, and checks it. The journal
// is not replayed: for an image that needs recovery (see Fsck) the log is
// the one of the last checkpoint.
func CheckImage(ctx context.Context, image, path string) (Result, error) {
	if path == "" {
		path = LogPath
	}
	dir, err := os.MkdirTemp("", "walcheck-")
	if err != nil {
		return Result{}, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "wal.log")
	if err := dump(ctx, image, path, out); err != nil {
		return Result{}, err
	}
	res, err := CheckFile(out)
	if err != nil {
		return res, fmt.Errorf("%s in %s: %w", path, image, err)
	}
	return res, nil
}

// CheckpointPath is where walapp records, each time it pauses for a freeze,
// the last record it made durable: the application's consistency point.
func CheckpointPath(logPath string) string { return logPath + ".checkpoint" }

// ImageCheckpoint reads the consistency point walapp recorded for the log
// at path (LogPath if empty) in a raw ext4 image; errs.ErrNotFound when it
// never paused.
func ImageCheckpoint(ctx context.Context, image, path string) (uint64, error) {
	if path == "" {
		path = LogPath
	}
	dir, err := os.MkdirTemp("", "walcheck-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "checkpoint")
	if err := dump(ctx, image, CheckpointPath(path), out); err != nil {
		return 0, err
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return 0, err
	}
	seq, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("checkpoint of %s in %s: %q: %w", path, image, b, errs.ErrCorrupt)
	}
	return seq, nil
}

// dump extracts the file at path from a raw ext4 image with debugfs.
func dump(ctx context.Context, image, path, out string) error {
	if err := checkRaw(image); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "debugfs", "-R", fmt.Sprintf("dump %q %q", path, out), image)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("debugfs not installed (package e2fsprogs): %w", err)
		}
		return fmt.Errorf("debugfs %s: %w: %s", image, err, strings.TrimSpace(stderr.String()))
	}
	// debugfs exits 0 even when it could not open the image or find the file.
	if _, err := os.Stat(out); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "not found") {
			return fmt.Errorf("%s not found in %s: %s: %w", path, image, msg, errs.ErrNotFound)
		}
		return fmt.Errorf("debugfs could not extract %s from %s: %s", path, image, msg)
	}
	return nil
}

// FsckResult is the outcome of a read-only e2fsck.
type FsckResult struct {
	Clean    bool   // e2fsck found nothing to fix
	ExitCode int    // e2fsck's exit code (0 clean, 4 errors left uncorrected, ...)
	Output   string // what e2fsck printed
	// NeedsRecovery: the journal holds transactions not yet written to their
	// place (an image taken without freezing). e2fsck -n does not replay them
	// and may then report errors that replaying would fix; see Recover.
	NeedsRecovery bool
}

// Fsck runs "e2fsck -fn" on the raw ext4 image: a full check that changes
// nothing. The error is for failing to run e2fsck, not for what it found.
func Fsck(ctx context.Context, image string) (FsckResult, error) {
	if err := checkRaw(image); err != nil {
		return FsckResult{}, err
	}
	cmd := exec.CommandContext(ctx, "e2fsck", "-fn", image)
	out, err := cmd.CombinedOutput()
	res := FsckResult{Output: string(out)}
	res.NeedsRecovery = strings.Contains(res.Output, "skipping journal recovery")
	var exit *exec.ExitError
	switch {
	case err == nil:
		res.Clean = true
	case errors.As(err, &exit) && exit.ExitCode() > 0 && exit.ExitCode() < 8:
		// 1..7: errors found (or corrected, which -n never does).
		res.ExitCode = exit.ExitCode()
	case errors.Is(err, exec.ErrNotFound):
		return res, fmt.Errorf("e2fsck not installed (package e2fsprogs): %w", err)
	default:
		return res, fmt.Errorf("e2fsck -fn %s: %w: %s", image, err, strings.TrimSpace(res.Output))
	}
	return res, nil
}

// Recover replays the journal of the raw ext4 image in place ("e2fsck -E
// journal_only -y"), as mounting it would. Use it on a copy you own, e.g. a
// restored crash-consistent image, before Fsck and CheckImage.
func Recover(ctx context.Context, image string) error {
	if err := checkRaw(image); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, "e2fsck", "-E", "journal_only", "-y", image).CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && exit.ExitCode() == 1) { // 1: fixed
		return fmt.Errorf("replay journal of %s: %w: %s", image, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// checkRaw refuses a missing image or a qcow2 image, which the e2fsprogs
// tools would misread as a damaged file system.
func checkRaw(image string) error {
	f, err := os.Open(image)
	if err != nil {
		return fmt.Errorf("open image: %w", err)
	}
	defer f.Close()
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err != nil {
		return fmt.Errorf("read image %s: %w", image, err)
	}
	if string(magic[:]) == "QFI\xfb" {
		return fmt.Errorf("%s is a qcow2 image; convert it to raw first (qemu-img convert -O raw): %w", image, errs.ErrUnsupported)
	}
	return nil
}
