package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate/qemu"
)

// A planned switchover moves a protected guest to its standby with no
// loss: the primary pauses the guest, the standby acknowledges one more
// checkpoint taken of the paused guest, the arbiter makes the standby the
// primary at a new fencing epoch (the old primary's copy is stale from
// there), the standby restores that checkpoint and runs the guest. The
// old primary's copy is destroyed and its agent offers itself as the
// guest's new standby; the new primary re-protects the guest onto it
// (reprotect: auto) or an admin does (`remora vm reprotect`).

// errNotSwitchable: the guest cannot be switched over now.
var errNotSwitchable = errors.New("cannot switch over")

// Switchover moves guest name, protected from this host, to its standby.
func (a *Agent) Switchover(ctx context.Context, name string) (api.SwitchoverResult, error) {
	a.reprotectMu.Lock()
	defer a.reprotectMu.Unlock()
	return a.switchover(ctx, name)
}

func (a *Agent) switchover(ctx context.Context, name string) (api.SwitchoverResult, error) {
	g := a.guest(name)
	if g == nil {
		return api.SwitchoverResult{}, fmt.Errorf("guest %q: %w: see `remora vm status`", name, errNotEnrolled)
	}
	p := g.primary
	if p == nil {
		return api.SwitchoverResult{}, fmt.Errorf("guest %q %w from this host: it is a replica here; run the switchover on its primary's host", name, errNotSwitchable)
	}
	if a.arb == nil {
		return api.SwitchoverResult{}, fmt.Errorf("guest %q %w without an arbiter: the switchover moves its fencing epoch; without one, stop the guest, `remora vm failover --force` on the standby and unenroll here", name, errNotSwitchable)
	}
	st := g.state()
	if p.engine == nil || st.Fenced {
		return api.SwitchoverResult{}, fmt.Errorf("guest %q %w: this copy was superseded (%s)", name, errNotSwitchable, st.Note)
	}
	pr := p.engine.Progress()
	switch {
	case st.Phase() != PhaseProtected:
		return api.SwitchoverResult{}, fmt.Errorf("guest %q %w: it is %s, not protected: its standby must hold a recent checkpoint (see `remora vm status %s`)", name, errNotSwitchable, st.Phase(), name)
	case !st.InSync:
		return api.SwitchoverResult{}, fmt.Errorf("guest %q %w: the arbiter does not count its standby in sync yet; wait until `remora arbiter status` shows it in sync", name, errNotSwitchable)
	case pr.Standby == "":
		return api.SwitchoverResult{}, fmt.Errorf("guest %q %w: its standby's agent is not known yet", name, errNotSwitchable)
	}
	g.mu.Lock()
	peer := g.rec.Peer
	g.mu.Unlock()
	start := time.Now()
	g.log.Info("switchover: pausing the guest for its final checkpoint", "standby", pr.Standby, "fence", st.Fence)
	a.journal.note(name, "switchover", "begun: guest paused for its final checkpoint to "+pr.Standby, st.Fence)
	if err := p.vm.Fence(ctx); err != nil {
		return api.SwitchoverResult{}, fmt.Errorf("pause guest %q: %w", name, err)
	}
	back := func(err error) (api.SwitchoverResult, error) {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if uerr := p.vm.Unfence(rctx); uerr != nil {
			err = errors.Join(err, fmt.Errorf("resume the guest here: %w", uerr))
		}
		a.journal.note(name, "switchover", "abandoned; the guest runs on here: "+err.Error(), st.Fence)
		return api.SwitchoverResult{}, fmt.Errorf("switchover of %q abandoned, the guest runs on here: %w", name, err)
	}
	// The final checkpoint is the one that captured the guest paused: the
	// engine takes no more once the guest is held still.
	var final uint64
	wait := max(30*a.cfg.EpochInterval, 10*time.Second)
	for deadline := time.Now().Add(wait); ; {
		pr = p.engine.Progress()
		if final == 0 && p.vm.HeldStill() && pr.Captured == pr.Started {
			final = pr.Captured
		}
		if final != 0 && pr.Acked >= final {
			break
		}
		if time.Now().After(deadline) {
			return back(fmt.Errorf("the standby did not acknowledge a checkpoint of the paused guest within %s (final %d, acknowledged %d)", wait, final, pr.Acked))
		}
		select {
		case <-ctx.Done():
			return back(ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
	grant, err := a.arb.Handover(ctx, name, a.cfg.AgentID, st.Fence, pr.Standby)
	if err != nil {
		return back(fmt.Errorf("the arbiter refused the handover: %w", err))
	}
	// From here this copy is stale: never resume it. The engine keeps
	// its session (pings, the guest held still) until the standby, taking
	// over, ends it: a session that ended first would look like a dead
	// primary there.
	g.log.Info("switchover: the arbiter made the standby primary; it restores the final checkpoint", "standby", pr.Standby, "epoch", final, "fence", grant.Epoch)
	conn, err := a.dialPeer(ctx, peer, checkpoint.FrameMove, st.Fence, checkpoint.Move{Agent: a.cfg.AgentID, Guest: name, Kind: checkpoint.MoveTakeOver, Epoch: final, Fence: grant.Epoch})
	res := api.SwitchoverResult{Guest: name, From: a.cfg.AgentID, To: pr.Standby, Epoch: final, Fence: grant.Epoch, Downtime: time.Since(start)}
	if err == nil {
		conn.Close()
		a.holdRAM(g, p.g.RAM)
	}
	g.post(Superseded{Fence: grant.Epoch, Primary: pr.Standby})
	p.stopEngine()
	if err != nil {
		a.journal.note(name, "switchover", fmt.Sprintf("handed over at fencing epoch %d; %s did not confirm the restore: %v", grant.Epoch, pr.Standby, err), grant.Epoch)
		return res, fmt.Errorf("guest %q was handed over to %s (fencing epoch %d) but it did not confirm running it: %w; see `remora vm status %s` there (`remora vm failover %s` there finishes it)", name, pr.Standby, grant.Epoch, err, name, name)
	}
	a.journal.note(name, "switchover", fmt.Sprintf("done: runs on %s from epoch %d, downtime %s", pr.Standby, final, res.Downtime.Round(time.Millisecond)), grant.Epoch)
	g.log.Info("switchover done", "to", pr.Standby, "epoch", final, "fence", grant.Epoch, "downtime", res.Downtime)
	return res, nil
}

// holdRAM keeps a copy of a guest's RAM as this host hands it over: the
// standby shell this host gets for it next starts from it (the pages
// still the same need not be sent). A failed copy costs a full resync.
func (a *Agent) holdRAM(g *guest, ram qemu.RAMBackend) {
	dir := filepath.Join(a.cfg.RuntimeDir, "held")
	path := filepath.Join(dir, g.name+".ram")
	err := os.MkdirAll(dir, 0o700)
	if err == nil {
		err = copyFile(ram.Path, path)
	}
	if err != nil {
		g.log.Warn("cannot keep a copy of the guest's RAM: protecting it back here copies all of it", "err", err)
		_ = os.Remove(path)
		return
	}
	g.mu.Lock()
	g.rec.HeldRAM = path
	err = a.store.save(g.rec)
	g.mu.Unlock()
	if err != nil {
		g.log.Warn("cannot record the copy of the guest's RAM", "err", err)
	}
}

func copyFile(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = io.Copy(dst, src)
	return errors.Join(err, dst.Close())
}

// Failback switches guest name over to its home (the agent it was first
// enrolled from), which must be its standby.
func (a *Agent) Failback(ctx context.Context, name string) (api.SwitchoverResult, error) {
	a.reprotectMu.Lock()
	defer a.reprotectMu.Unlock()
	return a.failback(ctx, name, "")
}

func (a *Agent) failback(ctx context.Context, name, askedBy string) (api.SwitchoverResult, error) {
	g := a.guest(name)
	if g == nil || g.primary == nil {
		return api.SwitchoverResult{}, fmt.Errorf("guest %q is not protected from this host: run failback where it runs", name)
	}
	g.mu.Lock()
	home := g.rec.Home
	g.mu.Unlock()
	standby := ""
	if g.primary.engine != nil {
		standby = g.primary.engine.Progress().Standby
	}
	switch {
	case home == "" || home == a.cfg.AgentID:
		return api.SwitchoverResult{}, fmt.Errorf("guest %q is at home on this host already", name)
	case askedBy != "" && askedBy != home:
		return api.SwitchoverResult{}, fmt.Errorf("agent %s is not guest %q's home (%s)", askedBy, name, home)
	case standby != home:
		return api.SwitchoverResult{}, fmt.Errorf("guest %q's home is %s, but its standby is %q: re-protect it onto %s first (`remora vm reprotect %s --standby HOST:PORT`)", name, home, standby, home, name)
	}
	return a.switchover(ctx, name)
}

// Move carries out a planned move a peer asks for.
func (h standbyHandler) Move(ctx context.Context, conn net.Conn, m checkpoint.Move, fence uint64) error {
	a := h.a
	if err := checkPeerName(conn, m.Agent); err != nil {
		return err
	}
	switch m.Kind {
	case checkpoint.MoveTakeOver:
		return a.takeOver(ctx, m, fence)
	case checkpoint.MoveFailback:
		a.reprotectMu.Lock()
		defer a.reprotectMu.Unlock()
		_, err := a.failback(ctx, m.Guest, m.Agent)
		return err
	}
	return fmt.Errorf("unknown move %q", m.Kind)
}

// takeOver restores a guest its primary handed over: its final
// checkpoint, at the fencing epoch the arbiter issued.
func (a *Agent) takeOver(ctx context.Context, m checkpoint.Move, fence uint64) error {
	g := a.guest(m.Guest)
	if g == nil || g.standby == nil {
		return fmt.Errorf("guest %q has no replica on this host", m.Guest)
	}
	g.mu.Lock()
	primary := g.rec.Primary
	g.mu.Unlock()
	st := g.state()
	switch {
	case primary != m.Agent:
		return fmt.Errorf("agent %s is not guest %q's primary (%s)", m.Agent, m.Guest, primary)
	case st.Promoted:
		return nil // done already: the answer was lost
	case fence < st.Fence || m.Fence <= st.Fence:
		return fmt.Errorf("stale take-over of %q: fencing epoch %d to %d, this replica is at %d", m.Guest, fence, m.Fence, st.Fence)
	}
	s := g.standby
	s.mu.Lock()
	applied := uint64(0)
	if s.replica != nil {
		applied = s.replica.State().Applied
	}
	s.mu.Unlock()
	if applied != m.Epoch {
		return fmt.Errorf("guest %q's replica holds epoch %d, not the final checkpoint %d", m.Guest, applied, m.Epoch)
	}
	// Failing over from now: the primary's session may end any moment and
	// must not be taken for its death.
	g.post(FailoverStarted{Now: time.Now(), Fence: m.Fence})
	// The arbiter, not the frame, says this host is the primary now.
	if a.arb != nil {
		l, err := a.arb.Renew(ctx, m.Guest, a.cfg.AgentID, m.Fence)
		if err != nil {
			err = fmt.Errorf("the arbiter does not confirm this host as guest %q's primary at fencing epoch %d: %w", m.Guest, m.Fence, err)
			g.post(FailoverFailed{Now: time.Now(), Err: err, Refused: true})
			return err
		}
		g.post(FailoverStarted{Now: time.Now(), Fence: m.Fence, Lease: l}) // the lease it keeps once promoted
	}
	g.log.Info("switchover: taking the guest over from its primary", "primary", m.Agent, "epoch", m.Epoch, "fence", m.Fence)
	_, err := a.failoverGuest(ctx, g, m.Fence, true)
	g.post(failoverOutcome(err))
	if errors.Is(err, errFailedOver) {
		return nil
	}
	return err
}

// Drain switches over every guest this host protects as primary, one at
// a time; Undrain asks for the guests whose home this host is and which
// it keeps replicas of back (each one's primary switches it over here).
// With reprotect: auto, each next guest waits until the one moved before
// is protected again (this host its standby), so that one guest at a time
// runs unprotected and the next final checkpoint does not compete with a
// resync for the hosts' CPUs.
func (a *Agent) Drain(ctx context.Context) []api.MoveOutcome {
	var out []api.MoveOutcome
	var moved string
	for _, g := range a.guestList() {
		if g.primary == nil || g.state().Fenced {
			continue
		}
		if moved != "" {
			a.waitReprotected(ctx, moved, drainReprotectWait)
		}
		res, err := a.Switchover(ctx, g.name)
		out = append(out, outcome(g.name, res, err))
		if err == nil && a.cfg.Reprotect == "auto" {
			moved = g.name
		}
	}
	return out
}

// drainReprotectWait bounds how long a drain waits for a moved guest's
// re-protection before it moves the next one anyway.
const drainReprotectWait = 3 * time.Minute

// waitReprotected waits until this agent holds an in-sync replica of
// guest, at most d.
func (a *Agent) waitReprotected(ctx context.Context, guest string, d time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if g := a.guest(guest); g != nil && g.standby != nil {
			if v := g.status(); v.Role == api.RoleStandby && v.State == checkpoint.StateProtected {
				return
			}
		}
		select {
		case <-ctx.Done():
			a.log.Warn("drain: moving the next guest before the last one moved is protected again", "guest", guest, "waited", d)
			return
		case <-tick.C:
		}
	}
}

// Undrain: see Drain.
func (a *Agent) Undrain(ctx context.Context) []api.MoveOutcome {
	var out []api.MoveOutcome
	for _, g := range a.guestList() {
		if g.standby == nil {
			continue
		}
		g.mu.Lock()
		home, primary, st := g.rec.Home, g.rec.Primary, g.rec.State
		g.mu.Unlock()
		if home != a.cfg.AgentID || st != "" {
			continue
		}
		start := time.Now()
		err := a.askFailback(ctx, g)
		res := api.SwitchoverResult{Guest: g.name, From: primary, To: a.cfg.AgentID, Downtime: time.Since(start)}
		out = append(out, outcome(g.name, res, err))
	}
	return out
}

// askFailback asks a replica's primary to switch the guest over here.
func (a *Agent) askFailback(ctx context.Context, g *guest) error {
	addr, err := a.primaryAddr(ctx, g)
	if err != nil {
		return err
	}
	conn, err := a.dialPeer(ctx, addr, checkpoint.FrameMove, g.state().Fence, checkpoint.Move{Agent: a.cfg.AgentID, Guest: g.name, Kind: checkpoint.MoveFailback})
	if err != nil {
		return err
	}
	return conn.Close()
}

// primaryAddr is the replication address of a replica's primary agent.
func (a *Agent) primaryAddr(ctx context.Context, g *guest) (string, error) {
	if a.arb == nil {
		return "", fmt.Errorf("no arbiter to say where guest %q's primary is: run `remora vm failback %s` on its host", g.name, g.name)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := a.arb.Status(ctx)
	if err != nil {
		return "", err
	}
	gs, ok := activeGuest(st, g.name)
	if !ok {
		return "", fmt.Errorf("the arbiter does not know guest %q", g.name)
	}
	for _, ag := range st.Agents {
		if ag.Agent == gs.Primary && ag.Addr != "" {
			return ag.Addr, nil
		}
	}
	return "", fmt.Errorf("the arbiter knows no address of agent %s, guest %q's primary", gs.Primary, g.name)
}

func outcome(guest string, res api.SwitchoverResult, err error) api.MoveOutcome {
	o := api.MoveOutcome{Guest: guest, Result: res}
	if err != nil {
		o.Error = err.Error()
	}
	return o
}
