package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/server/config"
)

// TestListen: a UNIX socket (a stale file replaced, another server's
// refused), TCP with TLS (a client that trusts the certificate gets
// through, one that does not is refused) and plain TCP on loopback serve
// the handler until the context ends.
func TestListen(t *testing.T) {
	dir := t.TempDir()
	cert, key, pool := selfSigned(t, dir)
	free := func() int {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().(*net.TCPAddr).Port
	}
	tlsPort, plainPort := free(), free()
	sock := filepath.Join(dir, "api.sock")
	os.WriteFile(sock, nil, 0o600) // a stale file
	cfg, err := config.Parse("server.yaml", []byte(fmt.Sprintf(`listen:
  - address: unix:%s
  - {address: "tcp:127.0.0.1:%d", tls_cert: %s, tls_key: %s}
  - {address: "tcp:127.0.0.1:%d", plain_tcp: true}
`, sock, tlsPort, cert, key, plainPort)))
	if err != nil {
		t.Fatal(err)
	}
	lns, err := Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(cfg); err == nil {
		t.Fatal("a second server listened on the same addresses")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- ServeHTTP(ctx, lns, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") }))
	}()
	get := func(c *http.Client, url string) error {
		resp, err := c.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if string(b) != "hello" {
			return fmt.Errorf("body %q", b)
		}
		return nil
	}
	unix := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	trusting := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	if err := get(unix, "http://x/"); err != nil {
		t.Fatalf("unix: %v", err)
	}
	if err := get(trusting, fmt.Sprintf("https://127.0.0.1:%d/", tlsPort)); err != nil {
		t.Fatalf("tls: %v", err)
	}
	if err := get(http.DefaultClient, fmt.Sprintf("https://127.0.0.1:%d/", tlsPort)); err == nil {
		t.Fatal("a client that does not trust the certificate got through")
	}
	if err := get(http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/", tlsPort)); err == nil {
		t.Fatal("plain HTTP answered on the TLS listener")
	}
	if err := get(http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/", plainPort)); err != nil {
		t.Fatalf("plain tcp: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left after the stop: %v", err)
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key.
func selfSigned(t *testing.T, dir string) (cert, key string, pool *x509.CertPool) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vmshadow test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(k)
	cert, key = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(key, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	c, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(c)
	return cert, key, pool
}
