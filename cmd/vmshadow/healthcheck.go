package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/healthcheck"
	"github.com/vmshadow/vmshadow/internal/repo"
)

func init() { commands = append(commands, newHealthcheckCmd) }

// healthEntry is a backup's latest health check result, as `backups`
// shows it ("health" in --json).
type healthEntry struct {
	Result  string    `json:"result"`
	Time    time.Time `json:"time"`
	AnswerS float64   `json:"answer_s"`
	Reason  string    `json:"reason,omitempty"`
	Boot    string    `json:"boot,omitempty"`
	Accel   string    `json:"accel,omitempty"`
	Version string    `json:"version,omitempty"`
	Script  string    `json:"script,omitempty"`
	// ScriptExit is the script's exit code, when it ran to the end.
	ScriptExit *int `json:"script_exit,omitempty"`
	// LastPassed is when the backup last passed, if it ever did.
	LastPassed *time.Time `json:"last_passed,omitempty"`
}

func newHealthEntry(rec *repo.HealthRecord) *healthEntry {
	l := rec.Latest()
	if l == nil {
		return nil
	}
	e := &healthEntry{Result: l.Result, Time: l.Time, AnswerS: l.AnswerS, Reason: l.Reason, Boot: l.Boot,
		Accel: l.Accel, Version: l.Version, Script: l.Script, ScriptExit: l.ScriptExit}
	if p := rec.LastPassed(); p != nil {
		t := p.Time
		e.LastPassed = &t
	}
	return e
}

func newHealthcheckCmd(a *app) *cobra.Command {
	var f repoFlags
	var timeout time.Duration
	var script, tempDir string
	var cacheMiB int
	cmd := &cobra.Command{
		Use:   "healthcheck --repo DIR BACKUP_ID [--timeout 10m] [--script PATH]",
		Short: "Prove that a backup boots: start it in a throwaway VM and wait for its guest agent",
		Long: `healthcheck boots a backup in a throwaway QEMU VM and waits for the guest
agent (qemu-ga) to answer guest-ping; with --script it then runs that program
in the guest through the agent (guest-exec, no arguments) and wants exit code 0.

The VM's disks are the backup's, served from the repository through instant
restore (chunks read on demand, each checked against its hash) with a
writable overlay in a private temporary directory: the guest can write,
nothing reaches the repository. The VM has no network (-nic none), uses KVM
when /dev/kvm works (else TCG), and gets its hardware from the backup's
libvirt definition (memory, vCPUs, BIOS or UEFI with a copy of the stored
NVRAM, disk buses and boot order) or, without one, defaults: 1 GiB, 1 vCPU,
BIOS, every disk on virtio in the backup's order. It is stopped and
everything it used removed at the end.

The result (passed or failed, seconds to the agent's answer, the reason) is
recorded in the repository with the backup and shown by 'vmshadow backups'.
Exit codes: 0 passed; 5 the agent did not answer within --timeout (or the
guest stopped first; the reason quotes the serial console); 8 a damaged or
missing chunk was read (the VM is stopped at once); 1 the script failed.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if st, err := os.Stat(tempDir); err != nil || !st.IsDir() {
				return errorf(errs.ErrUsage, "--temp-dir %s is not an existing directory", tempDir)
			}
			// Shared: gc must not remove chunks while they are served.
			r, ctx, id, m, release, err := f.openBackup(ctx, a, "healthcheck", args[0])
			if err != nil {
				return err
			}
			defer release()
			out, runErr := healthcheck.Run(ctx, r, id, m, healthcheck.Options{Timeout: timeout, Script: script,
				TempDir: tempDir, CacheBytes: int64(cacheMiB) << 20, Version: version,
				Log: func(s string) {
					a.out.Status(struct {
						Message string `json:"message"`
					}{s}, s)
				},
				Warn: func(s string) { a.out.Warn("%s", s) }})
			if out == nil {
				return runErr
			}
			rec, err := r.AddHealth(ctx, id, out.Result)
			if err != nil {
				if runErr != nil {
					a.out.Warn("%v", runErr)
				}
				return fmt.Errorf("health check done (%s) but not recorded: %w", out.Result.Result, err)
			}
			res := out.Result
			summary := struct {
				BackupID     string       `json:"backup_id"`
				VM           string       `json:"vm"`
				Health       *healthEntry `json:"health"`
				Machine      string       `json:"machine"`
				Console      string       `json:"console,omitempty"`
				ScriptStdout string       `json:"script_stdout,omitempty"`
				ScriptStderr string       `json:"script_stderr,omitempty"`
			}{id.String(), m.VM, newHealthEntry(rec), out.Machine.Describe(), out.Console,
				string(out.ScriptStdout), string(out.ScriptStderr)}
			a.out.Summary(summary, func(w io.Writer) {
				fmt.Fprintf(w, "backup %s of %s: health check %s", id.Short(), m.VM, res.Result)
				if res.AnswerS > 0 {
					fmt.Fprintf(w, " (agent answered after %.1f s)", res.AnswerS)
				}
				fmt.Fprintf(w, "\n  booted: %s under %s\n  reason: %s\n", out.Machine.Describe(), res.Accel, res.Reason)
				if len(out.ScriptStdout) > 0 {
					fmt.Fprintf(w, "  script output:\n%s\n", out.ScriptStdout)
				}
				if len(out.ScriptStderr) > 0 {
					fmt.Fprintf(w, "  script errors:\n%s\n", out.ScriptStderr)
				}
			})
			return runErr
		},
	}
	f.register(cmd)
	durationFlag(cmd.Flags(), &timeout, "timeout", 10*time.Minute, time.Second, 24*time.Hour,
		"how long to wait for the guest agent's answer and the script together")
	cmd.Flags().StringVar(&script, "script", "", "a program in the guest to run through the agent once it answers; it must exit 0")
	cmd.Flags().StringVar(&tempDir, "temp-dir", os.TempDir(), "where the VM's private directory (overlays, sockets, console log) is made and removed")
	intFlag(cmd.Flags(), &cacheMiB, "cache", 64, 1, 65536, "MiB of decoded chunks to cache per disk")
	return cmd
}
