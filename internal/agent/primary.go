package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate/qemu"
)

type primaryGuest struct {
	coord   coordination
	vm      *qemu.CaptureVM
	rec     *Record
	g       *qemu.Guest
	mem     []byte
	sink    *qemu.DeviceStateSink
	engine  *checkpoint.Primary
	out     outputBuffer // nil when the guest's output is not held
	disks   *diskSet
	outInfo api.OutputStatus
	cancel  context.CancelFunc
	done    chan struct{}
	err     error
}

func (p *primaryGuest) stop() {
	p.cancel()
	<-p.done
}

// Enroll starts protecting a running domain of this host on the standby
// agent at peer.
func (a *Agent) Enroll(ctx context.Context, domain, peer string, probe arbiter.ProbeSpec) error {
	if err := probe.Validate(); err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	if _, _, err := net.SplitHostPort(peer); err != nil {
		return fmt.Errorf("standby %q: %v (want the standby agent's host:port, e.g. 10.0.0.2:7400)", peer, err)
	}
	a.mu.Lock()
	_, isP := a.primary[domain]
	_, isS := a.standby[domain]
	a.mu.Unlock()
	if isP {
		return fmt.Errorf("domain %q is already enrolled on this agent: see `remora vm status`", domain)
	}
	if isS {
		return fmt.Errorf("domain %q is a replica on this agent (this host is its standby): enroll it on its primary host", domain)
	}
	rec := &Record{Name: domain, Role: api.RolePrimary, Peer: peer, Probe: probe, Enrolled: time.Now().UTC()}
	if err := a.startPrimary(ctx, rec); err != nil {
		return err
	}
	return a.store.save(rec)
}

func (a *Agent) startPrimary(ctx context.Context, rec *Record) error {
	if rec.State == StateFenced {
		pg := &primaryGuest{rec: rec, done: make(chan struct{}), cancel: func() {}}
		close(pg.done)
		pg.coord.v.note = "fenced: a higher epoch runs elsewhere; unenroll this guest here"
		a.mu.Lock()
		a.primary[rec.Name] = pg
		a.mu.Unlock()
		return nil
	}
	g, err := a.virt.OpenGuest(ctx, rec.Name)
	if err != nil {
		return err
	}
	marker := filepath.Join(a.cfg.RuntimeDir, rec.Name+".capturing")
	if resumed, err := qemu.ResumeAfterCrash(ctx, g, marker); err != nil {
		return fmt.Errorf("resume guest left paused by a previous agent: %w", err)
	} else if resumed {
		a.log.Warn("resumed guest that a previous agent left paused mid-checkpoint", "domain", rec.Name)
	}
	if err := qemu.SetIgnoreShared(ctx, g.Mon, true); err != nil {
		return fmt.Errorf("domain %q: %w (QEMU too old for x-ignore-shared?)", rec.Name, err)
	}
	if err := qemu.SetUnlimitedBandwidth(ctx, g.Mon); err != nil {
		return err
	}
	xml, err := a.virt.DomainXML(ctx, rec.Name)
	if err != nil {
		return err
	}
	tracker, err := a.newTracker(g)
	if err != nil {
		return err
	}
	mem, err := qemu.MapRAM(g.RAM.Path, g.RAM.Size, false)
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
	out, outInfo, err := a.newOutput(ctx, g)
	if err != nil {
		sink.Close()
		tracker.Close()
		qemu.UnmapRAM(mem)
		return err
	}
	var fenceOf func() uint64 // set once the engine exists
	disks, err := a.newDiskSet(ctx, g, rec, func() uint64 { return fenceOf() })
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
	vm := &qemu.CaptureVM{G: g, Sink: sink, Marker: marker}
	peer := rec.Peer
	cfg := checkpoint.PrimaryConfig{
		Agent: a.cfg.AgentID, Domain: rec.Name, DomainXML: xml, ShellBase: a.shellBase(rec.Name),
		Interval: a.cfg.EpochInterval, MaxInFlight: a.cfg.MaxInFlight, Fence: rec.Fence,
		Dial:       func(ctx context.Context) (net.Conn, error) { return a.dialAgent(ctx, peer) },
		VerifyPeer: checkPeerName,
		Log:        a.log,
		Hook:       a.faultHook,
		Output:     engineOut,
	}
	if len(disks.disks) > 0 {
		cfg.Disks, cfg.DiskSpecs, cfg.PrepareSession = disks, disks.specs(), disks.prepare
	}
	engine := checkpoint.NewPrimary(cfg, vm, mem, tracker)
	fenceOf = engine.Fence

	runCtx, cancel := context.WithCancel(context.Background())
	pg := &primaryGuest{rec: rec, g: g, vm: vm, mem: mem, sink: sink, engine: engine, out: out, outInfo: outInfo, disks: disks, cancel: cancel, done: make(chan struct{})}
	go a.primaryCoordination(runCtx, pg)
	if out != nil {
		go a.outputCoordination(runCtx, pg)
	}
	go func() {
		defer close(pg.done)
		pg.err = engine.Run(runCtx)
		disks.close()
		sink.Close()
		tracker.Close()
		qemu.UnmapRAM(mem)
	}()
	a.mu.Lock()
	a.primary[rec.Name] = pg
	a.mu.Unlock()
	a.log.Info("protecting guest", "domain", rec.Name, "standby", peer, "tracker", tracker.Name(), "output_commit", outInfo.Backend,
		"ram_mib", g.RAM.Size>>20, "interval", a.cfg.EpochInterval)
	return nil
}

func (a *Agent) newTracker(g *qemu.Guest) (checkpoint.Tracker, error) {
	kind := a.cfg.Tracker
	if kind == checkpoint.TrackerAuto {
		kind = checkpoint.TrackerScan
		if checkpoint.SoftDirtySupported() {
			kind = checkpoint.TrackerSoftDirty
		}
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
func (a *Agent) unenrollPrimary(ctx context.Context, pg *primaryGuest) error {
	pg.stop()
	a.closeOutput(pg)
	var warn error
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	// The standby answers an unenroll with a welcome once its replica is gone.
	conn, err := a.dialPeer(dctx, pg.rec.Peer, checkpoint.FrameUnenroll, pg.rec.Fence, checkpoint.Hello{Agent: a.cfg.AgentID, Domain: pg.rec.Name})
	if err == nil {
		conn.Close()
	}
	if err != nil {
		warn = fmt.Errorf("standby %s not told to drop its replica (%v): run `remora vm unenroll %s` on the standby host", pg.rec.Peer, err, pg.rec.Name)
	}
	if a.arb != nil && pg.rec.Fence > 0 && pg.rec.State == "" {
		// After the standby: a retired epoch makes its replica stale.
		actx, acancel := context.WithTimeout(ctx, 10*time.Second)
		aerr := a.arb.Retire(actx, pg.rec.Name, a.cfg.AgentID, pg.rec.Fence)
		acancel()
		if aerr != nil {
			aerr = fmt.Errorf("arbiter %s not told (%v): it still lists the guest at epoch %d with this host as primary, so enrolling it on another host is refused: once the arbiter is reachable, enroll and unenroll it here again (or just enroll it here again)", a.arb.Addr(), aerr, pg.rec.Fence)
			warn = errors.Join(warn, aerr)
		}
	}
	a.mu.Lock()
	delete(a.primary, pg.rec.Name)
	a.mu.Unlock()
	if err := a.store.remove(pg.rec.Name); err != nil {
		return err
	}
	return warn
}

// shellBase is a domain's name without this host's shell suffix: a guest
// that was promoted here and is protected back keeps its original name on
// the other host.
func (a *Agent) shellBase(name string) string {
	if base, ok := strings.CutSuffix(name, a.cfg.ShellSuffix); ok && a.cfg.ShellSuffix != "" && base != "" {
		return base
	}
	return name
}
