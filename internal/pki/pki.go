// Package pki manages the small lab certificate authority that remora
// components use for mutual TLS.
//
// A PKI directory holds:
//
//	ca.crt, ca.key          the CA (ECDSA P-256); the key is mode 0600 and
//	                        is needed nowhere but here
//	NAME.crt, NAME.key      one leaf per component, usable as TLS server and
//	                        TLS client; CommonName and DNS SAN are NAME
//	NAME.crt.old, .key.old  the pair the last Renew replaced
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
	"math"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/remora-ha/remora/internal/names"
)

const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"

	caValidity = 10 * 365 * 24 * time.Hour
	// Backdate certificates so small clock skew between hosts does not make
	// a freshly issued certificate "not yet valid".
	backdate = 5 * time.Minute
)

// LeafLifetime is how long Issue and Renew make a component certificate
// valid (capped at the CA's own expiry). Two years: long enough that a lab
// cluster is not broken by a forgotten renewal, short enough that a lost
// key does not stay trusted for the CA's whole decade.
const LeafLifetime = 2 * 365 * 24 * time.Hour

// WarnBefore is how long before expiry ExpiryWarning starts to warn: a
// month leaves time to renew and restart every component.
const WarnBefore = 30 * 24 * time.Hour

// ErrCAExists is returned by InitCA when the directory already holds a CA
// and force was not given.
var ErrCAExists = errors.New("pki: CA already exists")

// ValidName reports whether name can be used as a certificate (and agent)
// name: 1-63 characters of letters, digits, '.', '_' and '-', not starting
// with a punctuation character, and not "ca".
func ValidName(name string) bool { return names.ValidAgent(name) }

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
	return IssueLeaf(dir, Leaf{Name: name, IPs: ips})
}

// Leaf is what IssueLeaf puts in a component certificate.
type Leaf struct {
	Name     string   // CommonName and first DNS SAN; the file name
	DNSNames []string // further DNS SANs (Renew carries them over)
	IPs      []net.IP
	// Lifetime from now; zero means LeafLifetime. Tests of expiry use
	// short ones, and a negative one for a certificate already expired.
	Lifetime time.Duration
}

// IssueLeaf is Issue with every field of the certificate given.
func IssueLeaf(dir string, l Leaf) error {
	if !ValidName(l.Name) {
		return fmt.Errorf("pki: invalid certificate name %q (1-63 letters, digits, '.', '_' or '-', not \"ca\")", l.Name)
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
	lifetime := l.Lifetime
	if lifetime == 0 {
		lifetime = LeafLifetime
	}
	now := time.Now()
	notAfter := now.Add(lifetime)
	if notAfter.After(caCert.NotAfter) {
		notAfter = caCert.NotAfter
	}
	notBefore := now
	if notAfter.Before(now) {
		notBefore = notAfter // an expired test certificate still starts before it ends
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: l.Name, Organization: []string{"remora"}},
		NotBefore:    notBefore.Add(-backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dnsNames(l),
		IPAddresses:  l.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("pki: issue %s: %w", l.Name, err)
	}
	if err := writeKey(KeyPath(dir, l.Name), key); err != nil {
		return err
	}
	return writePEM(CertPath(dir, l.Name), "CERTIFICATE", der, 0o644)
}

// dnsNames is l.Name followed by l.DNSNames, without duplicates.
func dnsNames(l Leaf) []string {
	out := []string{l.Name}
	for _, n := range l.DNSNames {
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// Renew reissues NAME with the names and IPs of its current certificate
// and a fresh LeafLifetime, keeping the old files as NAME.crt.old and
// NAME.key.old.
func Renew(dir, name string) error {
	if name == "ca" {
		return fmt.Errorf("pki: the CA is not renewed in place: create a new one with `remora certs init --force %s`, then renew every certificate", dir)
	}
	old, err := ReadCert(CertPath(dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pki: no certificate %s in %s: issue it with `remora certs issue %s --dir %s`", name, dir, name, dir)
	}
	if err != nil {
		return err
	}
	// Copies, not renames: until the new pair is written the old one
	// stays in place and working.
	for _, path := range []string{CertPath(dir, name), KeyPath(dir, name)} {
		if err := backup(path); err != nil {
			return err
		}
	}
	return IssueLeaf(dir, Leaf{Name: name, DNSNames: old.DNSNames, IPs: old.IPAddresses})
}

// backup copies path to path.old with the same mode.
func backup(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return writeFile(path+".old", b, st.Mode().Perm())
}

// ReadCert reads the first certificate of a PEM file: the leaf of a
// chain.
func ReadCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("pki: %s holds no PEM certificate", path)
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("pki: %s: %w", path, err)
		}
		return c, nil
	}
}

// DaysLeft is the number of days until cert expires, rounded up: 0 or
// less once it has expired.
func DaysLeft(cert *x509.Certificate, now time.Time) int {
	return int(math.Ceil(cert.NotAfter.Sub(now).Hours() / 24))
}

// Expired reports whether cert is past its NotAfter at now.
func Expired(cert *x509.Certificate, now time.Time) bool {
	return now.After(cert.NotAfter)
}

// ExpiryWarning returns "" while cert has more than WarnBefore left, else
// a sentence saying when it expires and how to renew it. DIR in the
// sentence stands for the PKI directory; ExpiryWarningIn names it.
func ExpiryWarning(cert *x509.Certificate, now time.Time) string {
	return ExpiryWarningIn("DIR", cert, now)
}

// ExpiryWarningIn is ExpiryWarning naming dir in the renew command.
func ExpiryWarningIn(dir string, cert *x509.Certificate, now time.Time) string {
	if cert.NotAfter.Sub(now) > WarnBefore {
		return ""
	}
	name := cert.Subject.CommonName
	if names := Names(cert); len(names) > 0 {
		name = names[0]
	}
	what := "certificate " + name
	fix := fmt.Sprintf("renew it with `remora certs renew %s %s`", dir, name)
	if cert.IsCA {
		what = "the CA certificate"
		fix = fmt.Sprintf("every certificate it signed stops working with it; create a new CA with `remora certs init --force %s`, then renew every certificate", dir)
	}
	date := cert.NotAfter.UTC().Format(time.DateOnly)
	if Expired(cert, now) {
		return fmt.Sprintf("%s expired on %s: %s", what, date, fix)
	}
	days := DaysLeft(cert, now)
	unit := "days"
	if days == 1 {
		unit = "day"
	}
	return fmt.Sprintf("%s expires in %d %s (%s): %s", what, days, unit, date, fix)
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
	cert, err := ReadCert(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, nil, fmt.Errorf("pki: load CA (create one with `remora certs init %s`): %w", dir, err)
	}
	if !cert.IsCA {
		return nil, nil, fmt.Errorf("pki: %s is not a CA certificate", CACertFile)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, fmt.Errorf("pki: load CA: %w", err)
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

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return writeFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

// writeFile replaces path atomically so a crash never leaves a truncated
// key or certificate behind. The temp file is created 0600 and only then
// given its final mode, so a key is never readable by others.
func writeFile(path string, data []byte, mode os.FileMode) error {
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
	if _, err := f.Write(data); err != nil {
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
