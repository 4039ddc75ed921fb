package agent

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
)

// tlsConfigs builds the agent's mutual-TLS configurations. Peers are
// verified against the CA; their identity is the certificate name, which
// must match the agent id they claim in the protocol.
func tlsConfigs(c *api.Config) (server, client *tls.Config, err error) {
	if c.TLSCert == "" {
		return nil, nil, nil
	}
	server, err = pki.ServerConfigFiles(c.TLSCert, c.TLSKey, c.TLSCA)
	if err != nil {
		return nil, nil, fmt.Errorf("TLS: %w", err)
	}
	client, err = pki.ClientConfigFiles(c.TLSCert, c.TLSKey, c.TLSCA)
	if err != nil {
		return nil, nil, fmt.Errorf("TLS: %w", err)
	}
	leaf, err := x509.ParseCertificate(server.Certificates[0].Certificate[0])
	if err != nil {
		return nil, nil, err
	}
	if !slices.Contains(pki.Names(leaf), c.AgentID) {
		return nil, nil, fmt.Errorf("TLS: certificate %s is for %v, not agent_id %q: issue one with `remora certs issue %s`", c.TLSCert, pki.Names(leaf), c.AgentID, c.AgentID)
	}
	// A standby is dialled by address; its name is checked against the id
	// it announces, so verify the chain here instead of a host name.
	roots := client.RootCAs
	client.InsecureSkipVerify = true
	client.VerifyConnection = func(cs tls.ConnectionState) error { return verifyChain(roots, cs) }
	return server, client, nil
}

// verifyChain checks that the peer's certificate is signed by the CA.
func verifyChain(roots *x509.CertPool, cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("peer presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	if err != nil {
		return fmt.Errorf("peer certificate not signed by our CA: %w", err)
	}
	return nil
}

// arbiterTLS is the client configuration for the arbiter: signed by the
// CA and named arbiter_name, so no other certificate of the CA (another
// agent's, say) can pose as the arbiter and grant promotions.
func arbiterTLS(client *tls.Config, name string) *tls.Config {
	c := client.Clone()
	roots := c.RootCAs
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if err := verifyChain(roots, cs); err != nil {
			return err
		}
		if got := pki.Names(cs.PeerCertificates[0]); !slices.Contains(got, name) {
			return fmt.Errorf("the arbiter's certificate is for %v, not %q (arbiter_name): is %s the arbiter?", got, name, cs.ServerName)
		}
		return nil
	}
	return c
}

// peerNames returns the certificate names of a TLS peer, or nil for a
// plain connection.
func peerNames(conn net.Conn) ([]string, bool) {
	tc, ok := conn.(*tls.Conn)
	if !ok {
		return nil, false
	}
	cs := tc.ConnectionState()
	if len(cs.PeerCertificates) == 0 {
		return nil, true
	}
	return pki.Names(cs.PeerCertificates[0]), true
}

// checkPeerName refuses a TLS peer whose certificate is not for the agent
// id it claims.
func checkPeerName(conn net.Conn, claimed string) error {
	names, isTLS := peerNames(conn)
	if !isTLS {
		return nil
	}
	if !slices.Contains(names, claimed) {
		return fmt.Errorf("peer %s claims to be agent %q but its certificate is for %v", conn.RemoteAddr(), claimed, names)
	}
	return nil
}
