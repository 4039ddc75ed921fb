package qemu

import (
	"context"
	"io"
	"os"
	"sync/atomic"
)

// CaptureVM adapts a guest to the checkpoint engine (checkpoint.VM). A
// marker file exists while the guest is paused for a checkpoint, so an
// agent that dies there resumes the guest on restart instead of leaving
// it paused.
type CaptureVM struct {
	G      *Guest
	Sink   *DeviceStateSink
	Marker string

	fenced atomic.Bool // self-fenced: checkpoints go on but never resume the guest
}

// Fence pauses the guest and keeps it paused across checkpoints.
func (v *CaptureVM) Fence(ctx context.Context) error {
	v.fenced.Store(true)
	return Stop(ctx, v.G.Mon)
}

// Unfence resumes a fenced guest.
func (v *CaptureVM) Unfence(ctx context.Context) error {
	v.fenced.Store(false)
	return Cont(ctx, v.G.Mon)
}

// Fenced reports whether the guest is held paused.
func (v *CaptureVM) Fenced() bool { return v.fenced.Load() }

func (v *CaptureVM) Stop(ctx context.Context) error {
	if err := os.WriteFile(v.Marker, nil, 0o600); err != nil {
		return err
	}
	return Stop(ctx, v.G.Mon)
}

func (v *CaptureVM) Cont(ctx context.Context) error {
	if v.fenced.Load() {
		return os.Remove(v.Marker)
	}
	if err := Cont(ctx, v.G.Mon); err != nil {
		return err
	}
	return os.Remove(v.Marker)
}

func (v *CaptureVM) SaveDeviceState(ctx context.Context, w io.Writer) (int64, error) {
	return v.Sink.Save(ctx, v.G, w)
}

// ResumeAfterCrash resumes a guest a dead agent left paused mid-checkpoint.
// It reports whether it had to.
func ResumeAfterCrash(ctx context.Context, g *Guest, marker string) (bool, error) {
	if _, err := os.Stat(marker); err != nil {
		return false, nil
	}
	_ = Exec(ctx, g.Mon, "migrate_cancel", nil, nil)
	st, err := Status(ctx, g.Mon)
	if err != nil {
		return false, err
	}
	if st != "running" {
		if err := Cont(ctx, g.Mon); err != nil {
			return false, err
		}
	}
	return true, os.Remove(marker)
}
