package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/unixsock"
)

func testAuthAgent() *Agent {
	cfg := api.Defaults()
	cfg.APIGroup = "admins"
	return &Agent{cfg: cfg, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
}

var okHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })

func TestAdminAPIOverTCPTakesAPIAdminsOnly(t *testing.T) {
	h := testAuthAgent().authorize(okHandler, true, -1)
	for _, c := range []struct {
		names []string // nil: no client certificate
		want  int
	}{
		{[]string{"admin"}, http.StatusOK},
		{[]string{"host-a"}, http.StatusForbidden}, // an agent's certificate is not an admin's
		{[]string{"host-a", "admin"}, http.StatusOK},
		{nil, http.StatusUnauthorized},
	} {
		r := httptest.NewRequest("POST", "/v1/failover", nil)
		if c.names != nil {
			cert := &x509.Certificate{Subject: pkix.Name{CommonName: c.names[0]}, DNSNames: c.names[1:]}
			r.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}}
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != c.want {
			t.Errorf("%v: %d %s, want %d", c.names, w.Code, w.Body, c.want)
		}
		if c.want == http.StatusForbidden && !strings.Contains(w.Body.String(), "api_admins") {
			t.Errorf("the refusal does not say how to fix it: %s", w.Body)
		}
	}
}

func TestAdminSocketPeerCredentials(t *testing.T) {
	const gid = 4242
	h := testAuthAgent().authorize(okHandler, false, gid)
	me := unixsock.Cred{PID: os.Getpid(), UID: os.Getuid(), GID: os.Getgid()}
	for _, c := range []struct {
		name string
		cred *unixsock.Cred
		want int
	}{
		{"root", &unixsock.Cred{PID: 1, UID: 0, GID: 0}, http.StatusOK},
		{"api_group as primary group", &unixsock.Cred{PID: -1, UID: 1000, GID: gid}, http.StatusOK},
		{"another user", &unixsock.Cred{PID: -1, UID: 65534, GID: 65534}, http.StatusForbidden},
		{"no credentials", nil, http.StatusForbidden},
	} {
		r := httptest.NewRequest("GET", "/v1/vms", nil)
		if c.cred != nil {
			r = r.WithContext(context.WithValue(r.Context(), credKey{}, *c.cred))
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != c.want {
			t.Errorf("%s: %d %s, want %d", c.name, w.Code, w.Body, c.want)
		}
	}
	// Without api_group only root is let in.
	if localAdmin(unixsock.Cred{UID: 1000, GID: gid}, -1) {
		t.Error("a non-root peer let in without api_group")
	}
	// Supplementary groups are read from the peer process.
	groups := processGroups(me)
	sup, _ := os.Getgroups()
	for _, g := range sup {
		if g != 1 && !localAdmin(unixsock.Cred{PID: me.PID, UID: 1000, GID: 1}, g) {
			t.Errorf("supplementary group %d of pid %d (groups %v) not seen", g, me.PID, groups)
		}
	}
}

// Over a real socket: the credentials the kernel records reach the check.
func TestAdminSocketConnCred(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.sock")
	ln, err := listenAPI(path, -1)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v %v", fi.Mode(), err)
	}
	a := testAuthAgent()
	srv := &http.Server{Handler: a.authorize(okHandler, false, -1), ConnContext: connCred}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	c := http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
	resp, err := c.Get("http://agent/v1/vms")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	want := http.StatusForbidden
	if os.Getuid() == 0 {
		want = http.StatusOK
	}
	if resp.StatusCode != want {
		t.Fatalf("uid %d: %d, want %d", os.Getuid(), resp.StatusCode, want)
	}
}

func TestAdminSocketForAPIGroup(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("chown to root needs root")
	}
	path := filepath.Join(t.TempDir(), "a.sock")
	gid := 4242 // need not exist for chown
	ln, err := listenAPI(path, gid)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode().Perm() != 0o660 || st.Uid != 0 || int(st.Gid) != gid {
		t.Fatalf("socket %v owned %d:%d, want 0660 0:%d", fi.Mode().Perm(), st.Uid, st.Gid, gid)
	}
	cfg := api.Defaults()
	cfg.APIGroup = "no-such-group-remora"
	if _, err := apiGroupID(cfg); err == nil || !strings.Contains(err.Error(), "groupadd") {
		t.Fatalf("unknown api_group: %v", err)
	}
}
