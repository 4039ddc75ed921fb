package disk

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// The control path: the primary tells the standby's Target "cut epoch N"
// while its guest is paused and waits for the answer before it resumes the
// guest. The standby cannot place the cut itself: writes made after the
// resume reach the NBD server on their own connection, independently of
// the epoch's memory frames.
//
// Request (16 bytes, big endian): "RDC1", u8 op (1 cut), 3 zero bytes,
// u64 epoch. Reply: "RDR1", u8 status, 3 zero bytes, u64 epoch, u64
// writes, u64 bytes, u32 message length, message.
const (
	ctlReqMagic   = "RDC1"
	ctlReplyMagic = "RDR1"
	ctlReqLen     = 16
	ctlReplyLen   = 40
	ctlOpCut      = 1
	ctlMaxMessage = 4096

	statusOK        = 0
	statusOutOfSync = 1
	statusError     = 2
)

func encodeCutRequest(epoch uint64) []byte {
	b := make([]byte, ctlReqLen)
	copy(b, ctlReqMagic)
	b[4] = ctlOpCut
	binary.BigEndian.PutUint64(b[8:], epoch)
	return b
}

func parseControlRequest(b []byte) (op byte, epoch uint64, err error) {
	if len(b) != ctlReqLen || string(b[:4]) != ctlReqMagic || b[5]|b[6]|b[7] != 0 {
		return 0, 0, errors.New("disk control: bad request")
	}
	return b[4], binary.BigEndian.Uint64(b[8:]), nil
}

// ServeControl answers cut requests for t on rw until rw fails or ends (a
// clean end returns nil). The agent hands it a connection from the
// primary (its own TLS'd one).
func ServeControl(rw io.ReadWriter, t *Target) error {
	br := bufio.NewReader(rw)
	req := make([]byte, ctlReqLen)
	for {
		if _, err := io.ReadFull(br, req); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		op, epoch, err := parseControlRequest(req)
		if err != nil {
			return err
		}
		status, msg := byte(statusOK), ""
		var st EpochStats
		if op != ctlOpCut {
			status, msg = statusError, fmt.Sprintf("unknown operation %d", op)
		} else if st, err = t.Cut(epoch); err != nil {
			status, msg = statusError, err.Error()
			if errors.Is(err, ErrOutOfSync) {
				status = statusOutOfSync
			}
		}
		if len(msg) > ctlMaxMessage {
			msg = msg[:ctlMaxMessage]
		}
		b := make([]byte, ctlReplyLen, ctlReplyLen+len(msg))
		copy(b, ctlReplyMagic)
		b[4] = status
		binary.BigEndian.PutUint64(b[8:], epoch)
		binary.BigEndian.PutUint64(b[16:], uint64(st.Writes))
		binary.BigEndian.PutUint64(b[24:], uint64(st.Bytes))
		binary.BigEndian.PutUint32(b[32:], uint32(len(msg)))
		b = append(b, msg...)
		if _, err := rw.Write(b); err != nil {
			return err
		}
	}
}

// CutError is a cut the standby refused. It wraps ErrOutOfSync when the
// replica needs a new full mirror.
type CutError struct {
	Epoch     uint64
	Msg       string
	OutOfSync bool
}

func (e *CutError) Error() string {
	return fmt.Sprintf("standby refused the disk cut of epoch %d: %s", e.Epoch, e.Msg)
}

func (e *CutError) Unwrap() error {
	if e.OutOfSync {
		return ErrOutOfSync
	}
	return nil
}

// CutClient sends cuts to a standby's ServeControl. After a transport
// error it is broken (the stream position is unknown): make a new one on
// a new connection.
type CutClient struct {
	mu     sync.Mutex
	rw     io.ReadWriter
	br     *bufio.Reader
	broken error
	last   EpochStats
}

// NewCutClient returns a client over rw, e.g. a net.Conn or a TLS
// connection to the standby agent.
func NewCutClient(rw io.ReadWriter) *CutClient {
	return &CutClient{rw: rw, br: bufio.NewReader(rw)}
}

type deadliner interface{ SetDeadline(time.Time) error }

// Cut asks the standby to seal the writes since the last cut as epoch's,
// in one round trip. Call it while the guest is paused (after QMP stop
// returned), and resume the guest only after it returned nil. ctx bounds
// the exchange when rw has SetDeadline (net.Conn does).
func (c *CutClient) Cut(ctx context.Context, epoch uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return fmt.Errorf("disk cut client broken by an earlier error: %w", c.broken)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	dl, hasDeadline := ctx.Deadline()
	if d, ok := c.rw.(deadliner); ok {
		d.SetDeadline(dl)
		stop := context.AfterFunc(ctx, func() { d.SetDeadline(time.Unix(1, 0)) })
		defer stop()
	}
	st, err := c.exchange(epoch)
	if err != nil {
		var ce *CutError
		if !errors.As(err, &ce) {
			// The socket deadline can fire a moment before ctx reports it.
			var ne interface{ Timeout() bool }
			if ctx.Err() != nil {
				err = fmt.Errorf("%w (%v)", ctx.Err(), err)
			} else if hasDeadline && errors.As(err, &ne) && ne.Timeout() && !time.Now().Before(dl) {
				err = fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
			}
			c.broken = err
		}
		return err
	}
	c.last = st
	return nil
}

func (c *CutClient) exchange(epoch uint64) (EpochStats, error) {
	if _, err := c.rw.Write(encodeCutRequest(epoch)); err != nil {
		return EpochStats{}, err
	}
	h := make([]byte, ctlReplyLen)
	if _, err := io.ReadFull(c.br, h); err != nil {
		return EpochStats{}, err
	}
	if string(h[:4]) != ctlReplyMagic {
		return EpochStats{}, errors.New("disk control: bad reply magic")
	}
	got := binary.BigEndian.Uint64(h[8:])
	n := binary.BigEndian.Uint32(h[32:])
	if n > ctlMaxMessage {
		return EpochStats{}, fmt.Errorf("disk control: reply message of %d bytes", n)
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(c.br, msg); err != nil {
		return EpochStats{}, err
	}
	if got != epoch {
		return EpochStats{}, fmt.Errorf("disk control: reply for epoch %d, asked %d", got, epoch)
	}
	switch h[4] {
	case statusOK:
		return EpochStats{Epoch: epoch, Writes: int(binary.BigEndian.Uint64(h[16:])), Bytes: int64(binary.BigEndian.Uint64(h[24:]))}, nil
	case statusOutOfSync:
		return EpochStats{}, &CutError{Epoch: epoch, Msg: string(msg), OutOfSync: true}
	default:
		return EpochStats{}, &CutError{Epoch: epoch, Msg: string(msg)}
	}
}

// Last returns what the standby sealed in the last successful cut.
func (c *CutClient) Last() EpochStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last
}
