// Package e2e runs remora end to end: real agents as separate processes in
// the lab's network namespaces (two hosts), real libvirt, real QEMU guests.
// It needs root and the lab (`test/lab/lab.sh up`); set REMORA_E2E=1.
package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
	"github.com/remora-ha/remora/test/labkit"
)

var remoraBin string

// labPKI is the CA and certificates of the hosts that tests start without
// their own: the lab runs mutual TLS like a real deployment.
var labPKI string

func makeLabPKI(dir string) error {
	if err := pki.InitCA(dir, false); err != nil {
		return err
	}
	for name, ip := range map[string]string{"host-a": labkit.IPA, "host-b": labkit.IPB, "admin": ""} {
		var ips []net.IP
		if ip != "" {
			ips = append(ips, net.ParseIP(ip))
		}
		if err := pki.Issue(dir, name, ips...); err != nil {
			return err
		}
	}
	return nil
}

// dialAgentAs opens a connection to an agent's replication port from
// namespace ns with certificate name of dir's CA, as a peer agent would.
func dialAgentAs(ctx context.Context, ns, addr, dir, name string) (net.Conn, error) {
	raw, err := labkit.DialTCPNetns(ctx, ns, addr)
	if err != nil {
		return nil, err
	}
	cfg, err := pki.ClientConfig(dir, name)
	if err != nil {
		raw.Close()
		return nil, err
	}
	cfg.ServerName, _, _ = net.SplitHostPort(addr)
	c := tls.Client(raw, cfg)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return c, nil
}

// tlsConfigLines are the agent.yaml lines for agent name's certificate.
func tlsConfigLines(dir, name string) string {
	return fmt.Sprintf("tls_cert: %s\ntls_key: %s\ntls_ca: %s\n", pki.CertPath(dir, name), pki.KeyPath(dir, name), filepath.Join(dir, pki.CACertFile))
}

func TestMain(m *testing.M) {
	if os.Getenv("REMORA_E2E") != "1" {
		fmt.Println("e2e: skipped: set REMORA_E2E=1 (needs root and `test/lab/lab.sh up`)")
		os.Exit(m.Run())
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	if err := labkit.CheckLab(ctx); err != nil {
		cancel()
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	cancel()
	dir, err := os.MkdirTemp("", "remora-e2e-bin-")
	if err != nil {
		panic(err)
	}
	if remoraBin, err = labkit.BuildRemora(dir); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	labPKI = filepath.Join(dir, "pki")
	if err := makeLabPKI(labPKI); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: lab certificates:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func needLab(t *testing.T) {
	t.Helper()
	if remoraBin == "" {
		t.Skip("set REMORA_E2E=1 to run end-to-end tests (root and the lab required)")
	}
}

// host is one agent process acting as a hypervisor host in its own netns.
type host struct {
	t      *testing.T
	name   string
	netns  string
	addr   string // replication address
	dir    string
	config string
	env    []string

	mu   sync.Mutex
	cmd  *exec.Cmd
	log  *bytes.Buffer
	done chan struct{}

	apiOnce sync.Once
	api     *api.Client // one, so its connections are reused, not left idle
}

type hostOpts struct {
	interval string
	env      []string
	extra    string // more agent.yaml lines
}

func newHost(t *testing.T, name, netns, ip string, o hostOpts) *host {
	t.Helper()
	dir := labkit.QEMUTempDir(t)
	if o.interval == "" {
		o.interval = "100ms"
	}
	h := &host{t: t, name: name, netns: netns, addr: ip + ":7400", dir: dir, config: filepath.Join(dir, "agent.yaml"), env: o.env}
	if !strings.Contains(o.extra, "tls_cert:") && !strings.Contains(o.extra, "insecure_plaintext:") {
		o.extra += tlsConfigLines(labPKI, name)
	}
	if !strings.Contains(o.extra, "heartbeat_interval:") {
		// Lab tests keep a detector that a loaded CI machine (guests under
		// TCG on two cores) does not trip; the default is soaked apart.
		o.extra += fmt.Sprintf("heartbeat_interval: %v\nheartbeat_missed: %d\n", labDetector.interval, labDetector.missed)
	}
	if !strings.Contains(o.extra, "reprotect:") {
		// Tests re-protect by hand unless they test the automatic one.
		o.extra += "reprotect: manual\n"
	}
	cfg := fmt.Sprintf(`agent_id: %s
listen: %s
api_socket: %s
state_dir: %s
runtime_dir: %s
epoch_interval: %s
shell_suffix: "-%s"
log_level: debug
boot_dirs: [%s]
metrics_listen: %s:%d
%s`, name, h.addr, filepath.Join(dir, "agent.sock"), filepath.Join(dir, "state"), filepath.Join(dir, "run"), o.interval, name, labkit.LabDir(), ip, metricsPort, o.extra)
	if err := os.WriteFile(h.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	labkit.RegisterHook(t, remoraBin, h.config)
	t.Cleanup(func() {
		// A standby agent recreates a shell the guest's cleanup destroyed
		// while it ran: its shells go once it has stopped.
		defer destroyShells(name)
		if !t.Failed() {
			h.stop(syscall.SIGTERM)
			if os.Getenv("REMORA_E2E_KEEP_LOGS") != "" {
				h.saveLog()
			}
			return
		}
		// SIGQUIT: the agent prints its goroutines, for the saved log.
		h.stop(syscall.SIGQUIT)
		t.Logf("agent %s log (without debug lines):\n%s", name, h.logTail(80))
		h.saveLog()
	})
	return h
}

// destroyShells destroys the standby shells of agent name (the tests'
// shell_suffix is "-" + name).
func destroyShells(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := labkit.Virsh(ctx, "list", "--name")
	if err != nil {
		return
	}
	for _, d := range strings.Fields(out) {
		if strings.HasSuffix(d, "-"+name) {
			_, _ = labkit.Virsh(ctx, "destroy", d)
		}
	}
	// A shell promoted by a failover was defined persistently.
	if out, err := labkit.Virsh(ctx, "list", "--all", "--name"); err == nil {
		for _, d := range strings.Fields(out) {
			if strings.HasSuffix(d, "-"+name) {
				_, _ = labkit.Virsh(ctx, "undefine", d)
			}
		}
	}
}

func (h *host) start() {
	h.t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	cmd := exec.Command("ip", "netns", "exec", h.netns, remoraBin, "agent", "--config", h.config)
	if h.log == nil {
		h.log = &bytes.Buffer{}
	}
	w := &syncWriter{mu: &h.mu, b: h.log}
	cmd.Stdout, cmd.Stderr = w, w
	cmd.Env = append(os.Environ(), h.env...)
	if err := cmd.Start(); err != nil {
		h.t.Fatalf("start agent %s: %v", h.name, err)
	}
	h.cmd, h.done = cmd, make(chan struct{})
	done := h.done
	go func() { cmd.Wait(); close(done) }()
	// Wait for the API socket.
	c := h.client()
	for i := 0; i < 100; i++ {
		if _, err := c.Status(context.Background()); err == nil {
			return
		}
		select {
		case <-done:
			h.t.Fatalf("agent %s exited at start:\n%s", h.name, h.log.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
	h.t.Fatalf("agent %s did not serve its API", h.name)
}

// stop signals the agent and waits for it to exit.
func (h *host) stop(sig syscall.Signal) {
	h.mu.Lock()
	cmd, done := h.cmd, h.done
	h.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
	h.mu.Lock()
	h.cmd = nil
	h.mu.Unlock()
}

// running reports whether the agent process runs.
func (h *host) running() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cmd == nil {
		return false
	}
	select {
	case <-h.done:
		return false
	default:
		return true
	}
}

// exited reports whether the agent process has exited on its own.
func (h *host) exited() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.done
}

func (h *host) client() *api.Client {
	h.apiOnce.Do(func() { h.api = api.NewClient(filepath.Join(h.dir, "agent.sock")) })
	return h.api
}

func (h *host) status(name string) (api.VMStatus, bool) {
	s, err := h.client().VM(context.Background(), name)
	return s, err == nil
}

// cli runs `remora` with this host's config, from its namespace.
func (h *host) cli(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	full := append([]string{"netns", "exec", h.netns, remoraBin, "--config", h.config}, args...)
	out, err := exec.CommandContext(ctx, "ip", full...).CombinedOutput()
	return string(out), err
}

func (h *host) logTail(n int) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.log == nil {
		return ""
	}
	var lines []string
	for _, l := range strings.Split(h.log.String(), "\n") {
		if !strings.Contains(l, "level=DEBUG") {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// saveLog keeps a failed test's whole agent log (with the goroutine dump)
// in the temporary directory; REMORA_E2E_KEEP_LOGS=1 keeps every test's.
func (h *host) saveLog() {
	dir := filepath.Join(os.TempDir(), "remora-e2e-logs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return
	}
	name := strings.NewReplacer("/", "_", " ", "_").Replace(h.t.Name()) + "-" + h.name + ".log"
	h.mu.Lock()
	var b []byte
	if h.log != nil { // nil: the agent never started
		b = append(b, h.log.Bytes()...)
	}
	h.mu.Unlock()
	if os.WriteFile(filepath.Join(dir, name), b, 0o644) == nil {
		h.t.Logf("agent %s: whole log in %s", h.name, filepath.Join(dir, name))
	}
}

func (h *host) logCount(s string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.log == nil {
		return 0
	}
	return strings.Count(h.log.String(), s)
}

func (h *host) logContains(s string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.log != nil && strings.Contains(h.log.String(), s)
}

type syncWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// bootGuest boots a lab guest and destroys it (and its shells) at cleanup.
func bootGuest(t *testing.T, name string, ipIndex, rate int) *labkit.Guest {
	t.Helper()
	return bootGuestWith(t, labkit.GuestOptions{Name: name, IP: labkit.GuestIP(ipIndex), Rate: rate})
}

// bootGuestWith boots a lab guest with options o.
func bootGuestWith(t *testing.T, o labkit.GuestOptions) *labkit.Guest {
	t.Helper()
	name := o.Name
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	g, err := labkit.Boot(ctx, o)
	if err != nil {
		t.Fatalf("boot guest: %v", err)
	}
	t.Logf("guest %s booted in %s at %s", name, g.BootTime.Round(time.Millisecond), g.Addr())
	t.Cleanup(func() {
		_ = labkit.Destroy(name)
		for _, sfx := range []string{"-host-a", "-host-b"} {
			_ = labkit.Destroy(name + sfx) // and undefine: a promoted shell is defined
		}
	})
	return g
}

func dialGuest(t *testing.T, g *labkit.Guest) *labkit.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := g.Dial(ctx)
	if err != nil {
		t.Fatalf("dial guest %s: %v", g.Name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
