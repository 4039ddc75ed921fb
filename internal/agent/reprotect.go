package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate/virt"
)

// The life after a failover: a guest failed over to this host runs in the
// shell it was restored into, unprotected. Re-protecting it makes this
// agent its primary again, for the same guest name, with the domain it
// runs in, onto a new standby: the one the arbiter names (the old
// primary's agent offers itself once it is back) or one the admin names.

// errNoStandbyOffered: nobody offered to be the guest's standby yet.
var errNoStandbyOffered = errors.New("no standby offered")

// Reprotect protects guest name, failed over to this host, onto the
// standby agent at peer (host:port), or onto the one the arbiter names.
func (a *Agent) Reprotect(ctx context.Context, name, peer string) error {
	a.reprotectMu.Lock()
	defer a.reprotectMu.Unlock()
	g := a.guest(name)
	if g == nil {
		return fmt.Errorf("guest %q: %w: see `remora vm status`", name, errNotEnrolled)
	}
	if g.primary != nil {
		return fmt.Errorf("guest %q is already protected from this host: see `remora vm status %s`", name, name)
	}
	st := g.state()
	if !st.Promoted || st.Fenced {
		return fmt.Errorf("guest %q does not run on this host (it is a replica here, %s): re-protect it on the host it runs on", name, st.Phase())
	}
	if peer == "" {
		p, err := a.offeredStandby(ctx, name)
		if err != nil {
			return err
		}
		peer = p
	}
	if _, _, err := net.SplitHostPort(peer); err != nil {
		return fmt.Errorf("standby %q: %v (want the standby agent's host:port, e.g. 10.0.0.2:7400)", peer, err)
	}
	g.mu.Lock()
	old := *g.rec
	g.mu.Unlock()
	rec := &Record{Name: old.Name, Role: api.RolePrimary, Peer: peer, Fence: st.Fence, Enrolled: old.Enrolled,
		Domain: old.Shell, Home: old.Home, Probe: old.Probe, Images: old.Images}
	if rec.Domain == rec.Name {
		rec.Domain = ""
	}
	// The replica's driver and sessions end; its images are the running
	// guest's disks now and stay.
	g.stop()
	g.standby.closeSession()
	a.detector.Forget(name)
	a.forget(g)
	if err := a.startPrimary(ctx, rec); err != nil {
		a.loadStandby(ctx, &old) // as it was: running here, unprotected
		return fmt.Errorf("re-protect %q onto %s: %w", name, peer, err)
	}
	if err := a.store.save(rec); err != nil {
		return err
	}
	g.log.Info("re-protecting the guest failed over here", "standby", peer, "domain", rec.domain(), "fence", rec.Fence)
	a.journal.note(name, "reprotect", fmt.Sprintf("primary on this host (domain %s), standby %s", rec.domain(), peer), rec.Fence)
	return nil
}

// offeredStandby is the replication address of the agent the arbiter has
// registered as guest's standby at its current epoch.
func (a *Agent) offeredStandby(ctx context.Context, guest string) (string, error) {
	if a.arb == nil {
		return "", fmt.Errorf("no arbiter to name guest %q's new standby: name it (--standby HOST:PORT)", guest)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := a.arb.Status(ctx)
	if err != nil {
		return "", fmt.Errorf("ask the arbiter for guest %q's standby: %w (or name one: --standby HOST:PORT)", guest, err)
	}
	gs, ok := activeGuest(st, guest)
	if !ok || gs.Primary != a.cfg.AgentID {
		return "", fmt.Errorf("the arbiter does not have this agent as guest %q's primary (it has %q)", guest, gs.Primary)
	}
	if gs.Standby == "" {
		return "", fmt.Errorf("%w for guest %q: its old primary's agent offers itself once it is back; or name a standby (--standby HOST:PORT)", errNoStandbyOffered, guest)
	}
	for _, ag := range st.Agents {
		if ag.Agent == gs.Standby && ag.Addr != "" {
			return ag.Addr, nil
		}
	}
	return "", fmt.Errorf("the arbiter knows no address of agent %s, guest %q's offered standby: name it (--standby HOST:PORT)", gs.Standby, guest)
}

// autoReprotect re-protects guests failed over here onto the standby the
// arbiter's heartbeat answer names (reprotect: auto), one attempt per
// guest at a time and at most one every 10 s.
func (a *Agent) autoReprotect(ctx context.Context, g *guest, as arbiter.Assignment) {
	if a.cfg.Reprotect != api.ReprotectAuto || as.Role != arbiter.RolePrimary || as.Standby == "" || as.Standby == a.cfg.AgentID || as.StandbyAddr == "" {
		return
	}
	if st := g.state(); g.standby == nil || !st.Promoted || st.Fenced || st.SelfFenced {
		return
	}
	a.mu.Lock()
	if a.reprotectTry == nil {
		a.reprotectTry = map[string]time.Time{}
	}
	last := a.reprotectTry[g.name]
	if time.Since(last) < 10*time.Second {
		a.mu.Unlock()
		return
	}
	a.reprotectTry[g.name] = time.Now()
	a.mu.Unlock()
	go func() {
		g.log.Info("the arbiter names a standby for the guest failed over here: re-protecting it", "standby", as.Standby, "addr", as.StandbyAddr)
		if err := a.Reprotect(ctx, g.name, as.StandbyAddr); err != nil {
			g.log.Warn("automatic re-protect failed; it is retried", "err", err)
		}
	}()
}

// supersededToStandby turns this host's superseded copy of a guest (its
// primary record, fenced: the guest runs elsewhere since a failover or a
// switchover) into the guest's replica, for the agent the arbiter names
// its primary. The old copy's domain is remembered, for libvirt's hook to
// keep refusing it.
func (a *Agent) supersededToStandby(ctx context.Context, g *guest, hello checkpoint.Hello, fence uint64) (*guest, error) {
	st := g.state()
	if a.arb == nil {
		return nil, checkpoint.Fatal(fmt.Errorf("guest %q is this agent's superseded copy; without an arbiter nothing confirms %s runs it now: unenroll it here (remora vm unenroll %s) first", hello.Guest, hello.Agent, hello.Guest))
	}
	view, known, err := a.arbiterView(ctx, hello.Guest)
	switch {
	case err != nil:
		return nil, fmt.Errorf("cannot check guest %q's primary with the arbiter: %w", hello.Guest, err)
	case !known || view.Primary != hello.Agent || view.Epoch < fence || fence < st.Fence:
		return nil, checkpoint.Fatal(fmt.Errorf("agent %s at fencing epoch %d is not guest %q's primary for the arbiter (it has %q at %d; this copy was superseded at %d)", hello.Agent, fence, hello.Guest, view.Primary, view.Epoch, st.Fence))
	}
	g.mu.Lock()
	old := *g.rec
	g.mu.Unlock()
	g.stop()
	a.forget(g)
	rec := &Record{Name: old.Name, Role: api.RoleStandby, Primary: hello.Agent, Fence: fence, Enrolled: time.Now().UTC(),
		Superseded: old.domain(), Home: old.Home, HeldRAM: old.HeldRAM}
	// The old copy's raw disks become the replica's images: they hold the
	// guest's disks as of its last epoch here, so the resync compares
	// them and copies only what differs. A copy remora made ran on replica
	// images, which its record names (none: the default ones).
	switch {
	case old.Domain != "":
		rec.Images = old.Images
	default:
		if x, err := a.virt.DomainXML(ctx, old.domain()); err == nil && !virt.IsShell(x) {
			if files, err := virt.RawDiskFiles(x); err == nil && len(files) > 0 {
				rec.Images = files
			}
		}
	}
	if err := a.store.save(rec); err != nil {
		return nil, err
	}
	a.journal.note(rec.Name, "enrolled", fmt.Sprintf("standby on this host of primary %s, which runs the guest since fencing epoch %d; the old copy %s stays stopped", hello.Agent, fence, rec.Superseded), fence)
	g.log.Info("the guest's superseded copy here becomes its standby", "primary", hello.Agent, "fence", fence, "old_domain", rec.Superseded)
	return a.newStandbyGuest(rec), nil
}
