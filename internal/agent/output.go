package agent

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

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
	// Detach lets go of the guest with its output held (agent stopping).
	Detach()
}

// newOutput sets up output commit for a guest about to be protected.
func (a *Agent) newOutput(ctx context.Context, g *qemu.Guest) (outputBuffer, api.OutputStatus, error) {
	kind := a.cfg.OutputCommit
	if kind == api.OutputOff {
		a.log.Warn("output commit is off: clients may see output of state a failover loses", "guest", g.Name)
		return outcommit.Passthrough{}, api.OutputStatus{Backend: api.OutputOff}, nil
	}
	nics, err := qemu.ListNICs(ctx, g.Mon)
	if err != nil {
		return nil, api.OutputStatus{}, fmt.Errorf("output commit: list the guest's network devices: %w", err)
	}
	switch len(nics) {
	case 0:
		a.log.Info("guest has no network device: no output to hold", "guest", g.Name)
		return outcommit.Passthrough{}, api.OutputStatus{Backend: "none (no network device)"}, nil
	case 1:
	default:
		var s []string
		for _, n := range nics {
			s = append(s, n.String())
		}
		return nil, api.OutputStatus{}, fmt.Errorf("output commit: guest %q has %d network devices (%s); remora holds the output of one: remove the others or set output_commit: off",
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
			return nil, api.OutputStatus{}, fmt.Errorf("output_commit: plug: guest %q: %w (use output_commit: qemu)", g.Name, err)
		}
		p, err := outcommit.NewPlug(ctx, tap, outcommit.PlugOptions{MaxBytes: a.cfg.OutputBufferBytes, Logger: a.log, HoldFromStart: true})
		if err != nil {
			return nil, api.OutputStatus{}, err
		}
		return p, api.OutputStatus{Backend: api.OutputPlug, Netdev: tap}, nil
	}
	r, err := outcommit.NewRedirector(ctx, g, filepath.Join(a.cfg.RuntimeDir, "outcommit"), outcommit.Options{
		Netdev: nics[0].Netdev, MaxBytes: a.cfg.OutputBufferBytes, Logger: a.log, HoldFromStart: true,
	})
	if err != nil {
		return nil, api.OutputStatus{}, err
	}
	return r, api.OutputStatus{Backend: api.OutputQEMU, Netdev: nics[0].Netdev}, nil
}

// outputStatus fills in a guest's output-commit figures.
func (p *primaryRun) outputStatus(holding bool) *api.OutputStatus {
	if p.out == nil {
		return nil
	}
	s := p.outInfo
	st := p.out.Stats()
	s.Holding = holding
	s.HeldFrames, s.HeldBytes = st.HeldFrames, st.HeldBytes
	s.LastCut, s.LastReleased = st.LastCut, st.LastReleased
	s.ReleasedFrames, s.ReleasedBytes = st.ReleasedFrames, st.ReleasedBytes
	s.ForwardedFrames, s.DroppedFrames, s.DiscardedFrames = st.ForwardedFrames, st.DroppedFrames, st.DiscardedFrames
	s.ReleaseP50, s.ReleaseP99 = st.ReleaseP50, st.ReleaseP99
	return &s
}
