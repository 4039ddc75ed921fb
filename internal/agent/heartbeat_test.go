package agent

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/internal/agent/api"
)

// lane is a heartbeat connection that answers at once, or stalls (as a
// TCP connection does behind a lost packet) until released.
type lane struct {
	stalled atomic.Bool
	release chan struct{}
	calls   atomic.Int64
}

func (l *lane) Heartbeat(ctx context.Context, _ string, _ map[string]uint64) (arbiter.HeartbeatReply, error) {
	l.calls.Add(1)
	if l.stalled.Load() {
		select {
		case <-l.release:
		case <-ctx.Done():
			return arbiter.HeartbeatReply{}, ctx.Err()
		}
	}
	return arbiter.HeartbeatReply{SuspectAfter: time.Second}, nil
}

// heardAfterStall runs the heartbeat loop over lanes, stalls the first
// one, and reports how long ago the arbiter was last heard after 500 ms.
func heardAfterStall(t *testing.T, lanes ...*lane) time.Duration {
	t.Helper()
	hl := make([]heartbeater, len(lanes))
	for i, l := range lanes {
		l.release = make(chan struct{})
		hl[i] = l
	}
	a := &Agent{cfg: api.Config{AgentID: "host-a", HeartbeatInterval: 10 * time.Millisecond}, arb: &fakeArbiter{}, heartbeatLanes: hl, guests: map[string]*guest{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.arbiterHeartbeat(ctx); close(done) }()
	defer func() { cancel(); close(lanes[0].release); <-done }()
	time.Sleep(50 * time.Millisecond)
	if heard, _ := a.arbiterContact(); heard.IsZero() {
		t.Fatal("no heartbeat answered before the stall")
	}
	lanes[0].stalled.Store(true)
	time.Sleep(500 * time.Millisecond)
	heard, _ := a.arbiterContact()
	return time.Since(heard)
}

// One stalled connection does not silence the agent at the arbiter while
// another carries the heartbeats; the control: a single connection that
// stalls does.
func TestHeartbeatLanes(t *testing.T) {
	stalled, other := &lane{}, &lane{}
	if age := heardAfterStall(t, stalled, other); age > 250*time.Millisecond {
		t.Errorf("two lanes, one stalled: arbiter last heard %v ago", age)
	}
	if stalled.calls.Load() > 10 {
		t.Errorf("the stalled lane took %d heartbeats: one at a time, not one per tick", stalled.calls.Load())
	}
	if age := heardAfterStall(t, &lane{}); age < 450*time.Millisecond {
		t.Errorf("one stalled lane: arbiter last heard %v ago, want the whole stall", age)
	}
}
