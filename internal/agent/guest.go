package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/remora-ha/remora/arbiter"
)

// guest is one guest on this agent, as primary or standby: its record, its
// state machine and the driver that runs the machine.
type guest struct {
	a    *Agent
	name string
	log  *slog.Logger

	mu    sync.Mutex
	rec   *Record
	m     *Machine
	probe *arbiter.ProbeStatus

	fence atomic.Uint64 // m.Fence, for readers that must not take mu
	// leaseUntil is when this primary's lease runs out (Unix ns; 0: no
	// lease, or fenced), for the replication engine, which must not take mu.
	leaseUntil atomic.Int64

	primary *primaryRun // exactly one of these is set
	standby *standbyRun

	events chan Event
	calls  chan Action // arbiter calls, made one at a time
	cancel context.CancelFunc
	done   chan struct{}
}

func newGuest(a *Agent, rec *Record, m *Machine) *guest {
	g := &guest{a: a, name: rec.Name, log: a.log.With("guest", rec.Name), rec: rec, m: m,
		events: make(chan Event, 16), calls: make(chan Action, 1), done: make(chan struct{})}
	g.fence.Store(m.Fence)
	return g
}

// start runs the driver until stop.
func (g *guest) start(observe func(now time.Time) Observation, tick time.Duration) {
	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); g.callLoop(ctx) }()
	go func() { defer wg.Done(); g.loop(ctx, observe, tick) }()
	go func() { wg.Wait(); close(g.done) }()
}

// stop ends the driver and waits for it.
func (g *guest) stop() {
	if g.cancel == nil {
		return
	}
	g.cancel()
	<-g.done
}

// post hands the driver an event; it never blocks the caller for long.
func (g *guest) post(ev Event) {
	select {
	case g.events <- ev:
	case <-g.done:
	case <-time.After(5 * time.Second):
		g.log.Error("driver did not take an event", "event", fmt.Sprintf("%T", ev))
	}
}

func (g *guest) loop(ctx context.Context, observe func(time.Time) Observation, every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		var ev Event
		select {
		case <-ctx.Done():
			return
		case ev = <-g.events:
		case now := <-tick.C:
			ev = Tick{observe(now)}
		}
		g.mu.Lock()
		before := g.m.Phase()
		acts := g.m.Step(ev)
		after := g.m.Phase()
		g.fence.Store(g.m.Fence)
		g.leaseUntil.Store(g.m.leaseUntil())
		g.mu.Unlock()
		if before != after {
			g.log.Info("guest state changed", "from", before, "to", after, "fence", g.fence.Load())
			g.a.journal.note(g.name, "state", fmt.Sprintf("%s -> %s", before, after), g.fence.Load())
		}
		for _, act := range acts {
			if IsArbiterCall(act) {
				select {
				case g.calls <- act:
				case <-ctx.Done():
					return
				}
				continue
			}
			g.do(ctx, act)
		}
	}
}

// callLoop makes the arbiter calls the machine orders, one at a time, and
// reports each answer as an event.
func (g *guest) callLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case act := <-g.calls:
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			ev := g.call(cctx, act)
			cancel()
			if ev == nil {
				continue
			}
			select {
			case g.events <- ev:
			case <-ctx.Done():
				return
			}
		}
	}
}

// call makes one arbiter call and turns its answer into an event.
func (g *guest) call(ctx context.Context, act Action) Event {
	a, arb := g.a, g.a.arb
	st := g.state()
	now := time.Now()
	var err error
	name := fmt.Sprintf("%T", act)
	switch act := act.(type) {
	case DoRegister:
		role := arbiter.RolePrimary
		if st.Role == Standby {
			role = arbiter.RoleStandby
		}
		g.mu.Lock()
		probe := g.rec.Probe
		g.mu.Unlock()
		spec := arbiter.GuestSpec{Guest: g.name, AgentID: a.cfg.AgentID, Role: role, Epoch: st.Fence, AgentAddr: a.cfg.Advertise}
		if role == arbiter.RolePrimary {
			// No fence yet: a new enrollment, which supersedes what the
			// arbiter remembers of an earlier one of this guest here.
			spec.Service, spec.Fresh = probe, act.Fresh
		}
		name = "register"
		var reg arbiter.Registration
		if reg, err = arb.Register(ctx, spec); err == nil {
			return Registered{Now: now, Reg: reg}
		}
	case DoOfferStandby:
		_, err = arb.Register(ctx, arbiter.GuestSpec{Guest: g.name, AgentID: a.cfg.AgentID, Role: arbiter.RoleStandby, Epoch: st.Fence, AgentAddr: a.cfg.Advertise})
		if err == nil {
			return CallDone{}
		}
		g.log.Warn("could not offer this host as the new standby", "err", err)
		return CallDone{}
	case DoRenew:
		name = "renew"
		var l arbiter.Lease
		if l, err = arb.Renew(ctx, g.name, a.cfg.AgentID, st.Fence); err == nil {
			return Renewed{Now: now, Lease: l}
		}
	case DoReportSynced:
		name = "report synced"
		standby := ""
		if p := g.primary; p != nil && p.engine != nil {
			standby = p.engine.Progress().Standby
		}
		if err = arb.ReportSynced(ctx, g.name, a.cfg.AgentID, st.Fence, standby); err == nil {
			return SyncedReported{}
		}
	case DoReportStandbyLost:
		name = "standby lost"
		var l arbiter.Lease
		if l, err = arb.ReportStandbyLost(ctx, g.name, a.cfg.AgentID, st.Fence); err == nil {
			g.log.Warn("standby lost: the arbiter agreed this primary continues unprotected", "fence", l.Epoch)
			return StandbyLostGranted{Now: now, Lease: l}
		}
	case DoRequestPromotion:
		name = "promotion"
		var gr arbiter.Grant
		if gr, err = arb.RequestPromotion(ctx, g.name, a.cfg.AgentID, st.Fence); err == nil {
			g.log.Warn("primary suspected and promotion granted: failing over", "fence", gr.Epoch, "previous_primary", gr.PreviousPrimary)
			return PromotionGranted{Now: now, Grant: gr}
		}
	}
	var ae *arbiter.Error
	if errors.As(err, &ae) && errors.Is(err, arbiter.ErrStaleEpoch) {
		if ae.Role == arbiter.RoleNone && (st.Role == Primary || st.Promoted) {
			return Superseded{Fence: ae.CurrentEpoch, Primary: ae.Primary}
		}
		if ae.CurrentEpoch > st.Fence {
			return FenceMoved{Fence: ae.CurrentEpoch}
		}
	}
	f := ArbiterFailed{Now: now, Call: name, Err: err, Unregistered: errors.Is(err, arbiter.ErrUnknownGuest)}
	if errors.As(err, &ae) && ae.RetryAfter > 0 {
		f.RetryAfter = ae.RetryAfter // the arbiter recovers its state, or a lease runs
	}
	return f
}

// do carries out one local action.
func (g *guest) do(ctx context.Context, act Action) {
	switch act := act.(type) {
	case DoPersist:
		g.mu.Lock()
		g.rec.Fence = g.m.Fence
		switch {
		case g.m.Fenced:
			g.rec.State = StateFenced
		case g.m.Promoted:
			g.rec.State = StateFailedOver
		}
		err := g.a.store.save(g.rec)
		g.mu.Unlock()
		if err != nil {
			g.log.Error("cannot record the guest's state", "err", err)
		}
	case DoSetFence:
		g.mu.Lock()
		g.rec.Fence = act.Fence
		err := g.a.store.save(g.rec)
		g.mu.Unlock()
		if err != nil {
			g.log.Error("cannot record fencing epoch", "fence", act.Fence, "err", err)
		}
		if p := g.primary; p != nil && p.engine != nil {
			p.engine.SetFence(act.Fence)
		}
	default:
		if g.primary != nil {
			g.primary.do(ctx, g, act)
		} else {
			g.standby.do(ctx, g, act)
		}
	}
}

// state returns a copy of the machine's state.
func (g *guest) state() State {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.m.State
}

func (g *guest) setProbe(p *arbiter.ProbeStatus) {
	g.mu.Lock()
	g.probe = p
	g.mu.Unlock()
}
