package agent

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/remora-ha/remora/checkpoint/outcommit"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
)

// outputBuffer is what the agent needs of an output-commit backend.
type outputBuffer interface {
	outcommit.Buffer
	// ReleaseAll sends everything held and holds nothing until the next
	// cut: the guest runs unprotected.
	ReleaseAll() error
}

// newOutput sets up output commit for a guest about to be protected.
func (a *Agent) newOutput(ctx context.Context, g *qemu.Guest) (outputBuffer, api.OutputStatus, error) {
	kind := a.cfg.OutputCommit
	if kind == api.OutputOff {
		a.log.Warn("output commit is off: clients may see output of state a failover loses", "domain", g.Name)
		return outcommit.Passthrough{}, api.OutputStatus{Backend: api.OutputOff}, nil
	}
	nics, err := qemu.ListNICs(ctx, g.Mon)
	if err != nil {
		return nil, api.OutputStatus{}, fmt.Errorf("output commit: list the guest's network devices: %w", err)
	}
	switch len(nics) {
	case 0:
		a.log.Info("guest has no network device: no output to hold", "domain", g.Name)
		return outcommit.Passthrough{}, api.OutputStatus{Backend: "none (no network device)"}, nil
	case 1:
	default:
		var s []string
		for _, n := range nics {
			s = append(s, n.String())
		}
		return nil, api.OutputStatus{}, fmt.Errorf("output commit: domain %q has %d network devices (%s); remora holds the output of one: remove the others or set output_commit: off",
			g.Name, len(nics), strings.Join(s, ", "))
	}
	if kind == api.OutputAuto {
		kind = api.OutputQEMU
		if outcommit.PlugSupported() == nil {
			kind = api.OutputPlug
		}
	}
	if kind == api.OutputPlug {
		if err := outcommit.PlugSupported(); err != nil {
			return nil, api.OutputStatus{}, fmt.Errorf("output_commit: plug: %w (or use output_commit: qemu, which needs no kernel feature)", err)
		}
		x, err := a.virt.LiveXML(ctx, g.Name)
		if err != nil {
			return nil, api.OutputStatus{}, err
		}
		tap, err := virt.InterfaceTap(x, nics[0].Netdev)
		if err != nil {
			return nil, api.OutputStatus{}, fmt.Errorf("output_commit: plug: domain %q: %w (use output_commit: qemu)", g.Name, err)
		}
		p, err := outcommit.NewPlug(ctx, tap, outcommit.PlugOptions{MaxBytes: a.cfg.OutputBufferBytes, Logger: a.log})
		if err != nil {
			return nil, api.OutputStatus{}, err
		}
		return p, api.OutputStatus{Backend: api.OutputPlug, Netdev: tap}, nil
	}
	r, err := outcommit.NewRedirector(ctx, g, filepath.Join(a.cfg.RuntimeDir, "outcommit"), outcommit.Options{
		Netdev: nics[0].Netdev, MaxBytes: a.cfg.OutputBufferBytes, Logger: a.log,
	})
	if err != nil {
		return nil, api.OutputStatus{}, err
	}
	return r, api.OutputStatus{Backend: api.OutputQEMU, Netdev: nics[0].Netdev}, nil
}

// outputStatus fills in a guest's output-commit figures.
func (pg *primaryGuest) outputStatus() *api.OutputStatus {
	if pg.out == nil {
		return nil
	}
	s := pg.outInfo
	st := pg.out.Stats()
	s.Holding = !pg.coord.snapshot().outputFree
	s.HeldFrames, s.HeldBytes = st.HeldFrames, st.HeldBytes
	s.LastCut, s.LastReleased = st.LastCut, st.LastReleased
	s.ReleasedFrames, s.ReleasedBytes = st.ReleasedFrames, st.ReleasedBytes
	s.ForwardedFrames, s.DroppedFrames, s.DiscardedFrames = st.ForwardedFrames, st.DroppedFrames, st.DiscardedFrames
	s.ReleaseP50, s.ReleaseP99 = st.ReleaseP50, st.ReleaseP99
	return &s
}

// releaseOutput stops holding the guest's output: the standby is gone
// (with the arbiter's agreement, or without an arbiter to ask) and the
// guest runs unprotected. Holding resumes with the next epoch's cut.
// Until an epoch cut after this point is acknowledged the standby must not
// count as in sync: clients may have seen output of later state.
func (a *Agent) releaseOutput(pg *primaryGuest, why string) {
	if pg.out == nil {
		return
	}
	started := pg.engine.Status().Started
	if err := pg.out.ReleaseAll(); err != nil {
		a.log.Error("output commit: cannot release the held output", "domain", pg.rec.Name, "err", err)
		return
	}
	a.log.Warn("output commit: releasing the guest's held output; it runs unprotected", "domain", pg.rec.Name, "why", why)
	pg.coord.set(func(c *coordView) { c.outputFree, c.resyncAfter = true, started })
}

// closeOutput removes output commit from a guest that stays running,
// losing nothing.
func (a *Agent) closeOutput(pg *primaryGuest) {
	if pg.out == nil {
		return
	}
	if err := pg.out.ReleaseAll(); err != nil {
		a.log.Warn("output commit: releasing held output before removal", "domain", pg.rec.Name, "err", err)
	}
	if err := pg.out.Close(); err != nil {
		a.log.Warn("output commit: removing the filters", "domain", pg.rec.Name, "err", err)
	}
}

// outputCoordination releases a guest's held output when its standby
// stops acknowledging and may not be promoted: there is no arbiter, or the
// arbiter does not count it as in sync (initial sync not done). Holding
// would cut the guest off its network until the standby returns. With an
// arbiter and a standby in sync, primaryCoordination asks first.
func (a *Agent) outputCoordination(ctx context.Context, pg *primaryGuest) {
	timeout := a.hbTimeout()
	tick := time.NewTicker(a.cfg.HeartbeatInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		st := pg.engine.Status()
		co := pg.coord.snapshot()
		last := st.LastAck
		if st.ConnectedSince.After(last) {
			last = st.ConnectedSince
		}
		stalled := time.Since(last) > timeout
		switch {
		case co.outputFree && st.AckedEpoch > co.resyncAfter:
			pg.coord.set(func(c *coordView) { c.outputFree = false })
		case !co.outputFree && stalled && (a.arb == nil || !co.synced) && pg.out.Stats().LastCut > 0:
			why := "the standby is not in sync at the arbiter and stopped acknowledging"
			if a.arb == nil {
				why = "the standby stopped acknowledging and no arbiter is configured"
			}
			a.releaseOutput(pg, why)
		}
	}
}
