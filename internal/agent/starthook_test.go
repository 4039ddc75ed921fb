package agent

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/arbiter/heartbeat"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
)

// The libvirt hook's verdicts, against records on disk and a real arbiter
// over mutual TLS.
func TestCheckStart(t *testing.T) {
	ctx := context.Background()
	pkiDir := t.TempDir()
	for _, err := range []error{pki.InitCA(pkiDir, false), pki.Issue(pkiDir, "arbiter", net.ParseIP("127.0.0.1")), pki.Issue(pkiDir, "host-a"), pki.Issue(pkiDir, "host-b")} {
		if err != nil {
			t.Fatal(err)
		}
	}
	hostCfg := func(agentID, arb string) api.Config {
		c := api.Defaults()
		c.AgentID, c.StateDir, c.Arbiter = agentID, t.TempDir(), arb
		c.TLSCert, c.TLSKey, c.TLSCA = pki.CertPath(pkiDir, agentID), pki.KeyPath(pkiDir, agentID), filepath.Join(pkiDir, pki.CACertFile)
		return c
	}
	save := func(c api.Config, r *Record) {
		if err := (recordStore{dir: c.StateDir}).save(r); err != nil {
			t.Fatal(err)
		}
	}
	refused := func(c api.Config, name, want string) {
		t.Helper()
		err := CheckStart(ctx, c, name, "")
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("start %s on %s: %v, want a refusal saying %q", name, c.AgentID, err, want)
		}
		if !strings.Contains(err.Error(), "remora vm unenroll "+name) && !strings.Contains(err.Error(), "cannot read") {
			t.Fatalf("refusal does not say how to run it anyway: %v", err)
		}
	}
	allowed := func(c api.Config, name string) {
		t.Helper()
		if err := CheckStart(ctx, c, name, ""); err != nil {
			t.Fatalf("start %s on %s refused: %v", name, c.AgentID, err)
		}
	}

	// Without an arbiter only the agent's own record can say no.
	a := hostCfg("host-a", "")
	allowed(a, "web")                                      // not protected here
	save(a, &Record{Name: "shell", Role: api.RoleStandby}) // the agent's own shell
	allowed(a, "shell")
	save(a, &Record{Name: "web", Role: api.RolePrimary, Fence: 1})
	allowed(a, "web")
	save(a, &Record{Name: "web", Role: api.RolePrimary, Fence: 2, State: StateFenced})
	refused(a, "web", "was failed over to another host (fencing epoch 2)")
	// A shell waiting for an incoming state runs nothing by itself.
	shell := `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>web</name>` +
		`<qemu:commandline><qemu:arg value='-incoming'/><qemu:arg value='defer'/></qemu:commandline></domain>`
	if err := CheckStart(ctx, a, "web", shell); err != nil {
		t.Fatalf("a shell refused: %v", err)
	}
	if err := CheckStart(ctx, a, "web", "<domain type='qemu'><name>web</name></domain>"); err == nil {
		t.Fatal("the guest's own XML allowed")
	}
	allowed(a, "../../etc") // no such record can exist

	// After a failover or switchover this host keeps the guest's standby:
	// its old copy must not start, its shell may.
	save(a, &Record{Name: "db", Role: api.RoleStandby, Primary: "host-b", Fence: 4, Shell: "db-a", Superseded: "db"})
	refused(a, "db", `runs on host-b since fencing epoch 4; this host keeps its standby (shell "db-a")`)
	allowed(a, "db-a")
	// A guest failed over here runs in its shell and may be protected
	// from it: the record is found by its domain.
	save(a, &Record{Name: "mail", Role: api.RolePrimary, Fence: 5, Domain: "mail-a", State: StateFenced})
	if err := CheckStart(ctx, a, "mail-a", ""); err == nil || !strings.Contains(err.Error(), `guest "mail" was failed over to another host (fencing epoch 5)`) {
		t.Fatalf("a fenced copy found by its domain: %v", err)
	}

	// With the arbiter: it says where the guest runs.
	tc, err := pki.ServerConfig(pkiDir, "arbiter")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := arbiter.Open(arbiter.Config{StateDir: t.TempDir(), TLS: tc, LeaseDuration: 3 * time.Second,
		Heartbeat: heartbeat.Config{Interval: 100 * time.Millisecond, Missed: 3}, ProbeInterval: 100 * time.Millisecond, ProbeTimeout: 100 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	arbAddr := ln.Addr().String()
	cli, err := pki.ClientConfig(pkiDir, "host-b")
	if err != nil {
		t.Fatal(err)
	}
	cli.ServerName = "arbiter"
	b, err := arbiter.NewClient(arbAddr, cli)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := b.Register(ctx, arbiter.GuestSpec{Guest: "web", AgentID: "host-b", Role: arbiter.RolePrimary}); err != nil {
		t.Fatal(err)
	}
	// host-a's record says primary (it crashed before learning otherwise);
	// the arbiter has host-b.
	a = hostCfg("host-a", arbAddr)
	save(a, &Record{Name: "web", Role: api.RolePrimary, Fence: 0})
	refused(a, "web", `runs on host-b since fencing epoch 1 (the arbiter says)`)
	bc := hostCfg("host-b", arbAddr)
	save(bc, &Record{Name: "web", Role: api.RolePrimary, Fence: 1})
	allowed(bc, "web")
	save(a, &Record{Name: "db", Role: api.RolePrimary})
	refused(a, "db", "does not know guest")
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	refused(bc, "web", "does not answer")
}
