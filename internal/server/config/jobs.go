package config

import (
	"fmt"
	"path/filepath"
	"sort"
	"time"

	"github.com/vmshadow/vmshadow/internal/schedule"
	"go.yaml.in/yaml/v3"
)

// Limits of job settings.
const (
	maxConcurrency = 64
	maxTimeLimit   = 7 * 24 * time.Hour
	maxRandomDelay = 24 * time.Hour
	maxDays        = 3650
	maxKeep        = 100000
)

func (p *parser) job(cfg *Config, path string, n *yaml.Node) *Job {
	j := &Job{Line: n.Line, Enabled: true, PerJob: 1, PerHost: 1, Grace: 24 * time.Hour}
	keys := map[string]*yaml.Node{}
	at := func(key string) func(k, v *yaml.Node) {
		return func(k, v *yaml.Node) { keys[key] = v }
	}
	fields := map[string]func(k, v *yaml.Node){}
	for _, k := range []string{"name", "type", "schedule", "timezone", "random_delay", "catch_up", "enabled", "time_limit",
		"repository", "vms", "writers", "retention", "full_every_days", "concurrency", "group",
		"reverify_after_days", "grace", "from", "to", "notify"} {
		fields[k] = at(k)
	}
	if !p.mapping(n, path, fields) {
		return nil
	}
	if v := keys["name"]; v == nil {
		p.errAt(n, path+".name", "missing: every job needs a unique name")
	} else if s, ok := p.str(v, path+".name"); ok {
		if !nameRe.MatchString(s) {
			p.errAt(v, path+".name", "%q: use letters, digits, ., _ and - (at most 64, starting with a letter or digit)", s)
		}
		j.Name = s
	}
	typeNode := keys["type"]
	if typeNode == nil {
		p.errAt(n, path+".type", "missing: give backup, verify, prune, gc or copy")
	} else if s, ok := p.str(typeNode, path+".type"); ok {
		switch s {
		case Backup, Verify, Prune, GC, Copy:
			j.Type = s
		default:
			p.errAt(typeNode, path+".type", "%q: want backup, verify, prune, gc or copy", s)
		}
	}

	loc := cfg.Timezone
	if v := keys["timezone"]; v != nil {
		loc = p.zone(v, path+".timezone", loc)
	}
	if v := keys["schedule"]; v != nil {
		if s, ok := p.str(v, path+".schedule"); ok {
			sc, err := schedule.Parse(s, loc)
			if err != nil {
				p.errAt(v, path+".schedule", "%v", err)
			}
			j.Schedule = sc
		}
	}
	if keys["schedule"] == nil {
		for _, k := range []string{"random_delay", "catch_up"} {
			if v := keys[k]; v != nil {
				p.errAt(v, path+"."+k, "applies to scheduled jobs only: add a schedule or remove it")
				delete(keys, k)
			}
		}
	}
	if v := keys["random_delay"]; v != nil {
		j.RandomDelay, _ = p.duration(v, path+".random_delay", 0, maxRandomDelay)
	}
	if v := keys["catch_up"]; v != nil {
		j.CatchUp = p.boolean(v, path+".catch_up")
	}
	if v := keys["enabled"]; v != nil {
		j.Enabled = p.boolean(v, path+".enabled")
	}
	if v := keys["time_limit"]; v != nil {
		j.TimeLimit, _ = p.duration(v, path+".time_limit", time.Minute, maxTimeLimit)
	}
	if v := keys["notify"]; v != nil {
		j.Notify = p.webhooks(path+".notify", v)
	} else {
		j.Notify = cfg.Notify
	}

	// Which keys each type takes, besides the common ones.
	allowed := map[string][]string{
		Backup: {"repository", "vms", "writers", "retention", "full_every_days", "concurrency", "group"},
		Verify: {"repository", "reverify_after_days"},
		Prune:  {"repository", "retention"},
		GC:     {"repository", "grace"},
		Copy:   {"from", "to", "vms"},
	}
	if j.Type != "" {
		ok := map[string]bool{}
		for _, k := range allowed[j.Type] {
			ok[k] = true
		}
		for _, k := range []string{"repository", "vms", "writers", "retention", "full_every_days", "concurrency", "group", "reverify_after_days", "grace", "from", "to"} {
			if v := keys[k]; v != nil && !ok[k] {
				p.errAt(v, path+"."+k, "not a setting of a %s job", j.Type)
				delete(keys, k)
			}
		}
	}
	repoRef := func(key string) string {
		v := keys[key]
		if v == nil {
			p.errAt(n, path+"."+key, "missing: name a repository defined under repositories")
			return ""
		}
		s, ok := p.str(v, path+"."+key)
		if !ok {
			return ""
		}
		if cfg.Repositories[s] == nil {
			p.errAt(v, path+"."+key, "repository %q is not defined under repositories (defined: %s)", s, names(cfg.Repositories))
		}
		return s
	}
	switch j.Type {
	case Backup:
		j.Repository = repoRef("repository")
		if v := keys["vms"]; v == nil {
			p.errAt(n, path+".vms", "missing: list the VMs (- connection: NAME, with vms: [names or globs], or none for all its VMs)")
		} else {
			j.VMs = p.vmSelectors(cfg, path+".vms", v)
		}
		if v := keys["writers"]; v != nil {
			p.writers(j, path+".writers", v)
			p.checkWriters(cfg, j, path+".writers", v)
		}
		if v := keys["retention"]; v != nil {
			p.retention(j, path+".retention", v, loc)
		}
		if v := keys["full_every_days"]; v != nil {
			if v.Kind == yaml.ScalarNode && v.Value == "never" {
				j.FullEveryDays = 0
			} else {
				j.FullEveryDays, _ = p.intRange(v, path+".full_every_days", 1, maxDays)
			}
		}
		if v := keys["group"]; v != nil {
			if g, ok := p.str(v, path+".group"); ok {
				if !nameRe.MatchString(g) {
					p.errAt(v, path+".group", "%q is not a group name: letters, digits, '.', '_' and '-', at most 64, starting with a letter or digit", g)
				} else if len(j.GuestHooks) > 0 {
					p.errAt(v, path+".group", "guest hooks are for a job's VMs one by one; in a group, freeze the applications with hooks on this host, or the guests' own fsfreeze hooks")
				} else if keys["concurrency"] != nil {
					p.errAt(keys["concurrency"], path+".concurrency", "a group's VMs are backed up together, at one instant: concurrency does not apply to a job with a group")
				} else {
					j.Group = g
				}
			}
		}
		if v := keys["concurrency"]; v != nil {
			p.mapping(v, path+".concurrency", map[string]func(k, v *yaml.Node){
				"per_job":  func(k, v *yaml.Node) { j.PerJob, _ = p.intRange(v, path+".concurrency.per_job", 1, maxConcurrency) },
				"per_host": func(k, v *yaml.Node) { j.PerHost, _ = p.intRange(v, path+".concurrency.per_host", 1, maxConcurrency) },
			})
		}
	case Verify:
		j.Repository = repoRef("repository")
		if v := keys["reverify_after_days"]; v != nil {
			j.ReverifyAfterDays, _ = p.intRange(v, path+".reverify_after_days", 0, maxDays)
		}
	case Prune:
		j.Repository = repoRef("repository")
		if v := keys["retention"]; v == nil {
			p.errAt(n, path+".retention", "missing: a prune job needs retention rules (keep_last, keep_daily, ...)")
		} else {
			p.retention(j, path+".retention", v, loc)
		}
	case GC:
		j.Repository = repoRef("repository")
		if v := keys["grace"]; v != nil {
			j.Grace, _ = p.duration(v, path+".grace", 0, 365*24*time.Hour)
		}
	case Copy:
		j.From = repoRef("from")
		j.To = repoRef("to")
		if j.From != "" && j.From == j.To {
			p.errAt(keys["to"], path+".to", "the same repository as from: a copy needs two repositories")
		}
		if v := keys["vms"]; v != nil {
			j.CopyVMs = p.globs(path+".vms", v)
		}
	}
	return j
}

func names[T any](m map[string]T) string {
	if len(m) == 0 {
		return "none"
	}
	s := make([]string, 0, len(m))
	for k := range m {
		s = append(s, k)
	}
	sortStrings(s)
	out := ""
	for i, k := range s {
		if i > 0 {
			out += ", "
		}
		out += k
	}
	return out
}

func (p *parser) globs(path string, n *yaml.Node) []string {
	var out []string
	p.list(n, path, func(i int, it *yaml.Node) {
		ip := fmt.Sprintf("%s[%d]", path, i)
		s, ok := p.str(it, ip)
		if !ok {
			return
		}
		if _, err := filepath.Match(s, ""); err != nil {
			p.errAt(it, ip, "%q is not a valid glob (%v)", s, err)
			return
		}
		out = append(out, s)
	})
	return out
}

func (p *parser) vmSelectors(cfg *Config, path string, n *yaml.Node) []VMSelector {
	var out []VMSelector
	p.list(n, path, func(i int, it *yaml.Node) {
		ip := fmt.Sprintf("%s[%d]", path, i)
		var sel VMSelector
		var connNode *yaml.Node
		if !p.mapping(it, ip, map[string]func(k, v *yaml.Node){
			"connection": func(k, v *yaml.Node) { connNode = v; sel.Connection, _ = p.str(v, ip+".connection") },
			"vms":        func(k, v *yaml.Node) { sel.Names = p.globs(ip+".vms", v) },
		}) {
			return
		}
		switch {
		case connNode == nil:
			p.errAt(it, ip+".connection", "missing: name a connection defined under connections")
			return
		case sel.Connection == "":
			return
		case cfg.Connections[sel.Connection] == nil:
			p.errAt(connNode, ip+".connection", "connection %q is not defined under connections (defined: %s)", sel.Connection, names(cfg.Connections))
			return
		}
		out = append(out, sel)
	})
	if n.Kind == yaml.SequenceNode && len(n.Content) == 0 {
		p.errAt(n, path, "empty: list at least one connection")
	}
	return out
}

func (p *parser) writers(j *Job, path string, n *yaml.Node) {
	var reqNode *yaml.Node
	p.mapping(n, path, map[string]func(k, v *yaml.Node){
		"hooks":       func(k, v *yaml.Node) { j.Hooks = p.hookPaths(path+".hooks", v) },
		"guest_hooks": func(k, v *yaml.Node) { j.GuestHooks = p.hookPaths(path+".guest_hooks", v) },
		"require":     func(k, v *yaml.Node) { reqNode = v; j.Require, _ = p.str(v, path+".require") },
		"guest_agent": func(k, v *yaml.Node) { j.GuestAgent = p.boolean(v, path+".guest_agent") },
	})
	switch j.Require {
	case "", "filesystem", "application":
	default:
		p.errAt(reqNode, path+".require", "%q: want filesystem or application", j.Require)
		j.Require = ""
	}
}

// checkWriters refuses writers a selected connection cannot run: the
// guest agent of a QMP connection without guest_agent, or of a XenServer
// pool; guest hooks without the QEMU guest agent.
func (p *parser) checkWriters(cfg *Config, j *Job, path string, n *yaml.Node) {
	if len(j.GuestHooks) > 0 && !j.GuestAgent {
		p.errAt(n, path+".guest_hooks", "guest hooks run through the guest agent: set guest_agent: true")
	}
	if !j.GuestAgent {
		return
	}
	for _, sel := range j.VMs {
		c := cfg.Connections[sel.Connection]
		switch {
		case c == nil:
		case c.Type == QMP && c.GuestAgent == "":
			p.errAt(n, path+".guest_agent", "connection %q has no guest_agent socket path: add guest_agent: /run/qemu/{vm}.qga (the path of each VM's agent socket) to it", c.Name)
		case c.Type == XAPI:
			p.errAt(n, path+".guest_agent", "connection %q is a XenServer pool, whose VMs run no QEMU guest agent: use hooks", c.Name)
		case c.Type == Libvirt && len(j.GuestHooks) > 0:
			p.errAt(n, path+".guest_hooks", "connection %q is libvirt, which offers no guest-exec that leaves the domain untainted: use hooks, or a fsfreeze hook script in the guest", c.Name)
		}
	}
}

func (p *parser) hookPaths(path string, n *yaml.Node) []string {
	var out []string
	p.list(n, path, func(i int, it *yaml.Node) {
		if s, ok := p.absPath(it, fmt.Sprintf("%s[%d]", path, i)); ok {
			out = append(out, s)
		}
	})
	return out
}

func (p *parser) retention(j *Job, path string, n *yaml.Node, loc *time.Location) {
	r := &j.Retention
	r.Location = loc
	before := len(p.errs)
	keep := func(dst *int, key string) func(k, v *yaml.Node) {
		return func(k, v *yaml.Node) { *dst, _ = p.intRange(v, path+"."+key, -1, maxKeep) }
	}
	if !p.mapping(n, path, map[string]func(k, v *yaml.Node){
		"keep_last":    keep(&r.Last, "keep_last"),
		"keep_hourly":  keep(&r.Hourly, "keep_hourly"),
		"keep_daily":   keep(&r.Daily, "keep_daily"),
		"keep_weekly":  keep(&r.Weekly, "keep_weekly"),
		"keep_monthly": keep(&r.Monthly, "keep_monthly"),
		"keep_yearly":  keep(&r.Yearly, "keep_yearly"),
	}) {
		return
	}
	if r.Empty() && len(p.errs) == before {
		p.errAt(n, path, "keeps nothing: set at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly (-1 keeps all)")
	}
}

// ParseJob validates one job given as data (a YAML or JSON mapping with
// the keys of an entry of jobs, named name in messages) against cfg's
// repositories, connections and time zone: the jobs created through the
// server's API. Mistakes are an [Errors], as for Parse.
func ParseJob(cfg *Config, name string, data []byte) (*Job, error) {
	p := &parser{file: name}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		p.yamlError(err)
		return nil, p.errs
	}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		p.errAt(nil, "", "empty: give the job as a mapping (name, type, ...)")
		return nil, p.errs
	}
	if a := hasAlias(&doc, 0); a != nil {
		p.errAt(a, "", "YAML anchors and aliases (& and *) are not supported; write the values out")
		return nil, p.errs
	}
	j := p.job(cfg, "job", doc.Content[0])
	if len(p.errs) > 0 {
		sort.SliceStable(p.errs, func(i, k int) bool {
			a, b := p.errs[i], p.errs[k]
			return a.Line < b.Line || a.Line == b.Line && a.Column < b.Column
		})
		return nil, p.errs
	}
	j.Line = 0
	return j, nil
}

// Spec is the job's settings as the configuration file writes them: what
// the API shows and ParseJob reads back.
func (j *Job) Spec() map[string]any {
	m := map[string]any{"name": j.Name, "type": j.Type, "enabled": j.Enabled}
	if j.Schedule != nil {
		m["schedule"] = j.Schedule.String()
	}
	if j.RandomDelay > 0 {
		m["random_delay"] = j.RandomDelay.String()
	}
	if j.CatchUp {
		m["catch_up"] = true
	}
	if j.TimeLimit > 0 {
		m["time_limit"] = j.TimeLimit.String()
	}
	if j.Repository != "" {
		m["repository"] = j.Repository
	}
	switch j.Type {
	case Backup:
		var vms []map[string]any
		for _, v := range j.VMs {
			e := map[string]any{"connection": v.Connection}
			if len(v.Names) > 0 {
				e["vms"] = v.Names
			}
			vms = append(vms, e)
		}
		m["vms"] = vms
		w := map[string]any{}
		if len(j.Hooks) > 0 {
			w["hooks"] = j.Hooks
		}
		if len(j.GuestHooks) > 0 {
			w["guest_hooks"] = j.GuestHooks
		}
		if j.GuestAgent {
			w["guest_agent"] = true
		}
		if j.Require != "" {
			w["require"] = j.Require
		}
		if len(w) > 0 {
			m["writers"] = w
		}
		if j.FullEveryDays > 0 {
			m["full_every_days"] = j.FullEveryDays
		} else {
			m["full_every_days"] = "never"
		}
		if j.Group != "" {
			m["group"] = j.Group // concurrency does not apply to a group
		} else {
			m["concurrency"] = map[string]any{"per_job": max(j.PerJob, 1), "per_host": max(j.PerHost, 1)}
		}
		if !j.Retention.Empty() {
			m["retention"] = retentionSpec(j)
		}
	case Prune:
		m["retention"] = retentionSpec(j)
	case Verify:
		m["reverify_after_days"] = j.ReverifyAfterDays
	case GC:
		m["grace"] = j.Grace.String()
	case Copy:
		m["from"], m["to"] = j.From, j.To
		if len(j.CopyVMs) > 0 {
			m["vms"] = j.CopyVMs
		}
	}
	return m
}

func retentionSpec(j *Job) map[string]int {
	p := j.Retention
	out := map[string]int{}
	for k, v := range map[string]int{"keep_last": p.Last, "keep_hourly": p.Hourly, "keep_daily": p.Daily, "keep_weekly": p.Weekly, "keep_monthly": p.Monthly, "keep_yearly": p.Yearly} {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}
