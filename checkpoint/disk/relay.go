package disk

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Relay runs on the primary: QEMU's mirror connects to it (a unix socket
// next to the agent) and it carries the NBD connection to the standby
// over a connection the agent dials (its TLS'd one). It exists because
// QEMU 7.2's NBD client has no request timeout: a standby that stops
// answering without closing the connection holds the guest's write, and
// QMP stop that drains it, until TCP gives up (many minutes). The relay
// follows the NBD exchange, and when a request stays unanswered for
// Timeout, the standby's connection ends, or the agent calls Break, it
// stands in for the lost standby: it closes the standby's side and
// answers QEMU's requests itself (writes succeed, reads fail). QEMU never
// sees its target fail: QEMU 7.2 was seen to abort (heap corruption) when
// a write-blocking mirror's NBD connection was reset while a QMP stop was
// draining it. A connection stood in for means the replica misses writes
// (Stats.StoodIn): the agent must not cut another epoch on it and
// resyncs the disk. Only a connection lost in its handshake, or half way
// through a reply, is reset instead.
type Relay struct {
	dial    func(ctx context.Context) (net.Conn, error)
	timeout time.Duration
	// Log, if set, reports connections and breaks.
	Log *slog.Logger

	mu      sync.Mutex
	ls      map[net.Listener]struct{}
	conns   map[*relayConn]struct{}
	done    bool
	wg      sync.WaitGroup
	broken  uint64
	stoodIn uint64
	served  uint64
}

// DefaultRelayTimeout is how long a request may go unanswered.
const DefaultRelayTimeout = 3 * time.Second

// NewRelay returns a relay that dials the standby's NBD server with dial
// for each connection QEMU makes, and breaks a connection whose oldest
// unanswered request is older than timeout (0: DefaultRelayTimeout).
func NewRelay(dial func(ctx context.Context) (net.Conn, error), timeout time.Duration) *Relay {
	if timeout <= 0 {
		timeout = DefaultRelayTimeout
	}
	return &Relay{dial: dial, timeout: timeout, ls: map[net.Listener]struct{}{}, conns: map[*relayConn]struct{}{}}
}

func (r *Relay) log() *slog.Logger {
	if r.Log == nil {
		return discard
	}
	return r.Log
}

// Serve accepts QEMU's connections on l until Close.
func (r *Relay) Serve(l net.Listener) error {
	r.mu.Lock()
	if r.done {
		r.mu.Unlock()
		l.Close()
		return net.ErrClosed
	}
	r.ls[l] = struct{}{}
	r.mu.Unlock()
	for {
		c, err := l.Accept()
		if err != nil {
			r.mu.Lock()
			done := r.done
			delete(r.ls, l)
			r.mu.Unlock()
			if done {
				return nil
			}
			return err
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.serve(c)
		}()
	}
}

// Break stands in for the standby on every relayed connection now: the
// agent declared it dead.
func (r *Relay) Break() {
	for _, rc := range r.live() {
		rc.standIn("the agent declared the standby dead")
	}
}

func (r *Relay) live() []*relayConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	var cs []*relayConn
	for rc := range r.conns {
		cs = append(cs, rc)
	}
	return cs
}

// Close stops accepting, breaks every connection and waits for them.
func (r *Relay) Close() error {
	r.mu.Lock()
	r.done = true
	for l := range r.ls {
		l.Close()
	}
	r.mu.Unlock()
	for _, rc := range r.live() {
		rc.abort("relay closed")
	}
	r.wg.Wait()
	return nil
}

// RelayStats are a Relay's counters.
type RelayStats struct {
	Connections uint64 // relayed so far
	Broken      uint64 // reset (QEMU saw its target fail)
	// StoodIn counts connections whose standby was lost and whose
	// requests the relay answered itself: from the first of them on, the
	// replica misses writes QEMU counts as mirrored. It grows before the
	// relay answers anything in the standby's place.
	StoodIn uint64
}

func (r *Relay) Stats() RelayStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return RelayStats{Connections: r.served, Broken: r.broken, StoodIn: r.stoodIn}
}

type relayConn struct {
	r          *Relay
	down, up   net.Conn
	once       sync.Once
	mu         sync.Mutex
	tracker    nbdTracker
	reason     string
	lastAnswer time.Time // when pending last became nonzero or a request was answered
	standing   bool      // the relay answers in the lost standby's place
	// wmu keeps each write to QEMU whole: the standby's replies and the
	// relay's own go to QEMU on the same connection.
	wmu sync.Mutex
}

func (r *Relay) serve(down net.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout)
	up, err := r.dial(ctx)
	cancel()
	if err != nil {
		r.log().Warn("disk relay: cannot dial the standby", "err", err)
		down.Close()
		return
	}
	rc := &relayConn{r: r, down: down, up: up, lastAnswer: time.Now()}
	r.mu.Lock()
	if r.done {
		r.mu.Unlock()
		down.Close()
		up.Close()
		return
	}
	r.conns[rc] = struct{}{}
	r.served++
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.conns, rc)
		r.mu.Unlock()
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); rc.pump(up, down, true) }()
	go func() { defer wg.Done(); rc.pump(down, up, false) }()
	stop := make(chan struct{})
	go rc.watch(stop)
	wg.Wait()
	close(stop)
	down.Close()
	up.Close()
	rc.mu.Lock()
	reason, standing := rc.reason, rc.standing
	rc.mu.Unlock()
	switch {
	case standing:
		r.log().Info("disk relay: connection ended; the relay had stood in for the lost standby", "why", reason)
	case reason != "":
		r.log().Warn("disk relay: connection reset", "why", reason)
	}
}

// pump copies src to dst, feeding what passes to the tracker; toStandby
// is the direction of requests.
func (rc *relayConn) pump(dst, src net.Conn, toStandby bool) {
	buf := make([]byte, 256<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			rc.mu.Lock()
			var perr error
			var local []nbdPending
			standing := rc.standing
			switch {
			case toStandby:
				wasIdle := rc.tracker.pending == 0
				perr = rc.tracker.fromClient(buf[:n])
				if wasIdle && rc.tracker.pending > 0 {
					rc.lastAnswer = time.Now()
				}
				local = rc.tracker.takeLocal()
			case standing:
				// Late bytes of the lost standby: what they answer
				// was answered already.
				rc.mu.Unlock()
				return
			default:
				before := rc.tracker.answered
				perr = rc.tracker.fromServer(buf[:n])
				if rc.tracker.answered != before {
					rc.lastAnswer = time.Now()
				}
			}
			rc.mu.Unlock()
			if perr != nil {
				rc.abort(perr.Error())
				return
			}
			switch {
			case toStandby && standing:
				if rc.answer(local) != nil {
					rc.abort("")
					return
				}
			case toStandby:
				if _, werr := dst.Write(buf[:n]); werr != nil {
					rc.standIn(fmt.Sprintf("cannot write to the standby: %v", werr))
				}
			default:
				rc.wmu.Lock()
				_, werr := dst.Write(buf[:n])
				rc.wmu.Unlock()
				if werr != nil {
					rc.abort("")
					return
				}
			}
		}
		if err != nil {
			if toStandby {
				// A clean end is passed on as one (the standby must see
				// the disconnect request before the connection ends);
				// anything else resets the other side too.
				if cw, ok := dst.(interface{ CloseWrite() error }); ok && errors.Is(err, io.EOF) && cw.CloseWrite() == nil {
					return
				}
				rc.abort("")
				return
			}
			rc.mu.Lock()
			disc := rc.tracker.discSent
			rc.mu.Unlock()
			if disc && errors.Is(err, io.EOF) {
				if cw, ok := dst.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
					return
				}
				rc.abort("")
				return
			}
			rc.standIn(fmt.Sprintf("the standby's connection ended: %v", err))
			return
		}
	}
}

// standIn closes the standby's side and answers, from now on, every
// request QEMU sent or sends in the standby's place. A connection not
// between two replies (in its handshake, or with a reply half passed on)
// is reset instead.
func (rc *relayConn) standIn(reason string) {
	rc.mu.Lock()
	if rc.standing {
		rc.mu.Unlock()
		return
	}
	t := &rc.tracker
	if !t.betweenReplies() {
		rc.mu.Unlock()
		rc.abort(reason)
		return
	}
	rc.standing = true
	rc.reason = reason
	reqs := t.standIn()
	rc.mu.Unlock()
	// Counted before the first answer: a cut that follows the drain of
	// these writes sees it.
	rc.r.mu.Lock()
	rc.r.stoodIn++
	rc.r.mu.Unlock()
	rc.r.log().Warn("disk relay: the standby is lost; answering the mirror in its place (the replica misses writes from now on and must be resynced)",
		"why", reason, "answered", len(reqs))
	hardClose(rc.up)
	// Not on the caller's time (Break): QEMU reads the answers when it can.
	go func() {
		if rc.answer(reqs) != nil {
			rc.abort("")
		}
	}()
}

// hardClose ends c at once: RST for TCP, and no TLS close_notify, which
// would wait on a peer that may not read.
func hardClose(c net.Conn) {
	if nc, ok := c.(interface{ NetConn() net.Conn }); ok {
		c = nc.NetConn()
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// answer replies to reqs in the standby's place: a write (or flush, trim,
// zeroing) succeeds, since the guest's own disk has it; a read fails, as
// the replica has nothing to give.
func (rc *relayConn) answer(reqs []nbdPending) error {
	if len(reqs) == 0 {
		return nil
	}
	b := make([]byte, 0, len(reqs)*replyLen)
	for _, q := range reqs {
		var h [replyLen]byte
		binary.BigEndian.PutUint32(h[0:], nbdSimpleMagic)
		if q.typ == cmdRead {
			binary.BigEndian.PutUint32(h[4:], errIO)
		}
		binary.BigEndian.PutUint64(h[8:], q.handle)
		b = append(b, h[:]...)
	}
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	_, err := rc.down.Write(b)
	return err
}

func (rc *relayConn) watch(stop <-chan struct{}) {
	t := time.NewTicker(max(rc.r.timeout/8, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		rc.mu.Lock()
		late := rc.tracker.pending > 0 && time.Since(rc.lastAnswer) > rc.r.timeout
		pending, standing := rc.tracker.pending, rc.standing
		rc.mu.Unlock()
		if standing {
			return
		}
		if late {
			rc.standIn(fmt.Sprintf("%d requests unanswered by the standby for over %v", pending, rc.r.timeout))
			return
		}
	}
}

// abort resets both connections (RST, so QEMU fails its requests at once).
func (rc *relayConn) abort(reason string) {
	rc.once.Do(func() {
		rc.mu.Lock()
		if reason != "" || rc.reason == "" {
			rc.reason = reason
		}
		rc.mu.Unlock()
		if reason != "" {
			rc.r.mu.Lock()
			rc.r.broken++
			rc.r.mu.Unlock()
		}
		hardClose(rc.down)
		hardClose(rc.up)
	})
}

// nbdTracker follows both directions of an NBD connection far enough to
// count the requests (options and commands) the server has not finished
// answering.
type nbdTracker struct {
	pending  int    // requests sent, not fully answered
	answered uint64 // final answers seen

	// transmission requests received whole and passed to the standby,
	// not answered yet; once stood in, requests received whole go to
	// local instead, for the relay to answer
	forwarded map[uint64]uint16 // handle -> command
	local     []nbdPending
	writing   *nbdPending // a write whose payload is still coming
	stoodIn   bool

	// client to server
	cbuf      []byte
	cneed     int // bytes still to skip (option data, write payload)
	cstage    int // 0 flags, 1 options/requests
	exportOpt bool
	reads     map[uint64]uint32 // read handle -> length
	discSent  bool

	// server to client
	sbuf        []byte
	sneed       int
	sstage      int // 0 greeting, 1 option replies, 2 export-name reply, 3 transmission
	noZeroes    bool
	srvNoZeroes bool
}

var errTrackerProtocol = errors.New("nbd relay: unexpected NBD stream")

// nbdPending is a transmission request waiting for its answer.
type nbdPending struct {
	handle uint64
	typ    uint16
}

// received notes a transmission request that QEMU finished sending.
func (t *nbdTracker) received(q nbdPending) {
	if t.stoodIn {
		t.local = append(t.local, q)
		return
	}
	if t.forwarded == nil {
		t.forwarded = map[uint64]uint16{}
	}
	t.forwarded[q.handle] = q.typ
}

// takeLocal returns the requests the relay must answer now, counted as
// answered.
func (t *nbdTracker) takeLocal() []nbdPending {
	q := t.local
	t.local = nil
	for _, r := range q {
		delete(t.reads, r.handle)
		t.answer()
	}
	return q
}

// betweenReplies reports whether the transmission phase has begun and
// every reply the standby started is passed on whole.
func (t *nbdTracker) betweenReplies() bool {
	return t.cstage == 1 && t.sstage == 3 && len(t.sbuf) == 0 && t.sneed == 0
}

// standIn switches the tracker to local answers and returns the
// forwarded requests the standby left unanswered.
func (t *nbdTracker) standIn() []nbdPending {
	t.stoodIn = true
	for h, typ := range t.forwarded {
		t.local = append(t.local, nbdPending{handle: h, typ: typ})
	}
	t.forwarded = nil
	return t.takeLocal()
}

func (t *nbdTracker) fromClient(p []byte) error {
	for len(p) > 0 {
		if t.cneed > 0 {
			k := min(t.cneed, len(p))
			t.cneed -= k
			p = p[k:]
			if t.cneed == 0 && t.writing != nil {
				t.received(*t.writing)
				t.writing = nil
			}
			continue
		}
		want := 4
		switch {
		case t.cstage == 0:
		case len(t.cbuf) < 4:
		case binary.BigEndian.Uint32(t.cbuf) == nbdReqMagic:
			want = requestLen
		default:
			want = 16
		}
		k := min(want-len(t.cbuf), len(p))
		t.cbuf = append(t.cbuf, p[:k]...)
		p = p[k:]
		if len(t.cbuf) < want || (t.cstage == 1 && want == 4) {
			continue
		}
		h := t.cbuf
		t.cbuf = t.cbuf[:0]
		switch {
		case t.cstage == 0:
			t.noZeroes = binary.BigEndian.Uint32(h)&flagNoZeroes != 0
			t.cstage = 1
		case want == 16:
			if binary.BigEndian.Uint64(h) != nbdOptMagic {
				return errTrackerProtocol
			}
			t.cneed = int(binary.BigEndian.Uint32(h[12:]))
			t.pending++
			if binary.BigEndian.Uint32(h[8:]) == optExportName {
				t.exportOpt = true
			}
		default:
			r, err := parseRequest(h)
			if err != nil {
				return err
			}
			q := nbdPending{handle: r.handle, typ: r.typ}
			switch r.typ {
			case cmdDisc:
				t.discSent = true
			case cmdWrite:
				t.cneed = int(r.length)
				t.pending++
				if t.cneed == 0 {
					t.received(q)
				} else {
					t.writing = &q
				}
			case cmdRead:
				if t.reads == nil {
					t.reads = map[uint64]uint32{}
				}
				t.reads[r.handle] = r.length
				t.pending++
				t.received(q)
			default:
				t.pending++
				t.received(q)
			}
		}
	}
	return nil
}

func (t *nbdTracker) answer() {
	if t.pending > 0 {
		t.pending--
	}
	t.answered++
}

func (t *nbdTracker) fromServer(p []byte) error {
	for len(p) > 0 {
		if t.sneed > 0 {
			k := min(t.sneed, len(p))
			t.sneed -= k
			p = p[k:]
			continue
		}
		var want int
		switch t.sstage {
		case 0:
			want = 18
		case 1:
			want = 20
			if t.exportOpt {
				t.sstage = 2
				continue
			}
		case 2:
			want = 10
		default:
			want = replyLen
		}
		k := min(want-len(t.sbuf), len(p))
		t.sbuf = append(t.sbuf, p[:k]...)
		p = p[k:]
		if len(t.sbuf) < want {
			continue
		}
		h := t.sbuf
		t.sbuf = t.sbuf[:0]
		switch t.sstage {
		case 0:
			t.srvNoZeroes = binary.BigEndian.Uint16(h[16:])&flagNoZeroes != 0
			t.sstage = 1
		case 1:
			if binary.BigEndian.Uint64(h) != nbdRepMagic {
				return errTrackerProtocol
			}
			t.sneed = int(binary.BigEndian.Uint32(h[16:]))
			opt, typ := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
			if typ == repAck || typ&(1<<31) != 0 {
				t.answer()
				if opt == optGo && typ == repAck {
					t.sstage = 3
				}
			}
		case 2: // the answer to NBD_OPT_EXPORT_NAME: size, flags, maybe zeroes
			t.answer()
			if !(t.noZeroes && t.srvNoZeroes) {
				t.sneed = 124
			}
			t.sstage = 3
		default:
			if binary.BigEndian.Uint32(h) != nbdSimpleMagic {
				return errTrackerProtocol
			}
			handle := binary.BigEndian.Uint64(h[8:])
			delete(t.forwarded, handle)
			if n, ok := t.reads[handle]; ok {
				delete(t.reads, handle)
				if binary.BigEndian.Uint32(h[4:]) == 0 {
					t.sneed = int(n)
				}
			}
			t.answer()
		}
	}
	return nil
}
