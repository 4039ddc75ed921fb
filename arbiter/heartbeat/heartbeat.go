// Package heartbeat is a k-missed heartbeat failure detector.
//
// # Why k-missed and not phi-accrual
//
// Peers send heartbeats at a fixed Interval. A peer is suspected once no
// heartbeat has arrived for Missed consecutive intervals, i.e. after
// Timeout = Interval × Missed of silence. The detection time is therefore a
// constant that can be compared directly with the arbiter lease duration:
// a suspicion must be raised well before the primary's lease runs out, or
// failover waits for the lease anyway. Phi-accrual adapts the threshold to
// the observed arrival history, which helps on jittery WANs but makes the
// worst-case detection time depend on history (a long quiet period stretches
// it), which is exactly the number we need to bound. The links here are
// LANs with small, stable jitter, so a fixed bound is the better trade.
//
// The detector is only advisory. A false suspicion costs one request to the
// arbiter, which refuses it while the primary's lease is valid; safety comes
// from leases and fencing epochs, never from this package.
//
// # Parameters
//
// Defaults: Interval 100 ms, Missed 5, so Timeout is 500 ms, a sixth of the
// default 3 s lease: failover within a second (README). Agents send each
// heartbeat on two connections, or one lost packet's retransmission would
// outlast it. Keep Timeout at or below half the lease duration.
// Peers that have never been heard from are measured from the moment they
// were added (Watch) or the detector was created, so a restart of the
// observer does not instantly suspect everyone.
package heartbeat

import (
	"sort"
	"sync"
	"time"
)

// Defaults; see the package documentation.
const (
	DefaultInterval = 100 * time.Millisecond
	DefaultMissed   = 5
)

// Clock abstracts time for tests.
type Clock interface {
	Now() time.Time
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

// Config sets the heartbeat interval peers use and how many consecutive
// intervals may pass without a heartbeat before a peer is suspected.
type Config struct {
	Interval time.Duration
	Missed   int
}

// Timeout is the silence after which a peer is suspected.
func (c Config) Timeout() time.Duration {
	c = c.withDefaults()
	return c.Interval * time.Duration(c.Missed)
}

func (c Config) withDefaults() Config {
	if c.Interval <= 0 {
		c.Interval = DefaultInterval
	}
	if c.Missed <= 0 {
		c.Missed = DefaultMissed
	}
	return c
}

// PeerState is a snapshot of one peer.
type PeerState struct {
	Peer string
	// LastSeen is the arrival time of the latest heartbeat; zero if none.
	LastSeen time.Time
	// Missed is the number of whole intervals elapsed since the reference
	// time (LastSeen, or when the peer was first watched).
	Missed    int
	Suspected bool
}

// Transition reports a change of a peer's suspicion, as seen by Check.
type Transition struct {
	Peer      string
	Suspected bool
	At        time.Time
}

// Detector tracks any number of peers. It is safe for concurrent use.
type Detector struct {
	cfg   Config
	clock Clock
	start time.Time

	mu    sync.Mutex
	peers map[string]*peer
}

type peer struct {
	since     time.Time // reference time when no heartbeat has been seen
	lastSeen  time.Time
	suspected bool // as last reported by Check
}

// New returns a detector. A nil clock means the real clock.
func New(cfg Config, clock Clock) *Detector {
	if clock == nil {
		clock = realClock{}
	}
	now := clock.Now()
	return &Detector{cfg: cfg.withDefaults(), clock: clock, start: now, peers: map[string]*peer{}}
}

// Config returns the effective configuration.
func (d *Detector) Config() Config { return d.cfg }

// Watch starts tracking a peer that has not sent a heartbeat yet; it gets
// a full Timeout of grace from now. Watching a known peer does nothing.
func (d *Detector) Watch(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.peers[name]; !ok {
		d.peers[name] = &peer{since: d.clock.Now()}
	}
}

// Forget stops tracking a peer.
func (d *Detector) Forget(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.peers, name)
}

// Heartbeat records that a heartbeat from name arrived now.
func (d *Detector) Heartbeat(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.clock.Now()
	p, ok := d.peers[name]
	if !ok {
		p = &peer{since: now}
		d.peers[name] = p
	}
	p.lastSeen = now
}

// State returns the state of name. An unknown peer is measured from the
// detector's creation, so it becomes suspected Timeout after start.
func (d *Detector) State(name string) PeerState {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stateLocked(name, d.clock.Now())
}

// Suspected is shorthand for State(name).Suspected.
func (d *Detector) Suspected(name string) bool { return d.State(name).Suspected }

func (d *Detector) stateLocked(name string, now time.Time) PeerState {
	ref := d.start
	var last time.Time
	if p, ok := d.peers[name]; ok {
		ref, last = p.since, p.lastSeen
		if !last.IsZero() {
			ref = last
		}
	}
	silent := now.Sub(ref)
	missed := 0
	if silent > 0 {
		missed = int(silent / d.cfg.Interval)
	}
	return PeerState{
		Peer:      name,
		LastSeen:  last,
		Missed:    missed,
		Suspected: missed >= d.cfg.Missed,
	}
}

// Peers returns the state of every tracked peer, sorted by name.
func (d *Detector) Peers() []PeerState {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.clock.Now()
	out := make([]PeerState, 0, len(d.peers))
	for name := range d.peers {
		out = append(out, d.stateLocked(name, now))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}

// Check returns the peers whose suspicion changed since the previous Check
// (a peer starts out trusted). Call it every Interval or so from the loop
// that acts on failures.
func (d *Detector) Check() []Transition {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.clock.Now()
	var out []Transition
	for name, p := range d.peers {
		s := d.stateLocked(name, now).Suspected
		if s != p.suspected {
			p.suspected = s
			out = append(out, Transition{Peer: name, Suspected: s, At: now})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}
