package config

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// head is a valid beginning that the cases extend; it is 12 lines long, so
// a case's first own line is line 13.
const head = `listen:
  - address: unix:/run/vmshadow/api.sock
repositories:
  local:
    location: /srv/repo
    password_file: /etc/vmshadow/local.pass
  s3repo:
    location: s3:https://s3.example.net/bucket/prefix
    password_env: REPO_PW
connections:
  lab:
    type: qmp
`

func TestGoodConfigs(t *testing.T) {
	for _, c := range []struct{ name, yaml string }{
		{"minimal", "listen:\n  - address: unix:/run/vmshadow/api.sock\n"},
		{"head", head + "    sockets: [/run/qemu/*.qmp]\n"},
		{"manual job without schedule", head + `    sockets: [/run/qemu/*.qmp]
jobs:
  - name: adhoc
    type: backup
    repository: local
    vms: [{connection: lab}]
`},
		{"guest agent of a qmp connection", head + `    sockets: [/run/qemu/*.qmp]
    guest_agent: /run/qemu/{vm}.qga
jobs:
  - name: consistent
    type: backup
    repository: local
    vms: [{connection: lab}]
    writers: {guest_agent: true, guest_hooks: [/usr/sbin/flush], require: application}
`},
		{"consistency group", head + `    sockets: [/run/qemu/*.qmp]
jobs:
  - name: shop
    type: backup
    repository: local
    vms: [{connection: lab, vms: [db, app]}]
    group: shop
`},
		{"loopback ipv6 plain", "listen:\n  - address: tcp:[::1]:8080\n    plain_tcp: true\n"},
		{"notify to localhost, https with a port", "listen: [{address: unix:/a}]\nnotify:\n  - {url: \"http://localhost:9095/\", on: [cancelled, skipped], timeout: 5m}\n  - {url: \"https://alerts.example.net:8443\", secret_env: HOOK_SECRET, timeout: 1s}\n"},
		{"libvirt local", "listen: [{address: unix:/a}]\nconnections:\n  k:\n    type: libvirt\n    uri: qemu:///system\n"},
		{"seconds schedule", head + `    sockets: [/run/qemu/*.qmp]
jobs:
  - name: fast
    type: verify
    repository: local
    schedule: "*/10 * * * * *"
`},
	} {
		if _, err := Parse("server.yaml", []byte(c.yaml)); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
}

func TestBadConfigs(t *testing.T) {
	const qmp = "    sockets: [/run/qemu/*.qmp]\n"
	for _, c := range []struct {
		name string
		yaml string
		want []string // every error, exactly
	}{
		{"bad schedule names line and column", head + qmp + `jobs:
  - name: nightly
    type: backup
    repository: local
    vms: [{connection: lab}]
    schedule: "0 25 * * *"
`, []string{`server.yaml:19:15: jobs[0].schedule: "0 25 * * *": hour 25 out of range 0-23`}},
		{"password in the file", head + qmp + `  pool:
    type: xapi
    url: https://xen
    password: hunter2
`, []string{
			`server.yaml:15:5: connections.pool: no pool password: give password_file (a file readable only by the server) or password_env (the name of an environment variable)`,
			`server.yaml:17:5: connections.pool.password: a password is never written in the configuration file: put it in a file readable only by the server and name it with password_file, or name an environment variable with password_env`,
		}},
		{"password in a repository", `listen: [{address: "unix:/a"}]
repositories:
  r:
    location: /srv/r
    password: secret
`, []string{
			`server.yaml:4:5: repositories.r: no repository password: give password_file (a file readable only by the server) or password_env (the name of an environment variable)`,
			`server.yaml:5:5: repositories.r.password: a password is never written in the configuration file: put it in a file readable only by the server and name it with password_file, or name an environment variable with password_env`,
		}},
		{"all mistakes at once, in order", head + qmp + `jobs:
  - name: a
    type: backup
    repository: nosuch
    vms:
      - connection: ghost
    schedul: "@daily"
    concurrency: {per_job: 0}
  - name: a
    type: prune
    repository: local
    retention: {keep_daily: 7}
`, []string{
			`server.yaml:17:17: jobs[0].repository: repository "nosuch" is not defined under repositories (defined: local, s3repo)`,
			`server.yaml:19:21: jobs[0].vms[0].connection: connection "ghost" is not defined under connections (defined: lab)`,
			`server.yaml:20:5: jobs[0].schedul: unknown key "schedul"; valid keys here: catch_up, concurrency, enabled, from, full_every_days, grace, group, name, notify, random_delay, repository, retention, reverify_after_days, schedule, time_limit, timezone, to, type, vms, writers`,
			`server.yaml:21:28: jobs[0].concurrency.per_job: 0 out of range 1-64`,
			`server.yaml:22:5: jobs[1].name: job "a" is defined twice; job names must be unique`,
		}},
		{"plain tcp off loopback", `listen:
  - address: tcp:0.0.0.0:8080
    plain_tcp: true
`, []string{`server.yaml:3:16: listen[0].plain_tcp: plain TCP is allowed on a loopback address only (127.0.0.1, [::1], localhost), not "0.0.0.0": API tokens would cross the network in clear; give tls_cert and tls_key`}},
		{"tcp without tls", `listen:
  - address: tcp:127.0.0.1:8443
`, []string{`server.yaml:2:5: listen[0]: a tcp: address needs tls_cert and tls_key (PEM files), or plain_tcp: true on a loopback address`}},
		{"bad addresses", `listen:
  - address: tcp:host
  - address: udp:1.2.3.4:5
  - address: unix:relative.sock
  - address: tcp:127.0.0.1:70000
    plain_tcp: true
`, []string{
			`server.yaml:2:14: listen[0].address: "tcp:host": want tcp:HOST:PORT (tcp:0.0.0.0:8443, tcp:[::1]:8080)`,
			`server.yaml:3:14: listen[1].address: "udp:1.2.3.4:5": want tcp:HOST:PORT or unix:PATH`,
			`server.yaml:4:14: listen[2].address: "unix:relative.sock": the socket path must be absolute (unix:/run/vmshadow/api.sock)`,
			`server.yaml:5:14: listen[3].address: "tcp:127.0.0.1:70000": port "70000" out of range 1-65535`,
		}},
		{"no listen", "state_dir: var/lib\n", []string{
			`server.yaml:1:1: listen: missing: give at least one address (unix:/run/vmshadow/api.sock, or tcp:HOST:PORT with tls_cert and tls_key)`,
			`server.yaml:1:12: state_dir: "var/lib" is not an absolute path; write it from /`,
		}},
		{"bad timezone", "listen: [{address: unix:/a}]\ntimezone: Mars/Base\n", []string{
			`server.yaml:2:11: timezone: unknown time zone "Mars/Base": give an IANA name such as Europe/Berlin, or UTC`,
		}},
		{"repository locations and secrets", `listen: [{address: unix:/a}]
repositories:
  rel:
    location: backups/repo
    password_file: /p
  creds:
    location: s3:https://user:pw@host/bucket
    password_env: "my password"
  both:
    location: /srv/b
    password_file: /p
    password_env: PW
  "bad name!":
    location: /x
`, []string{
			`server.yaml:4:15: repositories.rel.location: "backups/repo": a directory must be an absolute path; an S3 location starts with s3:`,
			`server.yaml:7:5: repositories.creds: no repository password: give password_file (a file readable only by the server) or password_env (the name of an environment variable)`,
			`server.yaml:7:15: repositories.creds.location: credentials in the S3 repository URL are not accepted (they would be visible to every user of this host): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE`,
			`server.yaml:8:19: repositories.creds.password_env: "my password" is not an environment variable name (letters, digits and _; not the password itself)`,
			`server.yaml:10:5: repositories.both: both password_file and password_env: keep one`,
			`server.yaml:13:3: repositories: name "bad name!": use letters, digits, ., _ and - (at most 64, starting with a letter or digit)`,
		}},
		{"connections", `listen: [{address: unix:/a}]
connections:
  q:
    type: qmp
    sockets: [relative/*.qmp, "/run/[a.qmp"]
    url: https://x
  x:
    type: xapi
    url: http://xen
    password_env: XPW
  l:
    type: libvirt
    uri: "not a uri"
  l2:
    type: libvirt
    uri: qemu+ssh://host
  v:
    type: vmware
  n:
    sockets: [/a]
`, []string{
			`server.yaml:5:15: connections.q.sockets[0]: "relative/*.qmp" is not an absolute path`,
			`server.yaml:5:31: connections.q.sockets[1]: "/run/[a.qmp" is not a valid glob (syntax error in pattern)`,
			`server.yaml:6:10: connections.q.url: not a setting of a qmp connection`,
			`server.yaml:9:10: connections.x.url: plain http would send the password in clear: use https, or set insecure: true explicitly`,
			`server.yaml:13:10: connections.l.uri: "not a uri" is not a libvirt URI: want DRIVER[+TRANSPORT]://[USER@][HOST][:PORT]/PATH (qemu:///system, qemu+ssh://root@host/system)`,
			`server.yaml:16:10: connections.l2.uri: "qemu+ssh://host" names no path: add /system or /session`,
			`server.yaml:18:11: connections.v.type: "vmware": want qmp, xapi or libvirt`,
			`server.yaml:20:5: connections.n.type: missing: give qmp, xapi or libvirt`,
		}},
		{"guest agent writers", head + qmp + `    guest_agent: /run/qemu/agent.sock
  pool:
    type: xapi
    url: https://xen
    password_env: XEN_PASSWORD
    guest_agent: /a/{vm}
jobs:
  - name: a
    type: backup
    repository: local
    vms: [{connection: lab}, {connection: pool}]
    writers: {guest_agent: true}
  - name: b
    type: backup
    repository: local
    vms: [{connection: lab}]
    writers: {guest_hooks: [/usr/sbin/flush]}
`, []string{
			`server.yaml:14:18: connections.lab.guest_agent: "/run/qemu/agent.sock" does not contain {vm}: give each VM's guest agent socket as a path with {vm} for the VM's name (/run/qemu/{vm}.qga)`,
			`server.yaml:19:18: connections.pool.guest_agent: not a setting of a xapi connection`,
			`server.yaml:25:14: jobs[0].writers.guest_agent: connection "pool" is a XenServer pool, whose VMs run no QEMU guest agent: use hooks`,
			`server.yaml:30:14: jobs[1].writers.guest_hooks: guest hooks run through the guest agent: set guest_agent: true`,
		}},
		{"groups", head + qmp + `jobs:
  - name: g1
    type: backup
    repository: local
    vms: [{connection: lab}]
    group: "a group"
  - name: g2
    type: backup
    repository: local
    vms: [{connection: lab}]
    group: g2
    concurrency: {per_job: 2}
  - name: g3
    type: verify
    repository: local
    group: g3
  - name: g4
    type: backup
    repository: local
    vms: [{connection: lab}]
    writers: {guest_agent: true, guest_hooks: [/usr/sbin/flush]}
    group: g4
`, []string{
			`server.yaml:19:12: jobs[0].group: "a group" is not a group name: letters, digits, '.', '_' and '-', at most 64, starting with a letter or digit`,
			`server.yaml:25:18: jobs[1].concurrency: a group's VMs are backed up together, at one instant: concurrency does not apply to a job with a group`,
			`server.yaml:29:12: jobs[2].group: not a setting of a verify job`,
			`server.yaml:34:14: jobs[3].writers.guest_agent: connection "lab" has no guest_agent socket path: add guest_agent: /run/qemu/{vm}.qga (the path of each VM's agent socket) to it`,
			`server.yaml:35:12: jobs[3].group: guest hooks are for a job's VMs one by one; in a group, freeze the applications with hooks on this host, or the guests' own fsfreeze hooks`,
		}},
		{"job settings", head + qmp + `jobs:
  - name: b
    type: backup
    repository: local
    vms: []
    random_delay: forever
    time_limit: 30s
    full_every_days: sometimes
    writers: {require: perfect, hooks: [hook.sh]}
    retention: {keep_daily: -2}
    reverify_after_days: 3
  - name: c
    type: copy
    from: local
    to: local
    schedule: "@every 500ms"
  - name: v
    type: verify
    catch_up: true
  - type: restore
    name: "has space"
`, []string{
			`server.yaml:18:10: jobs[0].vms: empty: list at least one connection`,
			`server.yaml:19:19: jobs[0].random_delay: applies to scheduled jobs only: add a schedule or remove it`,
			`server.yaml:20:17: jobs[0].time_limit: 30s out of range 1m0s-7d`,
			`server.yaml:21:22: jobs[0].full_every_days: want a whole number from 1 to 3650, got "sometimes"`,
			`server.yaml:22:24: jobs[0].writers.require: "perfect": want filesystem or application`,
			`server.yaml:22:41: jobs[0].writers.hooks[0]: "hook.sh" is not an absolute path; write it from /`,
			`server.yaml:23:29: jobs[0].retention.keep_daily: -2 out of range -1-100000`,
			`server.yaml:24:26: jobs[0].reverify_after_days: not a setting of a backup job`,
			`server.yaml:28:9: jobs[1].to: the same repository as from: a copy needs two repositories`,
			`server.yaml:29:15: jobs[1].schedule: "@every 500ms": @every: 500ms is not a whole number of seconds of at least 1s`,
			`server.yaml:30:5: jobs[2].repository: missing: name a repository defined under repositories`,
			`server.yaml:32:15: jobs[2].catch_up: applies to scheduled jobs only: add a schedule or remove it`,
			`server.yaml:33:11: jobs[3].type: "restore": want backup, verify, prune, gc or copy`,
			`server.yaml:34:11: jobs[3].name: "has space": use letters, digits, ., _ and - (at most 64, starting with a letter or digit)`,
		}},
		{"s3_ca on a directory, user info in an xapi url", `listen: [{address: unix:/a}]
repositories:
  r:
    location: /srv/r
    password_file: /p
    s3_ca: /ca.pem
connections:
  x:
    type: xapi
    url: https://root@xen
    password_file: /p
`, []string{
			`server.yaml:4:5: repositories.r.s3_ca: s3_ca applies to S3 locations only`,
			`server.yaml:10:10: connections.x.url: user info in the URL is not accepted: use user and password_file`,
		}},
		{"job timezone and globs", head + qmp + `jobs:
  - name: c
    type: copy
    from: local
    to: s3repo
    vms: ["web[", ok]
    timezone: Nowhere/City
    schedule: "CRON_TZ=Bad/Zone 0 1 * * *"
`, []string{
			`server.yaml:19:11: jobs[0].vms[0]: "web[" is not a valid glob (syntax error in pattern)`,
			`server.yaml:20:15: jobs[0].timezone: unknown time zone "Nowhere/City": give an IANA name such as Europe/Berlin, or UTC`,
			`server.yaml:21:15: jobs[0].schedule: "CRON_TZ=Bad/Zone 0 1 * * *": unknown time zone "Bad/Zone": give an IANA name such as Europe/Berlin or UTC`,
		}},
		{"durations", head + qmp + `jobs:
  - name: g
    type: gc
    repository: local
    schedule: "@daily"
    random_delay: forever
    grace: -1h
    time_limit: 8d
`, []string{
			`server.yaml:19:19: jobs[0].random_delay: "forever" is not a duration (examples: 90s, 15m, 4h, 7d)`,
			`server.yaml:20:12: jobs[0].grace: "-1h" is not a duration (examples: 90s, 15m, 4h, 7d)`,
			`server.yaml:21:17: jobs[0].time_limit: 8d out of range 1m0s-7d`,
		}},
		{"prune without rules", head + qmp + `jobs:
  - name: p
    type: prune
    repository: local
    retention: {}
`, []string{`server.yaml:18:16: jobs[0].retention: keeps nothing: set at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly (-1 keeps all)`}},
		{"wrong shapes", `listen: unix:/a
jobs:
  name: x
`, []string{
			`server.yaml:1:9: listen: want a list (lines starting with -), got "unix:/a"`,
			`server.yaml:3:3: jobs: want a list (lines starting with -), got a mapping`,
		}},
		{"duplicate key", "listen: [{address: unix:/a}]\nlisten: [{address: unix:/b}]\n", []string{
			`server.yaml:2:1: listen: set twice; remove one`,
		}},
		{"aliases refused", "listen: &l [{address: unix:/a}]\nstate_dir: *l\n", []string{
			`server.yaml:1:9: YAML anchors and aliases (& and *) are not supported; write the values out`,
		}},
		{"tab", "listen: []\n\tstate_dir: /x\n", []string{
			`server.yaml:2: not valid YAML (at or just after this line): found character that cannot start any token`,
		}},
		{"syntax error", "listen:\n  - address: [unclosed\n", []string{
			`server.yaml:1: not valid YAML (at or just after this line): did not find expected ',' or ']'`,
		}},
		{"empty", "", []string{`server.yaml: the file is empty; see docs/server.yaml.sample`}},
		{"notify urls", `listen: [{address: unix:/a}]
notify:
  - url: http://alerts.example.net/hook
  - url: https://bot:pw@alerts.example.net/hook
  - url: "https://alerts.example.net/hook?token=abc"
  - url: "https://alerts.example.net/hook#x"
  - url: ftp://alerts.example.net/hook
  - url: /hook
  - url: https://a.example.net/hook
  - url: https://a.example.net/hook
  - url: http://127.0.0.1:9000/hook
    ca: /etc/ca.pem
  - secret_file: /s
`, []string{
			`server.yaml:3:10: notify[0].url: plain http is accepted to a loopback host only (127.0.0.1, [::1], localhost), not "alerts.example.net": the run's details would cross the network in clear; use https`,
			`server.yaml:4:10: notify[1].url: user info in the URL is not accepted (it would be logged and sent in clear to proxies): authenticate the deliveries with secret_file or secret_env (an HMAC signature)`,
			`server.yaml:5:10: notify[2].url: "https://alerts.example.net/hook?…": a query string is not accepted (it is where tokens hide, and URLs end up in logs): authenticate the deliveries with secret_file or secret_env (an HMAC signature)`,
			`server.yaml:6:10: notify[3].url: "https://alerts.example.net/hook#x": a #fragment is never sent to the server: remove it`,
			`server.yaml:7:10: notify[4].url: "ftp://alerts.example.net/hook": want https://HOST[:PORT]/PATH`,
			`server.yaml:8:10: notify[5].url: "/hook": want https://HOST[:PORT]/PATH`,
			`server.yaml:10:5: notify[7].url: https://a.example.net/… is already listed above: merge the two entries' on lists`,
			`server.yaml:12:9: notify[8].ca: ca applies to https URLs only`,
			`server.yaml:13:5: notify[9].url: missing: give the receiver's URL (https://HOST/PATH)`,
		}},
		{"notify settings", head + qmp + `notify: {url: https://a.example.net/}
jobs:
  - name: b
    type: verify
    repository: local
    notify:
      - url: https://hooks.example.net/x
        secret: s3cr3t
        secret_env: "HOOK SECRET"
        on: [failure, sucess, failure]
        timeout: 0s
        ca: ca.pem
        retries: 3
      - url: https://hooks2.example.net/x
        secret_file: /etc/vmshadow/hook.secret
        secret_env: HOOK_SECRET
        on: []
      - url: https://hooks3.example.net/x
        on: failure
`, []string{
			`server.yaml:14:9: notify: want a list (lines starting with -), got a mapping`,
			`server.yaml:21:9: jobs[0].notify[0].secret: a secret is never written in the configuration file: put it in a file readable only by the server and name it with secret_file, or name an environment variable with secret_env`,
			`server.yaml:22:21: jobs[0].notify[0].secret_env: "HOOK SECRET" is not an environment variable name (letters, digits and _; not the secret itself)`,
			`server.yaml:23:23: jobs[0].notify[0].on[1]: "sucess": want failure, success, interrupted, cancelled, skipped`,
			`server.yaml:23:31: jobs[0].notify[0].on[2]: "failure" listed twice`,
			`server.yaml:24:18: jobs[0].notify[0].timeout: 0s out of range 1s-5m0s`,
			`server.yaml:25:13: jobs[0].notify[0].ca: "ca.pem" is not an absolute path; write it from /`,
			`server.yaml:26:9: jobs[0].notify[0].retries: unknown key "retries"; valid keys here: ca, on, secret_env, secret_file, timeout, url`,
			`server.yaml:27:9: jobs[0].notify[1]: both secret_file and secret_env: keep one`,
			`server.yaml:30:13: jobs[0].notify[1].on: empty: list at least one of failure, success, interrupted, cancelled, skipped (or remove the webhook)`,
			`server.yaml:32:13: jobs[0].notify[2].on: want a list (lines starting with -), got "failure"`,
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("server.yaml", []byte(c.yaml))
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("error %v (%T), want Errors", err, err)
			}
			var got []string
			for _, e := range es {
				got = append(got, e.Error())
			}
			if strings.Join(got, "\n") != strings.Join(c.want, "\n") {
				t.Errorf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(c.want, "\n"))
			}
		})
	}
}

// No error ever repeats a secret: a password written in the file, or in a
// URL.
func TestErrorsHideSecrets(t *testing.T) {
	y := `listen: [{address: unix:/a}]
repositories:
  r:
    location: s3:https://AKIA:hunter2@host/bucket?X-Amz-Signature=hunter2
    password: hunter2
connections:
  x:
    type: xapi
    url: "https://root:hunter2@xen/?token=hunter2"
    password: hunter2
  l:
    type: libvirt
    uri: "qemu+ssh://root:hunter2@host/system"
notify:
  - url: "https://bot:hunter2@hooks.example.net/x"
  - url: "https://hooks.example.net/x?token=hunter2"
  - url: "http://hooks.example.net/x?token=hunter2"
  - url: "ftp://hooks.example.net/x?token=hunter2"
  - url: "https://hooks.example.net/x"
    secret: hunter2
`
	_, err := Parse("server.yaml", []byte(y))
	if err == nil {
		t.Fatal("accepted")
	}
	if strings.Contains(err.Error(), "hunter2") {
		t.Errorf("an error shows the secret:\n%v", err)
	}
	if n := strings.Count(err.Error(), "\n") + 1; n < 10 {
		t.Errorf("%d errors, want at least 10:\n%v", n, err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(head + "    sockets: [/run/qemu/*.qmp]\njobs:\n  - name: a\n    type: backup\n    repository: local\n    vms: [{connection: lab, vms: [a*]}]\n    schedule: \"0 2 * * *\"\n"))
	f.Add([]byte("listen: [{address: tcp:[::1]:1, plain_tcp: true}]\n"))
	f.Add([]byte("a: &x [*x]\n"))
	f.Add([]byte("listen: [{address: unix:/a}]\nnotify: [{url: \"https://h/p\", on: [failure], secret_env: S, timeout: 1m}]\njobs: [{name: x, type: gc, repository: r, notify: []}]\n"))
	f.Add([]byte("listen:\n- {address: unix:/a}\njobs: [{name: x, type: gc, repository: r, grace: 1d2h}]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse("f.yaml", data)
		if err == nil && cfg == nil {
			t.Fatal("no config and no error")
		}
		if err != nil {
			var es Errors
			if !errors.As(err, &es) || len(es) == 0 {
				t.Fatalf("error %v is not a non-empty Errors", err)
			}
		}
	})
}

// TestParseJob: a job given alone (the API's JSON) is validated against
// the configuration's repositories and connections.
func TestParseJob(t *testing.T) {
	cfg, err := Parse("server.yaml", []byte(head+"    sockets: [/run/qemu/*.qmp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	j, err := ParseJob(cfg, "request", []byte(`{"name": "api-nightly", "type": "backup", "repository": "local",
		"vms": [{"connection": "lab", "vms": ["db*"]}], "schedule": "@daily", "retention": {"keep_last": 3}}`))
	if err != nil {
		t.Fatal(err)
	}
	if j.Name != "api-nightly" || j.Repository != "local" || len(j.VMs) != 1 || j.VMs[0].Names[0] != "db*" || j.Retention.Last != 3 || j.Schedule.String() != "@daily" || !j.Enabled {
		t.Fatalf("job: %+v", j)
	}
	_, err = ParseJob(cfg, "request", []byte(`{"name": "x", "type": "backup", "repository": "nosuch", "vms": [{"connection": "lab"}], "extra": 1}`))
	want := `request:1:89: job.extra: unknown key "extra"`
	if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), `repository "nosuch" is not defined`) {
		t.Fatalf("bad job: %v, want %s", err, want)
	}
	if _, err := ParseJob(cfg, "request", []byte(`[1`)); err == nil {
		t.Fatal("malformed JSON accepted")
	}
}

// The top-level notify list applies to the jobs without a notify key; a
// job's own list replaces it, and notify: [] turns it off. Unset keys get
// their defaults.
func TestNotifyInheritance(t *testing.T) {
	y := head + `    sockets: [/run/qemu/*.qmp]
notify:
  - url: https://alerts.example.net/hooks/vmshadow
    secret_env: HOOK_SECRET
jobs:
  - {name: inherits, type: verify, repository: local}
  - name: own
    type: verify
    repository: local
    notify:
      - url: "http://[::1]:9000/hook"
        on: [success, skipped]
        timeout: 2m
      - url: https://hooks.example.net/x
        secret_file: /etc/vmshadow/hook.secret
        ca: /etc/vmshadow/hooks-ca.pem
  - {name: silent, type: verify, repository: local, notify: []}
`
	cfg, err := Parse("server.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Notify) != 1 {
		t.Fatalf("top-level notify: %+v", cfg.Notify)
	}
	top := cfg.Notify[0]
	if top.URL != "https://alerts.example.net/hooks/vmshadow" || top.Secret != (Secret{Env: "HOOK_SECRET"}) ||
		strings.Join(top.On, ",") != "failure,interrupted" || top.Timeout != 10*time.Second || top.CA != "" || top.Line != 15 {
		t.Errorf("top-level webhook with defaults: %+v", top)
	}
	if got := top.Redacted(); got != "https://alerts.example.net/…" {
		t.Errorf("redacted %q", got)
	}
	if !top.Wants(OnFailure) || !top.Wants(OnInterrupted) || top.Wants(OnSuccess) {
		t.Errorf("Wants with the default on: %v", top.On)
	}
	inherits, own, silent := cfg.Jobs[0], cfg.Jobs[1], cfg.Jobs[2]
	if len(inherits.Notify) != 1 || inherits.Notify[0].URL != top.URL {
		t.Errorf("inherits: %+v", inherits.Notify)
	}
	if len(own.Notify) != 2 {
		t.Fatalf("own: %+v", own.Notify)
	}
	if w := own.Notify[0]; w.URL != "http://[::1]:9000/hook" || strings.Join(w.On, ",") != "success,skipped" || w.Timeout != 2*time.Minute || w.Secret != (Secret{}) {
		t.Errorf("own[0]: %+v", w)
	}
	if w := own.Notify[1]; w.Secret.File != "/etc/vmshadow/hook.secret" || w.CA != "/etc/vmshadow/hooks-ca.pem" || w.Redacted() != "https://hooks.example.net/…" {
		t.Errorf("own[1]: %+v", w)
	}
	if silent.Notify == nil || len(silent.Notify) != 0 {
		t.Errorf("silent: %+v", silent.Notify)
	}
}
