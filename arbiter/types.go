package arbiter

import (
	"fmt"
	"net"
	"regexp"
	"time"

	"github.com/remora-ha/remora/internal/names"
)

// Role is an agent's role for one guest.
type Role string

const (
	RoleNone    Role = "none"
	RolePrimary Role = "primary"
	RoleStandby Role = "standby"
)

// ProbeKind selects how the arbiter checks a guest's service.
type ProbeKind string

const (
	// ProbeNone disables the service check.
	ProbeNone ProbeKind = ""
	// ProbeTCP succeeds when a TCP connection is accepted.
	ProbeTCP ProbeKind = "tcp"
	// ProbeLine connects, sends Send plus a newline, reads one line and
	// matches it against ExpectPrefix and/or ExpectRegexp (any line
	// matches when both are empty).
	ProbeLine ProbeKind = "line"
)

// ProbeSpec describes a check run from the arbiter's host.
type ProbeSpec struct {
	Kind         ProbeKind     `json:"kind,omitempty"`
	Address      string        `json:"address,omitempty"` // host:port
	Send         string        `json:"send,omitempty"`
	ExpectPrefix string        `json:"expect_prefix,omitempty"`
	ExpectRegexp string        `json:"expect_regexp,omitempty"`
	Interval     time.Duration `json:"interval,omitempty"` // 0: arbiter default
	Timeout      time.Duration `json:"timeout,omitempty"`  // 0: arbiter default, at most Interval
}

// Bounds on probe timing: a shorter interval busy-loops the prober, a
// longer one leaves decisions on stale results, and a timeout must end
// before the next probe is due.
const (
	MinProbeInterval = 100 * time.Millisecond
	MaxProbeInterval = time.Hour
	MinProbeTimeout  = 10 * time.Millisecond
)

// ValidateProbeTiming checks an effective (defaults applied) probe
// interval and timeout against the bounds.
func ValidateProbeTiming(interval, timeout time.Duration) error {
	if err := checkProbeInterval(interval); err != nil {
		return err
	}
	return checkProbeTimeout(timeout, interval)
}

func checkProbeInterval(d time.Duration) error {
	switch {
	case d < MinProbeInterval:
		return fmt.Errorf("probe interval %v is below the minimum of %v", d, MinProbeInterval)
	case d > MaxProbeInterval:
		return fmt.Errorf("probe interval %v exceeds the maximum of %v", d, MaxProbeInterval)
	}
	return nil
}

// checkProbeTimeout checks timeout against its minimum and, when interval
// is known (non-zero), against the interval.
func checkProbeTimeout(timeout, interval time.Duration) error {
	switch {
	case timeout < MinProbeTimeout:
		return fmt.Errorf("probe timeout %v is below the minimum of %v", timeout, MinProbeTimeout)
	case interval != 0 && timeout > interval:
		return fmt.Errorf("probe timeout %v exceeds the probe interval %v", timeout, interval)
	}
	return nil
}

// WithDefaults fills in an unset Interval and Timeout. A default timeout
// longer than the interval is cut to the interval.
func (p ProbeSpec) WithDefaults(interval, timeout time.Duration) ProbeSpec {
	if p.Interval == 0 {
		p.Interval = interval
	}
	if p.Timeout == 0 {
		p.Timeout = min(timeout, p.Interval)
	}
	return p
}

// Validate checks the spec for obvious mistakes.
func (p ProbeSpec) Validate() error {
	switch p.Kind {
	case ProbeNone:
		return nil
	case ProbeTCP, ProbeLine:
	default:
		return fmt.Errorf("unknown probe kind %q (want tcp or line)", p.Kind)
	}
	if _, _, err := net.SplitHostPort(p.Address); err != nil {
		return fmt.Errorf("probe address %q: %v", p.Address, err)
	}
	if p.ExpectRegexp != "" {
		if _, err := regexp.Compile(p.ExpectRegexp); err != nil {
			return fmt.Errorf("probe expect_regexp: %v", err)
		}
	}
	if p.Kind == ProbeTCP && (p.Send != "" || p.ExpectPrefix != "" || p.ExpectRegexp != "") {
		return fmt.Errorf("probe kind tcp takes no send/expect; use kind line")
	}
	if p.Interval < 0 || p.Timeout < 0 {
		return fmt.Errorf("probe interval and timeout must not be negative")
	}
	if p.Interval != 0 {
		if err := checkProbeInterval(p.Interval); err != nil {
			return err
		}
	}
	if p.Timeout != 0 {
		return checkProbeTimeout(p.Timeout, p.Interval)
	}
	return nil
}

// GuestSpec is what an agent tells the arbiter when it registers for a guest.
type GuestSpec struct {
	Guest   string `json:"guest"`
	AgentID string `json:"agent_id"` // must equal the agent's certificate name
	Role    Role   `json:"role"`     // RolePrimary or RoleStandby
	// Epoch is the fencing epoch the agent last learned for this guest, or
	// 0 if it has none (a fresh standby, or the very first primary).
	Epoch uint64 `json:"epoch"`
	// AgentAddr is a host:port of the agent (typically its replication
	// listener) that the arbiter TCP-connects to as a reachability probe.
	// Optional; without it only heartbeats tell whether the agent is alive.
	AgentAddr string `json:"agent_addr,omitempty"`
	// Service is how clients reach the guest. Only used from the primary,
	// and only when the arbiter's configuration has no probe for the guest.
	Service ProbeSpec `json:"service,omitempty"`
	// Fresh marks a new enrollment by a primary that holds no state for
	// the guest: whatever the arbiter remembers of an earlier enrollment
	// with the same primary is superseded by a new epoch, which fences
	// any copy left from it.
	Fresh bool `json:"fresh,omitempty"`
}

// Lease is the primary's right to run the guest.
type Lease struct {
	Guest    string        `json:"guest"`
	Epoch    uint64        `json:"epoch"`
	Holder   string        `json:"holder"`
	Duration time.Duration `json:"duration"`
	// Expires is the arbiter's own notion of expiry, on its clock. Shown
	// for diagnostics only; agents must use ValidUntil. After Suspend it is
	// the end of the suspension, which Duration does not cover.
	Expires time.Time `json:"expires"`
	// ValidUntil is computed by the client library on the local monotonic
	// clock: the moment the request was sent, plus Duration, minus a clock
	// rate margin (DriftMargin). Because the arbiter starts its own lease
	// no earlier than it receives the request, the local view always ends
	// first. The primary must stop releasing guest output at ValidUntil
	// unless a renewal has succeeded.
	ValidUntil time.Time `json:"-"`
}

// DriftMargin is the fraction of a lease the client gives up to cover a
// difference in clock rate between the agent and the arbiter.
const DriftMargin = 0.02

// Valid reports whether the lease is still valid on the local clock.
func (l Lease) Valid() bool { return l.ValidAt(time.Now()) }

// ValidAt reports whether the lease is valid at t (local clock).
func (l Lease) ValidAt(t time.Time) bool { return t.Before(l.ValidUntil) }

// Registration is the answer to Register.
type Registration struct {
	Guest   string `json:"guest"`
	Epoch   uint64 `json:"epoch"`
	Role    Role   `json:"role"`
	Primary string `json:"primary"`
	Standby string `json:"standby,omitempty"`
	InSync  bool   `json:"in_sync"`
	// Lease is set when registering as primary.
	Lease *Lease `json:"lease,omitempty"`
}

// Grant is the answer to a successful RequestPromotion: the caller is now
// the primary at Epoch and holds Lease.
type Grant struct {
	Guest           string `json:"guest"`
	Epoch           uint64 `json:"epoch"`
	PreviousEpoch   uint64 `json:"previous_epoch"`
	PreviousPrimary string `json:"previous_primary"`
	Lease           Lease  `json:"lease"`
}

// Assignment is one guest's roles as reported to an agent in a heartbeat
// reply, so an agent learns of epoch changes even when it is not renewing.
type Assignment struct {
	Guest   string `json:"guest"`
	Epoch   uint64 `json:"epoch"`
	Role    Role   `json:"role"` // the heartbeating agent's role
	Primary string `json:"primary"`
	Standby string `json:"standby,omitempty"`
	// StandbyAddr is where the standby's agent takes replication (its
	// registration's address), for a primary that has none yet.
	StandbyAddr string `json:"standby_addr,omitempty"`
	InSync      bool   `json:"in_sync"`
	// Stale is set when the agent reported an older epoch for this guest.
	Stale bool `json:"stale,omitempty"`
}

// Transition records the latest epoch-changing grant for a guest.
type Transition struct {
	Kind     string    `json:"kind"` // TransitionCreated, TransitionPromotion, TransitionStandbyLost, TransitionHandover, TransitionRetired, TransitionRecovered
	From     uint64    `json:"from"`
	To       uint64    `json:"to"`
	Agent    string    `json:"agent"`              // who received the grant
	Previous string    `json:"previous,omitempty"` // old primary, or the lost standby
	At       time.Time `json:"at"`
	Detail   string    `json:"detail,omitempty"` // what the arbiter saw when it granted
}

const (
	TransitionCreated     = "created"
	TransitionPromotion   = "promotion"
	TransitionStandbyLost = "standby_lost"
	TransitionHandover    = "handover"
	TransitionRetired     = "retired"
	// TransitionRecovered: the guest was recreated from the agents' claims
	// after the arbiter lost its record; From is the highest claimed epoch.
	TransitionRecovered = "recovered"
)

// Claim is what one agent said of a guest the arbiter had no record of:
// the role it claims (RoleNone when only a heartbeat named the guest) and
// the epoch it holds.
type Claim struct {
	Agent string `json:"agent"`
	Role  Role   `json:"role"`
	Epoch uint64 `json:"fence"`

	addr    string    // the agent's AgentAddr, from a registration
	service ProbeSpec // the primary's service check, from a registration
}

// RecoveryStatus describes a guest whose record the arbiter lost, while
// it collects the agents' claims (see the package documentation).
type RecoveryStatus struct {
	Until  time.Time `json:"until"` // no decision before this
	Claims []Claim   `json:"claims"`
	// Stuck says why no decision could be made once Until passed.
	Stuck string `json:"stuck,omitempty"`
}

// ProbeStatus is the latest result of one probe.
type ProbeStatus struct {
	Kind    ProbeKind `json:"kind"`
	Address string    `json:"address"`
	// OK, At, Latency and Error describe the latest completed probe; At is
	// zero until the first one finishes.
	OK                  bool          `json:"ok"`
	At                  time.Time     `json:"at"`
	Latency             time.Duration `json:"latency_ns"`
	Error               string        `json:"error,omitempty"`
	ConsecutiveFailures int           `json:"consecutive_failures"`
	LastOK              time.Time     `json:"last_ok"`
}

// GuestStatus is one guest in Status.
type GuestStatus struct {
	Guest            string        `json:"guest"`
	Epoch            uint64        `json:"fence"`
	Primary          string        `json:"primary"`
	Standby          string        `json:"standby,omitempty"`
	InSync           bool          `json:"in_sync"`
	UnprotectedSince time.Time     `json:"unprotected_since"`
	LeaseHolder      string        `json:"lease_holder,omitempty"`
	LeaseExpires     time.Time     `json:"lease_expires"`
	LeaseRemaining   time.Duration `json:"lease_remaining_ns"`
	// SuspendedUntil is set while the primary's lease is suspended (see
	// Client.Suspend): no promotion before it.
	SuspendedUntil time.Time    `json:"suspended_until,omitzero"`
	Last           *Transition  `json:"last_transition,omitempty"`
	Service        *ProbeStatus `json:"service,omitempty"`
	Retired        bool         `json:"retired,omitempty"` // unenrolled; kept for its epoch
	// Recovering is set, and every other field but Guest empty, while the
	// arbiter recovers the guest's lost record from the agents' claims.
	Recovering *RecoveryStatus `json:"recovering,omitempty"`
}

// AgentStatus is one agent in Status.
type AgentStatus struct {
	Agent              string       `json:"agent"`
	Addr               string       `json:"addr,omitempty"`
	LastHeartbeat      time.Time    `json:"last_heartbeat"`
	HeartbeatSuspected bool         `json:"heartbeat_suspected"`
	Reachability       *ProbeStatus `json:"reachability,omitempty"`
}

// Status is a snapshot of the arbiter.
type Status struct {
	Now             time.Time     `json:"now"`
	ProtocolVersion int           `json:"protocol_version"`
	LeaseDuration   time.Duration `json:"lease_duration_ns"`
	Guests          []GuestStatus `json:"guests"`
	Agents          []AgentStatus `json:"agents"`
}

// validName checks a name from the wire with the one validator remora has
// (internal/names): guests by the guest rule, agents by the agent rule.
func validName(kind, name string) error {
	err := names.Agent(kind, name)
	if kind == "guest" {
		err = names.Guest(kind, name)
	}
	if err != nil {
		return errorf(CodeBadRequest, "%v", err)
	}
	return nil
}
