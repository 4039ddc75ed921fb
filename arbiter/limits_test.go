package arbiter

import (
	"strings"
	"testing"
	"time"
)

func TestValidateProbeTiming(t *testing.T) {
	cases := []struct {
		interval, timeout time.Duration
		want              string // "" : accepted
	}{
		{MinProbeInterval, MinProbeTimeout, ""},
		{MaxProbeInterval, MaxProbeInterval, ""},
		{time.Second, 500 * time.Millisecond, ""},
		{time.Nanosecond, time.Nanosecond, "probe interval 1ns is below the minimum of 100ms"},
		{0, MinProbeTimeout, "probe interval 0s is below the minimum of 100ms"},
		{MaxProbeInterval + time.Second, time.Second, "probe interval 1h0m1s exceeds the maximum of 1h0m0s"},
		{time.Second, time.Millisecond, "probe timeout 1ms is below the minimum of 10ms"},
		{time.Second, 2 * time.Second, "probe timeout 2s exceeds the probe interval 1s"},
	}
	for _, c := range cases {
		err := ValidateProbeTiming(c.interval, c.timeout)
		if c.want == "" && err != nil || c.want != "" && (err == nil || err.Error() != c.want) {
			t.Errorf("ValidateProbeTiming(%v, %v) = %v, want %q", c.interval, c.timeout, err, c.want)
		}
	}
}

func TestProbeSpecTimingBounds(t *testing.T) {
	tcp := func(interval, timeout time.Duration) ProbeSpec {
		return ProbeSpec{Kind: ProbeTCP, Address: "a:1", Interval: interval, Timeout: timeout}
	}
	cases := []struct {
		spec ProbeSpec
		want string
	}{
		{tcp(0, 0), ""},
		{tcp(time.Second, 0), ""},
		{tcp(0, 5*time.Second), ""}, // the interval is the arbiter's: checked with defaults
		{tcp(time.Nanosecond, 0), "below the minimum of 100ms"},
		{tcp(2*time.Hour, 0), "exceeds the maximum of 1h0m0s"},
		{tcp(0, time.Millisecond), "below the minimum of 10ms"},
		{tcp(time.Second, 2*time.Second), "exceeds the probe interval 1s"},
		{ProbeSpec{Interval: time.Nanosecond}, ""}, // no probe, nothing to run
	}
	for _, c := range cases {
		err := c.spec.Validate()
		if c.want == "" && err != nil || c.want != "" && (err == nil || !strings.Contains(err.Error(), c.want)) {
			t.Errorf("%+v: Validate() = %v, want %q", c.spec, err, c.want)
		}
	}
	// Defaults fill in, a default timeout never exceeding the interval.
	if got := tcp(200*time.Millisecond, 0).WithDefaults(time.Second, 500*time.Millisecond); got.Interval != 200*time.Millisecond || got.Timeout != 200*time.Millisecond {
		t.Errorf("WithDefaults: %+v", got)
	}
	if got := tcp(0, 0).WithDefaults(time.Second, 500*time.Millisecond); got.Interval != time.Second || got.Timeout != 500*time.Millisecond {
		t.Errorf("WithDefaults: %+v", got)
	}
}

// TestMaxGuests: new guests beyond the cap are refused, whether they come
// by enrollment or by claims; known ones go on. The control with the
// default cap admits the same guest.
func TestMaxGuests(t *testing.T) {
	for _, limit := range []int{2, DefaultMaxGuests} {
		clk := newFakeClock()
		cfg := testConfig(testLease)
		cfg.maxGuests = limit
		m := openMachineWith(t, t.TempDir(), cfg, clk.Now())
		now := clk.Now()
		_, err := m.register(now, GuestSpec{Guest: "g1", AgentID: "a", Role: RolePrimary, Fresh: true}, ProbeSpec{})
		ok(t, err)
		ok(t, m.retire(now, "g1", "a", 1)) // kept for its epoch: still counts
		m.heartbeat(now, "a", map[string]uint64{"g2": 4})
		_, err = m.register(now, GuestSpec{Guest: "g3", AgentID: "a", Role: RolePrimary, Fresh: true}, ProbeSpec{})
		m.heartbeat(now, "a", map[string]uint64{"g4": 4})
		_, recovering := m.recovering["g4"]
		if limit == DefaultMaxGuests {
			ok(t, err)
			if !recovering {
				t.Fatal("control: claim for g4 not taken")
			}
			continue
		}
		e := mustCode(t, err, ErrLimit)
		for _, want := range []string{"g3", "tracks 2 guests", "1 of them unenrolled", "1 being recovered", "raise max_guests"} {
			if !strings.Contains(e.Message, want) {
				t.Errorf("limit message %q lacks %q", e.Message, want)
			}
		}
		if recovering {
			t.Error("claim beyond the cap started a recovery")
		}
		// Guests already tracked are not refused.
		_, err = m.register(now, GuestSpec{Guest: "g1", AgentID: "a", Role: RolePrimary, Fresh: true}, ProbeSpec{})
		ok(t, err)
		_, err = m.register(now, GuestSpec{Guest: "g2", AgentID: "a", Role: RolePrimary, Epoch: 4}, ProbeSpec{})
		mustCode(t, err, ErrRecovering)
	}
}
