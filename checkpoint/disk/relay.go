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
// follows the NBD exchange and resets both connections when a request
// stays unanswered for Timeout, or when the agent calls Break; QEMU then
// fails the target write and, with on-target-error report, the guest goes
// on with its write done on the source.
type Relay struct {
	dial    func(ctx context.Context) (net.Conn, error)
	timeout time.Duration
	// Log, if set, reports connections and breaks.
	Log *slog.Logger

	mu     sync.Mutex
	ls     map[net.Listener]struct{}
	conns  map[*relayConn]struct{}
	done   bool
	wg     sync.WaitGroup
	broken uint64
	served uint64
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

// Break resets every relayed connection now: the agent declared the
// standby dead.
func (r *Relay) Break() {
	for _, rc := range r.live() {
		rc.abort("the agent broke the connection")
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
	Broken      uint64 // reset for a late answer or by Break
}

func (r *Relay) Stats() RelayStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return RelayStats{Connections: r.served, Broken: r.broken}
}

type relayConn struct {
	r          *Relay
	down, up   net.Conn
	once       sync.Once
	mu         sync.Mutex
	tracker    nbdTracker
	reason     string
	lastAnswer time.Time // when pending last became nonzero or a request was answered
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
	reason := rc.reason
	rc.mu.Unlock()
	if reason != "" {
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
			if toStandby {
				wasIdle := rc.tracker.pending == 0
				perr = rc.tracker.fromClient(buf[:n])
				if wasIdle && rc.tracker.pending > 0 {
					rc.lastAnswer = time.Now()
				}
			} else {
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
			if _, werr := dst.Write(buf[:n]); werr != nil {
				rc.abort("")
				return
			}
		}
		if err != nil {
			// A clean end is passed on as one (the standby must see the
			// disconnect request before the connection ends); anything
			// else resets the other side too.
			if cw, ok := dst.(interface{ CloseWrite() error }); ok && errors.Is(err, io.EOF) && cw.CloseWrite() == nil {
				return
			}
			rc.abort("")
			return
		}
	}
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
		pending := rc.tracker.pending
		rc.mu.Unlock()
		if late {
			rc.abort(fmt.Sprintf("%d requests unanswered by the standby for over %v", pending, rc.r.timeout))
			return
		}
	}
}

// abort resets both connections (RST, so QEMU fails its requests at once).
func (rc *relayConn) abort(reason string) {
	rc.once.Do(func() {
		rc.mu.Lock()
		rc.reason = reason
		rc.mu.Unlock()
		if reason != "" {
			rc.r.mu.Lock()
			rc.r.broken++
			rc.r.mu.Unlock()
		}
		for _, c := range []net.Conn{rc.down, rc.up} {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			c.Close()
		}
	})
}

// nbdTracker follows both directions of an NBD connection far enough to
// count the requests (options and commands) the server has not finished
// answering.
type nbdTracker struct {
	pending  int    // requests sent, not fully answered
	answered uint64 // final answers seen

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

func (t *nbdTracker) fromClient(p []byte) error {
	for len(p) > 0 {
		if t.cneed > 0 {
			k := min(t.cneed, len(p))
			t.cneed -= k
			p = p[k:]
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
			switch r.typ {
			case cmdDisc:
				t.discSent = true
			case cmdWrite:
				t.cneed = int(r.length)
				t.pending++
			case cmdRead:
				if t.reads == nil {
					t.reads = map[uint64]uint32{}
				}
				t.reads[r.handle] = r.length
				t.pending++
			default:
				t.pending++
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
