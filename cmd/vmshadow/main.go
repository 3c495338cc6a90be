// Command vmshadow takes application-consistent snapshot sets of running
// virtual machines and keeps deduplicated, encrypted backups of them.
//
// This package is deliberately thin: one file per command parses flags and
// calls into internal/ packages, which do the work.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/report"
)

// version is set by the linker (-X main.version=...).
var version = "dev"

// app is what every command gets: the printer and global flags.
type app struct {
	jsonOut bool
	out     *report.Printer
}

// commands holds the constructors of the top-level commands; each command's
// file appends to it from an init function.
var commands []func(*app) *cobra.Command

func main() {
	// The first SIGINT or SIGTERM cancels the command, which then cleans
	// up (each wait on a peer bounded) and exits 130; a second one ends
	// the process at once, leaving what remains to 'vmshadow recover'.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	context.AfterFunc(ctx, stop)
	stopProfile := startProfile()
	code := run(ctx, os.Args[1:])
	stopProfile()
	stop()
	os.Exit(code)
}

// startProfile writes a CPU profile to $VMSHADOW_CPUPROFILE, for
// performance work (go tool pprof).
func startProfile() func() {
	path := os.Getenv("VMSHADOW_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmshadow: cpu profile:", err)
		return func() {}
	}
	pprof.StartCPUProfile(f)
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// run executes the command line and returns the process exit code.
func run(ctx context.Context, args []string) int {
	a := &app{out: report.New(false, os.Stdout, os.Stderr)}
	root := newRoot(a)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return 0
	}
	var ue usageError
	if errors.As(err, &ue) || isCobraUsage(err) {
		err = errorf(errs.ErrUsage, "%v (see 'vmshadow --help')", err)
	}
	if ctx.Err() != nil {
		err = errorf(errs.ErrInterrupted, "%v (interrupted)", err)
	}
	a.out.JSON = a.jsonOut || wantsJSON(args)
	a.out.Error(err)
	return errs.ExitCode(err)
}

func newRoot(a *app) *cobra.Command {
	root := &cobra.Command{
		Use:   "vmshadow",
		Short: "Consistent snapshot sets and deduplicated, encrypted backups of running VMs",
		Long: `vmshadow takes application-consistent, point-in-time snapshot sets of running
virtual machines and keeps incremental-forever, deduplicated, compressed and
encrypted backups of them.

Every command takes --json: it then prints newline-delimited JSON objects, each
with a "message_type" (status, warning, error, summary); the last one of a
successful command is the summary. Exit codes are listed by 'vmshadow exit-codes'.`,
		Version:           version,
		SilenceUsage:      true,
		SilenceErrors:     true,
		CompletionOptions: cobra.CompletionOptions{DisableDefaultCmd: true},
		PersistentPreRun: func(cmd *cobra.Command, args []string) {
			a.out.JSON = a.jsonOut
		},
	}
	root.PersistentFlags().BoolVar(&a.jsonOut, "json", false, "print newline-delimited JSON messages")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	for _, c := range commands {
		root.AddCommand(c(a))
	}
	return root
}

// wantsJSON reports whether --json is on the command line, for errors found
// before cobra parsed the flags.
func wantsJSON(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		if a == "--json" || a == "--json=true" {
			return true
		}
	}
	return false
}
