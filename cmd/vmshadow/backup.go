package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/livebackup"
	"github.com/vmshadow/vmshadow/internal/progress"
	xapiprov "github.com/vmshadow/vmshadow/internal/provider/xapi"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/vmbackup"
	"github.com/vmshadow/vmshadow/internal/vmconn"
)

func init() { commands = append(commands, newBackupCmd) }

// backupFlags are the flags of the backup command. Each kind of source
// (disk image files now, a running VM through --qmp later) turns them into
// a backup.Job in its own function; runBackup does the rest.
type backupFlags struct {
	repo  repoFlags
	disks []string // NAME=IMAGE
	tags  []string

	live   vmFlags // --qmp or --xapi and the snapshot-set flags: back up a running VM
	full   bool
	conns  int
	repoVM string // with --xapi: the VM's name in the repository
}

// maxNBDConnections bounds --nbd-connections: more connections per disk
// than this do not read faster, only load the NBD server.
const maxNBDConnections = 64

func newBackupCmd(a *app) *cobra.Command {
	var f backupFlags
	cmd := &cobra.Command{
		Use:   "backup --repo DIR (--qmp SOCKET [--qga SOCKET] [--hook PATH]... | --xapi URL --vm NAME|UUID [--hook PATH]... | --libvirt URI --vm NAME|UUID [--guest-agent] [--hook PATH]... | --vm NAME --disk NAME=IMAGE.raw...)",
		Short: "Back up a running VM, or disk images, into a repository",
		Long: `With --qmp, back up a running QEMU VM: take a snapshot set (freezing the
writers given with --qga and --hook), read its shadow copies over NBD, and
release it. The first backup into a repository reads every allocated extent;
later ones read only what the VM's change tracking marks as changed since the
last backup into the same repository, and take the rest from that backup.

With --xapi and --vm, back up a VM of a XenServer / XCP-ng pool the same way:
VM.snapshot with the --hook writers frozen around it, the snapshot's disks read
over the pool's NBD (TLS), and changed block tracking (CBT) for incrementals.

With --libvirt URI (usually qemu:///system) and --vm, back up a libvirt
domain through libvirt's backup API (pull mode, one checkpoint per repository
for incrementals); --guest-agent freezes its file systems through libvirt.

With --disk, back up the raw disk images of a VM (shut down, or any image).

Unallocated ranges are not read; chunks already in the repository are not
stored again. The summary lists what was read and stored per disk.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(f.live.qmps) > 0 || f.live.x.url != "" || f.live.libvirt != "" {
				return liveBackup(cmd.Context(), a, &f)
			}
			job, cleanup, err := imageJob(&f)
			if err != nil {
				return err
			}
			defer cleanup()
			return runBackup(cmd.Context(), a, &f, job)
		},
	}
	cmd.Flags().StringArrayVar(&f.live.qmps, "qmp", nil, "back up the running VM behind this QMP socket; repeat (with --group) to back up several VMs at one instant")
	f.live.x.register(cmd, "xapi", "back up a VM of this XenServer / XCP-ng pool master, https://HOST (with --vm NAME|UUID)")
	f.live.addLibvirt(cmd)
	cmd.Flags().StringVar(&f.repoVM, "repo-vm", "", "with --xapi or --libvirt: name of the VM in the repository (default: its name-label or domain name, other characters than letters, digits, '.', '_' and '-' made '_')")
	cmd.Flags().StringVar(&f.live.stateDir, "state-dir", defaultStateDir(), "directory of vmshadow's journals (env VMSHADOW_STATE_DIR)")
	f.live.addPeer(cmd)
	f.live.addSet(cmd)
	cmd.Flags().BoolVar(&f.full, "full", false, "with --qmp or --xapi: read every disk in full, not only what changed")
	intFlag(cmd.Flags(), &f.conns, "nbd-connections", 4, 1, maxNBDConnections, "with --qmp or --xapi: NBD connections per disk")
	intFlag(cmd.Flags(), &f.live.hostConns, "xapi-nbd-connections", xapiprov.DefaultHostConns, 1, 16, "with --xapi: NBD connections per pool host for all disks together (XenServer's NBD server serves at most 16 per host, to all clients)")
	f.repo.register(cmd)
	cmd.Flags().StringArrayVar(&f.live.vms, "vm", nil, "name of the VM in the repository (required with --disk; with one --qmp, default the VM's -name); with --xapi, the VM's name-label or UUID on the pool; with --libvirt, the domain's name or UUID (repeat with --group for several)")
	cmd.Flags().StringArrayVar(&f.disks, "disk", nil, "disk to back up as NAME=IMAGE (raw image file or block device); repeat for several")
	cmd.Flags().StringArrayVar(&f.tags, "tag", nil, "tag to attach to the backup; repeat for several")
	return cmd
}

// imageJob builds the job of an image-file backup.
func imageJob(f *backupFlags) (backup.Job, func(), error) {
	if len(f.live.vms) != 1 {
		return backup.Job{}, nil, errorf(errs.ErrUsage, "give the VM's name in the repository once: --vm NAME")
	}
	vm := f.live.vms[0]
	if len(f.disks) == 0 {
		return backup.Job{}, nil, errorf(errs.ErrUsage, "give at least one --disk NAME=IMAGE")
	}
	job := backup.Job{VM: vm, Tags: f.tags, Source: "image", Mode: "full"}
	var images []*imagefile.Image
	cleanup := func() {
		for _, im := range images {
			im.Close()
		}
	}
	for _, d := range f.disks {
		name, path, ok := strings.Cut(d, "=")
		if !ok || name == "" || path == "" {
			cleanup()
			return backup.Job{}, nil, errorf(errs.ErrUsage, "--disk %q: want NAME=IMAGE", d)
		}
		if err := repo.ValidName("disk", name); err != nil {
			cleanup()
			return backup.Job{}, nil, err
		}
		im, err := imagefile.Open(name, path)
		if err != nil {
			cleanup()
			return backup.Job{}, nil, fmt.Errorf("disk %s: %w", name, err)
		}
		images = append(images, im)
		job.Disks = append(job.Disks, backup.Disk{Source: im})
	}
	return job, cleanup, nil
}

// backupSummary is the JSON summary of a backup; field names are a contract.
type backupSummary struct {
	BackupID     string        `json:"backup_id"`
	ShortID      string        `json:"short_id"`
	VM           string        `json:"vm"`
	Time         time.Time     `json:"time"`
	Tags         []string      `json:"tags"`
	Source       string        `json:"source"`
	Mode         string        `json:"mode"`
	Reason       string        `json:"reason,omitempty"`
	Consistency  string        `json:"consistency,omitempty"`
	SetID        string        `json:"set_id,omitempty"`
	FreezeMS     *int64        `json:"freeze_ms,omitempty"`
	Instant      string        `json:"instant,omitempty"`  // how the disks were captured together (XAPI)
	PauseMS      int64         `json:"pause_ms,omitempty"` // how long the VM was paused for it
	Disks        []diskSummary `json:"disks"`
	BytesRead    int64         `json:"bytes_read"`
	BytesNew     int64         `json:"bytes_new"`
	ChunksNew    int64         `json:"chunks_new"`
	ChunksReused int64         `json:"chunks_reused"`
	ChunksZero   int64         `json:"chunks_zero"`
	DurationS    float64       `json:"duration_s"`
	Rate         float64       `json:"rate_bytes_per_s"` // disk bytes processed per second
	// Definition is the kind of VM definition stored ("libvirt"), Files
	// what describes the VM besides its disks (domain.xml, nvram, ...).
	Definition string      `json:"definition,omitempty"`
	Files      []diskEntry `json:"files,omitempty"`
}

type diskSummary struct {
	Name         string `json:"name"`
	Size         int64  `json:"size"`
	BytesRead    int64  `json:"bytes_read"`
	BytesNew     int64  `json:"bytes_new"`
	ChunksNew    int64  `json:"chunks_new"`
	ChunksReused int64  `json:"chunks_reused"`
	ChunksZero   int64  `json:"chunks_zero"`
	Index        string `json:"index"`
	Checkpoint   string `json:"checkpoint,omitempty"`
	Mode         string `json:"mode"`
	Reason       string `json:"reason,omitempty"`
}

// liveBackup backs up a running VM, or several at one instant (--group).
func liveBackup(ctx context.Context, a *app, f *backupFlags) error {
	if len(f.disks) > 0 {
		return errorf(errs.ErrUsage, "--disk backs up image files; with --qmp the VM's disks are found by themselves")
	}
	lo := livebackup.Options{Tags: f.tags, Full: f.full, Conns: f.conns}
	if f.live.x.url != "" || f.live.libvirt != "" {
		if f.repoVM != "" {
			if len(f.live.vms) > 1 {
				return errorf(errs.ErrUsage, "--repo-vm names one VM in the repository; the VMs of a group keep their own names")
			}
			if err := repo.ValidName("VM", f.repoVM); err != nil {
				return fmt.Errorf("--repo-vm: %w", err)
			}
		}
		lo.VM = f.repoVM
		lo.Name = func(vm coord.VMInfo) string { return xapiprov.RepoName(vm.Name) }
		if f.live.x.url != "" && f.repoVM == "" {
			name, err := xapiNamer(ctx, a, &f.live.x)
			if err != nil {
				return err
			}
			lo.Name = name
		}
	} else {
		if f.repoVM != "" {
			return errorf(errs.ErrUsage, "--repo-vm is for --xapi and --libvirt; with --qmp, --vm names the VM in the repository")
		}
		if len(f.live.vms) > 0 {
			if len(f.live.vms) > 1 || len(f.live.qmps) > 1 {
				return errorf(errs.ErrUsage, "with --qmp, --vm names the one VM in the repository; the VMs of a group are named by their -name")
			}
			lo.VM, f.live.vms = f.live.vms[0], nil
		}
	}
	ms, err := f.live.members(true)
	if err != nil {
		return err
	}
	var los []livebackup.Options
	for i := range ms {
		c, err := ms[i].coordinator(a)
		if err != nil {
			return err
		}
		o := lo
		o.Coordinator = c
		los = append(los, o)
	}
	r, err := f.repo.open(ctx)
	if err != nil {
		return err
	}
	defer func() { r.Close(); r.Backend().Close() }()
	opts := vmbackup.Options{Warn: a.out.Warn,
		Plan: func(d livebackup.DiskPlan) {
			a.out.Status(struct {
				Phase string `json:"phase"`
				livebackup.DiskPlan
			}{"plan", d}, fmt.Sprintf("%s: %s read%s", d.Name, d.Mode, map[bool]string{true: " (" + d.Reason + ")", false: ""}[d.Reason != ""]))
		},
		Progress: func(m *progress.Meter) func() { return showProgress(ctx, a, "backup", m) },
	}
	if f.live.group == "" {
		opts.Live = los[0]
		res, err := vmbackup.Run(ctx, r, opts)
		if err != nil {
			return err
		}
		s := newBackupSummary(res)
		a.out.Summary(s, func(w io.Writer) { s.print(w) })
		return nil
	}
	return groupBackup(ctx, a, r, f.live.group, los, opts)
}

// runBackup opens the repository, backs the image files of job up under
// a shared lock with progress, and prints the summary.
func runBackup(ctx context.Context, a *app, f *backupFlags, job backup.Job) error {
	r, err := f.repo.open(ctx)
	if err != nil {
		return err
	}
	defer func() { r.Close(); r.Backend().Close() }()
	lctx, unlock, err := lock(ctx, a, r, false, "backup")
	if err != nil {
		return err
	}
	var total int64
	for _, d := range job.Disks {
		total += d.Source.Size()
	}
	meter := progress.NewMeter(total)
	stop := showProgress(lctx, a, "backup", meter)
	res, err := backup.Run(lctx, r, job, backup.Options{Meter: meter})
	stop()
	unlock()
	if err != nil {
		return reclaimFailed(ctx, a, r, err)
	}
	printBackupSummary(a, res, total, nil)
	return nil
}

// newBackupSummary is the summary of a stored live backup.
func newBackupSummary(res *vmbackup.Result) backupSummary {
	var total int64
	for _, d := range res.Disks {
		total += d.Size
	}
	return summarize(res.Result, total, res.Live)
}

func printBackupSummary(a *app, res *backup.Result, total int64, live *livebackup.Backup) {
	s := summarize(res, total, live)
	a.out.Summary(s, func(w io.Writer) { s.print(w) })
}

func summarize(res *backup.Result, total int64, live *livebackup.Backup) backupSummary {
	m := res.Manifest
	s := backupSummary{BackupID: res.ID.String(), ShortID: res.ID.Short(), VM: m.VM, Time: m.Time, Tags: m.Tags,
		Source: m.Source, Mode: m.Mode, Reason: m.Reason, Consistency: m.Consistency, SetID: m.SetID,
		BytesRead: res.Stats.BytesRead, BytesNew: res.Stats.BytesNew, ChunksNew: res.Stats.ChunksNew,
		ChunksReused: res.Stats.ChunksReused, ChunksZero: res.Stats.ChunksZero, DurationS: res.Duration.Seconds(),
		Definition: m.Definition, Files: fileEntries(m)}
	if s.Tags == nil {
		s.Tags = []string{}
	}
	if s.DurationS > 0 {
		s.Rate = float64(total) / s.DurationS
	}
	for i, d := range res.Disks {
		s.Disks = append(s.Disks, diskSummary{Name: d.Name, Size: d.Size, BytesRead: d.Stats.BytesRead, BytesNew: d.Stats.BytesNew,
			ChunksNew: d.Stats.ChunksNew, ChunksReused: d.Stats.ChunksReused, ChunksZero: d.Stats.ChunksZero,
			Index: d.Index.String(), Checkpoint: m.Disks[i].Checkpoint, Mode: m.Mode})
		if live != nil {
			s.Disks[i].Mode, s.Disks[i].Reason = live.Disks[i].Mode, live.Disks[i].Reason
		}
	}
	if live != nil {
		s.FreezeMS = &live.Set.FreezeMS
		s.Instant, s.PauseMS = live.Set.Instant, live.Set.PauseMS
	}
	return s
}

// print writes the summary as text.
func (s backupSummary) print(w io.Writer) {
	fmt.Fprintf(w, "backup %s of %s done in %s (%s/s), %s", s.ShortID, s.VM, progress.Duration(s.DurationS), progress.Bytes(int64(s.Rate)), s.Mode)
	if s.Consistency != "" {
		fmt.Fprintf(w, ", %s-consistent (set %s, frozen %d ms", s.Consistency, s.SetID, *s.FreezeMS)
		switch s.Instant {
		case coord.InstantPaused:
			fmt.Fprintf(w, ", all disks at one instant: VM paused %d ms", s.PauseMS)
		case coord.InstantPerDisk:
			fmt.Fprint(w, ", disks one after another")
		}
		fmt.Fprint(w, ")")
	}
	fmt.Fprintln(w)
	for _, d := range s.Disks {
		fmt.Fprintf(w, "  %-12s %10s  read %10s  stored %10s  chunks: %d new, %d reused, %d zero  %s\n",
			d.Name, progress.Bytes(d.Size), progress.Bytes(d.BytesRead), progress.Bytes(d.BytesNew), d.ChunksNew, d.ChunksReused, d.ChunksZero, d.Mode)
		if d.Reason != "" {
			fmt.Fprintf(w, "  %-12s full read: %s\n", "", d.Reason)
		}
	}
	if s.Definition != "" {
		var names []string
		for _, f := range s.Files {
			names = append(names, f.Name)
		}
		fmt.Fprintf(w, "  with its %s definition: %s\n", s.Definition, strings.Join(names, ", "))
	}
}

// xapiNamer names the pool's VMs in the repository as the server does
// (vmconn.XAPIRepoNames: a name-label other VMs of the pool share gets the
// VM's UUID's first digits), so that each VM keeps a chain of its own and
// the CLI continues the server's chains. Other VMs are named after their
// names.
func xapiNamer(ctx context.Context, a *app, x *xapiFlags) (func(coord.VMInfo) string, error) {
	cfg, err := x.config(a)
	if err != nil {
		return nil, err
	}
	vms, err := vmconn.XAPIVMs(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("list the pool's VMs to name them in the repository: %w", err)
	}
	names := vmconn.XAPIRepoNames(vms)
	return func(vm coord.VMInfo) string {
		if uuid, ok := xapiprov.UUIDOf(vm); ok {
			if n, ok := names[strings.ToLower(uuid)]; ok {
				if n.Note != "" {
					a.out.Warn("%s (give --repo-vm to name it yourself)", n.Note)
				}
				return n.Repo
			}
		}
		return xapiprov.RepoName(vm.Name)
	}, nil
}
