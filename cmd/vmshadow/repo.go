package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/redact"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3"
	"github.com/vmshadow/vmshadow/internal/repo/storage"
)

func init() { commands = append(commands, newRepoCmd) }

// repoFlags are the flags every repository command takes.
type repoFlags struct {
	dir           string // a directory or an s3: URL
	passwordFile  string
	s3CA          string
	s3Addressing  string
	s3Connections int
	// name and passwordEnv are set for the ends of a copy (--from, --to);
	// empty: --repo and $VMSHADOW_PASSWORD.
	name, passwordEnv, prompt string
}

func (f *repoFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.dir, "repo", "", "repository: a directory, or S3 storage as s3:https://host/bucket/prefix (credentials from $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY, or $AWS_PROFILE) (required)")
	cmd.Flags().StringVar(&f.passwordFile, "password-file", "", "read the repository password from this file (else $VMSHADOW_PASSWORD, else a terminal prompt)")
	cmd.Flags().StringVar(&f.s3CA, "s3-ca", "", "S3: PEM file of extra CA certificates to trust for https (else $VMSHADOW_S3_CA)")
	cmd.Flags().StringVar(&f.s3Addressing, "s3-addressing", "", "S3: bucket addressing, auto, path or virtual-host (else $VMSHADOW_S3_ADDRESSING, else auto: virtual-host for AWS, path for other stores)")
	intFlag(cmd.Flags(), &f.s3Connections, "s3-connections", 16, 1, 256, "S3: requests in flight at most")
	cmd.MarkFlagRequired("repo")
}

// registerEnd registers the flags of one end of a copy: the location as
// --NAME, the others with prefix (--PREFIXpassword-file, --PREFIXs3-ca...),
// the password from $passwordEnv.
func (f *repoFlags) registerEnd(cmd *cobra.Command, name, prefix, passwordEnv, what string) {
	f.name, f.passwordEnv, f.prompt = name, passwordEnv, strings.ToUpper(what[:1])+what[1:]+" repository password"
	cmd.Flags().StringVar(&f.dir, name, "", what+" repository: a directory, or S3 storage as s3:https://host/bucket/prefix (required)")
	cmd.Flags().StringVar(&f.passwordFile, prefix+"password-file", "", "read the "+what+" repository's password from this file (else $"+passwordEnv+", else a terminal prompt)")
	cmd.Flags().StringVar(&f.s3CA, prefix+"s3-ca", "", "S3 "+what+": PEM file of extra CA certificates to trust for https (else $VMSHADOW_S3_CA)")
	cmd.Flags().StringVar(&f.s3Addressing, prefix+"s3-addressing", "", "S3 "+what+": bucket addressing, auto, path or virtual-host (else $VMSHADOW_S3_ADDRESSING, else auto)")
	intFlag(cmd.Flags(), &f.s3Connections, prefix+"s3-connections", 16, 1, 256, "S3 "+what+": requests in flight at most")
	cmd.MarkFlagRequired(name)
}

// flagName is the flag that names the repository: repo, from or to.
func (f *repoFlags) flagName() string { return cmp.Or(f.name, "repo") }

// location is --repo as it may be shown: an s3: URL without user info,
// query or fragment.
func (f *repoFlags) location() string {
	if s3.IsURL(f.dir) {
		return redact.URL(f.dir)
	}
	return f.dir
}

func (f *repoFlags) password(confirm bool) func() ([]byte, error) {
	return passwordSource(cmp.Or(f.passwordEnv, "VMSHADOW_PASSWORD"), f.passwordFile, cmp.Or(f.prompt, "Repository password"), confirm)
}

// backend opens (or, for repo init, creates) the storage --repo names: a
// local directory, or S3-compatible object storage for an s3: URL.
func (f *repoFlags) backend(ctx context.Context, create bool) (backend.Backend, error) {
	if !storage.IsS3(f.dir) {
		if err := checkRepoDir(f.flagName(), f.dir); err != nil {
			return nil, err
		}
	}
	return storage.Open(ctx, f.dir, storage.Options{CAFile: f.s3CA, Addressing: f.s3Addressing, Connections: f.s3Connections, Create: create})
}

// check refuses a --repo that cannot name a repository, without
// touching the storage.
func (f *repoFlags) check() error {
	if s3.IsURL(f.dir) {
		_, err := s3.ParseURL(f.dir)
		return err
	}
	return checkRepoDir(f.flagName(), f.dir)
}

// checkRepoDir refuses a --repo (or --flag) path that cannot be a
// repository directory: empty, a file, or below a file.
func checkRepoDir(flag, dir string) error {
	st, err := os.Stat(dir)
	switch {
	case dir == "":
		return errorf(errs.ErrUsage, "--%s is empty: give a repository directory or an s3: URL", flag)
	case err == nil && !st.IsDir():
		return errorf(errs.ErrUsage, "--%s %s is not a directory: give a repository directory or an s3: URL", flag, dir)
	case errors.Is(err, syscall.ENOTDIR):
		return errorf(errs.ErrUsage, "--%s %s: a part of the path is a file, not a directory", flag, dir)
	}
	return nil
}

// open opens the repository.
func (f *repoFlags) open(ctx context.Context) (*repo.Repo, error) {
	be, err := f.backend(ctx, false)
	if err != nil {
		return nil, err
	}
	r, err := repo.Open(ctx, be, f.password(false))
	if err != nil {
		be.Close()
		return nil, err
	}
	return r, nil
}

// lock takes a repository lock for op. A shared lock on read-only storage
// is skipped with a warning, so backups on read-only media can be listed,
// verified and restored. Call the returned unlock when done.
func lock(ctx context.Context, a *app, r *repo.Repo, exclusive bool, op string) (context.Context, func(), error) {
	l, lctx, err := r.Lock(ctx, exclusive, op)
	if err != nil {
		if !exclusive && errors.Is(err, backend.ErrReadOnly) {
			a.out.Warn("repository is read-only: reading it without a lock")
			return ctx, func() {}, nil
		}
		return nil, nil, err
	}
	return lctx, func() {
		if err := l.Unlock(); err != nil {
			a.out.Warn("could not remove the repository lock (it becomes stale by itself): %v", err)
		}
	}, nil
}

// progressStatus is the JSON status object of a running operation.
type progressStatus struct {
	Phase string `json:"phase"`
	progress.Snapshot
}

// showProgress reports meter every second: NDJSON status objects with
// --json, a self-overwriting line on a terminal, nothing otherwise.
func showProgress(ctx context.Context, a *app, phase string, m *progress.Meter) (stop func()) {
	if a.out.JSON {
		return progress.Report(ctx, m, time.Second, func(s progress.Snapshot) {
			a.out.Status(progressStatus{phase, s}, "")
		})
	}
	f := terminal(a)
	if f == nil {
		return func() {}
	}
	stopReport := progress.Report(ctx, m, 500*time.Millisecond, func(s progress.Snapshot) {
		fmt.Fprintf(f, "\r\033[K%s: %s", phase, progress.Line(s))
	})
	return func() {
		stopReport()
		fmt.Fprint(f, "\r\033[K")
	}
}

// terminal returns the printer's stderr when it is a terminal, else nil.
func terminal(a *app) *os.File {
	if f, ok := a.out.ErrOut.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return f
	}
	return nil
}

// tick calls fn every interval until stopped; it is how commands without a
// byte meter report progress.
func tick(ctx context.Context, interval time.Duration, fn func()) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				fn()
			}
		}
	}()
	return func() { cancel(); <-done }
}

func newRepoCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "repo",
		Short: "Create a backup repository, change its password or show its statistics",
	}
	cmd.AddCommand(newRepoInitCmd(a), newRepoPasswdCmd(a), newRepoStatsCmd(a))
	return cmd
}

func newRepoInitCmd(a *app) *cobra.Command {
	var f repoFlags
	var encryption string
	var chunkSize int
	cmd := &cobra.Command{
		Use:   "init --repo DIR|s3:URL [--encryption aes-256-gcm|none]",
		Short: "Create a new, empty backup repository",
		Long: `Create a new, empty backup repository in DIR, or on S3-compatible object
storage: --repo s3:https://host/bucket/prefix (s3:http://... without TLS).
The bucket is created if it does not exist; the prefix must be empty.
S3 credentials come from $AWS_ACCESS_KEY_ID, $AWS_SECRET_ACCESS_KEY (and
$AWS_SESSION_TOKEN), or $AWS_PROFILE with ~/.aws/credentials or ~/.aws/config,
never from the command line.

The repository is encrypted with AES-256-GCM under random master keys, which
are wrapped with a key derived from the password by Argon2id. The password is
read from $VMSHADOW_PASSWORD, from --password-file, or from the terminal.
With --encryption none nothing is encrypted and no password is needed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if err := f.check(); err != nil { // before asking for a password
				return err
			}
			opts := repo.InitOptions{Encryption: encryption, ChunkSize: chunkSize}
			switch encryption {
			case repo.EncryptionAESGCM:
				pw, err := f.password(true)()
				if err != nil {
					return err
				}
				opts.Password = pw
			case repo.EncryptionNone:
			default:
				return errorf(errs.ErrUsage, "unknown --encryption %q (use %s or %s)", encryption, repo.EncryptionAESGCM, repo.EncryptionNone)
			}
			be, err := f.backend(ctx, true)
			if err != nil {
				return err
			}
			r, err := repo.Init(ctx, be, opts)
			if err != nil {
				return err
			}
			defer r.Close()
			c := r.Config()
			a.out.Summary(struct {
				Repository string `json:"repository"`
				ID         string `json:"id"`
				Version    int    `json:"version"`
				Encryption string `json:"encryption"`
				ChunkSize  int    `json:"chunk_size"`
			}{f.location(), c.ID, c.Version, c.Encryption, c.ChunkSize}, func(w io.Writer) {
				fmt.Fprintf(w, "created repository %s at %s (encryption %s, chunk size %s)\n", c.ID[:8], f.location(), c.Encryption, progress.Bytes(int64(c.ChunkSize)))
			})
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&encryption, "encryption", repo.EncryptionAESGCM, "aes-256-gcm or none")
	intFlag(cmd.Flags(), &chunkSize, "chunk-size", repo.DefaultChunkSize, repo.MinChunkSize, repo.MaxChunkSize, "chunk size in bytes, a power of two from 64 KiB to 64 MiB", func(n int) error {
		if n&(n-1) != 0 {
			return fmt.Errorf("not a power of two")
		}
		return nil
	})
	return cmd
}

func newRepoPasswdCmd(a *app) *cobra.Command {
	var f repoFlags
	var newFile string
	cmd := &cobra.Command{
		Use:   "passwd --repo DIR|s3:URL",
		Short: "Change the repository password (the keys are re-wrapped, no data is rewritten)",
		Long: `Change the repository password. The current password comes from
$VMSHADOW_PASSWORD, --password-file or the terminal; the new one from
$VMSHADOW_NEW_PASSWORD, --new-password-file or the terminal (asked twice).
A new key file is written and synced, then every other key file is removed
(a repository has one password: afterwards only the new one opens it).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := f.open(ctx)
			if err != nil {
				return err
			}
			defer r.Close()
			if !r.Config().Encrypted() {
				return errorf(errs.ErrUsage, "repository %s is not encrypted: it has no password", f.location())
			}
			newPW, err := passwordSource("VMSHADOW_NEW_PASSWORD", newFile, "New repository password", true)()
			if err != nil {
				return err
			}
			ctx, unlock, err := lock(ctx, a, r, true, "passwd")
			if err != nil {
				return err
			}
			defer unlock()
			name, err := r.ChangePassword(ctx, newPW, nil)
			if err != nil {
				return err
			}
			a.out.Summary(struct {
				Repository string `json:"repository"`
				KeyID      string `json:"key_id"`
			}{f.location(), name}, func(w io.Writer) { fmt.Fprintf(w, "password changed (new key file %s)\n", name[:8]) })
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&newFile, "new-password-file", "", "read the new password from this file (else $VMSHADOW_NEW_PASSWORD, else a terminal prompt)")
	return cmd
}
