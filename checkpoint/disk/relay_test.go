package disk

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// stallConn is a standby connection that stops answering (reads block)
// once stalled, without closing.
type stallConn struct {
	net.Conn
	mu      sync.Mutex
	stalled bool
	killed  bool
	gate    chan struct{}
}

func (c *stallConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	g := c.gate
	stalled := c.stalled
	c.mu.Unlock()
	if stalled {
		<-g
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.killed {
		return 0, net.ErrClosed
	}
	return n, err
}

// kill ends the connection as a standby that went away does: what it was
// holding back is never delivered.
func (c *stallConn) kill() {
	c.mu.Lock()
	c.killed = true
	c.mu.Unlock()
	c.Close()
}

func (c *stallConn) Close() error {
	c.stall(false)
	return c.Conn.Close()
}

func (c *stallConn) stall(on bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if on && !c.stalled {
		c.gate = make(chan struct{})
	}
	if !on && c.stalled {
		close(c.gate)
	}
	c.stalled = on
}

// relayTest runs a client (the test's, standing in for QEMU) through a
// Relay to a Server over pipes.
func relayTest(t *testing.T, timeout time.Duration) (*Relay, *Target, *stallConn, *nbdClient) {
	tg, _ := newMemTarget(1<<20, Options{})
	srv := NewServer(tg, "vda")
	var sc *stallConn
	r := NewRelay(func(context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go srv.ServeConn(b)
		sc = &stallConn{Conn: a}
		return sc, nil
	}, timeout)
	t.Cleanup(func() { r.Close() })
	down, qemu := net.Pipe()
	r.wg.Add(1)
	go func() { defer r.wg.Done(); r.serve(down) }()
	t.Cleanup(func() { qemu.Close() })
	qemu.SetDeadline(time.Now().Add(10 * time.Second))
	cl := &nbdClient{c: qemu, r: bufio.NewReader(qemu)}
	// The handshake as dialTest does it, through the relay.
	readFull(t, cl.r, 18)
	qemu.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
	sendOpt(qemu, 8, nil)
	readOptReply(t, cl.r)
	sendOpt(qemu, optGo, goRequest("vda", infoBlockSize))
	for readOptReply(t, cl.r).typ != repAck {
	}
	return r, tg, sc, cl
}

func TestRelayPassesASession(t *testing.T) {
	r, tg, _, cl := relayTest(t, 200*time.Millisecond)
	tg.Cut(1)
	for i := range 20 {
		if e, _ := cl.do(t, 0, cmdWrite, uint64(i)*4096, 4096, pattern(4096, byte(i))); e != 0 {
			t.Fatal(e)
		}
	}
	if e, got := cl.do(t, 0, cmdRead, 4096, 8192, nil); e != 0 || !bytes.Equal(got[:4096], pattern(4096, 1)) {
		t.Fatal("read through the relay", e)
	}
	cl.do(t, 0, cmdFlush, 0, 0, nil)
	time.Sleep(400 * time.Millisecond) // idle longer than the timeout: no break
	if e, _ := cl.do(t, 0, cmdWriteZeroes, 0, 512, nil); e != 0 {
		t.Fatal(e)
	}
	cl.do(t, 0, cmdDisc, 0, 0, nil)
	cl.c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for r.Stats().Connections != 1 || len(r.live()) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("relay did not end the connection")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := r.Stats(); st.Broken != 0 {
		t.Fatalf("stats %+v", st)
	}
	time.Sleep(50 * time.Millisecond)
	if err := tg.Err(); err != nil {
		t.Fatalf("a clean disconnect through the relay reached the standby as a broken one: %v", err)
	}
	if st, _ := tg.Cut(2); st.Writes != 21 {
		t.Fatalf("epoch 2: %+v", st)
	}
}

// readReply reads one simple reply and returns its handle and error.
func readReply(t *testing.T, cl *nbdClient) (uint64, uint32) {
	t.Helper()
	h := readFull(t, cl.r, replyLen)
	if binary.BigEndian.Uint32(h) != nbdSimpleMagic {
		t.Fatalf("reply %x", h)
	}
	return binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[4:])
}

// waitOutOfSync waits for the standby's target to count its replica out
// of sync (the relay closed its side).
func waitOutOfSync(t *testing.T, tg *Target) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for tg.Err() == nil {
		if time.Now().After(deadline) {
			t.Fatal("the standby still counts its replica in sync after the relay stood in")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A standby that stops answering: after the timeout the relay answers
// the write in flight itself, and every request after it, so QEMU never
// sees its target fail; the replica is lost and both sides know it.
func TestRelayStandsInForASilentStandby(t *testing.T) {
	r, tg, sc, cl := relayTest(t, 300*time.Millisecond)
	tg.Cut(1)
	if e, _ := cl.do(t, 0, cmdWrite, 0, 512, pattern(512, 1)); e != 0 {
		t.Fatal(e)
	}
	sc.stall(true)
	start := time.Now()
	cl.c.Write(append(reqBytes(0, cmdWrite, 9, 0, 512), pattern(512, 2)...))
	if h, e := readReply(t, cl); h != 9 || e != 0 {
		t.Fatalf("write in flight to the silent standby: handle %d error %d, want 9 and success", h, e)
	}
	if d := time.Since(start); d < 300*time.Millisecond || d > 3*time.Second {
		t.Fatalf("answered after %v, timeout 300ms", d)
	}
	if st := r.Stats(); st.StoodIn != 1 || st.Broken != 0 {
		t.Fatalf("stats %+v", st)
	}
	// From now on the relay answers at once: writes succeed, reads fail.
	for i := range 5 {
		if e, _ := cl.do(t, 0, cmdWrite, uint64(i)*512, 512, pattern(512, 3)); e != 0 {
			t.Fatalf("write %d after the stand-in: error %d", i, e)
		}
	}
	if e, _ := cl.do(t, 0, cmdFlush, 0, 0, nil); e != 0 {
		t.Fatal("flush", e)
	}
	if e, _ := cl.do(t, 0, cmdRead, 0, 512, nil); e != errIO {
		t.Fatalf("read from a lost replica: error %d, want EIO", e)
	}
	waitOutOfSync(t, tg)
	if _, err := tg.Cut(2); err == nil {
		t.Fatal("the standby cut an epoch its replica misses writes of")
	}
	cl.do(t, 0, cmdDisc, 0, 0, nil)
	cl.c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for len(r.live()) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("relay did not end the connection")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The standby's connection ends (host rebooted, RST): the relay stands in
// for the requests it left unanswered.
func TestRelayStandsInWhenTheStandbyConnectionEnds(t *testing.T) {
	r, tg, sc, cl := relayTest(t, time.Minute)
	tg.Cut(1)
	sc.stall(true)
	cl.c.Write(append(reqBytes(0, cmdWrite, 7, 0, 512), pattern(512, 2)...))
	cl.c.Write(reqBytes(0, cmdFlush, 8, 0, 0))
	time.Sleep(50 * time.Millisecond)
	sc.kill()
	got := map[uint64]uint32{}
	for range 2 {
		h, e := readReply(t, cl)
		got[h] = e
	}
	if len(got) != 2 || got[7] != 0 || got[8] != 0 {
		t.Fatalf("answers %v, want handles 7 and 8 answered with success", got)
	}
	if st := r.Stats(); st.StoodIn != 1 || st.Broken != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestRelayBreak(t *testing.T) {
	r, tg, sc, cl := relayTest(t, time.Minute)
	tg.Cut(1)
	sc.stall(true)
	cl.c.Write(append(reqBytes(0, cmdWrite, 5, 0, 512), pattern(512, 2)...))
	time.Sleep(50 * time.Millisecond)
	r.Break()
	if h, e := readReply(t, cl); h != 5 || e != 0 {
		t.Fatalf("after Break: handle %d error %d", h, e)
	}
	if e, _ := cl.do(t, 0, cmdWrite, 0, 512, pattern(512, 3)); e != 0 {
		t.Fatal(e)
	}
	waitOutOfSync(t, tg)
	if st := r.Stats(); st.StoodIn != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// A standby lost before the transmission phase: nothing to stand in for,
// the connection is reset and QEMU's blockdev-add fails.
func TestRelayResetsAConnectionLostInItsHandshake(t *testing.T) {
	r := NewRelay(func(context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go func() {
			b.Write(make([]byte, 18)[:10]) // half a greeting, then gone
			b.Close()
		}()
		return a, nil
	}, time.Minute)
	defer r.Close()
	down, qemu := net.Pipe()
	r.wg.Add(1)
	go func() { defer r.wg.Done(); r.serve(down) }()
	qemu.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	var err error
	for err == nil {
		_, err = qemu.Read(buf)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the relay kept a connection whose standby left in the handshake")
	}
	if st := r.Stats(); st.StoodIn != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// The tracker on the stream of a whole session, fed in odd-sized pieces,
// with the old-style EXPORT_NAME handshake and zero padding.
func TestTrackerExportName(t *testing.T) {
	var c, s bytes.Buffer
	c.Write([]byte{0, 0, 0, 1}) // fixed newstyle, no NO_ZEROES
	s.Write(make([]byte, 16))
	s.Write([]byte{0, flagFixedNewstyle | flagNoZeroes})
	opt := []byte("IHAVEOPT\x00\x00\x00\x01\x00\x00\x00\x03vda")
	c.Write(opt)
	s.Write(make([]byte, 10+124))
	c.Write(reqBytes(0, cmdRead, 5, 0, 1000))
	c.Write(append(reqBytes(0, cmdWrite, 6, 0, 700), make([]byte, 700)...))
	rep := func(h uint64, n int) {
		b := make([]byte, replyLen)
		copy(b, []byte{0x67, 0x44, 0x66, 0x98})
		b[15] = byte(h)
		s.Write(b)
		s.Write(make([]byte, n))
	}
	var tr nbdTracker
	feed := func(f func([]byte) error, b []byte) {
		for len(b) > 0 {
			k := min(len(b), 7)
			if err := f(b[:k]); err != nil {
				t.Fatal(err)
			}
			b = b[k:]
		}
	}
	feed(tr.fromClient, c.Bytes()[:4+len(opt)])
	feed(tr.fromServer, s.Bytes())
	if tr.pending != 0 || tr.sstage != 3 {
		t.Fatalf("after the handshake: %+v", tr)
	}
	feed(tr.fromClient, c.Bytes()[4+len(opt):])
	if tr.pending != 2 {
		t.Fatalf("pending %d, want 2", tr.pending)
	}
	s.Reset()
	rep(5, 1000)
	rep(6, 0)
	feed(tr.fromServer, s.Bytes())
	if tr.pending != 0 || tr.answered != 3 {
		t.Fatalf("after the replies: pending %d answered %d", tr.pending, tr.answered)
	}
}

// QEMU's own client through the relay over a unix socket, when installed.
func TestRelayWithQemuIO(t *testing.T) {
	qemuIO, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("qemu-io not installed")
	}
	dir := t.TempDir()
	tg, _ := newMemTarget(4<<20, Options{})
	srv := NewServer(tg, "vda")
	nl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(nl)
	defer srv.Close()
	r := NewRelay(func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", nl.Addr().String())
	}, time.Second)
	sock := filepath.Join(dir, "relay.sock")
	ul, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go r.Serve(ul)
	defer r.Close()
	tg.Cut(1)
	out, err := exec.Command(qemuIO, "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k",
		"-c", "write -z 1M 64k", fmt.Sprintf("nbd+unix:///vda?socket=%s", sock)).CombinedOutput()
	if err != nil || strings.Contains(string(out), "error") || strings.Contains(string(out), "failed") {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	time.Sleep(50 * time.Millisecond)
	if st, err := tg.Cut(2); err != nil || st.Writes != 2 {
		t.Fatalf("cut 2: %+v %v", st, err)
	}
	if st := r.Stats(); st.Connections != 1 || st.Broken != 0 {
		t.Fatalf("relay stats %+v", st)
	}
	_ = os.Remove(sock)
}
