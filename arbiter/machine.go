package arbiter

import (
	"fmt"
	"log/slog"
	"sort"
	"time"
)

// machine is the lease/epoch state machine. It is not safe for concurrent
// use; Server serialises calls. Every method that changes durable state
// writes the new record before it replaces the in-memory one and before it
// returns, so nothing is ever granted that a restart could forget.
type machine struct {
	st         *store
	log        *slog.Logger
	leaseDur   time.Duration
	maxSuspend time.Duration
	maxGuests  int
	guests     map[string]*guestRecord

	// Guests without a record that agents hold epochs for, see recovery.go.
	recovering map[string]*recovery
	// recoverFor is how long claims are collected, counted from the first
	// claim but never from before started.
	recoverFor time.Duration
	started    time.Time
	// onRecover, when set, is called with each record recreated from
	// claims (the server watches its agents and starts its probes).
	onRecover func(*guestRecord)
}

// machineConfig is what a machine takes from Config.
type machineConfig struct {
	leaseDur   time.Duration
	maxSuspend time.Duration
	maxGuests  int
	log        *slog.Logger
}

// observation is what the arbiter's probes and heartbeats say right now.
type observation struct {
	serviceAnswering bool
	serviceDetail    string
	standbyLost      bool
	standbyDetail    string
	// primaryLost: the primary's agent, heard since the arbiter started,
	// has missed its heartbeats.
	primaryLost   bool
	primaryDetail string
	// primaryLostIn: how soon the primary's agent counts as lost if it
	// stays silent (0: not known), so a refused standby asks again then.
	primaryLostIn time.Duration
}

func newMachine(st *store, recs map[string]*guestRecord, cfg machineConfig, now time.Time) *machine {
	m := &machine{
		st:         st,
		log:        cfg.log,
		leaseDur:   cfg.leaseDur,
		maxSuspend: cfg.maxSuspend,
		maxGuests:  cfg.maxGuests,
		guests:     recs,
		recovering: map[string]*recovery{},
		recoverFor: 2 * cfg.leaseDur,
		started:    now,
	}
	for _, r := range recs {
		if r.LeaseHolder == "" {
			continue
		}
		// A lease granted just before the restart may still be held, and
		// renewals were not persisted: assume the longest lease ever
		// granted (or suspension) runs in full from now.
		d := max(r.LeaseDuration, cfg.leaseDur, r.SuspendedFor)
		r.leaseExpiry = now.Add(d)
	}
	return m
}

// commit persists next and then makes it current.
func (m *machine) commit(next *guestRecord) error {
	if next.LeaseHolder != "" {
		next.LeaseExpires = next.leaseExpiry.Round(0).UTC()
	}
	if err := m.st.save(next); err != nil {
		return errorf(CodeInternal, "persist guest %s: %v (nothing was granted)", next.Guest, err)
	}
	m.guests[next.Guest] = next
	return nil
}

func roleOf(r *guestRecord, agent string) Role {
	switch {
	case agent == r.Primary:
		return RolePrimary
	case agent == r.Standby && r.StandbyEpoch == r.Epoch:
		return RoleStandby
	}
	return RoleNone
}

// checkEpoch rejects a request whose epoch is not the guest's current one.
func checkEpoch(r *guestRecord, agent string, epoch uint64) error {
	switch {
	case epoch < r.Epoch:
		return &Error{
			Code:         CodeStaleEpoch,
			Message:      fmt.Sprintf("guest %s: stale fencing epoch %d, current is %d (primary %s, your role %s)", r.Guest, epoch, r.Epoch, r.Primary, roleOf(r, agent)),
			CurrentEpoch: r.Epoch,
			Primary:      r.Primary,
			Role:         roleOf(r, agent),
		}
	case epoch > r.Epoch:
		return &Error{
			Code:         CodeEpochAhead,
			Message:      fmt.Sprintf("guest %s: epoch %d was never issued, current is %d", r.Guest, epoch, r.Epoch),
			CurrentEpoch: r.Epoch,
			Primary:      r.Primary,
			Role:         roleOf(r, agent),
		}
	}
	return nil
}

// get returns the guest's record, deciding its recovery first if that is
// due; ErrRecovering while it is not decided.
func (m *machine) get(now time.Time, guest string) (*guestRecord, error) {
	if err := m.pending(now, guest); err != nil {
		return nil, err
	}
	r, ok := m.guests[guest]
	if !ok {
		return nil, errorf(CodeUnknownGuest, "unknown guest %q", guest)
	}
	if r.Retired {
		return nil, errorf(CodeUnknownGuest, "guest %q was unenrolled at epoch %d; enroll it again to protect it", guest, r.Epoch)
	}
	return r, nil
}

func (m *machine) leaseValid(r *guestRecord, now time.Time) bool {
	return r.LeaseHolder != "" && now.Before(r.leaseExpiry)
}

func (m *machine) lease(r *guestRecord) Lease {
	return Lease{
		Guest:    r.Guest,
		Epoch:    r.Epoch,
		Holder:   r.LeaseHolder,
		Duration: m.leaseDur,
		Expires:  r.leaseExpiry.Round(0).UTC(),
	}
}

// grantLease gives the lease to the primary from now on, ending any
// suspension. It reports whether the change must be persisted (holder,
// duration or suspension changed).
func (m *machine) grantLease(r *guestRecord, now time.Time) bool {
	persist := r.LeaseHolder != r.Primary || r.LeaseDuration < m.leaseDur || r.SuspendedFor != 0
	if r.LeaseHolder != r.Primary {
		r.LeaseGranted = now.Round(0).UTC()
		r.LeaseDuration = m.leaseDur
	}
	r.LeaseHolder = r.Primary
	if r.LeaseDuration < m.leaseDur {
		r.LeaseDuration = m.leaseDur
	}
	// Ending a suspension early is safe: the holder was only ever given a
	// normal lease (see suspend), which this one outlasts.
	r.SuspendedFor = 0
	r.leaseExpiry = now.Add(m.leaseDur)
	return persist
}

func (m *machine) registration(r *guestRecord, agent string) Registration {
	reg := Registration{
		Guest:   r.Guest,
		Epoch:   r.Epoch,
		Role:    roleOf(r, agent),
		Primary: r.Primary,
		InSync:  r.InSync,
	}
	if r.StandbyEpoch == r.Epoch {
		reg.Standby = r.Standby
	}
	if reg.Role == RolePrimary {
		l := m.lease(r)
		reg.Lease = &l
	}
	return reg
}

func (m *machine) register(now time.Time, spec GuestSpec, service ProbeSpec) (Registration, error) {
	if spec.Role != RolePrimary && spec.Role != RoleStandby {
		return Registration{}, errorf(CodeBadRequest, "role must be %q or %q, not %q", RolePrimary, RoleStandby, spec.Role)
	}
	if err := m.awaitRecovery(now, spec, service); err != nil {
		return Registration{}, err
	}
	if spec.Role == RolePrimary {
		return m.registerPrimary(now, spec, service)
	}
	return m.registerStandby(now, spec)
}

func (m *machine) registerPrimary(now time.Time, spec GuestSpec, service ProbeSpec) (Registration, error) {
	r, known := m.guests[spec.Guest]
	if known && spec.Fresh && !r.Retired && spec.AgentID != r.Primary {
		return Registration{}, errorf(CodeConflict, "guest %s is enrolled with primary %s at epoch %d: unenroll it there first (or fail it over here)", r.Guest, r.Primary, r.Epoch)
	}
	if !known || r.Retired || spec.Fresh {
		if err := m.admit(spec.Guest); err != nil {
			return Registration{}, err
		}
		// Start above any epoch the caller already saw, any this
		// arbiter issued and any an agent claimed in a recovery this
		// enrollment ends, so an epoch is never reissued: not after
		// the arbiter lost its state, not to a new enrollment.
		from := max(spec.Epoch, m.claimedTop(spec.Guest))
		if known {
			from = max(from, r.Epoch)
		}
		next := &guestRecord{
			Guest:            spec.Guest,
			Epoch:            from + 1,
			Primary:          spec.AgentID,
			PrimaryAddr:      spec.AgentAddr,
			UnprotectedSince: now.Round(0).UTC(),
			Service:          service,
			Last:             &Transition{Kind: TransitionCreated, From: from, To: from + 1, Agent: spec.AgentID, At: now.Round(0).UTC()},
		}
		m.grantLease(next, now)
		if err := m.commit(next); err != nil {
			return Registration{}, err
		}
		m.abandonRecovery(spec.Guest, spec.AgentID, next.Epoch)
		return m.registration(next, spec.AgentID), nil
	}
	if err := checkEpoch(r, spec.AgentID, registeredEpoch(r, spec)); err != nil {
		return Registration{}, err
	}
	if spec.AgentID != r.Primary {
		return Registration{}, errorf(CodeConflict, "guest %s already has primary %s at epoch %d", r.Guest, r.Primary, r.Epoch)
	}
	next := *r
	persist := m.grantLease(&next, now)
	if next.PrimaryAddr != spec.AgentAddr || next.Service != service {
		next.PrimaryAddr, next.Service = spec.AgentAddr, service
		persist = true
	}
	if persist {
		if err := m.commit(&next); err != nil {
			return Registration{}, err
		}
	} else {
		m.guests[r.Guest] = &next
	}
	return m.registration(&next, spec.AgentID), nil
}

func (m *machine) registerStandby(now time.Time, spec GuestSpec) (Registration, error) {
	r, known := m.guests[spec.Guest]
	if !known || r.Retired {
		return Registration{}, errorf(CodeUnknownGuest, "unknown guest %q: the primary must register first", spec.Guest)
	}
	if spec.Epoch != 0 {
		if err := checkEpoch(r, spec.AgentID, registeredEpoch(r, spec)); err != nil {
			return Registration{}, err
		}
	}
	if spec.AgentID == r.Primary {
		return Registration{}, errorf(CodeConflict, "guest %s: %s is the primary at epoch %d and cannot also be its standby", r.Guest, r.Primary, r.Epoch)
	}
	if r.Standby != spec.AgentID && r.Standby != "" && r.StandbyEpoch == r.Epoch && r.InSync {
		return Registration{}, errorf(CodeConflict, "guest %s already has standby %s in sync", r.Guest, r.Standby)
	}
	next := *r
	next.Standby, next.StandbyAddr, next.StandbyEpoch = spec.AgentID, spec.AgentAddr, r.Epoch
	// A (re-)registering standby may have lost its copy: it is not
	// protecting the guest until the primary reports it synced.
	if next.InSync {
		next.InSync = false
		next.UnprotectedSince = now.Round(0).UTC()
	}
	if err := m.commit(&next); err != nil {
		return Registration{}, err
	}
	return m.registration(&next, spec.AgentID), nil
}

// registeredEpoch is the epoch a registration counts with. A recovery
// recreated the guest one above the claims; the registration repeating
// the claim of its primary or standby is answered as if it knew the new
// epoch, like the replay of any grant whose reply was lost.
func registeredEpoch(r *guestRecord, spec GuestSpec) uint64 {
	if l := r.Last; l != nil && l.Kind == TransitionRecovered && l.From == spec.Epoch && l.To == r.Epoch && roleOf(r, spec.AgentID) == spec.Role {
		return r.Epoch
	}
	return spec.Epoch
}

// primaryRecord returns the guest's record if agent is its primary at
// epoch.
func (m *machine) primaryRecord(now time.Time, guest, agent string, epoch uint64) (*guestRecord, error) {
	r, err := m.get(now, guest)
	if err != nil {
		return nil, err
	}
	if err := checkEpoch(r, agent, epoch); err != nil {
		return nil, err
	}
	if agent != r.Primary {
		return nil, errorf(CodeNotPrimary, "guest %s: %s is not the primary (primary is %s)", guest, agent, r.Primary)
	}
	return r, nil
}

func (m *machine) renew(now time.Time, guest, agent string, epoch uint64) (Lease, error) {
	m.claimPrimary(guest, agent, epoch)
	r, err := m.primaryRecord(now, guest, agent, epoch)
	if err != nil {
		return Lease{}, err
	}
	// An expired lease may be re-acquired: nobody else was granted the
	// guest, or the epoch would have changed.
	next := *r
	if m.grantLease(&next, now) {
		if err := m.commit(&next); err != nil {
			return Lease{}, err
		}
	} else {
		m.guests[guest] = &next
	}
	return m.lease(&next), nil
}

// suspend holds off promotion until now+d for a primary whose agent is
// about to restart on purpose. The caller itself gets a normal lease (its
// ValidUntil is as after Renew): so ending the suspension early when it
// renews or registers again never cuts a lease it relies on.
func (m *machine) suspend(now time.Time, guest, agent string, epoch uint64, d time.Duration) (Lease, error) {
	switch {
	case d <= 0:
		return Lease{}, errorf(CodeBadRequest, "guest %s: suspend for %v: the duration must be positive", guest, d)
	case d > m.maxSuspend:
		return Lease{}, errorf(CodeLimit, "guest %s: suspend for %v exceeds max_suspend (%v): suspend for less, or raise max_suspend in the arbiter's configuration", guest, d, m.maxSuspend)
	}
	m.claimPrimary(guest, agent, epoch)
	r, err := m.primaryRecord(now, guest, agent, epoch)
	if err != nil {
		return Lease{}, err
	}
	next := *r
	m.grantLease(&next, now)
	next.leaseExpiry = later(next.leaseExpiry, now.Add(d))
	next.SuspendedFor = d
	if err := m.commit(&next); err != nil {
		return Lease{}, err
	}
	return m.lease(&next), nil
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func (m *machine) release(now time.Time, guest, agent string, epoch uint64) error {
	r, err := m.primaryRecord(now, guest, agent, epoch)
	if err != nil {
		return err
	}
	if r.LeaseHolder == "" {
		return nil
	}
	next := *r
	next.LeaseHolder = ""
	next.SuspendedFor = 0
	next.leaseExpiry = now
	next.LeaseExpires = now.Round(0).UTC()
	return m.commit(&next)
}

// promote decides a promotion request. With dryRun it runs every check that
// does not need a fresh service probe (the lease check included) and
// changes nothing; the server then probes the service and calls again.
func (m *machine) promote(now time.Time, guest, agent string, epoch uint64, obs observation, dryRun bool) (Grant, error) {
	r, err := m.get(now, guest)
	if err != nil {
		return Grant{}, err
	}
	// The grant was persisted but the reply may have been lost: answer
	// the retry with the same grant instead of "stale epoch".
	if l := r.Last; l != nil && l.Kind == TransitionPromotion && l.Agent == agent && l.From == epoch && r.Epoch == epoch+1 && r.Primary == agent {
		if dryRun {
			return Grant{}, nil
		}
		lease, err := m.renew(now, guest, agent, r.Epoch)
		if err != nil {
			return Grant{}, err
		}
		return Grant{Guest: guest, Epoch: r.Epoch, PreviousEpoch: l.From, PreviousPrimary: l.Previous, Lease: lease}, nil
	}
	if err := checkEpoch(r, agent, epoch); err != nil {
		return Grant{}, err
	}
	if roleOf(r, agent) != RoleStandby {
		return Grant{}, errorf(CodeNotStandby, "guest %s: %s is not the standby at epoch %d", guest, agent, r.Epoch)
	}
	if !r.InSync {
		return Grant{}, errorf(CodeNotInSync, "guest %s: standby %s is not in sync (unprotected since %s)", guest, agent, r.UnprotectedSince.Format(time.RFC3339))
	}
	// A primary's lease bounds how long it may serve, but while its standby
	// is in sync it releases no output the standby has not acknowledged,
	// and the standby acknowledges nothing once it asks to be promoted; nor
	// can it continue alone at this epoch once the promotion commits. So
	// when the arbiter has lost the primary's agent too, the rest of its
	// lease protects nothing and the promotion need not wait for it. A
	// suspended lease (an agent restarting on purpose) is waited for.
	early := obs.primaryLost && r.SuspendedFor == 0
	if m.leaseValid(r, now) && !early {
		left := r.leaseExpiry.Sub(now)
		msg := fmt.Sprintf("guest %s: primary %s holds a valid lease for another %v", guest, r.LeaseHolder, left.Round(time.Millisecond))
		if r.SuspendedFor != 0 {
			msg += " (suspended while its agent restarts)"
		}
		if obs.serviceAnswering {
			msg += " and the guest service still answers from the arbiter (" + obs.serviceDetail + "); no failover"
		}
		retry := left
		if r.SuspendedFor == 0 && obs.primaryLostIn > 0 {
			retry = min(retry, obs.primaryLostIn)
		}
		return Grant{}, &Error{Code: CodeLeaseValid, Message: msg, RetryAfter: retry}
	}
	if dryRun {
		return Grant{}, nil
	}
	if obs.serviceAnswering {
		// The lease ran out yet someone still serves the guest: starting
		// a second copy now is exactly what the arbiter exists to prevent.
		return Grant{}, errorf(CodeServiceAlive, "guest %s: primary lease expired or its agent lost, but the guest service still answers from the arbiter (%s); refusing a second copy", guest, obs.serviceDetail)
	}
	detail := ""
	if m.leaseValid(r, now) {
		detail = fmt.Sprintf("primary's agent lost (%s) with %v of its lease left", obs.primaryDetail, r.leaseExpiry.Sub(now).Round(time.Millisecond))
	}
	return m.standbyBecomesPrimary(now, r, TransitionPromotion, detail)
}

// handover makes the standby the primary at the primary's request: no
// lease expiry and no service probe are waited for, since the primary
// vouches its copy is stopped, and its epoch is stale once this commits.
// The standby must be the one registered at this epoch and in sync.
func (m *machine) handover(now time.Time, guest, agent string, epoch uint64, to string) (Grant, error) {
	r, err := m.get(now, guest)
	if err != nil {
		return Grant{}, err
	}
	if l := r.Last; l != nil && l.Kind == TransitionHandover && l.Previous == agent && l.Agent == to && l.From == epoch && r.Epoch == epoch+1 && r.Primary == to {
		// Committed, the answer lost: the same grant again.
		return Grant{Guest: guest, Epoch: r.Epoch, PreviousEpoch: l.From, PreviousPrimary: agent, Lease: m.lease(r)}, nil
	}
	if err := checkEpoch(r, agent, epoch); err != nil {
		return Grant{}, err
	}
	if agent != r.Primary {
		return Grant{}, errorf(CodeNotPrimary, "guest %s: %s is not the primary (primary is %s)", guest, agent, r.Primary)
	}
	if roleOf(r, to) != RoleStandby {
		return Grant{}, errorf(CodeNotStandby, "guest %s: %s is not its standby at epoch %d (the standby is %q)", guest, to, r.Epoch, r.Standby)
	}
	if !r.InSync {
		return Grant{}, errorf(CodeNotInSync, "guest %s: standby %s is not in sync", guest, to)
	}
	return m.standbyBecomesPrimary(now, r, TransitionHandover, "")
}

// standbyBecomesPrimary commits r's next epoch with its standby as the
// primary, holding a fresh lease, and no standby yet.
func (m *machine) standbyBecomesPrimary(now time.Time, r *guestRecord, kind, detail string) (Grant, error) {
	next := *r
	next.Epoch = r.Epoch + 1
	next.Primary, next.PrimaryAddr = r.Standby, r.StandbyAddr
	next.Standby, next.StandbyAddr, next.StandbyEpoch = "", "", 0
	next.InSync = false
	next.UnprotectedSince = now.Round(0).UTC()
	next.Last = &Transition{Kind: kind, From: r.Epoch, To: next.Epoch, Agent: r.Standby, Previous: r.Primary, At: now.Round(0).UTC(), Detail: detail}
	next.LeaseHolder = "" // force a fresh grant to the new primary
	m.grantLease(&next, now)
	if err := m.commit(&next); err != nil {
		return Grant{}, err
	}
	return Grant{Guest: r.Guest, Epoch: next.Epoch, PreviousEpoch: r.Epoch, PreviousPrimary: r.Primary, Lease: m.lease(&next)}, nil
}

// standbyLost decides whether the primary may continue without its
// standby. Granting starts a new epoch, which fences the standby's copy:
// its promotion requests now carry a stale epoch. So for any epoch at most
// one of "standby promotes" and "primary continues alone" is granted.
// dryRun works as for promote.
func (m *machine) standbyLost(now time.Time, guest, agent string, epoch uint64, obs observation, dryRun bool) (Lease, error) {
	r, err := m.get(now, guest)
	if err != nil {
		return Lease{}, err
	}
	if l := r.Last; l != nil && l.Kind == TransitionStandbyLost && l.Agent == agent && l.From == epoch && r.Epoch == epoch+1 && r.Primary == agent {
		if dryRun {
			return Lease{}, nil
		}
		return m.renew(now, guest, agent, r.Epoch)
	}
	if err := checkEpoch(r, agent, epoch); err != nil {
		return Lease{}, err
	}
	if agent != r.Primary {
		return Lease{}, errorf(CodeNotPrimary, "guest %s: %s is not the primary", guest, agent)
	}
	if !r.InSync || r.StandbyEpoch != r.Epoch || r.Standby == "" {
		// Already unprotected: no standby can be promoted at this epoch,
		// so the primary needs no new grant to run alone.
		if dryRun {
			return Lease{}, nil
		}
		return m.renew(now, guest, agent, epoch)
	}
	// Granted even when the arbiter still reaches the standby (the link
	// between the two is cut): the primary holds its guest's output until
	// this grant, so refusing it would cut the guest off its clients for as
	// long as the link is down. The new epoch fences the standby either way.
	if dryRun {
		return Lease{}, nil
	}
	next := *r
	next.Epoch = r.Epoch + 1
	next.InSync = false
	next.UnprotectedSince = now.Round(0).UTC()
	next.Last = &Transition{Kind: TransitionStandbyLost, From: r.Epoch, To: next.Epoch, Agent: agent, Previous: r.Standby, At: now.Round(0).UTC(),
		Detail: standbyLostDetail(obs)}
	m.grantLease(&next, now)
	if err := m.commit(&next); err != nil {
		return Lease{}, err
	}
	return m.lease(&next), nil
}

func (m *machine) synced(now time.Time, guest, agent string, epoch uint64, standby string) error {
	r, err := m.primaryRecord(now, guest, agent, epoch)
	if err != nil {
		return err
	}
	if roleOf(r, standby) != RoleStandby {
		return errorf(CodeNotStandby, "guest %s: %s is not registered as standby at epoch %d", guest, standby, r.Epoch)
	}
	if r.InSync {
		return nil
	}
	next := *r
	next.InSync = true
	next.UnprotectedSince = time.Time{}
	return m.commit(&next)
}

// retire forgets a guest's roles and lease when its primary unenrolls it.
// The record stays, one epoch on, so that copies left from the enrollment
// are stale and a later enrollment starts above it.
func (m *machine) retire(now time.Time, guest, agent string, epoch uint64) error {
	if err := m.pending(now, guest); err != nil {
		return err
	}
	r, ok := m.guests[guest]
	if !ok {
		return nil // never registered: nothing to forget
	}
	if l := r.Last; r.Retired && l != nil && l.Kind == TransitionRetired && l.Agent == agent && l.From == epoch {
		return nil // a retry whose answer was lost
	}
	r, err := m.primaryRecord(now, guest, agent, epoch)
	if err != nil {
		return err
	}
	next := &guestRecord{
		Guest:            r.Guest,
		Epoch:            r.Epoch + 1,
		UnprotectedSince: now.Round(0).UTC(),
		Retired:          true,
		Last:             &Transition{Kind: TransitionRetired, From: r.Epoch, To: r.Epoch + 1, Agent: agent, Previous: r.Standby, At: now.Round(0).UTC()},
	}
	return m.commit(next)
}

// heartbeat takes the epochs an agent reports as claims for guests
// without a record, then lists its assignments.
func (m *machine) heartbeat(now time.Time, agent string, epochs map[string]uint64) []Assignment {
	for guest, epoch := range epochs {
		if _, known := m.guests[guest]; known || epoch == 0 || validName("guest", guest) != nil {
			continue
		}
		if err := m.claim(now, guest, Claim{Agent: agent, Role: RoleNone, Epoch: epoch}); err != nil {
			m.log.Debug("arbiter: heartbeat claim ignored", "guest", guest, "agent", agent, "fence", epoch, "reason", err)
			continue
		}
		if err := m.settle(now, guest); err != nil {
			m.log.Error("arbiter: cannot record a recovered guest", "guest", guest, "err", err)
		}
	}
	return m.assignments(agent, epochs)
}

// assignments lists the guests agent is involved in, plus any it asked
// about, sorted by guest.
func (m *machine) assignments(agent string, epochs map[string]uint64) []Assignment {
	var out []Assignment
	for name, r := range m.guests {
		e, asked := epochs[name]
		if !asked && (r.Retired || r.Primary != agent && r.Standby != agent) {
			continue
		}
		a := Assignment{Guest: name, Epoch: r.Epoch, Role: roleOf(r, agent), Primary: r.Primary, InSync: r.InSync}
		if r.StandbyEpoch == r.Epoch {
			a.Standby, a.StandbyAddr = r.Standby, r.StandbyAddr
		}
		a.Stale = asked && e < r.Epoch
		out = append(out, a)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Guest < out[j].Guest })
	return out
}

// names lists the guests with a record or being recovered, sorted.
func (m *machine) names() []string {
	out := make([]string, 0, len(m.guests)+len(m.recovering))
	for n := range m.guests {
		out = append(out, n)
	}
	for n := range m.recovering {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func standbyLostDetail(obs observation) string {
	if obs.standbyLost {
		return "standby lost (" + obs.standbyDetail + ")"
	}
	return "replication link cut; the arbiter still reaches the standby (" + obs.standbyDetail + ")"
}
