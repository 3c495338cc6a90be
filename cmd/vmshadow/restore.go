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
	cmd := &cobra.Command{
		Use:   "restore --repo DIR BACKUP_ID [--disk NAME]... (--to PATH [--format raw|qcow2] | --to-xapi URL --sr NAME|UUID [--vm-name NEW] | --to-libvirt URI --pool POOL [--vm-name NEW] [--start])",
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
minimal one (--memory, --vcpus) for backups that store none. --start starts
it. A failed restore deletes the volumes and the definition it created.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			t0 := time.Now()
			targets := 0
			for _, s := range []string{to, x.url, lvURI} {
				if s != "" {
					targets++
				}
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
			first := ""
			if len(sel) > 0 {
				first = sel[0].Name
			}
			dest, inDir := restoreDest(to, len(sel), first, restore.Formats[format].Ext)
			files, err := restore.Plan(sel, dest, format)
			if err != nil {
				return err
			}
			if len(files.Disks) > 0 {
				if err := restoreDir(to, filepath.Dir(files.Disks[0].Path), inDir); err != nil {
					return err
				}
			}
			res, err := runRestore(ctx, a, r, sel, files)
			if err != nil {
				return err
			}
			var def []restore.DefinitionFile
			if inDir && len(files.Disks) > 0 {
				if def, err = restore.WriteDefinition(ctx, r, m, filepath.Dir(files.Disks[0].Path)); err != nil {
					return fmt.Errorf("the disks are restored, the VM's definition is not: %w", err)
				}
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
	intFlag(cmd.Flags(), &vcpus, "vcpus", libvirtpool.DefaultVCPUs, 1, 4096, "with --to-libvirt, for a backup that stores no domain definition: the new domain's vCPUs")
	return cmd
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
		Disks        []restore.DiskResult `json:"disks"`
		BytesWritten int64                `json:"bytes_written"`
		DurationS    float64              `json:"duration_s"`
	}{BackupID: id.String(), VM: m.VM, Format: "libvirt", Pool: res.Pool, Domain: res.Domain, UUID: res.UUID, Definition: res.Definition,
		Started: res.Started, Volumes: res.Volumes, Disks: out, DurationS: time.Since(t0).Seconds()}
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
