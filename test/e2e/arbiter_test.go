package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/pki"
	"github.com/remora-ha/remora/test/labkit"
)

// arbLab is the three-host lab: arbiter in rm-arb, agents in rm-a and rm-b,
// all links mutually authenticated with certificates from one lab CA.
type arbLab struct {
	t       *testing.T
	pki     string
	arbDir  string
	arbCfg  string
	arbAddr string
	a, b    *host

	mu     sync.Mutex
	arbCmd *exec.Cmd
	arbLog bytes.Buffer
	arbEnd chan struct{}
}

func newArbLab(t *testing.T) *arbLab {
	t.Helper()
	return newArbLabWith(t, "")
}

// newArbLabWith is newArbLab with more agent.yaml lines for both agents.
func newArbLabWith(t *testing.T, agentExtra string) *arbLab {
	t.Helper()
	return newArbLabDetector(t, detectors{labDetector, labDetector, labDetector}, agentExtra)
}

// detector is the failure detectors' timing of a lab: the agents' (of
// each other and of the arbiter) and the arbiter's (of the agents).
type detector struct {
	interval time.Duration
	missed   int
}

// labDetector is the timing most lab tests run with.
var labDetector = detector{250 * time.Millisecond, 4}

// detectors is the detector timing of the arbiter and of each agent.
type detectors struct{ arbiter, a, b detector }

// newArbLabDetector is newArbLabWith with the detectors' timing d.
func newArbLabDetector(t *testing.T, d detectors, agentExtra string) *arbLab {
	t.Helper()
	l := &arbLab{t: t, pki: t.TempDir(), arbDir: t.TempDir(), arbAddr: labkit.IPArbiter + ":7410"}
	run := func(args ...string) {
		if out, err := exec.Command(remoraBin, args...).CombinedOutput(); err != nil {
			t.Fatalf("remora %v: %v\n%s", args, err, out)
		}
	}
	run("certs", "init", l.pki)
	run("certs", "issue", "arbiter", "--dir", l.pki, "--ip", labkit.IPArbiter)
	run("certs", "issue", "host-a", "--dir", l.pki, "--ip", labkit.IPA)
	run("certs", "issue", "host-b", "--dir", l.pki, "--ip", labkit.IPB)
	run("certs", "issue", "admin", "--dir", l.pki)
	l.arbCfg = filepath.Join(l.arbDir, "arbiter.yaml")
	cfg := fmt.Sprintf(`listen: %s
state_dir: %s
tls:
  cert: %s
  key: %s
  ca: %s
lease_duration: 3s
heartbeat:
  interval: %s
  missed: %d
probe:
  interval: 500ms
  timeout: 400ms
log_level: debug
`, l.arbAddr, filepath.Join(l.arbDir, "state"), pki.CertPath(l.pki, "arbiter"), pki.KeyPath(l.pki, "arbiter"), filepath.Join(l.pki, "ca.crt"), d.arbiter.interval, d.arbiter.missed)
	if err := os.WriteFile(l.arbCfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	tlsLines := func(name string, d detector) string {
		return fmt.Sprintf("arbiter: %s\ntls_cert: %s\ntls_key: %s\ntls_ca: %s\nheartbeat_interval: %s\nheartbeat_missed: %d\n",
			l.arbAddr, pki.CertPath(l.pki, name), pki.KeyPath(l.pki, name), filepath.Join(l.pki, "ca.crt"), d.interval, d.missed)
	}
	l.a = newHost(t, "host-a", labkit.NetnsA, labkit.IPA, hostOpts{extra: tlsLines("host-a", d.a) + agentExtra})
	l.b = newHost(t, "host-b", labkit.NetnsB, labkit.IPB, hostOpts{extra: tlsLines("host-b", d.b) + "api_listen: " + labkit.IPB + ":7401\n" + agentExtra})
	t.Cleanup(func() {
		l.stopArbiter()
		if t.Failed() {
			l.mu.Lock()
			t.Logf("arbiter log:\n%s", tail(l.arbLog.String(), 40))
			l.mu.Unlock()
		}
	})
	return l
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (l *arbLab) startArbiter() {
	l.t.Helper()
	cmd := exec.Command("ip", "netns", "exec", labkit.NetnsArbiter, remoraBin, "arbiter", "--config", l.arbCfg)
	w := &syncWriter{mu: &l.mu, b: &l.arbLog}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		l.t.Fatal(err)
	}
	end := make(chan struct{})
	go func() { cmd.Wait(); close(end) }()
	l.mu.Lock()
	l.arbCmd, l.arbEnd = cmd, end
	l.mu.Unlock()
	waitFor(l.t, "the arbiter to listen", 20*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		c, err := labkit.DialTCPNetns(ctx, labkit.NetnsA, l.arbAddr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

func (l *arbLab) stopArbiter() {
	l.mu.Lock()
	cmd, end := l.arbCmd, l.arbEnd
	l.arbCmd = nil
	l.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-end
}

// arbiterEpoch reads a guest's fencing epoch from `remora arbiter status`.
func (l *arbLab) arbiterEpoch(guest string) (uint64, error) {
	ep, _, err := l.arbiterGuest(guest)
	return ep, err
}

// arbiterGuest reads a guest's fencing epoch and sync state from `remora arbiter status`.
func (l *arbLab) arbiterGuest(guest string) (uint64, bool, error) {
	out, err := exec.Command("ip", "netns", "exec", labkit.NetnsArbiter, remoraBin, "arbiter", "status", "--json", "--config", l.arbCfg, "--addr", l.arbAddr).Output()
	if err != nil {
		return 0, false, err
	}
	var st arbiter.Status
	if err := json.Unmarshal(out, &st); err != nil {
		return 0, false, err
	}
	for _, g := range st.Guests {
		if g.Guest == guest {
			return g.Epoch, g.InSync, nil
		}
	}
	return 0, false, fmt.Errorf("guest %s not in arbiter status", guest)
}

// splitBrainWatch samples both copies of a guest and fails the test if
// they ever run at the same moment.
func splitBrainWatch(t *testing.T, primary, shell string) (stop func()) {
	var stopped atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stopped.Load() {
			a := domState(primary)
			b := domState(shell)
			if a == "running" && b == "running" {
				t.Errorf("split brain: %s and %s both running", primary, shell)
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	return func() { stopped.Store(true); <-done }
}

func domState(name string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := labkit.Virsh(ctx, "domstate", name)
	if err != nil {
		return "absent"
	}
	return s
}

func (l *arbLab) enroll(t *testing.T, g *labkit.Guest) {
	t.Helper()
	out, err := l.a.cli("vm", "enroll", g.Name, "--standby", l.b.addr, "--timeout", "3m",
		"--probe", fmt.Sprintf("line:%s:%d:get:", g.IP, labkit.GuestPort))
	if err != nil || !strings.Contains(out, "protected") {
		t.Fatalf("enroll: %v\n%s", err, out)
	}
	waitFor(t, "the lease and the standby's sync to be reported", time.Minute, func() bool {
		s, ok := l.a.status(g.Name)
		_, inSync, err := l.arbiterGuest(g.Name)
		return ok && s.LeaseHolder == "host-a" && s.Fence > 0 && err == nil && inSync
	})
}

// TestArbiterStandbyCrashThenPrimaryCrash: the standby dies, the primary
// continues unprotected once the arbiter agrees (a new fencing epoch); the
// standby comes back and protection resumes; then the primary host dies
// and the standby is promoted automatically, without an admin.
func TestArbiterStandbyCrashThenPrimaryCrash(t *testing.T) {
	needLab(t)
	l := newArbLab(t)
	name := "e2e-arb-crash"
	g := bootGuest(t, name, 14, 5000)
	l.startArbiter()
	l.a.start()
	l.b.start()
	l.enroll(t, g)
	stopWatch := splitBrainWatch(t, name, name+"-host-b")
	defer stopWatch()

	// Standby host crash.
	s0, _ := l.a.status(name)
	l.b.stop(9)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, _ = labkit.Virsh(ctx, "destroy", name+"-host-b")
	cancel()
	waitFor(t, "the primary to continue unprotected with the arbiter's consent", time.Minute, func() bool {
		s, ok := l.a.status(name)
		return ok && s.State == "unprotected" && s.Fence > s0.Fence
	})
	c := dialGuest(t, g)
	if _, err := c.Inc(context.Background()); err != nil {
		t.Fatalf("guest stopped serving without its standby: %v", err)
	}
	// The standby comes back: a new shell, a full sync, protected again.
	l.b.start()
	waitFor(t, "protection to resume", 3*time.Minute, func() bool {
		s, ok := l.a.status(name)
		return ok && s.State == checkpoint.StateProtected && s.AckedEpoch > s0.AckedEpoch
	})

	// Primary host crash: no admin acts.
	var samples []incSample
	for i := 0; i < 30; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		v, err := c.Inc(ctx)
		cancel()
		if err == nil {
			if s, ok := l.a.status(name); ok {
				samples = append(samples, incSample{v, s.Started + 1})
			}
		}
		time.Sleep(30 * time.Millisecond)
	}
	waitFor(t, "the last samples to be committed", 30*time.Second, func() bool {
		s, ok := l.b.status(name)
		return ok && s.Epoch >= samples[len(samples)-1].epoch
	})
	crashAt := time.Now()
	l.a.stop(9)
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	_, _ = labkit.Virsh(ctx, "destroy", name)
	cancel()
	waitFor(t, "automatic failover", 2*time.Minute, func() bool {
		s, ok := l.b.status(name)
		return ok && s.State == "failed-over"
	})
	t.Logf("automatic failover %s after the crash", time.Since(crashAt).Round(time.Millisecond))
	c2 := dialGuest(t, g)
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v, err := c2.Inc(ctx)
	if err != nil || v <= samples[len(samples)-1].value {
		t.Fatalf("counter on the promoted standby: %d, %v (last seen %d)", v, err, samples[len(samples)-1].value)
	}
	if r, err := c2.Check(ctx); err != nil || !r.OK {
		t.Fatalf("integrity check after automatic failover: %v %v", r, err)
	}
	st, _ := l.b.status(name)
	if ep, err := l.arbiterEpoch(name); err != nil || ep != st.Fence {
		t.Fatalf("arbiter epoch %d (%v), promoted guest's fence %d", ep, err, st.Fence)
	}

	t.Run("stale fencing epoch refused", func(t *testing.T) {
		cfg, err := pki.ClientConfig(l.pki, "host-a")
		if err != nil {
			t.Fatal(err)
		}
		cfg.InsecureSkipVerify = true
		raw, err := labkit.DialTCPNetns(context.Background(), labkit.NetnsA, l.b.addr)
		if err != nil {
			t.Fatal(err)
		}
		conn := tls.Client(raw, cfg)
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		if err := checkpoint.WriteJSON(conn, checkpoint.FrameHello, 1, 0, checkpoint.Hello{Agent: "host-a", Guest: name, PageSize: checkpoint.PageSize}); err != nil {
			t.Fatal(err)
		}
		var w checkpoint.Welcome
		_, err = checkpoint.ReadJSON(conn, checkpoint.FrameWelcome, &w)
		if err == nil || !strings.Contains(err.Error(), "failed over") {
			t.Fatalf("a deposed primary's hello was not refused: %v", err)
		}
	})
}

// TestArbiterPartitions: arbiter restarts keep epochs and never cause a
// failover; a cut primary-standby link causes none either; a primary cut
// off from everyone is replaced, pauses its guest once the arbiter may have
// lost it (before the standby can resume: the arbiter promotes early, not
// at the lease's end) and destroys it once it learns the new epoch. Never
// two running copies.
func TestArbiterPartitions(t *testing.T) {
	needLab(t)
	l := newArbLab(t)
	name := "e2e-arb-part"
	g := bootGuest(t, name, 15, 2000)
	l.startArbiter()
	l.a.start()
	l.b.start()
	l.enroll(t, g)
	stopWatch := splitBrainWatch(t, name, name+"-host-b")
	defer stopWatch()
	c := dialGuest(t, g)

	// Arbiter down: nothing fails over, replication goes on, the guest serves.
	epoch, err := l.arbiterEpoch(name)
	if err != nil {
		t.Fatal(err)
	}
	l.stopArbiter()
	s0, _ := l.a.status(name)
	time.Sleep(6 * time.Second) // two lease durations
	s1, _ := l.a.status(name)
	if s1.AckedEpoch <= s0.AckedEpoch || s1.State != checkpoint.StateProtected {
		t.Fatalf("replication stalled while the arbiter was down: %+v -> %+v", s0, s1)
	}
	ictx, icancel := context.WithTimeout(context.Background(), 20*time.Second)
	_, err = c.Inc(ictx)
	icancel()
	if err != nil {
		t.Fatalf("guest stopped serving while the arbiter was down: %v", err)
	}
	if st := domState(name + "-host-b"); st == "running" {
		t.Fatal("standby promoted without an arbiter")
	}
	l.startArbiter()
	if ep, err := l.arbiterEpoch(name); err != nil || ep != epoch {
		t.Fatalf("arbiter restart changed the epoch: %d -> %d (%v)", epoch, ep, err)
	}

	// Primary-standby link cut; both still reach the arbiter and the
	// guest answers clients: no failover.
	route := func(ns, verb, dst string) {
		if out, err := exec.Command("ip", "netns", "exec", ns, "ip", "route", verb, "blackhole", dst+"/32").CombinedOutput(); err != nil {
			t.Fatalf("route %s: %v %s", verb, err, out)
		}
	}
	route(labkit.NetnsA, "add", labkit.IPB)
	route(labkit.NetnsB, "add", labkit.IPA)
	healed := false
	t.Cleanup(func() {
		if !healed {
			_ = exec.Command("ip", "netns", "exec", labkit.NetnsA, "ip", "route", "del", "blackhole", labkit.IPB+"/32").Run()
			_ = exec.Command("ip", "netns", "exec", labkit.NetnsB, "ip", "route", "del", "blackhole", labkit.IPA+"/32").Run()
		}
	})
	time.Sleep(8 * time.Second)
	if st := domState(name + "-host-b"); st == "running" {
		t.Fatal("standby promoted although the primary and its service were alive")
	}
	// Its output is held while the standby does not acknowledge, until the
	// arbiter agrees that it continues alone.
	ictx, icancel = context.WithTimeout(context.Background(), 20*time.Second)
	_, err = c.Inc(ictx)
	icancel()
	if err != nil {
		t.Fatalf("primary stopped serving during the link cut: %v", err)
	}
	if s, _ := l.a.status(name); s.Output == nil || s.Output.Holding {
		t.Fatalf("output commit during the link cut: %+v, want released (not holding)", s.Output)
	}
	route(labkit.NetnsA, "del", labkit.IPB)
	route(labkit.NetnsB, "del", labkit.IPA)
	healed = true
	s2, _ := l.a.status(name)
	waitFor(t, "replication to resume after the link healed", 2*time.Minute, func() bool {
		s, ok := l.a.status(name)
		return ok && s.State == checkpoint.StateProtected && s.AckedEpoch > s2.AckedEpoch+5
	})
	// The arbiter let the primary go on alone (new epoch): the standby is
	// promotable again only once the primary reports it back in sync.
	if ep, _, err := l.arbiterGuest(name); err != nil || ep <= epoch {
		t.Fatalf("arbiter epoch after the link cut: %d (%v), want above %d", ep, err, epoch)
	}
	waitFor(t, "the arbiter to count the standby in sync again", time.Minute, func() bool {
		_, inSync, err := l.arbiterGuest(name)
		return err == nil && inSync
	})

	// Unenroll tells the standby over mutual TLS to drop its replica and
	// shell, and the arbiter to retire the guest's epoch; the guest keeps
	// serving and is enrolled again above every epoch issued.
	enrolledAt, err := l.arbiterEpoch(name)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := l.a.cli("vm", "unenroll", name); err != nil {
		t.Fatalf("unenroll: %v\n%s", err, out)
	}
	waitFor(t, "the standby to drop its replica and shell", time.Minute, func() bool {
		_, ok := l.b.status(name)
		return !ok && domState(name+"-host-b") == "absent"
	})
	if ep, err := l.arbiterEpoch(name); err != nil || ep != enrolledAt+1 {
		t.Fatalf("arbiter epoch after unenroll: %d (%v), want %d (retired)", ep, err, enrolledAt+1)
	}
	ictx, icancel = context.WithTimeout(context.Background(), 20*time.Second)
	_, err = c.Inc(ictx)
	icancel()
	if err != nil {
		t.Fatalf("guest stopped serving after unenroll: %v", err)
	}
	l.enroll(t, g)
	if ep, err := l.arbiterEpoch(name); err != nil || ep <= enrolledAt+1 {
		t.Fatalf("arbiter epoch after enrolling again: %d (%v), want above %d", ep, err, enrolledAt+1)
	}

	// Primary cut off from everyone, its guest's link too.
	heal := cutOffHostA(t, name)
	cut := time.Now()
	waitFor(t, "the standby to be promoted", 2*time.Minute, func() bool {
		s, ok := l.b.status(name)
		return ok && s.State == "failed-over"
	})
	t.Logf("standby promoted %s after the primary was cut off", time.Since(cut).Round(time.Millisecond))
	waitFor(t, "the isolated primary to pause its guest", time.Minute, func() bool {
		return domState(name) == "paused"
	})
	c2 := dialGuest(t, g)
	if _, err := c2.Inc(context.Background()); err != nil {
		t.Fatalf("promoted guest does not serve: %v", err)
	}
	heal() // its paused copy sends nothing; it is destroyed next
	waitFor(t, "the old primary to destroy its copy after learning the new epoch", time.Minute, func() bool {
		st := domState(name)
		return st == "shut off" || st == "absent"
	})
	if s, ok := l.a.status(name); !ok || s.State != "fenced" {
		t.Fatalf("old primary reports %+v, want fenced", s)
	}

	// The stale copy can never start again, whoever asks (the lab's
	// libvirt hook runs `remora libvirt-hook` of each test agent).
	vctx, vcancel := context.WithTimeout(context.Background(), time.Minute)
	defer vcancel()
	out, err := labkit.Virsh(vctx, "start", "--paused", name)
	if err == nil || !strings.Contains(err.Error()+out, "this copy is stale and must not start") {
		_, _ = labkit.Virsh(vctx, "destroy", name)
		t.Fatalf("virsh start of the superseded copy: err=%v out=%s, want the hook's refusal", err, out)
	}
	t.Logf("virsh start of the superseded copy refused: %v", err)
	// Control: once unenrolled here, the same start goes through (paused,
	// so it never serves next to the promoted copy).
	if out, err := l.a.cli("vm", "unenroll", name); err != nil {
		t.Fatalf("unenroll the fenced copy: %v\n%s", err, out)
	}
	if s, ok := l.b.status(name); !ok || s.State != "failed-over" {
		t.Fatalf("the stale copy's unenroll reached the promoted guest: %+v", s)
	}
	if out, err := labkit.Virsh(vctx, "start", "--paused", name); err != nil {
		t.Fatalf("start after unenroll (the control): %v %s", err, out)
	}
	if _, err := labkit.Virsh(vctx, "destroy", name); err != nil {
		t.Fatal(err)
	}
}

// cutOffHostA takes host A's link and its guest's tap down: A is cut off
// from everyone, and so is its copy of the guest. The returned heal brings
// both up; the test's cleanup does too, whatever a failure left cut.
func cutOffHostA(t *testing.T, guest string) (heal func()) {
	t.Helper()
	devs := []string{"rmv-a", guestIface(t, guest)}
	set := func(state string) {
		for _, dev := range devs {
			if out, err := exec.Command("ip", "link", "set", dev, state).CombinedOutput(); err != nil {
				t.Fatalf("link %s %s: %v %s", dev, state, err, out)
			}
		}
	}
	t.Cleanup(func() {
		for _, dev := range devs {
			_ = exec.Command("ip", "link", "set", dev, "up").Run()
		}
	})
	set("down")
	return func() { set("up") }
}

// guestIface returns the host-side tap of a domain's NIC.
func guestIface(t *testing.T, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := labkit.Virsh(ctx, "domiflist", name)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], "vnet") {
			return f[0]
		}
	}
	t.Fatalf("no tap for %s in:\n%s", name, out)
	return ""
}

// TestAuthenticationRefused: replication refuses a peer without a
// certificate from the lab CA, and a peer whose certificate names another
// agent than the one it claims to be.
func TestAuthenticationRefused(t *testing.T) {
	needLab(t)
	l := newArbLab(t)
	l.b.start()
	dial := func(cfg *tls.Config) (net.Conn, error) {
		raw, err := labkit.DialTCPNetns(context.Background(), labkit.NetnsA, l.b.addr)
		if err != nil {
			return nil, err
		}
		conn := tls.Client(raw, cfg)
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		if err := conn.Handshake(); err != nil {
			conn.Close()
			return nil, err
		}
		return conn, nil
	}
	t.Run("plain TCP", func(t *testing.T) {
		raw, err := labkit.DialTCPNetns(context.Background(), labkit.NetnsA, l.b.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
		_ = checkpoint.WriteJSON(raw, checkpoint.FrameHello, 0, 0, checkpoint.Hello{Agent: "host-a", Guest: "x"})
		if _, err := checkpoint.ReadFrame(raw); err == nil {
			t.Fatal("a plain TCP peer got an answer")
		}
	})
	t.Run("foreign CA", func(t *testing.T) {
		other := t.TempDir()
		if err := pki.InitCA(other, false); err != nil {
			t.Fatal(err)
		}
		if err := pki.Issue(other, "host-a"); err != nil {
			t.Fatal(err)
		}
		cfg, err := pki.ClientConfig(other, "host-a")
		if err != nil {
			t.Fatal(err)
		}
		cfg.InsecureSkipVerify = true
		conn, err := dial(cfg)
		if err == nil {
			// TLS 1.3 reports a refused client certificate on first read.
			_ = checkpoint.WriteJSON(conn, checkpoint.FrameHello, 0, 0, checkpoint.Hello{Agent: "host-a", Guest: "x"})
			_, err = checkpoint.ReadFrame(conn)
			conn.Close()
		}
		if err == nil {
			t.Fatal("a certificate from a foreign CA was accepted")
		}
	})
	t.Run("wrong name", func(t *testing.T) {
		if err := pki.Issue(l.pki, "mallory"); err != nil {
			t.Fatal(err)
		}
		cfg, err := pki.ClientConfig(l.pki, "mallory")
		if err != nil {
			t.Fatal(err)
		}
		cfg.InsecureSkipVerify = true
		conn, err := dial(cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = checkpoint.WriteJSON(conn, checkpoint.FrameHello, 0, 0, checkpoint.Hello{Agent: "host-a", Guest: "x", PageSize: checkpoint.PageSize})
		var w checkpoint.Welcome
		_, err = checkpoint.ReadJSON(conn, checkpoint.FrameWelcome, &w)
		if err == nil || !strings.Contains(err.Error(), "certificate is for [mallory]") {
			t.Fatalf("a peer claiming another agent's id was not refused: %v", err)
		}
		// The agent logs after answering: give it a moment.
		waitFor(t, "a log line naming the refused peer", 10*time.Second, func() bool {
			return l.b.logContains("claims to be agent")
		})
	})
	t.Run("admin API over mutual TLS", func(t *testing.T) {
		// An agent's certificate is not an admin's: api_admins is [admin].
		out, err := l.a.cli("vm", "status", "--agent", labkit.IPB+":7401")
		if err == nil || !strings.Contains(out, "api_admins") {
			t.Fatalf("host-a's agent certificate was let into host-b's admin API: %v\n%s", err, out)
		}
		adminCfg := filepath.Join(t.TempDir(), "admin.yaml")
		if err := os.WriteFile(adminCfg, []byte(fmt.Sprintf("tls_cert: %s\ntls_key: %s\ntls_ca: %s\n", pki.CertPath(l.pki, "admin"), pki.KeyPath(l.pki, "admin"), filepath.Join(l.pki, "ca.crt"))), 0o644); err != nil {
			t.Fatal(err)
		}
		b, err := exec.Command("ip", "netns", "exec", labkit.NetnsA, remoraBin, "--config", adminCfg, "vm", "status", "--agent", labkit.IPB+":7401").CombinedOutput()
		if out := string(b); err != nil || !strings.Contains(out, "no guests enrolled") {
			t.Fatalf("the admin could not query host-b's agent: %v\n%s", err, out)
		}
		other := t.TempDir()
		if err := pki.InitCA(other, false); err != nil {
			t.Fatal(err)
		}
		if err := pki.Issue(other, "host-a"); err != nil {
			t.Fatal(err)
		}
		cfg := filepath.Join(t.TempDir(), "foreign.yaml")
		// Trusts the lab CA, so only the agent's check of the client certificate can refuse it.
		yaml := fmt.Sprintf("agent_id: host-a\ntls_cert: %s\ntls_key: %s\ntls_ca: %s\n", pki.CertPath(other, "host-a"), pki.KeyPath(other, "host-a"), filepath.Join(l.pki, "ca.crt"))
		if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
			t.Fatal(err)
		}
		out2, err := exec.Command("ip", "netns", "exec", labkit.NetnsA, remoraBin, "--config", cfg, "vm", "status", "--agent", labkit.IPB+":7401").CombinedOutput()
		if err == nil {
			t.Fatalf("a certificate from a foreign CA was let into the admin API:\n%s", out2)
		}
	})
}

// arbiterLog is the arbiter's output so far.
func (l *arbLab) arbiterLog() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.arbLog.String()
}
