package arbiter

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remora-ha/remora/arbiter/heartbeat"
	"github.com/remora-ha/remora/internal/pki"
)

// syncBuffer collects log output from server goroutines.
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

type env struct {
	t        *testing.T
	pkiDir   string
	stateDir string
	clk      Clock
	cfg      Config
	logs     *syncBuffer
	srv      *Server
	addr     string
	done     chan error
}

// newEnv creates a CA with certificates for the arbiter and agents
// host-a, host-b, host-c. clk nil means real time.
func newEnv(t *testing.T, clk Clock, lease time.Duration) *env {
	t.Helper()
	e := &env{t: t, pkiDir: t.TempDir(), stateDir: t.TempDir(), clk: clk, logs: &syncBuffer{}}
	ok(t, pki.InitCA(e.pkiDir, false))
	ok(t, pki.Issue(e.pkiDir, "arbiter", net.ParseIP("127.0.0.1")))
	for _, n := range []string{"host-a", "host-b", "host-c"} {
		ok(t, pki.Issue(e.pkiDir, n))
	}
	tc, err := pki.ServerConfig(e.pkiDir, "arbiter")
	ok(t, err)
	e.cfg = Config{
		StateDir:      e.stateDir,
		TLS:           tc,
		LeaseDuration: lease,
		Heartbeat:     heartbeat.Config{Interval: 100 * time.Millisecond, Missed: 3},
		ProbeInterval: 100 * time.Millisecond,
		ProbeTimeout:  100 * time.Millisecond,
		Logger:        slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Clock:         clk,
	}
	e.start()
	t.Cleanup(e.stop)
	return e
}

func (e *env) start() {
	e.t.Helper()
	srv, err := Open(e.cfg)
	ok(e.t, err)
	addr := e.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	ok(e.t, err)
	e.addr = ln.Addr().String()
	e.srv = srv
	e.done = make(chan error, 1)
	go func() { e.done <- srv.Serve(ln) }()
}

func (e *env) stop() {
	if e.srv == nil {
		return
	}
	ok(e.t, e.srv.Close())
	if err := <-e.done; !errors.Is(err, ErrServerClosed) {
		e.t.Errorf("Serve returned %v", err)
	}
	e.srv = nil
}

// syncedPair registers guest "g" with host-a as its primary and host-b as
// its standby, which host-a reports in sync at epoch 1.
func syncedPair(t *testing.T, e *env) (a, b *Client) {
	t.Helper()
	a, b = e.client("host-a"), e.client("host-b")
	_, err := a.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RolePrimary})
	ok(t, err)
	_, err = b.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-b", Role: RoleStandby})
	ok(t, err)
	ok(t, a.ReportSynced(ctx(t), "g", "host-a", 1, "host-b"))
	return a, b
}

func (e *env) client(name string) *Client {
	e.t.Helper()
	cfg, err := pki.ClientConfig(e.pkiDir, name)
	ok(e.t, err)
	c, err := Dial(ctx(e.t), e.addr, cfg)
	ok(e.t, err)
	e.t.Cleanup(func() { c.Close() })
	return c
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	t.Cleanup(cancel)
	return c
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// lineService is a real TCP "guest service" answering PING with PONG.
func lineService(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	ok(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(2 * time.Second))
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					return
				}
				fmt.Fprintf(c, "PONG %s", line)
			}()
		}
	}()
	return ln
}

// agentListener stands in for an agent's replication port.
func agentListener(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	ok(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln
}

func guestStatus(t *testing.T, c *Client, guest string) GuestStatus {
	t.Helper()
	st, err := c.Status(ctx(t))
	ok(t, err)
	for _, g := range st.Guests {
		if g.Guest == guest {
			return g
		}
	}
	t.Fatalf("guest %s not in status %+v", guest, st)
	return GuestStatus{}
}

func TestRegisterRenewHeartbeatStatus(t *testing.T) {
	e := newEnv(t, nil, 3*time.Second)
	a := e.client("host-a")
	b := e.client("host-b")

	before := time.Now()
	reg, err := a.Register(ctx(t), GuestSpec{Guest: "web", AgentID: "host-a", Role: RolePrimary})
	ok(t, err)
	if reg.Epoch != 1 || reg.Lease == nil || reg.Lease.Holder != "host-a" {
		t.Fatalf("registration %+v", reg)
	}
	l, err := a.Renew(ctx(t), "web", "host-a", 1)
	ok(t, err)
	// The local deadline is conservative: no later than send + duration.
	if !l.Valid() || l.ValidUntil.After(time.Now().Add(3*time.Second)) || l.ValidUntil.Before(before.Add(2*time.Second)) {
		t.Fatalf("ValidUntil %v not within the lease", l.ValidUntil)
	}
	if l.Duration != 3*time.Second || l.Epoch != 1 {
		t.Fatalf("lease %+v", l)
	}
	_, err = b.Register(ctx(t), GuestSpec{Guest: "web", AgentID: "host-b", Role: RoleStandby})
	ok(t, err)
	ok(t, a.ReportSynced(ctx(t), "web", "host-a", 1, "host-b"))

	hb, err := b.Heartbeat(ctx(t), "host-b", map[string]uint64{"web": 1})
	ok(t, err)
	if hb.SuspectAfter <= 0 {
		t.Fatalf("heartbeat answer does not say when the arbiter suspects: %+v", hb)
	}
	as := hb.Assignments
	if len(as) != 1 || as[0].Role != RoleStandby || !as[0].InSync || as[0].Stale {
		t.Fatalf("assignments %+v", as)
	}
	g := guestStatus(t, b, "web")
	if g.Epoch != 1 || g.Primary != "host-a" || g.Standby != "host-b" || !g.InSync || g.LeaseHolder != "host-a" || g.LeaseRemaining <= 0 {
		t.Fatalf("status %+v", g)
	}
	st, err := a.Status(ctx(t))
	ok(t, err)
	var sawB bool
	for _, ag := range st.Agents {
		if ag.Agent == "host-b" {
			sawB = !ag.LastHeartbeat.IsZero() && !ag.HeartbeatSuspected
		}
	}
	if !sawB {
		t.Fatalf("host-b heartbeat not in status: %+v", st.Agents)
	}
	// Any mismatch between the epoch and the guest yields a typed error
	// carrying the current epoch.
	_, err = a.Renew(ctx(t), "web", "host-a", 0)
	e1 := mustCode(t, err, ErrStaleEpoch)
	if e1.CurrentEpoch != 1 || e1.Role != RolePrimary {
		t.Fatalf("stale details %+v", e1)
	}
	_, err = a.Renew(ctx(t), "nope", "host-a", 1)
	mustCode(t, err, ErrUnknownGuest)
}

// TestFailover covers the whole promotion path with the guest's service
// as a real TCP listener: refused while the primary's lease is valid and
// the service answers, refused after expiry while the service still
// answers, granted once it is silent; then the old primary is fenced.
func TestFailover(t *testing.T) {
	clk := newFakeClock()
	e := newEnv(t, clk, 3*time.Second)
	svc := lineService(t)
	a := e.client("host-a")
	b := e.client("host-b")
	standbyPort := agentListener(t)

	_, err := a.Register(ctx(t), GuestSpec{Guest: "db", AgentID: "host-a", Role: RolePrimary,
		Service: ProbeSpec{Kind: ProbeLine, Address: svc.Addr().String(), Send: "PING", ExpectPrefix: "PONG"}})
	ok(t, err)
	_, err = b.Register(ctx(t), GuestSpec{Guest: "db", AgentID: "host-b", Role: RoleStandby, AgentAddr: standbyPort.Addr().String()})
	ok(t, err)
	ok(t, a.ReportSynced(ctx(t), "db", "host-a", 1, "host-b"))
	eventually(t, "service probe ok", func() bool {
		g := guestStatus(t, b, "db")
		return g.Service != nil && g.Service.OK
	})

	// Link primary-standby cut, primary alive: no failover.
	_, err = b.RequestPromotion(ctx(t), "db", "host-b", 1)
	ae := mustCode(t, err, ErrLeaseValid)
	if !strings.Contains(ae.Message, "still answers") || ae.RetryAfter <= 0 {
		t.Fatalf("refusal lacks reason: %+v", ae)
	}
	// The lease runs out but the service still answers: still refused.
	clk.Advance(3 * time.Second)
	_, err = b.RequestPromotion(ctx(t), "db", "host-b", 1)
	mustCode(t, err, ErrServiceAlive)

	// The primary really died.
	svc.Close()
	g, err := b.RequestPromotion(ctx(t), "db", "host-b", 1)
	ok(t, err)
	if g.Epoch != 2 || g.PreviousPrimary != "host-a" || g.Lease.Holder != "host-b" || !g.Lease.Valid() {
		t.Fatalf("grant %+v", g)
	}
	_, err = a.Renew(ctx(t), "db", "host-a", 1)
	se := mustCode(t, err, ErrStaleEpoch)
	if se.CurrentEpoch != 2 || se.Primary != "host-b" || se.Role != RoleNone {
		t.Fatalf("stale details %+v", se)
	}
	_, err = b.Renew(ctx(t), "db", "host-b", 2)
	ok(t, err)
	reg, err := a.Register(ctx(t), GuestSpec{Guest: "db", AgentID: "host-a", Role: RoleStandby, Epoch: se.CurrentEpoch})
	ok(t, err)
	if reg.Role != RoleStandby || reg.Primary != "host-b" {
		t.Fatalf("re-registration %+v", reg)
	}
	st := guestStatus(t, a, "db")
	if st.Service == nil || st.Service.OK || st.Service.ConsecutiveFailures == 0 || st.Last == nil || st.Last.Kind != TransitionPromotion {
		t.Fatalf("status after failover %+v (service %+v)", st, st.Service)
	}
	if !strings.Contains(e.logs.String(), "promotion granted") {
		t.Fatal("grant not logged")
	}
}

// TestFailoverRealClock lets a real lease expire: the primary renews for a
// while, stops, and the standby polls until it is promoted.
func TestFailoverRealClock(t *testing.T) {
	const lease = time.Second
	e := newEnv(t, nil, lease)
	a, b := syncedPair(t, e)
	var lastRenew time.Time
	for i := 0; i < 4; i++ {
		_, err := a.Renew(ctx(t), "g", "host-a", 1)
		ok(t, err)
		lastRenew = time.Now()
		time.Sleep(lease / 10)
		_, err = b.RequestPromotion(ctx(t), "g", "host-b", 1)
		mustCode(t, err, ErrLeaseValid)
	}
	for {
		g, err := b.RequestPromotion(ctx(t), "g", "host-b", 1)
		if err == nil {
			if since := time.Since(lastRenew); since < lease {
				t.Fatalf("promoted %v after the last renewal, lease is %v", since, lease)
			}
			if g.Epoch != 2 {
				t.Fatalf("grant %+v", g)
			}
			break
		}
		var ae *Error
		if !errors.As(err, &ae) || ae.Code != CodeLeaseValid {
			t.Fatalf("unexpected refusal %v", err)
		}
		time.Sleep(min(ae.RetryAfter, 50*time.Millisecond))
	}
}

// TestEarlyPromotionOverTheWire: the arbiter promotes a standby in sync
// before the primary's lease runs out once the primary's own heartbeats
// stopped, and not while they arrive or before it ever heard them.
func TestEarlyPromotionOverTheWire(t *testing.T) {
	clk := newFakeClock()
	e := newEnv(t, clk, 10*time.Second)
	a, b := syncedPair(t, e)

	// Never heard: the arbiter may have just restarted; the lease rules.
	clk.Advance(time.Second)
	_, err := b.RequestPromotion(ctx(t), "g", "host-b", 1)
	mustCode(t, err, ErrLeaseValid)
	// Heard and heartbeating: the standby's suspicion alone is not enough.
	for i := 0; i < 5; i++ {
		_, err = a.Heartbeat(ctx(t), "host-a", map[string]uint64{"g": 1})
		ok(t, err)
		clk.Advance(100 * time.Millisecond)
	}
	_, err = b.RequestPromotion(ctx(t), "g", "host-b", 1)
	// Asked again when the primary would count as lost, not at lease end.
	if ae := mustCode(t, err, ErrLeaseValid); ae.RetryAfter != 200*time.Millisecond {
		t.Fatalf("retry after %v, want the 200ms until the primary counts as lost", ae.RetryAfter)
	}
	// Silent for the detector's missed intervals: promoted at once.
	clk.Advance(300 * time.Millisecond)
	g, err := b.RequestPromotion(ctx(t), "g", "host-b", 1)
	ok(t, err)
	if g.Epoch != 2 || g.PreviousPrimary != "host-a" {
		t.Fatalf("grant %+v", g)
	}
	if st := guestStatus(t, b, "g"); st.Last == nil || !strings.Contains(st.Last.Detail, "agent lost") {
		t.Fatalf("the transition does not say it came early: %+v", st.Last)
	}
	_, err = a.Renew(ctx(t), "g", "host-a", 1)
	mustCode(t, err, ErrStaleEpoch)
}

// TestNoFreshProbeAfterPrimaryLost: a service probe that failed after the
// arbiter last heard the primary spares the promotion a fresh probe (which
// against a dead host waits out its timeout); one older than the last
// heartbeat does not.
func TestNoFreshProbeAfterPrimaryLost(t *testing.T) {
	e := newEnv(t, nil, 10*time.Second)
	a := e.client("host-a")
	b := e.client("host-b")
	down := agentListener(t)
	addr := down.Addr().String()
	down.Close() // nothing listens: connection refused
	_, err := a.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RolePrimary, Service: ProbeSpec{Kind: ProbeTCP, Address: addr}})
	ok(t, err)
	_, err = b.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-b", Role: RoleStandby})
	ok(t, err)
	beat := func() time.Time {
		_, err := a.Heartbeat(ctx(t), "host-a", map[string]uint64{"g": 1})
		ok(t, err)
		return time.Now()
	}
	last := beat()
	eventually(t, "a failed probe begun after the heartbeat", func() bool {
		st, _, found := e.srv.probes.status(serviceKey("g"))
		return found && !st.OK && st.At.Add(-st.Latency).After(last)
	})
	if !e.srv.serviceDownSincePrimaryLost("g") {
		t.Fatal("a failure seen after the primary went silent still asks for a fresh probe")
	}
	beat() // the negative control: heard again since the failure
	if e.srv.serviceDownSincePrimaryLost("g") {
		t.Fatal("a failure older than the primary's last heartbeat spared the fresh probe")
	}
}

func TestStandbyLostFlow(t *testing.T) {
	setup := func(t *testing.T) (*env, *fakeClock, *Client, *Client, net.Listener) {
		clk := newFakeClock()
		e := newEnv(t, clk, 3*time.Second)
		a := e.client("host-a")
		b := e.client("host-b")
		port := agentListener(t)
		_, err := a.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RolePrimary})
		ok(t, err)
		_, err = b.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-b", Role: RoleStandby, AgentAddr: port.Addr().String()})
		ok(t, err)
		ok(t, a.ReportSynced(ctx(t), "g", "host-a", 1, "host-b"))
		_, err = b.Heartbeat(ctx(t), "host-b", nil)
		ok(t, err)
		return e, clk, a, b, port
	}
	check := func(t *testing.T, a, b *Client, detail string) {
		l, err := a.ReportStandbyLost(ctx(t), "g", "host-a", 1)
		ok(t, err)
		if l.Epoch != 2 || l.Holder != "host-a" {
			t.Fatalf("lease %+v", l)
		}
		// No promotion for the lost standby, even after the lease.
		_, err = b.RequestPromotion(ctx(t), "g", "host-b", 1)
		se := mustCode(t, err, ErrStaleEpoch)
		if se.Role != RoleNone || se.CurrentEpoch != 2 {
			t.Fatalf("stale details %+v", se)
		}
		g := guestStatus(t, a, "g")
		if g.InSync || g.UnprotectedSince.IsZero() || g.Last.Kind != TransitionStandbyLost {
			t.Fatalf("status %+v", g)
		}
		if !strings.Contains(g.Last.Detail, detail) {
			t.Fatalf("transition detail %q, want %q", g.Last.Detail, detail)
		}
	}
	t.Run("probe fails", func(t *testing.T) {
		_, _, a, b, port := setup(t)
		port.Close()
		check(t, a, b, "standby lost (")
	})
	t.Run("link cut, standby still there", func(t *testing.T) {
		_, _, a, b, _ := setup(t)
		check(t, a, b, "replication link cut")
	})
	t.Run("heartbeats stop", func(t *testing.T) {
		_, clk, a, b, _ := setup(t)
		clk.Advance(300 * time.Millisecond) // 3 missed intervals of 100 ms
		check(t, a, b, "standby lost (")
	})
}

// TestRefusesBadPeers: no certificate, a certificate from another CA, and
// a valid certificate claiming another agent's id.
func TestRefusesBadPeers(t *testing.T) {
	e := newEnv(t, nil, 3*time.Second)
	a := e.client("host-a")
	_, err := a.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RolePrimary})
	ok(t, err)
	caPool, err := pki.LoadCertPool(e.pkiDir + "/ca.crt")
	ok(t, err)

	t.Run("no certificate", func(t *testing.T) {
		c, err := Dial(ctx(t), e.addr, &tls.Config{RootCAs: caPool})
		if err == nil {
			defer c.Close()
			_, err = c.Renew(ctx(t), "g", "host-a", 1)
		}
		mustCode(t, err, ErrUnauthorized)
		eventually(t, "refusal log", func() bool {
			return strings.Contains(e.logs.String(), "refused connection") && strings.Contains(e.logs.String(), "certificate")
		})
	})
	t.Run("foreign CA", func(t *testing.T) {
		other := t.TempDir()
		ok(t, pki.InitCA(other, false))
		ok(t, pki.Issue(other, "host-a"))
		cfg, err := pki.ClientConfig(other, "host-a")
		ok(t, err)
		cfg.RootCAs = caPool
		c, err := Dial(ctx(t), e.addr, cfg)
		if err == nil {
			defer c.Close()
			_, err = c.Renew(ctx(t), "g", "host-a", 1)
		}
		mustCode(t, err, ErrUnauthorized)
		eventually(t, "refusal log", func() bool {
			return strings.Contains(e.logs.String(), "unknown authority")
		})
	})
	t.Run("wrong name", func(t *testing.T) {
		c := e.client("host-b")
		_, err := c.Renew(ctx(t), "g", "host-a", 1)
		mustCode(t, err, ErrUnauthorized)
		_, err = c.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RolePrimary, Epoch: 1})
		mustCode(t, err, ErrUnauthorized)
		logs := e.logs.String()
		want := `certificate names [host-b] do not match claimed agent id \"host-a\"`
		if !strings.Contains(logs, want) || !strings.Contains(logs, "peer=127.0.0.1:") {
			t.Fatalf("log lacks %s and the peer address:\n%s", want, logs)
		}
	})
	// The real primary is unaffected.
	_, err = a.Renew(ctx(t), "g", "host-a", 1)
	ok(t, err)
	if g := guestStatus(t, a, "g"); g.Epoch != 1 || g.Primary != "host-a" {
		t.Fatalf("state changed by refused peers: %+v", g)
	}
}

// TestRestartKeepsEpochs closes the server and reopens it on the same
// state dir and address; the clients reconnect on their own.
func TestRestartKeepsEpochs(t *testing.T) {
	clk := newFakeClock()
	e := newEnv(t, clk, 3*time.Second)
	a, b := syncedPair(t, e)
	ok(t, a.Release(ctx(t), "g", "host-a", 1)) // planned switchover
	g, err := b.RequestPromotion(ctx(t), "g", "host-b", 1)
	ok(t, err)
	if g.Epoch != 2 {
		t.Fatalf("grant %+v", g)
	}

	e.stop()
	clk.Advance(time.Minute)
	e.start()

	// Same client objects, new connections.
	_, err = a.Renew(ctx(t), "g", "host-a", 1)
	se := mustCode(t, err, ErrStaleEpoch)
	if se.CurrentEpoch != 2 {
		t.Fatalf("epoch after restart %d", se.CurrentEpoch)
	}
	st := guestStatus(t, a, "g")
	if st.Epoch != 2 || st.Primary != "host-b" || st.LeaseHolder != "host-b" || st.LeaseRemaining != 3*time.Second {
		t.Fatalf("status after restart %+v", st)
	}
	// The lease is assumed held for a full duration from the restart.
	_, err = a.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RoleStandby, Epoch: 2})
	ok(t, err)
	ok(t, b.ReportSynced(ctx(t), "g", "host-b", 2, "host-a"))
	clk.Advance(2 * time.Second)
	_, err = a.RequestPromotion(ctx(t), "g", "host-a", 2)
	mustCode(t, err, ErrLeaseValid)
	clk.Advance(time.Second)
	g, err = a.RequestPromotion(ctx(t), "g", "host-a", 2)
	ok(t, err)
	if g.Epoch != 3 {
		t.Fatalf("epoch %d after restart and promotion, want 3", g.Epoch)
	}

	// A second arbiter cannot open the same state.
	if _, err := Open(e.cfg); err == nil || !strings.Contains(err.Error(), "locked") {
		t.Fatalf("second arbiter on the same state dir: %v", err)
	}
}

func TestProtocolVersionMismatch(t *testing.T) {
	e := newEnv(t, nil, 3*time.Second)
	cfg, err := pki.ClientConfig(e.pkiDir, "host-a")
	ok(t, err)
	cfg.ServerName = "127.0.0.1"
	conn, err := tls.Dial("tcp", e.addr, cfg)
	ok(t, err)
	defer conn.Close()
	ok(t, writeFrame(conn, map[string]any{"v": 99, "id": 1, "op": "hello", "agent": "host-a"}))
	body, err := readFrame(conn)
	ok(t, err)
	var resp response
	ok(t, json.Unmarshal(body, &resp))
	if resp.V != ProtocolVersion || resp.Err == nil || resp.Err.Code != CodeVersion ||
		!strings.Contains(resp.Err.Message, "version 99") || !strings.Contains(resp.Err.Message, "speaks version 1") {
		t.Fatalf("reply %+v / %+v", resp, resp.Err)
	}
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := readFrame(conn); err == nil {
		t.Fatal("connection left open after a version error")
	}

	// And the client refuses a server that answers with another version.
	srvCfg, err := pki.ServerConfig(e.pkiDir, "arbiter")
	ok(t, err)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
	ok(t, err)
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		if _, err := readFrame(c); err == nil {
			writeFrame(c, map[string]any{"v": 2, "id": 1})
		}
	}()
	c, err := Dial(ctx(t), ln.Addr().String(), cfg)
	ok(t, err)
	defer c.Close()
	_, err = c.Status(ctx(t))
	ae := mustCode(t, err, ErrVersion)
	if !strings.Contains(ae.Message, "version 2") {
		t.Fatalf("message %q", ae.Message)
	}
}

func TestClientUnavailable(t *testing.T) {
	e := newEnv(t, nil, 3*time.Second)
	a := e.client("host-a")
	e.stop()
	_, err := a.Status(ctx(t))
	mustCode(t, err, ErrUnavailable)
	c, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = a.Status(c)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("cancelled call: %v", err)
	}
}

func TestOpenRejectsInsecureTLS(t *testing.T) {
	if _, err := Open(Config{StateDir: t.TempDir(), TLS: &tls.Config{}}); err == nil {
		t.Fatal("Open accepted a TLS config without client verification")
	}
	if _, err := Open(Config{StateDir: t.TempDir()}); err == nil {
		t.Fatal("Open accepted no TLS config")
	}
}

// TestClientConcurrentUse shares one client between goroutines, as an
// agent with many guests would.
func TestClientConcurrentUse(t *testing.T) {
	e := newEnv(t, nil, 3*time.Second)
	a := e.client("host-a")
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			guest := fmt.Sprintf("g%d", i)
			reg, err := a.Register(ctx(t), GuestSpec{Guest: guest, AgentID: "host-a", Role: RolePrimary})
			if err != nil {
				errs <- err
				return
			}
			for j := 0; j < 10; j++ {
				if _, err := a.Renew(ctx(t), guest, "host-a", reg.Epoch); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st, err := a.Status(ctx(t))
	ok(t, err)
	if len(st.Guests) != 8 {
		t.Fatalf("%d guests", len(st.Guests))
	}
}

// TestRecoveryAfterLostState: b was promoted over a, then the arbiter lost
// its state directory. The stale a registers first. With the recovery
// window a is told it is stale and b keeps the guest at a new epoch; the
// control (no window, as before) makes a primary again, which the same
// check catches.
func TestRecoveryAfterLostState(t *testing.T) {
	for _, control := range []bool{false, true} {
		t.Run(fmt.Sprintf("control=%v", control), func(t *testing.T) {
			clk := newFakeClock()
			e := newEnv(t, clk, 3*time.Second)
			a, b := syncedPair(t, e)
			clk.Advance(3 * time.Second) // a is cut off; its lease runs out
			_, err := b.RequestPromotion(ctx(t), "g", "host-b", 1)
			ok(t, err)

			e.stop()
			ok(t, os.RemoveAll(filepath.Join(e.stateDir, "guests")))
			e.start()
			if control {
				e.srv.mu.Lock()
				e.srv.m.recoverFor = 0
				e.srv.mu.Unlock()
			}
			// a still believes in epoch 1 and registers first.
			regA, errA := a.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RolePrimary, Epoch: 1})
			if control {
				ok(t, errA)
				if regA.Role == RolePrimary && regA.Epoch == 2 {
					return // the stale primary holds b's epoch again: caught
				}
				t.Fatalf("control: the old behaviour did not show: %+v", regA)
			}
			if re := mustCode(t, errA, ErrRecovering); re.RetryAfter != 6*time.Second {
				t.Fatalf("recovering error %+v", re)
			}
			_, err = b.Heartbeat(ctx(t), "host-b", map[string]uint64{"g": 2})
			ok(t, err)
			_, err = b.Renew(ctx(t), "g", "host-b", 2)
			mustCode(t, err, ErrRecovering)
			g := guestStatus(t, a, "g")
			if g.Recovering == nil || len(g.Recovering.Claims) != 2 || g.Recovering.Claims[1] != (Claim{Agent: "host-b", Role: RolePrimary, Epoch: 2}) {
				t.Fatalf("status during recovery %+v", g.Recovering)
			}

			clk.Advance(6 * time.Second)
			_, err = a.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RolePrimary, Epoch: 1})
			if se := mustCode(t, err, ErrStaleEpoch); se.Role != RoleNone || se.CurrentEpoch != 3 || se.Primary != "host-b" {
				t.Fatalf("stale primary told %+v", se)
			}
			_, err = b.Renew(ctx(t), "g", "host-b", 2)
			if se := mustCode(t, err, ErrStaleEpoch); se.Role != RolePrimary || se.CurrentEpoch != 3 {
				t.Fatalf("recovered primary told %+v", se)
			}
			_, err = b.Renew(ctx(t), "g", "host-b", 3)
			ok(t, err)
			if g := guestStatus(t, a, "g"); g.Primary != "host-b" || g.Epoch != 3 || g.Last.Kind != TransitionRecovered {
				t.Fatalf("status after recovery %+v", g)
			}
			if logs := e.logs.String(); !strings.Contains(logs, "recovered guest") || !strings.Contains(logs, "stale=[host-a]") {
				t.Fatalf("recovery not logged:\n%s", logs)
			}
		})
	}
}

// TestSuspendOverTheWire: a suspended guest is not failed over until the
// suspension runs out; the control guest, not suspended, is.
func TestSuspendOverTheWire(t *testing.T) {
	clk := newFakeClock()
	e := newEnv(t, clk, 3*time.Second)
	a := e.client("host-a")
	b := e.client("host-b")
	for _, g := range []string{"g", "control"} {
		_, err := a.Register(ctx(t), GuestSpec{Guest: g, AgentID: "host-a", Role: RolePrimary})
		ok(t, err)
		_, err = b.Register(ctx(t), GuestSpec{Guest: g, AgentID: "host-b", Role: RoleStandby})
		ok(t, err)
		ok(t, a.ReportSynced(ctx(t), g, "host-a", 1, "host-b"))
	}
	_, err := a.Suspend(ctx(t), "g", "host-a", 1, 31*time.Second)
	if le := mustCode(t, err, ErrLimit); !strings.Contains(le.Message, "max_suspend (30s)") {
		t.Fatalf("limit message %q", le.Message)
	}
	before := time.Now()
	l, err := a.Suspend(ctx(t), "g", "host-a", 1, 10*time.Second)
	ok(t, err)
	if l.Duration != 3*time.Second || l.ValidUntil.After(time.Now().Add(3*time.Second)) || l.ValidUntil.Before(before.Add(2*time.Second)) ||
		!l.Expires.Equal(clk.Now().Add(10*time.Second)) {
		t.Fatalf("suspended lease %+v", l)
	}
	if g := guestStatus(t, a, "g"); !g.SuspendedUntil.Equal(clk.Now().Add(10*time.Second)) || g.LeaseRemaining != 10*time.Second {
		t.Fatalf("status %+v", g)
	}
	clk.Advance(10*time.Second - time.Millisecond)
	_, err = b.RequestPromotion(ctx(t), "g", "host-b", 1)
	mustCode(t, err, ErrLeaseValid)
	_, err = b.RequestPromotion(ctx(t), "control", "host-b", 1)
	ok(t, err)
	clk.Advance(time.Millisecond)
	_, err = b.RequestPromotion(ctx(t), "g", "host-b", 1)
	ok(t, err)
	if !strings.Contains(e.logs.String(), "lease suspended") {
		t.Fatal("suspension not logged")
	}
}

func TestProbeBoundsEnforced(t *testing.T) {
	e := newEnv(t, nil, 3*time.Second)
	a := e.client("host-a")
	cases := []struct {
		svc  ProbeSpec
		want string
	}{
		{ProbeSpec{Kind: ProbeTCP, Address: "127.0.0.1:1", Interval: time.Nanosecond}, "probe interval 1ns is below the minimum of 100ms"},
		// The default interval here is 100ms.
		{ProbeSpec{Kind: ProbeTCP, Address: "127.0.0.1:1", Timeout: time.Second}, "probe timeout 1s exceeds the probe interval 100ms"},
	}
	for _, c := range cases {
		_, err := a.Register(ctx(t), GuestSpec{Guest: "g", AgentID: "host-a", Role: RolePrimary, Service: c.svc})
		if be := mustCode(t, err, ErrBadRequest); !strings.Contains(be.Message, c.want) {
			t.Errorf("%+v: %q lacks %q", c.svc, be.Message, c.want)
		}
	}

	for _, c := range []struct {
		cfg  func(*Config)
		want string
	}{
		{func(c *Config) { c.ProbeInterval = time.Nanosecond }, "default probe timing: probe interval 1ns is below the minimum of 100ms"},
		{func(c *Config) { c.ProbeTimeout = time.Second }, "default probe timing: probe timeout 1s exceeds the probe interval 100ms"},
		{func(c *Config) {
			c.Services = map[string]ProbeSpec{"db": {Kind: ProbeTCP, Address: "a:1", Timeout: time.Second}}
		}, "service probe for guest db: probe timeout 1s exceeds the probe interval 100ms"},
	} {
		cfg := e.cfg
		cfg.StateDir = t.TempDir()
		c.cfg(&cfg)
		if srv, err := Open(cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			if srv != nil {
				srv.Close()
			}
			t.Errorf("Open: %v, want %q", err, c.want)
		}
	}
}

// TestStoredProbeTimingReset: a record written before probe timing was
// bounded keeps its check at the default timing, so it cannot busy-loop.
func TestStoredProbeTimingReset(t *testing.T) {
	e := newEnv(t, nil, 3*time.Second)
	e.stop()
	rec := `{"format": 1, "guest": "g", "epoch": 1, "primary": "host-a",
		"service": {"kind": "tcp", "address": "127.0.0.1:1", "interval": 1, "timeout": 1}}`
	ok(t, os.WriteFile(filepath.Join(e.stateDir, "guests", "g.json"), []byte(rec), 0o600))
	e.start()
	_, spec, found := e.srv.probes.status(serviceKey("g"))
	if !found || spec.Interval != e.cfg.ProbeInterval || spec.Timeout != e.cfg.ProbeTimeout {
		t.Fatalf("probe %v %+v", found, spec)
	}
	if !strings.Contains(e.logs.String(), "stored service probe out of bounds") {
		t.Fatal("reset not logged")
	}
}
