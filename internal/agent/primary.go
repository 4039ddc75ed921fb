package agent

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/names"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
)

// primaryRun is the capture side of a guest this agent protects.
type primaryRun struct {
	g       *qemu.Guest
	vm      *qemu.CaptureVM
	engine  *checkpoint.Primary // nil once fenced
	out     outputBuffer        // nil when the guest's output is not held
	disks   *diskSet
	outInfo api.OutputStatus
	tracker string
	cancel  context.CancelFunc
	done    chan struct{}
}

func (p *primaryRun) stopEngine() {
	if p.cancel == nil {
		return
	}
	p.cancel()
	<-p.done
}

// Enroll starts protecting a running guest of this host on the standby
// agent at peer.
func (a *Agent) Enroll(ctx context.Context, name, peer string, probe arbiter.ProbeSpec) error {
	if err := names.Guest("guest", name); err != nil {
		return fmt.Errorf("%w: rename the domain (virsh domrename) to protect it", err)
	}
	if err := probe.Validate(); err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	if _, _, err := net.SplitHostPort(peer); err != nil {
		return fmt.Errorf("standby %q: %v (want the standby agent's host:port, e.g. 10.0.0.2:7400)", peer, err)
	}
	if g := a.guest(name); g != nil {
		if g.primary != nil {
			return fmt.Errorf("guest %q is already enrolled on this agent: see `remora vm status`", name)
		}
		return fmt.Errorf("guest %q is a replica on this agent (this host is its standby): enroll it on its primary host", name)
	}
	rec := &Record{Name: name, Role: api.RolePrimary, Peer: peer, Probe: probe, Enrolled: time.Now().UTC(), Home: a.cfg.AgentID}
	if err := a.startPrimary(ctx, rec); err != nil {
		return err
	}
	if err := a.store.save(rec); err != nil {
		return err
	}
	a.journal.note(name, "enrolled", "primary on this host, standby "+peer, rec.Fence)
	return nil
}

// startPrimary opens the guest and starts protecting it.
func (a *Agent) startPrimary(ctx context.Context, rec *Record) error {
	if rec.State == StateFenced {
		g := newGuest(a, rec, NewPrimary(a.settings(), rec.Fence, false, true))
		g.m.Note = "fenced: a higher fencing epoch runs elsewhere; unenroll this guest here"
		g.primary = &primaryRun{}
		a.mu.Lock()
		a.guests[rec.Name] = g
		a.mu.Unlock()
		return nil
	}
	qg, err := a.virt.OpenGuest(ctx, rec.domain())
	if err != nil {
		return err
	}
	marker := filepath.Join(a.cfg.RuntimeDir, rec.Name+".capturing")
	pausedAtStart := false
	if a.arb != nil {
		// A guest a dead agent left paused stays paused until the arbiter
		// confirms this host still runs it.
		if pausedAtStart, err = qemu.LeftPaused(ctx, qg, marker); err != nil {
			return fmt.Errorf("guest left paused by a previous agent: %w", err)
		}
	} else if resumed, err := qemu.ResumeAfterCrash(ctx, qg, marker); err != nil {
		return fmt.Errorf("resume guest left paused by a previous agent: %w", err)
	} else if resumed {
		a.log.Warn("resumed guest that a previous agent left paused mid-checkpoint", "guest", rec.Name)
	}
	if err := qemu.SetIgnoreShared(ctx, qg.Mon, true); err != nil {
		return fmt.Errorf("guest %q: %w (QEMU too old for x-ignore-shared?)", rec.Name, err)
	}
	if err := qemu.SetUnlimitedBandwidth(ctx, qg.Mon); err != nil {
		return err
	}
	xml, err := a.virt.DomainXML(ctx, rec.domain())
	if err != nil {
		return err
	}
	tracker, err := a.newTracker(qg)
	if err != nil {
		return err
	}
	mem, err := qemu.MapRAM(qg.RAM.Path, qg.RAM.Size, false)
	if err != nil {
		tracker.Close()
		return err
	}
	sink, err := qemu.ListenDeviceState(filepath.Join(a.cfg.RuntimeDir, rec.Name+".devstate.sock"))
	if err != nil {
		tracker.Close()
		qemu.UnmapRAM(mem)
		return err
	}
	out, outInfo, err := a.newOutput(ctx, qg)
	if err != nil {
		sink.Close()
		tracker.Close()
		qemu.UnmapRAM(mem)
		return err
	}
	g := newGuest(a, rec, NewPrimary(a.settings(), rec.Fence, pausedAtStart, false))
	disks, err := a.newDiskSet(ctx, qg, rec, g.fence.Load)
	if err != nil {
		if out != nil {
			_ = out.Close()
		}
		sink.Close()
		tracker.Close()
		qemu.UnmapRAM(mem)
		return fmt.Errorf("disk replication: %w", err)
	}
	var engineOut checkpoint.OutputBuffer
	if outInfo.Backend == api.OutputQEMU || outInfo.Backend == api.OutputPlug {
		engineOut = out
	} else {
		out = nil
	}
	vm := &qemu.CaptureVM{G: qg, Sink: sink, Marker: marker}
	vm.SetFenced(pausedAtStart) // checkpoints must not resume it before the arbiter answers
	if disks != nil {
		disks.vm = vm
	}
	peer := rec.Peer
	cfg := checkpoint.PrimaryConfig{
		Agent: a.cfg.AgentID, Guest: rec.Name, DomainXML: xml, ShellBase: a.shellBase(rec.Name), Home: cmp.Or(rec.Home, a.cfg.AgentID),
		Interval: a.cfg.EpochInterval, MinInterval: a.cfg.EpochMinInterval, MaxInFlight: a.cfg.MaxInFlight, Fence: rec.Fence, PeerTimeout: a.cfg.HeartbeatTimeout(),
		Dial:           func(ctx context.Context) (net.Conn, error) { return a.dialCheckpoints(ctx, peer) },
		VerifyPeer:     func(conn net.Conn, claimed string) error { return a.verifyStandby(g, conn, claimed) },
		Log:            a.log,
		Hook:           a.faultHook,
		Output:         engineOut,
		ArbiterVouches: func(now time.Time) bool { return a.arbiterVouches(g, now) },
	}
	if len(disks.disks) > 0 {
		cfg.Disks, cfg.DiskSpecs, cfg.PrepareSession = disks, disks.specs(), disks.prepare
	}
	engine := checkpoint.NewPrimary(cfg, vm, mem, tracker)
	runCtx, cancel := context.WithCancel(context.Background())
	p := &primaryRun{g: qg, vm: vm, engine: engine, out: out, outInfo: outInfo, disks: disks, tracker: tracker.Name(), cancel: cancel, done: make(chan struct{})}
	g.primary = p
	go func() {
		defer close(p.done)
		if err := engine.Run(runCtx); err != nil {
			g.log.Error("replication stopped", "err", err)
		}
		disks.close()
		sink.Close()
		tracker.Close()
		qemu.UnmapRAM(mem)
	}()
	g.start(func(now time.Time) Observation {
		o := p.observe(now)
		o.ArbiterHeard, o.ArbiterSuspects = a.arbiterContact()
		return o
	}, 25*time.Millisecond)
	a.mu.Lock()
	a.guests[rec.Name] = g
	a.mu.Unlock()
	a.log.Info("protecting guest", "guest", rec.Name, "standby", peer, "tracker", tracker.Name(), "output_commit", outInfo.Backend,
		"ram_mib", qg.RAM.Size>>20, "interval", a.cfg.EpochInterval)
	return nil
}

// observe is the primary driver's tick: what the engine and the output
// buffer say now.
func (p *primaryRun) observe(now time.Time) Observation {
	o := Observation{Now: now, Engine: checkpoint.StateStopped}
	if p.engine == nil {
		return o
	}
	pr := p.engine.Progress()
	o.Engine, o.LastAck, o.LastTimelyAck, o.ConnectedSince, o.Started, o.Acked = pr.State, pr.LastAck, pr.LastTimelyAck, pr.ConnectedSince, pr.Started, pr.Acked
	return o
}

// do carries out a local action of the primary's machine.
func (p *primaryRun) do(ctx context.Context, g *guest, act Action) {
	a := g.a
	switch act := act.(type) {
	case DoPause:
		g.log.Error("self-fence: pausing the guest", "why", act.Why, "fence", g.fence.Load())
		pctx, cancel := context.WithTimeout(ctx, a.cfg.HeartbeatTimeout())
		err := p.vm.Fence(pctx)
		cancel()
		g.postNow(Paused{Err: err})
	case DoResume:
		g.log.Warn("resuming the guest", "why", act.Why, "fence", g.fence.Load())
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := p.vm.Unfence(rctx)
		cancel()
		g.postNow(Resumed{Err: err})
	case DoReleaseAll:
		if p.out == nil {
			return
		}
		if err := p.out.ReleaseAll(); err != nil {
			g.log.Error("output commit: cannot release the held output", "err", err)
			return
		}
		g.log.Warn("output commit: releasing the guest's held output; it runs unprotected", "why", act.Why)
	case DoKeepOutputFree:
		if p.out == nil || p.out.Stats().HeldFrames == 0 {
			return
		}
		if err := p.out.ReleaseAll(); err != nil {
			g.log.Error("output commit: cannot release the held output", "err", err)
		}
	case DoDestroyCopy:
		g.log.Error("guest was promoted elsewhere: destroying this stale copy", "why", act.Why)
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = p.vm.Fence(dctx)
		if p.out != nil {
			// Output of epochs the standby never acknowledged must never leave.
			p.out.DiscardAfter(act.AckedEpoch)
		}
		// The paused copy's RAM is the base the resync compares against
		// when this host becomes the guest's standby: a partition, unlike
		// a crash, then costs only the pages that differ. A switchover
		// kept it already as it handed the guest over.
		g.mu.Lock()
		held := g.rec.HeldRAM
		g.mu.Unlock()
		if held == "" && p.g != nil && p.g.RAM.Path != "" {
			a.holdRAM(g, p.g.RAM)
		}
		if err := a.virt.Destroy(dctx, g.domainName()); err != nil {
			g.log.Error("cannot destroy the stale copy", "err", err)
		}
		// A shell remora made and promoted is undefined; the admin's own
		// definition stays, with autostart off.
		x, _ := a.virt.DomainXML(dctx, g.domainName())
		if virt.IsShell(x) {
			if err := a.virt.Undefine(dctx, g.domainName()); err != nil {
				g.log.Warn("cannot undefine the stale copy (libvirt's hook still refuses to start it)", "err", err)
			}
		} else if err := a.virt.NoAutostart(dctx, g.domainName()); err != nil {
			g.log.Warn("cannot turn autostart off for the stale copy (libvirt's hook still refuses to start it)", "err", err)
		}
		go func() { // not from the driver's own loop: the engine may wait on it
			p.stopEngine()
			if p.out != nil {
				_ = p.out.Close()
			}
		}()
	}
}

// postNow queues an event from the driver's own goroutine.
func (g *guest) postNow(ev Event) {
	select {
	case g.events <- ev:
	default:
		go g.post(ev)
	}
}

func (a *Agent) newTracker(g *qemu.Guest) (checkpoint.Tracker, error) {
	kind := a.cfg.Tracker
	if kind == checkpoint.TrackerAuto {
		kind = checkpoint.TrackerScan
		why := "this kernel does not track soft-dirty bits (CONFIG_MEM_SOFT_DIRTY): each checkpoint hashes all of the guest's RAM"
		if checkpoint.SoftDirtySupported() {
			kind, why = checkpoint.TrackerSoftDirty, "the kernel tracks soft-dirty bits: each checkpoint reads them, not the guest's RAM"
		}
		a.log.Info("dirty page tracker chosen", "guest", g.Name, "tracker", kind, "why", why)
	}
	if kind == checkpoint.TrackerScan {
		return checkpoint.NewScanTracker(int(g.RAM.Size)), nil
	}
	if !checkpoint.SoftDirtySupported() {
		return nil, errors.New("tracker softdirty: this kernel does not track soft-dirty bits (CONFIG_MEM_SOFT_DIRTY): use tracker: scan or auto")
	}
	pid, err := g.PID()
	if err != nil {
		return nil, err
	}
	return checkpoint.NewSoftDirtyTracker(pid, g.RAM.Path, int(g.RAM.Size))
}

// unenrollPrimary stops protecting a guest (which keeps running) and tells
// the standby to drop its replica.
func (a *Agent) unenrollPrimary(ctx context.Context, g *guest) error {
	g.stop()
	p := g.primary
	p.stopEngine()
	p.closeOutput(g.log)
	st := g.state()
	var warn error
	// A fenced copy's standby took the guest over: it keeps what it runs.
	if !st.Fenced {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		// The standby answers an unenroll with a welcome once its replica is gone.
		conn, err := a.dialPeer(dctx, g.rec.Peer, checkpoint.FrameUnenroll, st.Fence, checkpoint.Hello{Agent: a.cfg.AgentID, Guest: g.name})
		if err == nil {
			conn.Close()
		}
		if err != nil {
			warn = fmt.Errorf("standby %s not told to drop its replica (%v): run `remora vm unenroll %s` on the standby host", g.rec.Peer, err, g.name)
		}
	}
	// After the standby: a retired epoch makes its replica stale.
	warn = errors.Join(warn, a.retire(ctx, g.name, st))
	a.forget(g)
	if held := g.rec.HeldRAM; held != "" {
		_ = os.Remove(held)
	}
	if err := a.store.remove(g.name); err != nil {
		return err
	}
	a.journal.note(g.name, "unenrolled", "protection stopped; the guest keeps running here", st.Fence)
	return warn
}

// retire tells the arbiter that this host, the guest's primary, stopped
// protecting it, so that a later enrollment of the name starts afresh.
func (a *Agent) retire(ctx context.Context, name string, st State) error {
	if a.arb == nil || st.Fence == 0 || st.Fenced {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := a.arb.Retire(ctx, name, a.cfg.AgentID, st.Fence); err != nil {
		return fmt.Errorf("arbiter %s not told (%v): it still lists guest %q at fencing epoch %d with this host as primary, so enrolling it on another host is refused: once the arbiter is reachable, enroll and unenroll it here again (or just enroll it here again)", a.arb.Addr(), err, name, st.Fence)
	}
	return nil
}

// closeOutput removes output commit from a guest that stays running,
// losing nothing.
func (p *primaryRun) closeOutput(log *slog.Logger) {
	if p.out == nil {
		return
	}
	if err := p.out.ReleaseAll(); err != nil {
		log.Warn("output commit: releasing held output before removal", "err", err)
	}
	if err := p.out.Close(); err != nil {
		log.Warn("output commit: removing the filters", "err", err)
	}
}

// shellBase is a guest's name without this host's shell suffix: a guest
// that was promoted here and is protected back keeps its original name on
// the other host.
func (a *Agent) shellBase(name string) string {
	if base, ok := strings.CutSuffix(name, a.cfg.ShellSuffix); ok && a.cfg.ShellSuffix != "" && base != "" {
		return base
	}
	return name
}

// verifyStandby checks a standby's certificate against the agent id it
// claims, and that id against the one pinned for the guest (the first
// standby it reached, kept in its record).
func (a *Agent) verifyStandby(g *guest, conn net.Conn, claimed string) error {
	if err := checkPeerName(conn, claimed); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	switch g.rec.StandbyAgent {
	case claimed:
		return nil
	case "":
		g.rec.StandbyAgent = claimed
		if err := a.store.save(g.rec); err != nil {
			return fmt.Errorf("pin standby agent %s: %w", claimed, err)
		}
		g.log.Info("standby agent pinned", "standby", claimed, "peer", g.rec.Peer)
		return nil
	default:
		return (fmt.Errorf("the standby at %s is agent %s, but guest %q was protected onto agent %s: check the address, or unenroll and enroll the guest with its new standby", g.rec.Peer, claimed, g.name, g.rec.StandbyAgent))
	}
}
