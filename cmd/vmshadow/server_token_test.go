package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/report"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// tokenCmd runs 'vmshadow server token ARGS' in the process (the server
// command that holds it is the lead's) and returns stdout, stderr and
// the error.
func tokenCmd(t *testing.T, jsonOut bool, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	a := &app{jsonOut: jsonOut, out: report.New(jsonOut, &out, &errOut)}
	cmd := newServerTokenCmd(a)
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.ExecuteContext(context.Background())
	return out.String(), errOut.String(), err
}

// TestServerToken: tokens created, listed (never a secret), used and
// revoked against a real state database found through a real
// configuration file.
func TestServerToken(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	cfg := filepath.Join(dir, "server.yaml")
	if err := os.WriteFile(cfg, []byte("listen: [{address: unix:/run/vmshadow-test.sock}]\nstate_dir: "+stateDir+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// create --json through --config.
	out, _, err := tokenCmd(t, true, "create", "--config", cfg, "--name", "ci", "--role", "operator")
	if err != nil {
		t.Fatal(err)
	}
	var created struct{ MessageType, Name, Role, Token string }
	if err := json.Unmarshal([]byte(out), &created); err != nil {
		t.Fatalf("create --json printed %q: %v", out, err)
	}
	if created.Name != "ci" || created.Role != "operator" || !regexp.MustCompile(`^vmsh_[0-9a-f]{64}$`).MatchString(created.Token) {
		t.Fatalf("create --json = %+v", created)
	}

	// create in text through --state-dir: the token alone on stdout, the
	// warning on stderr.
	out, errOut, err := tokenCmd(t, false, "create", "--state-dir", stateDir, "--name", "grafana", "--role", "viewer")
	if err != nil {
		t.Fatal(err)
	}
	viewerSecret := strings.TrimSuffix(out, "\n")
	if !regexp.MustCompile(`^vmsh_[0-9a-f]{64}$`).MatchString(viewerSecret) {
		t.Errorf("create printed %q, want the token alone on a line", out)
	}
	if !strings.Contains(errOut, "store it now, it is not shown again") || strings.Contains(errOut, viewerSecret) {
		t.Errorf("create's stderr %q", errOut)
	}

	db, err := state.Open(context.Background(), stateDir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	tok, err := db.Authenticate(context.Background(), created.Token, time.Now())
	if err != nil || tok.Name != "ci" || tok.Role != state.Operator {
		t.Fatalf("the created token does not authenticate as ci/operator: %+v %v", tok, err)
	}

	// list: names and roles, never a secret.
	for _, j := range []bool{false, true} {
		out, _, err := tokenCmd(t, j, "list", "--config", cfg)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []string{created.Token, viewerSecret, created.Token[5:20]} {
			if strings.Contains(out, s) {
				t.Errorf("list (json %v) shows a secret: %s", j, out)
			}
		}
		if regexp.MustCompile(`[0-9a-f]{32}`).MatchString(out) {
			t.Errorf("list (json %v) shows something like a hash: %s", j, out)
		}
		if !strings.Contains(out, "ci") || !strings.Contains(out, "grafana") || !strings.Contains(out, "operator") {
			t.Errorf("list (json %v) = %s", j, out)
		}
	}

	// revoke: the token authenticates no more; list shows it revoked.
	if _, _, err := tokenCmd(t, false, "revoke", "--config", cfg, "ci"); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Authenticate(context.Background(), created.Token, time.Now()); !errors.Is(err, errs.ErrAuth) {
		t.Errorf("a revoked token authenticates: %v", err)
	}
	if _, err := db.Authenticate(context.Background(), viewerSecret, time.Now()); err != nil {
		t.Errorf("revoking ci revoked grafana too: %v", err)
	}
	out, _, _ = tokenCmd(t, true, "list", "--state-dir", stateDir)
	var listed struct{ Tokens []state.Token }
	json.Unmarshal([]byte(out), &listed)
	if len(listed.Tokens) != 2 || listed.Tokens[0].Name != "ci" || listed.Tokens[0].Revoked.IsZero() || !listed.Tokens[1].Revoked.IsZero() || listed.Tokens[1].LastUsed.IsZero() {
		t.Errorf("list after revoke = %+v, want ci revoked, grafana active and used", listed.Tokens)
	}

	// Mistakes: each named, with its exit code.
	empty := filepath.Join(dir, "empty")
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"revoke", "--state-dir", stateDir, "ci"}, 6, `no active token named "ci"`},
		{[]string{"create", "--state-dir", stateDir, "--name", "ci", "--role", "admin"}, 2, `a token named "ci" exists`},
		{[]string{"create", "--state-dir", stateDir, "--name", "x", "--role", "root"}, 2, `unknown role "root"`},
		{[]string{"create", "--state-dir", stateDir, "--name", "a b", "--role", "admin"}, 2, "invalid token name"},
		{[]string{"list", "--state-dir", empty}, 6, "no server database server.db in " + empty},
		{[]string{"list", "--config", filepath.Join(dir, "nope.yaml")}, 6, "no server configuration at " + filepath.Join(dir, "nope.yaml")},
		{[]string{"list", "--config", cfg, "--state-dir", stateDir}, 2, "not both"},
	} {
		_, _, err := tokenCmd(t, false, tc.args...)
		if err == nil || errs.ExitCode(err) != tc.code || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%q: %v (exit %d), want exit %d naming %q", tc.args, err, errs.ExitCode(err), tc.code, tc.msg)
		}
	}
	if _, err := os.Stat(empty); err == nil {
		t.Errorf("list created the state directory %s", empty)
	}
	// A bad configuration file is named with its line.
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("listen: [{address: unix:/a}]\nstate_dir: relative\n"), 0o600)
	if _, _, err := tokenCmd(t, false, "list", "--config", bad); err == nil || !strings.Contains(err.Error(), "bad.yaml:2") {
		t.Errorf("bad config: %v", err)
	}
}
