// Command demo is vmshadow's main job end to end, run by "make demo": it
// boots a throwaway Linux guest (Debian kernel, busybox, the real qemu-ga)
// whose workload keeps appending checksummed records to a write-ahead log,
// takes a full and then an incremental application-consistent backup while
// it writes, restores both, checks them (e2fsck, the log complete and
// ending exactly at the application's consistency point), prints a report
// and cleans up. It drives the vmshadow binary as a user would.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/guestvm"
	"github.com/vmshadow/vmshadow/internal/walcheck"
)

func main() {
	bin := flag.String("vmshadow", "bin/vmshadow", "the vmshadow binary")
	keep := flag.Bool("keep", false, "keep the work directory")
	flag.Parse()
	if err := run(*bin, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

type summary map[string]any

func (s summary) num(k string) float64 { f, _ := s[k].(float64); return f }

// vmshadow runs the binary with --json and returns its summary.
func vmshadow(bin string, env []string, args ...string) (summary, error) {
	cmd := exec.Command(bin, append([]string{"--json"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	runErr := cmd.Run()
	var last summary
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var m summary
		if json.Unmarshal([]byte(line), &m) != nil {
			continue
		}
		switch m["message_type"] {
		case "error":
			return nil, fmt.Errorf("vmshadow %s: %v", args[0], m["message"])
		case "warning":
			fmt.Printf("    warning: %v\n", m["message"])
		case "summary":
			last = m
		}
	}
	if runErr != nil || last == nil {
		return nil, fmt.Errorf("vmshadow %s: %v", strings.Join(args, " "), runErr)
	}
	return last, nil
}

func step(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func mib(v float64) string { return fmt.Sprintf("%.1f MiB", v/(1<<20)) }

func run(bin string, keep bool) error {
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("%s: %w (run 'make build')", bin, err)
	}
	bin, _ = filepath.Abs(bin)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	work, err := os.MkdirTemp("", "vmshadow-demo-")
	if err != nil {
		return err
	}
	if keep {
		fmt.Println("work directory:", work)
	} else {
		defer os.RemoveAll(work)
	}
	env := []string{"VMSHADOW_STATE_DIR=" + filepath.Join(work, "state"), "VMSHADOW_PASSWORD=demo-password-not-secret"}

	step("building the test guest from Debian packages (cached after the first run)")
	g, err := guestvm.Build(ctx)
	if err != nil {
		return err
	}
	disk := filepath.Join(work, "data.qcow2")
	if err := guestvm.MakeDataDisk(ctx, disk, 512<<20, "qcow2"); err != nil {
		return err
	}
	step("booting the guest: qemu-ga, and walapp appending records to /data/wal.log")
	vm, err := guestvm.Start(ctx, g, guestvm.Options{Dir: work, DataDisks: []guestvm.Disk{{Path: disk, Format: "qcow2"}},
		KernelArgs: []string{"vmshadow.nohook=1"}})
	if err != nil {
		return err
	}
	defer vm.Kill()
	fmt.Printf("    guest up in %s (%s), QMP %s, agent %s\n", vm.BootTime.Round(time.Millisecond), vm.Accel, vm.QMPSocket, vm.AgentSocket)
	status := func() (guestvm.Status, error) {
		c, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		return vm.Status(c)
	}
	waitRecords := func(after uint64) (uint64, error) {
		for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			st, err := status()
			if err != nil {
				return 0, err
			}
			if st.Seq > after && st.State == "running" {
				return st.Seq, nil
			}
		}
		return 0, errors.New("the workload stopped writing")
	}
	seq, err := waitRecords(50)
	if err != nil {
		return err
	}

	repo := filepath.Join(work, "repo")
	step("creating an encrypted repository")
	if _, err := vmshadow(bin, env, "repo", "init", "--repo", repo); err != nil {
		return err
	}
	backupArgs := []string{"backup", "--repo", repo, "--vm", "demo-guest", "--qmp", vm.QMPSocket, "--qga", vm.AgentSocket,
		"--guest-hook", "/etc/qemu/fsfreeze-hook", "--require", "application"}
	type done struct {
		sum     summary
		seqThen uint64
		lastSeq uint64
	}
	var backups []done
	for i, what := range []string{"full", "incremental"} {
		step("%s backup while the workload writes (record %d)", what, seq)
		sum, err := vmshadow(bin, env, backupArgs...)
		if err != nil {
			return err
		}
		backups = append(backups, done{sum: sum, seqThen: seq})
		if seq, err = waitRecords(seq + 50); err != nil {
			return fmt.Errorf("after backup %d: %w", i+1, err)
		}
		fmt.Printf("    the guest kept running: the workload is at record %d\n", seq)
	}

	for i := range backups {
		b := &backups[i]
		id := b.sum["backup_id"].(string)
		img := filepath.Join(work, fmt.Sprintf("restored-%d.raw", i))
		step("restoring backup %s and checking it", id[:8])
		if _, err := vmshadow(bin, env, "restore", "--repo", repo, id, "--to", img); err != nil {
			return err
		}
		fsck, err := walcheck.Fsck(ctx, img)
		if err != nil {
			return err
		}
		if !fsck.Clean {
			return fmt.Errorf("restored file system is not clean:\n%s", fsck.Output)
		}
		res, err := walcheck.CheckImage(ctx, img, "")
		if err != nil {
			return fmt.Errorf("the workload's log in backup %s: %w", id[:8], err)
		}
		cp, err := walcheck.ImageCheckpoint(ctx, img, "")
		if err != nil {
			return err
		}
		if res.TrailingPartial || cp != res.LastSeq {
			return fmt.Errorf("backup %s is not application-consistent: log ends at %d (torn tail: %v), consistency point %d", id[:8], res.LastSeq, res.TrailingPartial, cp)
		}
		b.lastSeq = res.LastSeq
		fmt.Printf("    e2fsck clean; log complete, records 1..%d, no torn record, ends at the application's consistency point\n", res.LastSeq)
	}
	if _, err := vmshadow(bin, env, "verify", "--repo", repo); err != nil {
		return err
	}

	fmt.Println()
	fmt.Println("vmshadow demo report")
	fmt.Printf("  VM %v: one 512 MiB qcow2 data disk (ext4), workload appending to a write-ahead log\n", backups[0].sum["vm"])
	fmt.Println("  read: bytes read from the shadow copy; stored: new bytes in the repository after dedup and compression")
	fmt.Printf("  %-9s %-12s %-12s %9s %11s %11s %8s %15s %12s\n", "backup", "mode", "consistency", "freeze", "read", "stored", "time", "disk rate", "log ends at")
	for _, b := range backups {
		s := b.sum
		fmt.Printf("  %-9s %-12v %-12v %6.0f ms %11s %11s %7.2fs %13s/s %12d\n", s["backup_id"].(string)[:8], s["mode"], s["consistency"],
			s.num("freeze_ms"), mib(s.num("bytes_read")), mib(s.num("bytes_new")), s.num("duration_s"), mib(s.num("rate_bytes_per_s")), b.lastSeq)
	}
	fmt.Println("  both restored images: e2fsck clean, log complete and consistent; repository verified")
	st, _ := status()
	fmt.Printf("  the guest ran throughout; its workload is now at record %d\n", st.Seq)
	return nil
}
