package checkpoint

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Standby is the standby end of the replication protocol. It reads the
// first frame of every connection to an agent's replication port, hands
// disk and unenroll connections to the agent, and runs replication
// sessions: the hello, every frame of an epoch into the guest's Replica,
// fence checks and acks. The agent owns guests, shells and disks and
// plugs in through StandbyHandler.
type Standby struct {
	Handler StandbyHandler
	Log     *slog.Logger
	// HandshakeTimeout bounds reading the first frame and the handler's
	// Accept (which may create a shell domain); default 2 minutes.
	HandshakeTimeout time.Duration
	// MaxHandshakes bounds connections that have not finished their first
	// frame (default 64); more are closed at once, so a flood of idle
	// connections costs neither memory nor goroutines.
	MaxHandshakes int

	once       sync.Once
	handshakes chan struct{}
}

// MaxHandshakePayload bounds the first frame of a connection, read before
// the handler has vetted the peer: a Hello with its domain XML is a few
// kilobytes.
const MaxHandshakePayload = 1 << 20

// StandbyHandler is what an agent supplies to a Standby.
type StandbyHandler interface {
	// Accept readies the replica of guest h.Guest for a session opened by
	// the primary on conn at fence. Its error is sent to the primary,
	// which gives up when the error is a *FatalError and retries
	// otherwise.
	Accept(ctx context.Context, conn net.Conn, h Hello, fence uint64) (Accepted, error)
	// Unenroll drops a replica on the primary's request.
	Unenroll(ctx context.Context, conn net.Conn, h Hello, fence uint64) (Welcome, error)
	// Restarting takes note that the guest's primary agent is restarting.
	Restarting(ctx context.Context, conn net.Conn, r Restarting, fence uint64) error
	// Move carries out a planned role move the peer asks for, and returns
	// once it is done.
	Move(ctx context.Context, conn net.Conn, m Move, fence uint64) error
	// Disk serves a disk connection (FrameDiskNBD or FrameDiskControl)
	// until it ends; it writes the welcome itself.
	Disk(ctx context.Context, conn net.Conn, kind FrameType, fence uint64, h DiskHello) error
}

// Accepted is a session the handler took on.
type Accepted struct {
	Guest   SessionGuest
	Welcome Welcome // what the replica holds
	// PageHashes, when set, follow the welcome (Welcome.Hashes counts
	// them): the replica is a complete checkpoint of another generation.
	PageHashes []uint64
}

// SessionGuest is one guest's replica as one session feeds it.
type SessionGuest interface {
	// Lock is held while one frame is handled. It fails when the session
	// may not go on (another session replaced it, a failover owns the
	// guest). It returns the replica and the fencing epoch frames must
	// carry at least.
	Lock() (*Replica, uint64, error)
	// Unlock ends the handling of f; committed says the epoch f ended was
	// committed and applied (and is acknowledged next).
	Unlock(f Frame, committed bool)
	// EpochBegin and EpochAbort journal an epoch's transaction; they are
	// called with the guest locked.
	EpochBegin(epoch uint64, gen string, full bool) error
	EpochAbort(epoch uint64)
	// Ended is called once when the session is over; err says why (nil
	// when the primary closed it).
	Ended(err error)
}

// FatalError is a refusal the primary must not retry until an admin acts.
type FatalError struct{ Err error }

func (e *FatalError) Error() string { return e.Err.Error() }
func (e *FatalError) Unwrap() error { return e.Err }

// Fatal wraps err as a refusal that retrying will not cure.
func Fatal(err error) error { return &FatalError{err} }

func (s *Standby) handshakeSlots() chan struct{} {
	s.once.Do(func() {
		n := s.MaxHandshakes
		if n <= 0 {
			n = 64
		}
		s.handshakes = make(chan struct{}, n)
	})
	return s.handshakes
}

// Serve accepts connections on ln until ctx ends or ln fails.
func (s *Standby) Serve(ctx context.Context, ln net.Listener) error {
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("replication listener: %w", err)
		}
		// The slot is taken here, in accept order, so a flood never
		// costs a goroutine.
		if !s.takeSlot(conn) {
			continue
		}
		go s.serveConn(ctx, conn)
	}
}

func (s *Standby) log() *slog.Logger {
	if s.Log == nil {
		return slog.Default()
	}
	return s.Log
}

// takeSlot takes a handshake slot for conn, or closes it when none is
// free.
func (s *Standby) takeSlot(conn net.Conn) bool {
	slots := s.handshakeSlots()
	select {
	case slots <- struct{}{}:
		return true
	default:
		s.log().Warn("too many connections in their handshake: closing one", "peer", conn.RemoteAddr().String(), "max", cap(slots))
		conn.Close()
		return false
	}
}

// ServeConn serves one connection to the replication port and closes it.
func (s *Standby) ServeConn(ctx context.Context, conn net.Conn) {
	if s.takeSlot(conn) {
		s.serveConn(ctx, conn)
	}
}

// serveConn is ServeConn with the handshake slot taken.
func (s *Standby) serveConn(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	peer := conn.RemoteAddr().String()
	timeout := s.HandshakeTimeout
	if timeout <= 0 {
		timeout = 2 * time.Minute
	}
	_ = conn.SetDeadline(time.Now().Add(timeout))
	slots := s.handshakeSlots()
	handshaking := true
	endHandshake := func() {
		if handshaking {
			handshaking = false
			<-slots
		}
	}
	defer endHandshake()
	br := bufio.NewReaderSize(conn, 64<<10)
	f, err := ReadFrameMax(br, MaxHandshakePayload)
	if err != nil {
		var ve *VersionError
		switch {
		case errors.As(err, &ve):
			sendError(conn, 0, fmt.Errorf("this standby agent speaks replication protocol v%d, the primary v%d: run the same remora release on both hosts", ProtocolVersion, ve.Got), true)
		case errors.Is(err, io.EOF):
			// Connect-and-close: the arbiter's reachability probe.
			s.log().Debug("connection closed before a handshake", "peer", peer)
			return
		}
		s.log().Warn("replication handshake failed", "peer", peer, "err", err)
		return
	}
	switch f.Type {
	case FrameDiskNBD, FrameDiskControl:
		var dh DiskHello
		if err := json.Unmarshal(f.Payload, &dh); err != nil {
			sendError(conn, 0, fmt.Errorf("bad %s frame: %v", f.Type, err), true)
			return
		}
		if err := dh.validate(); err != nil {
			s.log().Warn("disk connection refused", "peer", peer, "err", err)
			sendError(conn, 0, fmt.Errorf("bad %s frame: %w", f.Type, err), true)
			return
		}
		endHandshake()
		if err := s.Handler.Disk(ctx, conn, f.Type, f.Fence, dh); err != nil {
			s.log().Warn("disk connection ended", "guest", dh.Guest, "dev", dh.Dev, "kind", f.Type, "err", err)
			sendError(conn, 0, err, false)
		}
		return
	case FrameRestarting:
		var r Restarting
		if err := json.Unmarshal(f.Payload, &r); err != nil || r.Grace <= 0 {
			sendError(conn, 0, fmt.Errorf("bad %s frame: %v", f.Type, err), true)
			return
		}
		if err := r.validate(); err != nil {
			s.log().Warn("restart notice refused", "peer", peer, "err", err)
			sendError(conn, 0, fmt.Errorf("bad %s frame: %w", f.Type, err), true)
			return
		}
		if err := s.Handler.Restarting(ctx, conn, r, f.Fence); err != nil {
			s.log().Warn("restart notice refused", "guest", r.Guest, "from", r.Agent, "err", err)
			sendError(conn, 0, err, true)
			return
		}
		_ = WriteJSON(conn, FrameWelcome, f.Fence, 0, Welcome{})
		return
	case FrameMove:
		var m Move
		if err := json.Unmarshal(f.Payload, &m); err != nil {
			sendError(conn, 0, fmt.Errorf("bad %s frame: %v", f.Type, err), true)
			return
		}
		if err := m.validate(); err != nil {
			s.log().Warn("move refused", "peer", peer, "err", err)
			sendError(conn, 0, fmt.Errorf("bad %s frame: %w", f.Type, err), true)
			return
		}
		endHandshake()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Minute)) // the move itself
		if err := s.Handler.Move(ctx, conn, m, f.Fence); err != nil {
			s.log().Warn("move refused or failed", "guest", m.Guest, "from", m.Agent, "kind", m.Kind, "err", err)
			sendError(conn, 0, err, true)
			return
		}
		_ = WriteJSON(conn, FrameWelcome, f.Fence, 0, Welcome{})
		return
	case FrameHello, FrameUnenroll:
	default:
		sendError(conn, 0, fmt.Errorf("protocol error: session opened with %s", f.Type), true)
		return
	}
	var h Hello
	if err := json.Unmarshal(f.Payload, &h); err != nil {
		sendError(conn, 0, fmt.Errorf("bad %s frame: %v", f.Type, err), true)
		return
	}
	if err := h.validate(); err != nil {
		s.log().Warn("replication refused", "peer", peer, "err", err)
		sendError(conn, 0, fmt.Errorf("bad %s frame: %w", f.Type, err), true)
		return
	}
	if f.Type == FrameUnenroll {
		w, err := s.Handler.Unenroll(ctx, conn, h, f.Fence)
		if err != nil {
			s.log().Warn("unenroll refused", "guest", h.Guest, "from", h.Agent, "err", err)
			sendError(conn, 0, err, true)
			return
		}
		_ = WriteJSON(conn, FrameWelcome, f.Fence, 0, w)
		return
	}
	if h.PageSize != PageSize {
		sendError(conn, f.Fence, fmt.Errorf("primary uses %d-byte pages, this agent %d", h.PageSize, PageSize), true)
		return
	}
	acc, err := s.Handler.Accept(ctx, conn, h, f.Fence)
	if err != nil {
		var fatal *FatalError
		sendError(conn, f.Fence, err, errors.As(err, &fatal))
		s.log().Warn("replication refused", "guest", h.Guest, "primary", h.Agent, "err", err)
		return
	}
	g, w := acc.Guest, acc.Welcome
	w.Hashes = uint64(len(acc.PageHashes))
	if err := writeWelcome(conn, f.Fence, w, acc.PageHashes); err != nil {
		g.Ended(err)
		return
	}
	_ = conn.SetDeadline(time.Time{})
	endHandshake()
	s.log().Info("replication session accepted", "guest", h.Guest, "primary", h.Agent, "committed", w.Committed)
	err = receive(conn, br, g, h, f.Fence)
	g.Ended(err)
	if ctx.Err() == nil {
		s.log().Warn("replication session ended", "guest", h.Guest, "primary", h.Agent, "err", err)
	}
}

// writeWelcome sends the welcome and the page hashes it announces.
func writeWelcome(conn net.Conn, fence uint64, w Welcome, hashes []uint64) error {
	bw := bufio.NewWriterSize(conn, 1<<20)
	if err := WriteJSON(bw, FrameWelcome, fence, 0, w); err != nil {
		return err
	}
	var buf []byte
	for off := 0; off < len(hashes); off += MaxHashesPerFrame {
		buf = AppendPageHashes(buf[:0], hashes[off:min(off+MaxHashesPerFrame, len(hashes))])
		if err := WriteFrame(bw, Frame{Type: FramePageHashes, Fence: fence, Payload: buf}); err != nil {
			return err
		}
	}
	return bw.Flush()
}

func sendError(conn net.Conn, fence uint64, err error, fatal bool) {
	_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_ = WriteJSON(conn, FrameError, fence, 0, ErrorMsg{Error: err.Error(), Fatal: fatal})
}

// receive applies a session's frames until it ends; it always returns
// why.
func receive(conn net.Conn, br *bufio.Reader, g SessionGuest, h Hello, helloFence uint64) error {
	for {
		f, err := ReadFrame(br)
		if err != nil {
			return err
		}
		if f.Fence > helloFence {
			// A fence is vetted by the handler with the hello only: the
			// primary reconnects to present its new one.
			err := fmt.Errorf("fencing epoch %d in a %s frame of a session opened at %d: reconnect to present it", f.Fence, f.Type, helloFence)
			sendError(conn, f.Fence, err, false)
			return err
		}
		rep, fence, err := g.Lock()
		if err != nil {
			return err
		}
		committed, ferr := handleFrame(g, rep, fence, f, h.Generation)
		g.Unlock(f, committed)
		if ferr != nil {
			sendError(conn, max(fence, f.Fence), ferr, false)
			return ferr
		}
		if committed {
			if err := WriteFrame(conn, Frame{Type: FrameAck, Fence: f.Fence, Epoch: f.Epoch}); err != nil {
				return err
			}
		}
	}
}

// handleFrame applies one frame; it reports whether the frame committed
// an epoch. An error aborts the epoch being staged.
func handleFrame(g SessionGuest, rep *Replica, fence uint64, f Frame, gen string) (bool, error) {
	if f.Fence < fence {
		err := fmt.Errorf("stale fencing epoch %d in %s frame: this replica is at fencing epoch %d", f.Fence, f.Type, fence)
		rep.Abort()
		g.EpochAbort(f.Epoch)
		return false, err
	}
	var err error
	committed := false
	switch f.Type {
	case FrameEpochBegin:
		var b EpochBegin
		if err = json.Unmarshal(f.Payload, &b); err == nil {
			if err = g.EpochBegin(f.Epoch, gen, b.Full); err == nil {
				err = rep.Begin(gen, f.Epoch, b)
			}
		}
	case FramePages:
		err = rep.AddPages(f.Epoch, f.Payload)
	case FrameDevState:
		err = rep.AddDevState(f.Epoch, f.Payload)
	case FrameDevStateLZ4:
		err = rep.AddDevStateLZ4(f.Epoch, f.Payload)
	case FrameEpochEnd:
		var end EpochEnd
		if end, err = UnmarshalEpochEnd(f.Payload); err == nil {
			err = rep.End(f.Epoch, end)
		}
		committed = err == nil
	case FramePing:
	default:
		err = fmt.Errorf("protocol error: unexpected %s frame", f.Type)
	}
	if err != nil {
		rep.Abort()
		g.EpochAbort(f.Epoch)
	}
	return committed, err
}
