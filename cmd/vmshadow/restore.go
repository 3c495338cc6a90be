package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
	"github.com/vmshadow/vmshadow/internal/restore/libvirtpool"
	"github.com/vmshadow/vmshadow/internal/restore/xenpool"
	"github.com/vmshadow/vmshadow/internal/xapi"
)

func init() { commands = append(commands, newRestoreCmd) }

func newRestoreCmd(a *app) *cobra.Command {
	var f repoFlags
	var disks []string
	var to, format string
	var x xapiFlags
	var sr, vmName, template string
	var lvURI, pool string
	var start bool
	var memoryMB, vcpus int
	var group string
	cmd := &cobra.Command{
		Use:   "restore --repo DIR (BACKUP_ID [--disk NAME]... | --group GROUP_BACKUP_ID) (--to PATH [--format raw|qcow2] | --to-xapi URL --sr NAME|UUID [--vm-name NEW] | --to-libvirt URI --pool POOL [--vm-name NEW] [--start])",
		Short: "Restore the disks of a backup to image files, block devices, a XenServer / XCP-ng pool or a libvirt storage pool",
		Long: `Restore disks of a backup. BACKUP_ID may be any unambiguous prefix.

--to DIR/ (ending in /) or an existing directory: each disk goes to
DIR/NAME.raw (or NAME.qcow2), whatever the number of disks; the directory is
created if needed. Otherwise, with one disk (the backup has one, or --disk
names one) --to is the output file or block device, in a directory that
exists; with several disks --to is a directory as above. Into a directory,
a backup that stores the VM's definition (libvirt domains) also gives
DIR/VM.xml (the domain XML as backed up: its disks name the original
images) and, where the domain has them, DIR/VM.nvram (UEFI variables) and
DIR/VM.tpm-FILE (TPM state).

Raw files are sparse where the disk was zero. Every chunk is checked
against its hash while restoring; a failed restore removes the file it
created. Existing files are never overwritten.

With --to-xapi, each disk becomes a new VDI on the storage repository --sr of
the pool, uploaded through XAPI (import_raw_vdi), whatever hypervisor the backup
came from; with --vm-name a halted VM with those disks is created from the
template --vm-template. A failed restore destroys what it created.

With --to-libvirt (a local URI: vmshadow runs on the libvirt host), each disk
becomes a new volume of the storage pool --pool (qcow2 in dir, fs and netfs
pools, raw in logical, disk, iscsi ... pools) and a new domain is defined on
them: named --vm-name (default: the backup's VM name + "-restored"), with a
new UUID and new MAC addresses, from the definition the backup stores, or a
minimal one (--memory, --vcpus) for backups that store none; its UEFI
variables and emulated TPM's state (swtpm, under /var/lib/libvirt/swtpm/UUID)
are put back where the backup stores them. --start starts it. A failed
restore deletes the volumes, files and definition it created.

--group GROUP_BACKUP_ID (any unambiguous prefix; see 'backups --groups')
restores every member of a group backup, each into DIR/VM/ of --to DIR as
--to DIR/ does for one backup (the disks as DIR/VM/NAME.raw or .qcow2, and
the VM's definition where the backup stores one). DIR/VM must not exist; a
failed group restore removes everything it created.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			t0 := time.Now()
			targets := 0
			for _, s := range []string{to, x.url, lvURI} {
				if s != "" {
					targets++
				}
			}
			if cmd.Flags().Changed("group") {
				switch {
				case len(args) > 0:
					return errorf(errs.ErrUsage, "--group takes the group backup's ID; give no backup ID with it (restore one member alone with 'vmshadow restore BACKUP_ID')")
				case x.url != "" || lvURI != "":
					return errorf(errs.ErrUsage, "--group restores into a directory: give --to DIR, not --to-xapi or --to-libvirt (restore members one by one into a pool)")
				case to == "":
					return errorf(errs.ErrUsage, "--group needs --to DIR: each member goes into DIR/VM/")
				case len(disks) > 0:
					return errorf(errs.ErrUsage, "--disk selects disks of one backup; --group restores every disk of every member")
				}
				if _, ok := restore.Formats[format]; !ok {
					return errorf(errs.ErrUsage, "--format %q: use raw or qcow2", format)
				}
				return restoreGroup(ctx, a, &f, group, to, format, t0)
			}
			if len(args) == 0 {
				return errorf(errs.ErrUsage, "give the ID of the backup to restore (see 'vmshadow backups'), or --group GROUP_BACKUP_ID")
			}
			switch {
			case targets > 1:
				return errorf(errs.ErrUsage, "give only one of --to PATH, --to-xapi URL and --to-libvirt URI")
			case targets == 0:
				return errorf(errs.ErrUsage, "no restore target: give --to PATH (or --to-xapi URL --sr NAME|UUID, or --to-libvirt URI --pool POOL)")
			case x.url == "" && sr != "":
				return errorf(errs.ErrUsage, "--sr goes with --to-xapi")
			case x.url == "" && lvURI == "" && vmName != "":
				return errorf(errs.ErrUsage, "--vm-name goes with --to-xapi or --to-libvirt")
			case lvURI == "" && (pool != "" || start || cmd.Flags().Changed("memory") || cmd.Flags().Changed("vcpus")):
				return errorf(errs.ErrUsage, "--pool, --start, --memory and --vcpus go with --to-libvirt")
			case lvURI != "" && pool == "":
				return errorf(errs.ErrUsage, "--to-libvirt needs --pool POOL, the storage pool of the new volumes (see 'virsh pool-list')")
			case lvURI != "" && cmd.Flags().Changed("format"):
				return errorf(errs.ErrUsage, "--format is for --to; the pool's type decides (qcow2 in dir, fs and netfs pools, raw in others)")
			case x.url != "" && sr == "":
				return errorf(errs.ErrUsage, "--to-xapi needs --sr NAME|UUID, the storage repository of the new disks")
			case x.url != "" && cmd.Flags().Changed("format"):
				return errorf(errs.ErrUsage, "--format is for --to; a pool gets raw VDIs")
			}
			var xpool xapi.Config
			if x.url != "" {
				var err error
				if xpool, err = x.config(a); err != nil {
					return err
				}
			}
			r, ctx, id, m, done, err := f.openBackup(ctx, a, "restore", args[0])
			if err != nil {
				return err
			}
			defer done()
			sel, err := restore.Select(m, disks)
			if err != nil {
				return err
			}
			if x.url != "" {
				return restoreToXAPI(ctx, a, r, id, m, sel, xpool, xenpool.Options{SR: sr, VMName: vmName, Template: template}, t0)
			}
			if lvURI != "" {
				o := libvirtpool.Options{URI: lvURI, Pool: pool, VMName: vmName, MemoryMB: memoryMB, VCPUs: vcpus,
					Warn: func(s string) { a.out.Warn("%s", s) }}
				if err := o.Stored(ctx, r, m); err != nil {
					return err
				}
				if o.Definition != nil && (cmd.Flags().Changed("memory") || cmd.Flags().Changed("vcpus")) {
					return errorf(errs.ErrUsage, "the backup stores the domain's definition, whose memory and vCPUs the new domain gets: --memory and --vcpus are for backups without one")
				}
				return restoreToLibvirt(ctx, a, r, id, m, sel, o, start, t0)
			}
			res, def, err := restoreFiles(ctx, a, r, m, sel, to, format)
			if err != nil {
				return err
			}
			s := struct {
				BackupID     string                   `json:"backup_id"`
				VM           string                   `json:"vm"`
				Format       string                   `json:"format"`
				Disks        []restore.DiskResult     `json:"disks"`
				Definition   []restore.DefinitionFile `json:"definition,omitempty"`
				BytesWritten int64                    `json:"bytes_written"`
				DurationS    float64                  `json:"duration_s"`
			}{BackupID: id.String(), VM: m.VM, Format: format, Disks: res, Definition: def, DurationS: time.Since(t0).Seconds()}
			for _, d := range res {
				s.BytesWritten += d.BytesWritten
			}
			a.out.Summary(s, func(w io.Writer) {
				for _, d := range res {
					fmt.Fprintf(w, "restored disk %s (%s) of backup %s to %s, verified\n", d.Name, progress.Bytes(d.Size), id.Short(), d.Path)
				}
				for _, f := range def {
					fmt.Fprintf(w, "wrote %s of the VM's definition to %s\n", f.Name, f.Path)
				}
			})
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringArrayVar(&disks, "disk", nil, "restore only this disk; repeat for several (default: all)")
	cmd.Flags().StringVar(&to, "to", "", "output directory (DIR/ or an existing directory: DIR/NAME.raw per disk), or output file or block device (one disk)")
	cmd.Flags().StringVar(&format, "format", "raw", "output format: raw or qcow2")
	x.register(cmd, "to-xapi", "restore into this XenServer / XCP-ng pool master, https://HOST (with --sr)")
	cmd.Flags().StringVar(&sr, "sr", "", "with --to-xapi: the storage repository (name-label or UUID) of the new VDIs")
	cmd.Flags().StringVar(&vmName, "vm-name", "", "with --to-xapi: create a halted VM of this name with the restored disks; with --to-libvirt: the new domain's name (default: the backup's VM name + \"-restored\")")
	cmd.Flags().StringVar(&template, "vm-template", "Other install media", "with --vm-name: the template the VM is created from (its CPU, memory and boot settings)")
	cmd.Flags().StringVar(&lvURI, "to-libvirt", "", "restore into new volumes and a new domain of the libvirt at this local URI, e.g. qemu:///system (with --pool)")
	cmd.Flags().StringVar(&pool, "pool", "", "with --to-libvirt: the storage pool of the new volumes")
	cmd.Flags().BoolVar(&start, "start", false, "with --to-libvirt: start the new domain")
	intFlag(cmd.Flags(), &memoryMB, "memory", libvirtpool.DefaultMemoryMB, 16, 16<<20, "with --to-libvirt, for a backup that stores no domain definition: the new domain's memory in MiB")
	cmd.Flags().StringVar(&group, "group", "", "restore every member of this group backup (ID or unambiguous prefix), each into DIR/VM/ of --to DIR")
	intFlag(cmd.Flags(), &vcpus, "vcpus", libvirtpool.DefaultVCPUs, 1, 4096, "with --to-libvirt, for a backup that stores no domain definition: the new domain's vCPUs")
	return cmd
}

// restoreFiles restores the selected disks of backup m to --to (a file,
// block device or directory, see restoreDest) and, into a directory, the
// VM's definition the backup stores.
func restoreFiles(ctx context.Context, a *app, r *repo.Repo, m *repo.Manifest, sel []repo.ManifestDisk, to, format string) ([]restore.DiskResult, []restore.DefinitionFile, error) {
	first := ""
	if len(sel) > 0 {
		first = sel[0].Name
	}
	dest, inDir := restoreDest(to, len(sel), first, restore.Formats[format].Ext)
	files, err := restore.Plan(sel, dest, format)
	if err != nil {
		return nil, nil, err
	}
	if len(files.Disks) > 0 {
		if err := restoreDir(to, filepath.Dir(files.Disks[0].Path), inDir); err != nil {
			return nil, nil, err
		}
	}
	res, err := runRestore(ctx, a, r, sel, files)
	if err != nil {
		return nil, nil, err
	}
	var def []restore.DefinitionFile
	if inDir && len(files.Disks) > 0 {
		if def, err = restore.WriteDefinition(ctx, r, m, filepath.Dir(files.Disks[0].Path)); err != nil {
			return res, nil, fmt.Errorf("the disks are restored, the VM's definition is not: %w", err)
		}
	}
	return res, def, nil
}

// groupRestored is one member of a group restore.
type groupRestored struct {
	VM         string                   `json:"vm"`
	BackupID   string                   `json:"backup_id"`
	Dir        string                   `json:"dir"`
	Disks      []restore.DiskResult     `json:"disks"`
	Definition []restore.DefinitionFile `json:"definition,omitempty"`
}

// restoreGroup restores every member of group backup arg into to/VM/, as
// restoreFiles does for one backup into a directory. Every member's
// manifest is read first; on any failure, what this restore created (the
// members' directories, and to itself and the parents it made) is removed.
func restoreGroup(ctx context.Context, a *app, f *repoFlags, arg, to, format string, t0 time.Time) (err error) {
	r, ctx, done, err := f.openLocked(ctx, a, false, "restore")
	if err != nil {
		return err
	}
	defer done()
	gid, err := r.FindGroup(ctx, arg)
	if err != nil {
		return err
	}
	g, err := r.LoadGroup(ctx, gid)
	if err != nil {
		return err
	}
	type member struct {
		id repo.ID
		m  *repo.Manifest
	}
	var members []member
	for _, mb := range g.Members {
		id, err := repo.ParseID(mb.Backup)
		if err != nil {
			return fmt.Errorf("group backup %s: member %s: %w", gid.Short(), mb.VM, err)
		}
		m, err := r.LoadManifest(ctx, id)
		if err != nil {
			return fmt.Errorf("group backup %s of group %s cannot be restored whole: member %s: %w (restore the other members one by one with 'vmshadow restore BACKUP_ID')", gid.Short(), g.Name, mb.VM, err)
		}
		if dir := filepath.Join(to, mb.VM); !missing(dir) {
			return errorf(errs.ErrUsage, "--to %s: %s exists: restore --group writes each member into DIR/VM/; give a new or empty directory", to, dir)
		}
		members = append(members, member{id, m})
	}
	// The topmost directory this restore creates, if any: removed whole
	// on failure. Otherwise each member's directory is.
	top := ""
	for p := filepath.Clean(to); missing(p); p = filepath.Dir(p) {
		top = p
		if filepath.Dir(p) == p {
			break
		}
	}
	if err := restoreDir(to, to, true); err != nil {
		return err
	}
	var made []string
	defer func() {
		if err == nil {
			return
		}
		if top != "" {
			made = []string{top}
		}
		for _, d := range made {
			if rerr := os.RemoveAll(d); rerr != nil {
				a.out.Warn("could not remove %s after the failed restore: %v", d, rerr)
			}
		}
	}()
	out := struct {
		GroupBackupID string          `json:"group_backup_id"`
		Group         string          `json:"group"`
		SetID         string          `json:"set_id"`
		Time          time.Time       `json:"time"`
		Format        string          `json:"format"`
		Members       []groupRestored `json:"members"`
		BytesWritten  int64           `json:"bytes_written"`
		DurationS     float64         `json:"duration_s"`
	}{GroupBackupID: gid.String(), Group: g.Name, SetID: g.SetID, Time: g.Time, Format: format}
	for _, mb := range members {
		dir := filepath.Join(to, mb.m.VM)
		made = append(made, dir)
		sel, err := restore.Select(mb.m, nil)
		if err != nil {
			return err
		}
		res, def, err := restoreFiles(ctx, a, r, mb.m, sel, dir+string(filepath.Separator), format)
		if err != nil {
			return fmt.Errorf("restore member %s (backup %s) of group backup %s: %w; what this restore wrote is removed", mb.m.VM, mb.id.Short(), gid.Short(), err)
		}
		out.Members = append(out.Members, groupRestored{VM: mb.m.VM, BackupID: mb.id.String(), Dir: dir, Disks: res, Definition: def})
		for _, d := range res {
			out.BytesWritten += d.BytesWritten
		}
	}
	out.DurationS = time.Since(t0).Seconds()
	a.out.Summary(out, func(w io.Writer) {
		for _, m := range out.Members {
			for _, d := range m.Disks {
				fmt.Fprintf(w, "restored disk %s (%s) of %s, backup %s, to %s, verified\n", d.Name, progress.Bytes(d.Size), m.VM, m.BackupID[:8], d.Path)
			}
			for _, f := range m.Definition {
				fmt.Fprintf(w, "wrote %s of %s's definition to %s\n", f.Name, m.VM, f.Path)
			}
		}
		fmt.Fprintf(w, "restored group backup %s of group %s (%s): %d members into %s\n", gid.Short(), g.Name, g.Time.Local().Format("2006-01-02 15:04:05"), len(out.Members), to)
	})
	return nil
}

// missing reports whether nothing (no file, directory or link) is at p;
// false when that cannot be told.
func missing(p string) bool {
	_, err := os.Lstat(p)
	return errors.Is(err, fs.ErrNotExist)
}

// restoreToLibvirt restores the selected disks into new volumes of a
// libvirt storage pool and defines (and with start, starts) a domain on
// them.
func restoreToLibvirt(ctx context.Context, a *app, r *repo.Repo, id repo.ID, m *repo.Manifest, sel []repo.ManifestDisk, o libvirtpool.Options, start bool, t0 time.Time) error {
	t, err := libvirtpool.New(ctx, m, sel, o)
	if err != nil {
		return err
	}
	defer t.Close()
	out, err := runRestore(ctx, a, r, sel, t)
	if err != nil {
		return err
	}
	if start {
		if err := t.Start(ctx); err != nil {
			return err
		}
	}
	res := t.Result()
	s := struct {
		BackupID     string               `json:"backup_id"`
		VM           string               `json:"vm"`
		Format       string               `json:"format"`
		Pool         string               `json:"pool"`
		Domain       string               `json:"domain"`
		UUID         string               `json:"domain_uuid"`
		Definition   string               `json:"domain_definition"`
		Started      bool                 `json:"started"`
		Volumes      []libvirtpool.Volume `json:"volumes"`
		TPMState     string               `json:"tpm_state,omitempty"`
		Disks        []restore.DiskResult `json:"disks"`
		BytesWritten int64                `json:"bytes_written"`
		DurationS    float64              `json:"duration_s"`
	}{BackupID: id.String(), VM: m.VM, Format: "libvirt", Pool: res.Pool, Domain: res.Domain, UUID: res.UUID, Definition: res.Definition,
		Started: res.Started, Volumes: res.Volumes, TPMState: res.TPMState, Disks: out, DurationS: time.Since(t0).Seconds()}
	for _, d := range out {
		s.BytesWritten += d.BytesWritten
	}
	a.out.Summary(s, func(w io.Writer) {
		for _, v := range res.Volumes {
			fmt.Fprintf(w, "restored disk %s of backup %s to volume %s of pool %s (%s), verified\n", v.Disk, id.Short(), v.Volume, res.Pool, v.Format)
		}
		state := "defined"
		if res.Started {
			state = "started"
		}
		fmt.Fprintf(w, "domain %s (%s) %s from the %s definition\n", res.Domain, res.UUID, state, res.Definition)
		if res.TPMState != "" {
			fmt.Fprintf(w, "emulated TPM's state put back in %s\n", res.TPMState)
		}
	})
	return nil
}

// runRestore restores the selected disks into t with progress.
func runRestore(ctx context.Context, a *app, r *repo.Repo, sel []repo.ManifestDisk, t restore.Target) ([]restore.DiskResult, error) {
	var total int64
	for _, d := range sel {
		total += d.Size
	}
	meter := progress.NewMeter(total)
	stop := showProgress(ctx, a, "restore", meter)
	res, err := restore.Run(ctx, r, sel, t, restore.Options{Meter: meter})
	stop()
	return res, err
}

// restoreToXAPI restores the selected disks into new VDIs of a pool.
func restoreToXAPI(ctx context.Context, a *app, r *repo.Repo, id repo.ID, m *repo.Manifest, sel []repo.ManifestDisk, pool xapi.Config, o xenpool.Options, t0 time.Time) error {
	t, err := xenpool.New(ctx, pool, m, o)
	if err != nil {
		return err
	}
	out, err := runRestore(ctx, a, r, sel, t)
	if err != nil {
		return err
	}
	res := t.Result(out)
	s := struct {
		BackupID     string                 `json:"backup_id"`
		VM           string                 `json:"vm"`
		Format       string                 `json:"format"`
		Pool         string                 `json:"pool"`
		SR           string                 `json:"sr"`
		NewVM        string                 `json:"vm_uuid,omitempty"`
		Disks        []xenpool.RestoredDisk `json:"disks"`
		BytesWritten int64                  `json:"bytes_written"`
		DurationS    float64                `json:"duration_s"`
	}{BackupID: id.String(), VM: m.VM, Format: "xapi", Pool: pool.URL, SR: res.SR, NewVM: res.VM, Disks: res.Disks, DurationS: time.Since(t0).Seconds()}
	for _, d := range res.Disks {
		s.BytesWritten += d.BytesWritten
	}
	a.out.Summary(s, func(w io.Writer) {
		for _, d := range res.Disks {
			fmt.Fprintf(w, "restored disk %s (%s) of backup %s to VDI %s on SR %s, verified\n", d.Name, progress.Bytes(d.Size), id.Short(), d.VDI, res.SR)
		}
		if res.VM != "" {
			fmt.Fprintf(w, "created VM %s (%s), halted, with these disks\n", o.VMName, res.VM)
		}
	})
	return nil
}

// restoreDest resolves --to for n selected disks, the first named first:
// a path ending in "/" or an existing directory means DIR/NAME.EXT per
// disk whatever their number (restore.Plan joins the names for several
// disks); otherwise --to is the file of a single disk, or the directory of
// several. inDir says whether the files go into the directory --to.
func restoreDest(to string, n int, first, ext string) (dest string, inDir bool) {
	if st, err := os.Stat(to); strings.HasSuffix(to, "/") || err == nil && st.IsDir() {
		if n == 1 {
			return filepath.Join(to, first+ext), true
		}
		return to, true
	}
	return to, n > 1
}

// restoreDir makes sure the directory the restored files go into is
// there: created when it is the directory --to, else it must exist. A file
// where a directory should be, or a missing directory, is a usage error.
func restoreDir(to, dir string, create bool) error {
	if create {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			if errors.Is(err, syscall.ENOTDIR) || errors.Is(err, syscall.EEXIST) {
				return errorf(errs.ErrUsage, "--to %s: cannot create directory %s: a file is in the way (%v)", to, dir, pathErr(err))
			}
			return fmt.Errorf("create directory %s: %w", dir, err)
		}
		return nil
	}
	st, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return errorf(errs.ErrUsage, "--to %s: directory %s does not exist: create it first, or give --to %s/ to restore into a new directory", to, dir, dir)
	case errors.Is(err, syscall.ENOTDIR) || err == nil && !st.IsDir():
		return errorf(errs.ErrUsage, "--to %s: %s is not a directory", to, dir)
	case err != nil:
		return fmt.Errorf("--to %s: %w", to, err)
	}
	return nil
}

// pathErr is the reason of an *fs.PathError without the path the message
// names already.
func pathErr(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
