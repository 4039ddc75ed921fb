// Package pki manages the small lab certificate authority that remora
// components use for mutual TLS.
//
// A PKI directory holds:
//
//	ca.crt, ca.key        the CA (ECDSA P-256); the key is mode 0600
//	NAME.crt, NAME.key    one leaf per component, usable as TLS server and
//	                      TLS client; CommonName and DNS SAN are NAME
//
// The identity of a peer is its certificate name, so NAME must be the agent
// id (or "arbiter") that the component uses on the wire.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"

	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 2 * 365 * 24 * time.Hour
	// Backdate certificates so small clock skew between hosts does not make
	// a freshly issued certificate "not yet valid".
	backdate = 5 * time.Minute
)

// ErrCAExists is returned by InitCA when the directory already holds a CA
// and force was not given.
var ErrCAExists = errors.New("pki: CA already exists")

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// ValidName reports whether name can be used as a certificate (and agent)
// name: 1-63 characters of letters, digits, '.', '_' and '-', not starting
// with a punctuation character, and not "ca".
func ValidName(name string) bool {
	return nameRE.MatchString(name) && name != "ca"
}

// CertPath and KeyPath return where Issue stores the leaf for name.
func CertPath(dir, name string) string { return filepath.Join(dir, name+".crt") }
func KeyPath(dir, name string) string  { return filepath.Join(dir, name+".key") }

// InitCA creates a new CA in dir (created with mode 0700 if missing).
// An existing CA is never replaced unless force is true, because every
// certificate issued by it would stop being trusted.
func InitCA(dir string, force bool) error {
	if !force {
		for _, f := range []string{CACertFile, CAKeyFile} {
			if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
				return fmt.Errorf("%w in %s", ErrCAExists, dir)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("pki: %w", err)
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: generate CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "remora lab CA", Organization: []string{"remora"}},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("pki: create CA certificate: %w", err)
	}
	// Key first: a cert without its key is useless, but a key without a
	// cert is just garbage that the next force init replaces.
	if err := writeKey(filepath.Join(dir, CAKeyFile), key); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, CACertFile), "CERTIFICATE", der, 0o644)
}

// Issue creates (or replaces) NAME.crt and NAME.key in dir, signed by the
// CA in dir. The certificate is valid for both server and client auth, with
// CommonName and DNS SAN equal to name, plus the given IP SANs.
func Issue(dir, name string, ips ...net.IP) error {
	if !ValidName(name) {
		return fmt.Errorf("pki: invalid certificate name %q", name)
	}
	caCert, caKey, err := loadCA(dir)
	if err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return err
	}
	now := time.Now()
	notAfter := now.Add(leafValidity)
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name, Organization: []string{"remora"}},
		NotBefore:    now.Add(-backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{name},
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("pki: issue %s: %w", name, err)
	}
	if err := writeKey(KeyPath(dir, name), key); err != nil {
		return err
	}
	return writePEM(CertPath(dir, name), "CERTIFICATE", der, 0o644)
}

// ServerConfig returns a TLS 1.3 server config presenting NAME's
// certificate and requiring a client certificate signed by the CA in dir.
func ServerConfig(dir, name string) (*tls.Config, error) {
	return ServerConfigFiles(CertPath(dir, name), KeyPath(dir, name), filepath.Join(dir, CACertFile))
}

// ClientConfig returns a TLS 1.3 client config presenting NAME's
// certificate and trusting only the CA in dir. ServerName is left empty;
// set it to the server's certificate name (or let the dialer derive it from
// the address).
func ClientConfig(dir, name string) (*tls.Config, error) {
	return ClientConfigFiles(CertPath(dir, name), KeyPath(dir, name), filepath.Join(dir, CACertFile))
}

// ServerConfigFiles is ServerConfig with explicit file paths.
func ServerConfigFiles(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, pool, err := loadPair(certFile, keyFile, caFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}, nil
}

// ClientConfigFiles is ClientConfig with explicit file paths.
func ClientConfigFiles(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, pool, err := loadPair(certFile, keyFile, caFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
	}, nil
}

// LoadCertPool reads a PEM bundle of CA certificates.
func LoadCertPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("pki: no certificates in %s", path)
	}
	return pool, nil
}

// Names returns the identities a certificate vouches for: its CommonName
// and DNS SANs, without duplicates.
func Names(cert *x509.Certificate) []string {
	var out []string
	seen := map[string]bool{}
	for _, n := range append([]string{cert.Subject.CommonName}, cert.DNSNames...) {
		if n != "" && !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	return out
}

func loadPair(certFile, keyFile, caFile string) (tls.Certificate, *x509.CertPool, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("pki: load %s: %w", certFile, err)
	}
	pool, err := LoadCertPool(caFile)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return cert, pool, nil
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, nil, fmt.Errorf("pki: load CA: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, fmt.Errorf("pki: load CA: %w", err)
	}
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("pki: %s: no certificate", CACertFile)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: %s: %w", CACertFile, err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, nil, fmt.Errorf("pki: %s: no key", CAKeyFile)
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: %s: %w", CAKeyFile, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, fmt.Errorf("pki: %s: not an ECDSA key", CAKeyFile)
	}
	if !cert.IsCA {
		return nil, nil, fmt.Errorf("pki: %s is not a CA certificate", CACertFile)
	}
	return cert, key, nil
}

func randomSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("pki: serial: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("pki: marshal key: %w", err)
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

// writePEM replaces path atomically so a crash never leaves a truncated
// key or certificate behind. The temp file is created 0600 and only then
// given its final mode, so a key is never readable by others.
func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := pem.Encode(f, &pem.Block{Type: typ, Bytes: der}); err != nil {
		return fmt.Errorf("pki: write %s: %w", path, err)
	}
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
