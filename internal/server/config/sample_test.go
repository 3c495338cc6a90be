package config

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// The documented sample parses, and its values arrive where the server
// will read them.
func TestSampleValidates(t *testing.T) {
	cfg, err := Load("../../../docs/server.yaml.sample")
	if err != nil {
		t.Fatalf("the sample configuration is invalid:\n%v", err)
	}
	if len(cfg.Listen) != 3 || cfg.Listen[0].Network != "unix" || cfg.Listen[1].TLSKey != "/etc/vmshadow/tls/server.key" || !cfg.Listen[2].PlainTCP {
		t.Errorf("listen: %+v", cfg.Listen)
	}
	if cfg.StateDir != "/var/lib/vmshadow" || cfg.Timezone.String() != "Europe/Berlin" {
		t.Errorf("state_dir %q timezone %s", cfg.StateDir, cfg.Timezone)
	}
	if r := cfg.Repositories["offsite"]; r == nil || r.Password.Env != "VMSHADOW_OFFSITE_PASSWORD" || r.Password.File != "" {
		t.Errorf("offsite repository: %+v", r)
	}
	if c := cfg.Connections["pool1"]; c == nil || c.Type != XAPI || c.User != "root" || c.Password.File != "/etc/vmshadow/pool1.pass" {
		t.Errorf("pool1: %+v", c)
	}
	if c := cfg.Connections["kvm2"]; c == nil || c.URI != "qemu+ssh://root@kvm2.example.net/system" {
		t.Errorf("kvm2: %+v", c)
	}
	if len(cfg.Jobs) != 7 {
		t.Fatalf("%d jobs, want 7", len(cfg.Jobs))
	}
	j := cfg.Jobs[0]
	if j.Name != "nightly" || j.Type != Backup || j.Repository != "local" || j.RandomDelay != 15*time.Minute || !j.CatchUp ||
		j.FullEveryDays != 30 || j.PerJob != 4 || j.PerHost != 2 || j.TimeLimit != 6*time.Hour || j.Require != "filesystem" ||
		len(j.Hooks) != 1 || j.Retention.Daily != 7 || j.Retention.Last != 3 || !j.Enabled {
		t.Errorf("nightly: %+v", j)
	}
	if len(j.VMs) != 2 || len(j.VMs[0].Names) != 0 || strings.Join(j.VMs[1].Names, ",") != "web-*,db1" {
		t.Errorf("nightly vms: %+v", j.VMs)
	}
	// 01:30 Berlin time is 00:30 UTC in winter.
	if next := j.Schedule.Next(time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)); !next.Equal(time.Date(2026, 12, 3, 0, 30, 0, 0, time.UTC)) {
		t.Errorf("nightly next run %s", next)
	}
	if len(cfg.Notify) != 1 || cfg.Notify[0].Secret.File != "/etc/vmshadow/webhook.secret" || strings.Join(cfg.Notify[0].On, ",") != "failure,interrupted" {
		t.Errorf("top-level notify: %+v", cfg.Notify)
	}
	if len(j.Notify) != 2 || strings.Join(j.Notify[0].On, ",") != "failure,interrupted,cancelled,success" ||
		j.Notify[1].URL != "http://127.0.0.1:9095/vmshadow" || j.Notify[1].Timeout != 5*time.Second || j.Notify[1].Secret != (Secret{}) {
		t.Errorf("nightly notify: %+v", j.Notify)
	}
	if j := cfg.Jobs[1]; j.Schedule.Every() != 15*time.Minute || j.FullEveryDays != 0 || j.Notify == nil || len(j.Notify) != 0 {
		t.Errorf("frequent-db: %+v", j)
	}
	if j := cfg.Jobs[2]; j.ReverifyAfterDays != 30 || len(j.Notify) != 1 || j.Notify[0].URL != cfg.Notify[0].URL {
		t.Errorf("verify: %+v", j)
	}
	if j := cfg.Jobs[3]; j.Retention.Monthly != -1 || j.Retention.Location.String() != "Europe/Berlin" {
		t.Errorf("prune: %+v", j)
	}
	if j := cfg.Jobs[4]; j.Grace != 24*time.Hour || j.Schedule.Location().String() != "UTC" {
		t.Errorf("gc: %+v", j)
	}
	if j := cfg.Jobs[5]; j.From != "local" || j.To != "offsite" || j.Enabled || j.Schedule.Location().String() != "America/New_York" {
		t.Errorf("copy: %+v", j)
	}
	if j := cfg.Jobs[6]; j.Group != "shop" || len(j.VMs) != 1 || len(j.VMs[0].Names) != 2 || !j.GuestAgent {
		t.Errorf("group job: %+v", j)
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Errorf("missing file: %v", err)
	}
	big := filepath.Join(dir, "big.yaml")
	if err := os.WriteFile(big, make([]byte, maxFileSize+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("big file: %v", err)
	}
	bad := filepath.Join(dir, "server.yaml")
	if err := os.WriteFile(bad, []byte("listen:\n  - address: unix:/a.sock\nstat_dir: /x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(bad)
	if err == nil || err.Error() != `server.yaml:3:1: stat_dir: unknown key "stat_dir"; valid keys here: connections, jobs, listen, notify, repositories, state_dir, timezone` {
		t.Errorf("typo: %v", err)
	}
	if !errors.Is(err, errs.ErrUsage) {
		t.Errorf("a bad configuration is not a usage error: %v", err)
	}
}

// TestSpecRoundTrip: every job of the sample, written as the API shows it
// (Spec), parses back to the same settings (a group job carries group and
// no concurrency, which a group refuses).
func TestSpecRoundTrip(t *testing.T) {
	cfg, err := Load("../../../docs/server.yaml.sample")
	if err != nil {
		t.Fatal(err)
	}
	for _, j := range cfg.Jobs {
		spec, err := json.Marshal(j.Spec())
		if err != nil {
			t.Fatal(err)
		}
		back, err := ParseJob(cfg, "job", spec)
		if err != nil {
			t.Errorf("job %s: its spec %s does not parse: %v", j.Name, spec, err)
			continue
		}
		again, _ := json.Marshal(back.Spec())
		if string(again) != string(spec) {
			t.Errorf("job %s: spec %s parsed back as %s", j.Name, spec, again)
		}
	}
}
