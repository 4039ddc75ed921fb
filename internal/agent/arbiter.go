package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
)

// coordView is what the arbiter last told the agent about one guest,
// shown in `vm status`.
type coordView struct {
	lease      arbiter.Lease
	leaseOK    bool
	synced     bool // ReportSynced sent for the current session
	unprotect  bool // the arbiter agreed the primary continues alone
	selfFenced bool
	note       string // the latest arbiter answer worth showing
	// outputFree: the guest's output flows unheld since the standby was
	// lost, until an epoch captured after resyncAfter is acknowledged.
	outputFree  bool
	resyncAfter uint64
	probe       *arbiter.ProbeStatus

	// The last automatic failover, for status and the failover benchmark.
	suspectedAt, grantedAt, restoredAt time.Time
}

type coordination struct {
	mu sync.Mutex
	v  coordView
}

func (c *coordination) set(f func(*coordView)) {
	c.mu.Lock()
	f(&c.v)
	c.mu.Unlock()
}

func (c *coordination) snapshot() coordView {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.v
}

func (a *Agent) dialArbiter(ctx context.Context, tlsClient *tls.Config) error {
	if a.cfg.Arbiter == "" {
		return nil
	}
	// The arbiter is dialled by address; its certificate is checked by chain.
	c, err := arbiter.NewClient(a.cfg.Arbiter, tlsClient.Clone())
	if err != nil {
		return err
	}
	a.arb = c
	return nil
}

func staleRole(err error) (*arbiter.Error, bool) {
	var ae *arbiter.Error
	if errors.As(err, &ae) && errors.Is(err, arbiter.ErrStaleEpoch) {
		return ae, true
	}
	return nil, false
}

// primaryCoordination keeps a protected guest's lease, reports its sync
// state and a lost standby, pauses the guest when it may no longer run
// (self-fence), and destroys it when a higher epoch shows it was replaced.
func (a *Agent) primaryCoordination(ctx context.Context, pg *primaryGuest) {
	if a.arb == nil {
		return
	}
	timeout := a.cfg.HeartbeatInterval * time.Duration(a.cfg.HeartbeatMissed)
	var reg arbiter.Registration
	for {
		var err error
		// No epoch yet: a new enrollment, which supersedes what the
		// arbiter remembers of an earlier one of this guest here.
		reg, err = a.arb.Register(ctx, arbiter.GuestSpec{Guest: pg.rec.Name, AgentID: a.cfg.AgentID, Role: arbiter.RolePrimary,
			Epoch: pg.rec.Fence, AgentAddr: a.cfg.Advertise, Service: pg.rec.Probe, Fresh: pg.rec.Fence == 0})
		if err == nil {
			break
		}
		if ae, ok := staleRole(err); ok && ae.Role == arbiter.RoleNone {
			a.fencedOut(pg, ae)
			return
		}
		pg.coord.set(func(c *coordView) { c.note = "register: " + err.Error() })
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
	a.adoptFence(pg, reg.Epoch)
	if reg.Lease != nil {
		pg.coord.set(func(c *coordView) { c.lease, c.leaseOK, c.note = *reg.Lease, true, "" })
	}
	renew := time.NewTicker(max(reg.Lease.Duration/3, 50*time.Millisecond))
	defer renew.Stop()
	// Self-fencing is checked often, and apart from the arbiter calls (which
	// block while the arbiter is unreachable): the guest must be paused
	// before the arbiter's copy of the lease runs out, which it does only a
	// drift margin later than ours.
	go func() {
		check := time.NewTicker(25 * time.Millisecond)
		defer check.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-check.C:
				if pg.rec.State == StateFenced {
					return
				}
				a.selfFenceCheck(pg, timeout)
			}
		}
	}()
	var downSince time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-renew.C:
		}
		fence := pg.engine.Fence()
		l, err := a.arb.Renew(ctx, pg.rec.Name, a.cfg.AgentID, fence)
		switch ae, stale := staleRole(err); {
		case err == nil:
			pg.coord.set(func(c *coordView) { c.lease, c.leaseOK, c.note = l, true, "" })
			if pg.vm.Fenced() {
				if err := pg.vm.Unfence(ctx); err != nil {
					a.log.Error("cannot resume self-fenced guest", "domain", pg.rec.Name, "err", err)
				} else {
					a.log.Warn("lease renewed: resuming the self-fenced guest", "domain", pg.rec.Name, "epoch", fence)
					pg.coord.set(func(c *coordView) { c.selfFenced = false })
				}
			}
		case stale && ae.Role == arbiter.RoleNone:
			a.fencedOut(pg, ae)
			return
		case stale:
			a.adoptFence(pg, ae.CurrentEpoch)
		default:
			pg.coord.set(func(c *coordView) { c.note = "renew: " + err.Error() })
		}

		st := pg.engine.Status()
		acking := time.Since(st.LastAck) < timeout
		if st.State == checkpoint.StateProtected && acking && st.Standby != "" && !pg.coord.snapshot().outputFree {
			// Repeated while protected: a standby that re-registers is out
			// of sync at the arbiter until the primary says otherwise.
			if err := a.arb.ReportSynced(ctx, pg.rec.Name, a.cfg.AgentID, pg.engine.Fence(), st.Standby); err == nil {
				pg.coord.set(func(c *coordView) { c.synced, c.unprotect = true, false })
			} else {
				pg.coord.set(func(c *coordView) { c.note = "report synced: " + err.Error() })
			}
		}
		if st.State == checkpoint.StateProtected && acking {
			downSince = time.Time{}
		} else if downSince.IsZero() {
			downSince = time.Now()
		}
		co := pg.coord.snapshot()
		if co.synced && !acking && time.Since(downSince) > timeout {
			// The standby stopped acknowledging: ask to continue alone.
			l, err := a.arb.ReportStandbyLost(ctx, pg.rec.Name, a.cfg.AgentID, pg.engine.Fence())
			if err == nil {
				a.log.Warn("standby lost: the arbiter agreed this primary continues unprotected", "domain", pg.rec.Name, "epoch", l.Epoch)
				a.adoptFence(pg, l.Epoch)
				pg.coord.set(func(c *coordView) { c.lease, c.leaseOK, c.synced, c.unprotect, c.note = l, true, false, true, "" })
				a.releaseOutput(pg, "the arbiter agreed the primary continues without its standby")
			} else if ae, stale := staleRole(err); stale && ae.Role == arbiter.RoleNone {
				a.fencedOut(pg, ae)
				return
			} else {
				pg.coord.set(func(c *coordView) { c.note = "standby lost: " + err.Error() })
			}
		}
	}
}

// selfFenceCheck pauses the guest when its lease has run out, unless the
// standby acknowledged an epoch within half the detector's timeout: a
// standby that hears from us does not suspect us, so it cannot be
// promoting. Half, so we stop before it could start.
func (a *Agent) selfFenceCheck(pg *primaryGuest, timeout time.Duration) {
	co := pg.coord.snapshot()
	if co.lease.Valid() || pg.vm.Fenced() {
		return
	}
	if time.Since(pg.engine.LastAck()) < timeout/2 {
		return
	}
	a.log.Error("self-fence: lease expired and the standby is silent; pausing the guest", "domain", pg.rec.Name, "epoch", pg.engine.Fence())
	ctx, cancel := context.WithTimeout(context.Background(), a.hbTimeout())
	defer cancel()
	if err := pg.vm.Fence(ctx); err != nil {
		a.log.Error("self-fence failed", "domain", pg.rec.Name, "err", err)
	}
	pg.coord.set(func(c *coordView) { c.selfFenced = true })
}

// adoptFence makes a new fencing epoch the one every frame carries and
// records it.
func (a *Agent) adoptFence(pg *primaryGuest, epoch uint64) {
	if epoch == pg.engine.Fence() {
		return
	}
	pg.engine.SetFence(epoch)
	a.mu.Lock()
	pg.rec.Fence = epoch
	a.mu.Unlock()
	if err := a.store.save(pg.rec); err != nil {
		a.log.Error("cannot record fencing epoch", "domain", pg.rec.Name, "err", err)
	}
}

// fencedOut handles a primary that learns the guest runs elsewhere at a
// higher epoch: its copy is destroyed at once so two never run.
func (a *Agent) fencedOut(pg *primaryGuest, ae *arbiter.Error) {
	a.log.Error("guest was promoted elsewhere: destroying this stale copy", "domain", pg.rec.Name,
		"our_epoch", pg.engine.Fence(), "current_epoch", ae.CurrentEpoch, "primary", ae.Primary)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = pg.vm.Fence(ctx)
	if pg.out != nil {
		// Output of epochs the standby never acknowledged must never leave.
		pg.out.DiscardAfter(pg.engine.Status().AckedEpoch)
	}
	if err := a.virt.Destroy(ctx, pg.rec.Name); err != nil {
		a.log.Error("cannot destroy the stale copy", "domain", pg.rec.Name, "err", err)
	}
	go func() { // not from this goroutine's own engine wait
		pg.stop()
		if pg.out != nil {
			_ = pg.out.Close()
		}
	}()
	a.mu.Lock()
	pg.rec.State = StateFenced
	pg.rec.Fence = ae.CurrentEpoch
	a.mu.Unlock()
	_ = a.store.save(pg.rec)
	pg.coord.set(func(c *coordView) {
		c.note = fmt.Sprintf("replaced by %s at epoch %d; local copy destroyed", ae.Primary, ae.CurrentEpoch)
	})
	// Offer this host as the new standby.
	if _, err := a.arb.Register(ctx, arbiter.GuestSpec{Guest: pg.rec.Name, AgentID: a.cfg.AgentID, Role: arbiter.RoleStandby,
		Epoch: ae.CurrentEpoch, AgentAddr: a.cfg.Advertise}); err != nil {
		a.log.Warn("could not offer this host as the new standby", "domain", pg.rec.Name, "err", err)
	}
}

// standbyCoordination watches the primary of a replica and, when the
// failure detector suspects it, asks the arbiter for promotion and fails
// over on a grant.
func (a *Agent) standbyCoordination(ctx context.Context, sg *standbyGuest) {
	if a.arb == nil {
		return
	}
	timeout := a.cfg.HeartbeatInterval * time.Duration(a.cfg.HeartbeatMissed)
	registered := false
	tick := time.NewTicker(a.cfg.HeartbeatInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		sg.mu.Lock()
		name, fence, state := sg.rec.Name, sg.rec.Fence, sg.rec.State
		silent := sg.session == nil || time.Since(sg.lastFrame) > timeout
		consistent := sg.replica != nil && sg.replica.Consistent() == nil
		sg.mu.Unlock()
		if state != "" {
			return // failed over (or failing over): the promoted guest has its own lease loop
		}
		if !registered {
			reg, err := a.arb.Register(ctx, arbiter.GuestSpec{Guest: name, AgentID: a.cfg.AgentID, Role: arbiter.RoleStandby, Epoch: fence, AgentAddr: a.cfg.Advertise})
			if ae, stale := staleRole(err); stale {
				sg.mu.Lock()
				sg.rec.Fence = max(sg.rec.Fence, ae.CurrentEpoch) // a newer epoch began while we were away
				sg.mu.Unlock()
			}
			if err != nil {
				sg.coord.set(func(c *coordView) { c.note = "register: " + err.Error() })
				continue
			}
			sg.mu.Lock()
			sg.rec.Fence = max(sg.rec.Fence, reg.Epoch)
			sg.mu.Unlock()
			registered = true
		}
		if !silent || !consistent {
			sg.coord.set(func(c *coordView) { c.suspectedAt = time.Time{} })
			continue
		}
		sg.coord.set(func(c *coordView) {
			if c.suspectedAt.IsZero() {
				c.suspectedAt = time.Now()
			}
		})
		g, err := a.arb.RequestPromotion(ctx, name, a.cfg.AgentID, fence)
		if err != nil {
			if ae, stale := staleRole(err); stale {
				sg.mu.Lock()
				sg.rec.Fence = max(sg.rec.Fence, ae.CurrentEpoch)
				sg.mu.Unlock()
				registered = false
			}
			sg.coord.set(func(c *coordView) { c.note = "promotion refused: " + err.Error() })
			continue
		}
		a.log.Warn("primary suspected and promotion granted: failing over", "domain", name, "epoch", g.Epoch, "previous_primary", g.PreviousPrimary)
		sg.coord.set(func(c *coordView) { c.grantedAt = time.Now() })
		res, err := a.failoverAt(ctx, name, true, g.Epoch)
		if err != nil {
			a.log.Error("automatic failover failed", "domain", name, "err", err)
			sg.coord.set(func(c *coordView) { c.note = "failover failed: " + err.Error() })
			continue
		}
		a.log.Info("automatic failover done", "domain", name, "epoch", res.Epoch, "fence", res.Fence, "took", res.Duration)
		sg.coord.set(func(c *coordView) { c.restoredAt = time.Now() })
		go a.promotedCoordination(ctx, sg, g.Lease)
		return
	}
}

// promotedCoordination keeps the lease of a guest this agent promoted; it
// runs unprotected, so it pauses the guest when the lease is lost.
func (a *Agent) promotedCoordination(ctx context.Context, sg *standbyGuest, lease arbiter.Lease) {
	sg.coord.set(func(c *coordView) { c.lease, c.leaseOK = lease, true })
	tick := time.NewTicker(max(lease.Duration/3, 50*time.Millisecond))
	defer tick.Stop()
	fenced := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		sg.mu.Lock()
		name, shell, fence := sg.rec.Name, sg.rec.Shell, sg.rec.Fence
		sg.mu.Unlock()
		l, err := a.arb.Renew(ctx, name, a.cfg.AgentID, fence)
		if err == nil {
			lease = l
			sg.coord.set(func(c *coordView) { c.lease, c.note = l, "" })
			if fenced {
				fenced = !a.contDomain(shell)
			}
			continue
		}
		sg.coord.set(func(c *coordView) { c.note = "renew: " + err.Error() })
		if ae, stale := staleRole(err); stale && ae.Role == arbiter.RoleNone {
			a.log.Error("promoted guest was replaced elsewhere: destroying it", "domain", name, "current_epoch", ae.CurrentEpoch)
			dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_ = a.virt.Destroy(dctx, shell)
			cancel()
			return
		}
		if !lease.Valid() && !fenced {
			a.log.Error("self-fence: lease of the promoted guest expired; pausing it", "domain", name)
			fenced = a.pauseDomain(shell)
			sg.coord.set(func(c *coordView) { c.selfFenced = fenced })
		}
	}
}

// arbiterHeartbeat tells the arbiter this agent is alive and learns epoch
// changes it missed (e.g. while it was cut off).
func (a *Agent) arbiterHeartbeat(ctx context.Context) {
	if a.arb == nil {
		return
	}
	tick := time.NewTicker(a.cfg.HeartbeatInterval)
	defer tick.Stop()
	n := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		epochs := map[string]uint64{}
		a.mu.Lock()
		prim := map[string]*primaryGuest{}
		for name, pg := range a.primary {
			if pg.rec.State == "" {
				epochs[name] = pg.engine.Fence()
				prim[name] = pg
			}
		}
		for name, sg := range a.standby {
			epochs[name] = sg.rec.Fence
		}
		a.mu.Unlock()
		as, err := a.arb.Heartbeat(ctx, a.cfg.AgentID, epochs)
		if err != nil {
			continue
		}
		for _, as := range as {
			if pg, ok := prim[as.Guest]; ok && as.Role == arbiter.RoleNone && as.Epoch > pg.engine.Fence() {
				a.fencedOut(pg, &arbiter.Error{Code: arbiter.CodeStaleEpoch, CurrentEpoch: as.Epoch, Primary: as.Primary, Role: arbiter.RoleNone})
			}
		}
		if n++; n%8 == 0 {
			a.refreshProbes(ctx)
		}
	}
}

// refreshProbes copies the arbiter's client-side probe results for status.
func (a *Agent) refreshProbes(ctx context.Context) {
	st, err := a.arb.Status(ctx)
	if err != nil {
		return
	}
	for _, g := range st.Guests {
		a.mu.Lock()
		var co *coordination
		if pg, ok := a.primary[g.Guest]; ok {
			co = &pg.coord
		} else if sg, ok := a.standby[g.Guest]; ok {
			co = &sg.coord
		}
		a.mu.Unlock()
		if co != nil && g.Service != nil {
			p := *g.Service
			co.set(func(c *coordView) { c.probe = &p })
		}
	}
}
