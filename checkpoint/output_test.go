package checkpoint

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// checkingOutput is an OutputBuffer that checks the capture loop's side of
// output commit: cuts only while the guest is paused, in increasing
// order, and releases only of epochs the standby has committed.
type checkingOutput struct {
	rg *rig

	mu         sync.Mutex
	cuts       []uint64
	released   uint64
	releases   int
	violations []string
	failCut    func(epoch uint64) error
}

func (o *checkingOutput) Cut(epoch uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.failCut != nil {
		if err := o.failCut(epoch); err != nil {
			return err
		}
	}
	o.rg.vm.mu.Lock()
	running := o.rg.vm.running
	o.rg.vm.mu.Unlock()
	if running {
		o.violations = append(o.violations, fmt.Sprintf("Cut(%d) while the guest runs: the cut is not exact", epoch))
	}
	if n := len(o.cuts); n > 0 && epoch <= o.cuts[n-1] {
		o.violations = append(o.violations, fmt.Sprintf("Cut(%d) after Cut(%d): epochs must increase", epoch, o.cuts[n-1]))
	}
	o.cuts = append(o.cuts, epoch)
	return nil
}

func (o *checkingOutput) Release(epoch uint64) error {
	committed := o.rg.sb.lastCommitted()
	o.mu.Lock()
	defer o.mu.Unlock()
	if epoch > committed {
		o.violations = append(o.violations, fmt.Sprintf("Release(%d) while the standby committed only %d: output of a lost epoch escapes", epoch, committed))
	}
	if epoch <= o.released {
		o.violations = append(o.violations, fmt.Sprintf("Release(%d) after Release(%d)", epoch, o.released))
	}
	o.released = epoch
	o.releases++
	return nil
}

func (o *checkingOutput) state() (released uint64, cuts int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.released, len(o.cuts)
}

func (o *checkingOutput) check(t *testing.T) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, v := range o.violations {
		t.Error(v)
	}
}

func TestPrimaryOutputCommit(t *testing.T) {
	out := &checkingOutput{}
	rg := startRig(t, rigOpts{pages: 1024, output: func(rg *rig) OutputBuffer { out.rg = rg; return out }})
	wait(t, 15*time.Second, "output of 10 epochs released", func() bool { r, _ := out.state(); return r >= 10 })
	rg.checkConverged()
	out.check(t)
	released, cuts := out.state()
	if acked := rg.p.Status().AckedEpoch; released != acked {
		t.Errorf("released up to epoch %d, acked %d: every acked epoch's output must go out", released, acked)
	}
	if uint64(cuts) != rg.p.Status().Epoch {
		t.Errorf("%d cuts for %d captured epochs", cuts, rg.p.Status().Epoch)
	}
}

// An epoch the standby committed but whose ack was lost is released once
// the next session's welcome says it was committed, even if no later
// epoch is ever acknowledged.
func TestPrimaryOutputReleasedOnLostAck(t *testing.T) {
	out := &checkingOutput{}
	rg := startRig(t, rigOpts{pages: 1024, maxInFlight: 8, interval: 60 * time.Millisecond,
		output: func(rg *rig) OutputBuffer { out.rg = rg; return out },
		standby: func(s *testStandby) {
			s.onFrame = func(sess int, f Frame) action {
				switch {
				case sess == 0 && f.Type == FrameEpochEnd && f.Epoch >= 4:
					return actCommitThenClose
				case sess > 0 && f.Type == FrameEpochEnd:
					return actNoAck
				}
				return actProcess
			}
		}})
	wait(t, 15*time.Second, "a second session", func() bool { return rg.sb.sessionCount() >= 2 })
	k := rg.sb.droppedAt()
	wait(t, 10*time.Second, fmt.Sprintf("output of the unacked but committed epoch %d released", k), func() bool {
		r, _ := out.state()
		return r >= k
	})
	rg.stop()
	out.check(t)
}

// A failed cut fails the capture (the guest is resumed) and the session;
// output is never released past what was acknowledged.
func TestPrimaryOutputCutFailure(t *testing.T) {
	out := &checkingOutput{}
	out.failCut = func(epoch uint64) error {
		if epoch == 5 {
			return errors.New("filter gone")
		}
		return nil
	}
	rg := startRig(t, rigOpts{pages: 1024, output: func(rg *rig) OutputBuffer { out.rg = rg; return out }})
	wait(t, 15*time.Second, "output released past the failed cut", func() bool { r, _ := out.state(); return r >= 8 })
	if d := rg.dials.Load(); d < 2 {
		t.Errorf("%d dials: the failed cut should have ended the session", d)
	}
	rg.checkConverged()
	out.check(t)
}

// A new fencing epoch restarts the session, so no frame of the old epoch
// follows (the standby may know the new one already and refuse it).
func TestPrimarySetFenceRestartsSession(t *testing.T) {
	rg := startRig(t, rigOpts{pages: 1024})
	wait(t, 15*time.Second, "5 committed epochs", func() bool { return rg.sb.lastCommitted() >= 5 })
	rg.sb.fence.Store(testFence + 1)
	rg.p.SetFence(testFence + 1)
	wait(t, 15*time.Second, "a second session", func() bool { return rg.sb.sessionCount() >= 2 })
	k := rg.sb.lastCommitted()
	wait(t, 15*time.Second, "epochs in the new session", func() bool { return rg.sb.lastCommitted() >= k+3 })
	if got := rg.p.Fence(); got != testFence+1 {
		t.Fatalf("fence %d", got)
	}
	rg.checkConverged()
}

// waitingOutput is a checkingOutput that says when output is held.
type waitingOutput struct {
	checkingOutput
	waiting chan struct{}
}

func (o *waitingOutput) Waiting() <-chan struct{} { return o.waiting }

// Held output starts a checkpoint at once (no sooner than MinInterval
// after the last), not at the next tick; with nothing held only the
// interval does. The hour-long interval is the negative control: without
// the trigger, no epoch follows the first.
func TestPrimaryOutputTriggersEpochs(t *testing.T) {
	out := &waitingOutput{waiting: make(chan struct{}, 1)}
	rg := startRig(t, rigOpts{pages: 1024, interval: time.Hour,
		output: func(rg *rig) OutputBuffer { out.rg = rg; return out },
		config: func(c *PrimaryConfig) { c.MinInterval = 5 * time.Millisecond }})
	wait(t, 15*time.Second, "the first (full) epoch acknowledged", func() bool { return rg.p.Status().AckedEpoch >= 1 })
	time.Sleep(100 * time.Millisecond)
	if _, cuts := out.state(); cuts != 1 {
		t.Fatalf("%d epochs with nothing held and an hour-long interval, want 1", cuts)
	}
	for i := 0; i < 5; i++ {
		out.waiting <- struct{}{}
		wait(t, 10*time.Second, "an epoch for the held output", func() bool { _, cuts := out.state(); return cuts >= i+2 })
	}
	if n := rg.p.Status().OutputTriggered; n != 5 {
		t.Errorf("%d epochs counted as started by output, want 5", n)
	}
	out.check(t)
	rg.checkConverged()
}
