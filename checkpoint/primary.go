package checkpoint

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/remora-ha/remora/internal/stats"
)

// VM is what the capture loop needs from the hypervisor for one guest.
type VM interface {
	Stop(ctx context.Context) error
	Cont(ctx context.Context) error
	// SaveDeviceState writes the stopped guest's device state to w.
	SaveDeviceState(ctx context.Context, w io.Writer) (int64, error)
}

// PrimaryConfig configures the capture side of one protected guest.
type PrimaryConfig struct {
	Agent     string        // this agent's id
	Guest     string        // the guest's name
	DomainXML string        // migratable XML the standby derives its shell from
	ShellBase string        // the standby names its shell after this (default Guest)
	Home      string        // the agent the guest was first enrolled from
	Interval  time.Duration // time between checkpoints
	// MinInterval, when set and Output is an OutputWaiter, starts a
	// checkpoint as soon as the guest has output held, no sooner than
	// MinInterval after the last one began: replies wait for one pause
	// and one round trip, not for the next tick. An idle guest still
	// checkpoints every Interval.
	MinInterval time.Duration
	MaxInFlight int    // captured epochs not yet acked before capture waits
	Fence       uint64 // fencing epoch every frame carries
	Dial        func(ctx context.Context) (net.Conn, error)
	// VerifyPeer, when set, checks the connection against the agent id the
	// standby announced (its TLS certificate must name it).
	VerifyPeer func(conn net.Conn, agent string) error
	Log        *slog.Logger
	// Hook, when set, is called at named points of the epoch cycle
	// ("captured", "transfer", "acked"); tests use it to crash there.
	Hook func(point string, epoch uint64)
	// Output, when set, holds the guest's network output until the epoch
	// it was sent in is acknowledged (Remus output commit).
	Output OutputBuffer
	// Disks, when set, are the guest's mirrored disks: their writes are cut
	// into the epoch while the guest is paused.
	Disks DiskCutter
	// DiskSpecs tell the standby which disks to keep replica images of.
	DiskSpecs []DiskSpec
	// PeerTimeout bounds what waits on the standby while the guest is
	// paused (the disk cut, and QMP stop, which drains the guest's writes
	// to the standby's mirror), so a silent standby cannot hold the guest
	// paused longer than the failure detector takes to suspect it.
	// Default 30 s.
	PeerTimeout time.Duration
	// PrepareSession runs once a session's handshake is done, before
	// anything is captured (to bring the disk mirrors up to date). resync
	// says it reset the standby's replica: the session starts with a full
	// epoch. An error ends the session, which is retried with backoff.
	PrepareSession func(ctx context.Context) (resync bool, err error)
	// ArbiterVouches, when set, says whether the arbiter cannot be
	// promoting the standby now (the lease holds and the arbiter answered
	// lately): an acknowledgement after the ack window may then still
	// release output, since no promoted copy can be serving yet.
	ArbiterVouches func(now time.Time) bool
}

// DiskCutter seals the guest's disk writes since the last cut as epoch's,
// on the standby; called while the guest is paused.
type DiskCutter interface {
	Cut(ctx context.Context, epoch uint64) error
}

// OutputBuffer is the part of an output-commit buffer the capture loop
// drives (package outcommit implements it).
type OutputBuffer interface {
	// Cut closes the open epoch; called while the guest is paused.
	Cut(epoch uint64) error
	// Release sends on the output of every epoch <= epoch.
	Release(epoch uint64) error
}

// OutputWaiter is an OutputBuffer that says when output is held in the
// open epoch, so the capture loop checkpoints then instead of at the next
// tick (PrimaryConfig.MinInterval).
type OutputWaiter interface {
	Waiting() <-chan struct{}
}

// Replication states of a protected guest, primary side.
const (
	StateConnecting = "connecting" // no session with the standby yet
	StateSyncing    = "syncing"    // initial full copy in flight
	StateProtected  = "protected"  // standby holds a recent epoch
	StateDegraded   = "degraded"   // was protected, lost the standby; retrying
	StateStopped    = "stopped"
)

// PrimaryStatus is a snapshot of the capture side's figures.
type PrimaryStatus struct {
	State           string         `json:"state"`
	Generation      string         `json:"generation"`
	Tracker         string         `json:"tracker"`
	Epoch           uint64         `json:"epoch"`       // last captured
	Started         uint64         `json:"started"`     // last whose capture began (the guest was paused for it)
	AckedEpoch      uint64         `json:"acked_epoch"` // last acknowledged by the standby
	EpochsPerSec    float64        `json:"epochs_per_sec"`
	PauseP50        time.Duration  `json:"pause_p50_ns"`
	PauseP99        time.Duration  `json:"pause_p99_ns"`
	PauseMax        time.Duration  `json:"pause_max_ns"`            // the longest pause of an incremental epoch so far
	DirtyPages      uint64         `json:"dirty_pages"`             // in the last epoch
	DirtyTotal      uint64         `json:"dirty_total"`             // pages sent in incremental epochs, all sessions
	Incremental     uint64         `json:"incremental"`             // incremental epochs captured
	SyncPause       time.Duration  `json:"sync_pause_ns"`           // pause of the last full sync or resync (not in the percentiles)
	SyncPages       uint64         `json:"sync_pages"`              // pages the last (re)sync sent: all, or those that differed
	DevStateBytes   int64          `json:"devstate_bytes"`          // in the last epoch
	OutputTriggered uint64         `json:"output_triggered_epochs"` // epochs started early because output was held
	DevStateWire    int64          `json:"devstate_wire_bytes"`     // the last epoch's on the wire (a delta, compressed)
	BytesSent       uint64         `json:"bytes_sent"`              // on the wire, all sessions
	PageWireBytes   uint64         `json:"page_wire_bytes"`         // of which page batches (lz4, zero pages elided)
	RawBytes        uint64         `json:"raw_bytes"`               // page and device data before encoding
	Lag             time.Duration  `json:"lag_ns"`                  // age of the oldest unacked epoch
	SyncDone        uint64         `json:"sync_done_bytes"`         // progress of a full sync
	SyncTotal       uint64         `json:"sync_total_bytes"`
	LastPause       PauseBreakdown `json:"last_pause"`
	PauseMedian     PauseBreakdown `json:"pause_breakdown_p50"`      // each step's median over the recent incremental epochs
	Standby         string         `json:"standby,omitempty"`        // the standby agent's id, from its welcome
	LastAck         time.Time      `json:"last_ack,omitzero"`        // when an acknowledgement last released output
	LastTimelyAck   time.Time      `json:"last_timely_ack,omitzero"` // when one last came within the ack window (Welcome.AckWindowMs)
	StaleAcks       uint64         `json:"stale_acks"`               // acknowledgements after the ack window (they release output only while the arbiter vouches)
	LastError       string         `json:"last_error,omitempty"`
	OutputError     string         `json:"output_error,omitempty"` // the last output release failed
	NextRetry       time.Time      `json:"next_retry,omitempty"`
	ConnectedSince  time.Time      `json:"connected_since,omitempty"`
}

// PauseBreakdown splits one checkpoint's pause into its steps.
type PauseBreakdown struct {
	Stop     time.Duration `json:"stop_ns"`     // from the guest's stop until the agent knew of it
	Cut      time.Duration `json:"cut_ns"`      // output and disk cut (one round trip to the standby)
	Track    time.Duration `json:"track_ns"`    // dirty log: which pages changed
	Copy     time.Duration `json:"copy_ns"`     // copying those pages aside
	DevState time.Duration `json:"devstate_ns"` // rest of the device state (overlaps Track and Copy)
	Cont     time.Duration `json:"cont_ns"`     // QMP cont
	Total    time.Duration `json:"total_ns"`
}

// breakdownWindow keeps the recent pause breakdowns.
type breakdownWindow struct {
	buf  [256]PauseBreakdown
	n    int
	next int
}

func (w *breakdownWindow) add(b PauseBreakdown) {
	w.buf[w.next] = b
	w.next = (w.next + 1) % len(w.buf)
	w.n = min(w.n+1, len(w.buf))
}

// median is each step's median (so the steps need not add up to Total's).
func (w *breakdownWindow) median() PauseBreakdown {
	var m PauseBreakdown
	if w.n == 0 {
		return m
	}
	field := func(get func(*PauseBreakdown) time.Duration) time.Duration {
		ds := make([]time.Duration, w.n)
		for i := range ds {
			ds[i] = get(&w.buf[i])
		}
		return stats.Percentile(ds, 50)
	}
	m.Stop = field(func(b *PauseBreakdown) time.Duration { return b.Stop })
	m.Cut = field(func(b *PauseBreakdown) time.Duration { return b.Cut })
	m.Track = field(func(b *PauseBreakdown) time.Duration { return b.Track })
	m.Copy = field(func(b *PauseBreakdown) time.Duration { return b.Copy })
	m.DevState = field(func(b *PauseBreakdown) time.Duration { return b.DevState })
	m.Cont = field(func(b *PauseBreakdown) time.Duration { return b.Cont })
	m.Total = field(func(b *PauseBreakdown) time.Duration { return b.Total })
	return m
}

// HeldStill is a VM that can say its guest has been held paused since a
// checkpoint captured it: nothing changed to capture, and QEMU could not
// be stopped for another (the engine keeps the session, with pings).
type HeldStill interface {
	HeldStill() bool
}

// StopClock is a VM whose Stop returns some time after the guest stopped
// (QEMU stops it during the device-state migration); StoppedAt is the
// earliest moment it may have, so that the pause is measured from there.
type StopClock interface {
	StoppedAt() time.Time
}

type capturedEpoch struct {
	epoch    uint64
	full     bool
	base     bool // the pages differing from the replica's hashes
	dirty    *Bitmap
	data     []byte // dirty pages in bitmap order
	devstate []byte
	at       time.Time
	// endSent is when the epoch's last frame began to go out (p.mu): the
	// standby acknowledges no sooner, so the ack window counts from here.
	endSent time.Time
}

// Primary checkpoints one guest and streams its epochs to the standby.
type Primary struct {
	cfg     PrimaryConfig
	vm      VM
	mem     []byte
	pages   uint64
	tracker Tracker
	gen     string
	log     *slog.Logger

	// capture state, touched only by the capture goroutine
	captured  uint64
	everSent  bool // a session ever reached the standby with this generation
	dirtyWork *Bitmap
	carry     *Bitmap // pages tracked by a capture that failed: sent next time

	fence atomic.Uint64 // fencing epoch stamped on every frame

	mu           sync.Mutex
	st           PrimaryStatus
	pauses       *stats.Window
	breakdowns   breakdownWindow
	epochRate    stats.Rate
	retained     []*capturedEpoch // captured, not yet acked: their bitmaps allow resume
	ackedEpoch   uint64
	releasable   uint64        // the newest acked epoch whose output may go out
	ackWindow    time.Duration // the standby's Welcome.AckWindowMs (0: none)
	ackCh        chan struct{}
	wasProtected bool

	releaseCh  chan struct{} // wakes the output releaser after an ack
	endSession context.CancelFunc
}

// NewPrimary prepares capture of a guest whose RAM is mem.
func NewPrimary(cfg PrimaryConfig, vm VM, mem []byte, tracker Tracker) *Primary {
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 3
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.PeerTimeout <= 0 {
		cfg.PeerTimeout = 30 * time.Second
	}
	var g [8]byte
	_, _ = rand.Read(g[:])
	p := &Primary{
		cfg: cfg, vm: vm, mem: mem, pages: uint64(len(mem) / PageSize), tracker: tracker,
		gen: hex.EncodeToString(g[:]), log: cfg.Log.With("guest", cfg.Guest),
		pauses: stats.NewWindow(1024), epochRate: stats.Rate{Span: 10 * time.Second},
		ackCh: make(chan struct{}, 1), releaseCh: make(chan struct{}, 1),
	}
	p.dirtyWork = NewBitmap(p.pages)
	p.carry = NewBitmap(p.pages)
	p.fence.Store(cfg.Fence)
	p.st = PrimaryStatus{State: StateConnecting, Generation: p.gen, Tracker: tracker.Name()}
	return p
}

// SetFence changes the fencing epoch of every frame from now on (a new
// epoch from the arbiter). The session is restarted so the standby sees it.
func (p *Primary) SetFence(f uint64) {
	if p.fence.Swap(f) == f {
		return
	}
	p.mu.Lock()
	restart := p.endSession
	p.mu.Unlock()
	if restart != nil {
		// Frames of the old epoch may still be queued: the standby, which
		// may have learnt the new epoch already, would refuse them.
		restart()
	}
}

// Fence returns the fencing epoch frames carry.
func (p *Primary) Fence() uint64 { return p.fence.Load() }

// LastAck is when the standby last acknowledged an epoch. It is cheap,
// unlike Status, for callers that poll it many times a second.
func (p *Primary) LastAck() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.st.LastAck
}

// Progress is the part of Status a coordinator polls many times a second.
type Progress struct {
	State          string
	LastAck        time.Time
	LastTimelyAck  time.Time
	ConnectedSince time.Time
	Started        uint64 // newest epoch whose capture began
	Captured       uint64 // newest epoch captured
	Acked          uint64 // newest epoch the standby acknowledged
	Standby        string // the standby agent's id, from its welcome
}

// Progress returns the replication's progress; it is cheap, unlike Status.
func (p *Primary) Progress() Progress {
	p.mu.Lock()
	defer p.mu.Unlock()
	return Progress{State: p.st.State, LastAck: p.st.LastAck, LastTimelyAck: p.st.LastTimelyAck, ConnectedSince: p.st.ConnectedSince,
		Started: p.st.Started, Captured: p.st.Epoch, Acked: p.ackedEpoch, Standby: p.st.Standby}
}

// Status returns current figures.
func (p *Primary) Status() PrimaryStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.st
	s.AckedEpoch = p.ackedEpoch
	now := time.Now()
	s.EpochsPerSec = p.epochRate.PerSecond(now)
	ps := p.pauses.Samples()
	s.PauseP50, s.PauseP99 = stats.Percentile(ps, 50), stats.Percentile(ps, 99)
	s.PauseMedian = p.breakdowns.median()
	if len(p.retained) > 0 {
		s.Lag = now.Sub(p.retained[0].at)
	}
	return s
}

func (p *Primary) setState(f func(*PrimaryStatus)) {
	p.mu.Lock()
	f(&p.st)
	p.mu.Unlock()
}

// Run replicates until ctx ends, reconnecting with backoff when the
// standby is unreachable. The guest is always left running.
func (p *Primary) Run(ctx context.Context) error {
	defer p.setState(func(s *PrimaryStatus) { s.State = StateStopped })
	if p.cfg.Output != nil {
		// Not derived from ctx: the releaser stops after the last session
		// has ended, so an ack that session took still lets its output out.
		rctx, stopReleaser := context.WithCancel(context.WithoutCancel(ctx))
		done := make(chan struct{})
		go func() { defer close(done); p.releaseLoop(rctx) }()
		defer func() { stopReleaser(); <-done }()
	}
	retry := sessionBackoff{first: 200 * time.Millisecond, max: 10 * time.Second}
	for ctx.Err() == nil {
		start := time.Now()
		p.mu.Lock()
		ackedBefore := p.ackedEpoch
		p.mu.Unlock()
		err := p.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var pe *PeerError
		if errors.As(err, &pe) && pe.Fatal {
			p.setState(func(s *PrimaryStatus) { s.LastError = err.Error() })
			p.log.Error("standby refused replication", "err", err)
			return err
		}
		p.mu.Lock()
		backoff := retry.after(p.ackedEpoch > ackedBefore || time.Since(start) > 10*time.Second)
		if p.wasProtected {
			p.st.State = StateDegraded
		} else {
			p.st.State = StateConnecting
		}
		p.st.LastError = err.Error()
		p.st.NextRetry = time.Now().Add(backoff)
		p.st.ConnectedSince = time.Time{}
		p.mu.Unlock()
		p.log.Warn("replication session ended; retrying", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
	}
	return nil
}

// sessionBackoff is the wait before the next replication session: it
// doubles after each failed session, up to max, and starts over at first
// after one that was no failed attempt (it got an epoch acknowledged, or
// lasted): back-to-back standby faults must not each wait longer.
type sessionBackoff struct {
	first, max, cur time.Duration
}

func (b *sessionBackoff) after(sessionOK bool) time.Duration {
	if sessionOK || b.cur == 0 {
		b.cur = b.first
	} else {
		b.cur = min(b.cur*2, b.max)
	}
	return b.cur
}

func (p *Primary) session(ctx context.Context) error {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := p.cfg.Dial(dctx)
	cancel()
	if err != nil {
		return fmt.Errorf("connect to standby: %w", err)
	}
	defer conn.Close()
	ctx, cancelSession := context.WithCancel(ctx)
	defer cancelSession()
	p.mu.Lock()
	p.endSession = cancelSession
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.endSession = nil
		p.mu.Unlock()
	}()
	go func() { <-ctx.Done(); conn.Close() }()

	hello := Hello{Agent: p.cfg.Agent, Guest: p.cfg.Guest, Generation: p.gen,
		RAMBytes: int64(len(p.mem)), PageSize: PageSize, DomainXML: p.cfg.DomainXML, ShellBase: p.cfg.ShellBase, Disks: p.cfg.DiskSpecs, Home: p.cfg.Home}
	// Every frame of the session carries the fence of its hello: SetFence
	// ends the session, and the next one says hello at the new fence.
	fence := p.fence.Load()
	helloAt := time.Now()
	if err := WriteJSON(conn, FrameHello, fence, 0, hello); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(2 * time.Minute)) // the standby may be creating its shell
	br := bufio.NewReaderSize(conn, 1<<20)
	var w Welcome
	if _, err := ReadJSON(br, FrameWelcome, &w); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	hashes, err := readPageHashes(br, w.Hashes, p.pages)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	if p.cfg.VerifyPeer != nil {
		if err := p.cfg.VerifyPeer(conn, w.Agent); err != nil {
			return err
		}
	}

	if p.cfg.PrepareSession != nil {
		resync, err := p.cfg.PrepareSession(ctx)
		if err != nil {
			return err
		}
		if resync {
			// The standby's replica was reset: its epochs are gone, its
			// RAM (whose hashes it offered) is still there to resync
			// against; it refuses that if the RAM held no checkpoint.
			w.Generation, w.Committed = "", 0
		}
	}
	plan := p.resumePlan(w, hashes, helloAt)
	p.log.Info("replication session open", "standby", w.Agent, "full_sync", plan.full, "resync_against_replica", plan.base != nil, "standby_committed", w.Committed)
	p.setState(func(s *PrimaryStatus) {
		s.ConnectedSince, s.LastError, s.NextRetry, s.Standby = time.Now(), "", time.Time{}, w.Agent
		if plan.full || plan.base != nil {
			s.State = StateSyncing
		}
	})

	queue := make(chan *capturedEpoch, p.cfg.MaxInFlight)
	errc := make(chan error, 3)
	var wg sync.WaitGroup
	for _, loop := range []func() error{
		func() error { return p.sendLoop(ctx, conn, fence, queue) },
		func() error { return p.ackLoop(ctx, br) },
		func() error { return p.captureLoop(ctx, queue, plan) },
	} {
		wg.Add(1)
		go func() { defer wg.Done(); errc <- loop() }()
	}
	err = <-errc
	cancelSession()
	conn.Close()
	// A capture under way must finish (and resume the guest) before the
	// next session, or before Run returns and the caller unmaps guest RAM.
	wg.Wait()
	return err
}

// readPageHashes reads the page hashes a welcome announced.
func readPageHashes(r io.Reader, n, pages uint64) ([]uint64, error) {
	if n == 0 {
		return nil, nil
	}
	if n != pages {
		return nil, fmt.Errorf("protocol error: the standby offers %d page hashes, the guest has %d pages", n, pages)
	}
	hashes := make([]uint64, 0, n)
	for uint64(len(hashes)) < n {
		f, err := ReadFrame(r)
		if err != nil {
			return nil, err
		}
		if f.Type != FramePageHashes {
			return nil, fmt.Errorf("protocol error: got %s frame, want page hashes", f.Type)
		}
		if hashes, err = DecodePageHashes(hashes, f.Payload); err != nil {
			return nil, err
		}
	}
	if uint64(len(hashes)) != n {
		return nil, fmt.Errorf("protocol error: %d page hashes, announced %d", len(hashes), n)
	}
	return hashes, nil
}

// sessionPlan is what the first epoch of a session carries.
type sessionPlan struct {
	resend *Bitmap  // pages to send again on top of the tracker's (incremental)
	full   bool     // every page
	base   []uint64 // the pages that differ from these hashes of the replica
}

// resumePlan decides what the first epoch of a session must carry. hashes
// are the standby's replica page hashes, when it offered them.
func (p *Primary) resumePlan(w Welcome, hashes []uint64, helloAt time.Time) sessionPlan {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ackWindow = time.Duration(w.AckWindowMs) * time.Millisecond
	if w.Generation != p.gen || !p.everSent || w.Committed < p.ackedEpoch {
		p.retained = nil
		// Epoch numbers only grow on the standby, across our restarts too.
		p.captured = max(p.captured, w.Committed)
		if hashes != nil {
			return sessionPlan{base: hashes}
		}
		return sessionPlan{full: true}
	}
	if w.Committed == 0 {
		p.retained = nil // the standby holds nothing of ours (it was reset)
		return sessionPlan{full: true}
	}
	// Unacknowledged epochs are folded into the carry bitmap, which the
	// next successful capture sends (current contents) and only then clears.
	for _, e := range p.retained {
		if e.epoch > w.Committed {
			p.carry.Or(e.dirty)
		}
	}
	p.retained = nil
	resend := NewBitmap(p.pages) // empty: the carry has it all
	if w.Committed > p.ackedEpoch {
		// The standby committed epochs whose acks we never read.
		p.ackedEpoch = w.Committed
		if p.inAckWindow(helloAt) {
			p.releasable = max(p.releasable, w.Committed)
			p.wakeReleaser()
		}
	}
	return sessionPlan{resend: resend}
}

func (p *Primary) captureLoop(ctx context.Context, queue chan<- *capturedEpoch, plan sessionPlan) error {
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	var waiting <-chan struct{}
	if w, ok := p.cfg.Output.(OutputWaiter); ok && p.cfg.MinInterval > 0 && p.cfg.MinInterval < p.cfg.Interval {
		waiting = w.Waiting()
	}
	var last time.Time
	for first := true; ; first = false {
		if !first {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-t.C:
			case <-waiting:
				if d := p.cfg.MinInterval - time.Since(last); d > 0 {
					select {
					case <-ctx.Done():
						return ctx.Err()
					case <-time.After(d):
					}
				}
				t.Reset(p.cfg.Interval)
				p.mu.Lock()
				p.st.OutputTriggered++
				p.mu.Unlock()
			}
		}
		last = time.Now()
		// Backpressure: capture waits while too many epochs are unacked.
		for p.inFlight() >= p.cfg.MaxInFlight {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-p.ackCh:
			}
		}
		ep, err := p.capture(ctx, plan)
		if errors.Is(err, errHeldStill) {
			continue // held paused since its last checkpoint: nothing new
		}
		if err != nil {
			return err
		}
		plan = sessionPlan{} // incremental from here on
		select {
		case queue <- ep:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (p *Primary) inFlight() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.retained)
}

// capture takes one checkpoint: the guest is paused only while its dirty
// pages are copied and its device state is saved.
func (p *Primary) capture(ctx context.Context, plan sessionPlan) (*capturedEpoch, error) {
	if h, ok := p.vm.(HeldStill); ok && h.HeldStill() {
		return nil, errHeldStill
	}
	p.captured++
	full, extra := plan.full, plan.resend
	ep := &capturedEpoch{epoch: p.captured, full: full, base: plan.base != nil}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()

	p.mu.Lock()
	p.st.Started = ep.epoch
	p.mu.Unlock()
	start := time.Now() // moved back to the guest's stop once known
	peerCtx, peerCancel := context.WithTimeout(cctx, p.cfg.PeerTimeout)
	defer peerCancel()
	resumed := false
	resume := func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		_ = p.vm.Cont(ctx)
		cancel()
	}
	if err := p.vm.Stop(peerCtx); err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			// The answer was lost to the context (the agent stopping),
			// not the command: QEMU may have paused the guest anyway.
			resume()
		}
		return nil, fmt.Errorf("pause guest: %w", err)
	}
	defer func() {
		if !resumed { // never leave the guest paused behind an error
			resume()
		}
	}()
	var bd PauseBreakdown
	if c, ok := p.vm.(StopClock); ok {
		if t := c.StoppedAt(); t.After(start) {
			start = t
		}
	}
	bd.Stop = time.Since(start)
	cutStart := time.Now()
	if p.cfg.Output != nil {
		// Every frame sent before the pause belongs to this epoch.
		if err := p.cfg.Output.Cut(ep.epoch); err != nil {
			return nil, fmt.Errorf("output commit: cut epoch %d: %w", ep.epoch, err)
		}
	}
	if p.cfg.Disks != nil {
		// stop drained the guest's I/O and every mirrored write was
		// acknowledged before the guest saw it complete: the cut is exact.
		if err := p.cfg.Disks.Cut(peerCtx, ep.epoch); err != nil {
			return nil, fmt.Errorf("disk: cut epoch %d: %w", ep.epoch, err)
		}
	}
	bd.Cut = time.Since(cutStart)
	if p.cfg.Hook != nil {
		p.cfg.Hook("captured", ep.epoch)
	}
	var devBuf sliceWriter
	devErr := make(chan error, 1)
	go func() {
		t := time.Now()
		_, err := p.vm.SaveDeviceState(cctx, &devBuf)
		bd.DevState = time.Since(t)
		devErr <- err
	}()
	trackStart := time.Now()

	dirty := p.dirtyWork
	dirty.Clear()
	var trackErr error
	if plan.base != nil {
		trackErr = p.trackAgainst(plan.base, dirty)
	} else {
		trackErr = p.tracker.Dirty(p.mem, dirty)
	}
	if full {
		dirty.SetAll()
	}
	if extra != nil {
		dirty.Or(extra)
	}
	dirty.Or(p.carry)
	captureOK := false
	defer func() {
		if !captureOK {
			p.carry.Or(dirty)
		}
	}()
	n := dirty.Count()
	bd.Track = time.Since(trackStart)
	copyStart := time.Now()
	if trackErr == nil {
		ep.data = copyPages(p.mem, dirty, n)
	}
	bd.Copy = time.Since(copyStart)
	if err := <-devErr; err != nil {
		return nil, fmt.Errorf("save device state: %w", err)
	}
	if trackErr != nil {
		return nil, fmt.Errorf("dirty tracking (%s): %w", p.tracker.Name(), trackErr)
	}
	contStart := time.Now()
	if err := p.vm.Cont(cctx); err != nil {
		return nil, fmt.Errorf("resume guest: %w", err)
	}
	resumed = true
	captureOK = true
	p.carry.Clear()
	pause := time.Since(start)
	bd.Cont, bd.Total = time.Since(contStart), pause

	ep.dirty = dirty.Clone()
	ep.devstate = devBuf.b
	ep.at = start
	p.mu.Lock()
	p.retained = append(p.retained, ep)
	sync := full || ep.base
	if sync {
		p.st.SyncPause = pause
		p.st.SyncPages = n
	} else {
		p.pauses.Add(pause)
		p.breakdowns.add(bd)
		p.st.PauseMax = max(p.st.PauseMax, pause)
		p.st.DirtyTotal += n
		p.st.Incremental++
	}
	p.epochRate.Add(start)
	p.st.Epoch = ep.epoch
	p.st.DirtyPages = n
	p.st.LastPause = bd
	p.st.DevStateBytes = int64(len(ep.devstate))
	if sync {
		p.st.SyncDone, p.st.SyncTotal = 0, uint64(len(ep.data)+len(ep.devstate))
	}
	p.mu.Unlock()
	return ep, nil
}

// trackAgainst marks the pages that differ from base (the standby's page
// hashes) and restarts the tracker at this cut.
func (p *Primary) trackAgainst(base []uint64, dirty *Bitmap) error {
	if s, ok := p.tracker.(Seeder); ok {
		s.Seed(base)
		return p.tracker.Dirty(p.mem, dirty)
	}
	if err := p.tracker.Dirty(p.mem, NewBitmap(p.pages)); err != nil {
		return err
	}
	for i, h := range PageHashes(p.mem) {
		if h != base[i] {
			dirty.Set(uint64(i))
		}
	}
	return nil
}

// copyPages copies the n pages set in dirty out of mem, in bitmap order;
// large copies are split between the CPUs.
func copyPages(mem []byte, dirty *Bitmap, n uint64) []byte {
	data := make([]byte, n*PageSize)
	idx := make([]uint64, 0, n)
	dirty.Each(func(i uint64) { idx = append(idx, i) })
	copyRange := func(lo, hi int) {
		for j := lo; j < hi; j++ {
			i := idx[j]
			copy(data[j*PageSize:(j+1)*PageSize], mem[i*PageSize:(i+1)*PageSize])
		}
	}
	workers := runtime.GOMAXPROCS(0)
	if len(idx) < 1024 || workers == 1 { // 4 MiB: below it a goroutine costs more than it saves
		copyRange(0, len(idx))
		return data
	}
	per := (len(idx) + workers - 1) / workers
	var wg sync.WaitGroup
	for lo := 0; lo < len(idx); lo += per {
		wg.Add(1)
		go func(lo, hi int) { defer wg.Done(); copyRange(lo, hi) }(lo, min(lo+per, len(idx)))
	}
	wg.Wait()
	return data
}

// errHeldStill: the guest is held paused and was captured since.
var errHeldStill = errors.New("guest held paused since its last checkpoint")

type sliceWriter struct{ b []byte }

func (w *sliceWriter) Write(b []byte) (int, error) { w.b = append(w.b, b...); return len(b), nil }

// countingWriter counts wire bytes.
type countingWriter struct {
	w io.Writer
	n uint64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += uint64(n)
	return n, err
}

func (p *Primary) sendLoop(ctx context.Context, conn net.Conn, fence uint64, queue <-chan *capturedEpoch) error {
	cw := &countingWriter{w: conn}
	bw := bufio.NewWriterSize(cw, 1<<20)
	var enc BatchEncoder
	var buf []byte
	// The device state last sent in this session: the next epoch's is
	// sent as a delta against it. A session starts with it whole.
	var dev devStateDelta
	ping := time.NewTicker(max(p.cfg.Interval, 100*time.Millisecond))
	defer ping.Stop()
	for {
		var ep *capturedEpoch
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ping.C:
			// Keeps the standby's failure detector fed while capture waits.
			if err := WriteFrame(bw, Frame{Type: FramePing, Fence: fence}); err != nil {
				return err
			}
			if err := bw.Flush(); err != nil {
				return err
			}
			continue
		case ep = <-queue:
		}
		before := cw.n
		raw := uint64(len(ep.data) + len(ep.devstate)) // sendEpoch frees them
		if err := p.sendEpoch(bw, &enc, &buf, &dev, fence, ep); err != nil {
			return fmt.Errorf("send epoch %d: %w", ep.epoch, err)
		}
		if err := bw.Flush(); err != nil {
			return fmt.Errorf("send epoch %d: %w", ep.epoch, err)
		}
		p.mu.Lock()
		p.everSent = true
		p.st.BytesSent += cw.n - before
		p.st.RawBytes += raw
		p.mu.Unlock()
	}
}

// devStateDelta is what a session remembers to send device state as a
// delta: the last epoch's, and the buffer the delta is built in.
type devStateDelta struct {
	epoch uint64
	last  []byte
	buf   []byte
}

func (p *Primary) sendEpoch(w *bufio.Writer, enc *BatchEncoder, buf *[]byte, dev *devStateDelta, fence uint64, ep *capturedEpoch) error {
	npages := uint64(len(ep.data) / PageSize)
	begin := EpochBegin{Full: ep.full, Base: ep.base, Pages: npages, DevStateLen: uint64(len(ep.devstate))}
	devSent := ep.devstate
	if dev.last != nil {
		dev.buf = deltaAgainst(dev.buf, ep.devstate, dev.last)
		devSent, begin.DevStateBase = dev.buf, dev.epoch
	}
	if err := WriteJSON(w, FrameEpochBegin, fence, ep.epoch, begin); err != nil {
		return err
	}
	crc := uint32(0)
	var end EpochEnd
	indices := make([]uint64, 0, npages)
	ep.dirty.Each(func(i uint64) { indices = append(indices, i) })
	batch := make([]Page, 0, MaxBatchPages)
	half := len(indices) / 2
	var pageWire uint64
	for off := 0; off < len(indices); off += MaxBatchPages {
		batch = batch[:0]
		for j := off; j < min(off+MaxBatchPages, len(indices)); j++ {
			batch = append(batch, Page{Index: indices[j], Data: ep.data[j*PageSize : (j+1)*PageSize]})
		}
		var err error
		if *buf, err = enc.EncodeBatch((*buf)[:0], batch); err != nil {
			return err
		}
		crc = crc32.Update(crc, castagnoli, *buf)
		if err := WriteFrame(w, Frame{Type: FramePages, Fence: fence, Epoch: ep.epoch, Payload: *buf}); err != nil {
			return err
		}
		pageWire += uint64(len(*buf))
		end.Batches++
		if ep.full || ep.base {
			p.setState(func(s *PrimaryStatus) { s.SyncDone = uint64(min(off+MaxBatchPages, len(indices))) * PageSize })
		}
		if p.cfg.Hook != nil && off <= half && half < off+MaxBatchPages {
			_ = w.Flush()
			p.cfg.Hook("transfer", ep.epoch)
		}
	}
	devWire := 0
	for off := 0; off < len(devSent); off += MaxDevStateChunk {
		chunk := devSent[off:min(off+MaxDevStateChunk, len(devSent))]
		var ft FrameType
		var err error
		if *buf, ft, err = enc.EncodeDevState((*buf)[:0], chunk); err != nil {
			return err
		}
		crc = crc32.Update(crc, castagnoli, *buf) // over what is sent, as for pages
		devWire += len(*buf)
		if err := WriteFrame(w, Frame{Type: ft, Fence: fence, Epoch: ep.epoch, Payload: *buf}); err != nil {
			return err
		}
	}
	end.Pages, end.DevStateLen, end.CRC = npages, uint64(len(ep.devstate)), crc
	end.DevStateCRC = crc32.Checksum(ep.devstate, castagnoli)
	// Flushed first, so that the stamp is when the end itself goes out,
	// not before an epoch's worth of buffered frames (with the agent's
	// TCP_NOTSENT_LOWAT, little waits unsent in the kernel either).
	if err := w.Flush(); err != nil {
		return err
	}
	p.mu.Lock()
	ep.endSent = time.Now()
	p.mu.Unlock()
	if err := WriteFrame(w, Frame{Type: FrameEpochEnd, Fence: fence, Epoch: ep.epoch, Payload: end.Marshal()}); err != nil {
		return err
	}
	p.setState(func(s *PrimaryStatus) { s.DevStateWire, s.PageWireBytes = int64(devWire), s.PageWireBytes+pageWire })
	dev.last, dev.epoch = ep.devstate, ep.epoch
	// Page copies are no longer needed; the bitmap stays until the ack.
	ep.data, ep.devstate = nil, nil
	return nil
}

func (p *Primary) ackLoop(ctx context.Context, r *bufio.Reader) error {
	for {
		f, err := ReadFrame(r)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("read from standby: %w", err)
		}
		switch f.Type {
		case FrameAck:
			p.acked(f.Epoch)
		case FrameError:
			return peerError(f)
		case FramePing:
		default:
			return fmt.Errorf("protocol error: unexpected %s frame from standby", f.Type)
		}
	}
}

func (p *Primary) acked(epoch uint64) {
	now := time.Now()
	// Asked before p.mu: the agent answers from its own state.
	vouched := p.cfg.ArbiterVouches != nil && p.cfg.ArbiterVouches(now)
	p.mu.Lock()
	if epoch > p.ackedEpoch {
		p.ackedEpoch = epoch
	}
	// The window counts from when the epoch's end went out (the
	// standby's acknowledgement is later), not from its cut: an epoch
	// queued behind others on a slow link is not late for that.
	var endSent time.Time
	i := 0
	for i < len(p.retained) && p.retained[i].epoch <= epoch {
		if p.retained[i].epoch == epoch {
			endSent = p.retained[i].endSent
		}
		i++
	}
	p.retained = p.retained[i:]
	p.st.State = StateProtected
	timely := p.inAckWindow(endSent)
	if timely {
		p.st.LastTimelyAck = now
	} else {
		p.st.StaleAcks++
	}
	// Too late, the standby may be running the guest by now, unless the
	// arbiter vouches it cannot have promoted it. Otherwise the output
	// stays held until an acknowledgement in time, or until the arbiter
	// agrees the standby is lost (then it all goes out).
	if timely || vouched {
		p.releasable = max(p.releasable, epoch)
		p.st.LastAck = now
	} else {
		p.log.Debug("acknowledgement too late to release output, and the arbiter does not vouch", "epoch", epoch, "window", p.ackWindow)
	}
	p.wasProtected = true
	p.mu.Unlock()
	p.wakeReleaser()
	select {
	case p.ackCh <- struct{}{}:
	default:
	}
	if p.cfg.Hook != nil {
		p.cfg.Hook("acked", epoch)
	}
}

// inAckWindow: an acknowledgement now of what the primary did at t (an
// epoch's end sent, a hello; zero if unknown) may release output (p.mu
// held).
func (p *Primary) inAckWindow(t time.Time) bool {
	return p.ackWindow == 0 || !t.IsZero() && time.Since(t) <= p.ackWindow
}

func (p *Primary) wakeReleaser() {
	select {
	case p.releaseCh <- struct{}{}:
	default:
	}
}

// releaseLoop releases held output up to the newest acknowledged epoch.
// It runs apart from the ack reader, which must not wait on QEMU.
func (p *Primary) releaseLoop(ctx context.Context) {
	var released uint64
	for {
		select {
		case <-ctx.Done():
			// An ack that came with the stop still lets its output out:
			// the standby holds that epoch.
			p.releaseAcked(&released)
			return
		case <-p.releaseCh:
		}
		p.releaseAcked(&released)
	}
}

// releaseAcked releases the output of every acknowledged epoch after
// *released.
func (p *Primary) releaseAcked(released *uint64) {
	p.mu.Lock()
	acked := p.releasable
	p.mu.Unlock()
	if acked <= *released {
		return
	}
	if err := p.cfg.Output.Release(acked); err != nil {
		p.log.Error("output commit: release failed; the guest's output stays held", "epoch", acked, "err", err)
		p.setState(func(s *PrimaryStatus) { s.OutputError = err.Error() })
		return
	}
	*released = acked
	p.setState(func(s *PrimaryStatus) { s.OutputError = "" })
}
