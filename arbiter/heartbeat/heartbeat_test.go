package heartbeat

import (
	"sync"
	"testing"
	"time"
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newFake() *fakeClock { return &fakeClock{t: time.Unix(1_700_000_000, 0)} }

func TestDefaults(t *testing.T) {
	d := New(Config{}, newFake())
	if got := d.Config(); got.Interval != DefaultInterval || got.Missed != DefaultMissed {
		t.Fatalf("defaults: %+v", got)
	}
	if got := (Config{}).Timeout(); got != 500*time.Millisecond {
		t.Fatalf("default timeout %v, want 500ms", got)
	}
}

func TestKMissed(t *testing.T) {
	clk := newFake()
	d := New(Config{Interval: 100 * time.Millisecond, Missed: 3}, clk)
	d.Heartbeat("b")

	steps := []struct {
		advance   time.Duration
		beat      bool
		missed    int
		suspected bool
	}{
		{advance: 0, missed: 0},
		{advance: 99 * time.Millisecond, missed: 0},
		{advance: 1 * time.Millisecond, missed: 1},
		{advance: 199 * time.Millisecond, missed: 2},
		{advance: 1 * time.Millisecond, missed: 3, suspected: true},
		{advance: 5 * time.Second, missed: 53, suspected: true},
		{advance: 0, beat: true, missed: 0}, // one heartbeat clears suspicion
		{advance: 250 * time.Millisecond, missed: 2},
		{advance: 0, beat: true, missed: 0},
	}
	for i, s := range steps {
		clk.Advance(s.advance)
		if s.beat {
			d.Heartbeat("b")
		}
		st := d.State("b")
		if st.Missed != s.missed || st.Suspected != s.suspected {
			t.Fatalf("step %d: got missed=%d suspected=%v, want %d %v", i, st.Missed, st.Suspected, s.missed, s.suspected)
		}
		if st.LastSeen.IsZero() {
			t.Fatalf("step %d: LastSeen not set", i)
		}
	}
}

func TestNeverHeardGetsGrace(t *testing.T) {
	clk := newFake()
	d := New(Config{Interval: time.Second, Missed: 2}, clk)
	if d.Suspected("x") {
		t.Fatal("unknown peer suspected at start")
	}
	clk.Advance(1500 * time.Millisecond)
	d.Watch("late") // added later: grace counts from now
	clk.Advance(time.Second)
	if !d.Suspected("x") {
		t.Fatal("unknown peer not suspected after timeout since start")
	}
	if d.Suspected("late") {
		t.Fatal("watched peer suspected before its own grace ran out")
	}
	clk.Advance(time.Second)
	if !d.Suspected("late") {
		t.Fatal("watched peer never suspected")
	}
	if st := d.State("late"); !st.LastSeen.IsZero() {
		t.Fatalf("LastSeen = %v for a silent peer", st.LastSeen)
	}
	d.Forget("late")
	if len(d.Peers()) != 0 {
		t.Fatalf("peers after Forget: %v", d.Peers())
	}
}

func TestCheckTransitions(t *testing.T) {
	clk := newFake()
	d := New(Config{Interval: 100 * time.Millisecond, Missed: 2}, clk)
	d.Heartbeat("a")
	d.Heartbeat("b")
	if tr := d.Check(); len(tr) != 0 {
		t.Fatalf("initial transitions: %v", tr)
	}
	clk.Advance(150 * time.Millisecond)
	d.Heartbeat("a")
	clk.Advance(100 * time.Millisecond)
	tr := d.Check()
	if len(tr) != 1 || tr[0].Peer != "b" || !tr[0].Suspected {
		t.Fatalf("want b suspected, got %v", tr)
	}
	if tr := d.Check(); len(tr) != 0 {
		t.Fatalf("repeated transition: %v", tr)
	}
	d.Heartbeat("b")
	tr = d.Check()
	if len(tr) != 1 || tr[0].Peer != "b" || tr[0].Suspected {
		t.Fatalf("want b trusted again, got %v", tr)
	}
	ps := d.Peers()
	if len(ps) != 2 || ps[0].Peer != "a" || ps[1].Peer != "b" {
		t.Fatalf("Peers: %v", ps)
	}
}

func TestConcurrent(t *testing.T) {
	d := New(Config{Interval: time.Millisecond, Missed: 1}, nil)
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 200; j++ {
				d.Heartbeat("p")
				d.Check()
				d.Peers()
			}
		}()
	}
	wg.Wait()
}
