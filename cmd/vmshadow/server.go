package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/server"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/config"
	"github.com/vmshadow/vmshadow/internal/server/web"
)

func init() { commands = append(commands, newServerCmd) }

// serverStopTimeout bounds the clean-up of running runs when the server
// stops (their sets released); systemd's TimeoutStopSec should exceed it.
const serverStopTimeout = 5 * time.Minute

func newServerCmd(a *app) *cobra.Command {
	var cfgPath string
	var check bool
	cmd := &cobra.Command{
		Use:   "server [--config /etc/vmshadow/server.yaml] [--check-config]",
		Short: "Run scheduled backup, verify, prune, gc and copy jobs with a REST API and metrics",
		Long: `vmshadow server runs the jobs of its configuration file on their schedules,
keeps their history in STATE_DIR/server.db, and serves the REST API (/api/v1,
described at /api/v1/openapi.json), Prometheus metrics (/metrics), /healthz
and a web interface (/, log in with an API token) on the configured listen
addresses. API tokens: 'vmshadow server token'.

SIGHUP reloads the configuration (a bad file changes nothing; running runs go
on with the settings they started with). SIGTERM or SIGINT cancels running
runs, releases their snapshot sets and stops. A server killed without that
marks its runs interrupted at the next start and recovers their VMs' sets.

--check-config validates the file and names the line of each mistake.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if check {
				cfg, err := config.Load(cfgPath)
				if err != nil {
					return err
				}
				a.out.Summary(struct {
					OK           bool `json:"ok"`
					Jobs         int  `json:"jobs"`
					Repositories int  `json:"repositories"`
					Connections  int  `json:"connections"`
				}{true, len(cfg.Jobs), len(cfg.Repositories), len(cfg.Connections)}, func(w io.Writer) {
					fmt.Fprintf(w, "%s is valid: %d jobs, %d repositories, %d connections\n", cfgPath, len(cfg.Jobs), len(cfg.Repositories), len(cfg.Connections))
				})
				return nil
			}
			return runServer(cmd.Context(), a, cfgPath)
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", config.DefaultPath, "the configuration file")
	cmd.Flags().BoolVar(&check, "check-config", false, "validate the configuration file and exit")
	cmd.AddCommand(newServerTokenCmd(a))
	return cmd
}

// runServer runs the server until ctx ends (SIGTERM, SIGINT).
func runServer(ctx context.Context, a *app, cfgPath string) error {
	log := slog.New(slog.NewTextHandler(a.out.ErrOut, nil))
	s, err := server.New(ctx, server.Options{ConfigPath: cfgPath, Version: version, Log: log})
	if err != nil {
		return err
	}
	lns, err := server.Listen(s.Config())
	if err != nil {
		s.Close(context.Background())
		return err
	}
	if err := s.Start(ctx); err != nil {
		for _, l := range lns {
			l.Close()
		}
		s.Close(context.Background())
		return err
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			if err := s.Reload(); err != nil {
				log.Error("configuration not reloaded; the previous one stays in force", "err", err)
			}
		}
	}()
	ui := web.New(s, web.Options{Version: version})
	h := web.Mount(ui, api.New(s, api.Options{Version: version, Metrics: s.MetricsHandler(), Sessions: ui, Logf: func(f string, args ...any) { log.Info(fmt.Sprintf(f, args...)) }}))
	for _, l := range s.Config().Listen {
		log.Info("listening", "address", l.Address)
	}
	serr := server.ServeHTTP(ctx, lns, h)
	log.Info("stopping: cancelling running runs")
	cctx, cancel := context.WithTimeout(context.Background(), serverStopTimeout)
	defer cancel()
	if err := s.Close(cctx); err != nil {
		return err
	}
	return serr
}
