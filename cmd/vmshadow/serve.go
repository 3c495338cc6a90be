package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/instant"
	"github.com/vmshadow/vmshadow/internal/progress"
	"github.com/vmshadow/vmshadow/internal/restore"
)

func init() { commands = append(commands, newServeCmd) }

type servedExport struct {
	Disk     string `json:"disk"`
	Size     int64  `json:"size"`
	NBD      string `json:"nbd"`
	Writable bool   `json:"writable"`
}

func newServeCmd(a *app) *cobra.Command {
	var f repoFlags
	var disks []string
	var listen, stateDir string
	var writable bool
	var cacheMiB int
	cmd := &cobra.Command{
		Use:   "serve --repo DIR BACKUP_ID [--disk NAME] --listen unix:/path.sock|tcp:127.0.0.1:10809 [--writable]",
		Short: "Serve the disks of a backup over NBD, read on demand (instant restore)",
		Long: `serve exposes each disk of a backup (or those named with --disk) as an NBD
export named after the disk, reading chunks from the repository as they are
asked for and checking each against its hash. A VM can boot from it at once:

  qemu-system-x86_64 ... -drive file=nbd+unix:///vda?socket=/run/vm1-restore.sock,format=raw

or a user can mount it (qemu-nbd --connect, nbd-client). Read-only by default.
With --writable, writes go to a temporary overlay file in the state directory
and are visible to later reads; the repository is never changed, and the
overlay is discarded when serve stops (a later serve --writable removes those
of killed serves). To keep a writable instant restore,
copy or mirror the export while it is served (qemu-img convert, QEMU
blockdev-mirror). serve runs until interrupted (SIGINT, SIGTERM).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			network, addr, err := parseListen(listen)
			if err != nil {
				return err
			}
			// A shared lock keeps gc from removing chunks while they are served.
			r, ctx, id, m, release, err := f.openBackup(ctx, a, "serve", args[0])
			if err != nil {
				return err
			}
			defer release()
			sel, err := restore.Select(m, disks)
			if err != nil {
				return err
			}
			srv, err := instant.NewServer(ctx, r, id, m, instant.ServeOptions{Disks: sel, CacheBytes: int64(cacheMiB) << 20,
				Writable: writable, OverlayDir: filepath.Join(stateDir, "serve"), Warn: func(msg string) { a.out.Warn("%s", msg) }})
			if err != nil {
				return err
			}
			defer srv.Close()
			var served []servedExport
			for _, d := range sel {
				served = append(served, servedExport{Disk: d.Name, Size: d.Size, NBD: exportURI(network, addr, d.Name), Writable: writable})
			}
			if network == "unix" {
				os.Remove(addr)
			}
			ln, err := net.Listen(network, addr)
			if err != nil {
				return fmt.Errorf("listen on %s: %w", listen, err)
			}
			if network == "tcp" {
				if host, _, _ := net.SplitHostPort(addr); !net.ParseIP(host).IsLoopback() {
					a.out.Warn("serving on %s without TLS or authentication: anyone who can reach it can read the disks", addr)
				}
			}
			start := time.Now()
			for _, s := range served {
				a.out.Status(struct {
					Phase string `json:"phase"`
					servedExport
				}{"serving", s}, fmt.Sprintf("serving %s (%s) at %s", s.Disk, progress.Bytes(s.Size), s.NBD))
			}
			done := make(chan error, 1)
			go func() { done <- srv.Serve(ln) }()
			select {
			case err := <-done:
				return fmt.Errorf("serve: %w", err)
			case <-ctx.Done():
			}
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			srv.Shutdown(sctx)
			if network == "unix" {
				os.Remove(addr)
			}
			a.out.Summary(struct {
				BackupID  string         `json:"backup_id"`
				VM        string         `json:"vm"`
				Exports   []servedExport `json:"exports"`
				DurationS float64        `json:"duration_s"`
			}{id.String(), m.VM, served, time.Since(start).Seconds()}, func(w io.Writer) {
				fmt.Fprintf(w, "stopped serving backup %s of %s\n", id.Short(), m.VM)
			})
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringArrayVar(&disks, "disk", nil, "serve only this disk; repeat for several (default: all)")
	cmd.Flags().StringVar(&listen, "listen", "", "where to listen: unix:/path.sock or tcp:HOST:PORT (required)")
	cmd.Flags().BoolVar(&writable, "writable", false, "accept writes into a temporary local overlay (the repository is never changed)")
	intFlag(cmd.Flags(), &cacheMiB, "cache", 256, 0, 65536, "MiB of decoded chunks to cache per disk (at least one chunk)")
	cmd.Flags().StringVar(&stateDir, "state-dir", defaultStateDir(), "directory for the overlay files of --writable")
	cmd.MarkFlagRequired("listen")
	return cmd
}

// parseListen splits unix:/path or tcp:host:port.
func parseListen(s string) (network, addr string, err error) {
	network, addr, ok := strings.Cut(s, ":")
	if !ok || addr == "" || (network != "unix" && network != "tcp") {
		return "", "", errorf(errs.ErrUsage, "--listen %q: want unix:/path.sock or tcp:HOST:PORT", s)
	}
	if network == "unix" {
		dir := filepath.Dir(addr)
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return "", "", errorf(errs.ErrUsage, "--listen %q: the socket's directory %s is not an existing directory", s, dir)
		}
	}
	if network == "tcp" {
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			return "", "", errorf(errs.ErrUsage, "--listen %q: %v", s, err)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
			return "", "", errorf(errs.ErrUsage, "--listen %q: port %q is not a number from 0 (any free port) to 65535", s, port)
		}
	}
	return network, addr, nil
}

func exportURI(network, addr, name string) string {
	if network == "unix" {
		return "nbd+unix:///" + url.PathEscape(name) + "?socket=" + addr
	}
	return "nbd://" + addr + "/" + url.PathEscape(name)
}
