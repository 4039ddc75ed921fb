package agent

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func testSettings() Settings {
	return Settings{Arbiter: true, HeartbeatTimeout: time.Second, RetryAfter: time.Second}
}

func lease(fence uint64, until time.Time) arbiter.Lease {
	return arbiter.Lease{Epoch: fence, Holder: "host-a", Duration: 3 * time.Second, ValidUntil: until}
}

// primaryIn returns a primary's machine in phase p at t0, with no timer due.
func primaryIn(p Phase) *Machine {
	m := NewPrimary(testSettings(), 3, false, false)
	m.Registered, m.Lease, m.LeaseDur, m.NextRenew = true, lease(3, t0.Add(2*time.Second)), 3*time.Second, t0.Add(time.Second)
	m.Obs = Observation{Now: t0, Engine: checkpoint.StateConnecting, Started: 10, Acked: 9, ArbiterHeard: t0.Add(-50 * time.Millisecond), ArbiterSuspects: time.Second}
	switch p {
	case PhaseStarting:
		m.Registered, m.Lease = false, arbiter.Lease{}
	case PhaseConnecting:
	case PhaseSyncing:
		m.Obs.Engine, m.Obs.ConnectedSince = checkpoint.StateSyncing, t0.Add(-100*time.Millisecond)
	case PhaseProtected:
		m.InSync = true
		m.Obs.Engine, m.Obs.LastAck, m.Obs.ConnectedSince = checkpoint.StateProtected, t0.Add(-50*time.Millisecond), t0.Add(-time.Minute)
	case PhaseDegraded:
		m.InSync = true
		m.Obs.Engine, m.Obs.LastAck, m.Obs.ConnectedSince = checkpoint.StateProtected, t0.Add(-1500*time.Millisecond), t0.Add(-time.Minute)
		m.DownSince = t0.Add(-1500 * time.Millisecond)
	case PhaseUnprotected:
		m.OutputFree, m.ResyncAfter = true, 10
		m.Obs.Engine = checkpoint.StateDegraded
	case PhaseSelfFenced:
		m.InSync, m.SelfFenced = true, true
		m.Lease = lease(3, t0.Add(-time.Second))
		m.Obs.Engine, m.Obs.LastAck = checkpoint.StateDegraded, t0.Add(-5*time.Second)
	case PhaseFenced:
		m.Fenced = true
	default:
		panic(p)
	}
	if got := m.Phase(); got != p {
		panic(fmt.Sprintf("primaryIn(%s) is %s", p, got))
	}
	m.Obs.LastTimelyAck = m.Obs.LastAck // the table's acks come in time
	return m
}

// standbyIn returns a standby's machine in phase p at t0.
func standbyIn(p Phase) *Machine {
	m := NewStandby(testSettings(), 3, false, false)
	m.Registered, m.Consistent = true, true
	m.Obs = Observation{Now: t0, Consistent: true, ShellAlive: true}
	switch p {
	case PhaseReplicaSyncing:
		m.Consistent, m.Obs.Consistent = false, false
	case PhaseReplica:
	case PhaseSuspecting:
		m.Obs.Silent, m.SuspectedAt = true, t0.Add(-time.Second)
	case PhaseFailingOver:
		m.FailingOver, m.Fence = true, 4
	case PhasePromoted:
		m.Promoted, m.Fence = true, 4
		m.Lease, m.LeaseDur, m.NextRenew = lease(4, t0.Add(2*time.Second)), 3*time.Second, t0.Add(time.Second)
	case PhaseShellLost:
		m.ShellLost, m.Consistent, m.Obs.Consistent, m.Obs.ShellAlive = true, false, false, false
	case PhaseFenced:
		m.Promoted, m.Fenced, m.Fence = true, true, 9
	default:
		panic(p)
	}
	if got := m.Phase(); got != p {
		panic(fmt.Sprintf("standbyIn(%s) is %s", p, got))
	}
	return m
}

// tick observes o at t0+d, starting from the machine's last observation.
func tick(m *Machine, d time.Duration, change func(*Observation)) Event {
	o := m.Obs
	o.Now = t0.Add(d)
	if change != nil {
		change(&o)
	}
	o.LastTimelyAck = o.LastAck // the table's acks come in time
	return Tick{o}
}

type event struct {
	name string
	make func(m *Machine) Event
}

var primaryEvents = []event{
	{"tick", func(m *Machine) Event { return tick(m, 10*time.Millisecond, nil) }},
	{"tick renew due", func(m *Machine) Event {
		return tick(m, time.Second, func(o *Observation) { o.ArbiterHeard = o.Now.Add(-50 * time.Millisecond) })
	}},
	{"tick acked", func(m *Machine) Event {
		return tick(m, 10*time.Millisecond, func(o *Observation) {
			o.Engine, o.LastAck, o.Acked, o.Started = checkpoint.StateProtected, o.Now, 12, 12
		})
	}},
	{"tick standby silent", func(m *Machine) Event {
		return tick(m, 10*time.Millisecond, func(o *Observation) { o.LastAck = o.Now.Add(-1500 * time.Millisecond) })
	}},
	{"tick arbiter and standby silent", func(m *Machine) Event {
		return tick(m, 10*time.Millisecond, func(o *Observation) {
			o.LastAck, o.ArbiterHeard = o.Now.Add(-1500*time.Millisecond), o.Now.Add(-800*time.Millisecond)
		})
	}},
	{"tick arbiter silent", func(m *Machine) Event {
		return tick(m, 10*time.Millisecond, func(o *Observation) { o.ArbiterHeard = o.Now.Add(-800 * time.Millisecond) })
	}},
	{"tick lease expired", func(m *Machine) Event {
		return tick(m, 2500*time.Millisecond, func(o *Observation) {
			if !o.LastAck.IsZero() {
				o.LastAck = o.Now.Add(-2 * time.Second)
			}
		})
	}},
	{"registered in sync", func(m *Machine) Event {
		l := lease(3, t0.Add(3*time.Second))
		return Registered{Now: t0, Reg: arbiter.Registration{Epoch: 3, Role: arbiter.RolePrimary, InSync: true, Lease: &l}}
	}},
	{"registered not in sync", func(m *Machine) Event {
		l := lease(5, t0.Add(3*time.Second))
		return Registered{Now: t0, Reg: arbiter.Registration{Epoch: 5, Role: arbiter.RolePrimary, Lease: &l}}
	}},
	{"renewed", func(m *Machine) Event { return Renewed{Now: t0, Lease: lease(m.Fence, t0.Add(3*time.Second))} }},
	{"renewed too late", func(m *Machine) Event { return Renewed{Now: t0, Lease: lease(m.Fence, t0.Add(-time.Millisecond))} }},
	{"superseded", func(m *Machine) Event { return Superseded{Fence: 9, Primary: "host-b"} }},
	{"fence moved", func(m *Machine) Event { return FenceMoved{Fence: 5} }},
	{"arbiter failed", func(m *Machine) Event { return ArbiterFailed{Now: t0, Call: "renew", Err: errors.New("unreachable")} }},
	{"synced reported", func(m *Machine) Event { return SyncedReported{} }},
	{"out of sync at the arbiter", func(m *Machine) Event { return OutOfSyncAtArbiter{Fence: m.Fence} }},
	{"standby lost granted", func(m *Machine) Event {
		return StandbyLostGranted{Now: t0, Lease: lease(4, t0.Add(3*time.Second))}
	}},
	{"paused", func(m *Machine) Event { return Paused{} }},
	{"pause failed", func(m *Machine) Event { return Paused{Err: errors.New("QMP timeout")} }},
	{"resumed", func(m *Machine) Event { return Resumed{} }},
}

var standbyEvents = []event{
	{"tick", func(m *Machine) Event { return tick(m, 10*time.Millisecond, nil) }},
	{"tick renew due", func(m *Machine) Event { return tick(m, time.Second, nil) }},
	{"tick primary silent", func(m *Machine) Event {
		return tick(m, 10*time.Millisecond, func(o *Observation) { o.Silent = true })
	}},
	{"tick primary back", func(m *Machine) Event {
		return tick(m, 10*time.Millisecond, func(o *Observation) { o.Silent = false })
	}},
	{"tick shell died", func(m *Machine) Event {
		return tick(m, 10*time.Millisecond, func(o *Observation) { o.ShellAlive = false })
	}},
	{"tick synced", func(m *Machine) Event {
		return tick(m, 10*time.Millisecond, func(o *Observation) { o.Consistent, o.ShellAlive = true, true })
	}},
	{"tick lease expired", func(m *Machine) Event { return tick(m, 2500*time.Millisecond, nil) }},
	{"registered", func(m *Machine) Event {
		return Registered{Now: t0, Reg: arbiter.Registration{Epoch: 3, Role: arbiter.RoleStandby, InSync: true}}
	}},
	{"renewed", func(m *Machine) Event { return Renewed{Now: t0, Lease: lease(m.Fence, t0.Add(3*time.Second))} }},
	{"superseded", func(m *Machine) Event { return Superseded{Fence: 9, Primary: "host-c"} }},
	{"fence moved", func(m *Machine) Event { return FenceMoved{Fence: 5} }},
	{"arbiter failed", func(m *Machine) Event {
		return ArbiterFailed{Now: t0, Call: "promotion", Err: errors.New("lease valid")}
	}},
	{"promotion granted", func(m *Machine) Event {
		return PromotionGranted{Now: t0, Grant: arbiter.Grant{Epoch: 4, Lease: lease(4, t0.Add(3*time.Second))}}
	}},
	{"failover started", func(m *Machine) Event { return FailoverStarted{Now: t0, Fence: 4} }},
	{"failover done", func(m *Machine) Event { return FailoverDone{Now: t0} }},
	{"failover failed, retryable", func(m *Machine) Event {
		return FailoverFailed{Now: t0, Err: errors.New("QMP timeout"), Retryable: true}
	}},
	{"failover refused", func(m *Machine) Event {
		return FailoverFailed{Now: t0, Err: errors.New("no complete checkpoint"), Refused: true}
	}},
	{"failover rolled back", func(m *Machine) Event {
		return FailoverFailed{Now: t0, Err: errors.New("shell gone"), RolledBack: true}
	}},
	{"paused", func(m *Machine) Event { return Paused{} }},
	{"resumed", func(m *Machine) Event { return Resumed{} }},
}

func actionNames(acts []Action) string {
	var s []string
	for _, a := range acts {
		s = append(s, strings.TrimPrefix(fmt.Sprintf("%T", a), "agent.Do"))
	}
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, ",")
}

type transition struct {
	phase Phase
	event string
	next  Phase
	acts  string // action type names without "Do", comma-separated; "-" for none
}

// primaryTable is every (phase, event) pair of a primary: the phase it
// moves to and what it orders.
var primaryTable = []transition{
	// Starting: nothing but registering until the arbiter answers.
	{PhaseStarting, "tick", PhaseStarting, "Register"},
	{PhaseStarting, "tick renew due", PhaseStarting, "Register"},
	{PhaseStarting, "tick acked", PhaseStarting, "Register"},
	{PhaseStarting, "tick standby silent", PhaseStarting, "Register"},
	{PhaseStarting, "tick arbiter and standby silent", PhaseStarting, "Register"},
	{PhaseStarting, "tick arbiter silent", PhaseStarting, "Register"},
	{PhaseStarting, "tick lease expired", PhaseStarting, "Register"},
	{PhaseStarting, "registered in sync", PhaseConnecting, "-"},
	{PhaseStarting, "registered not in sync", PhaseConnecting, "SetFence"},
	{PhaseStarting, "renewed", PhaseStarting, "-"},
	{PhaseStarting, "renewed too late", PhaseStarting, "-"},
	{PhaseStarting, "superseded", PhaseFenced, "DestroyCopy,Persist,OfferStandby"},
	{PhaseStarting, "fence moved", PhaseStarting, "SetFence"},
	{PhaseStarting, "arbiter failed", PhaseStarting, "-"},
	{PhaseStarting, "synced reported", PhaseStarting, "-"},
	{PhaseStarting, "out of sync at the arbiter", PhaseStarting, "-"},
	{PhaseStarting, "standby lost granted", PhaseStarting, "SetFence,ReleaseAll"},
	{PhaseStarting, "paused", PhaseSelfFenced, "-"},
	{PhaseStarting, "pause failed", PhaseStarting, "-"},
	{PhaseStarting, "resumed", PhaseStarting, "-"},

	{PhaseConnecting, "tick", PhaseUnprotected, "ReleaseAll"},
	{PhaseConnecting, "tick renew due", PhaseUnprotected, "Renew,ReleaseAll"},
	{PhaseConnecting, "tick acked", PhaseProtected, "ReportSynced"},
	{PhaseConnecting, "tick standby silent", PhaseUnprotected, "ReleaseAll"},
	{PhaseConnecting, "tick arbiter and standby silent", PhaseUnprotected, "ReleaseAll"},
	{PhaseConnecting, "tick arbiter silent", PhaseUnprotected, "ReleaseAll"},
	{PhaseConnecting, "tick lease expired", PhaseUnprotected, "Pause,Renew,ReleaseAll"},
	{PhaseConnecting, "registered in sync", PhaseConnecting, "-"},
	{PhaseConnecting, "registered not in sync", PhaseConnecting, "SetFence"},
	{PhaseConnecting, "renewed", PhaseConnecting, "-"},
	{PhaseConnecting, "renewed too late", PhaseConnecting, "-"},
	{PhaseConnecting, "superseded", PhaseFenced, "DestroyCopy,Persist,OfferStandby"},
	{PhaseConnecting, "fence moved", PhaseConnecting, "SetFence"},
	{PhaseConnecting, "arbiter failed", PhaseConnecting, "-"},
	{PhaseConnecting, "synced reported", PhaseConnecting, "-"},
	{PhaseConnecting, "out of sync at the arbiter", PhaseConnecting, "-"},
	{PhaseConnecting, "standby lost granted", PhaseUnprotected, "SetFence,ReleaseAll"},
	{PhaseConnecting, "paused", PhaseSelfFenced, "-"},
	{PhaseConnecting, "pause failed", PhaseConnecting, "-"},
	{PhaseConnecting, "resumed", PhaseConnecting, "-"},

	// Syncing: a standby not in sync at the arbiter is let go once silent a
	// detector timeout (counted from the session's start).
	{PhaseSyncing, "tick", PhaseSyncing, "-"},
	{PhaseSyncing, "tick renew due", PhaseUnprotected, "Renew,ReleaseAll"},
	{PhaseSyncing, "tick acked", PhaseProtected, "ReportSynced"},
	{PhaseSyncing, "tick standby silent", PhaseSyncing, "-"},
	{PhaseSyncing, "tick arbiter and standby silent", PhaseSyncing, "-"},
	{PhaseSyncing, "tick arbiter silent", PhaseSyncing, "-"},
	{PhaseSyncing, "tick lease expired", PhaseUnprotected, "Pause,Renew,ReleaseAll"},
	{PhaseSyncing, "registered in sync", PhaseSyncing, "-"},
	{PhaseSyncing, "registered not in sync", PhaseSyncing, "SetFence"},
	{PhaseSyncing, "renewed", PhaseSyncing, "-"},
	{PhaseSyncing, "renewed too late", PhaseSyncing, "-"},
	{PhaseSyncing, "superseded", PhaseFenced, "DestroyCopy,Persist,OfferStandby"},
	{PhaseSyncing, "fence moved", PhaseSyncing, "SetFence"},
	{PhaseSyncing, "arbiter failed", PhaseSyncing, "-"},
	{PhaseSyncing, "synced reported", PhaseSyncing, "-"},
	{PhaseSyncing, "out of sync at the arbiter", PhaseSyncing, "-"},
	{PhaseSyncing, "standby lost granted", PhaseUnprotected, "SetFence,ReleaseAll"},
	{PhaseSyncing, "paused", PhaseSelfFenced, "-"},
	{PhaseSyncing, "pause failed", PhaseSyncing, "-"},
	{PhaseSyncing, "resumed", PhaseSyncing, "-"},

	{PhaseProtected, "tick", PhaseProtected, "-"},
	{PhaseProtected, "tick renew due", PhaseDegraded, "Renew"},
	{PhaseProtected, "tick acked", PhaseProtected, "-"},
	{PhaseProtected, "tick standby silent", PhaseDegraded, "-"},
	{PhaseProtected, "tick arbiter and standby silent", PhaseDegraded, "Pause"},
	{PhaseProtected, "tick arbiter silent", PhaseProtected, "-"},
	{PhaseProtected, "tick lease expired", PhaseDegraded, "Pause,Renew"},
	{PhaseProtected, "registered in sync", PhaseProtected, "-"},
	{PhaseProtected, "registered not in sync", PhaseProtected, "SetFence"},
	{PhaseProtected, "renewed", PhaseProtected, "-"},
	{PhaseProtected, "renewed too late", PhaseProtected, "-"},
	{PhaseProtected, "superseded", PhaseFenced, "DestroyCopy,Persist,OfferStandby"},
	{PhaseProtected, "fence moved", PhaseProtected, "SetFence"},
	{PhaseProtected, "arbiter failed", PhaseProtected, "-"},
	{PhaseProtected, "synced reported", PhaseProtected, "-"},
	{PhaseProtected, "out of sync at the arbiter", PhaseProtected, "-"},
	{PhaseProtected, "standby lost granted", PhaseUnprotected, "SetFence,ReleaseAll"},
	{PhaseProtected, "paused", PhaseSelfFenced, "-"},
	{PhaseProtected, "pause failed", PhaseProtected, "-"},
	{PhaseProtected, "resumed", PhaseProtected, "-"},

	// Degraded with a standby in sync: only the arbiter may let the output go.
	{PhaseDegraded, "tick", PhaseDegraded, "ReportStandbyLost"},
	{PhaseDegraded, "tick renew due", PhaseDegraded, "Renew"},
	{PhaseDegraded, "tick acked", PhaseProtected, "-"},
	{PhaseDegraded, "tick standby silent", PhaseDegraded, "ReportStandbyLost"},
	{PhaseDegraded, "tick arbiter and standby silent", PhaseDegraded, "Pause,ReportStandbyLost"},
	{PhaseDegraded, "tick arbiter silent", PhaseDegraded, "Pause,ReportStandbyLost"},
	{PhaseDegraded, "tick lease expired", PhaseDegraded, "Pause,Renew"},
	{PhaseDegraded, "registered in sync", PhaseDegraded, "-"},
	{PhaseDegraded, "registered not in sync", PhaseDegraded, "SetFence"},
	{PhaseDegraded, "renewed", PhaseDegraded, "-"},
	{PhaseDegraded, "renewed too late", PhaseDegraded, "-"},
	{PhaseDegraded, "superseded", PhaseFenced, "DestroyCopy,Persist,OfferStandby"},
	{PhaseDegraded, "fence moved", PhaseDegraded, "SetFence"},
	{PhaseDegraded, "arbiter failed", PhaseDegraded, "-"},
	{PhaseDegraded, "synced reported", PhaseDegraded, "-"},
	{PhaseDegraded, "out of sync at the arbiter", PhaseDegraded, "-"},
	{PhaseDegraded, "standby lost granted", PhaseUnprotected, "SetFence,ReleaseAll"},
	{PhaseDegraded, "paused", PhaseSelfFenced, "-"},
	{PhaseDegraded, "pause failed", PhaseDegraded, "-"},
	{PhaseDegraded, "resumed", PhaseDegraded, "-"},

	// Unprotected: holding resumes once an epoch cut after the release is
	// acknowledged; until then what each cut holds is let go at the tick.
	{PhaseUnprotected, "tick", PhaseUnprotected, "KeepOutputFree"},
	{PhaseUnprotected, "tick renew due", PhaseUnprotected, "Renew,KeepOutputFree"},
	{PhaseUnprotected, "tick acked", PhaseProtected, "ReportSynced"},
	{PhaseUnprotected, "tick standby silent", PhaseUnprotected, "KeepOutputFree"},
	{PhaseUnprotected, "tick arbiter and standby silent", PhaseUnprotected, "KeepOutputFree"},
	{PhaseUnprotected, "tick arbiter silent", PhaseUnprotected, "KeepOutputFree"},
	{PhaseUnprotected, "tick lease expired", PhaseUnprotected, "Pause,Renew,KeepOutputFree"},
	{PhaseUnprotected, "registered in sync", PhaseUnprotected, "-"},
	{PhaseUnprotected, "registered not in sync", PhaseUnprotected, "SetFence"},
	{PhaseUnprotected, "renewed", PhaseUnprotected, "-"},
	{PhaseUnprotected, "renewed too late", PhaseUnprotected, "-"},
	{PhaseUnprotected, "superseded", PhaseFenced, "DestroyCopy,Persist,OfferStandby"},
	{PhaseUnprotected, "fence moved", PhaseUnprotected, "SetFence"},
	{PhaseUnprotected, "arbiter failed", PhaseUnprotected, "-"},
	{PhaseUnprotected, "synced reported", PhaseUnprotected, "-"},
	{PhaseUnprotected, "out of sync at the arbiter", PhaseUnprotected, "-"},
	{PhaseUnprotected, "standby lost granted", PhaseUnprotected, "SetFence,ReleaseAll"},
	{PhaseUnprotected, "paused", PhaseSelfFenced, "-"},
	{PhaseUnprotected, "pause failed", PhaseUnprotected, "-"},
	{PhaseUnprotected, "resumed", PhaseUnprotected, "-"},

	// Self-fenced: only a lease valid now resumes the guest.
	{PhaseSelfFenced, "tick", PhaseSelfFenced, "Renew"},
	{PhaseSelfFenced, "tick renew due", PhaseSelfFenced, "Renew"},
	{PhaseSelfFenced, "tick acked", PhaseSelfFenced, "Renew"},
	{PhaseSelfFenced, "tick standby silent", PhaseSelfFenced, "Renew"},
	{PhaseSelfFenced, "tick arbiter and standby silent", PhaseSelfFenced, "Renew"},
	{PhaseSelfFenced, "tick arbiter silent", PhaseSelfFenced, "Renew"},
	{PhaseSelfFenced, "tick lease expired", PhaseSelfFenced, "Renew"},
	{PhaseSelfFenced, "registered in sync", PhaseSelfFenced, "Resume"},
	{PhaseSelfFenced, "registered not in sync", PhaseSelfFenced, "SetFence,Resume"},
	{PhaseSelfFenced, "renewed", PhaseSelfFenced, "Resume"},
	{PhaseSelfFenced, "renewed too late", PhaseSelfFenced, "-"},
	{PhaseSelfFenced, "superseded", PhaseFenced, "DestroyCopy,Persist,OfferStandby"},
	{PhaseSelfFenced, "fence moved", PhaseSelfFenced, "SetFence"},
	{PhaseSelfFenced, "arbiter failed", PhaseSelfFenced, "-"},
	{PhaseSelfFenced, "synced reported", PhaseSelfFenced, "-"},
	{PhaseSelfFenced, "out of sync at the arbiter", PhaseSelfFenced, "-"},
	{PhaseSelfFenced, "standby lost granted", PhaseSelfFenced, "SetFence,Resume,ReleaseAll"},
	{PhaseSelfFenced, "paused", PhaseSelfFenced, "-"},
	{PhaseSelfFenced, "pause failed", PhaseSelfFenced, "-"},
	{PhaseSelfFenced, "resumed", PhaseDegraded, "-"},

	// Fenced: the copy is gone; nothing revives it.
	{PhaseFenced, "tick", PhaseFenced, "-"},
	{PhaseFenced, "tick renew due", PhaseFenced, "-"},
	{PhaseFenced, "tick acked", PhaseFenced, "-"},
	{PhaseFenced, "tick standby silent", PhaseFenced, "-"},
	{PhaseFenced, "tick arbiter and standby silent", PhaseFenced, "-"},
	{PhaseFenced, "tick arbiter silent", PhaseFenced, "-"},
	{PhaseFenced, "tick lease expired", PhaseFenced, "-"},
	{PhaseFenced, "registered in sync", PhaseFenced, "-"},
	{PhaseFenced, "registered not in sync", PhaseFenced, "SetFence"},
	{PhaseFenced, "renewed", PhaseFenced, "-"},
	{PhaseFenced, "renewed too late", PhaseFenced, "-"},
	{PhaseFenced, "superseded", PhaseFenced, "-"},
	{PhaseFenced, "fence moved", PhaseFenced, "SetFence"},
	{PhaseFenced, "arbiter failed", PhaseFenced, "-"},
	{PhaseFenced, "synced reported", PhaseFenced, "-"},
	{PhaseFenced, "out of sync at the arbiter", PhaseFenced, "-"},
	{PhaseFenced, "standby lost granted", PhaseFenced, "SetFence,ReleaseAll"},
	{PhaseFenced, "paused", PhaseFenced, "-"},
	{PhaseFenced, "pause failed", PhaseFenced, "-"},
	{PhaseFenced, "resumed", PhaseFenced, "-"},
}

// standbyTable is every (phase, event) pair of a standby.
var standbyTable = []transition{
	{"syncing", "tick", "syncing", "-"},
	{"syncing", "tick renew due", "syncing", "-"},
	{"syncing", "tick primary silent", "syncing", "-"},
	{"syncing", "tick primary back", "syncing", "-"},
	{"syncing", "tick shell died", "syncing", "-"},
	{"syncing", "tick synced", "protected", "-"},
	{"syncing", "tick lease expired", "syncing", "-"},
	{"syncing", "registered", "syncing", "-"},
	{"syncing", "renewed", "syncing", "-"},
	{"syncing", "superseded", "syncing", "SetFence"},
	{"syncing", "fence moved", "syncing", "SetFence"},
	{"syncing", "arbiter failed", "syncing", "-"},
	{"syncing", "promotion granted", "failing-over", "Failover"},
	{"syncing", "failover started", "failing-over", "-"},
	{"syncing", "failover done", "syncing", "-"},
	{"syncing", "failover failed, retryable", "syncing", "-"},
	{"syncing", "failover refused", "syncing", "-"},
	{"syncing", "failover rolled back", "syncing", "-"},
	{"syncing", "paused", "syncing", "-"},
	{"syncing", "resumed", "syncing", "-"},
	{"protected", "tick", "protected", "-"},
	{"protected", "tick renew due", "protected", "-"},
	{"protected", "tick primary silent", "degraded", "RequestPromotion"},
	{"protected", "tick primary back", "protected", "-"},
	{"protected", "tick shell died", "shell-lost", "DropShell"},
	{"protected", "tick synced", "protected", "-"},
	{"protected", "tick lease expired", "protected", "-"},
	{"protected", "registered", "protected", "-"},
	{"protected", "renewed", "protected", "-"},
	{"protected", "superseded", "protected", "SetFence"},
	{"protected", "fence moved", "protected", "SetFence"},
	{"protected", "arbiter failed", "protected", "-"},
	{"protected", "promotion granted", "failing-over", "Failover"},
	{"protected", "failover started", "failing-over", "-"},
	{"protected", "failover done", "protected", "-"},
	{"protected", "failover failed, retryable", "protected", "-"},
	{"protected", "failover refused", "protected", "-"},
	{"protected", "failover rolled back", "protected", "-"},
	{"protected", "paused", "protected", "-"},
	{"protected", "resumed", "protected", "-"},
	{"degraded", "tick", "degraded", "RequestPromotion"},
	{"degraded", "tick renew due", "degraded", "RequestPromotion"},
	{"degraded", "tick primary silent", "degraded", "RequestPromotion"},
	{"degraded", "tick primary back", "protected", "-"},
	{"degraded", "tick shell died", "shell-lost", "DropShell"},
	{"degraded", "tick synced", "degraded", "RequestPromotion"},
	{"degraded", "tick lease expired", "degraded", "RequestPromotion"},
	{"degraded", "registered", "degraded", "-"},
	{"degraded", "renewed", "degraded", "-"},
	{"degraded", "superseded", "degraded", "SetFence"},
	{"degraded", "fence moved", "degraded", "SetFence"},
	{"degraded", "arbiter failed", "degraded", "-"},
	{"degraded", "promotion granted", "failing-over", "Failover"},
	{"degraded", "failover started", "failing-over", "-"},
	{"degraded", "failover done", "degraded", "-"},
	{"degraded", "failover failed, retryable", "degraded", "-"},
	{"degraded", "failover refused", "degraded", "-"},
	{"degraded", "failover rolled back", "degraded", "-"},
	{"degraded", "paused", "degraded", "-"},
	{"degraded", "resumed", "degraded", "-"},
	{"failing-over", "tick", "failing-over", "-"},
	{"failing-over", "tick renew due", "failing-over", "-"},
	{"failing-over", "tick primary silent", "failing-over", "-"},
	{"failing-over", "tick primary back", "failing-over", "-"},
	{"failing-over", "tick shell died", "failing-over", "-"},
	{"failing-over", "tick synced", "failing-over", "-"},
	{"failing-over", "tick lease expired", "failing-over", "-"},
	{"failing-over", "registered", "failing-over", "-"},
	{"failing-over", "renewed", "failing-over", "-"},
	{"failing-over", "superseded", "failing-over", "SetFence"},
	{"failing-over", "fence moved", "failing-over", "SetFence"},
	{"failing-over", "arbiter failed", "failing-over", "-"},
	{"failing-over", "promotion granted", "failing-over", "-"},
	{"failing-over", "failover started", "failing-over", "-"},
	{"failing-over", "failover done", "failed-over", "Persist"},
	{"failing-over", "failover failed, retryable", "failing-over", "-"},
	{"failing-over", "failover refused", "protected", "-"},
	{"failing-over", "failover rolled back", "shell-lost", "-"},
	{"failing-over", "paused", "failing-over", "-"},
	{"failing-over", "resumed", "failing-over", "-"},
	{"failed-over", "tick", "failed-over", "-"},
	{"failed-over", "tick renew due", "failed-over", "Renew"},
	{"failed-over", "tick primary silent", "failed-over", "-"},
	{"failed-over", "tick primary back", "failed-over", "-"},
	{"failed-over", "tick shell died", "failed-over", "-"},
	{"failed-over", "tick synced", "failed-over", "-"},
	{"failed-over", "tick lease expired", "failed-over", "Pause,Renew"},
	{"failed-over", "registered", "failed-over", "-"},
	{"failed-over", "renewed", "failed-over", "-"},
	{"failed-over", "superseded", "fenced", "DestroyCopy,Persist"},
	{"failed-over", "fence moved", "failed-over", "SetFence"},
	{"failed-over", "arbiter failed", "failed-over", "-"},
	{"failed-over", "promotion granted", "failed-over", "-"},
	{"failed-over", "failover started", "failed-over", "-"},
	{"failed-over", "failover done", "failed-over", "-"},
	{"failed-over", "failover failed, retryable", "failed-over", "-"},
	{"failed-over", "failover refused", "failed-over", "-"},
	{"failed-over", "failover rolled back", "failed-over", "-"},
	{"failed-over", "paused", "self-fenced", "-"},
	{"failed-over", "resumed", "failed-over", "-"},
	{"shell-lost", "tick", "shell-lost", "-"},
	{"shell-lost", "tick renew due", "shell-lost", "-"},
	{"shell-lost", "tick primary silent", "shell-lost", "-"},
	{"shell-lost", "tick primary back", "shell-lost", "-"},
	{"shell-lost", "tick shell died", "shell-lost", "-"},
	{"shell-lost", "tick synced", "protected", "-"},
	{"shell-lost", "tick lease expired", "shell-lost", "-"},
	{"shell-lost", "registered", "shell-lost", "-"},
	{"shell-lost", "renewed", "shell-lost", "-"},
	{"shell-lost", "superseded", "shell-lost", "SetFence"},
	{"shell-lost", "fence moved", "shell-lost", "SetFence"},
	{"shell-lost", "arbiter failed", "shell-lost", "-"},
	{"shell-lost", "promotion granted", "failing-over", "Failover"},
	{"shell-lost", "failover started", "failing-over", "-"},
	{"shell-lost", "failover done", "shell-lost", "-"},
	{"shell-lost", "failover failed, retryable", "shell-lost", "-"},
	{"shell-lost", "failover refused", "shell-lost", "-"},
	{"shell-lost", "failover rolled back", "shell-lost", "-"},
	{"shell-lost", "paused", "shell-lost", "-"},
	{"shell-lost", "resumed", "shell-lost", "-"},
	{"fenced", "tick", "fenced", "-"},
	{"fenced", "tick renew due", "fenced", "-"},
	{"fenced", "tick primary silent", "fenced", "-"},
	{"fenced", "tick primary back", "fenced", "-"},
	{"fenced", "tick shell died", "fenced", "-"},
	{"fenced", "tick synced", "fenced", "-"},
	{"fenced", "tick lease expired", "fenced", "-"},
	{"fenced", "registered", "fenced", "-"},
	{"fenced", "renewed", "fenced", "-"},
	{"fenced", "superseded", "fenced", "-"},
	{"fenced", "fence moved", "fenced", "-"},
	{"fenced", "arbiter failed", "fenced", "-"},
	{"fenced", "promotion granted", "fenced", "-"},
	{"fenced", "failover started", "fenced", "-"},
	{"fenced", "failover done", "fenced", "-"},
	{"fenced", "failover failed, retryable", "fenced", "-"},
	{"fenced", "failover refused", "fenced", "-"},
	{"fenced", "failover rolled back", "fenced", "-"},
	{"fenced", "paused", "fenced", "-"},
	{"fenced", "resumed", "fenced", "-"},
}

func runTable(t *testing.T, role string, phases []Phase, table []transition, events []event, in func(Phase) *Machine) {
	t.Helper()
	byName := map[string]event{}
	for _, e := range events {
		byName[e.name] = e
	}
	seen := map[string]bool{}
	for _, tr := range table {
		key := string(tr.phase) + "/" + tr.event
		if seen[key] {
			t.Errorf("%s: %s listed twice", role, key)
		}
		seen[key] = true
		e, ok := byName[tr.event]
		if !ok {
			t.Fatalf("%s: no event %q", role, tr.event)
		}
		m := in(tr.phase)
		acts := m.Step(e.make(m))
		if got, gotActs := m.Phase(), actionNames(acts); got != tr.next || gotActs != tr.acts {
			t.Errorf("%s %s + %s: -> %s ordering %s, want %s ordering %s", role, tr.phase, tr.event, got, gotActs, tr.next, tr.acts)
		}
	}
	for _, p := range phases {
		for _, e := range events {
			if !seen[string(p)+"/"+e.name] {
				m := in(p)
				acts := m.Step(e.make(m))
				t.Errorf("%s: pair %s + %s not in the table: {%q, %q, %q, %q},", role, p, e.name, p, e.name, m.Phase(), actionNames(acts))
			}
		}
	}
}

var (
	primaryPhases = []Phase{PhaseStarting, PhaseConnecting, PhaseSyncing, PhaseProtected, PhaseDegraded, PhaseUnprotected, PhaseSelfFenced, PhaseFenced}
	standbyPhases = []Phase{PhaseReplicaSyncing, PhaseReplica, PhaseSuspecting, PhaseFailingOver, PhasePromoted, PhaseShellLost, PhaseFenced}
)

func TestPrimaryMachineTable(t *testing.T) {
	runTable(t, "primary", primaryPhases, primaryTable, primaryEvents, primaryIn)
}

func TestStandbyMachineTable(t *testing.T) {
	runTable(t, "standby", standbyPhases, standbyTable, standbyEvents, standbyIn)
}

// steps feeds events in order and returns every action ordered.
func steps(m *Machine, evs ...Event) string {
	var all []Action
	for _, ev := range evs {
		all = append(all, m.Step(ev)...)
	}
	return actionNames(all)
}

// A restarted primary's agent whose previous self died mid-checkpoint
// leaves the guest paused and its output held until the arbiter confirms
// it is still the primary; with the standby in sync at the arbiter, a
// silent standby is reported, never let go of on the agent's own say.
func TestRestartedPrimaryWaitsForTheArbiter(t *testing.T) {
	m := NewPrimary(testSettings(), 3, true, false)
	silent := func(d time.Duration) Event {
		return Tick{Observation{Now: t0.Add(d), Engine: checkpoint.StateConnecting, Started: 5}}
	}
	if got := steps(m, silent(0)); got != "Register" {
		t.Fatalf("first tick ordered %s, want Register only", got)
	}
	for i := 1; i < 50; i++ {
		if got := steps(m, silent(time.Duration(i)*100*time.Millisecond)); got != "-" {
			t.Fatalf("before the arbiter answered, tick %d ordered %s", i, got)
		}
	}
	l := lease(3, t0.Add(8*time.Second))
	got := steps(m, Registered{Now: t0.Add(5 * time.Second), Reg: arbiter.Registration{Epoch: 3, Role: arbiter.RolePrimary, InSync: true, Lease: &l}},
		silent(5*time.Second+10*time.Millisecond))
	if got != "Resume" {
		t.Fatalf("after the registration: %s, want Resume", got)
	}
	got = steps(m, silent(6*time.Second), Renewed{Now: t0.Add(6 * time.Second), Lease: lease(3, t0.Add(9*time.Second))},
		silent(6500*time.Millisecond), silent(7*time.Second))
	if strings.Contains(got, "ReleaseAll") || !strings.Contains(got, "ReportStandbyLost") {
		t.Fatalf("standby in sync and silent: %s, want it reported to the arbiter and the output held", got)
	}
	// Negative control: the same run with the standby out of sync at the
	// arbiter lets the output go, which the check above would catch.
	m = NewPrimary(testSettings(), 3, true, false)
	steps(m, silent(0))
	got = steps(m, Registered{Now: t0, Reg: arbiter.Registration{Epoch: 3, Role: arbiter.RolePrimary, Lease: &l}}, silent(2*time.Second))
	if !strings.Contains(got, "ReleaseAll") {
		t.Fatalf("negative control: a standby out of sync must not hold the output (got %s)", got)
	}
}

// A standby that learns a higher fence from its primary registers again,
// or the arbiter refuses its promotion forever.
func TestStandbyReregistersOnNewFence(t *testing.T) {
	m := standbyIn(PhaseReplica)
	if got := steps(m, FenceMoved{Fence: 7}); got != "SetFence" {
		t.Fatalf("fence moved: %s", got)
	}
	if got := steps(m, tick(m, 10*time.Millisecond, nil)); got != "Register" {
		t.Fatalf("next tick: %s, want Register", got)
	}
	if m.Fence != 7 {
		t.Fatalf("fence %d", m.Fence)
	}
}

// A self-fenced guest stays paused when a renewal comes back after the
// lease it renewed ran out.
func TestLateRenewalDoesNotUnfence(t *testing.T) {
	m := primaryIn(PhaseSelfFenced)
	if got := steps(m, Renewed{Now: t0, Lease: lease(3, t0.Add(-time.Millisecond))}); got != "-" {
		t.Fatalf("late renewal ordered %s", got)
	}
	if got := steps(m, Renewed{Now: t0, Lease: lease(3, t0.Add(time.Second))}); got != "Resume" {
		t.Fatalf("timely renewal ordered %s, want Resume", got)
	}
	// Still paused until the resume is confirmed.
	if m.Phase() != PhaseSelfFenced {
		t.Fatal(m.Phase())
	}
	steps(m, Resumed{})
	if m.Phase() == PhaseSelfFenced {
		t.Fatal("still self-fenced after the resume")
	}
}

// A failed pause is retried on the next tick; the guest does not count as
// fenced before QEMU confirmed the stop.
func TestFailedPauseRetried(t *testing.T) {
	m := primaryIn(PhaseDegraded)
	m.InSync = false
	m.OutputFree = true // output flows: the pause is what fences
	at := func(d time.Duration) Event {
		return tick(m, d, func(o *Observation) { o.LastAck = t0.Add(-5 * time.Second) })
	}
	if got := steps(m, at(2500*time.Millisecond)); !strings.HasPrefix(got, "Pause") {
		t.Fatalf("lease expired: %s", got)
	}
	steps(m, Paused{Err: errors.New("QMP timeout")})
	if m.SelfFenced {
		t.Fatal("counted as fenced after a failed stop")
	}
	if got := steps(m, at(2525*time.Millisecond)); !strings.HasPrefix(got, "Pause") {
		t.Fatalf("no retry: %s", got)
	}
}

// The stale copy of a promoted guest is destroyed, never resumed.
func TestPromotedGuestSupersededIsDestroyed(t *testing.T) {
	m := standbyIn(PhasePromoted)
	if got := steps(m, Superseded{Fence: 9, Primary: "host-c"}); got != "DestroyCopy,Persist" {
		t.Fatal(got)
	}
	if got := steps(m, tick(m, 3*time.Second, nil), Renewed{Now: t0, Lease: lease(9, t0.Add(time.Minute))}); got != "-" {
		t.Fatalf("fenced copy: %s", got)
	}
}

// A resync after a restart (standby in sync at the arbiter, the engine
// syncing for a while) neither reports the standby lost nor lets the
// output go: the standby is making progress.
func TestResyncIsNotALostStandby(t *testing.T) {
	m := primaryIn(PhaseProtected)
	m.NextRenew = t0.Add(time.Hour)
	m.Lease = lease(3, t0.Add(time.Hour))
	var got []string
	for d := 10 * time.Millisecond; d < 5*time.Second; d += 250 * time.Millisecond {
		got = append(got, steps(m, tick(m, d, func(o *Observation) {
			o.Engine, o.ConnectedSince, o.LastAck = checkpoint.StateSyncing, t0, t0.Add(-time.Minute)
		})))
	}
	if s := strings.Join(got, " "); strings.Contains(s, "ReportStandbyLost") || strings.Contains(s, "ReleaseAll") {
		t.Fatalf("during a resync: %s", s)
	}
	if m.Phase() != PhaseSyncing {
		t.Fatal(m.Phase())
	}
	// Negative control: the same silence without a sync under way is reported.
	if s := steps(m, tick(m, 5*time.Second, func(o *Observation) { o.Engine = checkpoint.StateDegraded }),
		tick(m, 6500*time.Millisecond, func(o *Observation) { o.Engine = checkpoint.StateDegraded })); !strings.Contains(s, "ReportStandbyLost") {
		t.Fatalf("negative control: a silent standby not syncing must be reported (got %s)", s)
	}
}

// An arbiter that lost its state answers "unknown guest" or "recovering":
// the agent registers again, no sooner than the arbiter said.
func TestArbiterLostStateReregisters(t *testing.T) {
	m := primaryIn(PhaseProtected)
	steps(m, ArbiterFailed{Now: t0, Call: "renew", Err: errors.New("unknown guest"), Unregistered: true, RetryAfter: 2 * time.Second})
	if m.Phase() != PhaseStarting {
		t.Fatalf("phase %s, want starting (registering again, output held)", m.Phase())
	}
	if got := steps(m, tick(m, time.Second, nil)); got != "-" {
		t.Fatalf("asked again before the arbiter's retry hint: %s", got)
	}
	if got := steps(m, tick(m, 2500*time.Millisecond, nil)); got != "Register" {
		t.Fatalf("after the hint: %s, want Register", got)
	}
}

// An arbiter answer about an epoch this copy has already passed (the one
// an unenroll retired, seen while the next enrollment registered) does
// not destroy the copy; a higher one does.
func TestSupersededByAnOlderEpochIsIgnored(t *testing.T) {
	m := primaryIn(PhaseProtected)
	m.Fence = 4
	if got := steps(m, Superseded{Fence: 3}); got != "-" || m.Fenced {
		t.Fatalf("superseded at fence 3 while holding 4: %s (fenced %v)", got, m.Fenced)
	}
	if got := steps(m, Superseded{Fence: 5, Primary: "host-b"}); !strings.HasPrefix(got, "DestroyCopy") {
		t.Fatalf("superseded at fence 5: %s", got)
	}
}

// A new enrollment (no fence yet) that meets an earlier enrollment's
// record is refused, not destroyed: the guest running here may be the
// only copy.
func TestSupersededBeforeFirstRegistrationKeepsTheGuest(t *testing.T) {
	m := NewPrimary(Settings{Arbiter: true, HeartbeatTimeout: time.Second, RetryAfter: time.Second}, 0, false, false)
	if got := steps(m, Superseded{Fence: 2, Primary: "host-a"}); got != "-" || m.Fenced {
		t.Fatalf("superseded before the first registration: %s (fenced %v)", got, m.Fenced)
	}
	if !strings.Contains(m.Note, "unenroll it on host-a") {
		t.Fatalf("note does not say what to do: %q", m.Note)
	}
	// Negative control: once registered at a fence, a higher one supersedes.
	m.Fence, m.Registered = 1, true
	if got := steps(m, Superseded{Fence: 2, Primary: "host-a"}); !strings.HasPrefix(got, "DestroyCopy") {
		t.Fatalf("superseded at fence 2 while holding 1: %s", got)
	}
}

// A standby that registered again (its shell died, it restarted) is out of
// sync at the arbiter: the primary that had reported it synced learns so
// from the heartbeat and reports it again once it acknowledges, or the
// standby could never be promoted.
func TestOutOfSyncAtArbiterIsReportedAgain(t *testing.T) {
	m := primaryIn(PhaseProtected)
	if got := steps(m, tick(m, 10*time.Millisecond, nil)); strings.Contains(got, "ReportSynced") {
		t.Fatalf("in sync: reported again (%s)", got)
	}
	// Negative control: news about an older fence changes nothing.
	steps(m, OutOfSyncAtArbiter{Fence: 2})
	if !m.InSync {
		t.Fatal("an answer about fence 2 cleared in-sync at fence 3")
	}
	steps(m, OutOfSyncAtArbiter{Fence: 3})
	if got := steps(m, tick(m, 20*time.Millisecond, nil)); got != "ReportSynced" {
		t.Fatalf("after the arbiter counted the standby out of sync: %s, want ReportSynced", got)
	}
	steps(m, SyncedReported{})
	if got := steps(m, tick(m, 30*time.Millisecond, nil)); strings.Contains(got, "ReportSynced") {
		t.Fatalf("reported again after the arbiter agreed: %s", got)
	}
}

// A take-over (planned switchover) marks the replica failing over before
// the old primary's session ends, so its end is not taken for a death: no
// promotion is asked for. The lease confirmed after the start is kept.
func TestTakeOverAsksNoPromotion(t *testing.T) {
	m := standbyIn(PhaseReplica)
	if got := steps(m, FailoverStarted{Now: t0, Fence: 4}); got != "-" {
		t.Fatalf("take-over start: %s", got)
	}
	if got := steps(m, tick(m, time.Second, func(o *Observation) { o.Silent = true })); got != "-" {
		t.Fatalf("the old primary's session ended during the take-over: %s", got)
	}
	l := lease(4, t0.Add(time.Minute))
	if got := steps(m, FailoverStarted{Now: t0, Fence: 4, Lease: l}); got != "-" || m.Fence != 4 || m.LeaseDur != l.Duration {
		t.Fatalf("confirmed lease: %s, fence %d, lease %v", got, m.Fence, m.LeaseDur)
	}
	if got := steps(m, FailoverDone{Now: t0.Add(time.Second)}); got != "Persist" || m.Phase() != PhasePromoted {
		t.Fatalf("done: %s %s", got, m.Phase())
	}
	// Control: without the take-over, the same silence asks for promotion.
	c := standbyIn(PhaseReplica)
	if got := steps(c, tick(c, time.Second, func(o *Observation) { o.Silent = true })); got != "RequestPromotion" {
		t.Fatalf("control: %s", got)
	}
}

// A ReportSynced whose answer was lost may still have committed: the
// arbiter may count the standby in sync and promote it once it loses this
// primary (without waiting out the lease). So when that standby goes
// silent the primary asks the arbiter before its output goes free.
func TestLostSyncReportKeepsOutputHeld(t *testing.T) {
	run := func(lostAnswer bool) string {
		m := primaryIn(PhaseConnecting)
		m.NextRenew = t0.Add(time.Hour)
		m.Lease = lease(3, t0.Add(time.Hour))
		protected := func(o *Observation) {
			o.Engine, o.LastAck, o.ConnectedSince = checkpoint.StateProtected, o.Now.Add(-10*time.Millisecond), t0
		}
		if got := steps(m, tick(m, 10*time.Millisecond, protected)); got != "ReportSynced" {
			t.Fatalf("protected: %s, want ReportSynced", got)
		}
		if lostAnswer {
			steps(m, ArbiterFailed{Now: t0.Add(20 * time.Millisecond), Call: "report synced", Err: errors.New("connection reset")})
		} else {
			m.SyncReported = false // the negative control: never sent
			steps(m, CallDone{})
		}
		var got []string
		for d := 100 * time.Millisecond; d < 4*time.Second; d += 250 * time.Millisecond {
			got = append(got, steps(m, tick(m, d, func(o *Observation) {
				o.Engine, o.LastAck, o.ConnectedSince = checkpoint.StateDegraded, t0.Add(20*time.Millisecond), t0
			})))
		}
		return strings.Join(got, " ")
	}
	if s := run(true); strings.Contains(s, "ReleaseAll") || !strings.Contains(s, "ReportStandbyLost") {
		t.Fatalf("after a lost ReportSynced answer: %s, want ReportStandbyLost and no ReleaseAll", s)
	}
	if s := run(false); !strings.Contains(s, "ReleaseAll") {
		t.Fatalf("negative control: a standby never reported in sync lets output go (got %s)", s)
	}
}

// An acknowledgement that came after the ack window (it released output
// because the arbiter vouched then) says nothing of whether the standby
// suspects this primary now: it must not hold a self-fence off. The
// control: the same acknowledgement in time does.
func TestLateAckDoesNotHoldOffSelfFence(t *testing.T) {
	for _, timely := range []bool{false, true} {
		m := primaryIn(PhaseProtected)
		o := m.Obs
		o.Now = t0.Add(10 * time.Millisecond)
		o.LastAck, o.LastTimelyAck, o.ArbiterHeard = o.Now, o.Now.Add(-1500*time.Millisecond), o.Now.Add(-800*time.Millisecond)
		if timely {
			o.LastTimelyAck = o.LastAck
		}
		paused := false
		for _, a := range m.Step(Tick{o}) {
			if _, ok := a.(DoPause); ok {
				paused = true
			}
		}
		if paused == timely {
			t.Errorf("arbiter silent, last acknowledgement timely=%v: paused=%v, want %v", timely, paused, !timely)
		}
	}
}
