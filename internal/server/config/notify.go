package config

import (
	"fmt"
	"net/url"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Events a webhook can be sent, named after how a run ended (its status in
// package state: failed, succeeded, interrupted, cancelled, skipped).
const (
	OnFailure     = "failure"     // the run failed (one VM failing fails a backup run)
	OnSuccess     = "success"     // the run succeeded
	OnInterrupted = "interrupted" // the server stopped during the run (found at the next start)
	OnCancelled   = "cancelled"   // cancelled through the API, or by its time limit
	OnSkipped     = "skipped"     // not started: the previous run was still going
)

// Events lists every event name, in the documented order.
var Events = []string{OnFailure, OnSuccess, OnInterrupted, OnCancelled, OnSkipped}

// DefaultOn is the events of a webhook without an on key: the runs that
// left no new backup because something went wrong.
var DefaultOn = []string{OnFailure, OnInterrupted}

// Limits and default of a webhook's timeout.
const (
	DefaultNotifyTimeout = 10 * time.Second
	minNotifyTimeout     = time.Second
	maxNotifyTimeout     = 5 * time.Minute
)

// Webhook is one notification target: an HTTP POST of a JSON document
// (package notify) when a run ends with one of the events in On.
type Webhook struct {
	URL     string   // https://..., or http:// to a loopback host
	Secret  Secret   // the HMAC key (its first line); zero: unsigned
	On      []string // events, from Events
	Timeout time.Duration
	CA      string // PEM file of extra CA certificates
	Line    int    // where the entry starts in the file
}

// Wants reports whether the webhook is sent event.
func (w *Webhook) Wants(event string) bool {
	for _, e := range w.On {
		if e == event {
			return true
		}
	}
	return false
}

// Redacted is the URL as logs and errors show it: the scheme, host and
// port only, with "/…" for a path, which some receivers use as a token
// (https://hooks.example.net/…).
func (w *Webhook) Redacted() string {
	u, err := url.Parse(w.URL)
	if err != nil || u.Host == "" {
		return "(a webhook URL)"
	}
	s := u.Scheme + "://" + u.Host
	if u.Path != "" && u.Path != "/" {
		s += "/…"
	}
	return s
}

func (p *parser) webhooks(path string, n *yaml.Node) []Webhook {
	out := []Webhook{}
	seen := map[string]bool{}
	p.list(n, path, func(i int, it *yaml.Node) {
		ip := fmt.Sprintf("%s[%d]", path, i)
		w, ok := p.webhook(ip, it)
		if !ok {
			return
		}
		if seen[w.URL] {
			p.errAt(it, ip+".url", "%s is already listed above: merge the two entries' on lists", w.Redacted())
			return
		}
		seen[w.URL] = true
		out = append(out, w)
	})
	return out
}

func (p *parser) webhook(path string, n *yaml.Node) (Webhook, bool) {
	w := Webhook{Timeout: DefaultNotifyTimeout, Line: n.Line}
	var urlNode, onNode, caNode *yaml.Node
	before := len(p.errs)
	if !p.mapping(n, path, map[string]func(k, v *yaml.Node){
		"url":         func(k, v *yaml.Node) { urlNode = v; w.URL, _ = p.str(v, path+".url") },
		"secret_file": func(k, v *yaml.Node) { w.Secret.File, _ = p.absPath(v, path+".secret_file") },
		"secret_env": func(k, v *yaml.Node) {
			e, ok := p.str(v, path+".secret_env")
			if ok && !envRe.MatchString(e) {
				p.errAt(v, path+".secret_env", "%q is not an environment variable name (letters, digits and _; not the secret itself)", e)
				return
			}
			w.Secret.Env = e
		},
		"on": func(k, v *yaml.Node) { onNode = v; w.On = p.events(path+".on", v) },
		"timeout": func(k, v *yaml.Node) {
			w.Timeout, _ = p.duration(v, path+".timeout", minNotifyTimeout, maxNotifyTimeout)
		},
		"ca": func(k, v *yaml.Node) { caNode = v; w.CA, _ = p.absPath(v, path+".ca") },
	}) {
		return w, false
	}
	if onNode == nil {
		w.On = append([]string(nil), DefaultOn...)
	}
	if w.Secret.File != "" && w.Secret.Env != "" {
		p.errAt(n, path, "both secret_file and secret_env: keep one")
	}
	switch {
	case urlNode == nil:
		p.errAt(n, path+".url", "missing: give the receiver's URL (https://HOST/PATH)")
	case w.URL != "":
		if msg := checkWebhookURL(w.URL); msg != "" {
			p.errAt(urlNode, path+".url", "%s", msg)
		} else if caNode != nil && strings.HasPrefix(w.URL, "http:") {
			p.errAt(caNode, path+".ca", "ca applies to https URLs only")
		}
	}
	return w, len(p.errs) == before
}

// checkWebhookURL returns what is wrong with a webhook URL, or "". The
// message never repeats user info or a query.
func checkWebhookURL(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.Opaque != "" || (u.Scheme != "https" && u.Scheme != "http") {
		return fmt.Sprintf("%q: want https://HOST[:PORT]/PATH", redactURL(s))
	}
	switch {
	case u.User != nil:
		return "user info in the URL is not accepted (it would be logged and sent in clear to proxies): authenticate the deliveries with secret_file or secret_env (an HMAC signature)"
	case u.RawQuery != "" || u.ForceQuery:
		return fmt.Sprintf("%q: a query string is not accepted (it is where tokens hide, and URLs end up in logs): authenticate the deliveries with secret_file or secret_env (an HMAC signature)", redactURL(s))
	case u.Fragment != "":
		return fmt.Sprintf("%q: a #fragment is never sent to the server: remove it", redactURL(s))
	case u.Scheme == "http" && !isLoopback(u.Hostname()):
		return fmt.Sprintf("plain http is accepted to a loopback host only (127.0.0.1, [::1], localhost), not %q: the run's details would cross the network in clear; use https", u.Hostname())
	}
	return ""
}

func (p *parser) events(path string, n *yaml.Node) []string {
	out := []string{}
	seen := map[string]bool{}
	p.list(n, path, func(i int, it *yaml.Node) {
		ip := fmt.Sprintf("%s[%d]", path, i)
		s, ok := p.str(it, ip)
		if !ok {
			return
		}
		known := false
		for _, e := range Events {
			known = known || e == s
		}
		switch {
		case !known:
			p.errAt(it, ip, "%q: want %s", s, strings.Join(Events, ", "))
		case seen[s]:
			p.errAt(it, ip, "%q listed twice", s)
		default:
			seen[s] = true
			out = append(out, s)
		}
	})
	if n.Kind == yaml.SequenceNode && len(n.Content) == 0 {
		p.errAt(n, path, "empty: list at least one of %s (or remove the webhook)", strings.Join(Events, ", "))
	}
	return out
}
