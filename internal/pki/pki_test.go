package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	c, err := ReadCert(path)
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

func TestExpiryWarning(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir, false); err != nil {
		t.Fatal(err)
	}
	issue := func(name string, lifetime time.Duration) *x509.Certificate {
		t.Helper()
		if err := IssueLeaf(dir, Leaf{Name: name, Lifetime: lifetime}); err != nil {
			t.Fatal(err)
		}
		return readCert(t, CertPath(dir, name))
	}
	soon := issue("host-a", 12*24*time.Hour)
	now := time.Now() // after issuing: NotAfter is at most 12 days away
	want := fmt.Sprintf("certificate host-a expires in 12 days (%s): renew it with `remora certs renew DIR host-a`",
		soon.NotAfter.UTC().Format(time.DateOnly))
	if got := ExpiryWarning(soon, now); got != want {
		t.Errorf("12 days left:\n got %q\nwant %q", got, want)
	}
	if d := DaysLeft(soon, now); d != 12 {
		t.Errorf("DaysLeft = %d, want 12", d)
	}
	if got := ExpiryWarningIn("/etc/remora/pki", soon, now); !strings.Contains(got, "`remora certs renew /etc/remora/pki host-a`") {
		t.Errorf("ExpiryWarningIn does not name the directory: %q", got)
	}
	if got := ExpiryWarning(issue("host-b", 31*24*time.Hour), now); got != "" {
		t.Errorf("31 days left: %q, want no warning", got)
	}
	gone := issue("host-c", -time.Hour)
	if !Expired(gone, now) || !gone.NotBefore.Before(gone.NotAfter) {
		t.Fatalf("expired test certificate: %v .. %v", gone.NotBefore, gone.NotAfter)
	}
	if got := ExpiryWarning(gone, now); !strings.HasPrefix(got, "certificate host-c expired on ") {
		t.Errorf("expired: %q", got)
	}

	ca := readCert(t, filepath.Join(dir, CACertFile))
	if got := ExpiryWarning(ca, now); got != "" {
		t.Errorf("fresh CA: %q", got)
	}
	if got := ExpiryWarning(ca, ca.NotAfter.Add(-48*time.Hour)); !strings.HasPrefix(got, "the CA certificate expires in 2 days") ||
		!strings.Contains(got, "certs init --force DIR") {
		t.Errorf("CA near its end: %q", got)
	}
}

func TestRenew(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir, false); err != nil {
		t.Fatal(err)
	}
	ips := []net.IP{net.ParseIP("192.0.2.7"), net.ParseIP("2001:db8::1")}
	if err := IssueLeaf(dir, Leaf{Name: "host-a", DNSNames: []string{"host-a.lab"}, IPs: ips, Lifetime: 3 * 24 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	oldCert, _ := os.ReadFile(CertPath(dir, "host-a"))
	oldKey, _ := os.ReadFile(KeyPath(dir, "host-a"))
	if err := Renew(dir, "host-a"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(CertPath(dir, "host-a") + ".old"); !bytes.Equal(b, oldCert) {
		t.Error("host-a.crt.old is not the old certificate")
	}
	if b, _ := os.ReadFile(KeyPath(dir, "host-a") + ".old"); !bytes.Equal(b, oldKey) {
		t.Error("host-a.key.old is not the old key")
	}
	for _, p := range []string{KeyPath(dir, "host-a"), KeyPath(dir, "host-a") + ".old"} {
		if m := mode(t, p); m != 0o600 {
			t.Errorf("%s mode %o, want 600", filepath.Base(p), m)
		}
	}
	if b, _ := os.ReadFile(KeyPath(dir, "host-a")); bytes.Equal(b, oldKey) {
		t.Error("renewal kept the old key")
	}
	c := readCert(t, CertPath(dir, "host-a"))
	if !slices.Equal(Names(c), []string{"host-a", "host-a.lab"}) || len(c.IPAddresses) != 2 ||
		!c.IPAddresses[0].Equal(ips[0]) || !c.IPAddresses[1].Equal(ips[1]) {
		t.Errorf("renewed names %v, IPs %v", Names(c), c.IPAddresses)
	}
	if left := time.Until(c.NotAfter); left < LeafLifetime-time.Hour || left > LeafLifetime {
		t.Errorf("renewed lifetime %v, want %v", left, LeafLifetime)
	}
	if _, err := tls.LoadX509KeyPair(CertPath(dir, "host-a"), KeyPath(dir, "host-a")); err != nil {
		t.Errorf("renewed pair does not match: %v", err)
	}

	if err := Renew(dir, "host-z"); err == nil || !strings.Contains(err.Error(), "remora certs issue host-z") {
		t.Errorf("renew of a missing certificate: %v", err)
	}
	if err := Renew(dir, "ca"); err == nil || !strings.Contains(err.Error(), "init --force") {
		t.Errorf("renew of the CA: %v", err)
	}
}

func TestReadCertTakesTheLeaf(t *testing.T) {
	dir := t.TempDir()
	if err := InitCA(dir, false); err != nil {
		t.Fatal(err)
	}
	if err := Issue(dir, "host-a"); err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(KeyPath(dir, "host-a"))
	leaf, _ := os.ReadFile(CertPath(dir, "host-a"))
	ca, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	chain := filepath.Join(dir, "chain.pem")
	if err := os.WriteFile(chain, slices.Concat(key, leaf, ca), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := ReadCert(chain)
	if err != nil || c.Subject.CommonName != "host-a" {
		t.Fatalf("ReadCert(key, leaf, CA) = %v, %v", c, err)
	}
	if _, err := ReadCert(KeyPath(dir, "host-a")); err == nil {
		t.Error("ReadCert of a key file succeeded")
	}
	if _, err := ReadCert(filepath.Join(dir, "missing.crt")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ReadCert of a missing file: %v", err)
	}
}
