// Package config owns the YAML configuration file of the vmshadow server
// (default /etc/vmshadow/server.yaml): its listen addresses, state
// directory, repositories, hypervisor connections, jobs and the webhooks
// told when a job's run ends (notify). [Parse] reads
// and validates a file in one pass and returns every mistake at once, each
// naming the file, line and column, the setting and what to do:
//
//	server.yaml:14:5: jobs[1].schedule: "0 25 * * *": hour 25 out of range 0-23
//
// Unknown keys are errors (a typo must not be ignored), as are a password
// written in the file (passwords come from a file or an environment
// variable), references to undefined repositories or connections, and
// out-of-range numbers and durations. Schedules use the syntax of package
// schedule. docs/server-config.md is the reference of every key;
// docs/server.yaml.sample is a complete example that the tests validate.
package config

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/repo/backend/s3"
	"github.com/vmshadow/vmshadow/internal/repo/retention"
	"github.com/vmshadow/vmshadow/internal/schedule"
	"go.yaml.in/yaml/v3"
)

// DefaultPath is where the server looks for its configuration.
const DefaultPath = "/etc/vmshadow/server.yaml"

// DefaultStateDir is the state directory when state_dir is not set.
const DefaultStateDir = "/var/lib/vmshadow"

// maxFileSize bounds the configuration file read.
const maxFileSize = 1 << 20

// Config is a validated server configuration.
type Config struct {
	Listen       []Listen
	StateDir     string
	Timezone     *time.Location // default for schedules and retention
	Repositories map[string]*Repository
	Connections  map[string]*Connection
	Jobs         []*Job
	// Notify is the top-level notify list: the webhooks of every job
	// that has no notify key of its own.
	Notify []Webhook
}

// Listen is one address the API listens on.
type Listen struct {
	Address  string // as written: tcp:HOST:PORT or unix:PATH
	Network  string // "tcp" or "unix"
	Addr     string // HOST:PORT or PATH
	TLSCert  string
	TLSKey   string
	PlainTCP bool // no TLS: allowed only on loopback, explicitly
}

// Secret says where a password comes from: a file (its first line) or an
// environment variable. Exactly one is set.
type Secret struct {
	File string
	Env  string
}

// Read returns the secret: the file's first line, or the variable's
// value. Errors name the file or variable, never the secret.
func (s Secret) Read() ([]byte, error) {
	if s.Env != "" {
		v, ok := os.LookupEnv(s.Env)
		if !ok || v == "" {
			return nil, fmt.Errorf("environment variable %s is not set or empty: set it in the server's environment (a systemd unit: Environment= or EnvironmentFile=): %w", s.Env, errs.ErrUsage)
		}
		return []byte(v), nil
	}
	b, err := os.ReadFile(s.File)
	if err != nil {
		return nil, fmt.Errorf("read password file: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	line = strings.TrimSuffix(line, "\r")
	if line == "" {
		return nil, fmt.Errorf("password file %s: the first line is empty: %w", s.File, errs.ErrUsage)
	}
	return []byte(line), nil
}

// Repository is a named repository.
type Repository struct {
	Name     string
	Location string // a directory or an s3: URL
	Password Secret
	S3CA     string // PEM file of extra CA certificates (S3)
}

// Connection types.
const (
	QMP     = "qmp"
	XAPI    = "xapi"
	Libvirt = "libvirt"
)

// Connection is a named way to reach VMs.
type Connection struct {
	Name string
	Type string // QMP, XAPI or Libvirt
	// QMP: socket paths or globs; the VM is named after the socket file
	// without its extension.
	Sockets []string
	// XAPI: the pool master's URL, the user and the password.
	URL      string
	User     string
	Password Secret
	CA       string
	Insecure bool
	// libvirt: the connection URI.
	URI string
	// QMP: the guest agent socket of each VM, a path with {vm} standing
	// for the VM's name ("" when the VMs have none configured).
	GuestAgent string
}

// GuestAgentPath is vm's guest agent socket on a QMP connection ("" when
// none is configured).
func (c *Connection) GuestAgentPath(vm string) string {
	return strings.ReplaceAll(c.GuestAgent, "{vm}", vm)
}

// Job types.
const (
	Backup = "backup"
	Verify = "verify"
	Prune  = "prune"
	GC     = "gc"
	Copy   = "copy"
)

// Job is one scheduled job.
type Job struct {
	Name     string
	Type     string
	Line     int                // where the job starts in the file
	Schedule *schedule.Schedule // nil: runs only when started by hand
	// RandomDelay bounds the delay added to each run (schedule.Jitter).
	RandomDelay time.Duration
	// CatchUp runs the job once at start when a run was missed.
	CatchUp bool
	Enabled bool
	// TimeLimit cancels a run that takes longer (0: none).
	TimeLimit time.Duration

	Repository string // backup, verify, prune, gc

	// backup
	VMs        []VMSelector
	Hooks      []string // host hooks (--hook)
	GuestHooks []string // guest hooks (--guest-hook)
	// GuestAgent freezes the guest's file systems through its agent: a QMP
	// connection's guest_agent socket (--qga), libvirt's (--guest-agent).
	GuestAgent    bool
	Require       string // "", "filesystem" or "application" (--require)
	Retention     retention.Policy
	FullEveryDays int // 0: never a forced full backup
	PerJob        int // VMs backed up at once by this job
	PerHost       int // VMs backed up at once per hypervisor host
	// Group makes the job's VMs a consistency group of this name: each
	// run takes one snapshot set across all of them (PerJob and PerHost
	// do not apply), and retention keeps or removes group backups whole.
	Group string

	// verify
	ReverifyAfterDays int // 0: the whole repository every run

	// gc
	Grace time.Duration

	// copy
	From, To string
	CopyVMs  []string // names or globs; empty: every VM

	// Notify is where the job's ended runs are reported: its own notify
	// list, else the top-level one (an empty notify: [] turns that off).
	Notify []Webhook
}

// VMSelector picks VMs of one connection: the names or globs, or every VM
// when Names is empty.
type VMSelector struct {
	Connection string
	Names      []string
}

// Error is one mistake in the file.
type Error struct {
	File         string
	Line, Column int
	Key          string // the setting, as jobs[1].schedule
	Msg          string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
		if e.Column > 0 {
			fmt.Fprintf(&b, ":%d", e.Column)
		}
	}
	b.WriteString(": ")
	if e.Key != "" {
		b.WriteString(e.Key + ": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every mistake found, in file order.
type Errors []*Error

func (es Errors) Error() string {
	s := make([]string, len(es))
	for i, e := range es {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// Unwrap makes errors.Is(err, errs.ErrUsage) hold: a bad configuration is
// a usage error (exit code 2).
func (es Errors) Unwrap() error { return errs.ErrUsage }

// Load reads and validates the file at path.
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading the server configuration: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading the server configuration %s: %w", path, err)
	}
	if len(data) > maxFileSize {
		return nil, fmt.Errorf("server configuration %s is larger than %d bytes: %w", path, maxFileSize, errs.ErrUsage)
	}
	return Parse(filepath.Base(path), data)
}

// Parse validates data (the file named name, for messages) and returns the
// configuration, or an [Errors] listing every mistake.
func Parse(name string, data []byte) (*Config, error) {
	p := &parser{file: name}
	cfg := p.parse(data)
	if len(p.errs) > 0 {
		sort.SliceStable(p.errs, func(i, j int) bool {
			a, b := p.errs[i], p.errs[j]
			return a.Line < b.Line || a.Line == b.Line && a.Column < b.Column
		})
		return nil, p.errs
	}
	return cfg, nil
}

type parser struct {
	file string
	errs Errors
}

func (p *parser) errAt(n *yaml.Node, key, format string, a ...any) {
	e := &Error{File: p.file, Key: key, Msg: fmt.Sprintf(format, a...)}
	if n != nil {
		e.Line, e.Column = n.Line, n.Column
	}
	p.errs = append(p.errs, e)
}

// mapping walks a mapping node: each known key's handler gets its value;
// unknown and repeated keys are errors. It returns false if n is not a
// mapping.
func (p *parser) mapping(n *yaml.Node, path string, fields map[string]func(key, val *yaml.Node)) bool {
	if n.Kind != yaml.MappingNode {
		p.errAt(n, path, "want a mapping (key: value lines), got %s", kind(n))
		return false
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		name := k.Value
		kp := join(path, name)
		if k.Kind != yaml.ScalarNode {
			p.errAt(k, path, "a key must be a plain word")
			continue
		}
		if seen[name] {
			p.errAt(k, kp, "set twice; remove one")
			continue
		}
		seen[name] = true
		h, ok := fields[name]
		if !ok {
			if name == "secret" && fields["secret_file"] != nil {
				p.errAt(k, kp, "a secret is never written in the configuration file: put it in a file readable only by the server and name it with secret_file, or name an environment variable with secret_env")
				continue
			}
			if name == "password" {
				p.errAt(k, kp, "a password is never written in the configuration file: put it in a file readable only by the server and name it with password_file, or name an environment variable with password_env")
				continue
			}
			p.errAt(k, kp, "unknown key %q; valid keys here: %s", name, keyList(fields))
			continue
		}
		h(k, v)
	}
	return true
}

func keyList(fields map[string]func(key, val *yaml.Node)) string {
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	sortStrings(keys)
	return strings.Join(keys, ", ")
}

func sortStrings(s []string) { sort.Strings(s) }

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func kind(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "nothing"
		}
		return fmt.Sprintf("%q", n.Value)
	case yaml.AliasNode:
		return "an alias"
	}
	return "something else"
}

func (p *parser) str(n *yaml.Node, path string) (string, bool) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		p.errAt(n, path, "want a single value, got %s", kind(n))
		return "", false
	}
	if n.Value == "" {
		p.errAt(n, path, "empty; give a value or remove the key")
		return "", false
	}
	return n.Value, true
}

func (p *parser) boolean(n *yaml.Node, path string) bool {
	if n.Kind == yaml.ScalarNode {
		switch n.Value {
		case "true":
			return true
		case "false":
			return false
		}
	}
	p.errAt(n, path, "want true or false, got %s", kind(n))
	return false
}

func (p *parser) intRange(n *yaml.Node, path string, lo, hi int) (int, bool) {
	if n.Kind == yaml.ScalarNode {
		v, err := strconv.Atoi(n.Value)
		if err == nil {
			if v < lo || v > hi {
				p.errAt(n, path, "%d out of range %d-%d", v, lo, hi)
				return 0, false
			}
			return v, true
		}
	}
	p.errAt(n, path, "want a whole number from %d to %d, got %s", lo, hi, kind(n))
	return 0, false
}

// duration parses a Go duration, with d for days (7d, 1d12h).
func (p *parser) duration(n *yaml.Node, path string, lo, hi time.Duration) (time.Duration, bool) {
	s, ok := p.str(n, path)
	if !ok {
		return 0, false
	}
	d, err := parseDuration(s)
	if err != nil {
		p.errAt(n, path, "%q is not a duration (examples: 90s, 15m, 4h, 7d)", s)
		return 0, false
	}
	if d < lo || d > hi {
		p.errAt(n, path, "%s out of range %s-%s", s, fmtDur(lo), fmtDur(hi))
		return 0, false
	}
	return d, true
}

func fmtDur(d time.Duration) string {
	if d >= 24*time.Hour && d%(24*time.Hour) == 0 {
		return fmt.Sprintf("%dd", d/(24*time.Hour))
	}
	return d.String()
}

func parseDuration(s string) (time.Duration, error) {
	days := time.Duration(0)
	if i := strings.IndexByte(s, 'd'); i >= 0 {
		n, err := strconv.Atoi(s[:i])
		if err != nil || n < 0 || n > 100000 {
			return 0, fmt.Errorf("bad days")
		}
		days = time.Duration(n) * 24 * time.Hour
		s = s[i+1:]
		if s == "" {
			return days, nil
		}
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("bad duration")
	}
	return days + d, nil
}

func (p *parser) list(n *yaml.Node, path string, each func(i int, item *yaml.Node)) {
	if n.Kind != yaml.SequenceNode {
		p.errAt(n, path, "want a list (lines starting with -), got %s", kind(n))
		return
	}
	for i, it := range n.Content {
		each(i, it)
	}
}

func (p *parser) strList(n *yaml.Node, path string) []string {
	var out []string
	p.list(n, path, func(i int, it *yaml.Node) {
		if s, ok := p.str(it, fmt.Sprintf("%s[%d]", path, i)); ok {
			out = append(out, s)
		}
	})
	return out
}

func (p *parser) absPath(n *yaml.Node, path string) (string, bool) {
	s, ok := p.str(n, path)
	if !ok {
		return "", false
	}
	if !filepath.IsAbs(s) {
		p.errAt(n, path, "%q is not an absolute path; write it from /", s)
		return "", false
	}
	return s, true
}

// hasAlias reports whether the tree uses aliases, which the configuration
// refuses (they would also let a small file expand without bound).
func hasAlias(n *yaml.Node, depth int) *yaml.Node {
	if n == nil || depth > 100 {
		return nil
	}
	if n.Kind == yaml.AliasNode || n.Anchor != "" {
		return n
	}
	for _, c := range n.Content {
		if a := hasAlias(c, depth+1); a != nil {
			return a
		}
	}
	return nil
}

func (p *parser) parse(data []byte) *Config {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		p.yamlError(err)
		return nil
	}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		p.errAt(nil, "", "the file is empty; see docs/server.yaml.sample")
		return nil
	}
	if a := hasAlias(&doc, 0); a != nil {
		p.errAt(a, "", "YAML anchors and aliases (& and *) are not supported; write the values out")
		return nil
	}
	root := doc.Content[0]
	cfg := &Config{
		StateDir:     DefaultStateDir,
		Timezone:     time.UTC,
		Repositories: map[string]*Repository{},
		Connections:  map[string]*Connection{},
	}
	var listenNode, jobsNode, reposNode, connsNode, notifyNode *yaml.Node
	if !p.mapping(root, "", map[string]func(k, v *yaml.Node){
		"listen":       func(k, v *yaml.Node) { listenNode = v },
		"state_dir":    func(k, v *yaml.Node) { cfg.StateDir, _ = p.absPath(v, "state_dir") },
		"timezone":     func(k, v *yaml.Node) { cfg.Timezone = p.zone(v, "timezone", time.UTC) },
		"repositories": func(k, v *yaml.Node) { reposNode = v },
		"connections":  func(k, v *yaml.Node) { connsNode = v },
		"jobs":         func(k, v *yaml.Node) { jobsNode = v },
		"notify":       func(k, v *yaml.Node) { notifyNode = v },
	}) {
		return nil
	}
	if listenNode == nil {
		p.errAt(root, "listen", "missing: give at least one address (unix:/run/vmshadow/api.sock, or tcp:HOST:PORT with tls_cert and tls_key)")
	} else {
		p.listen(cfg, listenNode)
	}
	if reposNode != nil {
		p.named(reposNode, "repositories", func(name string, path string, v *yaml.Node) {
			if r := p.repository(name, path, v); r != nil {
				cfg.Repositories[name] = r
			}
		})
	}
	if connsNode != nil {
		p.named(connsNode, "connections", func(name string, path string, v *yaml.Node) {
			if c := p.connection(name, path, v); c != nil {
				cfg.Connections[name] = c
			}
		})
	}
	if notifyNode != nil {
		cfg.Notify = p.webhooks("notify", notifyNode)
	}
	if jobsNode != nil {
		names := map[string]bool{}
		p.list(jobsNode, "jobs", func(i int, v *yaml.Node) {
			path := fmt.Sprintf("jobs[%d]", i)
			j := p.job(cfg, path, v)
			if j == nil {
				return
			}
			if names[j.Name] {
				p.errAt(v, path+".name", "job %q is defined twice; job names must be unique", j.Name)
				return
			}
			names[j.Name] = true
			cfg.Jobs = append(cfg.Jobs, j)
		})
	}
	return cfg
}

var lineRe = regexp.MustCompile(`line (\d+)`)

// yamlError reports a syntax error of the YAML library with the line it
// names (no column: the library gives none, and for an unclosed bracket or
// a bad indentation its line can be one before the mistake).
func (p *parser) yamlError(err error) {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	e := &Error{File: p.file}
	if m := lineRe.FindStringSubmatchIndex(msg); m != nil && m[0] == 0 {
		e.Line, _ = strconv.Atoi(msg[m[2]:m[3]])
		msg = strings.TrimPrefix(msg[m[1]:], ": ")
	}
	e.Msg = "not valid YAML (at or just after this line): " + msg
	p.errs = append(p.errs, e)
}

func (p *parser) zone(n *yaml.Node, path string, def *time.Location) *time.Location {
	s, ok := p.str(n, path)
	if !ok {
		return def
	}
	l, err := time.LoadLocation(s)
	if err != nil || s == "" || strings.HasPrefix(s, "/") {
		p.errAt(n, path, "unknown time zone %q: give an IANA name such as Europe/Berlin, or UTC", s)
		return def
	}
	return l
}

var nameRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// named walks a mapping of NAME: settings.
func (p *parser) named(n *yaml.Node, path string, each func(name, path string, v *yaml.Node)) {
	if n.Kind != yaml.MappingNode {
		p.errAt(n, path, "want a mapping of NAME: settings, got %s", kind(n))
		return
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		kp := path + "." + k.Value
		if k.Kind != yaml.ScalarNode || !nameRe.MatchString(k.Value) {
			p.errAt(k, path, "name %s: use letters, digits, ., _ and - (at most 64, starting with a letter or digit)", kind(k))
			continue
		}
		if seen[k.Value] {
			p.errAt(k, kp, "defined twice; names must be unique")
			continue
		}
		seen[k.Value] = true
		each(k.Value, kp, v)
	}
}

func (p *parser) listen(cfg *Config, n *yaml.Node) {
	seen := map[string]bool{}
	p.list(n, "listen", func(i int, v *yaml.Node) {
		path := fmt.Sprintf("listen[%d]", i)
		var l Listen
		var addrNode, plainNode *yaml.Node
		if !p.mapping(v, path, map[string]func(k, v *yaml.Node){
			"address":   func(k, v *yaml.Node) { addrNode = v; l.Address, _ = p.str(v, path+".address") },
			"tls_cert":  func(k, v *yaml.Node) { l.TLSCert, _ = p.absPath(v, path+".tls_cert") },
			"tls_key":   func(k, v *yaml.Node) { l.TLSKey, _ = p.absPath(v, path+".tls_key") },
			"plain_tcp": func(k, v *yaml.Node) { plainNode = v; l.PlainTCP = p.boolean(v, path+".plain_tcp") },
		}) {
			return
		}
		if addrNode == nil {
			p.errAt(v, path+".address", "missing: give tcp:HOST:PORT or unix:PATH")
			return
		}
		if l.Address == "" {
			return
		}
		ap := path + ".address"
		network, rest, _ := strings.Cut(l.Address, ":")
		switch network {
		case "unix":
			if !filepath.IsAbs(rest) {
				p.errAt(addrNode, ap, "%q: the socket path must be absolute (unix:/run/vmshadow/api.sock)", l.Address)
				return
			}
			if l.TLSCert != "" || l.TLSKey != "" || l.PlainTCP {
				p.errAt(v, path, "tls_cert, tls_key and plain_tcp apply to tcp: addresses only; access to a unix socket is controlled by its file permissions")
			}
		case "tcp":
			host, port, err := net.SplitHostPort(rest)
			if err != nil {
				p.errAt(addrNode, ap, "%q: want tcp:HOST:PORT (tcp:0.0.0.0:8443, tcp:[::1]:8080)", l.Address)
				return
			}
			if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
				p.errAt(addrNode, ap, "%q: port %q out of range 1-65535", l.Address, port)
				return
			}
			switch {
			case l.PlainTCP && (l.TLSCert != "" || l.TLSKey != ""):
				p.errAt(plainNode, path+".plain_tcp", "plain_tcp with tls_cert or tls_key: choose TLS (remove plain_tcp) or plain TCP (remove the certificate)")
			case l.PlainTCP && !isLoopback(host):
				p.errAt(plainNode, path+".plain_tcp", "plain TCP is allowed on a loopback address only (127.0.0.1, [::1], localhost), not %q: API tokens would cross the network in clear; give tls_cert and tls_key", host)
			case !l.PlainTCP && (l.TLSCert == "" || l.TLSKey == ""):
				p.errAt(v, path, "a tcp: address needs tls_cert and tls_key (PEM files), or plain_tcp: true on a loopback address")
			}
		default:
			p.errAt(addrNode, ap, "%q: want tcp:HOST:PORT or unix:PATH", l.Address)
			return
		}
		l.Network, l.Addr = network, rest
		if seen[l.Address] {
			p.errAt(addrNode, ap, "%q listed twice", l.Address)
			return
		}
		seen[l.Address] = true
		cfg.Listen = append(cfg.Listen, l)
	})
	if n.Kind == yaml.SequenceNode && len(n.Content) == 0 {
		p.errAt(n, "listen", "empty: give at least one address")
	}
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

var envRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// secret reads password_file / password_env of a mapping into s; the
// handlers are added to fields.
func (p *parser) secretFields(path string, s *Secret, fields map[string]func(k, v *yaml.Node)) {
	fields["password_file"] = func(k, v *yaml.Node) { s.File, _ = p.absPath(v, path+".password_file") }
	fields["password_env"] = func(k, v *yaml.Node) {
		e, ok := p.str(v, path+".password_env")
		if ok && !envRe.MatchString(e) {
			p.errAt(v, path+".password_env", "%q is not an environment variable name (letters, digits and _; not the password itself)", e)
			return
		}
		s.Env = e
	}
}

func (p *parser) checkSecret(n *yaml.Node, path string, s Secret, what string) {
	switch {
	case s.File != "" && s.Env != "":
		p.errAt(n, path, "both password_file and password_env: keep one")
	case s.File == "" && s.Env == "":
		p.errAt(n, path, "no %s: give password_file (a file readable only by the server) or password_env (the name of an environment variable)", what)
	}
}

func (p *parser) repository(name, path string, n *yaml.Node) *Repository {
	r := &Repository{Name: name}
	var locNode *yaml.Node
	fields := map[string]func(k, v *yaml.Node){
		"location": func(k, v *yaml.Node) { locNode = v; r.Location, _ = p.str(v, path+".location") },
		"s3_ca":    func(k, v *yaml.Node) { r.S3CA, _ = p.absPath(v, path+".s3_ca") },
	}
	p.secretFields(path, &r.Password, fields)
	if !p.mapping(n, path, fields) {
		return nil
	}
	switch {
	case locNode == nil:
		p.errAt(n, path+".location", "missing: give a directory (/backups/repo) or an S3 URL (s3:https://host/bucket/prefix)")
	case r.Location == "":
	case s3.IsURL(r.Location):
		if _, err := s3.ParseURL(r.Location); err != nil {
			p.errAt(locNode, path+".location", "%s", strings.TrimSuffix(err.Error(), ": "+errs.ErrUsage.Error()))
		}
	case !filepath.IsAbs(r.Location):
		p.errAt(locNode, path+".location", "%q: a directory must be an absolute path; an S3 location starts with s3:", r.Location)
	}
	if r.S3CA != "" && !s3.IsURL(r.Location) && r.Location != "" {
		p.errAt(n, path+".s3_ca", "s3_ca applies to S3 locations only")
	}
	p.checkSecret(n, path, r.Password, "repository password")
	return r
}

var libvirtSchemeRe = regexp.MustCompile(`^[a-z][a-z0-9]*(\+(ssh|libssh|libssh2|tls|tcp|unix|ext))?$`)

func (p *parser) connection(name, path string, n *yaml.Node) *Connection {
	c := &Connection{Name: name}
	var typeNode, socketsNode, urlNode, uriNode, userNode, caNode, insecureNode, qgaNode *yaml.Node
	fields := map[string]func(k, v *yaml.Node){
		"type":     func(k, v *yaml.Node) { typeNode = v; c.Type, _ = p.str(v, path+".type") },
		"sockets":  func(k, v *yaml.Node) { socketsNode = v; c.Sockets = p.strList(v, path+".sockets") },
		"url":      func(k, v *yaml.Node) { urlNode = v; c.URL, _ = p.str(v, path+".url") },
		"user":     func(k, v *yaml.Node) { userNode = v; c.User, _ = p.str(v, path+".user") },
		"ca":       func(k, v *yaml.Node) { caNode = v; c.CA, _ = p.absPath(v, path+".ca") },
		"insecure": func(k, v *yaml.Node) { insecureNode = v; c.Insecure = p.boolean(v, path+".insecure") },
		"uri":      func(k, v *yaml.Node) { uriNode = v; c.URI, _ = p.str(v, path+".uri") },
		"guest_agent": func(k, v *yaml.Node) {
			qgaNode = v
			c.GuestAgent, _ = p.absPath(v, path+".guest_agent")
			if c.GuestAgent != "" && !strings.Contains(c.GuestAgent, "{vm}") {
				p.errAt(v, path+".guest_agent", "%q does not contain {vm}: give each VM's guest agent socket as a path with {vm} for the VM's name (/run/qemu/{vm}.qga)", c.GuestAgent)
			}
		},
	}
	p.secretFields(path, &c.Password, fields)
	if !p.mapping(n, path, fields) {
		return nil
	}
	notFor := func(node *yaml.Node, key string) {
		if node != nil {
			p.errAt(node, path+"."+key, "not a setting of a %s connection", c.Type)
		}
	}
	switch c.Type {
	case QMP:
		if socketsNode == nil {
			p.errAt(n, path+".sockets", "missing: list the QMP socket paths or globs (/run/qemu/*.qmp)")
		} else if len(c.Sockets) == 0 && socketsNode.Kind == yaml.SequenceNode {
			p.errAt(socketsNode, path+".sockets", "empty: list at least one socket path or glob")
		}
		if socketsNode != nil && socketsNode.Kind == yaml.SequenceNode {
			for i, s := range socketsNode.Content {
				if s.Kind != yaml.ScalarNode || s.Value == "" {
					continue
				}
				sp := fmt.Sprintf("%s.sockets[%d]", path, i)
				if !filepath.IsAbs(s.Value) {
					p.errAt(s, sp, "%q is not an absolute path", s.Value)
				} else if _, err := filepath.Match(s.Value, ""); err != nil {
					p.errAt(s, sp, "%q is not a valid glob (%v)", s.Value, err)
				}
			}
		}
		notFor(urlNode, "url")
		notFor(userNode, "user")
		notFor(caNode, "ca")
		notFor(insecureNode, "insecure")
		notFor(uriNode, "uri")
		if c.Password != (Secret{}) {
			p.errAt(n, path, "a qmp connection has no password")
		}
	case XAPI:
		if c.User == "" && userNode == nil {
			c.User = "root"
		}
		switch {
		case urlNode == nil:
			p.errAt(n, path+".url", "missing: give the pool master's URL (https://HOST)")
		case c.URL != "":
			u, err := url.Parse(c.URL)
			switch {
			case err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http"):
				p.errAt(urlNode, path+".url", "%q: want https://HOST[:PORT]", redactURL(c.URL))
			case u.User != nil:
				p.errAt(urlNode, path+".url", "user info in the URL is not accepted: use user and password_file")
			case u.Scheme == "http" && !c.Insecure:
				p.errAt(urlNode, path+".url", "plain http would send the password in clear: use https, or set insecure: true explicitly")
			}
		}
		notFor(socketsNode, "sockets")
		notFor(uriNode, "uri")
		notFor(qgaNode, "guest_agent")
		p.checkSecret(n, path, c.Password, "pool password")
	case Libvirt:
		switch {
		case uriNode == nil:
			p.errAt(n, path+".uri", "missing: give a libvirt URI (qemu:///system, qemu+ssh://root@host/system)")
		case c.URI != "":
			u, err := url.Parse(c.URI)
			switch {
			case err != nil || !libvirtSchemeRe.MatchString(u.Scheme) || !strings.Contains(c.URI, "://"):
				p.errAt(uriNode, path+".uri", "%q is not a libvirt URI: want DRIVER[+TRANSPORT]://[USER@][HOST][:PORT]/PATH (qemu:///system, qemu+ssh://root@host/system)", redactURL(c.URI))
			case u.User != nil && func() bool { _, set := u.User.Password(); return set }():
				p.errAt(uriNode, path+".uri", "a password in the URI is not accepted: use password_file")
			case u.Path == "" || u.Path == "/":
				p.errAt(uriNode, path+".uri", "%q names no path: add /system or /session", redactURL(c.URI))
			}
		}
		notFor(socketsNode, "sockets")
		notFor(urlNode, "url")
		notFor(insecureNode, "insecure")
		notFor(qgaNode, "guest_agent")
		if c.Password.File != "" && c.Password.Env != "" {
			p.errAt(n, path, "both password_file and password_env: keep one")
		}
	case "":
		if typeNode == nil {
			p.errAt(n, path+".type", "missing: give qmp, xapi or libvirt")
		}
	default:
		p.errAt(typeNode, path+".type", "%q: want qmp, xapi or libvirt", c.Type)
	}
	return c
}

// redactURL drops user info and the query, which may hold secrets.
func redactURL(s string) string {
	if !strings.ContainsAny(s, "@?") {
		return s
	}
	u, err := url.Parse(s)
	if err != nil {
		if i := strings.IndexAny(s, "@?"); i >= 0 {
			return s[:i] + "…"
		}
		return s
	}
	if u.User != nil {
		u.User = url.User("…")
	}
	if u.RawQuery != "" {
		u.RawQuery = "…"
	}
	return u.String()
}
