package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/internal/pki"
)

// runCerts runs `remora certs ARGS...` and returns what it printed.
func runCerts(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := &cobra.Command{Use: "remora", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(certsCmd())
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"certs"}, args...))
	err := root.Execute()
	return out.String(), err
}

func mustCerts(t *testing.T, args ...string) string {
	t.Helper()
	out, err := runCerts(t, args...)
	if err != nil {
		t.Fatalf("certs %v: %v\n%s", args, err, out)
	}
	return out
}

func readFileBytes(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func wantContains(t *testing.T, out string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}

func TestCertsCluster(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	out := mustCerts(t, "cluster", dir, "--agent", "host-a=192.0.2.1", "--agent", "host-b=192.0.2.2,2001:db8::2",
		"--arbiter", "arbiter=192.0.2.9", "--admin", "alice")
	wantContains(t, out,
		"created CA",
		"issued host-a (agent)", "issued host-b (agent)", "issued arbiter (arbiter)", "issued alice (admin)",
		"agent_id: host-a\ntls_cert: "+pki.CertPath(dir, "host-a")+"\ntls_key: "+pki.KeyPath(dir, "host-a")+"\ntls_ca: "+filepath.Join(dir, pki.CACertFile)+"\n",
		"tls:\n  cert: "+pki.CertPath(dir, "arbiter")+"\n  key: "+pki.KeyPath(dir, "arbiter")+"\n  ca: "+filepath.Join(dir, pki.CACertFile)+"\n",
		"tls_cert: "+pki.CertPath(dir, "alice"),
	)
	for _, name := range []string{"host-a", "host-b", "arbiter", "alice"} {
		if m := fileMode(t, pki.KeyPath(dir, name)); m != 0o600 {
			t.Errorf("%s.key mode %o, want 600", name, m)
		}
		if _, err := pki.ServerConfigFiles(pki.CertPath(dir, name), pki.KeyPath(dir, name), filepath.Join(dir, pki.CACertFile)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if m := fileMode(t, filepath.Join(dir, pki.CAKeyFile)); m != 0o600 {
		t.Errorf("ca.key mode %o, want 600", m)
	}
	b, err := pki.ReadCert(pki.CertPath(dir, "host-b"))
	if err != nil {
		t.Fatal(err)
	}
	if len(b.IPAddresses) != 2 || !b.IPAddresses[1].Equal(net.ParseIP("2001:db8::2")) {
		t.Errorf("host-b IPs %v", b.IPAddresses)
	}

	// Again, with one more agent: only that one is created.
	caBefore := readFileBytes(t, filepath.Join(dir, pki.CAKeyFile))
	aBefore := readFileBytes(t, pki.CertPath(dir, "host-a"))
	out = mustCerts(t, "cluster", dir, "--agent", "host-a=192.0.2.7", "--agent", "host-c", "--admin", "alice")
	wantContains(t, out, "using the CA", "kept host-a (agent)", "kept alice (admin)", "issued host-c (agent)",
		"note: "+pki.CertPath(dir, "host-a")+" has IPs [192.0.2.1], not [192.0.2.7]", "agent_id: host-c")
	if strings.Contains(out, "created CA") || strings.Contains(out, "issued host-a") {
		t.Errorf("second run recreated something:\n%s", out)
	}
	if !bytes.Equal(caBefore, readFileBytes(t, filepath.Join(dir, pki.CAKeyFile))) ||
		!bytes.Equal(aBefore, readFileBytes(t, pki.CertPath(dir, "host-a"))) {
		t.Error("second run replaced the CA or an existing certificate")
	}

	// An unreadable certificate is reported, not replaced.
	junk := []byte("not a certificate")
	if err := os.WriteFile(pki.CertPath(dir, "host-c"), junk, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := runCerts(t, "cluster", dir, "--agent", "host-c"); err == nil || !strings.Contains(err.Error(), "move it away") {
		t.Errorf("cluster over an unreadable certificate: %v", err)
	}
	if !bytes.Equal(junk, readFileBytes(t, pki.CertPath(dir, "host-c"))) {
		t.Error("cluster replaced an unreadable certificate")
	}
}

func TestCertsClusterKeepsAnInitCA(t *testing.T) {
	dir := t.TempDir()
	mustCerts(t, "init", dir)
	before := readFileBytes(t, filepath.Join(dir, pki.CACertFile))
	out := mustCerts(t, "cluster", dir, "--arbiter", "arbiter")
	wantContains(t, out, "using the CA", "note: the arbiter's certificate has no IP address")
	if !bytes.Equal(before, readFileBytes(t, filepath.Join(dir, pki.CACertFile))) {
		t.Fatal("cluster replaced the CA made by init")
	}
}

func TestCertsClusterRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{nil, "nothing to issue"},
		{[]string{"--agent", "host-a", "--admin", "host-a"}, "host-a is named twice"},
		{[]string{"--agent", "host-a=10.0.0.300"}, `"10.0.0.300" is not an IP address`},
		{[]string{"--agent", "../x"}, "the name must be"},
		{[]string{"--agent", "ca"}, "the name must be"},
		{[]string{"--admin", "alice=10.0.0.1"}, "takes no IP addresses"},
	} {
		out, err := runCerts(t, append([]string{"cluster", dir}, c.args...)...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("cluster %v: %v (want %q)\n%s", c.args, err, c.want, out)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("refused runs left %d files", len(entries))
	}
}

func TestCertsShow(t *testing.T) {
	dir := t.TempDir()
	mustCerts(t, "cluster", dir, "--agent", "host-a=192.0.2.1", "--arbiter", "arbiter=192.0.2.9")
	if err := pki.IssueLeaf(dir, pki.Leaf{Name: "host-soon", Lifetime: 12 * 24 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	out := mustCerts(t, "show", dir)
	lines := strings.Split(out, "\n")
	if !strings.HasPrefix(lines[0], "NAME") || !strings.HasPrefix(lines[1], "ca ") {
		t.Errorf("header and CA first:\n%s", out)
	}
	wantContains(t, out, "192.0.2.1", "730", "WARNING: certificate host-soon expires in 12 days",
		"renew it with `remora certs renew "+dir+" host-soon`")
	for _, l := range lines {
		if strings.HasPrefix(l, "host-soon ") && !strings.HasSuffix(l, "WARNING") {
			t.Errorf("host-soon row lacks the WARNING mark: %q", l)
		}
		if strings.HasPrefix(l, "host-a ") && strings.Contains(l, "WARNING") {
			t.Errorf("host-a marked: %q", l)
		}
	}

	// An expired certificate fails the command, in both formats.
	if err := pki.IssueLeaf(dir, pki.Leaf{Name: "host-gone", Lifetime: -24 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	out, err := runCerts(t, "show", dir)
	if err == nil || !strings.Contains(err.Error(), "host-gone (expired)") {
		t.Fatalf("show with an expired certificate: %v", err)
	}
	wantContains(t, out, "WARNING: certificate host-gone expired on")
	out, err = runCerts(t, "show", dir, "--json")
	if err == nil {
		t.Fatal("show --json with an expired certificate succeeded")
	}
	var infos []certInfo
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		t.Fatalf("--json output: %v\n%s", err, out)
	}
	got := map[string]certInfo{}
	for _, i := range infos {
		got[i.Name] = i
	}
	if len(infos) != 5 || !got["ca"].CA || got["host-a"].Warning != "" || got["host-a"].DaysLeft != 730 ||
		len(got["arbiter"].IPs) != 1 || got["host-soon"].DaysLeft != 12 || got["host-soon"].Expired ||
		!got["host-gone"].Expired || got["host-gone"].DaysLeft > 0 || got["host-gone"].Warning == "" {
		t.Errorf("JSON rows: %+v", infos)
	}
}

func TestCertsShowFailures(t *testing.T) {
	dir := t.TempDir()
	if _, err := runCerts(t, "show", dir); err == nil || !strings.Contains(err.Error(), "remora certs cluster") {
		t.Errorf("empty directory: %v", err)
	}
	if _, err := runCerts(t, "show", filepath.Join(dir, "missing")); err == nil {
		t.Error("missing directory accepted")
	}
	mustCerts(t, "cluster", dir, "--agent", "host-a")
	if err := os.WriteFile(filepath.Join(dir, "junk.crt"), []byte("not a certificate"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := runCerts(t, "show", dir)
	if err == nil || !strings.Contains(err.Error(), "junk (unreadable)") {
		t.Errorf("unreadable certificate: %v", err)
	}
	wantContains(t, out, "UNREADABLE", "host-a")
}

func TestCertsRenew(t *testing.T) {
	dir := t.TempDir()
	mustCerts(t, "init", dir)
	ips := []net.IP{net.ParseIP("192.0.2.1")}
	if err := pki.IssueLeaf(dir, pki.Leaf{Name: "host-a", IPs: ips, Lifetime: 5 * 24 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	oldCert := readFileBytes(t, pki.CertPath(dir, "host-a"))
	oldKey := readFileBytes(t, pki.KeyPath(dir, "host-a"))
	caKey := readFileBytes(t, filepath.Join(dir, pki.CAKeyFile))
	out := mustCerts(t, "renew", dir, "host-a")
	wantContains(t, out, "renewed host-a", pki.CertPath(dir, "host-a")+".old", "restart")

	if !bytes.Equal(oldCert, readFileBytes(t, pki.CertPath(dir, "host-a")+".old")) ||
		!bytes.Equal(oldKey, readFileBytes(t, pki.KeyPath(dir, "host-a")+".old")) {
		t.Error("the old pair is not kept as .old")
	}
	if m := fileMode(t, pki.KeyPath(dir, "host-a")+".old"); m != 0o600 {
		t.Errorf("host-a.key.old mode %o, want 600", m)
	}
	if !bytes.Equal(caKey, readFileBytes(t, filepath.Join(dir, pki.CAKeyFile))) {
		t.Error("renew touched the CA key")
	}
	c, err := pki.ReadCert(pki.CertPath(dir, "host-a"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.IPAddresses) != 1 || !c.IPAddresses[0].Equal(ips[0]) || c.Subject.CommonName != "host-a" {
		t.Errorf("renewed certificate: CN %q IPs %v", c.Subject.CommonName, c.IPAddresses)
	}
	if w := pki.ExpiryWarning(c, time.Now()); w != "" || pki.DaysLeft(c, time.Now()) < 729 {
		t.Errorf("renewed certificate still expiring: %q", w)
	}
	// The show listing ignores the .old files.
	if out := mustCerts(t, "show", dir); strings.Contains(out, ".old") || strings.Contains(out, "WARNING") {
		t.Errorf("show after renew:\n%s", out)
	}

	if _, err := runCerts(t, "renew", dir, "host-z"); err == nil || !strings.Contains(err.Error(), "remora certs issue host-z") {
		t.Errorf("renew of a missing certificate: %v", err)
	}
}

func fileMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}
