package disk

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

// Writer writes to an NBD export (the standby's replica image through its
// agent's server): the agent's own copies of the blocks an incremental
// resync finds different. Fixed newstyle handshake, NBD_OPT_GO, simple
// replies; one request in flight.
type Writer struct {
	conn   net.Conn
	br     *bufio.Reader
	size   int64
	handle uint64
}

// NewWriter negotiates export on conn (a connection the standby serves
// with its NBD server).
func NewWriter(conn net.Conn, export string) (*Writer, error) {
	w := &Writer{conn: conn, br: bufio.NewReader(conn)}
	if err := w.handshake(export); err != nil {
		return nil, fmt.Errorf("NBD handshake for export %q: %w", export, err)
	}
	return w, nil
}

func (w *Writer) handshake(export string) error {
	var hello [18]byte
	if _, err := io.ReadFull(w.br, hello[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(hello[0:]) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != nbdOptMagic {
		return errors.New("not an NBD newstyle server")
	}
	if binary.BigEndian.Uint16(hello[16:])&flagFixedNewstyle == 0 {
		return errors.New("server without fixed newstyle")
	}
	if err := binary.Write(w.conn, binary.BigEndian, uint32(flagFixedNewstyle|flagNoZeroes)); err != nil {
		return err
	}
	// NBD_OPT_GO: export name, no information requests.
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 0)
	opt := binary.BigEndian.AppendUint64(nil, nbdOptMagic)
	opt = binary.BigEndian.AppendUint32(opt, optGo)
	opt = binary.BigEndian.AppendUint32(opt, uint32(len(data)))
	if _, err := w.conn.Write(append(opt, data...)); err != nil {
		return err
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(w.br, h[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(h[0:]) != nbdRepMagic || binary.BigEndian.Uint32(h[8:]) != optGo {
			return errors.New("bad option reply")
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if n > maxOptionLen {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(w.br, body); err != nil {
			return err
		}
		switch {
		case typ == repAck:
			if w.size == 0 {
				return errors.New("no export size in the reply")
			}
			return nil
		case typ == repInfo && len(body) >= 12 && binary.BigEndian.Uint16(body) == infoExport:
			w.size = int64(binary.BigEndian.Uint64(body[2:]))
		case typ&(1<<31) != 0:
			return fmt.Errorf("export refused: %s", body)
		}
	}
}

// Size is the export's size.
func (w *Writer) Size() int64 { return w.size }

func (w *Writer) send(typ uint16, off int64, data []byte, n uint32) error {
	w.handle++
	req := make([]byte, requestLen, requestLen+len(data))
	binary.BigEndian.PutUint32(req[0:], nbdReqMagic)
	binary.BigEndian.PutUint16(req[6:], typ)
	binary.BigEndian.PutUint64(req[8:], w.handle)
	binary.BigEndian.PutUint64(req[16:], uint64(off))
	binary.BigEndian.PutUint32(req[24:], n)
	_, err := w.conn.Write(append(req, data...))
	return err
}

func (w *Writer) request(typ uint16, off int64, data []byte, n uint32) error {
	if err := w.send(typ, off, data, n); err != nil {
		return err
	}
	var rep [replyLen]byte
	if _, err := io.ReadFull(w.br, rep[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint32(rep[0:]) != nbdSimpleMagic || binary.BigEndian.Uint64(rep[8:]) != w.handle {
		return errors.New("bad NBD reply")
	}
	if errno := binary.BigEndian.Uint32(rep[4:]); errno != 0 {
		return fmt.Errorf("NBD %s at %d: error %d", cmdName(typ), off, errno)
	}
	return nil
}

// WriteAt writes data at off, in requests of at most the server's payload.
func (w *Writer) WriteAt(data []byte, off int64) (int, error) {
	done := 0
	for done < len(data) {
		n := min(len(data)-done, maxPayload)
		if err := w.request(cmdWrite, off+int64(done), data[done:done+n], uint32(n)); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// Close flushes what was written and ends the session.
func (w *Writer) Close() error {
	err := w.request(cmdFlush, 0, nil, 0)
	_ = w.send(cmdDisc, 0, nil, 0) // no reply comes: the server closes
	return errors.Join(err, w.conn.Close())
}

// CopyRanges copies ranges of src to w; it returns the bytes copied.
func CopyRanges(w io.WriterAt, src io.ReaderAt, ranges []Range) (int64, error) {
	var total int64
	buf := make([]byte, 4<<20)
	for _, r := range ranges {
		for off := r.Off; off < r.Off+r.Len; {
			b := buf[:min(int64(len(buf)), r.Off+r.Len-off)]
			if _, err := src.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
				return total, err
			}
			if _, err := w.WriteAt(b, off); err != nil {
				return total, err
			}
			total += int64(len(b))
			off += int64(len(b))
		}
	}
	return total, nil
}
