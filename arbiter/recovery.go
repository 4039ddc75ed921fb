package arbiter

import (
	"fmt"
	"sort"
	"strings"
	"time"
)

// recovery collects what agents say of a guest the arbiter has no record
// of although they hold epochs for it: its state was lost. Deciding from
// the first claim could make a stale primary primary again, so nothing is
// decided before until, by which time every lease the lost state granted
// has run out and every live agent has heartbeated.
type recovery struct {
	until  time.Time
	claims map[string]Claim // by agent
	// stuck says why the latest decision could not be made; cleared when
	// a claim changes, so each failure is logged once.
	stuck string
}

// claim records what an agent says of a guest without a record, starting
// its recovery if needed.
func (m *machine) claim(now time.Time, guest string, c Claim) error {
	rc, ok := m.recovering[guest]
	if !ok {
		if err := m.admit(guest); err != nil {
			return err
		}
		rc = &recovery{until: later(now, m.started).Add(m.recoverFor), claims: map[string]Claim{}}
		m.recovering[guest] = rc
		m.log.Warn("arbiter: no record of a guest an agent holds a fence for; collecting claims before deciding",
			"guest", guest, "agent", c.Agent, "role", c.Role, "fence", c.Epoch, "until", rc.until.Round(0))
	}
	rc.add(c)
	return nil
}

// claimPrimary counts a primary's renewal (or suspension) of a guest being
// recovered as its claim: its agent may never register again.
func (m *machine) claimPrimary(guest, agent string, epoch uint64) {
	if rc, ok := m.recovering[guest]; ok {
		rc.add(Claim{Agent: agent, Role: RolePrimary, Epoch: epoch})
	}
}

// add keeps the most an agent said: its highest epoch, and at that epoch
// what it said last, unless that adds nothing (a heartbeat states no
// role, a renewal no address or service).
func (rc *recovery) add(c Claim) {
	old, seen := rc.claims[c.Agent]
	if seen && (c.Epoch < old.Epoch || c.Epoch == old.Epoch && (c.Role == RoleNone || c.Role == old.Role && c.addr == "")) {
		return
	}
	if c != old {
		rc.claims[c.Agent] = c
		rc.stuck = ""
	}
}

// pending decides the guest's recovery if it is due, and returns
// ErrRecovering while it is not decided.
func (m *machine) pending(now time.Time, guest string) error {
	if err := m.settle(now, guest); err != nil {
		return err
	}
	if _, ok := m.recovering[guest]; ok {
		return m.recoveringErr(now, guest)
	}
	return nil
}

// awaitRecovery is where a registration for a guest without a record
// meets recovery. One naming an epoch, or arriving while claims are being
// collected, is a claim: it starts or joins the recovery and is refused
// until that is decided. A fresh enrollment claims nothing: it waits for
// the window to end and then meets the decided record or, if no decision
// could be made, takes the guest (above every claimed epoch).
func (m *machine) awaitRecovery(now time.Time, spec GuestSpec, service ProbeSpec) error {
	if _, known := m.guests[spec.Guest]; known {
		return nil
	}
	rc, recovering := m.recovering[spec.Guest]
	switch {
	case spec.Fresh && recovering:
		if now.Before(rc.until) {
			return m.recoveringErr(now, spec.Guest)
		}
		return m.settle(now, spec.Guest)
	case spec.Fresh || !recovering && spec.Epoch == 0:
		return nil
	}
	c := Claim{Agent: spec.AgentID, Role: spec.Role, Epoch: spec.Epoch, addr: spec.AgentAddr, service: service}
	if err := m.claim(now, spec.Guest, c); err != nil {
		return err
	}
	return m.pending(now, spec.Guest)
}

// settle decides the guest's recovery once its window is over: the one
// claimant of the primary role at the highest claimed epoch becomes
// primary one above it, which makes every claim stale. If no such
// claimant exists the guest stays recovering.
func (m *machine) settle(now time.Time, guest string) error {
	rc, ok := m.recovering[guest]
	if !ok || now.Before(rc.until) {
		return nil
	}
	next, why := rc.decide(guest, now)
	if next == nil {
		if rc.stuck == "" {
			m.log.Warn("arbiter: cannot recover guest yet", "guest", guest, "reason", why, "claims", rc.describe())
		}
		rc.stuck = why
		return nil
	}
	if err := m.commit(next); err != nil {
		return err
	}
	delete(m.recovering, guest)
	m.log.Warn("arbiter: recovered guest from the agents' claims", "guest", guest, "fence", next.Epoch,
		"primary", next.Primary, "standby", next.Standby, "claims", rc.describe(), "stale", rc.below(next.Last.From))
	if m.onRecover != nil {
		m.onRecover(next)
	}
	return nil
}

func (rc *recovery) decide(guest string, now time.Time) (*guestRecord, string) {
	top := rc.top()
	var primaries, standbys, atTop []string
	for _, c := range rc.sorted() {
		if c.Epoch != top {
			continue
		}
		atTop = append(atTop, c.Agent)
		switch c.Role {
		case RolePrimary:
			primaries = append(primaries, c.Agent)
		case RoleStandby:
			standbys = append(standbys, c.Agent)
		}
	}
	switch {
	case len(primaries) == 0:
		return nil, fmt.Sprintf("no agent claims the primary role at the highest fence %d (held by %s); waiting for its primary to register", top, strings.Join(atTop, ", "))
	case len(primaries) > 1:
		return nil, fmt.Sprintf("%s all claim the primary role at fence %d", strings.Join(primaries, ", "), top)
	}
	p := rc.claims[primaries[0]]
	at := now.Round(0).UTC()
	next := &guestRecord{
		Guest:            guest,
		Epoch:            top + 1,
		Primary:          p.Agent,
		PrimaryAddr:      p.addr,
		Service:          p.service,
		UnprotectedSince: at,
		Last:             &Transition{Kind: TransitionRecovered, From: top, To: top + 1, Agent: p.Agent, At: at, Detail: "claims: " + rc.describe()},
	}
	// The primary's standby at its epoch stays its standby, out of sync
	// until the primary reports it synced, as after any registration.
	if len(standbys) == 1 {
		s := rc.claims[standbys[0]]
		next.Standby, next.StandbyAddr, next.StandbyEpoch = s.Agent, s.addr, next.Epoch
	}
	return next, ""
}

func (rc *recovery) top() uint64 {
	var top uint64
	for _, c := range rc.claims {
		top = max(top, c.Epoch)
	}
	return top
}

func (rc *recovery) sorted() []Claim {
	out := make([]Claim, 0, len(rc.claims))
	for _, c := range rc.claims {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Agent < out[j].Agent })
	return out
}

// below lists the claimants at epochs under epoch: the stale ones.
func (rc *recovery) below(epoch uint64) []string {
	var out []string
	for _, c := range rc.sorted() {
		if c.Epoch < epoch {
			out = append(out, c.Agent)
		}
	}
	return out
}

func (rc *recovery) describe() string {
	parts := make([]string, 0, len(rc.claims))
	for _, c := range rc.sorted() {
		role := string(c.Role)
		if c.Role == RoleNone {
			role = "heartbeat"
		}
		parts = append(parts, fmt.Sprintf("%s %s at fence %d", c.Agent, role, c.Epoch))
	}
	return strings.Join(parts, ", ")
}

func (rc *recovery) status() *RecoveryStatus {
	return &RecoveryStatus{Until: rc.until.Round(0).UTC(), Claims: rc.sorted(), Stuck: rc.stuck}
}

func (m *machine) recoveringErr(now time.Time, guest string) error {
	rc := m.recovering[guest]
	if left := rc.until.Sub(now); left > 0 {
		return &Error{Code: CodeRecovering, RetryAfter: left, Message: fmt.Sprintf(
			"guest %s: the arbiter has no record of it and is recovering its state from the agents' claims; nothing is granted for another %v: retry then",
			guest, left.Round(time.Millisecond))}
	}
	return &Error{Code: CodeRecovering, RetryAfter: m.leaseDur, Message: fmt.Sprintf(
		"guest %s: the arbiter is recovering its lost record but cannot decide: %s; retry, or enroll the guest anew to give up its epochs",
		guest, rc.stuck)}
}

// claimedTop is the highest epoch claimed for a guest being recovered.
func (m *machine) claimedTop(guest string) uint64 {
	if rc, ok := m.recovering[guest]; ok {
		return rc.top()
	}
	return 0
}

// abandonRecovery drops a recovery that a new enrollment ended.
func (m *machine) abandonRecovery(guest, agent string, epoch uint64) {
	rc, ok := m.recovering[guest]
	if !ok {
		return
	}
	delete(m.recovering, guest)
	m.log.Warn("arbiter: recovery given up for a new enrollment", "guest", guest, "agent", agent, "fence", epoch,
		"claims", rc.describe(), "reason", rc.stuck)
}

// admit refuses to track a guest beyond maxGuests. Retired records and
// recoveries count: each costs memory, and a record also a file.
func (m *machine) admit(guest string) error {
	_, known := m.guests[guest]
	_, recovering := m.recovering[guest]
	if known || recovering || len(m.guests)+len(m.recovering) < m.maxGuests {
		return nil
	}
	retired := 0
	for _, r := range m.guests {
		if r.Retired {
			retired++
		}
	}
	return errorf(CodeLimit, "cannot track guest %s: the arbiter already tracks %d guests (max_guests; %d of them unenrolled and kept for their epochs, %d being recovered); raise max_guests in the arbiter's configuration",
		guest, len(m.guests)+len(m.recovering), retired, len(m.recovering))
}
