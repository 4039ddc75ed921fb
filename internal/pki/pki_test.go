package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestInitCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	if err := InitCA(dir, false); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, filepath.Join(dir, CAKeyFile)); m != 0o600 {
		t.Errorf("ca.key mode %o, want 600", m)
	}
	ca := readCert(t, filepath.Join(dir, CACertFile))
	if !ca.IsCA || ca.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("CA cert lacks CA constraints")
	}
	pub, ok := ca.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key is not ECDSA P-256: %T", ca.PublicKey)
	}

	before, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	err := InitCA(dir, false)
	if !errors.Is(err, ErrCAExists) {
		t.Fatalf("second InitCA: got %v, want ErrCAExists", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	if !bytes.Equal(before, after) {
		t.Fatal("refused InitCA still changed ca.crt")
	}
	if err := InitCA(dir, true); err != nil {
		t.Fatalf("forced InitCA: %v", err)
	}
	after, _ = os.ReadFile(filepath.Join(dir, CACertFile))
	if bytes.Equal(before, after) {
		t.Fatal("forced InitCA kept the old CA")
	}
}

func TestIssue(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir, false); err != nil {
		t.Fatal(err)
	}
	if err := Issue(dir, "host-a", net.ParseIP("192.0.2.7"), net.ParseIP("::1")); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, KeyPath(dir, "host-a")); m != 0o600 {
		t.Errorf("key mode %o, want 600", m)
	}
	c := readCert(t, CertPath(dir, "host-a"))
	if c.Subject.CommonName != "host-a" || !slices.Equal(c.DNSNames, []string{"host-a"}) {
		t.Errorf("names: CN=%q DNS=%v", c.Subject.CommonName, c.DNSNames)
	}
	if len(c.IPAddresses) != 2 || !c.IPAddresses[0].Equal(net.ParseIP("192.0.2.7")) {
		t.Errorf("IP SANs: %v", c.IPAddresses)
	}
	if !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		t.Errorf("EKU: %v", c.ExtKeyUsage)
	}
	pool, err := LoadCertPool(filepath.Join(dir, CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: pool, DNSName: "host-a", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("verify: %v", err)
	}
	if got := Names(c); !slices.Equal(got, []string{"host-a"}) {
		t.Errorf("Names = %v", got)
	}

	for _, bad := range []string{"", "ca", "../x", "a/b", "-x", "a b"} {
		if err := Issue(dir, bad); err == nil {
			t.Errorf("Issue(%q) succeeded", bad)
		}
	}
	if err := Issue(t.TempDir(), "x"); err == nil {
		t.Error("Issue without CA succeeded")
	}
}

// TestMutualTLS runs a handshake over a real socket in both directions of
// trust: a client from the same CA is accepted, one from another CA is not.
func TestMutualTLS(t *testing.T) {
	dir := t.TempDir()
	other := t.TempDir()
	for _, d := range []string{dir, other} {
		if err := InitCA(d, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := Issue(dir, "arbiter", net.ParseIP("127.0.0.1")); err != nil {
		t.Fatal(err)
	}
	if err := Issue(dir, "host-a"); err != nil {
		t.Fatal(err)
	}
	if err := Issue(other, "host-a"); err != nil {
		t.Fatal(err)
	}
	srvCfg, err := ServerConfig(dir, "arbiter")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if err := c.(*tls.Conn).Handshake(); err != nil {
					return
				}
				io.WriteString(c, "ok")
			}()
		}
	}()

	try := func(d string) error {
		cfg, err := ClientConfig(d, "host-a")
		if err != nil {
			t.Fatal(err)
		}
		cfg.RootCAs = srvCfg.ClientCAs // trust the real arbiter in both cases
		cfg.ServerName = "127.0.0.1"
		c, err := tls.Dial("tcp", ln.Addr().String(), cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		if c.ConnectionState().Version != tls.VersionTLS13 {
			t.Errorf("negotiated %x, want TLS 1.3", c.ConnectionState().Version)
		}
		buf := make([]byte, 2)
		_, err = io.ReadFull(c, buf)
		return err
	}
	if err := try(dir); err != nil {
		t.Fatalf("same-CA client refused: %v", err)
	}
	if err := try(other); err == nil {
		t.Fatal("client from a foreign CA was accepted")
	}
}
