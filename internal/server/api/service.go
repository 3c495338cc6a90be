package api

import (
	"context"
	"time"

	"github.com/vmshadow/vmshadow/internal/server/state"
)

// Service is what the API serves: the server implements it (package
// server); the handlers only translate HTTP to these calls and back.
//
// Errors: errs.ErrNotFound (404), errs.ErrUsage (400), errs.ErrAuth (401),
// errs.ErrBusy (409: a run already going, a job defined in the config
// file that cannot be edited through the API), anything else 500. The
// message of an error is shown to the client: implementations never put a
// secret in one.
type Service interface {
	// Authenticate returns the token whose secret this is (ErrAuth if
	// none, or revoked).
	Authenticate(ctx context.Context, secret string) (*state.Token, error)

	// VMs lists every VM the server knows: those its backup jobs select
	// (found through their connections now) and those with backups in
	// its repositories.
	VMs(ctx context.Context) ([]VM, error)
	// VMResults returns a VM's results in the server's runs (failed and
	// cancelled tries too), newest first: in runs with an ID below before
	// (0: any), at most limit.
	VMResults(ctx context.Context, vm string, before int64, limit int) ([]state.VMResult, error)
	// Backups lists backups, newest first.
	Backups(ctx context.Context, f BackupFilter) ([]Backup, error)
	// Backup returns one backup by ID or unique ID prefix.
	Backup(ctx context.Context, repository, id string) (*Backup, error)
	// DeleteBackup removes a backup's manifest (as prune does; gc frees
	// its chunks later).
	DeleteBackup(ctx context.Context, repository, id string) error

	// Jobs lists the jobs with their state (enabled, running run, next
	// scheduled times).
	Jobs(ctx context.Context) ([]Job, error)
	Job(ctx context.Context, name string) (*Job, error)
	// CreateJob, UpdateJob and DeleteJob manage jobs defined through the
	// API; spec holds the job as the configuration file writes it (the
	// same keys, as JSON). Jobs of the configuration file are ErrBusy.
	CreateJob(ctx context.Context, spec []byte) (*Job, error)
	UpdateJob(ctx context.Context, name string, spec []byte) (*Job, error)
	DeleteJob(ctx context.Context, name string) error
	// SetJobEnabled enables or disables a job's schedule (kept across
	// restarts; a running run goes on).
	SetJobEnabled(ctx context.Context, name string, enabled bool) (*Job, error)
	// RunJob starts a run of the job now and returns it; ErrBusy if the
	// job is running.
	RunJob(ctx context.Context, name string) (*state.Run, error)

	// Runs lists runs, newest first.
	Runs(ctx context.Context, f state.RunFilter) ([]state.Run, error)
	// Run returns a run with its VMs' results.
	Run(ctx context.Context, id int64) (*RunDetail, error)
	// RunLog returns a run's log lines after line after.
	RunLog(ctx context.Context, id, after int64, limit int) ([]state.LogLine, error)
	// CancelRun cancels a running run: its snapshot sets are released,
	// the repository stays valid. ErrNotFound if it is not running.
	CancelRun(ctx context.Context, id int64) error
	// Watch streams a run's events (progress, log lines, VM results,
	// the end) until the run ends (the channel is closed after an Event
	// of type "end") or ctx is done. A run that already ended gives its
	// "end" event alone.
	Watch(ctx context.Context, id int64) (<-chan Event, error)

	// Repositories lists the repositories with their status.
	Repositories(ctx context.Context) ([]Repository, error)
	// UsageHistory returns a repository's usage points at or after
	// since, oldest first (state.RecordUsage bounds them).
	UsageHistory(ctx context.Context, repository string, since time.Time) ([]state.Usage, error)
	// Verifies lists a repository's verify runs, newest first, each with
	// its findings (the error lines of its run's log).
	Verifies(ctx context.Context, f state.VerifyFilter) ([]VerifyRun, error)
	// PrunePreview applies a retention policy to the backups of the VMs
	// of a repository (all VMs when vms is empty) without removing
	// anything: prune's dry run.
	PrunePreview(ctx context.Context, repository string, vms []string, policy RetentionPolicy) (*PrunePreview, error)
	// JobPrunePreview is PrunePreview with a job's rules: a backup job's
	// retention for the VMs it selects now, a prune job's for every VM of
	// its repository. ErrUsage for a job without retention.
	JobPrunePreview(ctx context.Context, name string) (*PrunePreview, error)
	// GCPreview is gc's dry run on a repository (with the grace of its
	// gc job, if any; else the default): what it would delete.
	GCPreview(ctx context.Context, repository string) (*GCPreview, error)
	// SelectionPreview lists the VMs a backup job's "vms" selectors pick
	// now (their connections queried, as a run does), and each selector's
	// problem (an unknown connection, a named VM not found).
	SelectionPreview(ctx context.Context, selectors []VMSelector) (*SelectionPreview, error)
	// SchedulePreview parses a schedule as a job's (in timezone, "" for
	// the configuration's) and returns its next n times after now.
	// ErrUsage, naming the mistake, for a bad schedule or time zone.
	SchedulePreview(ctx context.Context, schedule, timezone string, n int) (*SchedulePreview, error)

	// Restore restores a backup's disks to files on the server, or (with
	// req.Libvirt) into new volumes of a storage pool and a new domain
	// through one of the server's libvirt connections, or (with req.XAPI)
	// into new VDIs (and a halted VM) of a XenServer / XCP-ng pool through
	// one of its XAPI connections.
	Restore(ctx context.Context, req RestoreRequest) (*RestoreResult, error)
	// Connections lists the configured connections (names and types
	// only: never an address or credential).
	Connections(ctx context.Context) ([]Connection, error)
	// StartServe serves a backup's disk over NBD (instant restore),
	// StopServe stops it, Serves lists the running ones.
	StartServe(ctx context.Context, req ServeRequest) (*Serve, error)
	StopServe(ctx context.Context, id string) error
	Serves(ctx context.Context) ([]Serve, error)
}

// VM is a VM the server knows.
type VM struct {
	Name       string   `json:"name"`       // its name in the repositories
	Connection string   `json:"connection"` // "" when known only from backups
	Jobs       []string `json:"jobs"`       // backup jobs that select it
	// Last is the VM's latest backup result (any status), LastSuccess
	// its latest successful one, from the server's run history.
	Last        *state.VMResult `json:"last,omitempty"`
	LastSuccess *state.VMResult `json:"last_success,omitempty"`
	// LastBackup is its newest backup in any repository (the
	// repositories are the truth: this is set even without run history).
	LastBackup *Backup `json:"last_backup,omitempty"`
	// AgeS is the age of LastBackup in seconds (absent without one).
	AgeS *float64 `json:"age_s,omitempty"`
	// Status: "fresh" (a backup no older than its jobs' schedule
	// allows), "late", "failed" (the last run of it failed), "never".
	Status string `json:"status"`
}

// BackupFilter selects backups.
type BackupFilter struct {
	Repository string // "" every repository
	VM         string // "" every VM
	Limit      int    // 0: default 100
	Before     time.Time
}

// Backup is a stored backup as the API shows it.
type Backup struct {
	ID          string    `json:"id"`
	ShortID     string    `json:"short_id"`
	Repository  string    `json:"repository"`
	VM          string    `json:"vm"`
	Time        time.Time `json:"time"`
	Host        string    `json:"host,omitempty"`
	Tags        []string  `json:"tags"`
	Source      string    `json:"source"`
	Mode        string    `json:"mode"`
	Reason      string    `json:"reason,omitempty"`
	Consistency string    `json:"consistency,omitempty"`
	SetID       string    `json:"set_id,omitempty"`
	Disks       []Disk    `json:"disks"`
	Files       []Disk    `json:"files,omitempty"`
	Definition  string    `json:"definition,omitempty"`
	BytesRead   int64     `json:"bytes_read"`
	BytesNew    int64     `json:"bytes_new"`
	DurationS   float64   `json:"duration_s"`
	Origin      string    `json:"origin,omitempty"`
	// Group is the consistency group the backup is a member of (its
	// manifest's group); a member is removed with its group backup only.
	Group string `json:"group,omitempty"`
	// FreezeMS is how long the VM's I/O was frozen for it (absent when
	// no run of this server stored it, or nothing was frozen).
	FreezeMS int64 `json:"freeze_ms,omitempty"`
	// Run is the server's run that stored it (absent when another did).
	Run int64 `json:"run,omitempty"`
	// Verified is when a verify job of the server last found it intact
	// (absent: never).
	Verified time.Time `json:"verified,omitzero"`
}

// Disk is one disk (or file) of a backup.
type Disk struct {
	Name string `json:"name"`
	Size int64  `json:"size"`
}

// Job is a job with its state.
type Job struct {
	Name     string `json:"name"`
	Type     string `json:"type"`   // backup, verify, prune, gc, copy
	Source   string `json:"source"` // "config" (the file) or "api"
	Enabled  bool   `json:"enabled"`
	Schedule string `json:"schedule,omitempty"`
	// Spec is the job's settings as the configuration file writes them.
	Spec map[string]any `json:"spec"`
	// Next are its next scheduled start times (random delay included).
	Next []time.Time `json:"next"`
	// Running is the ID of its running run, if any.
	Running *int64 `json:"running,omitempty"`
	// LastRun is its latest run.
	LastRun *state.Run `json:"last_run,omitempty"`
	// VMs are the VMs a backup job selects now (connections queried).
	VMs []string `json:"vms,omitempty"`
}

// RunDetail is a run with each VM's result.
type RunDetail struct {
	state.Run
	VMs []state.VMResult `json:"vms"`
}

// Event is one event of a running run, sent as Server-Sent Events with
// the Type as the event name and the JSON of Data as its data.
type Event struct {
	Type string `json:"type"` // "progress", "log", "vm", "end"
	Data any    `json:"data"`
}

// Progress is the data of a "progress" event: one VM's backup (or the
// run's task for other job types).
type Progress struct {
	VM    string  `json:"vm,omitempty"`
	Phase string  `json:"phase"` // freezing, reading, storing, verify, ...
	Done  int64   `json:"done"`
	Total int64   `json:"total"`
	Rate  float64 `json:"rate_bytes_per_s"`
	ETA   float64 `json:"eta_s,omitempty"`
}

// Repository is a repository's status.
type Repository struct {
	Name         string        `json:"name"`
	Location     string        `json:"location"` // as configured (no credentials)
	Backups      int           `json:"backups"`
	VMs          int           `json:"vms"`
	StoredBytes  int64         `json:"stored_bytes"`
	LogicalBytes int64         `json:"logical_bytes"`
	DedupFactor  float64       `json:"dedup_factor"`
	StatsTime    time.Time     `json:"stats_time,omitzero"`
	LastVerify   *VerifyStatus `json:"last_verify,omitempty"`
	Error        string        `json:"error,omitempty"` // the repository could not be opened
}

// VerifyStatus is the outcome of a repository's latest verify run.
type VerifyStatus struct {
	Run      int64     `json:"run"`
	Time     time.Time `json:"time"`
	Backups  int       `json:"backups"`
	Problems int       `json:"problems"`
}

// RestoreRequest restores a backup's disks to files on the server.
type RestoreRequest struct {
	Repository string   `json:"repository"`
	Backup     string   `json:"backup"`
	Disks      []string `json:"disks,omitempty"` // default all
	// To is a directory on the server (absolute; created; files never
	// overwritten), Format raw (default) or qcow2.
	To     string `json:"to,omitempty"`
	Format string `json:"format,omitempty"`
	// Libvirt, instead of To, restores into libvirt; XAPI into a
	// XenServer / XCP-ng pool.
	Libvirt *LibvirtTarget `json:"libvirt,omitempty"`
	XAPI    *XAPITarget    `json:"xapi,omitempty"`
}

// XAPITarget says where a restore into a XenServer / XCP-ng pool goes (as
// the CLI's restore --to-xapi URL --sr SR [--vm-name NAME]).
type XAPITarget struct {
	// Connection is an xapi connection of the server's configuration.
	Connection string `json:"connection"`
	SR         string `json:"sr"`                // name-label or UUID of the new VDIs' storage repository
	VMName     string `json:"vm_name,omitempty"` // if set, a halted VM of this name gets the disks
}

// XAPIResult is what a restore into a pool made.
type XAPIResult struct {
	Connection string     `json:"connection"`
	SR         string     `json:"sr"`                // its UUID
	VM         string     `json:"vm_uuid,omitempty"` // the new VM's UUID
	Disks      []XAPIDisk `json:"disks"`
}

// XAPIDisk is one restored disk in a pool.
type XAPIDisk struct {
	Name string `json:"name"`
	VDI  string `json:"vdi"` // its UUID
	Size int64  `json:"size"`
}

// LibvirtTarget says where a restore into libvirt goes (as the CLI's
// restore --to-libvirt URI --pool POOL [--vm-name NAME] [--start]).
type LibvirtTarget struct {
	// Connection is a libvirt connection of the server's configuration
	// (its URI must be local: the server writes the volumes through
	// their paths).
	Connection string `json:"connection"`
	Pool       string `json:"pool"`
	VMName     string `json:"vm_name,omitempty"` // default the VM's name + "-restored"
	Start      bool   `json:"start,omitempty"`
}

// RestoreResult lists the restored files (a restore to files) or what a
// restore into libvirt made.
type RestoreResult struct {
	Files   []RestoredFile `json:"files"`
	Libvirt *LibvirtResult `json:"libvirt,omitempty"`
	XAPI    *XAPIResult    `json:"xapi,omitempty"`
}

// LibvirtResult is what a restore into libvirt made.
type LibvirtResult struct {
	Connection string          `json:"connection"`
	Pool       string          `json:"pool"`
	Domain     string          `json:"domain"`
	UUID       string          `json:"uuid"`
	Definition string          `json:"definition"` // "stored" or "minimal"
	Started    bool            `json:"started"`
	Volumes    []LibvirtVolume `json:"volumes"`
	Warnings   []string        `json:"warnings,omitempty"`
}

// LibvirtVolume is one restored disk in libvirt.
type LibvirtVolume struct {
	Disk   string `json:"name"`
	Volume string `json:"volume"`
	Path   string `json:"path"`
	Format string `json:"format"`
	Target string `json:"target"`
}

// Connection is a configured connection: its name and type (qmp, xapi,
// libvirt).
type Connection struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

// RestoredFile is one restored disk or definition file.
type RestoredFile struct {
	Disk string `json:"disk"`
	Path string `json:"path"`
	Size int64  `json:"size"`
}

// ServeRequest serves one disk of a backup over NBD.
type ServeRequest struct {
	Repository string `json:"repository"`
	Backup     string `json:"backup"`
	Disk       string `json:"disk,omitempty"` // default the first
	Writable   bool   `json:"writable,omitempty"`
}

// Serve is a running instant restore.
type Serve struct {
	ID         string    `json:"id"`
	Repository string    `json:"repository"`
	Backup     string    `json:"backup"`
	Disk       string    `json:"disk"`
	URI        string    `json:"uri"` // nbd+unix:///DISK?socket=PATH
	Writable   bool      `json:"writable"`
	Started    time.Time `json:"started"`
}

// VerifyRun is one verify of a repository with its findings.
type VerifyRun struct {
	ID       int64     `json:"id"`
	Run      int64     `json:"run,omitempty"` // 0: not a job's run
	Time     time.Time `json:"time"`
	Backups  int64     `json:"backups"`
	Chunks   int64     `json:"chunks"`
	Problems int64     `json:"problems"`
	// Findings are the first error lines of its run's log (each damaged
	// or missing blob, each unreadable manifest); FindingsTotal counts
	// them all.
	Findings      []state.LogLine `json:"findings"`
	FindingsTotal int             `json:"findings_total"`
}

// RetentionPolicy is a retention's rules, as a job's "retention" key
// writes them (0 or absent: the rule is off; -1: no limit).
type RetentionPolicy struct {
	Last    int `json:"keep_last,omitempty"`
	Hourly  int `json:"keep_hourly,omitempty"`
	Daily   int `json:"keep_daily,omitempty"`
	Weekly  int `json:"keep_weekly,omitempty"`
	Monthly int `json:"keep_monthly,omitempty"`
	Yearly  int `json:"keep_yearly,omitempty"`
}

// PrunePreview is what a retention would keep and remove, and why.
type PrunePreview struct {
	Repository string          `json:"repository"`
	Job        string          `json:"job,omitempty"` // the job whose rules these are
	Policy     RetentionPolicy `json:"retention"`
	VMs        []string        `json:"vms"` // the VMs considered (empty: every VM)
	Kept       int             `json:"kept"`
	Removed    int             `json:"removed"`
	// Backups are newest first per VM, VMs by name: keep or not, and
	// the rules that keep it (for a removed backup, why none does).
	Backups []PruneDecision `json:"backups"`
}

// PruneDecision is a retention's verdict on one backup.
type PruneDecision struct {
	ID      string    `json:"id"`
	ShortID string    `json:"short_id"`
	VM      string    `json:"vm"`
	Time    time.Time `json:"time"`
	Keep    bool      `json:"keep"`
	Reasons []string  `json:"reasons"`
}

// GCPreview is what gc would delete now.
type GCPreview struct {
	Repository       string  `json:"repository"`
	GraceS           float64 `json:"grace_s"`
	Backups          int     `json:"backups"`
	ChunksReferenced int     `json:"chunks_referenced"`
	ChunksDeleted    int     `json:"chunks_deleted"` // would be
	IndexesDeleted   int     `json:"indexes_deleted"`
	BytesDeleted     int64   `json:"bytes_deleted"`
	ChunksInGrace    int     `json:"chunks_in_grace"`
	IndexesInGrace   int     `json:"indexes_in_grace"`
}

// SchedulePreview is a schedule's next times.
type SchedulePreview struct {
	Schedule string      `json:"schedule"`
	Timezone string      `json:"timezone"`
	Next     []time.Time `json:"next"`
}

// VMSelector is one entry of a backup job's "vms" key.
type VMSelector struct {
	Connection string   `json:"connection"`
	VMs        []string `json:"vms,omitempty"` // names or globs; none: every VM
}

// SelectionPreview is what selectors pick now.
type SelectionPreview struct {
	VMs      []SelectedVM `json:"vms"`
	Problems []string     `json:"problems"`
}

// SelectedVM is one VM a selection picks: its name in the repositories,
// its connection and, for a XenServer pool's VM, its UUID.
type SelectedVM struct {
	Name       string `json:"name"`
	Connection string `json:"connection"`
	UUID       string `json:"uuid,omitempty"`
}
