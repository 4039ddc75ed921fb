package checkpoint

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const (
	testGuestPages = 4096 // 16 MiB
	testFence      = 42
	testDevLen     = 5000
	hotStart       = 256 // the guest's writer touches pages from here on
)

// fakeVM is the hypervisor of a guest whose RAM is a []byte. While the guest
// "runs", a writer goroutine mutates its RAM; Stop takes the gate the writer
// needs, so the cut is exact, and snapshots RAM and device state.
type fakeVM struct {
	t    *testing.T
	mem  []byte
	gate sync.Mutex // held while stopped; the writer holds it while writing

	mu         sync.Mutex
	running    bool
	stops      int
	conts      int
	saves      int
	violations []string
	lastSnap   []byte
	lastDev    []byte
	stoppedAt  time.Time
	longest    time.Duration     // the longest pause so far
	snaps      map[uint64][]byte // epoch -> guest RAM at its cut
	devs       map[uint64][]byte // epoch -> device state
	// Failure injection: return an error for the n-th call (from 1).
	failStop, failCont, failSave func(n int) error
	// onStop is called with the guest stopped (for tests that block there).
	onStop func(n int)
}

func newFakeVM(t *testing.T, mem []byte) *fakeVM {
	return &fakeVM{t: t, mem: mem, running: true, snaps: map[uint64][]byte{}, devs: map[uint64][]byte{}}
}

func (v *fakeVM) violate(format string, a ...any) {
	v.violations = append(v.violations, fmt.Sprintf(format, a...))
}

func (v *fakeVM) Stop(ctx context.Context) error {
	v.mu.Lock()
	n := v.stops + 1
	if v.failStop != nil {
		if err := v.failStop(n); err != nil {
			v.stops++
			v.mu.Unlock()
			return err // the guest keeps running
		}
	}
	if !v.running {
		v.violate("Stop #%d while the guest is already stopped: two captures overlap", n)
	}
	v.mu.Unlock()

	v.gate.Lock()

	v.mu.Lock()
	v.running = false
	v.stoppedAt = time.Now()
	v.stops++
	v.lastSnap = bytes.Clone(v.mem)
	v.lastDev = devstateFor(uint64(v.stops), testDevLen)
	onStop := v.onStop
	v.mu.Unlock()
	if onStop != nil {
		onStop(n)
	}
	return nil
}

func (v *fakeVM) Cont(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.conts++
	if v.failCont != nil {
		if err := v.failCont(v.conts); err != nil {
			return err // the guest stays stopped
		}
	}
	if v.running {
		v.violate("Cont #%d while the guest is running", v.conts)
		return nil
	}
	v.running = true
	v.longest = max(v.longest, time.Since(v.stoppedAt))
	v.gate.Unlock()
	return nil
}

func (v *fakeVM) longestPause() time.Duration {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.longest
}

func (v *fakeVM) SaveDeviceState(ctx context.Context, w io.Writer) (int64, error) {
	v.mu.Lock()
	v.saves++
	if v.running {
		v.violate("SaveDeviceState while the guest runs")
	}
	if v.failSave != nil {
		if err := v.failSave(v.saves); err != nil {
			v.mu.Unlock()
			return 0, err
		}
	}
	dev := v.lastDev
	v.mu.Unlock()
	// Written in pieces, as a migration stream would be.
	var total int64
	for off := 0; off < len(dev); off += 1000 {
		n, err := w.Write(dev[off:min(off+1000, len(dev))])
		total += int64(n)
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// hook records, at the "captured" point, which cut belongs to which epoch,
// and forgets cuts older than the newest acknowledged epoch.
func (v *fakeVM) hook(point string, epoch uint64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch point {
	case "captured":
		if v.running {
			v.violate("hook %q for epoch %d with the guest running", point, epoch)
		}
		v.snaps[epoch] = v.lastSnap
		v.devs[epoch] = v.lastDev
	case "acked":
		for e := range v.snaps {
			if e < epoch {
				delete(v.snaps, e)
				delete(v.devs, e)
			}
		}
	}
}

func (v *fakeVM) snapshot(epoch uint64) ([]byte, []byte) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.snaps[epoch], v.devs[epoch]
}

// settle waits until the guest has been running, untouched, for a while.
func (v *fakeVM) settle(t *testing.T) {
	deadline := time.Now().Add(5 * time.Second)
	var since time.Time
	last := -1
	for time.Now().Before(deadline) {
		v.mu.Lock()
		running, stops := v.running, v.stops
		v.mu.Unlock()
		switch {
		case !running || stops != last:
			since, last = time.Time{}, stops
		case since.IsZero():
			since = time.Now()
		case time.Since(since) > 60*time.Millisecond:
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Error("the guest did not settle running after Run returned")
}

// checkLeftRunning asserts the guest runs, every stop was matched by a
// resume, and nothing overlapped.
func (v *fakeVM) checkLeftRunning(t *testing.T) {
	t.Helper()
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, s := range v.violations {
		t.Error("fake VM: " + s)
	}
	if !v.running {
		t.Errorf("guest left stopped (%d stops, %d conts)", v.stops, v.conts)
	}
}

// guestWriter mutates the guest's RAM while it runs.
type guestWriter struct {
	vm     *fakeVM
	stop   chan struct{}
	done   chan struct{}
	writes atomic.Int64
}

func startGuestWriter(vm *fakeVM, seed uint64) *guestWriter {
	w := &guestWriter{vm: vm, stop: make(chan struct{}), done: make(chan struct{})}
	r := newRand(seed)
	pool := make([]byte, 64*PageSize)
	fillRandom(r, pool)
	pages := len(vm.mem) / PageSize
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			vm.gate.Lock()
			for range 4 {
				p := hotStart + r.IntN(pages-hotStart)
				page := vm.mem[p*PageSize : (p+1)*PageSize]
				switch r.IntN(4) {
				case 0:
					clear(page)
				case 1:
					off := r.IntN(63) * PageSize
					copy(page, pool[off:off+PageSize])
				default:
					page[r.IntN(PageSize)]++
				}
			}
			vm.gate.Unlock()
			w.writes.Add(4)
			time.Sleep(200 * time.Microsecond)
		}
	}()
	return w
}

func (w *guestWriter) halt() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	select {
	case <-w.done:
	case <-time.After(10 * time.Second):
		w.vm.t.Error("the guest's writer is stuck: guest left stopped?")
	}
}

// Standby actions a test can choose per frame.
type action int

const (
	actProcess action = iota
	actNoAck          // commit the epoch but send no ack
	actDiscard        // ignore the frame
	actClose          // drop the connection
	actFatal          // answer FrameError{Fatal: true}
	actError          // answer FrameError{Fatal: false}
	// Commit (and ack) the epoch, then drop the connection if the primary
	// is quiet (see quiet); otherwise carry on as actProcess.
	actAckThenClose
	actCommitThenClose
)

type beginRec struct {
	epoch uint64
	b     EpochBegin
}

type sessionRec struct {
	hello   Hello
	welcome Welcome
	begins  []beginRec
	acks    []uint64
}

// testStandby is a minimal standby agent: one session at a time, frames
// into a Replica, acks back.
type testStandby struct {
	t     *testing.T
	ln    net.Listener
	ram   []byte
	store *agentStore
	r     *Replica

	// Test control, called on the server goroutine.
	atHello func(sess int) action
	onFrame func(sess int, f Frame) action

	// fence is the fencing epoch sessions must carry (testFence if 0).
	fence atomic.Uint64

	// primary is the primary under test, for controls that must act only
	// while it has nothing but the current epoch in flight.
	primary atomic.Pointer[Primary]

	mu        sync.Mutex
	sessions  []*sessionRec
	committed uint64
	dropped   uint64
	conn      net.Conn
	errs      []string
	closed    bool
	done      chan struct{}
}

func startStandby(t *testing.T, pages int, setup func(*testStandby)) *testStandby {
	return startStandbyOn(t, make([]byte, pages*PageSize), setup)
}

// startStandbyOn is startStandby with the replica's RAM in ram (a shell's
// RAM file, mapped).
func startStandbyOn(t *testing.T, ram []byte, setup func(*testStandby)) *testStandby {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testStandby{t: t, ln: ln, ram: ram, store: newAgentStore(t), done: make(chan struct{})}
	s.r, err = OpenReplica(filepath.Join(t.TempDir(), "replica"), s.ram, ReplicaState{}, s.store.persist)
	if err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(s)
	}
	go s.serve()
	t.Cleanup(s.shutdown)
	return s
}

func (s *testStandby) serve() {
	defer close(s.done)
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conn = c
		s.mu.Unlock()
		s.handle(c)
		c.Close()
	}
}

func (s *testStandby) shutdown() {
	s.mu.Lock()
	s.closed = true
	if s.conn != nil {
		s.conn.Close()
	}
	s.mu.Unlock()
	s.ln.Close()
	<-s.done
}

func (s *testStandby) fail(format string, a ...any) {
	s.mu.Lock()
	s.errs = append(s.errs, fmt.Sprintf(format, a...))
	s.mu.Unlock()
}

func (s *testStandby) handle(c net.Conn) {
	br := bufio.NewReader(c)
	var hello Hello
	hf, err := ReadJSON(br, FrameHello, &hello)
	if err != nil {
		s.fail("read hello: %v", err)
		return
	}
	fence := s.wantFence()
	if hf.Fence != fence {
		s.fail("hello fence %d, want %d", hf.Fence, fence)
	}
	st := s.r.State()
	rec := &sessionRec{hello: hello, welcome: Welcome{Agent: "standby-1", Generation: st.Generation, Committed: st.Committed}}
	s.mu.Lock()
	s.sessions = append(s.sessions, rec)
	sess := len(s.sessions) - 1
	s.mu.Unlock()
	if hello.RAMBytes != int64(len(s.ram)) || hello.PageSize != PageSize {
		_ = WriteJSON(c, FrameError, 0, 0, ErrorMsg{Error: "RAM size mismatch", Fatal: true})
		s.fail("hello %+v does not match the shell", hello)
		return
	}
	if s.atHello != nil {
		switch s.atHello(sess) {
		case actFatal:
			_ = WriteJSON(c, FrameError, 0, 0, ErrorMsg{Error: "standby refuses this guest", Fatal: true})
			return
		case actError:
			_ = WriteJSON(c, FrameError, 0, 0, ErrorMsg{Error: "standby busy, retry"})
			return
		case actClose:
			return
		}
	}
	if err := WriteJSON(c, FrameWelcome, 0, 0, rec.welcome); err != nil {
		return
	}
	for {
		f, err := ReadFrame(br)
		if err != nil {
			s.r.Abort()
			return
		}
		if f.Fence != fence {
			s.fail("%s frame fence %d, want %d (the session's)", f.Type, f.Fence, fence)
		}
		act := actProcess
		if s.onFrame != nil {
			act = s.onFrame(sess, f)
		}
		switch act {
		case actDiscard:
			continue
		case actClose:
			s.r.Abort()
			return
		case actFatal:
			_ = WriteJSON(c, FrameError, 0, 0, ErrorMsg{Error: "replica storage failed", Fatal: true})
			s.r.Abort()
			return
		case actError:
			_ = WriteJSON(c, FrameError, 0, 0, ErrorMsg{Error: "transient"})
			s.r.Abort()
			return
		}
		switch f.Type {
		case FrameEpochBegin:
			var b EpochBegin
			if err = json.Unmarshal(f.Payload, &b); err == nil {
				s.mu.Lock()
				rec.begins = append(rec.begins, beginRec{f.Epoch, b})
				s.mu.Unlock()
				err = s.r.Begin(hello.Generation, f.Epoch, b)
			}
		case FramePages:
			err = s.r.AddPages(f.Epoch, f.Payload)
		case FrameDevState:
			err = s.r.AddDevState(f.Epoch, f.Payload)
		case FrameDevStateLZ4:
			err = s.r.AddDevStateLZ4(f.Epoch, f.Payload)
		case FrameEpochEnd:
			var end EpochEnd
			if end, err = UnmarshalEpochEnd(f.Payload); err == nil {
				err = s.r.End(f.Epoch, end)
			}
			if err == nil {
				s.mu.Lock()
				s.committed = f.Epoch
				s.mu.Unlock()
				drop := (act == actAckThenClose || act == actCommitThenClose) && s.quiet(f.Epoch)
				if drop && act == actCommitThenClose {
					s.setDropped(f.Epoch)
					return
				}
				if act != actNoAck {
					if err := WriteFrame(c, Frame{Type: FrameAck, Epoch: f.Epoch}); err != nil {
						return
					}
					s.mu.Lock()
					rec.acks = append(rec.acks, f.Epoch)
					s.mu.Unlock()
				}
				if drop {
					s.setDropped(f.Epoch)
					return
				}
			}
		case FramePing:
		default:
			err = fmt.Errorf("unexpected %s frame", f.Type)
		}
		if err != nil {
			s.fail("session %d: %s frame of epoch %d: %v", sess, f.Type, f.Epoch, err)
			_ = WriteJSON(c, FrameError, 0, 0, ErrorMsg{Error: err.Error()})
			s.r.Abort()
			return
		}
	}
}

// quiet reports whether epoch is the newest the primary began to capture
// and nothing older is unacknowledged, so the primary's sender is idle once
// it sent epoch. Dropping a session while an epoch is on the wire trips the
// data race TestPrimarySessionWaitsForItsCapture documents.
func (s *testStandby) wantFence() uint64 {
	if f := s.fence.Load(); f != 0 {
		return f
	}
	return testFence
}

func (s *testStandby) quiet(epoch uint64) bool {
	p := s.primary.Load()
	return p != nil && p.Status().Started == epoch && p.inFlight() <= 1
}

func (s *testStandby) setDropped(epoch uint64) {
	s.mu.Lock()
	s.dropped = epoch
	s.mu.Unlock()
}

// droppedAt is the epoch after whose commit the standby dropped a session.
func (s *testStandby) droppedAt() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dropped
}

func (s *testStandby) lastCommitted() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.committed
}

func (s *testStandby) sessionCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

func (s *testStandby) session(i int) sessionRec {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := *s.sessions[i]
	r.begins = append([]beginRec(nil), r.begins...)
	r.acks = append([]uint64(nil), r.acks...)
	return r
}

func (s *testStandby) checkNoErrors(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.errs {
		t.Error("standby: " + e)
	}
}

// rig is a primary with a running guest and a standby.
type rig struct {
	t       *testing.T
	vm      *fakeVM
	writer  *guestWriter
	sb      *testStandby
	p       *Primary
	tracker Tracker
	dials   atomic.Int32
	cancel  context.CancelFunc
	runErr  chan error
	stopped bool
}

type rigOpts struct {
	pages       int // guest RAM in pages; 2048 (8 MiB) unless set
	interval    time.Duration
	maxInFlight int
	standby     func(*testStandby)
	vm          func(*fakeVM)
	dial        func(n int32, d func(context.Context) (net.Conn, error), ctx context.Context) (net.Conn, error)
	tracker     func(Tracker) Tracker
	output      func(*rig) OutputBuffer
	config      func(*PrimaryConfig) // edits the config before Run starts
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("REMORA_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func startRig(t *testing.T, o rigOpts) *rig {
	if o.interval == 0 {
		o.interval = 25 * time.Millisecond
	}
	if o.pages == 0 {
		o.pages = 2048
	}
	mem := make([]byte, o.pages*PageSize)
	r := newRand(99)
	for p := 0; p < o.pages; p += 5 { // a fifth of the pages hold text
		fillText(r, mem[p*PageSize:(p+1)*PageSize])
	}
	rg := &rig{t: t, vm: newFakeVM(t, mem), runErr: make(chan error, 1)}
	if o.vm != nil {
		o.vm(rg.vm)
	}
	rg.sb = startStandby(t, o.pages, o.standby)
	addr := rg.sb.ln.Addr().String()
	dial := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
	rg.tracker = NewScanTracker(len(mem))
	if o.tracker != nil {
		rg.tracker = o.tracker(rg.tracker)
	}
	rg.p = NewPrimary(PrimaryConfig{
		Agent: "primary-1", Guest: "vm1", DomainXML: "<domain><name>vm1</name></domain>",
		Interval: o.interval, MaxInFlight: o.maxInFlight, Fence: testFence,
		Dial: func(ctx context.Context) (net.Conn, error) {
			n := rg.dials.Add(1)
			if o.dial != nil {
				return o.dial(n, dial, ctx)
			}
			return dial(ctx)
		},
		Log:  testLogger(t),
		Hook: rg.vm.hook,
	}, rg.vm, mem, rg.tracker)
	if o.output != nil {
		rg.p.cfg.Output = o.output(rg)
	}
	if o.config != nil {
		o.config(&rg.p.cfg)
	}
	rg.sb.primary.Store(rg.p)
	rg.writer = startGuestWriter(rg.vm, 7)
	ctx, cancel := context.WithCancel(context.Background())
	rg.cancel = cancel
	go func() { rg.runErr <- rg.p.Run(ctx) }()
	t.Cleanup(rg.stop)
	return rg
}

// stop ends Run and the guest's writer; it returns Run's error.
func (rg *rig) stop() {
	if rg.stopped {
		return
	}
	rg.stopped = true
	rg.cancel()
	select {
	case err := <-rg.runErr:
		if err != nil {
			rg.t.Errorf("Run returned %v after its context ended, want nil", err)
		}
	case <-time.After(10 * time.Second):
		rg.t.Fatal("Run did not return after its context ended")
	}
	// Run can return while a capture is still under way (see
	// TestPrimaryRunWaitsForItsCapture): let it finish before judging.
	rg.vm.settle(rg.t)
	rg.writer.halt()
}

// wait polls cond until it holds or the deadline passes.
func wait(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// checkConverged stops everything and asserts the standby holds the guest
// exactly as of its last committed epoch.
func (rg *rig) checkConverged() ReplicaState {
	t := rg.t
	t.Helper()
	rg.stop()
	rg.sb.shutdown()
	rg.vm.checkLeftRunning(t)
	rg.sb.checkNoErrors(t)
	st := rg.sb.r.State()
	if st.Committed == 0 || st.Applied != st.Committed || !st.Synced {
		t.Fatalf("standby state %+v: no complete checkpoint", st)
	}
	if err := rg.sb.r.Consistent(); err != nil {
		t.Fatal(err)
	}
	if st.Generation != rg.p.Status().Generation {
		t.Fatalf("standby generation %q, primary %q", st.Generation, rg.p.Status().Generation)
	}
	snap, dev := rg.vm.snapshot(st.Committed)
	if snap == nil {
		t.Fatalf("no snapshot of the guest for epoch %d", st.Committed)
	}
	if !bytes.Equal(rg.sb.ram, snap) {
		t.Fatalf("standby RAM differs from the guest at epoch %d in %d pages", st.Committed, diffPages(rg.sb.ram, snap))
	}
	got, err := os.ReadFile(rg.sb.r.DevStatePath())
	if err != nil || !bytes.Equal(got, dev) {
		t.Fatalf("standby device state differs from epoch %d's (%v)", st.Committed, err)
	}
	return st
}

func TestPrimaryReplicatesOverTCP(t *testing.T) {
	rg := startRig(t, rigOpts{pages: testGuestPages})
	wait(t, 15*time.Second, "10 committed epochs", func() bool { return rg.sb.lastCommitted() >= 10 })
	wait(t, 5*time.Second, "acks", func() bool { return rg.p.Status().AckedEpoch >= 8 })
	mid := rg.p.Status()
	if mid.State != StateProtected {
		t.Errorf("state %q while the standby acks, want %q", mid.State, StateProtected)
	}
	if mid.ConnectedSince.IsZero() || mid.LastError != "" {
		t.Errorf("connected status: since %v, last error %q", mid.ConnectedSince, mid.LastError)
	}
	if rg.writer.writes.Load() == 0 {
		t.Fatal("the guest wrote nothing")
	}
	st := rg.checkConverged()

	s := rg.p.Status()
	if s.State != StateStopped {
		t.Errorf("state after Run returned: %q", s.State)
	}
	if s.Epoch < st.Committed || s.AckedEpoch > st.Committed || s.AckedEpoch < 8 {
		t.Errorf("status epoch %d, acked %d; standby committed %d", s.Epoch, s.AckedEpoch, st.Committed)
	}
	if s.Tracker != TrackerScan || len(s.Generation) != 16 {
		t.Errorf("tracker %q generation %q", s.Tracker, s.Generation)
	}
	if s.DevStateBytes != testDevLen {
		t.Errorf("devstate bytes %d, want %d", s.DevStateBytes, testDevLen)
	}
	ram := uint64(testGuestPages * PageSize)
	if s.SyncTotal != ram+testDevLen || s.SyncDone != ram {
		t.Errorf("sync progress %d/%d, want %d/%d", s.SyncDone, s.SyncTotal, ram, ram+testDevLen)
	}
	// Device states go as they are; pages at most as they are (plus
	// framing); the first copy is four-fifths zero pages.
	maxRaw := ram + s.Epoch*testDevLen + uint64(rg.writer.writes.Load())*PageSize
	if s.BytesSent < st.Committed*testDevLen || s.BytesSent > maxRaw+maxRaw/50 {
		t.Errorf("bytes sent %d, want between %d and about %d", s.BytesSent, st.Committed*testDevLen, maxRaw)
	}
	if s.RawBytes < ram+st.Committed*testDevLen {
		t.Errorf("raw bytes %d, less than a full copy and %d device states", s.RawBytes, st.Committed)
	}
	if s.PauseP50 <= 0 || s.PauseP99 < s.PauseP50 || s.PauseP99 > 5*time.Second {
		t.Errorf("pause p50 %v p99 %v", s.PauseP50, s.PauseP99)
	}
	if s.EpochsPerSec <= 0 {
		t.Errorf("epochs/s %v", s.EpochsPerSec)
	}

	if n := rg.sb.sessionCount(); n != 1 {
		t.Fatalf("%d sessions, want 1", n)
	}
	sess := rg.sb.session(0)
	h := sess.hello
	if h.Agent != "primary-1" || h.Guest != "vm1" || h.Generation != s.Generation ||
		h.RAMBytes != int64(ram) || h.PageSize != PageSize || !strings.Contains(h.DomainXML, "vm1") {
		t.Errorf("hello %+v", h)
	}
	if sess.welcome.Generation != "" || sess.welcome.Committed != 0 {
		t.Errorf("first welcome %+v from an empty standby", sess.welcome)
	}
	// The first epoch is full, all later ones incremental and numbered on.
	for i, b := range sess.begins {
		if b.epoch != uint64(i+1) {
			t.Fatalf("epoch-begin %d carries epoch %d", i, b.epoch)
		}
		if (i == 0) != b.b.Full {
			t.Fatalf("epoch %d full=%v", b.epoch, b.b.Full)
		}
		if b.b.DevStateLen != testDevLen {
			t.Fatalf("epoch %d announces %d device-state bytes", b.epoch, b.b.DevStateLen)
		}
		// Device state goes whole first, then as a delta against the
		// epoch before (the standby's copy above is rebuilt from them).
		if want := b.epoch - 1; b.b.DevStateBase != want {
			t.Fatalf("epoch %d's device state is a delta against %d, want %d", b.epoch, b.b.DevStateBase, want)
		}
	}
	if sess.begins[0].b.Pages != testGuestPages {
		t.Fatalf("full epoch has %d pages", sess.begins[0].b.Pages)
	}
	for i := 1; i < len(sess.acks); i++ {
		if sess.acks[i] != sess.acks[i-1]+1 {
			t.Fatalf("acks %v not consecutive", sess.acks)
		}
	}
	rg.vm.mu.Lock()
	stops, conts := rg.vm.stops, rg.vm.conts
	rg.vm.mu.Unlock()
	if stops != conts || uint64(stops) != s.Epoch {
		t.Errorf("%d stops, %d conts, %d epochs captured", stops, conts, s.Epoch)
	}
}

func TestPrimaryStatusCountsRawBytes(t *testing.T) {
	rg := startRig(t, rigOpts{pages: testGuestPages})
	wait(t, 15*time.Second, "3 acked epochs", func() bool { return rg.p.Status().AckedEpoch >= 3 })
	s := rg.p.Status()
	if min := uint64(testGuestPages*PageSize) + 3*testDevLen; s.RawBytes < min {
		t.Fatalf("raw bytes %d after a full copy and 3 epochs, want at least %d", s.RawBytes, min)
	}
}

// The standby's connection drops mid-run; the primary reconnects with the
// same generation, is told what the standby committed, and resumes with an
// incremental epoch.
func TestPrimaryResumesAfterStandbyDrop(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	for _, ackLost := range []bool{false, true} {
		t.Run(fmt.Sprintf("ack-lost=%v", ackLost), func(t *testing.T) {
			// maxInFlight: see TestPrimaryRetriesNonFatalErrors.
			rg := startRig(t, rigOpts{pages: 1024, maxInFlight: 8, interval: 60 * time.Millisecond, standby: func(s *testStandby) {
				s.onFrame = func(sess int, f Frame) action {
					// Drop right after committing epoch 4, while the primary
					// is between epochs.
					if sess == 0 && f.Type == FrameEpochEnd && f.Epoch >= 4 {
						if ackLost {
							return actCommitThenClose
						}
						return actAckThenClose
					}
					return actProcess
				}
			}})
			wait(t, 15*time.Second, "a second session", func() bool { return rg.sb.sessionCount() >= 2 })
			k := rg.sb.droppedAt()
			wait(t, 15*time.Second, "3 epochs in the second session", func() bool { return rg.sb.lastCommitted() >= k+3 })
			// The state is degraded until the first ack of the new session.
			wait(t, 5*time.Second, "protected again", func() bool {
				s := rg.p.Status()
				return s.State == StateProtected && s.LastError == "" && s.AckedEpoch > k
			})
			rg.checkConverged()

			s0, s1 := rg.sb.session(0), rg.sb.session(1)
			if s1.hello.Generation != s0.hello.Generation {
				t.Fatalf("generation changed across a reconnect: %q -> %q", s0.hello.Generation, s1.hello.Generation)
			}
			if s1.welcome.Generation != s0.hello.Generation || s1.welcome.Committed != k {
				t.Fatalf("second welcome %+v, want generation %q committed %d", s1.welcome, s0.hello.Generation, k)
			}
			if len(s1.begins) == 0 {
				t.Fatal("no epoch in the second session")
			}
			first := s1.begins[0]
			if first.b.Full {
				t.Fatalf("the second session resynced in full (epoch %d) instead of resuming", first.epoch)
			}
			if first.epoch <= k {
				t.Fatalf("second session's first epoch %d not after the committed %d", first.epoch, k)
			}
			if n := rg.sb.sessionCount(); n != 2 {
				t.Fatalf("%d sessions, want 2", n)
			}
			if d := rg.dials.Load(); d != 2 {
				t.Fatalf("%d dials, want 2", d)
			}
		})
	}
}

func TestPrimaryStopsOnFatalError(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	for _, where := range []string{"handshake", "mid-stream"} {
		t.Run(where, func(t *testing.T) {
			fatalSession := -1
			// maxInFlight: see TestPrimaryRetriesNonFatalErrors.
			rg := startRig(t, rigOpts{maxInFlight: 8, standby: func(s *testStandby) {
				if where == "handshake" {
					s.atHello = func(sess int) action { fatalSession = sess; return actFatal }
					return
				}
				s.onFrame = func(sess int, f Frame) action {
					// From epoch 4 on, whatever the session.
					if f.Epoch >= 4 {
						fatalSession = sess
						return actFatal
					}
					return actProcess
				}
			}})
			var err error
			select {
			case err = <-rg.runErr:
			case <-time.After(15 * time.Second):
				t.Fatal("Run did not stop on a fatal error")
			}
			rg.stopped = true
			rg.cancel()
			rg.vm.settle(t)
			rg.writer.halt()
			rg.sb.shutdown() // orders fatalSession before our read
			var pe *PeerError
			if !errors.As(err, &pe) || !pe.Fatal {
				t.Fatalf("Run returned %v, want a fatal *PeerError", err)
			}
			want := map[string]string{"handshake": "standby refuses this guest", "mid-stream": "replica storage failed"}[where]
			if !strings.Contains(err.Error(), want) {
				t.Fatalf("error %q does not carry the standby's message %q", err, want)
			}
			s := rg.p.Status()
			if s.State != StateStopped || !strings.Contains(s.LastError, want) {
				t.Fatalf("status after a fatal error: state %q last error %q", s.State, s.LastError)
			}
			if n := rg.sb.sessionCount(); fatalSession != n-1 {
				t.Fatalf("%d sessions, the fatal error was sent in session %d: a fatal error must not be retried", n, fatalSession)
			}
			rg.vm.checkLeftRunning(t)
		})
	}
}

func TestPrimaryRetriesNonFatalErrors(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	// A wide in-flight window: with the default of 3, this test trips the
	// bug TestPrimaryResumesWithFullInFlightWindow exposes about one run in
	// ten (epochs 3-5 are unacked when session 1 is refused).
	rg := startRig(t, rigOpts{pages: 1024, maxInFlight: 16, interval: 60 * time.Millisecond, standby: func(s *testStandby) {
		s.atHello = func(sess int) action {
			if sess == 0 {
				return actError
			}
			return actProcess
		}
		s.onFrame = func(sess int, f Frame) action {
			// Refuse at a trailer, with the primary's sender idle (see quiet).
			if sess == 1 && f.Type == FrameEpochEnd && f.Epoch >= 3 && s.quiet(f.Epoch) {
				return actError
			}
			return actProcess
		}
	}})
	wait(t, 15*time.Second, "epochs after two refused sessions", func() bool {
		return rg.sb.sessionCount() >= 3 && len(rg.sb.session(2).acks) >= 3
	})
	rg.checkConverged()
	// Session 1 committed epochs 1-2 at least, then was refused: session 2 resumes.
	if s2 := rg.sb.session(2); len(s2.begins) == 0 || s2.begins[0].b.Full {
		t.Fatalf("third session did not resume incrementally: %+v", s2.begins)
	}
}

func TestPrimaryRetriesUnreachableStandby(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	refused := errors.New("connection refused (test)")
	rg := startRig(t, rigOpts{pages: 1024, dial: func(n int32, d func(context.Context) (net.Conn, error), ctx context.Context) (net.Conn, error) {
		if n <= 2 {
			return nil, refused
		}
		return d(ctx)
	}})
	wait(t, 5*time.Second, "a failed dial", func() bool { return rg.dials.Load() >= 1 })
	wait(t, 5*time.Second, "status of a failed dial", func() bool { return rg.p.Status().LastError != "" })
	s := rg.p.Status()
	if s.State != StateConnecting || !strings.Contains(s.LastError, "connect to standby") || s.NextRetry.IsZero() {
		t.Errorf("while unreachable: state %q last error %q next retry %v", s.State, s.LastError, s.NextRetry)
	}
	wait(t, 15*time.Second, "sync after the standby became reachable", func() bool { return rg.sb.lastCommitted() >= 3 })
	rg.checkConverged()
	if d := rg.dials.Load(); d != 3 {
		t.Fatalf("%d dials, want 3", d)
	}
}

// A capture that fails must leave the guest running, and the pages its
// tracker call reported must still reach the standby.
func TestPrimaryCaptureFailures(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	boom := errors.New("qmp: injected failure")
	for _, step := range []string{"stop", "devstate", "cont"} {
		t.Run(step+" fails", func(t *testing.T) {
			rg := startRig(t, rigOpts{pages: 1024, interval: 40 * time.Millisecond})
			wait(t, 15*time.Second, "protection", func() bool { return rg.sb.lastCommitted() >= 2 })
			// Fail one call, at a capture that starts with every epoch
			// acknowledged (so the sender is idle: a failure mid-send trips
			// the race TestPrimarySessionWaitsForItsCapture documents).
			var injected atomic.Bool
			once := func(int) error {
				if !injected.Load() && rg.p.inFlight() == 0 {
					injected.Store(true)
					return boom
				}
				return nil
			}
			rg.vm.mu.Lock()
			switch step {
			case "stop":
				rg.vm.failStop = once
			case "devstate":
				rg.vm.failSave = once
			case "cont":
				rg.vm.failCont = once
			}
			rg.vm.mu.Unlock()
			wait(t, 15*time.Second, "the failure", func() bool { return injected.Load() })
			wait(t, 15*time.Second, "4 acks in a second session", func() bool {
				return rg.sb.sessionCount() >= 2 && len(rg.sb.session(1).acks) >= 4
			})
			rg.checkConverged()
			if s1 := rg.sb.session(1); s1.begins[0].b.Full {
				t.Fatal("a capture failure forced a full resync")
			}
		})
	}
}

// blockingTracker wraps a tracker; when armed, its next call does the real
// work and then blocks until released (a long scan of a big guest).
type blockingTracker struct {
	Tracker
	armed   atomic.Bool
	blocked chan struct{}
	release chan struct{}
}

func (b *blockingTracker) Dirty(mem []byte, into *Bitmap) error {
	err := b.Tracker.Dirty(mem, into)
	if b.armed.CompareAndSwap(true, false) {
		close(b.blocked)
		<-b.release
	}
	return err
}

// A session ends (the standby connection drops) while a capture is still
// running; the next session must not start capturing before it is over,
// and the pages that capture's tracker call consumed must not be lost.
func TestPrimarySessionWaitsForItsCapture(t *testing.T) {
	bt := &blockingTracker{blocked: make(chan struct{}), release: make(chan struct{})}
	rg := startRig(t, rigOpts{tracker: func(tr Tracker) Tracker { bt.Tracker = tr; return bt }})
	wait(t, 15*time.Second, "protection", func() bool { return rg.sb.lastCommitted() >= 4 })

	// The guest writes a marker page no other writer touches, then the
	// next capture's scan (which sees it) blocks.
	rg.vm.gate.Lock()
	rg.vm.mem[3*PageSize+10] = 0xAB
	bt.armed.Store(true)
	rg.vm.gate.Unlock()
	<-bt.blocked

	// The standby connection drops while that capture is under way.
	rg.sb.mu.Lock()
	conn := rg.sb.conn
	rg.sb.mu.Unlock()
	conn.Close()
	// The session ends only once its capture is over: no second session
	// (and so no overlapping capture) while it is blocked.
	time.Sleep(500 * time.Millisecond)
	if n := rg.sb.sessionCount(); n != 1 {
		t.Fatalf("%d sessions while the first one's capture was still under way", n)
	}
	close(bt.release)
	wait(t, 10*time.Second, "a second session", func() bool { return rg.sb.sessionCount() >= 2 })

	wait(t, 15*time.Second, "epochs in the second session", func() bool {
		return rg.sb.sessionCount() >= 2 && len(rg.sb.session(1).acks) >= 4
	})
	rg.checkConverged()
	if rg.sb.ram[3*PageSize+10] != 0xAB {
		t.Fatal("the marker page written before the interrupted capture never reached the standby")
	}
}

// Run must not return while a capture is under way: the agent unmaps guest
// RAM and closes the tracker as soon as Run returns.
func TestPrimaryRunWaitsForItsCapture(t *testing.T) {
	bt := &blockingTracker{blocked: make(chan struct{}), release: make(chan struct{})}
	rg := startRig(t, rigOpts{tracker: func(tr Tracker) Tracker { bt.Tracker = tr; return bt }})
	wait(t, 15*time.Second, "protection", func() bool { return rg.sb.lastCommitted() >= 3 })
	bt.armed.Store(true)
	<-bt.blocked
	rg.cancel()
	select {
	case <-rg.runErr:
		rg.vm.mu.Lock()
		running := rg.vm.running
		rg.vm.mu.Unlock()
		close(bt.release)
		rg.stopped = true
		rg.vm.settle(t)
		rg.writer.halt()
		t.Fatalf("Run returned while a capture was under way (guest running: %v)", running)
	case <-time.After(500 * time.Millisecond):
	}
	close(bt.release)
	rg.runErr <- <-rg.runErr
}

// The link stalls with MaxInFlight epochs unacknowledged, then drops. The
// reconnected session must make progress (regression: the unacked epochs
// used to stay in p.retained and block the new session's first capture).
func TestPrimaryResumesWithFullInFlightWindow(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	var stall atomic.Bool
	rg := startRig(t, rigOpts{pages: 1024, maxInFlight: 3, standby: func(s *testStandby) {
		s.onFrame = func(sess int, f Frame) action {
			if sess == 0 && stall.Load() {
				return actDiscard // the link stalls: nothing is committed or acked
			}
			return actProcess
		}
	}})
	wait(t, 15*time.Second, "protection", func() bool { return rg.sb.lastCommitted() >= 3 })
	stall.Store(true)
	wait(t, 10*time.Second, "a full in-flight window", func() bool { return rg.p.inFlight() >= 3 })
	time.Sleep(100 * time.Millisecond) // the capture loop waits for an ack, the sender is idle
	rg.sb.mu.Lock()
	conn := rg.sb.conn
	rg.sb.mu.Unlock()
	conn.Close()
	wait(t, 10*time.Second, "a second session", func() bool { return rg.sb.sessionCount() >= 2 })
	k := rg.sb.session(1).welcome.Committed
	wait(t, 5*time.Second, "an epoch committed in the second session", func() bool { return rg.sb.lastCommitted() > k })
	rg.checkConverged()
}

// The pages of epochs the standby never committed are owed to it until an
// epoch carrying them is captured. If the resumed session's first capture
// fails (here: QMP stop fails), the next session must still send them.
func TestPrimaryResumeSurvivesFailedFirstCapture(t *testing.T) {
	var stall atomic.Bool
	rg := startRig(t, rigOpts{pages: 1024, maxInFlight: 3, standby: func(s *testStandby) {
		s.onFrame = func(sess int, f Frame) action {
			if sess == 0 && stall.Load() {
				return actDiscard // the link stalls: nothing more is committed
			}
			return actProcess
		}
	}})
	wait(t, 15*time.Second, "protection", func() bool { return rg.sb.lastCommitted() >= 3 })
	stall.Store(true)
	// A page only this test writes, captured in an epoch the standby
	// never commits.
	rg.vm.gate.Lock()
	rg.vm.mem[5*PageSize+1] = 0xCD
	rg.vm.gate.Unlock()
	wait(t, 10*time.Second, "a full in-flight window", func() bool { return rg.p.inFlight() >= 3 })
	time.Sleep(100 * time.Millisecond) // the sender is idle
	// The next Stop (the resumed session's first capture) fails.
	var failed atomic.Bool
	rg.vm.mu.Lock()
	rg.vm.failStop = func(int) error {
		if failed.CompareAndSwap(false, true) {
			return errors.New("qmp: injected stop failure")
		}
		return nil
	}
	rg.vm.mu.Unlock()
	rg.sb.mu.Lock()
	conn := rg.sb.conn
	rg.sb.mu.Unlock()
	conn.Close()
	wait(t, 10*time.Second, "a third session", func() bool { return rg.sb.sessionCount() >= 3 })
	wait(t, 10*time.Second, "acks in the third session", func() bool { return len(rg.sb.session(2).acks) >= 3 })
	if !failed.Load() {
		t.Fatal("test setup: the stop failure was not injected")
	}
	rg.checkConverged()
}

// resumePlan decides between a full resync and an incremental resume.
func TestPrimaryResumePlan(t *testing.T) {
	newP := func() *Primary {
		p := NewPrimary(PrimaryConfig{Interval: time.Second, Log: testLogger(t)}, nil, make([]byte, 128*PageSize), NewScanTracker(128*PageSize))
		return p
	}
	ep := func(n uint64, pages ...uint64) *capturedEpoch {
		b := NewBitmap(128)
		for _, i := range pages {
			b.Set(i)
		}
		return &capturedEpoch{epoch: n, dirty: b, data: []byte{1}, devstate: []byte{2}}
	}

	t.Run("other generation", func(t *testing.T) {
		p := newP()
		p.everSent, p.captured, p.ackedEpoch = true, 7, 5
		p.retained = []*capturedEpoch{ep(6, 1), ep(7, 2)}
		plan := p.resumePlan(Welcome{Generation: "someone-else", Committed: 40}, nil, time.Now())
		if !plan.full || plan.resend != nil || p.retained != nil {
			t.Fatalf("plan %+v retained=%d", plan, len(p.retained))
		}
		if p.captured != 40 {
			t.Fatalf("captured %d: the next epoch must be numbered after the standby's 40", p.captured)
		}
	})
	t.Run("other generation with the replica's hashes", func(t *testing.T) {
		p := newP()
		hashes := make([]uint64, 128)
		plan := p.resumePlan(Welcome{Generation: "someone-else", Committed: 40, Hashes: 128}, hashes, time.Now())
		if plan.full || plan.base == nil || p.captured != 40 {
			t.Fatalf("plan %+v captured %d: want a resync against the replica", plan, p.captured)
		}
	})
	t.Run("never sent", func(t *testing.T) {
		p := newP()
		p.captured = 3
		plan := p.resumePlan(Welcome{Generation: p.gen, Committed: 0}, nil, time.Now())
		if !plan.full || p.captured != 3 {
			t.Fatalf("plan %+v captured=%d", plan, p.captured)
		}
	})
	t.Run("standby lost epochs", func(t *testing.T) {
		p := newP()
		p.everSent, p.captured, p.ackedEpoch = true, 9, 8
		p.retained = []*capturedEpoch{ep(9, 1)}
		plan := p.resumePlan(Welcome{Generation: p.gen, Committed: 5}, nil, time.Now())
		if !plan.full || p.retained != nil {
			t.Fatalf("plan %+v retained=%d", plan, len(p.retained))
		}
	})
	t.Run("resume", func(t *testing.T) {
		p := newP()
		p.everSent, p.captured, p.ackedEpoch = true, 9, 5
		p.retained = []*capturedEpoch{ep(6, 1, 2), ep(7, 3), ep(8, 4, 100), ep(9, 127)}
		if plan := p.resumePlan(Welcome{Generation: p.gen, Committed: 7}, nil, time.Now()); plan.full || plan.base != nil {
			t.Fatal("resumed with a resync")
		}
		// Kept in the carry, which only a successful capture clears.
		if got := bitmapIndices(p.carry); fmt.Sprint(got) != "[4 100 127]" {
			t.Fatalf("carry %v, want the pages of epochs 8 and 9", got)
		}
		// Epochs 6 and 7 are done with; 8 and 9 live on in the resend
		// bitmap and must not hold the new session's capture back.
		for _, e := range p.retained {
			if e.epoch <= 7 {
				t.Fatalf("epoch %d, committed on the standby, still retained", e.epoch)
			}
			if e.data != nil || e.devstate != nil {
				t.Fatal("page copies of resent epochs kept")
			}
		}
		if p.inFlight() >= p.cfg.MaxInFlight {
			t.Fatalf("%d epochs count as in flight after a resume: capture would wait forever", p.inFlight())
		}
		if p.ackedEpoch != 7 || p.captured != 9 {
			t.Fatalf("acked %d captured %d", p.ackedEpoch, p.captured)
		}
	})
}

func TestPrimaryAcked(t *testing.T) {
	p := NewPrimary(PrimaryConfig{Interval: time.Second, Log: testLogger(t)}, nil, make([]byte, 8*PageSize), NewScanTracker(8*PageSize))
	for i := uint64(1); i <= 5; i++ {
		p.retained = append(p.retained, &capturedEpoch{epoch: i, at: time.Now()})
	}
	p.acked(3)
	s := p.Status()
	if s.AckedEpoch != 3 || p.inFlight() != 2 || s.State != StateProtected {
		t.Fatalf("after ack 3: acked %d in flight %d state %q", s.AckedEpoch, p.inFlight(), s.State)
	}
	if s.Lag <= 0 {
		t.Fatalf("lag %v with epochs in flight", s.Lag)
	}
	p.acked(2) // late, duplicate
	if s := p.Status(); s.AckedEpoch != 3 || p.inFlight() != 2 {
		t.Fatalf("a stale ack moved things: acked %d in flight %d", s.AckedEpoch, p.inFlight())
	}
	p.acked(5)
	if s := p.Status(); s.AckedEpoch != 5 || p.inFlight() != 0 || s.Lag != 0 {
		t.Fatalf("after ack 5: acked %d in flight %d lag %v", s.AckedEpoch, p.inFlight(), s.Lag)
	}
}

// recordingOutput records what the primary releases.
type recordingOutput struct {
	mu       sync.Mutex
	released uint64
}

func (o *recordingOutput) Cut(uint64) error { return nil }
func (o *recordingOutput) Release(epoch uint64) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.released = max(o.released, epoch)
	return nil
}
func (o *recordingOutput) get() uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.released
}

// An acknowledgement that comes later than the standby's ack window after
// its epoch's end went out releases nothing (the standby may be running
// the guest by then) and does not count as a sign of life, nor does one of
// an epoch never sent; one in time releases its epoch and every one before
// it, however long ago the epoch was cut (queued behind others on a slow
// link). Without a window every ack releases.
func TestAckWindow(t *testing.T) {
	out := &recordingOutput{}
	p := NewPrimary(PrimaryConfig{Interval: time.Second, Log: testLogger(t), Output: out}, nil, make([]byte, 8*PageSize), NewScanTracker(8*PageSize))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.releaseLoop(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	released := func(want uint64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for out.get() != want && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if got := out.get(); got != want {
			t.Fatalf("released up to %d, want %d", got, want)
		}
	}
	p.ackWindow = time.Second
	now := time.Now()
	p.retained = []*capturedEpoch{
		{epoch: 1, at: now.Add(-4 * time.Second), endSent: now.Add(-3 * time.Second)},
		{epoch: 2, at: now.Add(-2 * time.Second)}, // its end never went out
		{epoch: 3, at: now.Add(-5 * time.Second), endSent: now},
	}
	p.acked(1)
	p.acked(2)
	time.Sleep(20 * time.Millisecond)
	if s := p.Status(); out.get() != 0 || s.StaleAcks != 2 || !s.LastAck.IsZero() || s.AckedEpoch != 2 {
		t.Fatalf("late acks: released %d, status %+v", out.get(), s)
	}
	p.acked(3)
	released(3)
	if s := p.Status(); s.StaleAcks != 2 || s.LastAck.IsZero() || s.LastTimelyAck.IsZero() {
		t.Fatalf("an ack in time: %+v", s)
	}
	// A late ack while the arbiter vouches no promotion can happen
	// releases output, yet is not taken for a timely one; once it no
	// longer vouches, a late ack releases nothing.
	var vouches atomic.Bool
	vouches.Store(true)
	p.mu.Lock()
	p.cfg.ArbiterVouches = func(time.Time) bool { return vouches.Load() }
	timely := p.st.LastTimelyAck
	p.retained = []*capturedEpoch{
		{epoch: 4, at: now.Add(-9 * time.Second), endSent: now.Add(-8 * time.Second)},
		{epoch: 5, at: now.Add(-9 * time.Second), endSent: now.Add(-8 * time.Second)},
	}
	p.mu.Unlock()
	p.acked(4)
	released(4)
	if s := p.Status(); s.StaleAcks != 3 || !s.LastTimelyAck.Equal(timely) {
		t.Fatalf("a late ack the arbiter vouched for: %+v", s)
	}
	vouches.Store(false)
	p.acked(5)
	time.Sleep(20 * time.Millisecond)
	if s := p.Status(); out.get() != 4 || s.StaleAcks != 4 {
		t.Fatalf("a late ack without the arbiter's word: released %d, %+v", out.get(), s)
	}
	p.mu.Lock()
	p.cfg.ArbiterVouches = nil
	p.mu.Unlock()
	// The negative control: a standby that promised nothing.
	p.mu.Lock()
	p.ackWindow = 0
	p.retained = []*capturedEpoch{{epoch: 6, at: now.Add(-time.Hour)}}
	p.mu.Unlock()
	p.acked(6)
	released(6)
}

// silentCutter is a standby that stops answering disk cuts.
type silentCutter struct{ silent atomic.Bool }

func (c *silentCutter) Cut(ctx context.Context, epoch uint64) error {
	if !c.silent.Load() {
		return nil
	}
	<-ctx.Done()
	return ctx.Err()
}

// A standby that stops answering the disk cut holds the guest paused for
// PeerTimeout at most, then the guest runs again.
func TestSilentStandbyBoundsThePause(t *testing.T) {
	cut := &silentCutter{}
	rg := startRig(t, rigOpts{pages: 1024, interval: 20 * time.Millisecond, config: func(c *PrimaryConfig) {
		c.Disks = cut
		c.PeerTimeout = 100 * time.Millisecond
	}})
	wait(t, 15*time.Second, "protection", func() bool { return rg.sb.lastCommitted() >= 2 })
	cut.silent.Store(true)
	start := time.Now()
	wait(t, 10*time.Second, "a capture to fail", func() bool { return strings.Contains(rg.p.Status().LastError, "disk: cut") })
	if longest := rg.vm.longestPause(); longest > 2*time.Second {
		t.Fatalf("the guest stayed paused %v behind a silent standby (bound %v)", longest, rg.p.cfg.PeerTimeout)
	}
	t.Logf("capture failed %v after the standby fell silent; longest pause %v", time.Since(start).Round(time.Millisecond), rg.vm.longestPause())
	cut.silent.Store(false)
	rg.checkConverged()
}

func TestSessionBackoff(t *testing.T) {
	b := sessionBackoff{first: 200 * time.Millisecond, max: time.Second}
	var got []time.Duration
	for _, ok := range []bool{false, false, false, false, true, false, true, true} {
		got = append(got, b.after(ok))
	}
	ms := time.Millisecond
	want := []time.Duration{200 * ms, 400 * ms, 800 * ms, time.Second, 200 * ms, 400 * ms, 200 * ms, 200 * ms}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("waits %v, want %v", got, want)
	}
}
