package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// CaptureVM adapts a guest to the checkpoint engine (checkpoint.VM). A
// marker file exists while the guest is paused for a checkpoint, so an
// agent that dies there resumes the guest on restart instead of leaving
// it paused.
//
// A fenced guest stays paused across checkpoints. Fence, Unfence and Cont
// take one lock, so a checkpoint's cont can never resume a guest that was
// fenced while it was paused for that checkpoint.
type CaptureVM struct {
	G      *Guest
	Sink   *DeviceStateSink
	Marker string

	mu     sync.Mutex
	fenced bool
	// still: a checkpoint captured the guest while fenced; QEMU is in
	// postmigrate, where no further migration starts until a cont.
	still bool

	saveMu    sync.Mutex
	save      *DeviceSave // begun by Stop, finished by SaveDeviceState
	stoppedAt time.Time
}

// StoppedAt is the earliest moment the guest may have been stopped for the
// last checkpoint (Stop returns a little after QEMU stopped it).
func (v *CaptureVM) StoppedAt() time.Time {
	v.saveMu.Lock()
	defer v.saveMu.Unlock()
	return v.stoppedAt
}

// Fence pauses the guest and keeps it paused across checkpoints. It
// counts as fenced only once QEMU confirmed the stop.
func (v *CaptureVM) Fence(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := Stop(ctx, v.G.Mon); err != nil {
		return err
	}
	v.fenced = true
	return nil
}

// Unfence resumes a fenced guest.
func (v *CaptureVM) Unfence(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := Cont(ctx, v.G.Mon); err != nil {
		return err
	}
	v.fenced, v.still = false, false
	return nil
}

// HeldStill reports whether the guest has been held fenced since a
// checkpoint captured it: there is nothing new to capture.
func (v *CaptureVM) HeldStill() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.fenced && v.still
}

// SetFenced marks a guest that is already paused (or must stay so) as
// fenced, without a QMP call.
func (v *CaptureVM) SetFenced(on bool) {
	v.mu.Lock()
	v.fenced = on
	v.mu.Unlock()
}

// Fenced reports whether the guest is held paused.
func (v *CaptureVM) Fenced() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.fenced
}

// Stop pauses the guest for a checkpoint by starting the migration of its
// device state: QEMU stops the guest itself once the non-shared RAM blocks
// are across, which saves the QMP stop's round trip and keeps the
// migration's setup out of the pause. It returns once the guest is
// stopped; SaveDeviceState then takes the rest of the stream.
func (v *CaptureVM) Stop(ctx context.Context) error {
	if err := os.WriteFile(v.Marker, nil, 0o600); err != nil {
		return err
	}
	sv, err := v.Sink.Begin(ctx, v.G)
	if err != nil {
		return err
	}
	v.saveMu.Lock()
	v.save, v.stoppedAt = sv, sv.StoppedAt()
	v.saveMu.Unlock()
	return nil
}

func (v *CaptureVM) takeSave() *DeviceSave {
	v.saveMu.Lock()
	defer v.saveMu.Unlock()
	sv := v.save
	v.save = nil
	return sv
}

func (v *CaptureVM) Cont(ctx context.Context) error {
	if sv := v.takeSave(); sv != nil {
		sv.Abandon(ctx) // the checkpoint failed before its device state was read
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.fenced {
		if err := Cont(ctx, v.G.Mon); err != nil {
			return err
		}
	} else {
		v.still = true
	}
	return os.Remove(v.Marker)
}

func (v *CaptureVM) SaveDeviceState(ctx context.Context, w io.Writer) (int64, error) {
	sv := v.takeSave()
	if sv == nil {
		return 0, errors.New("device state: no save under way (Stop did not run)")
	}
	return sv.Finish(ctx, w)
}

// Quiesced runs fn with the guest paused (its block I/O drained) and
// resumes it after, unless it is fenced: a fence cannot slip in between,
// since Fence takes the same lock. QEMU 7.2 was seen to crash (SIGSEGV)
// force-cancelling a write-blocking mirror while the guest wrote; the
// agent cancels mirrors through this.
func (v *CaptureVM) Quiesced(ctx context.Context, fn func() error) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.fenced {
		return fn()
	}
	if st, err := Status(ctx, v.G.Mon); err != nil || st != "running" {
		return fn() // paused already (by its owner): leave it so
	}
	if err := os.WriteFile(v.Marker, nil, 0o600); err != nil {
		return err
	}
	if err := Stop(ctx, v.G.Mon); err != nil {
		return err
	}
	ferr := fn()
	if err := Cont(context.WithoutCancel(ctx), v.G.Mon); err != nil {
		return errors.Join(ferr, fmt.Errorf("resume the guest: %w", err))
	}
	_ = os.Remove(v.Marker)
	return ferr
}

// LeftPaused reports whether a dead agent left the guest paused
// mid-checkpoint, and cancels the migration it left behind; the guest
// stays paused.
func LeftPaused(ctx context.Context, g *Guest, marker string) (bool, error) {
	if _, err := os.Stat(marker); err != nil {
		return false, nil
	}
	_ = Exec(ctx, g.Mon, "migrate_cancel", nil, nil)
	st, err := Status(ctx, g.Mon)
	if err != nil {
		return false, err
	}
	return st != "running", nil
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
