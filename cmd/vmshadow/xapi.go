package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/redact"
	"github.com/vmshadow/vmshadow/internal/xapi"
)

// xapiFlags say how to reach a XenServer / XCP-ng pool. The password comes
// from VMSHADOW_XAPI_PASSWORD, --xapi-password-file or a terminal prompt,
// never from the command line.
type xapiFlags struct {
	url          string
	user         string
	passwordFile string
	ca           string
	insecure     bool
	cached       *xapi.Config // config's, once built
}

// register adds the flags; urlFlag is --xapi, or --to-xapi for restore.
func (f *xapiFlags) register(cmd *cobra.Command, urlFlag, urlHelp string) {
	cmd.Flags().StringVar(&f.url, urlFlag, "", urlHelp)
	cmd.Flags().StringVar(&f.user, "xapi-user", "root", "XAPI user name")
	cmd.Flags().StringVar(&f.passwordFile, "xapi-password-file", "", "read the XAPI password from this file (else $VMSHADOW_XAPI_PASSWORD, else a terminal prompt)")
	cmd.Flags().StringVar(&f.ca, "xapi-ca", "", "PEM file of the CA (or the self-signed certificate) the pool master's TLS certificate is checked against (default: the system's CAs)")
	cmd.Flags().BoolVar(&f.insecure, "insecure", false, "do not verify the pool master's TLS certificate, and allow NBD without TLS (insecure_nbd networks)")
}

// config builds the client configuration, reading the password and CA,
// once: copies of f made after the first call share it (the VMs of one
// command), so a terminal prompt asks once.
func (f *xapiFlags) config(a *app) (xapi.Config, error) {
	if f.cached != nil {
		return *f.cached, nil
	}
	cfg, err := f.build(a)
	if err == nil {
		f.cached = &cfg
	}
	return cfg, err
}

func (f *xapiFlags) build(a *app) (xapi.Config, error) {
	cfg := xapi.Config{URL: f.url, User: f.user}
	if _, err := xapi.ParseURL(f.url, f.insecure); err != nil {
		return cfg, err
	}
	switch {
	case f.insecure && f.ca != "":
		return cfg, errorf(errs.ErrUsage, "give --xapi-ca or --insecure, not both")
	case f.insecure:
		a.out.Warn("--insecure: the pool master's identity is not verified; the password goes to whoever answers at %s", redact.URL(f.url))
		cfg.TLS = &tls.Config{InsecureSkipVerify: true}
	case f.ca != "":
		pem, err := os.ReadFile(f.ca)
		if err != nil {
			return cfg, errorf(errs.ErrUsage, "--xapi-ca: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return cfg, errorf(errs.ErrUsage, "--xapi-ca %s holds no PEM certificate", f.ca)
		}
		cfg.TLS = &tls.Config{RootCAs: pool}
	}
	pw, err := passwordSource("VMSHADOW_XAPI_PASSWORD", f.passwordFile, fmt.Sprintf("XAPI password of %s", f.user), false)()
	if err != nil {
		return cfg, err
	}
	cfg.Password = pw
	return cfg, nil
}
