package agent

import (
	"fmt"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
)

// The per-guest state machine: pure, no I/O. A guest's driver feeds it
// events (what the replication engine, the standby session, the arbiter
// and the hypervisor said) and carries out the actions each step orders.
// Status, records and the arbiter coordination all read this one state.

// Phase is where a guest is in its life on this agent. It is derived from
// the state (see State.Phase), never stored apart from it.
type Phase string

const (
	// Primary side.
	PhaseStarting    Phase = "starting"    // waiting for the arbiter to confirm role and fence: output held, nothing resumed
	PhaseConnecting  Phase = "connecting"  // no session with the standby yet
	PhaseSyncing     Phase = "syncing"     // the standby is being brought in sync
	PhaseProtected   Phase = "protected"   // the standby acknowledges epochs
	PhaseDegraded    Phase = "degraded"    // the standby stopped acknowledging: output held
	PhaseUnprotected Phase = "unprotected" // running alone by agreement (or without an arbiter): output flows
	PhaseSelfFenced  Phase = "self-fenced" // the lease ran out, or the arbiter may promote, while the standby was silent: guest paused
	PhaseFenced      Phase = "fenced"      // superseded at a higher fence: the copy here is destroyed

	// Standby side.
	PhaseReplicaSyncing Phase = "syncing"      // no complete checkpoint yet
	PhaseReplica        Phase = "protected"    // holds a complete checkpoint, the primary sends
	PhaseSuspecting     Phase = "degraded"     // the primary is silent: asking for promotion
	PhaseFailingOver    Phase = "failing-over" // promotion granted (or forced): restoring
	PhasePromoted       Phase = "failed-over"  // the guest runs here since a failover
	PhaseShellLost      Phase = "shell-lost"   // the shell died: nothing to fail over to until a full resync
)

// Role of a guest on this agent.
type Role int

const (
	Primary Role = iota + 1
	Standby
)

// Settings are the machine's timing, from the agent's configuration.
type Settings struct {
	Arbiter          bool          // an arbiter is configured
	HeartbeatTimeout time.Duration // a peer silent this long is suspected
	RetryAfter       time.Duration // after a failed arbiter call
}

// State is everything the agent decides a guest's fate by.
type State struct {
	Role  Role
	Fence uint64 // the fencing epoch this agent holds for the guest

	// Arbiter coordination.
	Registered  bool          // the arbiter confirmed role and fence since the agent started
	Lease       arbiter.Lease // primary (and promoted): the right to run the guest
	LeaseDur    time.Duration
	NextRenew   time.Time
	ArbiterBusy bool      // a call is under way (calls are serialised per guest)
	RetryAt     time.Time // no call before this after a failure
	InSync      bool      // the arbiter counts the standby as in sync
	// SyncReported: a ReportSynced went out and may have committed even
	// if its answer was lost, so the arbiter may count the standby in
	// sync: until it says otherwise the primary acts as if it does.
	SyncReported bool
	Note         string // the latest arbiter answer worth showing

	// Primary.
	PausedAtStart bool // a dead agent left the guest paused: resume once registered
	OutputFree    bool // output flows unheld until an epoch after ResyncAfter is acknowledged
	ResyncAfter   uint64
	SelfFenced    bool // paused by us: the lease ran out or the arbiter may promote the standby
	Fenced        bool // superseded: the copy here was destroyed
	DownSince     time.Time

	// Standby.
	Consistent  bool // the replica holds a complete checkpoint
	ShellLost   bool
	FailingOver bool
	Promoted    bool
	SuspectedAt time.Time
	GrantedAt   time.Time
	RestoredAt  time.Time

	RetryFailover bool      // a restore failed and may be tried again
	RestartUntil  time.Time // the primary's agent restarts on purpose: its silence is expected until then

	// What the engine or session said last (primary: about the standby;
	// standby: about the primary).
	Obs Observation

	settings Settings
}

// Observation is what a driver measured on one tick.
type Observation struct {
	Now time.Time
	// Primary: the replication engine's figures.
	Engine  string    // checkpoint.State*
	LastAck time.Time // an acknowledgement last released output
	// LastTimelyAck: the last acknowledgement within the ack window; the
	// standby was not suspecting this primary when it sent it.
	LastTimelyAck  time.Time
	ConnectedSince time.Time
	Started        uint64 // newest epoch whose capture began
	Acked          uint64
	// ArbiterHeard is when the arbiter last answered this agent's
	// heartbeat (zero: not since the start); after ArbiterSuspects of
	// silence it may promote the standby without waiting out the lease.
	ArbiterHeard    time.Time
	ArbiterSuspects time.Duration
	// Standby.
	Silent     bool // the failure detector suspects the primary
	Consistent bool
	ShellAlive bool
}

// Phase names where the guest is.
func (s *State) Phase() Phase {
	if s.Role == Standby {
		switch {
		case s.Fenced:
			return PhaseFenced
		case s.Promoted && s.SelfFenced:
			return PhaseSelfFenced
		case s.Promoted:
			return PhasePromoted
		case s.FailingOver:
			return PhaseFailingOver
		case s.ShellLost:
			return PhaseShellLost
		case !s.Consistent:
			return PhaseReplicaSyncing
		case s.Obs.Silent:
			return PhaseSuspecting
		}
		return PhaseReplica
	}
	switch {
	case s.Fenced:
		return PhaseFenced
	case s.SelfFenced:
		return PhaseSelfFenced
	case !s.Registered:
		return PhaseStarting
	case s.OutputFree:
		return PhaseUnprotected
	}
	switch s.Obs.Engine {
	case checkpoint.StateProtected:
		if !s.acking() {
			return PhaseDegraded
		}
		return PhaseProtected
	case checkpoint.StateSyncing:
		return PhaseSyncing
	case checkpoint.StateDegraded:
		return PhaseDegraded
	}
	return PhaseConnecting
}

func (s *State) acking() bool {
	return !s.Obs.LastAck.IsZero() && s.Obs.Now.Sub(s.Obs.LastAck) < s.timeout()
}

// timeout is the failure detector's.
func (s *State) timeout() time.Duration { return s.settings.HeartbeatTimeout }

// Event is something that happened to a guest.
type Event interface{ event() }

// Tick carries a fresh observation; timers fire on it.
type Tick struct{ Observation }

// Registered: the arbiter answered Register.
type Registered struct {
	Now time.Time
	Reg arbiter.Registration
}

// Renewed: the arbiter renewed the lease (primary or promoted).
type Renewed struct {
	Now   time.Time
	Lease arbiter.Lease
}

// Superseded: the arbiter (a stale-epoch answer or a heartbeat) says the
// guest runs elsewhere at a higher fence.
type Superseded struct {
	Fence   uint64
	Primary string
}

// FenceMoved: the arbiter still has this agent in its role, at a higher
// fence (its own concurrent call advanced it, or the primary's frames
// carried one the standby had not registered).
type FenceMoved struct{ Fence uint64 }

// ArbiterFailed: a call failed for another reason (unreachable, refused).
type ArbiterFailed struct {
	Now  time.Time
	Call string
	Err  error
	// RetryAfter is when the arbiter said to ask again (0: the default).
	RetryAfter time.Duration
	// Unregistered: the arbiter does not know the guest (it lost its
	// state): register again.
	Unregistered bool
}

// SyncedReported: the arbiter counts the standby as in sync.
type SyncedReported struct{}

// OutOfSyncAtArbiter: a heartbeat answer says the arbiter no longer
// counts the standby in sync (it registered again, e.g. after its shell
// died), while this primary's last report said it was.
type OutOfSyncAtArbiter struct{ Fence uint64 }

// CallDone: a call whose answer changes nothing here succeeded.
type CallDone struct{}

// StandbyLostGranted: the arbiter agreed the primary continues alone.
type StandbyLostGranted struct {
	Now   time.Time
	Lease arbiter.Lease
}

// PrimaryRestarting: the primary's agent said it stops on purpose and is
// back before Until (standby).
type PrimaryRestarting struct{ Until time.Time }

// Paused / Resumed report a pause or resume the machine ordered.
type Paused struct{ Err error }
type Resumed struct{ Err error }

// PromotionGranted: the arbiter made this standby the primary.
type PromotionGranted struct {
	Now   time.Time
	Grant arbiter.Grant
}

// FailoverStarted: an admin started a failover (with the arbiter's grant,
// whose lease it carries, or forced without); the admin's call runs it.
type FailoverStarted struct {
	Now   time.Time
	Fence uint64
	Lease arbiter.Lease
}

// FailoverDone / FailoverFailed report the restore.
type FailoverDone struct{ Now time.Time }
type FailoverFailed struct {
	Now        time.Time
	Err        error
	Retryable  bool // the shell still waits for its device state
	RolledBack bool // undone: the guest is a replica again (or nothing, if its shell died)
	Refused    bool // refused before anything changed: still a replica
}

func (Tick) event()               {}
func (Registered) event()         {}
func (Renewed) event()            {}
func (Superseded) event()         {}
func (FenceMoved) event()         {}
func (ArbiterFailed) event()      {}
func (SyncedReported) event()     {}
func (CallDone) event()           {}
func (OutOfSyncAtArbiter) event() {}
func (StandbyLostGranted) event() {}
func (Paused) event()             {}
func (PrimaryRestarting) event()  {}
func (Resumed) event()            {}
func (PromotionGranted) event()   {}
func (FailoverStarted) event()    {}
func (FailoverDone) event()       {}
func (FailoverFailed) event()     {}

// Action is something the machine orders its driver to do.
type Action interface{ action() }

// Arbiter calls: the driver makes them one at a time and reports the
// answer as an event.
type (
	DoRegister          struct{ Fresh bool }
	DoRenew             struct{}
	DoReportSynced      struct{}
	DoReportStandbyLost struct{}
	DoRequestPromotion  struct{}
	DoOfferStandby      struct{} // after being fenced: register as the new standby
)

// Local actions.
type (
	DoPause      struct{ Why string }
	DoResume     struct{ Why string }
	DoSetFence   struct{ Fence uint64 } // frames carry it from now on; recorded
	DoReleaseAll struct{ Why string }   // output flows unheld until the next cut
	// DoKeepOutputFree lets go what the output buffer held since its last
	// cut: while the output is free the engine may still cut epochs (a
	// slow resync), and each cut holds again.
	DoKeepOutputFree struct{}
	DoDestroyCopy    struct {
		Why        string
		AckedEpoch uint64 // held output of later epochs is discarded first
	}
	DoFailover  struct{ Fence uint64 } // standby: restore the guest from the replica
	DoDropShell struct{ Why string }   // standby: the replica is void; close the session
	DoPersist   struct{}               // the guest's record changed
)

func (DoRegister) action()          {}
func (DoRenew) action()             {}
func (DoReportSynced) action()      {}
func (DoReportStandbyLost) action() {}
func (DoRequestPromotion) action()  {}
func (DoOfferStandby) action()      {}
func (DoPause) action()             {}
func (DoResume) action()            {}
func (DoSetFence) action()          {}
func (DoReleaseAll) action()        {}
func (DoKeepOutputFree) action()    {}
func (DoDestroyCopy) action()       {}
func (DoFailover) action()          {}
func (DoDropShell) action()         {}
func (DoPersist) action()           {}

// IsArbiterCall reports whether a is made to the arbiter.
func IsArbiterCall(a Action) bool {
	switch a.(type) {
	case DoRegister, DoRenew, DoReportSynced, DoReportStandbyLost, DoRequestPromotion, DoOfferStandby:
		return true
	}
	return false
}

// Machine steps one guest's State.
type Machine struct {
	State
}

// NewPrimary is the machine of a guest this agent protects (enrolled now
// or loaded from its record).
func NewPrimary(set Settings, fence uint64, pausedAtStart, fenced bool) *Machine {
	m := &Machine{State{Role: Primary, Fence: fence, PausedAtStart: pausedAtStart, Fenced: fenced}}
	m.settings = set
	if !set.Arbiter {
		m.Registered = true // nobody to ask
	}
	return m
}

// NewStandby is the machine of a replica this agent keeps.
func NewStandby(set Settings, fence uint64, promoted, failingOver bool) *Machine {
	// An interrupted failover is finished (or rolled back) on the first tick.
	m := &Machine{State{Role: Standby, Fence: fence, Promoted: promoted, FailingOver: failingOver, RetryFailover: failingOver}}
	m.settings = set
	if !set.Arbiter {
		m.Registered = true
	}
	return m
}

// Step applies one event and returns the actions it orders, in order.
func (m *Machine) Step(ev Event) []Action {
	if IsCallResult(ev) {
		m.ArbiterBusy = false
	}
	switch e := ev.(type) {
	case Tick:
		m.Obs = e.Observation
		if m.Role == Primary {
			return m.primaryTick()
		}
		return m.standbyTick()
	case Registered:
		return m.registered(e)
	case Renewed:
		return m.renewed(e.Now, e.Lease)
	case Superseded:
		return m.superseded(e)
	case FenceMoved:
		return m.fenceMoved(e.Fence)
	case ArbiterFailed:
		m.Note = e.Call + ": " + e.Err.Error()
		m.RetryAt = e.Now.Add(m.settings.RetryAfter)
		if e.RetryAfter > 0 {
			m.RetryAt = e.Now.Add(min(e.RetryAfter, time.Minute))
		}
		if e.Unregistered && m.settings.Arbiter {
			m.Registered = false
		}
		return nil
	case CallDone:
		return nil
	case SyncedReported:
		m.InSync = true
		m.Note = ""
		return nil
	case OutOfSyncAtArbiter:
		// Only news about this copy's own fence counts: a heartbeat
		// answered before a report at a newer fence is stale.
		if m.Role == Primary && e.Fence == m.Fence {
			m.InSync, m.SyncReported = false, false
		}
		return nil
	case StandbyLostGranted:
		return m.standbyLost(e)
	case Paused:
		if e.Err != nil {
			m.Note = "pause failed: " + e.Err.Error()
			return nil // the next tick orders it again
		}
		m.SelfFenced = true
		return nil
	case Resumed:
		if e.Err != nil {
			m.Note = "resume failed: " + e.Err.Error()
			return nil
		}
		m.SelfFenced, m.PausedAtStart = false, false
		return nil
	case PrimaryRestarting:
		m.RestartUntil = e.Until
		return nil
	case PromotionGranted:
		return m.granted(e.Now, e.Grant.Epoch, e.Grant.Lease)
	case FailoverStarted:
		if m.FailingOver && e.Fence == m.Fence && e.Lease.Duration > 0 {
			m.Lease, m.LeaseDur = e.Lease, e.Lease.Duration // confirmed after the start
			return nil
		}
		m.granted(e.Now, e.Fence, e.Lease)
		return nil
	case FailoverDone:
		if !m.FailingOver {
			return nil
		}
		m.FailingOver, m.Promoted, m.RestoredAt = false, true, e.Now
		m.Note = ""
		m.NextRenew = e.Now
		return []Action{DoPersist{}}
	case FailoverFailed:
		if !m.FailingOver {
			return nil
		}
		m.Note = "failover failed: " + e.Err.Error()
		m.RetryFailover = e.Retryable
		m.RetryAt = e.Now.Add(m.settings.RetryAfter)
		switch {
		case e.RolledBack:
			m.FailingOver, m.ShellLost, m.Consistent = false, true, false
			m.Registered = !m.settings.Arbiter
		case e.Refused:
			m.FailingOver = false
		}
		return nil
	}
	panic(fmt.Sprintf("agent: machine has no step for %T", ev))
}

// IsCallResult reports whether ev answers an arbiter call.
func IsCallResult(ev Event) bool {
	switch ev.(type) {
	case Registered, Renewed, Superseded, FenceMoved, ArbiterFailed, SyncedReported, CallDone, StandbyLostGranted, PromotionGranted:
		return true
	}
	return false
}

// call orders an arbiter call unless one is under way or a retry is due.
func (m *Machine) call(a Action) []Action {
	if a == nil || !m.settings.Arbiter || m.ArbiterBusy || m.Obs.Now.Before(m.RetryAt) {
		return nil
	}
	m.ArbiterBusy = true
	return []Action{a}
}

// adopt raises the fence; a fence never goes down.
func (m *Machine) adopt(fence uint64) []Action {
	if fence <= m.Fence {
		return nil
	}
	m.Fence = fence
	return []Action{DoSetFence{Fence: fence}}
}

func (m *Machine) primaryTick() []Action {
	if m.Fenced {
		return nil
	}
	now := m.Obs.Now
	if !m.Registered {
		return m.call(DoRegister{Fresh: m.Fence == 0})
	}
	var acts []Action
	if m.PausedAtStart && !m.SelfFenced {
		acts = append(acts, DoResume{Why: "a previous agent left the guest paused mid-checkpoint"})
		m.PausedAtStart = false
	}
	acking := m.acking()
	// A standby taking a (re)sync makes progress: it is not lost.
	alive := acking || m.Obs.Engine == checkpoint.StateSyncing
	if alive {
		m.DownSince = time.Time{}
	} else if m.DownSince.IsZero() {
		m.DownSince = now
	}
	// Holding resumes with the first epoch cut after the release.
	if m.OutputFree && m.Obs.Acked > m.ResyncAfter {
		m.OutputFree = false
	}
	if m.settings.Arbiter && !m.Lease.ValidUntil.IsZero() {
		// Pause before the arbiter's copy of the lease runs out (it does a
		// drift margin later than ours), unless the standby acknowledged
		// within half the detector's timeout: a standby that hears from us
		// does not suspect us, so it cannot be promoting.
		standbySilent := now.Sub(m.Obs.LastTimelyAck) >= m.timeout()/2
		switch {
		case m.SelfFenced || !standbySilent:
		case !m.Lease.ValidAt(now):
			acts = append(acts, DoPause{Why: "lease expired and the standby is silent"})
		case m.arbiterMayPromote(now):
			// The arbiter promotes a standby in sync once it has missed
			// our heartbeats for its timeout, lease or not: pause at three
			// quarters of it (counted from a send, so early; half would
			// pause a healthy primary over one retransmission on a lossy
			// link) so that the copies never both run.
			acts = append(acts, DoPause{Why: fmt.Sprintf("no answer from the arbiter for %v and the standby is silent: the arbiter may promote it", now.Sub(m.Obs.ArbiterHeard).Round(time.Millisecond))})
		}
		var call Action
		switch {
		case !now.Before(m.NextRenew), m.SelfFenced:
			// Self-fenced: a renewal is what resumes the guest.
			call = DoRenew{}
		case m.Obs.Engine == checkpoint.StateProtected && acking && !m.OutputFree && !m.InSync:
			call = DoReportSynced{}
		case m.mayBeInSync() && !alive && now.Sub(m.DownSince) > m.timeout():
			call = DoReportStandbyLost{}
		}
		if c := m.call(call); c != nil {
			switch call.(type) {
			case DoRenew:
				m.NextRenew = now.Add(max(m.LeaseDur/3, 50*time.Millisecond))
			case DoReportSynced:
				m.SyncReported = true
			}
			acts = append(acts, c...)
		}
	}
	// A standby that cannot be promoted (none in sync at the arbiter, or
	// no arbiter to promote it) is not worth cutting the guest off its
	// network for: let the output go.
	last := m.Obs.LastAck
	if m.Obs.ConnectedSince.After(last) {
		last = m.Obs.ConnectedSince
	}
	stalled := now.Sub(last) > m.timeout()
	if !m.OutputFree && stalled && (!m.settings.Arbiter || !m.mayBeInSync()) {
		why := "the standby is not in sync at the arbiter and stopped acknowledging"
		if !m.settings.Arbiter {
			why = "the standby stopped acknowledging and no arbiter is configured"
		}
		acts = append(acts, m.releaseAll(why)...)
	} else if m.OutputFree {
		acts = append(acts, DoKeepOutputFree{})
	}
	return acts
}

// leaseUntil is when this primary's lease runs out, as Unix ns (0: it
// holds none, or may not run the guest).
func (m *Machine) leaseUntil() int64 {
	if m.Role != Primary || m.Fenced || m.SelfFenced || m.Lease.ValidUntil.IsZero() {
		return 0
	}
	return m.Lease.ValidUntil.UnixNano()
}

// arbiterMayPromote: the arbiter may count the standby as in sync and may
// soon have missed this agent's heartbeats for its detector's timeout.
func (m *Machine) arbiterMayPromote(now time.Time) bool {
	heard := m.Obs.ArbiterHeard
	return m.mayBeInSync() && !heard.IsZero() && now.Sub(heard) >= m.Obs.ArbiterSuspects*3/4
}

// mayBeInSync: the arbiter counts, or may count, the standby as in sync,
// so it may promote it once it loses this primary: output goes free only
// after the arbiter agreed to the standby's loss.
func (m *Machine) mayBeInSync() bool { return m.InSync || m.SyncReported }

func (m *Machine) releaseAll(why string) []Action {
	m.OutputFree, m.ResyncAfter = true, m.Obs.Started
	return []Action{DoReleaseAll{Why: why}}
}

func (m *Machine) registered(e Registered) []Action {
	r := e.Reg
	m.Registered = true
	m.Note = ""
	acts := m.adopt(r.Epoch)
	switch {
	case m.Role == Standby:
		m.InSync = r.InSync
	case r.Lease != nil:
		m.InSync, m.SyncReported = r.InSync, false
		acts = append(acts, m.renewed(e.Now, *r.Lease)...)
		m.NextRenew = e.Now.Add(max(m.LeaseDur/3, 50*time.Millisecond))
	}
	return acts
}

func (m *Machine) renewed(now time.Time, l arbiter.Lease) []Action {
	m.Lease, m.LeaseDur, m.Note = l, l.Duration, ""
	var acts []Action
	if m.Role == Primary || m.Promoted {
		acts = m.adopt(l.Epoch)
	}
	// Only a lease still valid now may resume: a renewal answered after
	// the old one ran out says nothing about the time in between.
	if m.SelfFenced && l.ValidAt(now) {
		acts = append(acts, DoResume{Why: "lease renewed"})
	}
	return acts
}

func (m *Machine) superseded(e Superseded) []Action {
	if e.Fence <= m.Fence {
		// News older than this copy's own fence (a heartbeat answer
		// about an epoch it has since been granted past, e.g. the one
		// an unenroll retired before this enrollment): not a successor.
		return nil
	}
	if m.Role == Primary && m.Fence == 0 {
		// A new enrollment the arbiter has not confirmed: the record it
		// met is an earlier enrollment of this name, not a successor of
		// this copy. Refuse to protect; never destroy a running guest
		// on that.
		m.Note = fmt.Sprintf("not protected: the arbiter lists this guest at fencing epoch %d with primary %s, from an earlier enrollment: unenroll it on %s first", e.Fence, e.Primary, e.Primary)
		return nil
	}
	m.Note = fmt.Sprintf("replaced by %s at fence %d", e.Primary, e.Fence)
	switch {
	case m.Role == Primary && !m.Fenced:
		acked := m.Obs.Acked
		m.Fenced, m.Fence, m.Registered = true, max(m.Fence, e.Fence), true
		m.Note += "; local copy destroyed"
		return []Action{DoDestroyCopy{Why: m.Note, AckedEpoch: acked}, DoPersist{}, DoOfferStandby{}}
	case m.Role == Standby && m.Promoted && !m.Fenced:
		m.Fence, m.Fenced = max(m.Fence, e.Fence), true
		m.Note += "; local copy destroyed"
		return []Action{DoDestroyCopy{Why: m.Note}, DoPersist{}}
	case m.Role == Standby && !m.Promoted:
		// A replica at a stale fence: learn the fence and register again.
		m.Registered = false
		return m.adopt(max(m.Fence, e.Fence))
	}
	return nil
}

func (m *Machine) fenceMoved(f uint64) []Action {
	if f <= m.Fence {
		return nil
	}
	acts := m.adopt(f)
	if m.Role == Standby && !m.Promoted {
		// A standby registered at an older fence is not the arbiter's
		// standby any more: register again, or promotion is refused.
		m.Registered = false
	}
	return acts
}

func (m *Machine) standbyLost(e StandbyLostGranted) []Action {
	m.InSync, m.SyncReported = false, false
	m.Note = ""
	acts := append(m.adopt(e.Lease.Epoch), m.renewed(e.Now, e.Lease)...)
	return append(acts, m.releaseAll("the arbiter agreed the primary continues without its standby")...)
}

func (m *Machine) standbyTick() []Action {
	now := m.Obs.Now
	switch {
	case m.Fenced:
		return nil
	case m.Promoted:
		if !m.settings.Arbiter || m.LeaseDur == 0 {
			return nil // forced without a grant: no lease to keep
		}
		var acts []Action
		if !m.Lease.ValidAt(now) && !m.SelfFenced {
			acts = append(acts, DoPause{Why: "lease of the promoted guest expired"})
		}
		if !now.Before(m.NextRenew) {
			if a := m.call(DoRenew{}); a != nil {
				m.NextRenew = now.Add(max(m.LeaseDur/3, 50*time.Millisecond))
				acts = append(acts, a...)
			}
		}
		return acts
	case m.FailingOver:
		if m.RetryFailover && !now.Before(m.RetryAt) {
			m.RetryFailover = false
			return []Action{DoFailover{Fence: m.Fence}}
		}
		return nil
	}
	m.Consistent = m.Obs.Consistent
	if m.Consistent && !m.Obs.ShellAlive && !m.ShellLost {
		// Epochs applied into a dead shell's RAM are worth nothing: stop
		// acknowledging, and tell the arbiter (by registering again) that
		// this standby is out of sync.
		m.ShellLost, m.Consistent, m.Registered = true, false, !m.settings.Arbiter
		return []Action{DoDropShell{Why: "the standby shell is not running"}}
	}
	if m.ShellLost && m.Obs.ShellAlive {
		m.ShellLost = false
	}
	if !m.Registered {
		return m.call(DoRegister{})
	}
	if !m.Obs.Silent || !m.Consistent {
		m.SuspectedAt = time.Time{}
		if !m.Obs.Silent {
			m.RestartUntil = time.Time{} // back
		}
		return nil
	}
	if now.Before(m.RestartUntil) {
		m.Note = "the primary's agent is restarting: no promotion before " + m.RestartUntil.Format(time.RFC3339)
		return nil
	}
	if m.SuspectedAt.IsZero() {
		m.SuspectedAt = now
	}
	return m.call(DoRequestPromotion{})
}

func (m *Machine) granted(now time.Time, fence uint64, l arbiter.Lease) []Action {
	if m.Promoted || m.FailingOver {
		return nil
	}
	m.FailingOver, m.GrantedAt, m.Note = true, now, ""
	m.Fence = max(m.Fence+1, fence)
	if l.Duration > 0 {
		m.Lease, m.LeaseDur = l, l.Duration
	}
	return []Action{DoFailover{Fence: m.Fence}}
}
