package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vmshadow/vmshadow/internal/server/config"
)

// Listen opens every listen address of the configuration: UNIX sockets
// (a stale socket file removed first; mode 0660), TCP with TLS (plain
// TCP only where the configuration allows it, on loopback).
func Listen(cfg *config.Config) ([]net.Listener, error) {
	var out []net.Listener
	fail := func(err error) ([]net.Listener, error) {
		for _, l := range out {
			l.Close()
		}
		return nil, err
	}
	for _, l := range cfg.Listen {
		switch l.Network {
		case "unix":
			if err := os.MkdirAll(filepath.Dir(l.Addr), 0o755); err != nil {
				return fail(fmt.Errorf("listen on %s: %w", l.Address, err))
			}
			if c, err := net.Dial("unix", l.Addr); err == nil {
				c.Close()
				return fail(fmt.Errorf("listen on %s: another server answers there: stop it first", l.Address))
			}
			os.Remove(l.Addr)
			ln, err := net.Listen("unix", l.Addr)
			if err != nil {
				return fail(fmt.Errorf("listen on %s: %w", l.Address, err))
			}
			if err := os.Chmod(l.Addr, 0o660); err != nil {
				ln.Close()
				return fail(fmt.Errorf("listen on %s: %w", l.Address, err))
			}
			out = append(out, ln)
		case "tcp":
			ln, err := net.Listen("tcp", l.Addr)
			if err != nil {
				return fail(fmt.Errorf("listen on %s: %w", l.Address, err))
			}
			if !l.PlainTCP {
				cert, err := tls.LoadX509KeyPair(l.TLSCert, l.TLSKey)
				if err != nil {
					ln.Close()
					return fail(fmt.Errorf("listen on %s: TLS certificate %s and key %s: %w", l.Address, l.TLSCert, l.TLSKey, err))
				}
				ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
			}
			out = append(out, ln)
		default:
			return fail(fmt.Errorf("listen on %s: network %q", l.Address, l.Network))
		}
	}
	return out, nil
}

// ServeHTTP serves h on every listener until ctx ends, then shuts the
// HTTP servers down (open event streams are cut). It returns the first
// listener failure.
func ServeHTTP(ctx context.Context, lns []net.Listener, h http.Handler) error {
	errc := make(chan error, len(lns))
	var servers []*http.Server
	var wg sync.WaitGroup
	for _, ln := range lns {
		hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return ctx }}
		servers = append(servers, hs)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serve on %s: %w", ln.Addr(), err)
			}
		}()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, hs := range servers {
		hs.Shutdown(sctx)
	}
	wg.Wait()
	return err
}
