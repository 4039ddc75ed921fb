package checkpoint

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// handlerRig is a Standby serving one replica, as an agent would plug it in.
type handlerRig struct {
	t      *testing.T
	ram    []byte
	r      *Replica
	fence  uint64
	refuse error // Accept refuses with it when set
	// offerHashes: a replica of another generation offers its page hashes.
	offerHashes bool
	mu          sync.Mutex
	locked      bool
	ended       []error
	begins      int
	aborts      int
	commits     int
	ln          net.Listener
}

func startHandlerRig(t *testing.T, pages int) *handlerRig {
	h := &handlerRig{t: t, ram: make([]byte, pages*PageSize), fence: testFence}
	store := newAgentStore(t)
	var err error
	if h.r, err = OpenReplica(filepath.Join(t.TempDir(), "replica"), h.ram, ReplicaState{}, store.persist); err != nil {
		t.Fatal(err)
	}
	if h.ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	sb := &Standby{Handler: h, Log: testLogger(t), HandshakeTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = sb.Serve(ctx, h.ln) }()
	t.Cleanup(func() { cancel(); h.ln.Close(); <-done })
	return h
}

func (h *handlerRig) Accept(ctx context.Context, conn net.Conn, hello Hello, fence uint64) (Accepted, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.refuse != nil {
		return Accepted{}, h.refuse
	}
	if fence < h.fence {
		return Accepted{}, errors.New("stale fence")
	}
	st := h.r.State()
	acc := Accepted{Guest: h, Welcome: Welcome{Agent: "standby-1", Generation: st.Generation, Committed: st.Committed}}
	if h.offerHashes && st.Generation != hello.Generation && h.r.Consistent() == nil {
		acc.PageHashes = h.r.PageHashes()
	}
	return acc, nil
}

func (h *handlerRig) Unenroll(ctx context.Context, conn net.Conn, hello Hello, fence uint64) (Welcome, error) {
	return Welcome{}, errors.New("not here")
}

func (h *handlerRig) Move(context.Context, net.Conn, Move, uint64) error {
	return errors.New("no moves here")
}

func (h *handlerRig) Restarting(context.Context, net.Conn, Restarting, uint64) error {
	return errors.New("not here")
}

func (h *handlerRig) Disk(ctx context.Context, conn net.Conn, kind FrameType, fence uint64, dh DiskHello) error {
	return errors.New("no disks")
}

func (h *handlerRig) Lock() (*Replica, uint64, error) {
	h.mu.Lock()
	if h.locked {
		h.t.Error("Lock while locked")
	}
	h.locked = true
	return h.r, h.fence, nil
}

func (h *handlerRig) Unlock(f Frame, committed bool) {
	if committed {
		h.commits++
	}
	h.locked = false
	h.mu.Unlock()
}

func (h *handlerRig) EpochBegin(epoch uint64, gen string, full bool) error { h.begins++; return nil }
func (h *handlerRig) EpochAbort(epoch uint64)                              { h.aborts++ }
func (h *handlerRig) Ended(err error) {
	h.mu.Lock()
	h.ended = append(h.ended, err)
	h.mu.Unlock()
}

func (h *handlerRig) state() (ReplicaState, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.r.State(), h.commits
}

// A real Primary replicating to a real Standby converges: the replica's
// RAM and device state are the guest's as of the last committed epoch.
func TestStandbyServesPrimary(t *testing.T) {
	const pages = 1024
	h := startHandlerRig(t, pages)
	mem := make([]byte, pages*PageSize)
	vm := newFakeVM(t, mem)
	addr := h.ln.Addr().String()
	p := NewPrimary(PrimaryConfig{Agent: "primary-1", Guest: "vm1", Interval: 20 * time.Millisecond, Fence: testFence,
		Dial: func(ctx context.Context) (net.Conn, error) { var d net.Dialer; return d.DialContext(ctx, "tcp", addr) },
		Log:  testLogger(t), Hook: vm.hook}, vm, mem, NewScanTracker(len(mem)))
	w := startGuestWriter(vm, 3)
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- p.Run(ctx) }()
	wait(t, 15*time.Second, "10 commits", func() bool { _, n := h.state(); return n >= 10 })
	cancel()
	if err := <-runErr; err != nil {
		t.Fatal(err)
	}
	vm.settle(t)
	w.halt()
	wait(t, 5*time.Second, "the session to end", func() bool { h.mu.Lock(); defer h.mu.Unlock(); return len(h.ended) == 1 })
	st, commits := h.state()
	if st.Committed == 0 || st.Applied != st.Committed || !st.Synced || p.Progress().Acked > st.Committed {
		t.Fatalf("replica %+v, primary acked %d", st, p.Progress().Acked)
	}
	snap, dev := vm.snapshot(st.Committed)
	if !bytes.Equal(h.ram, snap) {
		t.Fatalf("replica RAM differs from the guest at epoch %d in %d pages", st.Committed, diffPages(h.ram, snap))
	}
	if got, err := os.ReadFile(h.r.DevStatePath()); err != nil || !bytes.Equal(got, dev) {
		t.Fatalf("device state differs (%v)", err)
	}
	if h.begins < commits {
		t.Fatalf("%d epochs journaled for %d commits", h.begins, commits)
	}
}

// dialHandshake opens a connection to the rig and sends one frame.
func dialSend(t *testing.T, h *handlerRig, f Frame) (*bufio.Reader, net.Conn) {
	t.Helper()
	c, err := net.Dial("tcp", h.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := WriteFrame(c, f); err != nil {
		t.Fatal(err)
	}
	return bufio.NewReader(c), c
}

// Hostile or confused peers get a clear refusal and change nothing.
func TestStandbyRefusesBadSessions(t *testing.T) {
	h := startHandlerRig(t, 16)
	hello := func(fence uint64, pageSize int) Frame {
		var buf bytes.Buffer
		_ = WriteJSON(&buf, FrameHello, fence, 0, Hello{Agent: "p", Guest: "g", PageSize: pageSize, RAMBytes: 16 * PageSize})
		f, _, err := DecodeFrame(buf.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	for _, c := range []struct {
		name  string
		frame Frame
		want  string
		fatal bool
	}{
		{"first frame not a hello", Frame{Type: FramePages, Fence: testFence, Epoch: 1, Payload: []byte{1, 2}}, "session opened with pages", true},
		{"hello without a guest", Frame{Type: FrameHello, Fence: testFence, Payload: []byte(`{"agent":"p"}`)}, "bad hello frame", true},
		{"other page size", hello(testFence, 8192), "8192-byte pages", true},
		{"stale fence", hello(testFence-1, PageSize), "stale fence", false},
		{"path traversal guest", Frame{Type: FrameHello, Fence: testFence, Payload: []byte(`{"agent":"p","guest":"../../../../tmp/x","page_size":4096}`)}, "is not a valid name", true},
		{"path traversal disk", Frame{Type: FrameDiskNBD, Fence: testFence, Payload: []byte(`{"agent":"p","guest":"g","dev":"../../etc/passwd"}`)}, "is not a valid name", true},
		{"agent name with a slash", Frame{Type: FrameUnenroll, Fence: testFence, Payload: []byte(`{"agent":"a/b","guest":"g"}`)}, "is not a valid name", true},
		{"negative disk size", Frame{Type: FrameHello, Fence: testFence, Payload: []byte(`{"agent":"p","guest":"g","page_size":4096,"disks":[{"dev":"vda","size":-5}]}`)}, "out of range", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			br, _ := dialSend(t, h, c.frame)
			var w Welcome
			_, err := ReadJSON(br, FrameWelcome, &w)
			var pe *PeerError
			if !errors.As(err, &pe) || !strings.Contains(pe.Error(), c.want) || pe.Fatal != c.fatal {
				t.Fatalf("got %v, want a refusal naming %q (fatal %v)", err, c.want, c.fatal)
			}
		})
	}
	// A frame of an older fence in an open session aborts the epoch and
	// ends the session; the replica is untouched.
	br, conn := dialSend(t, h, hello(testFence, PageSize))
	var w Welcome
	if _, err := ReadJSON(br, FrameWelcome, &w); err != nil {
		t.Fatal(err)
	}
	if err := WriteJSON(conn, FrameEpochBegin, testFence, 1, EpochBegin{Full: true, Pages: 16}); err != nil {
		t.Fatal(err)
	}
	if err := WriteFrame(conn, Frame{Type: FramePing, Fence: testFence - 1}); err != nil {
		t.Fatal(err)
	}
	_, err := ReadJSON(br, FrameAck, &w)
	var pe *PeerError
	if !errors.As(err, &pe) || !strings.Contains(pe.Error(), "stale fencing epoch") {
		t.Fatalf("stale frame: %v", err)
	}
	wait(t, 5*time.Second, "the session to end", func() bool { h.mu.Lock(); defer h.mu.Unlock(); return len(h.ended) == 1 })
	if st, _ := h.state(); st != (ReplicaState{}) {
		t.Fatalf("replica changed: %+v", st)
	}
	if h.aborts == 0 {
		t.Fatal("the staged epoch was not aborted in the journal")
	}
}

// A first frame longer than a hello is refused from its header, before its
// payload is allocated; a frame of a newer fence than the session's
// hello ends the session (the fence is vetted with the hello only).
func TestStandbyHandshakeLimits(t *testing.T) {
	h := startHandlerRig(t, 16)
	c, err := net.Dial("tcp", h.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	// A header announcing 16 MiB, and no payload: the standby must not
	// wait for it.
	big := AppendFrame(nil, Frame{Type: FrameHello, Fence: testFence, Payload: make([]byte, MaxHandshakePayload+1)})
	if _, err := c.Write(big[:frameHeaderLen]); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("the standby did not close an oversized handshake at once: %v", err)
	}

	var buf bytes.Buffer
	_ = WriteJSON(&buf, FrameHello, testFence, 0, Hello{Agent: "p", Guest: "g", PageSize: PageSize, RAMBytes: 16 * PageSize})
	f, _, _ := DecodeFrame(buf.Bytes())
	br, conn := dialSend(t, h, f)
	var w Welcome
	if _, err := ReadJSON(br, FrameWelcome, &w); err != nil {
		t.Fatal(err)
	}
	if err := WriteFrame(conn, Frame{Type: FramePing, Fence: testFence + 1}); err != nil {
		t.Fatal(err)
	}
	_, err = ReadJSON(br, FrameAck, &w)
	var pe *PeerError
	if !errors.As(err, &pe) || !strings.Contains(pe.Error(), "reconnect to present it") {
		t.Fatalf("a newer fence mid-session: %v", err)
	}
}

// Connections that never finish their handshake hold at most
// MaxHandshakes slots; the next is closed at once, and a slot frees when
// one ends.
func TestStandbyHandshakeFlood(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	sb := &Standby{Handler: &helloRecorder{}, Log: testLogger(t), HandshakeTimeout: time.Minute, MaxHandshakes: 4}
	done := make(chan struct{})
	go func() { defer close(done); _ = sb.Serve(ctx, ln) }()
	defer func() { cancel(); ln.Close(); <-done }()
	var idle []net.Conn
	for range 4 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	closedAtOnce := func() bool {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, err = c.Read(make([]byte, 1))
		return err == io.EOF
	}
	wait(t, 5*time.Second, "a fifth idle connection to be closed", closedAtOnce)
	idle[0].Close()
	wait(t, 5*time.Second, "a freed slot", func() bool { return !closedAtOnce() })
}

// hideSeed is a tracker without Seed, like the soft-dirty one.
type hideSeed struct{ Tracker }

// A primary of a new generation (its agent restarted) resyncs against the
// replica's page hashes: its first epoch carries only the pages that
// differ, and the replica converges to the guest.
func TestStandbyResyncAgainstReplicaHashes(t *testing.T) {
	for _, c := range []struct {
		name    string
		tracker func(int) Tracker
	}{
		{"scan tracker seeded", func(n int) Tracker { return NewScanTracker(n) }},
		{"tracker without seed", func(n int) Tracker { return hideSeed{NewScanTracker(n)} }},
	} {
		t.Run(c.name, func(t *testing.T) {
			const pages = 2048
			h := startHandlerRig(t, pages)
			h.offerHashes = true
			mem := make([]byte, pages*PageSize)
			r := newRand(5)
			for p := 0; p < pages; p += 3 {
				fillText(r, mem[p*PageSize:(p+1)*PageSize])
			}
			vm := newFakeVM(t, mem)
			addr := h.ln.Addr().String()
			run := func(until func() bool) *Primary {
				p := NewPrimary(PrimaryConfig{Agent: "primary-1", Guest: "vm1", Interval: 20 * time.Millisecond, Fence: testFence,
					Dial: func(ctx context.Context) (net.Conn, error) { var d net.Dialer; return d.DialContext(ctx, "tcp", addr) },
					Log:  testLogger(t), Hook: vm.hook}, vm, mem, c.tracker(len(mem)))
				w := startGuestWriter(vm, 11)
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() { done <- p.Run(ctx) }()
				wait(t, 15*time.Second, "the epochs", until)
				cancel()
				if err := <-done; err != nil {
					t.Fatal(err)
				}
				vm.settle(t)
				w.halt()
				return p
			}
			run(func() bool { _, n := h.state(); return n >= 5 })
			before, _ := h.state()
			wait(t, 5*time.Second, "the first session to end", func() bool { h.mu.Lock(); defer h.mu.Unlock(); return len(h.ended) == 1 })
			// The agent restarts: a new generation.
			p2 := run(func() bool { st, _ := h.state(); return st.Committed >= before.Committed+5 })
			st := p2.Status()
			if st.SyncPages == 0 || st.SyncPages >= pages/2 {
				t.Fatalf("the resync sent %d of %d pages; want only those that differ", st.SyncPages, pages)
			}
			wait(t, 5*time.Second, "the second session to end", func() bool { h.mu.Lock(); defer h.mu.Unlock(); return len(h.ended) == 2 })
			rs, _ := h.state()
			if rs.Generation != st.Generation || !rs.Synced || rs.Applied != rs.Committed {
				t.Fatalf("replica %+v after the resync (primary generation %s)", rs, st.Generation)
			}
			snap, _ := vm.snapshot(rs.Committed)
			if !bytes.Equal(h.ram, snap) {
				t.Fatalf("replica RAM differs from the guest at epoch %d in %d pages", rs.Committed, diffPages(h.ram, snap))
			}
			t.Logf("resync sent %d of %d pages", st.SyncPages, pages)
		})
	}
}
