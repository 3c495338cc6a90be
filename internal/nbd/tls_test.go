package nbd

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// testPKI is a CA with a server certificate for localhost/127.0.0.1, plus
// an unrelated CA, written in the directory layout qemu's tls-creds-x509
// and nbdkit --tls-certificates expect.
type testPKI struct {
	dir        string // ca-cert.pem, server-cert.pem, server-key.pem
	ca         *x509.CertPool
	otherCA    *x509.CertPool
	serverCert tls.Certificate
}

var (
	pkiOnce sync.Once
	pki     *testPKI
	pkiErr  error
)

// testTLS makes the PKI once per test binary.
func testTLS(t testing.TB) *testPKI {
	t.Helper()
	pkiOnce.Do(func() { pki, pkiErr = makePKI() })
	if pkiErr != nil {
		t.Fatal(pkiErr)
	}
	return pki
}

func (p *testPKI) clientConfig() *tls.Config { return &tls.Config{RootCAs: p.ca} }
func (p *testPKI) wrongConfig() *tls.Config  { return &tls.Config{RootCAs: p.otherCA} }
func (p *testPKI) serverConfig() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.serverCert}, MinVersion: tls.VersionTLS12}
}

func makePKI() (*testPKI, error) {
	dir, err := os.MkdirTemp("", "nbdpki")
	if err != nil {
		return nil, err
	}
	newCA := func(name string) (*x509.Certificate, *rsa.PrivateKey, error) {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return nil, nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(mrand.Int64()), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			return nil, nil, err
		}
		cert, err := x509.ParseCertificate(der)
		return cert, key, err
	}
	ca, caKey, err := newCA("vmshadow test CA")
	if err != nil {
		return nil, err
	}
	other, _, err := newCA("some other CA")
	if err != nil {
		return nil, err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(mrand.Int64()), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:              []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	files := map[string][]byte{
		"ca-cert.pem":     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}),
		"server-cert.pem": certPEM,
		"server-key.pem":  keyPEM,
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return nil, err
		}
	}
	p := &testPKI{dir: dir, ca: x509.NewCertPool(), otherCA: x509.NewCertPool()}
	p.ca.AddCert(ca)
	p.otherCA.AddCert(other)
	p.serverCert, err = tls.X509KeyPair(certPEM, keyPEM)
	return p, err
}

func TestMain(m *testing.M) {
	code := m.Run()
	if pki != nil {
		os.RemoveAll(pki.dir)
	}
	removeBenchImage()
	os.Exit(code)
}

// checkTLSClient checks a TLS server at uri (export with data want):
// the right CA reads the data, a wrong CA and a wrong host name are
// refused with errs.ErrAuth, a plain client is told TLS is required.
func checkTLSClient(t *testing.T, uri, plainURI string, want []byte) {
	t.Helper()
	p := testTLS(t)
	ctx := testCtx(t)
	c := dialT(t, uri, &Options{TLSConfig: p.clientConfig(), MetaContexts: []string{ContextBaseAllocation}})
	got := make([]byte, len(want))
	if _, err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read over TLS: %v (equal %v)", err, bytes.Equal(got, want))
	}
	if _, err := c.BlockStatus(ctx, ContextBaseAllocation, 0, int64(len(want))); err != nil {
		t.Fatalf("block status over TLS: %v", err)
	}
	if _, err := DialURI(ctx, uri, &Options{TLSConfig: p.wrongConfig()}); !errors.Is(err, errs.ErrAuth) {
		t.Fatalf("TLS with the wrong CA: %v, want an authentication error", err)
	}
	cfg := p.clientConfig()
	cfg.ServerName = "not-this-host.example"
	wrongHost, _ := ParseURI(uri)
	wrongHost.TLSHostname = ""
	if wrongHost.Network == "tcp" {
		wrongHost.Address = "localhost" + wrongHost.Address[len("127.0.0.1"):]
	}
	if _, err := Dial(ctx, wrongHost, &Options{TLSConfig: cfg}); !errors.Is(err, errs.ErrAuth) {
		t.Fatalf("TLS with the wrong host name: %v, want an authentication error", err)
	}
	_, err := DialURI(ctx, plainURI, nil)
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Reply != "NBD_REP_ERR_TLS_REQD" || !errors.Is(err, errs.ErrUnsupported) {
		t.Fatalf("plain client against a TLS server: %v", err)
	}
}

func TestTLSOurServer(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(11, 12))
	m := newMemExport(1 << 20)
	m.fill(rng, 0, 5, 15)
	_, sock, tcp := startServer(t, &ServerOptions{TLSConfig: testTLS(t).serverConfig()}, map[string]Export{"d": m}, nil)
	t.Run("tcp", func(t *testing.T) {
		checkTLSClient(t, "nbds://"+tcp+"/d", "nbd://"+tcp+"/d", m.snapshot())
	})
	t.Run("unix", func(t *testing.T) {
		checkTLSClient(t, "nbds+unix:///d?socket="+sock+"&tls-hostname=localhost", unixURI(sock, "d"), m.snapshot())
	})
}
