package arbiter

import (
	"strings"
	"testing"
	"time"
)

func TestSuspendRules(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	protectedGuest(t, m, clk.Now())
	cases := []struct {
		name  string
		agent string
		epoch uint64
		d     time.Duration
		want  *Error
		msg   string
	}{
		{"zero", "a", 1, 0, ErrBadRequest, "must be positive"},
		{"negative", "a", 1, -time.Second, ErrBadRequest, "must be positive"},
		{"above max_suspend", "a", 1, DefaultMaxSuspend + time.Nanosecond, ErrLimit, "exceeds max_suspend (30s)"},
		{"stale epoch", "a", 0, time.Second, ErrStaleEpoch, "stale fencing epoch"},
		{"epoch ahead", "a", 2, time.Second, ErrEpochAhead, "never issued"},
		{"standby", "b", 1, time.Second, ErrNotPrimary, "not the primary"},
		{"stranger", "c", 1, time.Second, ErrNotPrimary, "not the primary"},
		{"unknown guest", "a", 1, time.Second, ErrUnknownGuest, "unknown guest"},
	}
	for _, c := range cases {
		guest := "g"
		if c.want == ErrUnknownGuest {
			guest = "nope"
		}
		_, err := m.suspend(clk.Now(), guest, c.agent, c.epoch, c.d)
		if e := mustCode(t, err, c.want); !strings.Contains(e.Message, c.msg) {
			t.Errorf("%s: message %q lacks %q", c.name, e.Message, c.msg)
		}
	}
	if r := m.guests["g"]; r.SuspendedFor != 0 || !r.leaseExpiry.Equal(clk.Now().Add(testLease)) {
		t.Fatalf("refusals changed the lease: %+v", r)
	}
	l, err := m.suspend(clk.Now(), "g", "a", 1, DefaultMaxSuspend)
	ok(t, err)
	// The caller's own lease is a normal one; only the arbiter holds on.
	if l.Duration != testLease || l.Epoch != 1 || l.Holder != "a" || !l.Expires.Equal(clk.Now().Add(DefaultMaxSuspend)) {
		t.Fatalf("suspended lease %+v", l)
	}
	// A suspension shorter than the lease keeps the lease.
	l, err = m.suspend(clk.Now(), "g", "a", 1, time.Second)
	ok(t, err)
	if !l.Expires.Equal(clk.Now().Add(testLease)) {
		t.Fatalf("short suspension cut the lease: %+v", l)
	}
}

// promotableAt reports whether the standby would be promoted at t.
func promotableAt(m *machine, t time.Time) bool {
	_, err := m.promote(t, "g", "b", 1, noObs, true)
	return err == nil
}

// TestSuspendHoldsOffPromotion: a suspension refuses promotion until it
// runs out, across a restart, unless the primary renews or registers
// again. Each case has a control without the suspension, which the same
// check must reject.
func TestSuspendHoldsOffPromotion(t *testing.T) {
	const d = 20 * time.Second
	cases := []struct {
		name    string
		suspend bool
		// then happens 1 s after the suspension; it returns when the
		// standby may be promoted at the earliest.
		then func(t *testing.T, m *machine, dir string, clk *fakeClock) (*machine, time.Time)
		// refusedUntil is the offset from the suspension before which
		// promotion must be refused.
		refusedUntil time.Duration
	}{
		{name: "runs out", suspend: true, refusedUntil: d,
			then: func(t *testing.T, m *machine, dir string, clk *fakeClock) (*machine, time.Time) {
				return m, clk.Now().Add(d - time.Second)
			}},
		{name: "control: no suspension", refusedUntil: d,
			then: func(t *testing.T, m *machine, dir string, clk *fakeClock) (*machine, time.Time) {
				return m, clk.Now().Add(testLease - time.Second)
			}},
		{name: "arbiter restart honours it", suspend: true, refusedUntil: d,
			then: func(t *testing.T, m *machine, dir string, clk *fakeClock) (*machine, time.Time) {
				closeMachine(m)
				m = openMachine(t, dir, testLease, clk.Now())
				if !m.guests["g"].LeaseExpires.Equal(clk.Now().Add(d - time.Second).UTC()) {
					t.Fatalf("persisted expiry %v", m.guests["g"].LeaseExpires)
				}
				// The arbiter cannot know how long it was down, so the
				// suspension runs in full from the restart.
				return m, clk.Now().Add(d)
			}},
		{name: "control: restart without suspension", refusedUntil: d,
			then: func(t *testing.T, m *machine, dir string, clk *fakeClock) (*machine, time.Time) {
				closeMachine(m)
				m = openMachine(t, dir, testLease, clk.Now())
				return m, clk.Now().Add(testLease)
			}},
		{name: "renewal ends it", suspend: true, refusedUntil: time.Second + testLease,
			then: func(t *testing.T, m *machine, dir string, clk *fakeClock) (*machine, time.Time) {
				_, err := m.renew(clk.Now(), "g", "a", 1)
				ok(t, err)
				return m, clk.Now().Add(testLease)
			}},
		{name: "registration ends it, also after a restart", suspend: true, refusedUntil: time.Second + testLease,
			then: func(t *testing.T, m *machine, dir string, clk *fakeClock) (*machine, time.Time) {
				_, err := m.register(clk.Now(), GuestSpec{Guest: "g", AgentID: "a", Role: RolePrimary, Epoch: 1}, ProbeSpec{})
				ok(t, err)
				closeMachine(m)
				m = openMachine(t, dir, testLease, clk.Now())
				return m, clk.Now().Add(testLease)
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			clk := newFakeClock()
			m := openMachine(t, dir, testLease, clk.Now())
			protectedGuest(t, m, clk.Now())
			at := clk.Now()
			if c.suspend {
				_, err := m.suspend(at, "g", "a", 1, d)
				ok(t, err)
			}
			clk.Advance(time.Second)
			m, earliest := c.then(t, m, dir, clk)
			if promotableAt(m, earliest.Add(-time.Nanosecond)) {
				t.Fatalf("promotable before %v", earliest.Sub(at))
			}
			if !promotableAt(m, earliest) {
				t.Fatalf("not promotable at %v", earliest.Sub(at))
			}
			// The safety check: nothing promotable before refusedUntil.
			// The controls must fail it.
			safe := !earliest.Before(at.Add(c.refusedUntil))
			control := strings.HasPrefix(c.name, "control")
			if safe == control {
				t.Fatalf("promotable %v after the suspension; refused until %v required (control %v)", earliest.Sub(at), c.refusedUntil, control)
			}
		})
	}
}

func TestSuspendMessageAndRelease(t *testing.T) {
	clk := newFakeClock()
	m := openMachine(t, t.TempDir(), testLease, clk.Now())
	protectedGuest(t, m, clk.Now())
	_, err := m.suspend(clk.Now(), "g", "a", 1, 10*time.Second)
	ok(t, err)
	clk.Advance(5 * time.Second)
	_, err = m.promote(clk.Now(), "g", "b", 1, noObs, false)
	if e := mustCode(t, err, ErrLeaseValid); !strings.Contains(e.Message, "suspended while its agent restarts") || e.RetryAfter != 5*time.Second {
		t.Fatalf("refusal %+v", e)
	}
	// Releasing gives the guest up, suspension included.
	ok(t, m.release(clk.Now(), "g", "a", 1))
	if m.guests["g"].SuspendedFor != 0 {
		t.Fatal("suspension kept after release")
	}
	_, err = m.promote(clk.Now(), "g", "b", 1, noObs, false)
	ok(t, err)
}
