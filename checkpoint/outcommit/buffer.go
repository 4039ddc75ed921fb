// Package outcommit holds a protected guest's network output until the
// standby has acknowledged the epoch in which it was sent (the output
// commit of Remus): a client never sees output of guest state that a
// failover could lose.
//
// The agent calls, per epoch (see Buffer):
//
//	stop the guest (QMP stop returned)
//	buf.Cut(n)            // inside the pause: frames sent so far are epoch n
//	... capture, cont ...
//	on the standby's ack of n:   buf.Release(n)
//	on failover / fencing:       buf.DiscardAfter(lastAcked)
//
// Redirector is the QEMU backend (two filter-redirector objects and two
// socket chardevs, no kernel feature needed); Passthrough is the no-op
// Buffer for guests without output commit.
package outcommit

import (
	"time"
)

// Buffer holds a guest's network output per epoch.
type Buffer interface {
	// Cut closes the current epoch: called while the guest is paused (after QMP stop returned);
	// every frame the guest sent before the pause belongs to epoch, every later one to the next.
	// Epochs must increase from one Cut to the next.
	Cut(epoch uint64) error
	// Release sends on, in order, every held frame of epochs <= epoch.
	Release(epoch uint64) error
	// DiscardAfter drops held frames of epochs > epoch (and the open epoch).
	DiscardAfter(epoch uint64)
	// Stats returns counters and release latency.
	Stats() Stats
	// Close removes the filters: output flows directly again. Frames still
	// held are dropped (counted as discarded) unless ReleaseAll was called
	// before: then nothing is lost.
	Close() error
}

// Stats are a Buffer's counters. Byte counts are frame bytes as QEMU passes
// them (with the virtio-net header, without the stream's length fields).
type Stats struct {
	LastCut      uint64 // last epoch cut
	LastReleased uint64 // last epoch released

	HeldFrames int   // held now: epochs cut and not released, and the open epoch
	HeldBytes  int64 //
	OpenFrames int   // of those, in the open epoch

	ReleasedFrames, ReleasedBytes uint64 // sent on after their epoch was released
	// Forwarded frames were sent on without being held: before the first
	// Cut (unless Options.HoldFromStart) and after ReleaseAll.
	ForwardedFrames, ForwardedBytes uint64
	// Dropped frames came while the buffer held Options.MaxBytes (the
	// guest's TCP retransmits them).
	DroppedFrames, DroppedBytes uint64
	// Discarded frames were dropped by DiscardAfter or Close.
	DiscardedFrames, DiscardedBytes uint64
	// MisalignedFrames straddled a cut (began before it, ended after it);
	// they were given to the later epoch. Stays 0 with QEMU.
	MisalignedFrames uint64

	// Hold time of sent-on frames (the agent read the frame from QEMU ->
	// the agent wrote it back), over the last LatencySamples frames.
	ReleaseP50, ReleaseP99 time.Duration
	LatencySamples         int
}

// Passthrough is the Buffer of a guest without output commit: its output is
// never held, and every method does nothing.
type Passthrough struct{}

var _ Buffer = Passthrough{}

func (Passthrough) Cut(uint64) error     { return nil }
func (Passthrough) Release(uint64) error { return nil }
func (Passthrough) DiscardAfter(uint64)  {}
func (Passthrough) Stats() Stats         { return Stats{} }
func (Passthrough) ReleaseAll() error    { return nil }
func (Passthrough) Close() error         { return nil }
func (Passthrough) Detach()              {}
