// Package s3test owns the real S3 server the tests run against: versitygw
// (Apache-2.0, an S3 gateway over a POSIX directory, each bucket a
// subdirectory). Binary finds it, or installs it with `go install` into
// ${XDG_CACHE_HOME:-~/.cache}/vmshadow/bin/versitygw-<Version>/ (about three
// minutes on two cores, once); Start runs it on a free loopback port over a
// temporary directory, with random root credentials, and stops it when the
// test ends. When it cannot be installed the test fails in CI (CI=true) and
// is skipped elsewhere. scripts/s3-test-server.sh installs the same binary
// into the same place.
package s3test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/vmshadow/vmshadow/internal/testutil"
)

// Version is the versitygw release the tests use.
const Version = "v1.8.0"

// Module is what `go install` builds.
const Module = "github.com/versity/versitygw/cmd/versitygw"

// CacheDir is where the binary is kept: ${XDG_CACHE_HOME:-~/.cache}/vmshadow/bin.
func CacheDir() string {
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			home = os.TempDir()
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "vmshadow", "bin")
}

// Path is where Binary looks for (and installs) the binary.
func Path() string {
	return filepath.Join(CacheDir(), "versitygw-"+Version, "versitygw")
}

func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if testutil.InCI() {
		t.Fatalf("%s (CI=true: S3 tests may not be skipped; run scripts/s3-test-server.sh install)", msg)
	}
	t.Skip(msg)
}

// Binary returns the versitygw binary: $VMSHADOW_VERSITYGW if set, else the
// cached one, installed first if missing. With -short it is not installed
// (the test is skipped) unless in CI.
func Binary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("VMSHADOW_VERSITYGW"); p != "" {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("VMSHADOW_VERSITYGW=%s: %v", p, err)
		}
		return p
	}
	p := Path()
	if _, err := os.Stat(p); err == nil {
		return p
	}
	if testing.Short() && !testutil.InCI() {
		t.Skipf("versitygw %s is not installed at %s and -short does not build it (run scripts/s3-test-server.sh install)", Version, p)
	}
	if err := install(p); err != nil {
		unavailable(t, "cannot install versitygw %s: %v", Version, err)
	}
	return p
}

// install builds the binary into a temporary directory next to p and
// renames it into place, under a file lock so parallel test processes
// build it once.
func install(p string) error {
	dir := filepath.Dir(p)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(filepath.Dir(dir), "versitygw-"+Version+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if _, err := os.Stat(p); err == nil {
		return nil // another process installed it meanwhile
	}
	gobin, err := os.MkdirTemp(dir, "install-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(gobin)
	goCmd, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("go is not in PATH: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goCmd, "install", Module+"@"+Version)
	cmd.Env = append(os.Environ(), "GOBIN="+gobin, "GOFLAGS=-buildvcs=false", "CGO_ENABLED=0")
	cmd.Dir = gobin
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go install %s@%s: %v\n%s", Module, Version, err, out)
	}
	return os.Rename(filepath.Join(gobin, "versitygw"), p)
}

// Options change how the server runs.
type Options struct {
	// TLS serves https with a certificate for 127.0.0.1 and localhost
	// signed by a fresh CA (Server.CAFile).
	TLS bool
	// VirtualDomain enables virtual-host addressing: bucket.<domain>.
	VirtualDomain string
}

// Server is a running versitygw.
type Server struct {
	Endpoint  string // 127.0.0.1:port
	URL       string // http(s)://127.0.0.1:port
	Dir       string // the POSIX root: one directory per bucket
	AccessKey string
	SecretKey string
	CAFile    string // with Options.TLS
	log       string
	pid       int
}

// CPUTime is the CPU time (user and system) the server has used so far.
func (s *Server) CPUTime() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", s.pid))
	if err != nil {
		return 0
	}
	// Fields after the parenthesised command name: utime and stime are the
	// 12th and 13th.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	var ut, st int64
	fmt.Sscan(f[11], &ut)
	fmt.Sscan(f[12], &st)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
}

var buckets atomic.Int64

// Start runs a server for the test and stops it at cleanup.
func Start(t testing.TB, o Options) *Server {
	t.Helper()
	bin := Binary(t)
	tmp := t.TempDir()
	s := &Server{Dir: filepath.Join(tmp, "root"), AccessKey: "vmshadowtest" + randHex(4), SecretKey: randHex(20), log: filepath.Join(tmp, "versitygw.log")}
	if err := os.Mkdir(s.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	scheme := "http"
	var tlsArgs []string
	if o.TLS {
		scheme = "https"
		cert, key := filepath.Join(tmp, "cert.pem"), filepath.Join(tmp, "key.pem")
		s.CAFile = filepath.Join(tmp, "ca.pem")
		if err := makeCerts(s.CAFile, cert, key); err != nil {
			t.Fatal(err)
		}
		tlsArgs = []string{"--cert", cert, "--key", key}
	}
	var lastErr error
	for range 5 { // a free port can be taken between choosing and binding it
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		s.Endpoint = fmt.Sprintf("127.0.0.1:%d", port)
		s.URL = scheme + "://" + s.Endpoint
		args := append([]string{"--port", s.Endpoint, "--keep-alive", "--quiet"}, tlsArgs...)
		if o.VirtualDomain != "" {
			args = append(args, "--virtual-domain", o.VirtualDomain)
		}
		args = append(args, "posix", s.Dir)
		if lastErr = s.run(t, bin, args); lastErr == nil {
			return s
		}
	}
	t.Fatalf("start versitygw: %v", lastErr)
	return nil
}

func (s *Server) run(t testing.TB, bin string, args []string) error {
	logf, err := os.Create(s.log)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY="+s.AccessKey, "ROOT_SECRET_KEY="+s.SecretKey)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	s.pid = cmd.Process.Pid
	exited := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-exited:
			out, _ := os.ReadFile(s.log)
			return fmt.Errorf("versitygw exited: %s", out)
		default:
		}
		if c, err := net.DialTimeout("tcp", s.Endpoint, time.Second); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("versitygw did not listen on %s within 30 s", s.Endpoint)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	return nil
}

// Env is the environment that gives a child process the server's
// credentials (and nothing from the caller's AWS configuration).
func (s *Server) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.AccessKey, "AWS_SECRET_ACCESS_KEY=" + s.SecretKey,
		"AWS_SESSION_TOKEN=", "AWS_PROFILE=", "AWS_REGION=", "AWS_DEFAULT_REGION=",
		"AWS_SHARED_CREDENTIALS_FILE=/nonexistent", "AWS_CONFIG_FILE=/nonexistent"}
}

// SetEnv sets Env in this process for the test.
func (s *Server) SetEnv(t *testing.T) {
	for _, kv := range s.Env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
}

// Client returns an S3 client with the root credentials, for setting up and
// inspecting the server independently of the code under test.
func (s *Server) Client(t testing.TB) *minio.Client {
	t.Helper()
	opts := &minio.Options{Creds: credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""), Secure: s.CAFile != "", Region: "us-east-1"}
	if s.CAFile != "" {
		tr, err := minio.DefaultTransport(true)
		if err != nil {
			t.Fatal(err)
		}
		pem, _ := os.ReadFile(s.CAFile)
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(pem)
		tr.TLSClientConfig.RootCAs = pool
		opts.Transport = tr
	}
	c, err := minio.New(s.Endpoint, opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Bucket creates a new bucket and returns its name.
func (s *Server) Bucket(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("test-%d-%s", buckets.Add(1), randHex(3))
	if err := s.Client(t).MakeBucket(context.Background(), name, minio.MakeBucketOptions{}); err != nil {
		t.Fatalf("create bucket %s: %v", name, err)
	}
	return name
}

// Log returns what the server printed.
func (s *Server) Log() string {
	b, _ := os.ReadFile(s.log)
	return string(b)
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// makeCerts writes a new CA certificate and a server certificate and key for
// 127.0.0.1 and localhost signed by it.
func makeCerts(caFile, certFile, keyFile string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vmshadow test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"localhost"},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	write := func(path, typ string, der []byte) error {
		return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
	}
	if err := write(caFile, "CERTIFICATE", caDER); err != nil {
		return err
	}
	if err := write(certFile, "CERTIFICATE", leafDER); err != nil {
		return err
	}
	return write(keyFile, "EC PRIVATE KEY", keyDER)
}
