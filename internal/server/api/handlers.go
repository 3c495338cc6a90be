package api

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// Health is the answer of /healthz.
type Health struct {
	Status  string `json:"status"`
	Version string `json:"version"`
}

func (h *handler) healthz(c *call) error {
	return c.json(http.StatusOK, Health{Status: "ok", Version: h.opts.Version})
}

func (h *handler) openapi(c *call) error {
	c.w.Header().Set("Content-Type", "application/json")
	c.w.WriteHeader(http.StatusOK)
	c.w.Write(openAPIDoc)
	return nil
}

func (h *handler) metrics(c *call) error {
	h.opts.Metrics.ServeHTTP(c.w, c.r)
	return nil
}

// VMList, BackupList, ... are the list responses: an object, so that
// fields can be added (the cursors of the next page).
type (
	VMList struct {
		VMs []VM `json:"vms"`
	}
	BackupList struct {
		Backups []Backup `json:"backups"`
		// NextBefore, set when the page is full, is the before= of the
		// next page.
		NextBefore *time.Time `json:"next_before,omitempty"`
	}
	RepositoryList struct {
		Repositories []Repository `json:"repositories"`
	}
	JobList struct {
		Jobs []Job `json:"jobs"`
	}
	RunList struct {
		Runs []state.Run `json:"runs"`
		// NextBefore, set when the page is full, is the before= of the
		// next page.
		NextBefore *int64 `json:"next_before,omitempty"`
	}
	LogPage struct {
		Lines []state.LogLine `json:"lines"`
		// NextAfter is the after= that continues where this page ends
		// (the last line's ID; the after= given when there were none).
		NextAfter int64 `json:"next_after"`
	}
	ServeList struct {
		Serves []Serve `json:"serves"`
	}
)

// The normalisers turn nil slices into empty ones, so that clients see
// [] and never null.
func normVM(v *VM) {
	v.Jobs = nonNil(v.Jobs)
	if v.LastBackup != nil {
		normBackup(v.LastBackup)
	}
}

func normBackup(b *Backup) {
	b.Tags = nonNil(b.Tags)
	b.Disks = nonNil(b.Disks)
}

func normJob(j *Job) {
	if j.Spec == nil {
		j.Spec = map[string]any{}
	}
	j.Next = nonNil(j.Next)
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func (h *handler) listVMs(c *call) error {
	vms, err := h.svc.VMs(c.ctx)
	if err != nil {
		return err
	}
	vms = nonNil(vms)
	for i := range vms {
		normVM(&vms[i])
	}
	return c.json(http.StatusOK, VMList{VMs: vms})
}

func (h *handler) getVM(c *call) error {
	name, err := c.pathName("vm")
	if err != nil {
		return err
	}
	vms, err := h.svc.VMs(c.ctx)
	if err != nil {
		return err
	}
	for i := range vms {
		if vms[i].Name == name {
			normVM(&vms[i])
			return c.json(http.StatusOK, vms[i])
		}
	}
	return fmt.Errorf("no VM named %q (list them with GET %s/vms): %w", name, Prefix, errs.ErrNotFound)
}

func (h *handler) vmBackups(c *call) error {
	name, err := c.pathName("vm")
	if err != nil {
		return err
	}
	return h.backups(c, name)
}

// ResultList is a page of a VM's results.
type ResultList struct {
	Results []state.VMResult `json:"results"`
	// NextBefore, set when the page is full, is the before= of the next
	// page (a run ID).
	NextBefore *int64 `json:"next_before,omitempty"`
}

func (h *handler) vmResults(c *call) error {
	name, err := c.pathName("vm")
	if err != nil {
		return err
	}
	q, _ := parseQuery(c.r.URL.RawQuery)
	before, limit, err := pageQuery(q)
	if err != nil {
		return err
	}
	rs, err := h.svc.VMResults(c.ctx, name, before, limit)
	if err != nil {
		return err
	}
	out := ResultList{Results: nonNil(rs)}
	out.NextBefore = nextBefore(out.Results, limit, func(r state.VMResult) int64 { return r.Run })
	return c.json(http.StatusOK, out)
}

func (h *handler) listBackups(c *call) error {
	q, _ := parseQuery(c.r.URL.RawQuery)
	vm, err := queryName(q, "vm")
	if err != nil {
		return err
	}
	return h.backups(c, vm)
}

func (h *handler) backups(c *call, vm string) error {
	q, _ := parseQuery(c.r.URL.RawQuery)
	f := BackupFilter{VM: vm}
	var err error
	if f.Repository, err = queryName(q, "repository"); err != nil {
		return err
	}
	limit, err := queryInt(q, "limit", defaultLimit, 1, maxLimit)
	if err != nil {
		return err
	}
	f.Limit = int(limit)
	if f.Before, err = queryTime(q, "before"); err != nil {
		return err
	}
	bs, err := h.svc.Backups(c.ctx, f)
	if err != nil {
		return err
	}
	out := BackupList{Backups: nonNil(bs)}
	for i := range out.Backups {
		normBackup(&out.Backups[i])
	}
	if n := len(out.Backups); n > 0 && n >= f.Limit {
		t := out.Backups[n-1].Time
		out.NextBefore = &t
	}
	return c.json(http.StatusOK, out)
}

// backupPath returns the {repo} and {id} of a backup's path.
func (c *call) backupPath() (string, string, error) {
	repo, err := c.pathName("repo")
	if err != nil {
		return "", "", err
	}
	id, err := parseBackupID(c.r.PathValue("id"))
	return repo, id, err
}

func (h *handler) getBackup(c *call) error {
	repo, id, err := c.backupPath()
	if err != nil {
		return err
	}
	b, err := h.svc.Backup(c.ctx, repo, id)
	if err != nil {
		return err
	}
	normBackup(b)
	return c.json(http.StatusOK, b)
}

func (h *handler) deleteBackup(c *call) error {
	repo, id, err := c.backupPath()
	if err != nil {
		return err
	}
	if err := h.svc.DeleteBackup(c.ctx, repo, id); err != nil {
		return err
	}
	return c.noContent()
}

func (h *handler) listRepositories(c *call) error {
	rs, err := h.svc.Repositories(c.ctx)
	if err != nil {
		return err
	}
	return c.json(http.StatusOK, RepositoryList{Repositories: nonNil(rs)})
}

// runStatuses are the statuses a run can have (the runs' status filter).
var runStatuses = []string{state.Running, state.Succeeded, state.Failed, state.Cancelled, state.Interrupted, state.Skipped}

// UsageHistory is the answer of GET /repositories/{repo}/usage.
type UsageHistory struct {
	Repository string        `json:"repository"`
	Points     []state.Usage `json:"points"`
}

// VerifyList is a page of a repository's verifies.
type VerifyList struct {
	Verifies []VerifyRun `json:"verifies"`
	// NextBefore, set when the page is full, is the before= of the next
	// page.
	NextBefore *int64 `json:"next_before,omitempty"`
}

// PrunePreviewRequest is the body of POST
// /repositories/{repo}/prune-preview.
type PrunePreviewRequest struct {
	VMs       []string        `json:"vms,omitempty"`
	Retention RetentionPolicy `json:"retention"`
}

// DefaultUsageSince is how far back GET /repositories/{repo}/usage goes
// without since=.
const DefaultUsageSince = 90 * 24 * time.Hour

func (h *handler) repoUsage(c *call) error {
	repo, err := c.pathName("repo")
	if err != nil {
		return err
	}
	q, _ := parseQuery(c.r.URL.RawQuery)
	since, err := queryTime(q, "since")
	if err != nil {
		return err
	}
	if _, ok := q["since"]; !ok {
		since = h.opts.Now().Add(-DefaultUsageSince)
	}
	pts, err := h.svc.UsageHistory(c.ctx, repo, since)
	if err != nil {
		return err
	}
	return c.json(http.StatusOK, UsageHistory{Repository: repo, Points: nonNil(pts)})
}

func (h *handler) repoVerifies(c *call) error {
	repo, err := c.pathName("repo")
	if err != nil {
		return err
	}
	q, _ := parseQuery(c.r.URL.RawQuery)
	f := state.VerifyFilter{Repository: repo}
	if f.Before, f.Limit, err = pageQuery(q); err != nil {
		return err
	}
	vs, err := h.svc.Verifies(c.ctx, f)
	if err != nil {
		return err
	}
	out := VerifyList{Verifies: nonNil(vs)}
	for i := range out.Verifies {
		out.Verifies[i].Findings = nonNil(out.Verifies[i].Findings)
	}
	out.NextBefore = nextBefore(out.Verifies, f.Limit, func(v VerifyRun) int64 { return v.ID })
	return c.json(http.StatusOK, out)
}

// checkPolicy refuses a retention that keeps nothing or counts below -1.
func checkPolicy(p RetentionPolicy) error {
	for _, r := range []struct {
		k string
		v int
	}{{"keep_last", p.Last}, {"keep_hourly", p.Hourly}, {"keep_daily", p.Daily}, {"keep_weekly", p.Weekly}, {"keep_monthly", p.Monthly}, {"keep_yearly", p.Yearly}} {
		if r.v < -1 {
			return fmt.Errorf("request body: retention.%s is %d: give a count, or -1 for no limit: %w", r.k, r.v, errs.ErrUsage)
		}
	}
	if p == (RetentionPolicy{}) {
		return fmt.Errorf("request body: the retention keeps nothing: give at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly: %w", errs.ErrUsage)
	}
	return nil
}

func normPreview(p *PrunePreview) {
	p.VMs = nonNil(p.VMs)
	p.Backups = nonNil(p.Backups)
	for i := range p.Backups {
		p.Backups[i].Reasons = nonNil(p.Backups[i].Reasons)
	}
}

func (h *handler) prunePreview(c *call) error {
	repo, err := c.pathName("repo")
	if err != nil {
		return err
	}
	var req PrunePreviewRequest
	if err := c.readJSON(&req); err != nil {
		return err
	}
	for i, vm := range req.VMs {
		if err := checkName(vm); err != nil {
			return fmt.Errorf("request body: vms[%d]: %v: %w", i, err, errs.ErrUsage)
		}
	}
	if err := checkPolicy(req.Retention); err != nil {
		return err
	}
	p, err := h.svc.PrunePreview(c.ctx, repo, req.VMs, req.Retention)
	if err != nil {
		return err
	}
	normPreview(p)
	return c.json(http.StatusOK, p)
}

func (h *handler) jobPrunePreview(c *call) error {
	name, err := c.pathName("name")
	if err != nil {
		return err
	}
	p, err := h.svc.JobPrunePreview(c.ctx, name)
	if err != nil {
		return err
	}
	normPreview(p)
	return c.json(http.StatusOK, p)
}

func (h *handler) gcPreview(c *call) error {
	repo, err := c.pathName("repo")
	if err != nil {
		return err
	}
	p, err := h.svc.GCPreview(c.ctx, repo)
	if err != nil {
		return err
	}
	return c.json(http.StatusOK, p)
}

// SelectionPreviewRequest is the body of POST /selection-preview: a
// backup job's "vms" key.
type SelectionPreviewRequest struct {
	VMs []VMSelector `json:"vms"`
}

func (h *handler) selectionPreview(c *call) error {
	var req SelectionPreviewRequest
	if err := c.readJSON(&req); err != nil {
		return err
	}
	if len(req.VMs) == 0 {
		return fmt.Errorf("request body: \"vms\" is empty: give at least one {\"connection\": NAME, \"vms\": [NAMES OR GLOBS]}: %w", errs.ErrUsage)
	}
	for i, sel := range req.VMs {
		if err := checkName(sel.Connection); err != nil {
			return fmt.Errorf("request body: vms[%d].connection: %v: %w", i, err, errs.ErrUsage)
		}
		for k, n := range sel.VMs {
			if err := checkName(n); err != nil {
				return fmt.Errorf("request body: vms[%d].vms[%d]: %v: %w", i, k, err, errs.ErrUsage)
			}
		}
	}
	p, err := h.svc.SelectionPreview(c.ctx, req.VMs)
	if err != nil {
		return err
	}
	p.VMs, p.Problems = nonNil(p.VMs), nonNil(p.Problems)
	return c.json(http.StatusOK, p)
}

// maxScheduleLen bounds the schedule= of a schedule preview.
const maxScheduleLen = 256

func (h *handler) schedulePreview(c *call) error {
	q, _ := parseQuery(c.r.URL.RawQuery)
	spec := q.Get("schedule")
	switch {
	case strings.TrimSpace(spec) == "":
		return fmt.Errorf("query parameter schedule: give the schedule to preview (a cron expression such as \"0 2 * * *\", @daily, @every 6h): %w", errs.ErrUsage)
	case len(spec) > maxScheduleLen:
		return fmt.Errorf("query parameter schedule: %d bytes: at most %d: %w", len(spec), maxScheduleLen, errs.ErrUsage)
	}
	tz := q.Get("timezone")
	if len(tz) > maxScheduleLen {
		return fmt.Errorf("query parameter timezone: %d bytes: at most %d: %w", len(tz), maxScheduleLen, errs.ErrUsage)
	}
	n, err := queryInt(q, "count", 5, 1, 100)
	if err != nil {
		return err
	}
	p, err := h.svc.SchedulePreview(c.ctx, spec, tz, int(n))
	if err != nil {
		return err
	}
	p.Next = nonNil(p.Next)
	return c.json(http.StatusOK, p)
}

func (h *handler) listJobs(c *call) error {
	js, err := h.svc.Jobs(c.ctx)
	if err != nil {
		return err
	}
	js = nonNil(js)
	for i := range js {
		normJob(&js[i])
	}
	return c.json(http.StatusOK, JobList{Jobs: js})
}

func (h *handler) getJob(c *call) error {
	name, err := c.pathName("name")
	if err != nil {
		return err
	}
	j, err := h.svc.Job(c.ctx, name)
	if err != nil {
		return err
	}
	normJob(j)
	return c.json(http.StatusOK, j)
}

// jobSpec reads a job spec: a JSON object whose "name", if any (required
// when pathName is ""), is a string and equals pathName; a spec without
// one gets pathName.
func (c *call) jobSpec(pathName string) ([]byte, error) {
	b, err := c.readBody()
	if err != nil {
		return nil, err
	}
	var m map[string]json.RawMessage
	if err := decodeStrict(b, &m); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, fmt.Errorf("request body: send the job as a JSON object (the keys of a job in the configuration file, see docs/server-config.md): %w", errs.ErrUsage)
	}
	raw, ok := m["name"]
	var name string
	if ok {
		if err := json.Unmarshal(raw, &name); err != nil {
			return nil, fmt.Errorf("request body: field \"name\" must be a string: %w", errs.ErrUsage)
		}
	}
	switch {
	case pathName == "" && !ok:
		return nil, fmt.Errorf("request body: the job needs a \"name\": %w", errs.ErrUsage)
	case pathName == "":
		if err := checkName(name); err != nil {
			return nil, fmt.Errorf("request body: field \"name\": %v: %w", err, errs.ErrUsage)
		}
	case ok && name != pathName:
		return nil, fmt.Errorf("request body names job %q but the path names %q: a job cannot be renamed (create the new one, delete the old): %w", name, pathName, errs.ErrUsage)
	case !ok:
		// PUT without a name: the path's, so that the service always
		// gets a whole job.
		m["name"], _ = json.Marshal(pathName)
		return json.Marshal(m)
	}
	return b, nil
}

func (h *handler) createJob(c *call) error {
	spec, err := c.jobSpec("")
	if err != nil {
		return err
	}
	j, err := h.svc.CreateJob(c.ctx, spec)
	if err != nil {
		return err
	}
	normJob(j)
	c.w.Header().Set("Location", Prefix+"/jobs/"+pathEscape(j.Name))
	return c.json(http.StatusCreated, j)
}

func (h *handler) updateJob(c *call) error {
	name, err := c.pathName("name")
	if err != nil {
		return err
	}
	spec, err := c.jobSpec(name)
	if err != nil {
		return err
	}
	j, err := h.svc.UpdateJob(c.ctx, name, spec)
	if err != nil {
		return err
	}
	normJob(j)
	return c.json(http.StatusOK, j)
}

func (h *handler) deleteJob(c *call) error {
	name, err := c.pathName("name")
	if err != nil {
		return err
	}
	if err := h.svc.DeleteJob(c.ctx, name); err != nil {
		return err
	}
	return c.noContent()
}

func (h *handler) runJob(c *call) error {
	name, err := c.pathName("name")
	if err != nil {
		return err
	}
	r, err := h.svc.RunJob(c.ctx, name)
	if err != nil {
		return err
	}
	c.w.Header().Set("Location", Prefix+"/runs/"+strconv.FormatInt(r.ID, 10))
	return c.json(http.StatusAccepted, r)
}

func (h *handler) enableJob(c *call) error  { return h.setEnabled(c, true) }
func (h *handler) disableJob(c *call) error { return h.setEnabled(c, false) }

func (h *handler) setEnabled(c *call, on bool) error {
	name, err := c.pathName("name")
	if err != nil {
		return err
	}
	j, err := h.svc.SetJobEnabled(c.ctx, name, on)
	if err != nil {
		return err
	}
	normJob(j)
	return c.json(http.StatusOK, j)
}

func (h *handler) listRuns(c *call) error {
	q, _ := parseQuery(c.r.URL.RawQuery)
	var f state.RunFilter
	var err error
	if f.Job, err = queryName(q, "job"); err != nil {
		return err
	}
	if f.VM, err = queryName(q, "vm"); err != nil {
		return err
	}
	if st, ok := q["status"]; ok {
		if !slices.Contains(runStatuses, st[0]) {
			return fmt.Errorf("query parameter status=%q: want one of %s: %w", st[0], strings.Join(runStatuses, ", "), errs.ErrUsage)
		}
		f.Status = st[0]
	}
	if f.Before, f.Limit, err = pageQuery(q); err != nil {
		return err
	}
	runs, err := h.svc.Runs(c.ctx, f)
	if err != nil {
		return err
	}
	out := RunList{Runs: nonNil(runs)}
	out.NextBefore = nextBefore(out.Runs, f.Limit, func(r state.Run) int64 { return r.ID })
	return c.json(http.StatusOK, out)
}

func (c *call) runID() (int64, error) { return parseRunID(c.r.PathValue("id")) }

func (h *handler) getRun(c *call) error {
	id, err := c.runID()
	if err != nil {
		return err
	}
	r, err := h.svc.Run(c.ctx, id)
	if err != nil {
		return err
	}
	r.VMs = nonNil(r.VMs)
	return c.json(http.StatusOK, r)
}

func (h *handler) runLog(c *call) error {
	id, err := c.runID()
	if err != nil {
		return err
	}
	q, _ := parseQuery(c.r.URL.RawQuery)
	after, err := queryInt(q, "after", 0, 0, 1<<62)
	if err != nil {
		return err
	}
	limit, err := queryInt(q, "limit", defaultLogLimit, 1, maxLogLimit)
	if err != nil {
		return err
	}
	lines, err := h.svc.RunLog(c.ctx, id, after, int(limit))
	if err != nil {
		return err
	}
	out := LogPage{Lines: nonNil(lines), NextAfter: after}
	if n := len(lines); n > 0 {
		out.NextAfter = lines[n-1].ID
	}
	return c.json(http.StatusOK, out)
}

func (h *handler) cancelRun(c *call) error {
	id, err := c.runID()
	if err != nil {
		return err
	}
	if err := h.svc.CancelRun(c.ctx, id); err != nil {
		return err
	}
	r, err := h.svc.Run(c.ctx, id)
	if err != nil {
		return fmt.Errorf("run %d cancelled, but reading it back failed: %w", id, err)
	}
	r.VMs = nonNil(r.VMs)
	return c.json(http.StatusAccepted, r)
}

func (h *handler) restore(c *call) error {
	var req RestoreRequest
	if err := c.readJSON(&req); err != nil {
		return err
	}
	if err := checkRef(req.Repository, req.Backup); err != nil {
		return err
	}
	if (req.To != "" || req.Format != "") && (req.Libvirt != nil || req.XAPI != nil) || req.Libvirt != nil && req.XAPI != nil {
		return fmt.Errorf("request body: give one target: \"to\" (and \"format\"), \"libvirt\" or \"xapi\": %w", errs.ErrUsage)
	}
	if x := req.XAPI; x != nil {
		switch {
		case checkName(x.Connection) != nil:
			return fmt.Errorf("request body: \"xapi.connection\": %v: name one of the server's xapi connections (GET %s/connections): %w", checkName(x.Connection), Prefix, errs.ErrUsage)
		case checkName(x.SR) != nil:
			return fmt.Errorf("request body: \"xapi.sr\": %v: name the storage repository of the new VDIs (name-label or UUID): %w", checkName(x.SR), errs.ErrUsage)
		case x.VMName != "" && checkName(x.VMName) != nil:
			return fmt.Errorf("request body: \"xapi.vm_name\": %v: %w", checkName(x.VMName), errs.ErrUsage)
		}
	} else if l := req.Libvirt; l != nil {
		switch {
		case checkName(l.Connection) != nil:
			return fmt.Errorf("request body: \"libvirt.connection\": %v: name one of the server's libvirt connections (GET %s/connections): %w", checkName(l.Connection), Prefix, errs.ErrUsage)
		case checkName(l.Pool) != nil:
			return fmt.Errorf("request body: \"libvirt.pool\": %v: name the storage pool of the new volumes (see 'virsh pool-list'): %w", checkName(l.Pool), errs.ErrUsage)
		case l.VMName != "" && checkName(l.VMName) != nil:
			return fmt.Errorf("request body: \"libvirt.vm_name\": %v: %w", checkName(l.VMName), errs.ErrUsage)
		}
	} else if req.To == "" {
		return fmt.Errorf("request body: \"to\" (an absolute directory on the server), \"libvirt\" or \"xapi\" is required: %w", errs.ErrUsage)
	}
	switch req.Format {
	case "", "raw", "qcow2":
	default:
		return fmt.Errorf("request body: format %q: use raw or qcow2: %w", req.Format, errs.ErrUsage)
	}
	res, err := h.svc.Restore(c.ctx, req)
	if err != nil {
		return err
	}
	res.Files = nonNil(res.Files)
	if res.Libvirt != nil {
		res.Libvirt.Volumes = nonNil(res.Libvirt.Volumes)
	}
	if res.XAPI != nil {
		res.XAPI.Disks = nonNil(res.XAPI.Disks)
	}
	return c.json(http.StatusOK, res)
}

// ConnectionList is the answer of GET /connections.
type ConnectionList struct {
	Connections []Connection `json:"connections"`
}

func (h *handler) listConnections(c *call) error {
	cs, err := h.svc.Connections(c.ctx)
	if err != nil {
		return err
	}
	return c.json(http.StatusOK, ConnectionList{Connections: nonNil(cs)})
}

// checkRef checks the repository and backup of a request body.
func checkRef(repo, backup string) error {
	if err := checkName(repo); err != nil {
		return fmt.Errorf("request body: \"repository\": %v: %w", err, errs.ErrUsage)
	}
	if _, err := parseBackupID(backup); err != nil {
		return fmt.Errorf("request body: \"backup\": %w", err)
	}
	return nil
}

func (h *handler) listServes(c *call) error {
	ss, err := h.svc.Serves(c.ctx)
	if err != nil {
		return err
	}
	return c.json(http.StatusOK, ServeList{Serves: nonNil(ss)})
}

func (h *handler) startServe(c *call) error {
	var req ServeRequest
	if err := c.readJSON(&req); err != nil {
		return err
	}
	if err := checkRef(req.Repository, req.Backup); err != nil {
		return err
	}
	s, err := h.svc.StartServe(c.ctx, req)
	if err != nil {
		return err
	}
	c.w.Header().Set("Location", Prefix+"/serves/"+pathEscape(s.ID))
	return c.json(http.StatusCreated, s)
}

func (h *handler) stopServe(c *call) error {
	id, err := parseServeID(c.r.PathValue("id"))
	if err != nil {
		return err
	}
	if err := h.svc.StopServe(c.ctx, id); err != nil {
		return err
	}
	return c.noContent()
}
