package arbiter

import (
	"errors"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

const testLease = 3 * time.Second

func openMachine(t *testing.T, dir string, lease time.Duration, now time.Time) *machine {
	t.Helper()
	return openMachineWith(t, dir, testConfig(lease), now)
}

func testConfig(lease time.Duration) machineConfig {
	return machineConfig{leaseDur: lease, maxSuspend: DefaultMaxSuspend, maxGuests: DefaultMaxGuests, log: slog.New(slog.DiscardHandler)}
}

func openMachineWith(t *testing.T, dir string, cfg machineConfig, now time.Time) *machine {
	t.Helper()
	st, recs, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.close() })
	return newMachine(st, recs, cfg, now)
}

func closeMachine(m *machine) { m.st.close() }

func mustCode(t *testing.T, err error, want *Error) *Error {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("got error %v, want code %s", err, want.Code)
	}
	var e *Error
	errors.As(err, &e)
	return e
}

func ok(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// protectedGuest registers primary a and standby b for "g" and marks b in
// sync, all at epoch 1.
func protectedGuest(t *testing.T, m *machine, now time.Time) {
	t.Helper()
	reg, err := m.register(now, GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 1 || reg.Role != RolePrimary || reg.Lease == nil || reg.Lease.Holder != "a" {
		t.Fatalf("primary registration: %+v", reg)
	}
	reg, err = m.register(now, GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 1 || reg.Role != RoleStandby || reg.Lease != nil {
		t.Fatalf("standby registration: %+v", reg)
	}
	ok(t, m.synced(now, "g", "a", 1, "b"))
}

var (
	noObs        = observation{}
	serviceUp    = observation{serviceAnswering: true, serviceDetail: "tcp x ok"}
	standbyGone  = observation{standbyLost: true, standbyDetail: "gone"}
	standbyThere = observation{standbyDetail: "reachable"}
	primaryGone  = observation{primaryLost: true, primaryDetail: "heartbeat 1.2s ago (missed 4)"}
)

// TestPromotionOnlyAfterExpiry walks the clock across the lease boundary.
func TestPromotionOnlyAfterExpiry(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	protectedGuest(t, m, clk.Now())

	steps := []struct {
		name    string
		advance time.Duration
		renew   bool
		obs     observation
		want    *Error // nil: granted
		retry   time.Duration
	}{
		{name: "just granted", advance: 0, want: ErrLeaseValid, retry: 3 * time.Second},
		{name: "mid lease", advance: 2 * time.Second, want: ErrLeaseValid, retry: time.Second},
		{name: "renewed", advance: 500 * time.Millisecond, renew: true, want: ErrLeaseValid, retry: 3 * time.Second},
		{name: "one tick before expiry", advance: 3*time.Second - time.Nanosecond, want: ErrLeaseValid, retry: time.Nanosecond},
		{name: "expired but service answers", advance: time.Nanosecond, obs: serviceUp, want: ErrServiceAlive},
		{name: "expired and service silent", advance: 0, want: nil},
	}
	for _, s := range steps {
		clk.Advance(s.advance)
		if s.renew {
			l, err := m.renew(clk.Now(), "g", "a", 1)
			ok(t, err)
			if l.Epoch != 1 || l.Holder != "a" || !l.Expires.Equal(clk.Now().Add(testLease)) {
				t.Fatalf("%s: lease %+v", s.name, l)
			}
		}
		// The dry run must agree with the real decision on the lease.
		_, dryErr := m.promote(clk.Now(), "g", "b", 1, s.obs, true)
		g, err := m.promote(clk.Now(), "g", "b", 1, s.obs, false)
		if s.want != nil {
			e := mustCode(t, err, s.want)
			if s.retry != 0 && e.RetryAfter != s.retry {
				t.Fatalf("%s: RetryAfter %v, want %v", s.name, e.RetryAfter, s.retry)
			}
			if errors.Is(err, ErrLeaseValid) != errors.Is(dryErr, ErrLeaseValid) {
				t.Fatalf("%s: dry run %v vs real %v", s.name, dryErr, err)
			}
			if m.guests["g"].Epoch != 1 {
				t.Fatalf("%s: epoch moved on refusal", s.name)
			}
			continue
		}
		ok(t, err)
		if g.Epoch != 2 || g.PreviousEpoch != 1 || g.PreviousPrimary != "a" || g.Lease.Holder != "b" || g.Lease.Epoch != 2 {
			t.Fatalf("%s: grant %+v", s.name, g)
		}
	}

	// The old primary is fenced off.
	_, err := m.renew(clk.Now(), "g", "a", 1)
	e := mustCode(t, err, ErrStaleEpoch)
	if e.CurrentEpoch != 2 || e.Primary != "b" || e.Role != RoleNone {
		t.Fatalf("stale error details: %+v", e)
	}
	// The new primary renews at its new epoch, and nobody is standby.
	_, err = m.renew(clk.Now(), "g", "b", 2)
	ok(t, err)
	r := m.guests["g"]
	if r.Primary != "b" || r.Standby != "" || r.InSync || r.LeaseHolder != "b" {
		t.Fatalf("after promotion: %+v", r)
	}
	// The old primary may come back as standby once it knows the epoch.
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RoleStandby, Epoch: 1}, ProbeSpec{})
	mustCode(t, err, ErrStaleEpoch)
	reg, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RoleStandby, Epoch: 2}, ProbeSpec{})
	ok(t, err)
	if reg.Role != RoleStandby || reg.Primary != "b" || reg.InSync {
		t.Fatalf("re-registration: %+v", reg)
	}
}

// TestEarlyPromotionWhenPrimaryLost: a standby in sync is promoted before
// the lease runs out once the arbiter has lost the primary's agent too,
// but not while the primary suspended its lease on purpose, nor while the
// guest's service answers, nor on the standby's word alone.
func TestEarlyPromotionWhenPrimaryLost(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	protectedGuest(t, m, clk.Now())
	clk.Advance(time.Second)

	_, err := m.promote(clk.Now(), "g", "b", 1, noObs, false) // the negative control
	mustCode(t, err, ErrLeaseValid)
	lostButServing := primaryGone
	lostButServing.serviceAnswering, lostButServing.serviceDetail = true, "tcp x ok"
	_, err = m.promote(clk.Now(), "g", "b", 1, lostButServing, false)
	mustCode(t, err, ErrServiceAlive)

	// Suspended (an upgrade): its agent is silent on purpose.
	_, err = m.suspend(clk.Now(), "g", "a", 1, 10*time.Second)
	ok(t, err)
	clk.Advance(5 * time.Second)
	_, err = m.promote(clk.Now(), "g", "b", 1, primaryGone, false)
	mustCode(t, err, ErrLeaseValid)
	_, err = m.renew(clk.Now(), "g", "a", 1) // back: the suspension ends
	ok(t, err)

	clk.Advance(time.Second)
	g, err := m.promote(clk.Now(), "g", "b", 1, primaryGone, false)
	ok(t, err)
	if g.Epoch != 2 || g.PreviousPrimary != "a" || g.Lease.Holder != "b" {
		t.Fatalf("grant %+v", g)
	}
	if d := m.guests["g"].Last.Detail; !strings.Contains(d, "agent lost") || !strings.Contains(d, "2s of its lease left") {
		t.Fatalf("the transition does not say why it came early: %q", d)
	}
	// The old primary can neither renew nor continue alone at its epoch.
	_, err = m.renew(clk.Now(), "g", "a", 1)
	mustCode(t, err, ErrStaleEpoch)
	_, err = m.standbyLost(clk.Now(), "g", "a", 1, standbyGone, false)
	mustCode(t, err, ErrStaleEpoch)
}

func TestLeaseValidMessageMentionsService(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	protectedGuest(t, m, clk.Now())
	_, err := m.promote(clk.Now(), "g", "b", 1, serviceUp, false)
	e := mustCode(t, err, ErrLeaseValid)
	if !strings.Contains(e.Message, "still answers") || !strings.Contains(e.Message, "no failover") {
		t.Fatalf("message lacks the reason: %q", e.Message)
	}
}

func TestPromotionPreconditions(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	_, err := m.promote(clk.Now(), "g", "b", 1, noObs, false)
	mustCode(t, err, ErrUnknownGuest)

	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary}, ProbeSpec{})
	ok(t, err)
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby}, ProbeSpec{})
	ok(t, err)
	clk.Advance(10 * time.Second) // lease long gone

	cases := []struct {
		agent string
		epoch uint64
		want  *Error
	}{
		{"b", 1, ErrNotInSync}, // registered but never synced
		{"c", 1, ErrNotStandby},
		{"a", 1, ErrNotStandby}, // the primary cannot promote itself
		{"b", 0, ErrStaleEpoch},
		{"b", 2, ErrEpochAhead},
	}
	for _, c := range cases {
		_, err := m.promote(clk.Now(), "g", c.agent, c.epoch, noObs, false)
		mustCode(t, err, c.want)
	}
	// A release lets the standby in without waiting for expiry.
	clk2 := newFakeClock()
	m2 := openMachine(t, t.TempDir(), testLease, clk2.Now())
	protectedGuest(t, m2, clk2.Now())
	ok(t, m2.release(clk2.Now(), "g", "a", 1))
	g, err := m2.promote(clk2.Now(), "g", "b", 1, noObs, false)
	ok(t, err)
	if g.Epoch != 2 {
		t.Fatalf("grant after release: %+v", g)
	}
}

func TestStandbyLost(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	protectedGuest(t, m, clk.Now())

	_, err := m.standbyLost(clk.Now(), "g", "b", 1, standbyGone, false)
	mustCode(t, err, ErrNotPrimary)
	l, err := m.standbyLost(clk.Now(), "g", "a", 1, standbyGone, false)
	ok(t, err)
	if l.Epoch != 2 || l.Holder != "a" {
		t.Fatalf("lease after standby lost: %+v", l)
	}
	if d := m.guests["g"].Last.Detail; !strings.Contains(d, "standby lost (gone)") {
		t.Fatalf("transition detail %q", d)
	}
	// A lost reply is retried with the old epoch: same answer.
	l2, err := m.standbyLost(clk.Now(), "g", "a", 1, standbyGone, false)
	ok(t, err)
	if l2.Epoch != 2 {
		t.Fatalf("replayed standby-lost: %+v", l2)
	}
	// The standby is fenced: neither its epoch nor its registration count.
	clk.Advance(time.Minute)
	_, err = m.promote(clk.Now(), "g", "b", 1, noObs, false)
	e := mustCode(t, err, ErrStaleEpoch)
	if e.Role != RoleNone || e.CurrentEpoch != 2 {
		t.Fatalf("stale details: %+v", e)
	}
	_, err = m.promote(clk.Now(), "g", "b", 2, noObs, false)
	mustCode(t, err, ErrNotStandby)
	if err := m.synced(clk.Now(), "g", "a", 2, "b"); !errors.Is(err, ErrNotStandby) {
		t.Fatalf("synced for a fenced standby: %v", err)
	}
	// Already unprotected: a further report is granted without a new epoch.
	l, err = m.standbyLost(clk.Now(), "g", "a", 2, standbyThere, false)
	ok(t, err)
	if l.Epoch != 2 {
		t.Fatalf("unprotected standby-lost moved epoch: %+v", l)
	}
	// Re-sync: re-register at the new epoch, then the primary reports it.
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby, Epoch: 2}, ProbeSpec{})
	ok(t, err)
	_, err = m.promote(clk.Now(), "g", "b", 2, noObs, false)
	mustCode(t, err, ErrNotInSync)
	ok(t, m.synced(clk.Now(), "g", "a", 2, "b"))
	if r := m.guests["g"]; !r.InSync || !r.UnprotectedSince.IsZero() {
		t.Fatalf("after re-sync: %+v", r)
	}
}

// A cut link between primary and standby, both reachable from the
// arbiter: the primary's report is granted (it holds its guest's output
// until then) and the standby is fenced by the new epoch.
func TestStandbyLostOnCutLink(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	protectedGuest(t, m, clk.Now())
	l, err := m.standbyLost(clk.Now(), "g", "a", 1, standbyThere, false)
	ok(t, err)
	if l.Epoch != 2 {
		t.Fatalf("lease %+v", l)
	}
	if d := m.guests["g"].Last.Detail; !strings.Contains(d, "link cut") {
		t.Fatalf("transition detail %q", d)
	}
	clk.Advance(time.Minute)
	_, err = m.promote(clk.Now(), "g", "b", 1, noObs, false)
	mustCode(t, err, ErrStaleEpoch)
}

// TestNeverBoth races the two epoch-changing grants in both orders.
func TestNeverBoth(t *testing.T) {
	for _, promoteFirst := range []bool{true, false} {
		clk := newFakeClock()
		m := openMachine(t, t.TempDir(), testLease, clk.Now())
		protectedGuest(t, m, clk.Now())
		clk.Advance(testLease)
		var errP, errL error
		if promoteFirst {
			_, errP = m.promote(clk.Now(), "g", "b", 1, noObs, false)
			_, errL = m.standbyLost(clk.Now(), "g", "a", 1, standbyGone, false)
		} else {
			_, errL = m.standbyLost(clk.Now(), "g", "a", 1, standbyGone, false)
			_, errP = m.promote(clk.Now(), "g", "b", 1, noObs, false)
		}
		if (errP == nil) == (errL == nil) {
			t.Fatalf("promoteFirst=%v: promote err %v, standby-lost err %v", promoteFirst, errP, errL)
		}
		if errP != nil {
			mustCode(t, errP, ErrStaleEpoch)
		} else {
			mustCode(t, errL, ErrStaleEpoch)
		}
	}
}

// TestRandomInterleavings drives random operations and checks the safety
// invariants: epochs only grow, every epoch-changing grant leaves a
// distinct epoch, and at most one agent is ever told it is primary at an
// epoch.
func TestRandomInterleavings(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	agents := []string{"a", "b", "c"}
	obsChoices := []observation{noObs, serviceUp, standbyGone, standbyThere, primaryGone}
	grants := 0
	for run := 0; run < 8; run++ {
		clk := newFakeClock()
		dir := t.TempDir()
		m := openMachine(t, dir, testLease, clk.Now())
		known := map[string]uint64{} // epoch each agent believes
		primaryAt := map[uint64]string{}
		claim := func(epoch uint64, agent string) {
			if p, ok := primaryAt[epoch]; ok && p != agent {
				t.Fatalf("run %d: epoch %d granted to both %s and %s", run, epoch, p, agent)
			}
			primaryAt[epoch] = agent
			known[agent] = epoch
		}
		learn := func(agent string, err error) {
			var e *Error
			if errors.As(err, &e) && e.CurrentEpoch != 0 {
				known[agent] = e.CurrentEpoch
			}
		}
		reg, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary}, ProbeSpec{})
		ok(t, err)
		claim(reg.Epoch, "a")
		last := reg.Epoch
		for step := 0; step < 250; step++ {
			clk.Advance(time.Duration(rng.Intn(2000)) * time.Millisecond)
			ag := agents[rng.Intn(len(agents))]
			obs := obsChoices[rng.Intn(len(obsChoices))]
			now := clk.Now()
			switch rng.Intn(8) {
			case 0:
				reg, err := m.register(now, GuestSpec{Guest: "g", AgentID: ag, Role: RoleStandby, Epoch: known[ag]}, ProbeSpec{})
				learn(ag, err)
				if err == nil {
					known[ag] = reg.Epoch
				}
			case 1:
				_, err := m.renew(now, "g", ag, known[ag])
				learn(ag, err)
			case 2:
				g, err := m.promote(now, "g", ag, known[ag], obs, false)
				learn(ag, err)
				if err == nil {
					claim(g.Epoch, ag)
					grants++
				}
			case 3:
				l, err := m.standbyLost(now, "g", ag, known[ag], obs, false)
				learn(ag, err)
				if err == nil {
					claim(l.Epoch, ag)
					grants++
				}
			case 4:
				other := agents[rng.Intn(len(agents))]
				learn(ag, m.synced(now, "g", ag, known[ag], other))
			case 5:
				learn(ag, m.release(now, "g", ag, known[ag]))
			case 6:
				// Restart from disk.
				closeMachine(m)
				m = openMachine(t, dir, testLease, clk.Now())
			case 7:
				_, err := m.suspend(now, "g", ag, known[ag], time.Duration(1+rng.Intn(5000))*time.Millisecond)
				learn(ag, err)
			}
			r := m.guests["g"]
			if r.Epoch < last {
				t.Fatalf("run %d step %d: epoch went back from %d to %d", run, step, last, r.Epoch)
			}
			last = r.Epoch
			if r.InSync && (r.Standby == "" || r.StandbyEpoch != r.Epoch) {
				t.Fatalf("run %d step %d: in sync without a current standby: %+v", run, step, r)
			}
		}
	}
	if grants < 10 {
		t.Fatalf("only %d grants: the walk does not exercise transitions", grants)
	}
	t.Logf("%d grants", grants)
}

func TestRegisterRules(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	now := clk.Now()

	_, err := m.register(now, GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby}, ProbeSpec{})
	mustCode(t, err, ErrUnknownGuest)
	_, err = m.register(now, GuestSpec{Guest: "g", AgentID: "a", Role: "boss"}, ProbeSpec{})
	mustCode(t, err, ErrBadRequest)

	// An agent that already saw epoch 7 (arbiter state lost) gets a
	// higher one, never a reissued one, once the recovery window is over.
	_, err = m.register(now, GuestSpec{Guest: "h", AgentID: "a", Role: RolePrimary, Epoch: 7}, ProbeSpec{})
	mustCode(t, err, ErrRecovering)
	reg, err := m.register(now.Add(2*testLease), GuestSpec{Guest: "h", AgentID: "a", Role: RolePrimary, Epoch: 7}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 8 {
		t.Fatalf("epoch after known 7: %d", reg.Epoch)
	}

	protectedGuest(t, m, now)
	// Re-registering the primary is idempotent.
	reg, err = m.register(now, GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Epoch: 1}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 1 || !reg.InSync || reg.Standby != "b" {
		t.Fatalf("re-register: %+v", reg)
	}
	_, err = m.register(now, GuestSpec{Guest: "g", AgentID: "c", Role: RolePrimary, Epoch: 1}, ProbeSpec{})
	mustCode(t, err, ErrConflict)
	_, err = m.register(now, GuestSpec{Guest: "g", AgentID: "c", Role: RoleStandby}, ProbeSpec{})
	mustCode(t, err, ErrConflict) // b is in sync
	_, err = m.register(now, GuestSpec{Guest: "g", AgentID: "a", Role: RoleStandby, Epoch: 1}, ProbeSpec{})
	mustCode(t, err, ErrConflict)
	_, err = m.renew(now, "g", "a", 9)
	mustCode(t, err, ErrEpochAhead)
	_, err = m.renew(now, "g", "b", 1)
	mustCode(t, err, ErrNotPrimary)

	// A standby that restarts and re-registers is out of sync until the
	// primary says otherwise; then another standby may replace it.
	_, err = m.register(now, GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby, Epoch: 1}, ProbeSpec{})
	ok(t, err)
	if m.guests["g"].InSync {
		t.Fatal("re-registered standby still in sync")
	}
	_, err = m.register(now, GuestSpec{Guest: "g", AgentID: "c", Role: RoleStandby}, ProbeSpec{})
	ok(t, err)
	if m.guests["g"].Standby != "c" {
		t.Fatalf("standby not replaced: %+v", m.guests["g"])
	}
}

// TestPersistence checks that every grant is on disk before it is
// returned, and that a restart keeps epochs and never reissues one.
func TestPersistence(t *testing.T) {
	dir := t.TempDir()
	clk := newFakeClock()
	m := openMachine(t, dir, testLease, clk.Now())
	protectedGuest(t, m, clk.Now())
	clk.Advance(testLease)
	_, err := m.promote(clk.Now(), "g", "b", 1, noObs, false)
	ok(t, err)

	// What is on disk right now, read by an independent store.
	closeMachine(m)
	st, recs, err := openStore(dir)
	ok(t, err)
	r := recs["g"]
	if r == nil || r.Epoch != 2 || r.Primary != "b" || r.LeaseHolder != "b" || r.Last.Kind != TransitionPromotion {
		t.Fatalf("on disk: %+v", r)
	}
	st.close()

	// Restart much later (wall clock), with a shorter configured lease:
	// the holder keeps the longest lease it may have been given, counted
	// from the restart.
	clk.Advance(time.Hour)
	m = openMachine(t, dir, time.Second, clk.Now())
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RoleStandby, Epoch: 2}, ProbeSpec{})
	ok(t, err)
	ok(t, m.synced(clk.Now(), "g", "b", 2, "a"))
	clk.Advance(testLease - time.Millisecond)
	_, err = m.promote(clk.Now(), "g", "a", 2, noObs, false)
	mustCode(t, err, ErrLeaseValid)
	clk.Advance(time.Millisecond)
	g, err := m.promote(clk.Now(), "g", "a", 2, noObs, false)
	ok(t, err)
	if g.Epoch != 3 {
		t.Fatalf("epoch after restart: %d, want 3", g.Epoch)
	}
	// The replay of a lost reply returns the same grant, not a new epoch.
	g2, err := m.promote(clk.Now(), "g", "a", 2, noObs, false)
	ok(t, err)
	if g2.Epoch != 3 || g2.PreviousPrimary != "b" {
		t.Fatalf("replayed grant: %+v", g2)
	}
	_, err = m.renew(clk.Now(), "g", "b", 2)
	mustCode(t, err, ErrStaleEpoch)
}

// TestPersistFailureGrantsNothing makes the state dir unwritable mid-run.
func TestPersistFailureGrantsNothing(t *testing.T) {
	dir := t.TempDir()
	clk := newFakeClock()
	m := openMachine(t, dir, testLease, clk.Now())
	protectedGuest(t, m, clk.Now())
	clk.Advance(testLease)
	gdir := filepath.Join(dir, "guests")
	ok(t, os.RemoveAll(gdir))
	ok(t, os.WriteFile(gdir, nil, 0o600)) // a file where the dir was
	_, err := m.promote(clk.Now(), "g", "b", 1, noObs, false)
	mustCode(t, err, ErrInternal)
	if r := m.guests["g"]; r.Epoch != 1 || r.Primary != "a" {
		t.Fatalf("memory changed although persisting failed: %+v", r)
	}
}

func TestStoreLockAndLeftovers(t *testing.T) {
	dir := t.TempDir()
	st, _, err := openStore(dir)
	ok(t, err)
	if _, _, err := openStore(dir); err == nil || !strings.Contains(err.Error(), "locked") {
		t.Fatalf("second open: %v", err)
	}
	st.close()
	tmp := filepath.Join(dir, "guests", ".tmp-g-123")
	ok(t, os.WriteFile(tmp, []byte("{half"), 0o600))
	st, _, err = openStore(dir)
	ok(t, err)
	st.close()
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Fatal("leftover temp file kept")
	}
	ok(t, os.WriteFile(filepath.Join(dir, "guests", "g.json"), []byte("{half"), 0o600))
	if _, _, err := openStore(dir); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("corrupt state accepted: %v", err)
	}
}

func TestAssignments(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	protectedGuest(t, m, clk.Now())
	as := m.assignments("b", map[string]uint64{"g": 0})
	if len(as) != 1 || as[0].Role != RoleStandby || as[0].Epoch != 1 || !as[0].Stale || !as[0].InSync {
		t.Fatalf("assignments: %+v", as)
	}
	if as := m.assignments("z", nil); len(as) != 0 {
		t.Fatalf("uninvolved agent: %+v", as)
	}
}

// TestRetireAndEnrollAgain: unenrolling retires the guest one epoch on; the
// old standby's copy is stale, a new enrollment (on any host) starts above
// every epoch issued, and the record survives a restart.
func TestRetireAndEnrollAgain(t *testing.T) {
	dir := t.TempDir()
	clk := newFakeClock()
	m := openMachine(t, dir, testLease, clk.Now())
	now := clk.Now()
	protectedGuest(t, m, now)

	mustCode(t, m.retire(now, "g", "b", 1), ErrNotPrimary)
	mustCode(t, m.retire(now, "g", "a", 0), ErrStaleEpoch)
	ok(t, m.retire(now, "g", "a", 1))
	ok(t, m.retire(now, "g", "a", 1)) // the retry of a lost answer
	ok(t, m.retire(now, "nobody", "a", 1))

	// Nothing of the enrollment is usable any more.
	clk.Advance(testLease)
	_, err := m.promote(clk.Now(), "g", "b", 1, noObs, false)
	mustCode(t, err, ErrUnknownGuest)
	_, err = m.renew(clk.Now(), "g", "a", 1)
	mustCode(t, err, ErrUnknownGuest)
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby, Epoch: 1}, ProbeSpec{})
	mustCode(t, err, ErrUnknownGuest)
	if as := m.assignments("a", nil); len(as) != 0 {
		t.Fatalf("retired guest still assigned: %+v", as)
	}
	if as := m.assignments("b", map[string]uint64{"g": 1}); len(as) != 1 || !as[0].Stale || as[0].Role != RoleNone {
		t.Fatalf("a standby asking about the retired guest: %+v", as)
	}

	// Restart: still retired at epoch 2.
	closeMachine(m)
	m = openMachine(t, dir, testLease, clk.Now())
	if r := m.guests["g"]; r == nil || !r.Retired || r.Epoch != 2 || r.Primary != "" || r.LeaseHolder != "" {
		t.Fatalf("after restart: %+v", r)
	}

	// Enrolled again, on another host: epoch 3, a fresh lease, no standby.
	reg, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "c", Role: RolePrimary, Fresh: true}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 3 || reg.Role != RolePrimary || reg.Lease == nil || reg.Standby != "" || reg.InSync {
		t.Fatalf("enrolled again: %+v", reg)
	}
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby}, ProbeSpec{})
	ok(t, err)
}

// TestFreshEnrollment: a primary that enrolls a guest anew (it holds no
// epoch) supersedes its earlier enrollment with a new epoch, fencing the
// old standby; it cannot take a guest another primary holds.
func TestFreshEnrollment(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	now := clk.Now()
	protectedGuest(t, m, now)

	// Without Fresh, epoch 0 is stale as before.
	_, err := m.register(now, GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary}, ProbeSpec{})
	mustCode(t, err, ErrStaleEpoch)
	// Another host may not take it.
	_, err = m.register(now, GuestSpec{Guest: "g", AgentID: "c", Role: RolePrimary, Fresh: true}, ProbeSpec{})
	if e := mustCode(t, err, ErrConflict); !strings.Contains(e.Message, "unenroll it there first") {
		t.Fatalf("conflict message: %s", e.Message)
	}
	reg, err := m.register(now, GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Fresh: true}, ProbeSpec{})
	ok(t, err)
	if reg.Epoch != 2 || reg.Standby != "" || reg.InSync {
		t.Fatalf("fresh enrollment: %+v", reg)
	}
	clk.Advance(testLease)
	_, err = m.promote(clk.Now(), "g", "b", 1, noObs, false)
	mustCode(t, err, ErrStaleEpoch)
}

// A planned switchover: only the primary hands over, only to its in-sync
// standby at the current epoch; the old primary is stale after it, and a
// replay answers with the same grant.
func TestHandover(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	_, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary}, ProbeSpec{})
	ok(t, err)
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "b", Role: RoleStandby}, ProbeSpec{})
	ok(t, err)
	_, err = m.handover(clk.Now(), "g", "a", 1, "b")
	mustCode(t, err, ErrNotInSync) // registered, never synced
	ok(t, m.synced(clk.Now(), "g", "a", 1, "b"))
	for _, c := range []struct {
		agent, to string
		epoch     uint64
		want      *Error
	}{
		{"b", "a", 1, ErrNotPrimary}, // the standby cannot hand over
		{"a", "c", 1, ErrNotStandby}, // nor the primary to another agent
		{"a", "a", 1, ErrNotStandby},
		{"a", "b", 0, ErrStaleEpoch},
		{"a", "b", 2, ErrEpochAhead},
	} {
		_, err := m.handover(clk.Now(), "g", c.agent, c.epoch, c.to)
		mustCode(t, err, c.want)
	}
	// The primary's lease is valid: a handover does not wait for it.
	g, err := m.handover(clk.Now(), "g", "a", 1, "b")
	ok(t, err)
	if g.Epoch != 2 || g.Lease.Holder != "b" || g.PreviousPrimary != "a" {
		t.Fatalf("grant %+v", g)
	}
	again, err := m.handover(clk.Now(), "g", "a", 1, "b")
	ok(t, err)
	if again.Epoch != 2 || again.Lease.Holder != "b" {
		t.Fatalf("replayed grant %+v", again)
	}
	if r := m.guests["g"]; r.Primary != "b" || r.Standby != "" || r.InSync || r.Last.Kind != TransitionHandover {
		t.Fatalf("record after handover %+v", r)
	}
	// The old primary is fenced: its renewals are stale.
	_, err = m.renew(clk.Now(), "g", "a", 1)
	e := mustCode(t, err, ErrStaleEpoch)
	if e.Role != RoleNone || e.Primary != "b" {
		t.Fatalf("stale details %+v", e)
	}
	// It may come back as the new primary's standby.
	_, err = m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RoleStandby, Epoch: 2}, ProbeSpec{})
	ok(t, err)
	ok(t, m.synced(clk.Now(), "g", "b", 2, "a"))
	if _, err := m.handover(clk.Now(), "g", "b", 2, "a"); err != nil {
		t.Fatalf("hand back: %v", err)
	}
}
