package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/spf13/cobra"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/internal/pki"
	"github.com/remora-ha/remora/internal/promcheck"
)

// run executes one top-level command with args and returns its output.
func runArbiterCLI(t *testing.T, ctx context.Context, args ...string) (string, error) {
	t.Helper()
	root := &cobra.Command{Use: "remora", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(arbiterCmd(), certsCmd())
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	return out.String(), err
}

func writeFile(t *testing.T, path, content string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func loadArbiter(t *testing.T, yaml string, flags ...string) (*arbiterConfig, error) {
	t.Helper()
	cmd := arbiterCmd()
	if err := cmd.ParseFlags(flags); err != nil {
		t.Fatal(err)
	}
	path := ""
	if yaml != "" {
		path = writeFile(t, filepath.Join(t.TempDir(), "arbiter.yaml"), yaml)
	}
	return loadArbiterConfig(cmd, path)
}

func TestExampleConfig(t *testing.T) {
	c, err := loadArbiter(t, mustRead(t, "../../configs/arbiter.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "0.0.0.0:7410" || c.LeaseDuration != 3*time.Second || c.Heartbeat.Interval != 100*time.Millisecond ||
		c.Heartbeat.Missed != 5 || c.Probe.Timeout != 500*time.Millisecond || c.TLS.CA != "/etc/remora/pki/ca.crt" ||
		c.MaxSuspend != 30*time.Second || c.MaxGuests != 1024 {
		t.Fatalf("example config decoded as %+v", c)
	}
}

func mustRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestConfigPrecedenceAndGuests(t *testing.T) {
	yaml := `
listen: 127.0.0.1:9000
state_dir: /tmp/x
lease_duration: 4s
probe: {interval: 2s}
max_suspend: 10s
max_guests: 5
guests:
  - name: db1
    service: {kind: line, address: "10.0.0.1:7000", send: PING, expect_prefix: PONG, timeout: 300ms}
  - name: web1
`
	c, err := loadArbiter(t, yaml)
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:9000" || c.LeaseDuration != 4*time.Second || c.Probe.Interval != 2*time.Second || c.Probe.Timeout != arbiter.DefaultProbeTimeout {
		t.Fatalf("file values: %+v", c)
	}
	sc := c.serverConfig()
	if len(sc.Services) != 1 || sc.Services["db1"].ExpectPrefix != "PONG" || sc.Services["db1"].Timeout != 300*time.Millisecond {
		t.Fatalf("services: %+v", sc.Services)
	}
	if sc.MaxSuspend != 10*time.Second || sc.MaxGuests != 5 {
		t.Fatalf("limits: max_suspend %v, max_guests %d", sc.MaxSuspend, sc.MaxGuests)
	}

	t.Setenv("REMORA_ARBITER_LEASE_DURATION", "5s")
	t.Setenv("REMORA_ARBITER_TLS_CERT", "/env/cert.pem")
	t.Setenv("REMORA_ARBITER_MAX_GUESTS", "7")
	c, err = loadArbiter(t, yaml)
	if err != nil {
		t.Fatal(err)
	}
	if c.LeaseDuration != 5*time.Second || c.TLS.Cert != "/env/cert.pem" || c.MaxGuests != 7 {
		t.Fatalf("env did not override: %+v", c)
	}
	c, err = loadArbiter(t, yaml, "--lease-duration", "6s", "--state-dir", "/flag")
	if err != nil {
		t.Fatal(err)
	}
	if c.LeaseDuration != 6*time.Second || c.StateDir != "/flag" || c.Listen != "127.0.0.1:9000" {
		t.Fatalf("flags did not override: %+v", c)
	}
}

func TestConfigErrors(t *testing.T) {
	cases := []struct{ yaml, want string }{
		{"listen: a:1\nbogus_key: 1\n", `unknown key "bogus_key"`},
		{"tls:\n  cert: x\n  crt: y\n", `unknown key "tls.crt"`},
		{"guests:\n  - name: g\n    service: {kind: tcp, adress: 'a:1'}\n", "adress"},
		{"lease_duration: -1s\n", "lease_duration must be positive"},
		{"guests:\n  - name: g\n    service: {kind: icmp, address: 'a:1'}\n", "unknown probe kind"},
		{"guests:\n  - name: g\n  - name: g\n", "listed twice"},
		{"log_level: loud\n", "log_level"},
		{"log_format: xml\n", `log_format "xml" unknown: use text or json`},
		{"lease_duration: soon\n", "lease_duration"},
		{"probe: {interval: 1ns}\n", "probe interval 1ns is below the minimum of 100ms"},
		{"probe: {interval: 2h}\n", "probe interval 2h0m0s exceeds the maximum of 1h0m0s"},
		{"probe: {interval: 1s, timeout: 1ms}\n", "probe timeout 1ms is below the minimum of 10ms"},
		{"probe: {interval: 1s, timeout: 2s}\n", "probe timeout 2s exceeds the probe interval 1s"},
		{"guests:\n  - name: g\n    service: {kind: tcp, address: 'a:1', interval: 1ns}\n", "guests[0] (g): probe interval 1ns is below the minimum of 100ms"},
		{"max_suspend: 0s\n", "max_suspend must be positive"},
		{"max_guests: -1\n", "max_guests must be positive"},
		{"max_guests: many\n", "max_guests"},
	}
	for _, c := range cases {
		_, err := loadArbiter(t, c.yaml)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("config %q: got %v, want error containing %q", c.yaml, err, c.want)
		}
	}
}

func TestCertsCommands(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	ctx := context.Background()
	if out, err := runArbiterCLI(t, ctx, "certs", "init", dir); err != nil || !strings.Contains(out, "created CA") {
		t.Fatalf("init: %v %s", err, out)
	}
	if _, err := runArbiterCLI(t, ctx, "certs", "init", dir); !errors.Is(err, pki.ErrCAExists) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("second init: %v", err)
	}
	if _, err := runArbiterCLI(t, ctx, "certs", "init", "--force", dir); err != nil {
		t.Fatalf("forced init: %v", err)
	}
	if _, err := runArbiterCLI(t, ctx, "certs", "issue", "arbiter", "--dir", dir, "--ip", "127.0.0.1", "--ip", "::1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pki.KeyPath(dir, "arbiter")); err != nil {
		t.Fatal(err)
	}
	if _, err := runArbiterCLI(t, ctx, "certs", "issue", "x", "--dir", dir, "--ip", "not-an-ip"); err == nil {
		t.Fatal("bad --ip accepted")
	}
	if _, err := runArbiterCLI(t, ctx, "certs", "issue", "x"); err == nil {
		t.Fatal("issue without --dir accepted")
	}
}

// syncBuffer is written by the server goroutine and read by the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestArbiterEndToEnd runs "arbiter" from a config file, registers a
// guest with the client library and reads it back with "arbiter status".
func TestArbiterEndToEnd(t *testing.T) {
	tmp := t.TempDir()
	pkiDir := filepath.Join(tmp, "pki")
	if err := pki.InitCA(pkiDir, false); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"arbiter", "host-a"} {
		if err := pki.Issue(pkiDir, n, net.ParseIP("127.0.0.1")); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ml, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ml.Addr().String()
	ml.Close()
	svc, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	go func() {
		for {
			c, err := svc.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	cfgPath := writeFile(t, filepath.Join(tmp, "arbiter.yaml"), `
listen: `+addr+`
state_dir: `+filepath.Join(tmp, "state")+`
tls:
  cert: `+pki.CertPath(pkiDir, "arbiter")+`
  key: `+pki.KeyPath(pkiDir, "arbiter")+`
  ca: `+filepath.Join(pkiDir, "ca.crt")+`
lease_duration: 2s
metrics_listen: `+metricsAddr+`
probe: {interval: 100ms, timeout: 100ms}
guests:
  - name: web1
    service: {kind: tcp, address: "`+svc.Addr().String()+`"}
`)

	ctx, cancel := context.WithCancel(context.Background())
	logs := &syncBuffer{}
	done := make(chan error, 1)
	go func() {
		root := &cobra.Command{Use: "remora", SilenceUsage: true, SilenceErrors: true}
		root.AddCommand(arbiterCmd(), certsCmd())
		root.SetOut(logs)
		root.SetErr(logs)
		root.SetArgs([]string{"arbiter", "--config", cfgPath, "--log-level", "debug"})
		done <- root.ExecuteContext(ctx)
	}()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("arbiter exited with %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("arbiter did not stop")
		}
	}()

	tc, err := pki.ClientConfig(pkiDir, "host-a")
	if err != nil {
		t.Fatal(err)
	}
	var c *arbiter.Client
	deadline := time.Now().Add(5 * time.Second)
	for {
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		c, err = arbiter.Dial(dctx, addr, tc)
		dcancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("arbiter never came up: %v\n%s", err, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer c.Close()
	rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
	defer rcancel()
	if _, err := c.Register(rctx, arbiter.GuestSpec{Guest: "web1", AgentID: "host-a", Role: arbiter.RolePrimary}); err != nil {
		t.Fatal(err)
	}
	// Wait for the configured service probe to report.
	for {
		st, err := c.Status(rctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Guests) == 1 && st.Guests[0].Service != nil && st.Guests[0].Service.OK {
			break
		}
		if rctx.Err() != nil {
			t.Fatalf("service probe never succeeded: %+v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}

	out, err := runArbiterCLI(t, ctx, "arbiter", "status", "--config", cfgPath)
	if err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	for _, want := range []string{"GUEST", "web1", "host-a", "ok ", "created 0->1", "AGENT"} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}
	t.Logf("status output:\n%s", out)
	out, err = runArbiterCLI(t, ctx, "arbiter", "status", "--config", cfgPath, "--json")
	if err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	var st arbiter.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --json output: %v\n%s", err, out)
	}
	if len(st.Guests) != 1 || st.Guests[0].Epoch != 1 || st.Guests[0].LeaseHolder != "host-a" || st.LeaseDuration != 2*time.Second {
		t.Fatalf("status --json: %+v", st)
	}
	if !strings.Contains(logs.String(), "arbiter: listening") {
		t.Errorf("no startup log:\n%s", logs.String())
	}

	// A refused request is counted under its error code.
	if _, err := c.Register(rctx, arbiter.GuestSpec{Guest: "web1", AgentID: "host-a", Role: arbiter.RoleStandby, Epoch: 1}); err == nil {
		t.Fatal("the primary registered as its own standby")
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("the Prometheus text parser refuses /metrics: %v", err)
	}
	find := func(name string, want map[string]string) float64 {
		t.Helper()
	next:
		for _, m := range fams[name].GetMetric() {
			for _, l := range m.Label {
				if w, ok := want[l.GetName()]; ok && w != l.GetValue() {
					continue next
				}
			}
			if m.Counter != nil {
				return m.Counter.GetValue()
			}
			return m.Gauge.GetValue()
		}
		t.Fatalf("no %s%v in /metrics", name, want)
		return 0
	}
	if v := find("remora_arbiter_guest_fencing_epoch", map[string]string{"guest": "web1", "primary": "host-a"}); v != 1 {
		t.Errorf("fencing epoch %v, status says 1", v)
	}
	if v := find("remora_arbiter_guest_probe_ok", map[string]string{"guest": "web1"}); v != 1 {
		t.Errorf("probe ok %v, status says ok", v)
	}
	if v := find("remora_arbiter_requests_total", map[string]string{"op": "register", "result": "ok"}); v < 1 {
		t.Errorf("registrations counted: %v", v)
	}
	if v := find("remora_arbiter_requests_total", map[string]string{"op": "register", "result": "conflict"}); v != 1 {
		t.Errorf("refused registrations counted: %v, want 1", v)
	}
	if v := find("remora_certificate_expiry_timestamp_seconds", map[string]string{"cert": "arbiter"}); time.Unix(int64(v), 0).Before(time.Now()) {
		t.Errorf("certificate expiry %v", v)
	}
}

func TestPrintArbiterStatus(t *testing.T) {
	now := time.Date(2030, 1, 1, 12, 0, 0, 0, time.Local)
	st := arbiter.Status{Now: now, Guests: []arbiter.GuestStatus{
		{Guest: "held", Epoch: 4, Primary: "host-a", LeaseHolder: "host-a", LeaseExpires: now.Add(20 * time.Second),
			LeaseRemaining: 20 * time.Second, SuspendedUntil: now.Add(20 * time.Second)},
		{Guest: "lost", Recovering: &arbiter.RecoveryStatus{Until: now.Add(6 * time.Second), Claims: make([]arbiter.Claim, 2)}},
		{Guest: "stuck", Recovering: &arbiter.RecoveryStatus{Until: now, Stuck: "no agent claims the primary role"}},
	}}
	var out bytes.Buffer
	printArbiterStatus(&out, st)
	for _, want := range []string{"suspended, 20s left (until 12:00:20.000)", "recovering until 12:00:06 (2 claims)", "recovery stuck: no agent claims the primary role"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status output lacks %q:\n%s", want, out.String())
		}
	}
}

// Every arbiter metric the example alert rules and dashboard use is one
// it serves.
func TestAlertRulesUseServedArbiterMetrics(t *testing.T) {
	missing, err := promcheck.Unserved(newArbiterCollector(nil, nil), promcheck.Files, func(m string) bool {
		return strings.HasPrefix(m, "remora_arbiter_")
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range missing {
		t.Errorf("alert rules use %s, which the arbiter does not serve", m)
	}
}
