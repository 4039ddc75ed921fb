package arbiter

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// A step is one agent's call after the arbiter lost its state.
type step struct {
	op    string // "register", "heartbeat", "renew"
	agent string
	role  Role
	epoch uint64
}

func (s step) run(m *machine, now time.Time) error {
	switch s.op {
	case "register":
		_, err := m.register(now, GuestSpec{Guest: "g", AgentID: s.agent, Role: s.role, Epoch: s.epoch, AgentAddr: s.agent + ":7000"}, ProbeSpec{})
		return err
	case "heartbeat":
		m.heartbeat(now, s.agent, map[string]uint64{"g": s.epoch})
		return nil
	case "renew":
		_, err := m.renew(now, "g", s.agent, s.epoch)
		return err
	}
	panic("unknown op " + s.op)
}

// recoveryViolation checks a recovered record against every epoch the
// agents held: no epoch may be reissued, and the primary must hold the
// highest one (else a stale copy was made primary over a newer one).
func recoveryViolation(steps []step, r *guestRecord) string {
	var top uint64
	held := map[string]uint64{}
	for _, s := range steps {
		top = max(top, s.epoch)
		held[s.agent] = max(held[s.agent], s.epoch)
	}
	switch {
	case r.Epoch <= top:
		return fmt.Sprintf("epoch %d reissued (agents hold up to %d)", r.Epoch, top)
	case held[r.Primary] < top:
		return fmt.Sprintf("stale primary %s (epoch %d) made primary over epoch %d", r.Primary, held[r.Primary], top)
	}
	return ""
}

func TestRecoveryFromLostState(t *testing.T) {
	reg := func(agent string, role Role, epoch uint64) step { return step{"register", agent, role, epoch} }
	hb := func(agent string, epoch uint64) step { return step{"heartbeat", agent, "", epoch} }
	renew := func(agent string, epoch uint64) step { return step{"renew", agent, "", epoch} }
	cases := []struct {
		name    string
		steps   []step
		primary string // "" : no decision
		epoch   uint64
		standby string
		stuck   string
	}{
		{name: "stale primary registers first",
			steps:   []step{reg("a", RolePrimary, 5), reg("b", RolePrimary, 6)},
			primary: "b", epoch: 7},
		{name: "standby registers first",
			steps:   []step{reg("b", RoleStandby, 5), reg("a", RolePrimary, 5)},
			primary: "a", epoch: 6, standby: "b"},
		{name: "primary only renews and heartbeats",
			steps:   []step{reg("a", RolePrimary, 5), hb("b", 6), renew("b", 6), hb("c", 6)},
			primary: "b", epoch: 7},
		{name: "heartbeat starts it",
			steps:   []step{hb("a", 3), hb("b", 3), reg("a", RolePrimary, 3)},
			primary: "a", epoch: 4},
		{name: "standby at a lower epoch is not kept",
			steps:   []step{reg("b", RoleStandby, 4), reg("a", RolePrimary, 5)},
			primary: "a", epoch: 6},
		{name: "highest epoch held by a heartbeat only",
			steps: []step{reg("a", RolePrimary, 5), hb("c", 6)},
			stuck: "no agent claims the primary role at the highest fence 6 (held by c)"},
		{name: "highest epoch held by a standby only",
			steps: []step{reg("a", RolePrimary, 5), reg("c", RoleStandby, 6)},
			stuck: "no agent claims the primary role at the highest fence 6 (held by c)"},
		{name: "two primaries at the highest epoch",
			steps: []step{reg("a", RolePrimary, 6), reg("b", RolePrimary, 6)},
			stuck: "a, b all claim the primary role at fence 6"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			clk := newFakeClock()
			m := openMachine(t, t.TempDir(), testLease, clk.Now())
			for _, s := range c.steps {
				if err := s.run(m, clk.Now()); err != nil && s.op != "heartbeat" {
					mustCode(t, err, ErrRecovering)
				}
			}
			if _, known := m.guests["g"]; known {
				t.Fatal("decided before the window ended")
			}
			clk.Advance(2 * testLease)
			err := m.pending(clk.Now(), "g")
			if c.primary == "" {
				e := mustCode(t, err, ErrRecovering)
				if !strings.Contains(e.Message, c.stuck) || e.RetryAfter != testLease {
					t.Fatalf("stuck error %+v, want %q", e, c.stuck)
				}
				if st := m.recovering["g"].status(); st.Stuck == "" {
					t.Fatalf("status does not say why: %+v", st)
				}
				return
			}
			ok(t, err)
			r := m.guests["g"]
			if v := recoveryViolation(c.steps, r); v != "" {
				t.Fatal(v)
			}
			if r.Primary != c.primary || r.Epoch != c.epoch || r.LeaseHolder != "" || r.InSync || r.Last.Kind != TransitionRecovered || r.Last.From != c.epoch-1 {
				t.Fatalf("recovered %+v (last %+v)", r, r.Last)
			}
			if got := roleOf(r, c.standby); c.standby != "" && (got != RoleStandby || r.StandbyAddr != c.standby+":7000") {
				t.Fatalf("standby %s has role %s in %+v", c.standby, got, r)
			}
			// Every claimant but the primary's standby is stale now; a
			// stale primary is told its copy is fenced.
			for _, s := range c.steps {
				if s.agent == c.primary || s.agent == c.standby {
					continue
				}
				_, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: s.agent, Role: RolePrimary, Epoch: s.epoch}, ProbeSpec{})
				if e := mustCode(t, err, ErrStaleEpoch); e.Role != RoleNone || e.CurrentEpoch != c.epoch {
					t.Fatalf("%s: stale details %+v", s.agent, e)
				}
			}
		})
	}
}

// TestRecoveryNegativeControl decides from the first claim, as the
// arbiter did before recovery: the check above must catch it.
func TestRecoveryNegativeControl(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	m.recoverFor = 0
	steps := []step{{"register", "a", RolePrimary, 5}, {"register", "b", RolePrimary, 6}}
	ok(t, steps[0].run(m, clk.Now()))
	steps[1].run(m, clk.Now())
	if v := recoveryViolation(steps, m.guests["g"]); v == "" {
		t.Fatalf("stale primary made primary unnoticed: %+v", m.guests["g"])
	}
}

// TestRecoveryGrantsNothing: during the window no lease, promotion or
// other grant, for any role; afterwards the primary repeating its claim
// gets the new epoch, and a lost reply is answered the same way.
func TestRecoveryGrantsNothing(t *testing.T) {
	clk := newFakeClock()
	start := clk.Now()
	m := openMachine(t, t.TempDir(), testLease, start)
	clk.Advance(time.Second) // the first claim comes after the start
	_, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Epoch: 5}, ProbeSpec{})
	if e := mustCode(t, err, ErrRecovering); e.RetryAfter != 2*testLease || !strings.Contains(e.Message, "retry") {
		t.Fatalf("recovering error %+v", e)
	}
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby, Epoch: 5}, ProbeSpec{})
	mustCode(t, err, ErrRecovering)

	clk.Advance(2*testLease - time.Nanosecond)
	now := clk.Now()
	calls := map[string]func() error{
		"register": func() error {
			_, err := m.register(now, GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Epoch: 5}, ProbeSpec{})
			return err
		},
		"fresh": func() error {
			_, err := m.register(now, GuestSpec{Guest: "g", AgentID: "c", Role: RolePrimary, Fresh: true}, ProbeSpec{})
			return err
		},
		"renew":        func() error { _, err := m.renew(now, "g", "a", 5); return err },
		"suspend":      func() error { _, err := m.suspend(now, "g", "a", 5, time.Second); return err },
		"promote":      func() error { _, err := m.promote(now, "g", "b", 5, noObs, false); return err },
		"standby lost": func() error { _, err := m.standbyLost(now, "g", "a", 5, standbyGone, false); return err },
		"synced":       func() error { return m.synced(now, "g", "a", 5, "b") },
		"release":      func() error { return m.release(now, "g", "a", 5) },
		"retire":       func() error { return m.retire(now, "g", "a", 5) },
	}
	for name, call := range calls {
		if e := mustCode(t, call(), ErrRecovering); e.RetryAfter != time.Nanosecond {
			t.Fatalf("%s: RetryAfter %v", name, e.RetryAfter)
		}
	}
	if as := m.heartbeat(now, "a", map[string]uint64{"g": 5}); len(as) != 0 {
		t.Fatalf("assignments during recovery: %+v", as)
	}

	clk.Advance(time.Nanosecond)
	for i := 0; i < 2; i++ { // the second is the retry of a lost reply
		reg, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Epoch: 5}, ProbeSpec{})
		ok(t, err)
		if reg.Epoch != 6 || reg.Role != RolePrimary || reg.Lease == nil || reg.Standby != "b" || reg.InSync {
			t.Fatalf("registration after recovery: %+v", reg)
		}
	}
	reg, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby, Epoch: 5}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 6 || reg.Role != RoleStandby {
		t.Fatalf("standby after recovery: %+v", reg)
	}
	// A renewal at the old epoch learns the new one.
	_, err = m.renew(clk.Now(), "g", "a", 5)
	if e := mustCode(t, err, ErrStaleEpoch); e.Role != RolePrimary || e.CurrentEpoch != 6 {
		t.Fatalf("renewal at the claimed epoch: %+v", e)
	}
}

// TestRecoveryWindowNegativeControl: without a window the first claim is
// granted at once, which TestRecoveryGrantsNothing would catch.
func TestRecoveryWindowNegativeControl(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	m.recoverFor = 0
	reg, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Epoch: 5}, ProbeSpec{})
	if err != nil || reg.Lease == nil {
		t.Fatalf("with no window the first claim should get a lease at once: %+v, %v", reg, err)
	}
}

// TestRecoveryWindowFromStart: claims right after a start wait 2 leases
// from the first claim, never less from the start.
func TestRecoveryWindowFromStart(t *testing.T) {
	clk := newFakeClock()
	start := clk.Now()
	m := openMachine(t, t.TempDir(), testLease, start)
	m.heartbeat(start, "a", map[string]uint64{"g": 5})
	if until := m.recovering["g"].until; !until.Equal(start.Add(2 * testLease)) {
		t.Fatalf("window until %v, want start + 2 leases", until)
	}
	// A claim stamped before the start (a clock that stepped back) still
	// waits from the start.
	m.heartbeat(start.Add(-time.Minute), "a", map[string]uint64{"h": 5})
	if until := m.recovering["h"].until; !until.Equal(start.Add(2 * testLease)) {
		t.Fatalf("window until %v, want start + 2 leases", until)
	}
}

// TestRecoveryFreshEnrollment: a fresh enrollment of an unclaimed guest is
// immediate; during a window it waits; once a recovery is stuck it takes
// the guest above every claimed epoch.
func TestRecoveryFreshEnrollment(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	reg, err := m.register(clk.Now(), GuestSpec{Guest: "new", AgentID: "a", Role: RolePrimary, Fresh: true}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 1 {
		t.Fatalf("fresh enrollment: %+v", reg)
	}
	m.heartbeat(clk.Now(), "b", map[string]uint64{"g": 9})
	fresh := GuestSpec{Guest: "g", AgentID: "c", Role: RolePrimary, Fresh: true}
	_, err = m.register(clk.Now(), fresh, ProbeSpec{})
	mustCode(t, err, ErrRecovering)
	clk.Advance(2 * testLease)
	reg, err = m.register(clk.Now(), fresh, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 10 || reg.Primary != "c" {
		t.Fatalf("fresh enrollment after a stuck recovery: %+v", reg)
	}
	if _, still := m.recovering["g"]; still {
		t.Fatal("recovery kept after the enrollment")
	}
	if as := m.heartbeat(clk.Now(), "b", map[string]uint64{"g": 9}); len(as) != 1 || !as[0].Stale || as[0].Role != RoleNone {
		t.Fatalf("old holder after the enrollment: %+v", as)
	}
}

// TestRecoveryLogsAndPersists: the decision names its claims and the
// stale claimants, and is on disk before anyone is told.
func TestRecoveryLogsAndPersists(t *testing.T) {
	dir := t.TempDir()
	clk := newFakeClock()
	var logs bytes.Buffer
	cfg := testConfig(testLease)
	cfg.log = slog.New(slog.NewTextHandler(&logs, nil))
	m := openMachineWith(t, dir, cfg, clk.Now())
	m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Epoch: 5}, ProbeSpec{})
	m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "b", Role: RolePrimary, Epoch: 6, AgentAddr: "b:7000"}, ProbeSpec{Kind: ProbeTCP, Address: "b:80"})
	m.renew(clk.Now(), "g", "b", 6) // adds nothing to the registration
	m.heartbeat(clk.Now(), "b", map[string]uint64{"g": 6})
	m.heartbeat(clk.Now(), "c", map[string]uint64{"g": 4})
	if c := m.recovering["g"].claims["c"]; c.Role != RoleNone {
		t.Fatalf("heartbeat claim %+v", c)
	}
	var told *guestRecord
	m.onRecover = func(r *guestRecord) { told = r }
	clk.Advance(2 * testLease)
	ok(t, m.pending(clk.Now(), "g"))
	if told == nil || told.Primary != "b" || told.PrimaryAddr != "b:7000" || told.Service.Address != "b:80" {
		t.Fatalf("onRecover got %+v", told)
	}
	for _, want := range []string{"collecting claims", "recovered guest", "fence=7", "primary=b",
		`claims="a primary at fence 5, b primary at fence 6, c heartbeat at fence 4"`, "stale=\"[a c]\""} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %s:\n%s", want, logs.String())
		}
	}
	closeMachine(m)
	st, recs, err := openStore(dir)
	ok(t, err)
	st.close()
	if r := recs["g"]; r == nil || r.Epoch != 7 || r.Primary != "b" || r.Last.Kind != TransitionRecovered {
		t.Fatalf("on disk: %+v", r)
	}
}

// TestRecoveryStuckThenClaim: a stuck recovery is settled by the claim it
// waits for, answered with the new epoch at once.
func TestRecoveryStuckThenClaim(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Epoch: 5}, ProbeSpec{})
	m.heartbeat(clk.Now(), "c", map[string]uint64{"g": 6})
	clk.Advance(2 * testLease)
	mustCode(t, m.pending(clk.Now(), "g"), ErrRecovering)
	reg, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "c", Role: RolePrimary, Epoch: 6}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 7 || reg.Role != RolePrimary || reg.Lease == nil {
		t.Fatalf("registration settling the recovery: %+v", reg)
	}
}
