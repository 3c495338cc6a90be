// Package metrics owns the vmshadow server's Prometheus metrics: a
// collector (built on github.com/prometheus/client_golang) that reads, at
// each scrape, the server's database through Source and the repositories'
// statistics through Repositories (a StatsCache: computing statistics reads
// every index of a repository, far too slow for a scrape, so they are
// cached, refreshed after each job that changes a repository and when
// older than a maximum age).
//
// Every metric is a gauge computed at scrape time, except
// vmshadow_job_runs_total, a counter read from the database's run totals
// (which the database keeps as runs end and which deleting old runs does
// not lower). The metrics, all prefixed vmshadow_ (docs/metrics.md has the
// same list as a table):
//
// Per job and VM, labels job and vm, from the database (the job's latest
// successful backup of the VM, and its latest finished result):
//
//	vmshadow_vm_last_success_timestamp_seconds  end of the last successful backup (unix time)
//	vmshadow_vm_last_success_duration_seconds   its duration
//	vmshadow_vm_last_success_read_bytes         bytes it read from the VM's disks
//	vmshadow_vm_last_success_stored_bytes       bytes it stored (new chunks, after compression and encryption)
//	vmshadow_vm_last_success_freeze_seconds     how long the guest's file systems were frozen
//	vmshadow_vm_last_success_consistency        its consistency level: 3 application, 2 filesystem, 1 crash, 0 unknown
//	vmshadow_vm_last_result_timestamp_seconds   end of the latest finished backup, successful or not
//	vmshadow_vm_last_result_success             1 if that latest backup succeeded, else 0 (failed, cancelled, interrupted)
//
// Per job, labels job, kind (backup, verify, prune, gc, copy) and result
// (succeeded, failed, cancelled, interrupted, skipped):
//
//	vmshadow_job_runs_total                     runs ended with that result since the database was created (counter)
//
// Per repository, label repository (its name in the configuration), from
// the cached statistics (see package repostats for what each figure
// means) and the database's verify results:
//
//	vmshadow_repository_stored_bytes                  bytes stored (every blob)
//	vmshadow_repository_logical_bytes                 sum over backups of their disks' sizes
//	vmshadow_repository_unique_bytes                  plaintext of the distinct chunks referenced
//	vmshadow_repository_unreferenced_bytes            stored chunks no backup references (gc's to remove)
//	vmshadow_repository_deduplication_factor          logical / stored bytes
//	vmshadow_repository_backups                       backups (readable manifests)
//	vmshadow_repository_unreadable_backups            backups whose manifest cannot be read
//	vmshadow_repository_chunks                        chunks stored
//	vmshadow_repository_stats_timestamp_seconds       when these statistics were computed
//	vmshadow_repository_stats_error                   1 if the latest refresh of the statistics failed (the figures are older), else 0
//	vmshadow_repository_vm_backups                    backups of a VM (labels repository, vm)
//	vmshadow_repository_vm_newest_backup_timestamp_seconds  a VM's newest backup's snapshot time (labels repository, vm)
//	vmshadow_repository_last_verify_timestamp_seconds end of the latest verify
//	vmshadow_repository_last_verify_backups           backups it checked
//	vmshadow_repository_last_verify_problems          damaged or missing manifests, indexes and chunks it found
//
// The server's own:
//
//	vmshadow_build_info                         1, labels version, revision, goversion
//
// A repository's statistics appear once first computed; a VM's per-job
// metrics once the job has a result for it. When reading the database
// fails, the scrape reports the error for the metrics it could not read
// (serve with Handler, which keeps the others).
//
// Wiring it into the server:
//
//	cache := metrics.NewStatsCache(ctx, repoNames, metrics.DefaultMaxAge,
//		func(ctx context.Context, name string) (*repostats.Stats, error) {
//			return repostats.Compute(ctx, openRepos[name])
//		})
//	reg := metrics.NewRegistry(metrics.New(metrics.Options{Source: db, Repos: cache, Jobs: configuredJobNames, Version: version}))
//	mux.Handle("GET /metrics", metrics.Handler(reg, logger))
//	// after each job that wrote to repository name: cache.Refresh(name)
//	// after each verify: db.RecordVerify(ctx, state.Verify{...})
//	// on reload: cache.SetRepositories(newNames); at exit: cancel ctx, cache.Wait()
package metrics

import (
	"context"
	"net/http"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vmshadow/vmshadow/internal/server/state"
)

// Source is what the collector reads from the server's database;
// *state.DB implements it.
type Source interface {
	LastResultsByJob(ctx context.Context) (last, lastSuccess []state.JobVMResult, err error)
	RunCounts(ctx context.Context) ([]state.RunCount, error)
	LastVerifies(ctx context.Context) ([]state.Verify, error)
}

// Repositories gives the repositories' cached statistics without
// computing them; *StatsCache implements it.
type Repositories interface {
	Stats() []RepoStats
}

// Options configure a Collector.
type Options struct {
	Source Source       // required
	Repos  Repositories // nil: no repository statistics
	// Jobs, if set, names the jobs configured now: the per-job metrics of
	// other jobs (removed from the configuration; their history stays in
	// the database) are left out, so that their series end. nil: every job
	// the database knows.
	Jobs func() []string
	// Version is the server's version (main.version), for build_info.
	Version string
	// Timeout bounds the database reads of one scrape; default 10 s.
	Timeout time.Duration
}

// Collector is the server's prometheus.Collector.
type Collector struct {
	o Options

	lastSuccessTime, lastSuccessDuration, lastSuccessRead, lastSuccessStored, lastSuccessFreeze, lastSuccessConsistency *prometheus.Desc
	lastResultTime, lastResultSuccess                                                                                   *prometheus.Desc
	runs                                                                                                                *prometheus.Desc
	stored, logical, unique, unreferenced, dedup, backups, unreadable, chunks, statsTime, statsError                    *prometheus.Desc
	vmBackups, vmNewest                                                                                                 *prometheus.Desc
	verifyTime, verifyBackups, verifyProblems                                                                           *prometheus.Desc
	buildInfo                                                                                                           *prometheus.Desc
	build                                                                                                               [3]string
}

// New returns a collector; register it with a prometheus.Registerer (or
// use NewRegistry).
func New(o Options) *Collector {
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	jv := []string{"job", "vm"}
	repo := []string{"repository"}
	rv := []string{"repository", "vm"}
	d := func(name, help string, labels []string) *prometheus.Desc {
		return prometheus.NewDesc("vmshadow_"+name, help, labels, nil)
	}
	c := &Collector{o: o,
		lastSuccessTime:        d("vm_last_success_timestamp_seconds", "End of the job's last successful backup of the VM, in seconds since the Unix epoch.", jv),
		lastSuccessDuration:    d("vm_last_success_duration_seconds", "Duration of the job's last successful backup of the VM.", jv),
		lastSuccessRead:        d("vm_last_success_read_bytes", "Bytes the job's last successful backup of the VM read from its disks.", jv),
		lastSuccessStored:      d("vm_last_success_stored_bytes", "Bytes the job's last successful backup of the VM stored in the repository (new chunks, after compression and encryption).", jv),
		lastSuccessFreeze:      d("vm_last_success_freeze_seconds", "How long the job's last successful backup of the VM kept the guest's file systems frozen.", jv),
		lastSuccessConsistency: d("vm_last_success_consistency", "Consistency of the job's last successful backup of the VM: 3 application, 2 filesystem, 1 crash, 0 unknown.", jv),
		lastResultTime:         d("vm_last_result_timestamp_seconds", "End of the job's latest finished backup of the VM, successful or not, in seconds since the Unix epoch.", jv),
		lastResultSuccess:      d("vm_last_result_success", "1 if the job's latest finished backup of the VM succeeded, 0 if it failed, was cancelled or was interrupted.", jv),
		runs:                   d("job_runs_total", "Runs of the job that ended with the result (skipped: not started because the previous run was still going).", []string{"job", "kind", "result"}),
		stored:                 d("repository_stored_bytes", "Bytes the repository stores: every blob (chunks, indexes, manifests, config, keys, locks, quarantine).", repo),
		logical:                d("repository_logical_bytes", "Sum over the repository's backups of their disks' and files' sizes: what restoring every backup would write.", repo),
		unique:                 d("repository_unique_bytes", "Plaintext bytes of the distinct chunks the repository's backups reference, each counted once.", repo),
		unreferenced:           d("repository_unreferenced_bytes", "Stored bytes of the chunks no backup references, which gc removes after its grace period.", repo),
		dedup:                  d("repository_deduplication_factor", "Logical bytes / stored bytes: how many bytes of VM disks each stored byte stands for (deduplication, zero chunks and compression together).", repo),
		backups:                d("repository_backups", "Backups in the repository (readable manifests).", repo),
		unreadable:             d("repository_unreadable_backups", "Backups of the repository whose manifest cannot be read (run vmshadow verify).", repo),
		chunks:                 d("repository_chunks", "Chunks stored in the repository.", repo),
		statsTime:              d("repository_stats_timestamp_seconds", "When the repository's statistics were computed, in seconds since the Unix epoch.", repo),
		statsError:             d("repository_stats_error", "1 if the latest refresh of the repository's statistics failed (the figures shown are older), else 0.", repo),
		vmBackups:              d("repository_vm_backups", "Backups of the VM in the repository.", rv),
		vmNewest:               d("repository_vm_newest_backup_timestamp_seconds", "Snapshot time of the VM's newest backup in the repository, in seconds since the Unix epoch.", rv),
		verifyTime:             d("repository_last_verify_timestamp_seconds", "End of the repository's latest verify, in seconds since the Unix epoch.", repo),
		verifyBackups:          d("repository_last_verify_backups", "Backups the repository's latest verify checked.", repo),
		verifyProblems:         d("repository_last_verify_problems", "Damaged or missing manifests, indexes and chunks the repository's latest verify found.", repo),
		buildInfo:              d("build_info", "Always 1; the labels describe the vmshadow server's build.", []string{"version", "revision", "goversion"}),
	}
	c.build = [3]string{o.Version, "unknown", runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				c.build[1] = s.Value
			}
		}
	}
	return c
}

// Describe sends every metric's description.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.lastSuccessTime, c.lastSuccessDuration, c.lastSuccessRead, c.lastSuccessStored, c.lastSuccessFreeze,
		c.lastSuccessConsistency, c.lastResultTime, c.lastResultSuccess, c.runs, c.stored, c.logical, c.unique, c.unreferenced, c.dedup,
		c.backups, c.unreadable, c.chunks, c.statsTime, c.statsError, c.vmBackups, c.vmNewest, c.verifyTime, c.verifyBackups,
		c.verifyProblems, c.buildInfo} {
		ch <- d
	}
}

// ConsistencyLevel is the number vmshadow_vm_last_success_consistency
// shows for a consistency: higher is better, so that an alert can ask
// for at least a level.
func ConsistencyLevel(consistency string) float64 {
	switch consistency {
	case "application":
		return 3
	case "filesystem":
		return 2
	case "crash":
		return 1
	}
	return 0
}

func seconds(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// Collect reads the database and the cached statistics and sends the
// metrics.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), c.o.Timeout)
	defer cancel()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	ch <- prometheus.MustNewConstMetric(c.buildInfo, prometheus.GaugeValue, 1, c.build[:]...)
	shown := func(string) bool { return true }
	if c.o.Jobs != nil {
		jobs := map[string]bool{}
		for _, j := range c.o.Jobs() {
			jobs[j] = true
		}
		shown = func(j string) bool { return jobs[j] }
	}

	last, ok, err := c.o.Source.LastResultsByJob(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.lastSuccessTime, err)
	} else {
		for _, r := range ok {
			if !shown(r.Job) {
				continue
			}
			gauge(c.lastSuccessTime, seconds(r.Ended), r.Job, r.VM)
			gauge(c.lastSuccessDuration, r.Ended.Sub(r.Started).Seconds(), r.Job, r.VM)
			gauge(c.lastSuccessRead, float64(r.BytesRead), r.Job, r.VM)
			gauge(c.lastSuccessStored, float64(r.BytesNew), r.Job, r.VM)
			gauge(c.lastSuccessFreeze, float64(r.FreezeMS)/1000, r.Job, r.VM)
			gauge(c.lastSuccessConsistency, ConsistencyLevel(r.Consistency), r.Job, r.VM)
		}
		for _, r := range last {
			if !shown(r.Job) {
				continue
			}
			gauge(c.lastResultTime, seconds(r.Ended), r.Job, r.VM)
			success := 0.0
			if r.Status == state.Succeeded {
				success = 1
			}
			gauge(c.lastResultSuccess, success, r.Job, r.VM)
		}
	}

	counts, err := c.o.Source.RunCounts(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.runs, err)
	} else {
		for _, rc := range counts {
			if !shown(rc.Job) {
				continue
			}
			ch <- prometheus.MustNewConstMetric(c.runs, prometheus.CounterValue, float64(rc.Count), rc.Job, rc.Kind, rc.Status)
		}
	}

	verifies, err := c.o.Source.LastVerifies(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.verifyTime, err)
	} else {
		for _, v := range verifies {
			gauge(c.verifyTime, seconds(v.Time), v.Repository)
			gauge(c.verifyBackups, float64(v.Backups), v.Repository)
			gauge(c.verifyProblems, float64(v.Problems), v.Repository)
		}
	}

	if c.o.Repos == nil {
		return
	}
	for _, rs := range c.o.Repos.Stats() {
		s, name := rs.Stats, rs.Repository
		if s == nil {
			if rs.Err != nil {
				gauge(c.statsError, 1, name)
			}
			continue // not computed yet
		}
		failed := 0.0
		if rs.Err != nil {
			failed = 1
		}
		gauge(c.statsError, failed, name)
		gauge(c.statsTime, seconds(rs.Time), name)
		gauge(c.stored, float64(s.StoredBytes), name)
		gauge(c.logical, float64(s.LogicalBytes), name)
		gauge(c.unique, float64(s.UniqueBytes), name)
		gauge(c.unreferenced, float64(s.UnreferencedBytes), name)
		gauge(c.dedup, s.DedupFactor, name)
		gauge(c.backups, float64(s.Backups), name)
		gauge(c.unreadable, float64(s.UnreadableBackups), name)
		gauge(c.chunks, float64(s.Chunks), name)
		for _, v := range s.PerVM {
			gauge(c.vmBackups, float64(v.Backups), name, v.VM)
			gauge(c.vmNewest, seconds(v.Newest), name, v.VM)
		}
	}
}

// NewRegistry returns a registry holding c and the standard Go runtime
// and process collectors (go_*, process_*: memory, goroutines, open file
// descriptors, start time).
func NewRegistry(c *Collector) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(c, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// Handler serves reg's metrics in the Prometheus exposition formats. A
// metric that cannot be read (the database failing) is left out and the
// error logged through errorLog (may be nil), instead of failing the whole
// scrape.
func Handler(reg *prometheus.Registry, errorLog promhttp.Logger) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: errorLog, ErrorHandling: promhttp.ContinueOnError, Registry: reg})
}
