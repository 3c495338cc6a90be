package main

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/filerestore"
	"github.com/vmshadow/vmshadow/internal/fsproto"
	"github.com/vmshadow/vmshadow/internal/instant"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/restore"
)

func init() { commands = append(commands, newFilesCmd) }

const filesLong = `files reads single files out of a backup without restoring its disks.
The disks are served read-only from the repository (chunks read on demand
and checked against their hashes, as 'vmshadow serve' does) to a small
helper VM booted under QEMU, whose kernel alone parses the file systems, so
a damaged or hostile file system cannot harm this host. Journals are never
replayed and nothing is written to the repository.

A location names a file system and a path in it:
  vda2:/etc/nginx     partition 2 of disk vda (nvme0n1p2 for a disk named nvme0n1)
  vda:/etc            a file system on the whole disk vda
  lvm:vg0/root:/etc   logical volume root of volume group vg0
  /etc/nginx          when the backup has one file system
'files ls BACKUP' without a location lists the partitions and file systems.

The helper (a kernel and an initramfs) is built by guest/fshelper/build.sh
into ~/.cache/vmshadow/fshelper; --helper names another directory.`

// filesFlags are the flags ls and get share.
type filesFlags struct {
	repo        repoFlags
	disks       []string
	helper      string
	accel       string
	bootTimeout time.Duration
	cacheMiB    int
}

func (f *filesFlags) register(cmd *cobra.Command) {
	f.repo.register(cmd)
	cmd.Flags().StringArrayVar(&f.disks, "disk", nil, "attach only this disk; repeat for several (default: all)")
	cmd.Flags().StringVar(&f.helper, "helper", "", "directory of the helper VM's vmlinux and initrd.img (default: the newest build of guest/fshelper/build.sh)")
	cmd.Flags().StringVar(&f.accel, "accel", "tcg", "QEMU accelerator of the helper VM: tcg or kvm")
	durationFlag(cmd.Flags(), &f.bootTimeout, "boot-timeout", 3*time.Minute, time.Second, time.Hour, "how long the helper VM may take to boot")
	intFlag(cmd.Flags(), &f.cacheMiB, "cache", 64, 0, 65536, "MiB of decoded chunks to cache per disk (at least one chunk)")
}

// filesSession is an open repository and a running helper VM.
type filesSession struct {
	*filerestore.Session
	id    repo.ID
	m     *repo.Manifest
	disks []*instant.Disk
}

func (s *filesSession) fetched() (chunks, bytes int64) {
	for _, d := range s.disks {
		c, b := d.Fetched()
		chunks, bytes = chunks+c, bytes+b
	}
	return
}

func (f *filesFlags) start(ctx context.Context, a *app, backupArg string) (*filesSession, func(), error) {
	switch f.accel {
	case "tcg", "kvm":
	default:
		return nil, nil, errorf(errs.ErrUsage, "--accel %q: use tcg or kvm", f.accel)
	}
	h, err := filerestore.FindHelper(f.helper)
	if err != nil {
		return nil, nil, err
	}
	r, ctx, id, m, release, err := f.repo.openBackup(ctx, a, "files", backupArg)
	if err != nil {
		return nil, nil, err
	}
	ok := false
	defer func() {
		if !ok {
			release()
		}
	}()
	sel, err := restore.Select(m, f.disks)
	if err != nil {
		return nil, nil, err
	}
	s := &filesSession{id: id, m: m}
	var disks []filerestore.Disk
	for _, d := range sel {
		x, err := restore.LoadIndex(ctx, r, d)
		if err != nil {
			return nil, nil, err
		}
		dd := instant.NewDisk(r, x, int64(f.cacheMiB)<<20)
		s.disks = append(s.disks, dd)
		disks = append(disks, filerestore.Disk{Name: d.Name, Export: dd})
	}
	s.Session, err = filerestore.Start(ctx, disks, filerestore.Options{Helper: h, Accel: f.accel, BootTimeout: f.bootTimeout})
	if err != nil {
		return nil, nil, err
	}
	for _, n := range s.Notes {
		a.out.Warn("helper VM: %s", n)
	}
	ok = true
	return s, func() { s.Close(); release() }, nil
}

func newFilesCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "files",
		Short: "List and get single files of a backup (file-level restore)",
		Long:  filesLong,
	}
	cmd.AddCommand(newFilesLsCmd(a), newFilesGetCmd(a))
	return cmd
}

// fsEntry is one line of files ls: a file system, or a directory entry.
type fsEntry struct {
	Kind  string `json:"kind"` // "filesystem" or "entry"
	FS    string `json:"fs"`
	Path  string `json:"path,omitempty"`
	Name  string `json:"name,omitempty"`
	Type  string `json:"type,omitempty"`
	Size  int64  `json:"size"`
	Mode  string `json:"mode,omitempty"`
	UID   uint32 `json:"uid"`
	GID   uint32 `json:"gid"`
	Mtime string `json:"mtime,omitempty"`
	Link  string `json:"link,omitempty"`
	// File systems only.
	Disk  string `json:"disk,omitempty"`
	Label string `json:"label,omitempty"`
	Table string `json:"table,omitempty"`
	Found string `json:"found,omitempty"`
}

var typeChar = map[string]string{"file": "-", "dir": "d", "symlink": "l", "char": "c", "block": "b", "fifo": "p", "socket": "s"}

func entryLine(fsName, p string, e *fsproto.Entry) (fsEntry, string) {
	mtime := time.Unix(0, e.Mtime).UTC()
	j := fsEntry{Kind: "entry", FS: fsName, Path: p, Name: e.Name, Type: e.Type, Size: e.Size, Mode: fmt.Sprintf("%04o", e.Mode),
		UID: e.UID, GID: e.GID, Mtime: mtime.Format(time.RFC3339Nano), Link: e.Link}
	perm := []byte(fs.FileMode(e.Mode & 0o777).String()[1:])
	for i, bit := range []uint32{0o4000, 0o2000, 0o1000} { // ls's s, S, t, T
		if e.Mode&bit != 0 {
			x := 3*i + 2
			perm[x] = map[bool]byte{true: "sst"[i], false: "SST"[i]}[perm[x] != '-']
		}
	}
	line := fmt.Sprintf("%s%s %5d %5d %12d %s %s", typeChar[e.Type], perm, e.UID, e.GID, e.Size, mtime.Format("2006-01-02 15:04:05"), quoteName(p))
	if e.Link != "" {
		line += " -> " + quoteName(e.Link)
	}
	return j, line
}

// quoteName shows a name from the backup without control characters.
func quoteName(s string) string { return fsproto.Printable(s, 4096) }

func newFilesLsCmd(a *app) *cobra.Command {
	var f filesFlags
	var recursive bool
	cmd := &cobra.Command{
		Use:   "ls --repo DIR BACKUP_ID [--disk NAME] [LOCATION] [-R]",
		Short: "List the file systems of a backup, or a directory in one",
		Long:  filesLong,
		Args:  cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var fsName, p string
			if len(args) == 2 {
				var err error
				if fsName, p, err = filerestore.ParseLocation(args[1]); err != nil {
					return err
				}
			}
			s, done, err := f.start(cmd.Context(), a, args[0])
			if err != nil {
				return err
			}
			defer done()
			ctx := cmd.Context()
			entries := 0
			var fsys *filerestore.FS
			if len(args) == 1 {
				for _, x := range s.FS {
					desc := x.Type
					if desc == "" {
						desc = x.Table
					}
					if desc == "" {
						desc = "(" + x.Found + ")"
					}
					line := fmt.Sprintf("%-16s %-12s %10s %s", x.Name, desc, progress.Bytes(x.Size), x.Label)
					a.out.Status(fsEntry{Kind: "filesystem", FS: x.Name, Disk: x.Disk, Type: x.Type, Size: x.Size, Label: x.Label, Table: x.Table, Found: x.Found}, "")
					if !a.out.JSON {
						fmt.Fprintln(a.out.Out, line)
					}
				}
			} else {
				if fsys, err = s.Find(fsName); err != nil {
					return err
				}
				emit := func(p string, e *fsproto.Entry) {
					j, line := entryLine(fsys.Name, p, e)
					entries++
					a.out.Status(j, "")
					if !a.out.JSON {
						fmt.Fprintln(a.out.Out, line)
					}
				}
				e, err := s.Stat(ctx, fsys, p)
				if err != nil {
					return err
				}
				if e.Type != "dir" {
					e.Name = path.Base(p)
					emit(p, e)
				} else {
					var walk func(dir string) error
					walk = func(dir string) error {
						return s.List(ctx, fsys, dir, func(c fsproto.Entry) error {
							cp := path.Join(dir, c.Name)
							emit(cp, &c)
							if recursive && c.Type == "dir" {
								return walk(cp)
							}
							return nil
						})
					}
					if err := walk(p); err != nil {
						return err
					}
				}
			}
			chunks, bytes := s.fetched()
			a.out.Summary(struct {
				BackupID    string           `json:"backup_id"`
				VM          string           `json:"vm"`
				FileSystems []filerestore.FS `json:"filesystems"`
				Entries     int              `json:"entries"`
				BootS       float64          `json:"boot_s"`
				ChunksRead  int64            `json:"chunks_read"`
				BytesRead   int64            `json:"bytes_read"`
			}{s.id.String(), s.m.VM, s.FS, entries, s.Boot.Seconds(), chunks, bytes}, func(w io.Writer) {
				if !a.out.JSON && a.out.ErrOut != nil {
					fmt.Fprintf(a.out.ErrOut, "backup %s of %s: helper VM up in %.1fs, read %s (%d chunks) from the repository\n",
						s.id.Short(), s.m.VM, s.Boot.Seconds(), progress.Bytes(bytes), chunks)
				}
			})
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().BoolVarP(&recursive, "recursive", "R", false, "list subdirectories too")
	return cmd
}

func newFilesGetCmd(a *app) *cobra.Command {
	var f filesFlags
	var to, format string
	cmd := &cobra.Command{
		Use:   "get --repo DIR BACKUP_ID LOCATION... --to DIR|- [--format tar|zip]",
		Short: "Copy files or directories out of a backup, into a directory or as a tar or zip stream",
		Long: filesLong + `

get copies each location (a file, a symlink, or a directory with all under
it) into --to under its base name, keeping permissions, times, symlinks and,
when run as root, owners; it never overwrites what is there. With --to -
it writes a tar (or --format zip) stream on standard output instead (JSON
messages then go to standard error). Device files, fifos and sockets are
skipped with a warning. A file whose data fails verification is never
written: the command stops with exit code 8 (a tar or zip stream is left
without its end, so it reads as truncated).`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return errorf(errs.ErrUsage, "--to is required: a directory, or - for a stream on standard output")
			}
			switch format {
			case "tar", "zip":
			default:
				return errorf(errs.ErrUsage, "--format %q: use tar or zip", format)
			}
			if format != "tar" && to != "-" {
				return errorf(errs.ErrUsage, "--format %s only goes with --to - (a stream on standard output)", format)
			}
			type loc struct{ fs, p string }
			var locs []loc
			for _, l := range args[1:] {
				fsName, p, err := filerestore.ParseLocation(l)
				if err != nil {
					return err
				}
				locs = append(locs, loc{fsName, p})
			}
			if to == "-" {
				a.out.Out = os.Stderr // stdout is the stream
			}
			s, done, err := f.start(cmd.Context(), a, args[0])
			if err != nil {
				return err
			}
			defer done()
			ctx := cmd.Context()
			var sink filerestore.Sink
			switch {
			case to != "-":
				if sink, err = filerestore.NewDirSink(to); err != nil {
					return err
				}
			case format == "zip":
				sink = filerestore.NewZipSink(os.Stdout)
			default:
				sink = filerestore.NewTarSink(os.Stdout)
			}
			var st filerestore.GetStats
			for _, l := range locs {
				fsys, err := s.Find(l.fs)
				if err != nil {
					return err
				}
				if err := s.Get(ctx, fsys, l.p, sink, &st, func(msg string) { a.out.Warn("%s", msg) }); err != nil {
					return err
				}
			}
			if err := sink.Close(); err != nil {
				return err
			}
			chunks, bytes := s.fetched()
			a.out.Summary(struct {
				BackupID string `json:"backup_id"`
				VM       string `json:"vm"`
				To       string `json:"to"`
				Format   string `json:"format,omitempty"`
				filerestore.GetStats
				BootS      float64 `json:"boot_s"`
				ChunksRead int64   `json:"chunks_read"`
				BytesRead  int64   `json:"bytes_read"`
			}{s.id.String(), s.m.VM, to, map[bool]string{true: format}[to == "-"], st, s.Boot.Seconds(), chunks, bytes}, func(w io.Writer) {
				fmt.Fprintf(os.Stderr, "copied %d files (%s), %d directories, %d symlinks from backup %s of %s to %s; read %s from the repository\n",
					st.Files, progress.Bytes(st.Bytes), st.Dirs, st.Symlinks, s.id.Short(), s.m.VM, to, progress.Bytes(bytes))
			})
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&to, "to", "", "directory to copy into (created if missing), or - for a stream on standard output (required)")
	cmd.Flags().StringVar(&format, "format", "tar", "stream format with --to -: tar or zip")
	return cmd
}
