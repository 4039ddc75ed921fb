//go:build linux && cgo

package outcommit

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remora-ha/remora/internal/stats"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/test/labkit"
)

// Tests against a real lab guest (TCG, virtio NIC on rmbr0). They need
// root, REMORA_LAB=1 and `test/lab/lab.sh up`:
//
//	REMORA_LAB=1 go test -v -run Lab ./checkpoint/outcommit/

const (
	labGuestName = "oc-lab"
	labGuestIdx  = 61
)

type labEnv struct {
	t   *testing.T
	lg  *labkit.Guest
	g   *qemu.Guest
	tap string
	dir string
}

func (e *labEnv) stop() {
	e.t.Helper()
	if err := qemu.Exec(context.Background(), e.g.Mon, "stop", nil, nil); err != nil {
		e.t.Fatal(err)
	}
}

func (e *labEnv) cont() {
	e.t.Helper()
	if err := qemu.Exec(context.Background(), e.g.Mon, "cont", nil, nil); err != nil {
		e.t.Fatal(err)
	}
}

// epoch emulates a checkpoint's pause: stop, Cut(n), cont.
func (e *labEnv) epoch(b Buffer, n uint64) {
	e.t.Helper()
	e.stop()
	err := b.Cut(n)
	e.cont()
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *labEnv) redirector(opts Options) *Redirector {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := NewRedirector(ctx, e.g, e.dir, opts)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { r.Close() })
	return r
}

// lineConn is a raw connection to the workload, so that a read that times
// out does not end it.
type lineConn struct {
	c net.Conn
	r *bufio.Reader
}

func (e *labEnv) dial() *lineConn {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp4", e.lg.Addr())
	if err != nil {
		e.t.Fatal(err)
	}
	c.(*net.TCPConn).SetNoDelay(true)
	e.t.Cleanup(func() { c.Close() })
	return &lineConn{c: c, r: bufio.NewReader(c)}
}

func (l *lineConn) send(cmd string) error {
	_, err := l.c.Write([]byte(cmd + "\n"))
	return err
}

// reply reads one reply line within d; a timeout is reported as ok=false.
func (l *lineConn) reply(d time.Duration) (string, bool, error) {
	l.c.SetReadDeadline(time.Now().Add(d))
	s, err := l.r.ReadString('\n')
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			if s != "" {
				return s, false, fmt.Errorf("partial reply %q", s)
			}
			return "", false, nil
		}
		return "", false, err
	}
	return strings.TrimSpace(s), true, nil
}

// tapWatch records the frames QEMU hands to the guest's tap (what the
// network sees of the guest's output), from an AF_PACKET socket on the
// tap.
type tapWatch struct {
	fd   int
	mu   sync.Mutex
	fr   [][]byte
	done chan struct{}
	stop chan struct{}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func watchTap(t *testing.T, ifname string) *tapWatch {
	t.Helper()
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		t.Fatal(err)
	}
	tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	w := &tapWatch{fd: fd, done: make(chan struct{}), stop: make(chan struct{})}
	go func() {
		defer close(w.done)
		buf := make([]byte, 70000)
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			n, from, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue
			}
			if sll, ok := from.(*unix.SockaddrLinklayer); ok && sll.Pkttype == unix.PACKET_OUTGOING {
				continue // host -> guest
			}
			w.mu.Lock()
			w.fr = append(w.fr, bytes.Clone(buf[:n]))
			w.mu.Unlock()
		}
	}()
	t.Cleanup(w.close)
	return w
}

func (w *tapWatch) close() {
	select {
	case <-w.stop:
		return
	default:
	}
	close(w.stop)
	<-w.done
	unix.Close(w.fd)
}

func (w *tapWatch) frames() [][]byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([][]byte(nil), w.fr...)
}

func (w *tapWatch) reset() {
	w.mu.Lock()
	w.fr = nil
	w.mu.Unlock()
}

func TestLab(t *testing.T) {
	labkit.RequireLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	lg, g, _ := labkit.BootOpen(t, ctx, labkit.GuestOptions{Name: labGuestName, IP: labkit.GuestIP(labGuestIdx), Rate: -1})
	out, err := labkit.Virsh(ctx, "domiflist", lg.Name)
	if err != nil {
		t.Fatal(err)
	}
	var tap string
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "vnet") {
			tap = f[0]
		}
	}
	if tap == "" {
		t.Fatalf("no tap in domiflist:\n%s", out)
	}
	dir := filepath.Join(labkit.AgentRunDir, "outcommit-test")
	env := &labEnv{t: t, lg: lg, g: g, tap: tap, dir: dir}
	t.Logf("guest %s booted in %v, tap %s", lg.Name, lg.BootTime.Round(time.Millisecond), tap)

	for _, tc := range []struct {
		name string
		fn   func(*testing.T, *labEnv)
	}{
		{"HeldUntilReleased", labHeldUntilReleased},
		{"ExactCutsAndOrder", labExactCutsAndOrder},
		{"DiscardAfterRetransmit", labDiscardAfterRetransmit},
		{"WithDeviceStateCheckpoints", labWithDeviceStateCheckpoints},
		{"CloseRestoresNetwork", labCloseRestoresNetwork},
		{"ReleaseAllThenClose", labReleaseAllThenClose},
		{"DetachThenTakeover", labDetachThenTakeover},
		{"WaitingSaysOutputIsHeld", labWaitingSaysOutputIsHeld},
		{"NetdevNotFound", labNetdevNotFound},
		{"RoundTripLatency", labRoundTripLatency},
	} {
		ok := t.Run(tc.name, func(t *testing.T) {
			e := *env
			e.t = t
			tc.fn(t, &e)
		})
		if !ok {
			break
		}
		// Each case must leave QEMU without our objects and the guest running.
		if st, _ := qemu.Status(context.Background(), g.Mon); st != "running" {
			qemu.Exec(context.Background(), g.Mon, "cont", nil, nil)
		}
		assertNoObjects(t, g)
	}
}

func assertNoObjects(t *testing.T, g *qemu.Guest) {
	t.Helper()
	var objs []struct{ Name string }
	if err := qemu.Exec(context.Background(), g.Mon, "qom-list", map[string]string{"path": "/objects"}, &objs); err != nil {
		t.Fatal(err)
	}
	var chrs []struct{ Label string }
	if err := qemu.Exec(context.Background(), g.Mon, "query-chardev", nil, &chrs); err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if strings.HasPrefix(o.Name, "remora-oc-") {
			t.Errorf("object %s left in QEMU", o.Name)
		}
	}
	for _, c := range chrs {
		if strings.HasPrefix(c.Label, "remora-oc-") {
			t.Errorf("chardev %s left in QEMU", c.Label)
		}
	}
}

// A reply is not seen while the epoch in which the guest sent it is not
// released; Release of the epoch before does not let it out either.
// An agent that stops on purpose detaches: the guest's output stays held
// (dropped, never sent) while no agent runs, and the next agent takes the
// filters over without letting a frame through; the guest's TCP sends the
// reply again, and it goes out once its epoch is released.
func labDetachThenTakeover(t *testing.T, e *labEnv) {
	lc := e.dial()
	r1 := e.redirector(Options{HoldFromStart: true})
	e.epoch(r1, 1)
	r1.Detach()
	w := watchTap(t, e.tap)
	if err := lc.send("inc"); err != nil {
		t.Fatal(err)
	}
	if s, ok, err := lc.reply(1500 * time.Millisecond); ok || err != nil {
		t.Fatalf("reply %q arrived with no agent holding the output (err %v)", s, err)
	}
	r2 := e.redirector(Options{HoldFromStart: true})
	if s, ok, err := lc.reply(1500 * time.Millisecond); ok || err != nil {
		t.Fatalf("reply %q arrived during the takeover (err %v)", s, err)
	}
	if n := len(w.frames()); n != 0 {
		t.Fatalf("the tap saw %d frames from the guest before any release", n)
	}
	waitOpenFrames(t, r2)
	// The first frame held may be an ARP or an early retransmission the
	// guest sends again later: keep cutting and releasing epochs, as a
	// running agent does, until the reply is out.
	deadline := time.Now().Add(60 * time.Second)
	for n := uint64(1); ; n++ {
		e.epoch(r2, n)
		if err := r2.Release(n); err != nil {
			t.Fatal(err)
		}
		_, ok, err := lc.reply(2 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reply after the new agent released %d epochs: %+v", n, r2.Stats())
		}
	}
}

// Waiting fires once the guest's reply is held in the open epoch, not
// before (negative control: nothing sent, nothing fires), and a Cut takes
// the pending signal back.
func labWaitingSaysOutputIsHeld(t *testing.T, e *labEnv) {
	lc := e.dial()
	r := e.redirector(Options{HoldFromStart: true})
	e.epoch(r, 1)
	select {
	case <-r.Waiting():
		if n := r.Stats().OpenFrames; n == 0 {
			t.Fatal("Waiting fired with nothing held in the open epoch")
		}
		e.epoch(r, 2) // something the guest sent on its own (ARP): cut it
	case <-time.After(500 * time.Millisecond):
	}
	if err := lc.send("inc"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.Waiting():
	case <-time.After(20 * time.Second):
		t.Fatalf("Waiting did not fire for the held reply: %+v", r.Stats())
	}
	if r.Stats().OpenFrames == 0 {
		t.Fatal("Waiting fired but the open epoch holds nothing")
	}
	e.epoch(r, 3)
	select {
	case <-r.Waiting():
		if r.Stats().OpenFrames == 0 {
			t.Fatal("a signal from before the cut was left pending")
		}
	default:
	}
	if err := r.Release(3); err != nil {
		t.Fatal(err)
	}
	// The frame that woke Waiting may have been the guest's ACK of the
	// request, with the reply itself in the next epoch: then Waiting fires
	// again for it, and its epoch is cut and released in turn.
	for n := uint64(3); ; n++ {
		if n > 3 {
			select {
			case <-r.Waiting():
			case <-time.After(20 * time.Second):
				t.Fatalf("no reply after releasing epoch %d, and Waiting did not fire again: %+v", n-1, r.Stats())
			}
			e.epoch(r, n)
			if err := r.Release(n); err != nil {
				t.Fatal(err)
			}
		}
		_, ok, err := lc.reply(3 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			return
		}
		if n == 6 {
			t.Fatalf("no reply after releasing epochs 3 to %d: %+v", n, r.Stats())
		}
	}
}

func labHeldUntilReleased(t *testing.T, e *labEnv) {
	lc := e.dial()
	if err := lc.send("get"); err != nil {
		t.Fatal(err)
	}
	before, ok, err := lc.reply(20 * time.Second)
	if err != nil || !ok {
		t.Fatalf("get before protection: %q %v %v", before, ok, err)
	}
	w := watchTap(t, e.tap)
	r := e.redirector(Options{})
	e.epoch(r, 1) // holding from here on
	w.reset()

	if err := lc.send("inc"); err != nil {
		t.Fatal(err)
	}
	// The guest answers within this epoch (TCG: tens of ms); the reply is held.
	if s, ok, err := lc.reply(1500 * time.Millisecond); ok || err != nil {
		t.Fatalf("reply %q arrived while its epoch was open (err %v)", s, err)
	}
	waitOpenFrames(t, r)
	if n := len(w.frames()); n != 0 {
		t.Fatalf("the tap saw %d frames from the guest while its output was held", n)
	}
	e.epoch(r, 2) // the reply is in epoch 2
	if err := r.Release(1); err != nil {
		t.Fatal(err)
	}
	if s, ok, err := lc.reply(1000 * time.Millisecond); ok || err != nil {
		t.Fatalf("reply %q arrived after Release(1), its epoch is 2 (err %v)", s, err)
	}
	held := r.Stats().HeldFrames
	start := time.Now()
	if err := r.Release(2); err != nil {
		t.Fatal(err)
	}
	s, ok, err := lc.reply(20 * time.Second)
	if err != nil || !ok {
		t.Fatalf("no reply after Release(2): %v", err)
	}
	want := mustUint(t, before) + 1
	if got := mustUint(t, s); got != want {
		t.Fatalf("inc replied %d, want %d", got, want)
	}
	st := r.Stats()
	t.Logf("reply %s arrived %v after Release(2); %d frames were held; stats %+v", s, time.Since(start).Round(time.Microsecond), held, st)
	if st.MisalignedFrames != 0 || st.DroppedFrames != 0 {
		t.Fatalf("stats %+v", st)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
}

// heldGet sends `get` once output is held from epoch 1 and returns when
// the guest's answer sits in the open epoch, not delivered.
func heldGet(t *testing.T, e *labEnv) (*lineConn, *Redirector) {
	t.Helper()
	lc := e.dial()
	r := e.redirector(Options{})
	e.epoch(r, 1)
	lc.send("get")
	waitOpenFrames(t, r)
	if s, ok, _ := lc.reply(200 * time.Millisecond); ok {
		t.Fatalf("reply %q not held", s)
	}
	return lc, r
}

// waitOpenFrames waits until the guest's answer is held in the open epoch
// (TCG answers in tens of ms, a loaded machine in seconds).
func waitOpenFrames(t *testing.T, r *Redirector) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for r.Stats().OpenFrames == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("nothing held in the open epoch after 20 s: %+v", r.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func mustUint(t *testing.T, s string) uint64 {
	t.Helper()
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		t.Fatalf("reply %q: %v", s, err)
	}
	return v
}

// Under steady traffic, epochs of ~20 ms: the capture stream does not move
// while the guest is paused (every frame from before the pause was in the
// socket when stop returned), no frame straddles a cut, and the tap sees
// exactly the captured frames of the released epochs, in capture order.
func labExactCutsAndOrder(t *testing.T, e *labEnv) {
	lc := e.dial()
	w := watchTap(t, e.tap)
	r := e.redirector(Options{HoldFromStart: true})
	var capMu sync.Mutex
	type capd struct {
		eth []byte
		end int64
	}
	var captured []capd
	r.mu.Lock()
	r.onCapture = func(rec record) {
		capMu.Lock()
		captured = append(captured, capd{bytes.Clone(rec.ethernet()), rec.end()})
		capMu.Unlock()
	}
	r.mu.Unlock()
	w.reset()

	// Steady load: pipelined requests, replies read as they come.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var replies int
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if lc.send("get") != nil {
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, ok, err := lc.reply(200 * time.Millisecond); err != nil {
				return
			} else if ok {
				replies++
			}
		}
	}()

	const epochs = 60
	var bounds []int64
	var moved int
	for n := uint64(1); n <= epochs; n++ {
		time.Sleep(20 * time.Millisecond)
		e.stop()
		if err := r.Cut(n); err != nil {
			e.cont()
			t.Fatal(err)
		}
		r.mu.Lock()
		cut := r.q.lastEnd()
		r.mu.Unlock()
		bounds = append(bounds, cut)
		time.Sleep(5 * time.Millisecond) // still paused: nothing may arrive
		r.mu.Lock()
		pos, err := r.positionLocked()
		r.mu.Unlock()
		e.cont()
		if err != nil {
			t.Fatal(err)
		}
		if pos != cut {
			moved++
			t.Errorf("epoch %d: the capture stream moved from %d to %d while the guest was paused", n, cut, pos)
		}
		if n > 1 { // acks come one epoch late, as with a pipelined standby
			if err := r.Release(n - 1); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := r.Release(epochs); err != nil {
		t.Fatal(err)
	}
	close(stop)
	lc.c.Close()
	wg.Wait()
	time.Sleep(200 * time.Millisecond) // let the tap watcher see the last frames
	st := r.Stats()
	r.mu.Lock()
	r.onCapture = nil
	r.mu.Unlock()

	// Released = captured frames that end at or before the last cut.
	capMu.Lock()
	var want [][]byte
	aligned := map[int64]bool{0: true}
	for _, c := range captured {
		aligned[c.end] = true
		if c.end <= bounds[len(bounds)-1] {
			want = append(want, c.eth)
		}
	}
	capMu.Unlock()
	for i, b := range bounds {
		if !aligned[b] {
			t.Errorf("cut %d at stream offset %d is not between two frames", i+1, b)
		}
	}
	got := w.frames()
	t.Logf("%d epochs, %d replies, %d frames captured, %d released, tap saw %d; hold p50 %v p99 %v",
		epochs, replies, len(captured), st.ReleasedFrames, len(got), st.ReleaseP50, st.ReleaseP99)
	if uint64(len(want)) != st.ReleasedFrames {
		t.Errorf("%d frames before the last cut, %d released", len(want), st.ReleasedFrames)
	}
	if len(got) < len(want) {
		t.Fatalf("tap saw %d frames, %d released", len(got), len(want))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Fatalf("frame %d on the tap differs from the %dth captured (order or content): got %d bytes, want %d", i, i, len(got[i]), len(want[i]))
		}
	}
	if st.MisalignedFrames != 0 || moved != 0 || replies == 0 {
		t.Fatalf("misaligned %d, moved during pause %d, replies %d", st.MisalignedFrames, moved, replies)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
}

// DiscardAfter drops the held reply; the guest's TCP retransmits it, and it
// gets through after a later epoch is released. The guest processed the
// request once.
func labDiscardAfterRetransmit(t *testing.T, e *labEnv) {
	lc := e.dial()
	lc.send("get")
	before, ok, err := lc.reply(20 * time.Second)
	if err != nil || !ok {
		t.Fatal("get:", err)
	}
	r := e.redirector(Options{})
	e.epoch(r, 10)
	lc.send("inc")
	waitOpenFrames(t, r) // the guest has answered: held in the open epoch
	e.epoch(r, 11)
	held := r.Stats().HeldFrames
	r.DiscardAfter(10)
	st := r.Stats()
	if st.DiscardedFrames == 0 || st.HeldFrames != 0 {
		t.Fatalf("DiscardAfter(10): held %d before, stats %+v", held, st)
	}
	if err := r.Release(11); err != nil {
		t.Fatal(err)
	}
	if s, ok, err := lc.reply(500 * time.Millisecond); ok || err != nil {
		t.Fatalf("discarded reply %q arrived (err %v)", s, err)
	}
	// Epochs go on (numbers after 10 again), each released at once.
	start := time.Now()
	var s string
	for n := uint64(11); ; n++ {
		e.epoch(r, n)
		if err := r.Release(n); err != nil {
			t.Fatal(err)
		}
		var ok bool
		s, ok, err = lc.reply(100 * time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		if time.Since(start) > 30*time.Second {
			t.Fatal("no retransmitted reply within 30 s")
		}
	}
	if got, want := mustUint(t, s), mustUint(t, before)+1; got != want {
		t.Fatalf("reply %d, want %d", got, want)
	}
	lc.send("get")
	e.epoch(r, 1000)
	waitOpenFrames(t, r)
	// The frame that woke waitOpenFrames may be the guest's ACK, its reply
	// in a later epoch: cut and release until the reply is out.
	var s2 string
	var out bool
	for n, deadline := uint64(1001), time.Now().Add(20*time.Second); ; n++ {
		e.epoch(r, n)
		if err := r.Release(n); err != nil {
			t.Fatal(err)
		}
		if s2, out, err = lc.reply(100 * time.Millisecond); err != nil || out || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || !out || mustUint(t, s2) != mustUint(t, before)+1 {
		t.Fatalf("get after the retransmit: %q %v %v (the request must have run once)", s2, out, err)
	}
	st = r.Stats()
	t.Logf("discarded %d frames; the retransmitted reply %s came %v after the discard; stats %+v",
		st.DiscardedFrames, s, time.Since(start).Round(time.Millisecond), st)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
}

// The real checkpoint pause (stop, Cut, migrate the device state with
// x-ignore-shared to a unix socket, cont from postmigrate) works with the
// filters in place, and the capture stream does not move during it.
func labWithDeviceStateCheckpoints(t *testing.T, e *labEnv) {
	if err := qemu.SetIgnoreShared(context.Background(), e.g.Mon, true); err != nil {
		t.Fatal(err)
	}
	sockPath := filepath.Join(e.dir, e.g.Name+".devstate.sock")
	sink, err := qemu.ListenDeviceState(sockPath)
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	lc := e.dial()
	r := e.redirector(Options{})
	var devBytes int64
	for n := uint64(1); n <= 10; n++ {
		if n%2 == 1 {
			lc.send("inc")
		}
		time.Sleep(50 * time.Millisecond)
		e.stop()
		if err := r.Cut(n); err != nil {
			e.cont()
			t.Fatal(err)
		}
		r.mu.Lock()
		cut := r.q.lastEnd()
		r.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if n == 3 {
			abandonSave(t, ctx, e.g, sockPath)
		}
		var buf bytes.Buffer
		nb, err := sink.Save(ctx, e.g, &buf)
		cancel()
		r.mu.Lock()
		pos, perr := r.positionLocked()
		r.mu.Unlock()
		e.cont()
		if err != nil || perr != nil {
			t.Fatal(err, perr)
		}
		devBytes = nb
		if pos != cut {
			t.Fatalf("epoch %d: the capture stream moved from %d to %d during the device-state save", n, cut, pos)
		}
		if n > 1 {
			if err := r.Release(n - 1); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := r.Release(10); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if s, ok, err := lc.reply(20 * time.Second); !ok || err != nil {
			t.Fatalf("reply %d: %q %v %v", i, s, ok, err)
		}
	}
	st := r.Stats()
	t.Logf("10 checkpoints with device state (%d bytes each) and filters in place; 5 replies; stats %+v", devBytes, st)
	if st.MisalignedFrames != 0 {
		t.Fatal("misaligned")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
}

// abandonSave leaves what a save whose session ended after its migrate
// command took effect leaves: QEMU connected to the device-state socket,
// its connection unaccepted in the backlog, the migration active. The next
// save must not read that stream and then wait for its own forever.
func abandonSave(t *testing.T, ctx context.Context, g *qemu.Guest, sockPath string) {
	t.Helper()
	if err := qemu.Exec(ctx, g.Mon, "migrate", map[string]any{"uri": "unix:" + sockPath}, nil); err != nil {
		t.Fatal(err)
	}
	for {
		st, _, err := qemu.MigrationStatus(ctx, g.Mon)
		if err != nil {
			t.Fatal(err)
		}
		if st == "active" {
			return
		}
		if st != "setup" {
			t.Fatalf("the abandoned migration is %s, not active: the case is not staged", st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Close removes the filters and chardevs (held frames dropped): a new
// connection works at once, and the dropped reply comes by retransmission
// on the direct path.
func labCloseRestoresNetwork(t *testing.T, e *labEnv) {
	lc, r := heldGet(t, e)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.DiscardedFrames == 0 {
		t.Fatalf("Close dropped nothing: %+v", st)
	}
	assertNoObjects(t, e.g)
	c := e.dial()
	start := time.Now()
	c.send("get")
	if s, ok, err := c.reply(20 * time.Second); !ok || err != nil {
		t.Fatalf("after Close: %q %v %v", s, ok, err)
	}
	t.Logf("a new connection's get answered in %v after Close", time.Since(start).Round(time.Microsecond))
	if s, ok, err := lc.reply(30 * time.Second); !ok || err != nil {
		t.Fatalf("the dropped reply was not retransmitted: %q %v %v", s, ok, err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := r.Cut(2); err == nil {
		t.Fatal("Cut after Close accepted")
	}
}

// ReleaseAll then Close: held replies come out, and nothing is lost.
func labReleaseAllThenClose(t *testing.T, e *labEnv) {
	lc, r := heldGet(t, e)
	if err := r.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	if s, ok, err := lc.reply(20 * time.Second); !ok || err != nil {
		t.Fatalf("after ReleaseAll: %q %v %v", s, ok, err)
	}
	// Passed on as it comes now.
	lc.send("get")
	if s, ok, err := lc.reply(20 * time.Second); !ok || err != nil {
		t.Fatalf("after ReleaseAll, a new request: %q %v %v", s, ok, err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.DiscardedFrames != 0 {
		t.Fatalf("ReleaseAll then Close discarded %d frames", st.DiscardedFrames)
	}
}

func labNetdevNotFound(t *testing.T, e *labEnv) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := NewRedirector(ctx, e.g, e.dir, Options{Netdev: "hostnet9"})
	if err == nil {
		t.Fatal("no error for netdev hostnet9")
	}
	t.Logf("error: %v", err)
	if !strings.Contains(err.Error(), `on netdev "hostnet0"`) {
		t.Fatalf("the error does not name the guest's netdev: %v", err)
	}
}

// The added round-trip latency: `get` round trips with no buffer, and with
// epochs every interval (stop, Cut, cont, Release at once, as with an
// instant ack).
func labRoundTripLatency(t *testing.T, e *labEnv) {
	// measure fails with what went wrong: a reply that never came is
	// usually the epoch loop having stopped (its error is in epochErr).
	measure := func(lc *lineConn, n int, epochErr func() error) (p50, p99 time.Duration) {
		lat := stats.NewWindow(n)
		for i := range n {
			start := time.Now()
			if err := lc.send("get"); err != nil {
				t.Fatalf("get %d of %d: send: %v", i+1, n, err)
			}
			// Generous: a shared CI machine has stalled for seconds, and a
			// lost frame waits for TCP's backed-off retransmission.
			_, ok, err := lc.reply(30 * time.Second)
			if err != nil {
				t.Fatalf("get %d of %d: %v", i+1, n, err)
			}
			if !ok {
				t.Fatalf("get %d of %d: no reply in 30 s; epoch loop: %v", i+1, n, epochErr())
			}
			lat.Add(time.Since(start))
		}
		p50, p99, _ = percentiles(lat)
		if s := lat.Samples(); len(s) > 0 {
			if m := slices.Max(s); m > time.Second {
				t.Logf("slowest round trip: %v", m.Round(time.Microsecond))
			}
		}
		return
	}
	lc := e.dial()
	b50, b99 := measure(lc, 50, func() error { return errors.New("none running") })
	t.Logf("direct: round trip p50 %v p99 %v", b50.Round(time.Microsecond), b99.Round(time.Microsecond))
	for _, interval := range []time.Duration{25 * time.Millisecond, 100 * time.Millisecond} {
		r := e.redirector(Options{})
		e.epoch(r, 0) // hold from here on
		stop := make(chan struct{})
		done := make(chan error, 1)
		cuts, pauses := stats.NewWindow(4096), stats.NewWindow(4096)
		var epochs atomic.Int64
		var slow slowest
		loopStart := time.Now()
		go func() {
			var n uint64
			for {
				select {
				case <-stop:
					done <- nil
					return
				case <-time.After(interval):
				}
				n++
				t0 := time.Now()
				slow.begin(fmt.Sprintf("stop of epoch %d", n))
				if err := qemu.Exec(context.Background(), e.g.Mon, "stop", nil, nil); err != nil {
					done <- err
					return
				}
				slow.end()
				t1 := time.Now()
				err := r.Cut(n)
				cuts.Add(time.Since(t1))
				slow.begin(fmt.Sprintf("cont of epoch %d", n))
				if cerr := qemu.Exec(context.Background(), e.g.Mon, "cont", nil, nil); err == nil {
					err = cerr
				}
				slow.end()
				pauses.Add(time.Since(t0))
				if err == nil {
					slow.begin(fmt.Sprintf("Release(%d)", n))
					err = r.Release(n)
					slow.end()
				}
				if err != nil {
					done <- err
					return
				}
				epochs.Add(1)
			}
		}()
		epochErr := func() error {
			select {
			case loopErr := <-done:
				if loopErr == nil {
					return errors.New("ended early")
				}
				return fmt.Errorf("failed after %d epochs: %w", epochs.Load(), loopErr)
			default:
				return fmt.Errorf("still running, %d epochs, slowest step %v, %+v", epochs.Load(), &slow, r.Stats())
			}
		}
		p50, p99 := measure(lc, 40, epochErr)
		close(stop)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		st := r.Stats()
		c50, c99, _ := percentiles(cuts)
		s50, s99, _ := percentiles(pauses)
		t.Logf("sleep %v between epochs (stop, Cut, cont, Release): %d epochs, one per %v; stop..cont p50 %v p99 %v; Cut p50 %v p99 %v",
			interval, epochs.Load(), (time.Since(loopStart) / time.Duration(max(epochs.Load(), 1))).Round(time.Microsecond),
			s50.Round(time.Microsecond), s99.Round(time.Microsecond), c50, c99)
		t.Logf("  round trip p50 %v p99 %v; frame hold p50 %v p99 %v; %d frames released; slowest step: %v",
			p50.Round(time.Microsecond), p99.Round(time.Microsecond), st.ReleaseP50.Round(time.Microsecond), st.ReleaseP99.Round(time.Microsecond), st.ReleasedFrames, &slow)
		if st.ReleasedFrames == 0 {
			t.Fatal("nothing was held")
		}
		if err := r.ReleaseAll(); err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// slowest remembers the longest step of a loop and the step under way,
// to explain a stall.
type slowest struct {
	mu       sync.Mutex
	what     string
	d        time.Duration
	current  string
	started  time.Time
	finished bool
}

func (s *slowest) begin(what string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.current, s.started, s.finished = what, time.Now(), false
}

func (s *slowest) end() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := time.Since(s.started); d > s.d {
		s.what, s.d = s.current, d
	}
	s.finished = true
}

func (s *slowest) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := fmt.Sprintf("%s took %v", s.what, s.d.Round(time.Microsecond))
	if !s.finished && s.current != "" {
		out += fmt.Sprintf("; %s under way for %v", s.current, time.Since(s.started).Round(time.Microsecond))
	}
	return out
}

func percentiles(w *stats.Window) (p50, p99 time.Duration, n int) {
	s := w.Samples()
	return stats.Percentile(s, 50), stats.Percentile(s, 99), len(s)
}
