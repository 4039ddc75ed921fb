package disk

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
)

// NBD protocol values (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).
// Only what a QEMU mirror target needs: fixed newstyle handshake, simple
// replies, no TLS, no structured replies.
const (
	nbdMagic       = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic    = 0x49484156454F5054 // "IHAVEOPT"
	nbdRepMagic    = 0x3e889045565a9
	nbdReqMagic    = 0x25609513
	nbdSimpleMagic = 0x67446698

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	optExportName = 1
	optAbort      = 2
	optList       = 3
	optInfo       = 6
	optGo         = 7

	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repErrUnsup   = 1<<31 + 1
	repErrInvalid = 1<<31 + 3
	repErrUnknown = 1<<31 + 6

	infoExport    = 0
	infoBlockSize = 3

	tflagHasFlags     = 1 << 0
	tflagSendFlush    = 1 << 2
	tflagSendFUA      = 1 << 3
	tflagSendTrim     = 1 << 5
	tflagSendZeroes   = 1 << 6
	transmissionFlags = tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendZeroes

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
	knownCmdFlags = cmdFlagFUA | cmdFlagNoHole

	errPerm     = 1
	errIO       = 5
	errInval    = 22
	errNoSpc    = 28
	errShutdown = 108

	// Block size constraints advertised to the client.
	minBlock       = 512
	preferredBlock = 4096
	maxPayload     = 32 << 20

	maxOptionLen = 64 << 10
	requestLen   = 28
	replyLen     = 16
)

// request is one transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	offset uint64
	length uint32
}

var errBadRequestMagic = errors.New("nbd: bad request magic")

func parseRequest(b []byte) (request, error) {
	if len(b) != requestLen {
		return request{}, fmt.Errorf("nbd: request header of %d bytes", len(b))
	}
	if binary.BigEndian.Uint32(b) != nbdReqMagic {
		return request{}, errBadRequestMagic
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		handle: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// check returns the NBD error for a request that cannot be served on an
// export of size bytes (0: none).
func (r request) check(size int64) uint32 {
	if r.flags&^knownCmdFlags != 0 {
		return errInval
	}
	switch r.typ {
	case cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes:
	case cmdFlush:
		if r.offset != 0 || r.length != 0 {
			return errInval
		}
		return 0
	default:
		return errInval
	}
	if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > maxPayload {
		return errInval
	}
	if r.offset > uint64(size) || uint64(r.length) > uint64(size)-r.offset {
		if r.typ == cmdRead {
			return errInval
		}
		return errNoSpc
	}
	return 0
}

// Server serves a Target over NBD under one export name.
type Server struct {
	t      *Target
	export string

	mu    sync.Mutex
	ls    map[net.Listener]struct{}
	conns map[net.Conn]struct{}
	done  bool
	wg    sync.WaitGroup
	// Log, if set, reports connections and protocol errors.
	Log *slog.Logger
}

// NewServer returns an NBD server for t named export.
func NewServer(t *Target, export string) *Server {
	return &Server{t: t, export: export, ls: map[net.Listener]struct{}{}, conns: map[net.Conn]struct{}{}}
}

func (s *Server) log() *slog.Logger {
	if s.Log == nil {
		return discard
	}
	return s.Log
}

var discard = slog.New(slog.DiscardHandler)

// Serve accepts connections on l until Close.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		l.Close()
		return net.ErrClosed
	}
	s.ls[l] = struct{}{}
	s.mu.Unlock()
	for {
		c, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			done := s.done
			delete(s.ls, l)
			s.mu.Unlock()
			if done {
				return nil
			}
			return err
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := s.ServeConn(c); err != nil {
				s.log().Warn("nbd connection ended", "peer", c.RemoteAddr().String(), "err", err)
			}
		}()
	}
}

// Close stops accepting, closes every connection and waits for them to
// end. The Target stays usable (Stage, Apply, Discard).
func (s *Server) Close() error {
	s.mu.Lock()
	s.done = true
	for l := range s.ls {
		l.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// ServeConn serves one NBD client connection until it disconnects. A
// connection that ends without NBD_CMD_DISC while epochs are being cut
// puts the Target out of sync: the client may have lost a write.
func (s *Server) ServeConn(c net.Conn) error {
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		c.Close()
		return net.ErrClosed
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	nc := &nbdConn{s: s, t: s.t, resets: s.t.Resets(), r: bufio.NewReaderSize(c, 256<<10), w: bufio.NewWriterSize(c, 64<<10)}
	ok, err := nc.handshake()
	if err != nil || !ok {
		return err
	}
	s.log().Debug("nbd export in transmission", "peer", c.RemoteAddr().String(), "export", s.export)
	clean, err := nc.transmit()
	if !clean {
		s.t.markOutOfSync(nc.resets, fmt.Sprintf("the mirror's NBD connection from %s ended without a disconnect request (%v)", c.RemoteAddr(), err))
	}
	return err
}

type nbdConn struct {
	s       *Server
	t       *Target
	resets  uint64 // the Target's reset count when the connection opened
	r       *bufio.Reader
	w       *bufio.Writer
	noZeros bool
	buf     []byte
}

func (c *nbdConn) optReply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], nbdRepMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	c.w.Write(h[:])
	c.w.Write(data)
	return c.w.Flush()
}

// handshake runs the fixed newstyle negotiation; ok reports that the
// client entered the transmission phase.
func (c *nbdConn) handshake() (ok bool, err error) {
	var h [18]byte
	binary.BigEndian.PutUint64(h[0:], nbdMagic)
	binary.BigEndian.PutUint64(h[8:], nbdOptMagic)
	binary.BigEndian.PutUint16(h[16:], flagFixedNewstyle|flagNoZeroes)
	c.w.Write(h[:])
	if err := c.w.Flush(); err != nil {
		return false, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.r, cf[:]); err != nil {
		return false, err
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&flagFixedNewstyle == 0 || flags&^uint32(flagFixedNewstyle|flagNoZeroes) != 0 {
		return false, fmt.Errorf("nbd: client flags %#x (fixed newstyle needed)", flags)
	}
	c.noZeros = flags&flagNoZeroes != 0
	for {
		var oh [16]byte
		if _, err := io.ReadFull(c.r, oh[:]); err != nil {
			return false, err
		}
		if binary.BigEndian.Uint64(oh[:]) != nbdOptMagic {
			return false, errors.New("nbd: bad option magic")
		}
		opt, n := binary.BigEndian.Uint32(oh[8:]), binary.BigEndian.Uint32(oh[12:])
		if n > maxOptionLen {
			return false, fmt.Errorf("nbd: option %d of %d bytes", opt, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return false, err
		}
		switch opt {
		case optExportName:
			if string(data) != c.s.export {
				return false, fmt.Errorf("nbd: unknown export %q", data)
			}
			var r [10 + 124]byte
			binary.BigEndian.PutUint64(r[0:], uint64(c.t.Size()))
			binary.BigEndian.PutUint16(r[8:], transmissionFlags)
			if c.noZeros {
				c.w.Write(r[:10])
			} else {
				c.w.Write(r[:])
			}
			return true, c.w.Flush()
		case optAbort:
			c.optReply(opt, repAck, nil)
			return false, nil
		case optList:
			if n != 0 {
				if err := c.optReply(opt, repErrInvalid, nil); err != nil {
					return false, err
				}
				continue
			}
			d := binary.BigEndian.AppendUint32(nil, uint32(len(c.s.export)))
			d = append(d, c.s.export...)
			if err := c.optReply(opt, repServer, d); err != nil {
				return false, err
			}
			if err := c.optReply(opt, repAck, nil); err != nil {
				return false, err
			}
		case optInfo, optGo:
			name, reqs, perr := parseInfoRequest(data)
			switch {
			case perr != nil:
				err = c.optReply(opt, repErrInvalid, []byte(perr.Error()))
			case name != c.s.export:
				err = c.optReply(opt, repErrUnknown, []byte("no such export"))
			default:
				e := binary.BigEndian.AppendUint16(nil, infoExport)
				e = binary.BigEndian.AppendUint64(e, uint64(c.t.Size()))
				e = binary.BigEndian.AppendUint16(e, transmissionFlags)
				if err = c.optReply(opt, repInfo, e); err != nil {
					return false, err
				}
				for _, r := range reqs {
					if r == infoBlockSize {
						b := binary.BigEndian.AppendUint16(nil, infoBlockSize)
						b = binary.BigEndian.AppendUint32(b, minBlock)
						b = binary.BigEndian.AppendUint32(b, preferredBlock)
						b = binary.BigEndian.AppendUint32(b, maxPayload)
						if err = c.optReply(opt, repInfo, b); err != nil {
							return false, err
						}
					}
				}
				if err = c.optReply(opt, repAck, nil); err == nil && opt == optGo {
					return true, nil
				}
			}
			if err != nil {
				return false, err
			}
		default:
			if err := c.optReply(opt, repErrUnsup, nil); err != nil {
				return false, err
			}
		}
	}
}

// parseInfoRequest parses the data of NBD_OPT_INFO and NBD_OPT_GO: u32
// name length, name, u16 number of information requests, u16 each.
func parseInfoRequest(d []byte) (name string, reqs []uint16, err error) {
	if len(d) < 6 {
		return "", nil, errors.New("option data too short")
	}
	n := binary.BigEndian.Uint32(d)
	if uint64(n) > uint64(len(d)-6) {
		return "", nil, errors.New("name longer than the option")
	}
	name = string(d[4 : 4+n])
	rest := d[4+n:]
	k := int(binary.BigEndian.Uint16(rest))
	if len(rest) != 2+2*k {
		return "", nil, fmt.Errorf("%d information requests in %d bytes", k, len(rest)-2)
	}
	for i := 0; i < k; i++ {
		reqs = append(reqs, binary.BigEndian.Uint16(rest[2+2*i:]))
	}
	return name, reqs, nil
}

func (c *nbdConn) reply(handle uint64, errno uint32, data []byte) error {
	var h [replyLen]byte
	binary.BigEndian.PutUint32(h[0:], nbdSimpleMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], handle)
	c.w.Write(h[:])
	if errno == 0 && data != nil {
		c.w.Write(data)
	}
	// Replies are batched while more requests are already buffered.
	if c.r.Buffered() == 0 {
		return c.w.Flush()
	}
	return nil
}

func errnoFor(err error) uint32 {
	var we *writeError
	if errors.As(err, &we) {
		if we.nospace {
			return errNoSpc
		}
		if errors.Is(err, ErrOutOfSync) {
			return errShutdown
		}
	}
	return errIO
}

// transmit serves requests in arrival order until NBD_CMD_DISC (clean) or
// an error. One at a time: a reply for a write is sent only after the
// write is in the Target, which is what makes the epoch cut exact.
func (c *nbdConn) transmit() (clean bool, err error) {
	var hb [requestLen]byte
	size := c.t.Size()
	for {
		if _, err := io.ReadFull(c.r, hb[:]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return false, err
		}
		req, err := parseRequest(hb[:])
		if err != nil {
			return false, err
		}
		if req.typ == cmdDisc {
			c.w.Flush()
			return true, nil
		}
		errno := req.check(size)
		if req.typ == cmdWrite {
			if req.length > maxPayload {
				// The payload cannot be skipped safely.
				c.reply(req.handle, errInval, nil)
				c.w.Flush()
				return false, fmt.Errorf("nbd: write of %d bytes", req.length)
			}
			if cap(c.buf) < int(req.length) {
				c.buf = make([]byte, req.length)
			}
			if _, err := io.ReadFull(c.r, c.buf[:req.length]); err != nil {
				return false, err
			}
		}
		if errno != 0 {
			if err := c.reply(req.handle, errno, nil); err != nil {
				return false, err
			}
			continue
		}
		off, n := int64(req.offset), int64(req.length)
		switch req.typ {
		case cmdRead:
			if cap(c.buf) < int(n) {
				c.buf = make([]byte, n)
			}
			p := c.buf[:n]
			var rerr error
			if err := c.t.ReadAt(p, off); err != nil {
				c.s.log().Warn("nbd read failed", "offset", off, "bytes", n, "err", err)
				rerr = c.reply(req.handle, errIO, nil)
			} else {
				c.t.countRead(len(p))
				rerr = c.reply(req.handle, 0, p)
			}
			if rerr != nil {
				return false, rerr
			}
			continue
		case cmdWrite:
			err = c.t.write(c.resets, off, n, c.buf[:n])
		case cmdWriteZeroes, cmdTrim:
			// A trimmed range of the guest's raw image reads as zeroes.
			err = c.t.write(c.resets, off, n, nil)
		case cmdFlush:
			err = c.t.Flush()
		}
		if err == nil && req.flags&cmdFlagFUA != 0 {
			err = c.t.Flush()
		}
		errno = 0
		if err != nil {
			c.s.log().Warn("nbd request failed", "request", cmdName(req.typ), "offset", off, "bytes", n, "err", err)
			errno = errnoFor(err)
		}
		if err := c.reply(req.handle, errno, nil); err != nil {
			return false, err
		}
	}
}

func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disconnect"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdWriteZeroes:
		return "write-zeroes"
	}
	return fmt.Sprintf("command %d", t)
}
