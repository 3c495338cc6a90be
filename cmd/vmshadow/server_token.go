package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// stateDirFlags find the server's state directory: --state-dir, or the
// state_dir of the configuration file --config.
type stateDirFlags struct {
	config   string
	stateDir string
}

func (f *stateDirFlags) register(cmd *cobra.Command) {
	fs := cmd.PersistentFlags()
	fs.StringVar(&f.config, "config", config.DefaultPath, "the server's configuration file, whose state_dir holds the tokens")
	fs.StringVar(&f.stateDir, "state-dir", "", "the server's state directory (instead of reading --config)")
}

// dir returns the state directory.
func (f *stateDirFlags) dir(cmd *cobra.Command) (string, error) {
	if f.stateDir != "" {
		if cmd.Flags().Changed("config") {
			return "", errorf(errs.ErrUsage, "give --config or --state-dir, not both")
		}
		if !filepath.IsAbs(f.stateDir) {
			abs, err := filepath.Abs(f.stateDir)
			if err != nil {
				return "", err
			}
			return abs, nil
		}
		return f.stateDir, nil
	}
	cfg, err := config.Load(f.config)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("no server configuration at %s: give --config FILE or --state-dir DIR: %w", f.config, errs.ErrNotFound)
	}
	if err != nil {
		return "", err
	}
	return cfg.StateDir, nil
}

// open opens the server's database; unless create, a state directory
// without one is an error (a mistyped --state-dir must not start an empty
// database).
func (f *stateDirFlags) open(cmd *cobra.Command, create bool) (*state.DB, error) {
	dir, err := f.dir(cmd)
	if err != nil {
		return nil, err
	}
	if !create {
		if _, err := os.Stat(filepath.Join(dir, state.FileName)); errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("no server database %s in %s: is it the server's state_dir? (create a token first with 'vmshadow server token create'): %w", state.FileName, dir, errs.ErrNotFound)
		}
	}
	return state.Open(cmd.Context(), dir)
}

// newServerTokenCmd is 'vmshadow server token': the API tokens of the
// server. The server command adds it.
func newServerTokenCmd(a *app) *cobra.Command {
	var sf stateDirFlags
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Create, list and revoke the API tokens of vmshadow server",
		Long: `Manage the API tokens of vmshadow server, kept (as SHA-256 hashes, never the
token itself) in the server's state directory: the state_dir of --config
(default ` + config.DefaultPath + `), or --state-dir. Run it as the user the
server runs as. A running server sees a change at once.

Roles: viewer reads everything; operator also runs jobs, cancels runs,
enables and disables job schedules, restores and starts instant restores;
admin also creates, edits and deletes jobs and deletes backups.
docs/api.md lists what each endpoint needs.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	sf.register(cmd)
	cmd.AddCommand(newTokenCreateCmd(a, &sf), newTokenListCmd(a, &sf), newTokenRevokeCmd(a, &sf))
	return cmd
}

func newTokenCreateCmd(a *app, sf *stateDirFlags) *cobra.Command {
	var name, role string
	cmd := &cobra.Command{
		Use:   "create --name NAME --role admin|operator|viewer",
		Short: "Create an API token and print it (once)",
		Long: `Create an API token and print it: the token alone on standard output (the
warning to store it goes to standard error), or with --json in the summary's
"token". It is shown this once: the server keeps only its hash. Names are
1-64 printable ASCII characters without spaces, and a name stays taken after
its token is revoked, so that the server's logs stay unambiguous.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			db, err := sf.open(cmd, true)
			if err != nil {
				return err
			}
			defer db.Close()
			secret, err := db.CreateToken(cmd.Context(), name, role, time.Now())
			if err != nil {
				return err
			}
			out := struct {
				Name  string `json:"name"`
				Role  string `json:"role"`
				Token string `json:"token"`
			}{name, role, secret}
			if !a.out.JSON {
				a.out.Warn("token %s (role %s) created: store it now, it is not shown again", name, role)
			}
			a.out.Summary(out, func(w io.Writer) { fmt.Fprintln(w, secret) })
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "the token's name (shown in the server's logs and 'token list')")
	cmd.Flags().StringVar(&role, "role", "", "admin, operator or viewer")
	cmd.MarkFlagRequired("name")
	cmd.MarkFlagRequired("role")
	return cmd
}

func newTokenListCmd(a *app, sf *stateDirFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the API tokens (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			db, err := sf.open(cmd, false)
			if err != nil {
				return err
			}
			defer db.Close()
			toks, err := db.Tokens(cmd.Context())
			if err != nil {
				return err
			}
			a.out.Summary(struct {
				Tokens []state.Token `json:"tokens"`
			}{toks}, func(w io.Writer) {
				if len(toks) == 0 {
					fmt.Fprintln(w, "no tokens: create one with 'vmshadow server token create --name NAME --role ROLE'")
					return
				}
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tROLE\tCREATED\tLAST USED\tREVOKED")
				for _, t := range toks {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.Name, t.Role, localTime(t.Created), localTime(t.LastUsed), localTime(t.Revoked))
				}
				tw.Flush()
			})
			return nil
		},
	}
}

func localTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05")
}

func newTokenRevokeCmd(a *app, sf *stateDirFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "revoke NAME",
		Short: "Revoke an API token: it authenticates no more",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			db, err := sf.open(cmd, false)
			if err != nil {
				return err
			}
			defer db.Close()
			now := time.Now()
			if err := db.RevokeToken(cmd.Context(), args[0], now); err != nil {
				return err
			}
			a.out.Summary(struct {
				Name    string    `json:"name"`
				Revoked time.Time `json:"revoked"`
			}{args[0], now.UTC()}, func(w io.Writer) {
				fmt.Fprintf(w, "token %s revoked\n", args[0])
			})
			return nil
		},
	}
}
