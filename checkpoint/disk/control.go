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
// Request (16 bytes, big endian): "RDC1", u8 op (1 cut, 2 block hashes),
// 3 zero bytes, u64 epoch (the block size, for hashes). Reply: "RDR1", u8
// status, 3 zero bytes, u64 epoch, u64 writes (the number of hashes), u64
// bytes, u32 message length, message, then the hashes (be64 each).
const (
	ctlReqMagic   = "RDC1"
	ctlReplyMagic = "RDR1"
	ctlReqLen     = 16
	ctlReplyLen   = 40
	ctlOpCut      = 1
	ctlOpHashes   = 2
	ctlMaxMessage = 4096
	// ctlMaxHashes bounds a hashes reply (a 64 TiB disk in 64 KiB blocks).
	ctlMaxHashes = MaxHashedSize / HashBlock

	statusOK        = 0
	statusOutOfSync = 1
	statusError     = 2
)

func encodeCutRequest(epoch uint64) []byte { return encodeRequest(ctlOpCut, epoch) }

func encodeRequest(op byte, arg uint64) []byte {
	b := make([]byte, ctlReqLen)
	copy(b, ctlReqMagic)
	b[4] = op
	binary.BigEndian.PutUint64(b[8:], arg)
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
		var hashes []uint64
		switch {
		case op == ctlOpHashes:
			if hashes, err = t.BlockHashes(int64(epoch)); err != nil {
				status, msg = statusError, err.Error()
			}
			st.Writes = len(hashes)
		case op != ctlOpCut:
			status, msg = statusError, fmt.Sprintf("unknown operation %d", op)
		default:
			st, err = t.Cut(epoch)
		}
		if op == ctlOpCut && err != nil {
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
		for _, h := range hashes {
			b = binary.BigEndian.AppendUint64(b, h)
		}
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

// BlockHashes asks the standby for its replica image's hashes per block
// (before the replica is cut into epochs: a new mirror's start).
func (c *CutClient) BlockHashes(ctx context.Context, block int64) ([]uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return nil, fmt.Errorf("disk control client broken by an earlier error: %w", c.broken)
	}
	if d, ok := c.rw.(deadliner); ok {
		dl, _ := ctx.Deadline()
		d.SetDeadline(dl)
		stop := context.AfterFunc(ctx, func() { d.SetDeadline(time.Unix(1, 0)) })
		defer stop()
		defer d.SetDeadline(time.Time{})
	}
	hashes, err := c.hashes(block)
	if err != nil {
		var ce *CutError
		if !errors.As(err, &ce) {
			c.broken = err
		}
	}
	return hashes, err
}

func (c *CutClient) hashes(block int64) ([]uint64, error) {
	if _, err := c.rw.Write(encodeRequest(ctlOpHashes, uint64(block))); err != nil {
		return nil, err
	}
	h := make([]byte, ctlReplyLen)
	if _, err := io.ReadFull(c.br, h); err != nil {
		return nil, err
	}
	if string(h[:4]) != ctlReplyMagic {
		return nil, errors.New("disk control: bad reply magic")
	}
	n, count := binary.BigEndian.Uint32(h[32:]), binary.BigEndian.Uint64(h[16:])
	if n > ctlMaxMessage || count > ctlMaxHashes || binary.BigEndian.Uint64(h[8:]) != uint64(block) {
		return nil, fmt.Errorf("disk control: bad hashes reply (message %d bytes, %d hashes)", n, count)
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(c.br, msg); err != nil {
		return nil, err
	}
	if h[4] != statusOK {
		return nil, &CutError{Msg: "block hashes: " + string(msg)}
	}
	raw := make([]byte, count*8)
	if _, err := io.ReadFull(c.br, raw); err != nil {
		return nil, err
	}
	out := make([]uint64, count)
	for i := range out {
		out[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	return out, nil
}

// Last returns what the standby sealed in the last successful cut.
func (c *CutClient) Last() EpochStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last
}
