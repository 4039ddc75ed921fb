package checkpoint

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// ProtocolVersion is the version of the agent-to-agent replication protocol.
// A peer speaking another version is refused at the handshake.
const ProtocolVersion = 3

// MaxFramePayload bounds a frame so a corrupt length cannot make a reader
// allocate without limit.
const MaxFramePayload = 16 << 20

const frameHeaderLen = 28

var frameMagic = [4]byte{'R', 'M', 'R', 'A'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// FrameType says what a frame carries.
type FrameType uint8

const (
	FrameHello      FrameType = 1  // primary -> standby: JSON Hello
	FrameWelcome    FrameType = 2  // standby -> primary: JSON Welcome
	FrameError      FrameType = 3  // either way: JSON ErrorMsg, then the sender closes
	FrameEpochBegin FrameType = 4  // primary -> standby: JSON EpochBegin
	FramePages      FrameType = 5  // primary -> standby: encoded page batch
	FrameDevState   FrameType = 6  // primary -> standby: a chunk of device state
	FrameEpochEnd   FrameType = 7  // primary -> standby: EpochEnd trailer
	FrameAck        FrameType = 8  // standby -> primary: epoch committed and applied
	FramePing       FrameType = 9  // either way: keeps the link observable while idle
	FrameUnenroll   FrameType = 10 // primary -> standby: drop the replica
	// A connection opened with FrameDiskNBD (JSON DiskHello) carries a
	// guest disk's mirror writes (NBD) after the welcome; one opened with
	// FrameDiskControl carries its epoch cuts.
	FrameDiskNBD     FrameType = 11
	FrameDiskControl FrameType = 12
	// FrameDevStateLZ4 is FrameDevState compressed (see EncodeDevState).
	FrameDevStateLZ4 FrameType = 13
	// FramePageHashes: standby -> primary after a welcome that announced
	// hashes: be64 page hashes, in page order.
	FramePageHashes FrameType = 14
	// FrameRestarting opens a connection with JSON Restarting: the
	// primary's agent stops on purpose and comes back within a grace.
	FrameRestarting FrameType = 15
	// FrameMove opens a connection with JSON Move: a planned role move the
	// peer carries out before it answers (switchover, failback).
	FrameMove FrameType = 16
)

func (t FrameType) String() string {
	switch t {
	case FrameHello:
		return "hello"
	case FrameWelcome:
		return "welcome"
	case FrameError:
		return "error"
	case FrameEpochBegin:
		return "epoch-begin"
	case FramePages:
		return "pages"
	case FrameDevState:
		return "devstate"
	case FrameEpochEnd:
		return "epoch-end"
	case FrameAck:
		return "ack"
	case FramePing:
		return "ping"
	case FrameUnenroll:
		return "unenroll"
	case FrameDiskNBD:
		return "disk-nbd"
	case FrameDiskControl:
		return "disk-control"
	case FrameDevStateLZ4:
		return "devstate-lz4"
	case FramePageHashes:
		return "page-hashes"
	case FrameRestarting:
		return "restarting"
	case FrameMove:
		return "move"
	}
	return fmt.Sprintf("frame-type-%d", uint8(t))
}

// Frame is one unit on the wire. Every frame carries the sender's fencing
// epoch, so a receiver can refuse a deposed primary.
type Frame struct {
	Type    FrameType
	Fence   uint64
	Epoch   uint64
	Payload []byte
}

var (
	ErrBadMagic   = errors.New("not a remora replication stream (bad frame magic): is the peer address a remora agent's replication port?")
	ErrFrameCRC   = errors.New("frame checksum mismatch: the stream is corrupt")
	ErrFrameLarge = errors.New("frame payload larger than the protocol allows: the stream is corrupt")
	// ErrFrameReserved: reserved header bits set; a future version would bump the version instead.
	ErrFrameReserved = errors.New("frame has reserved header bits set: the stream is corrupt")
)

// VersionError reports a peer that speaks another protocol version.
type VersionError struct{ Got uint8 }

func (e *VersionError) Error() string {
	return fmt.Sprintf("peer speaks replication protocol v%d, this agent speaks v%d: run the same remora release on both hosts", e.Got, ProtocolVersion)
}

// AppendFrame encodes f onto buf and returns the extended slice.
func AppendFrame(buf []byte, f Frame) []byte {
	start := len(buf)
	buf = append(buf, frameMagic[:]...)
	buf = append(buf, ProtocolVersion, byte(f.Type), 0, 0)
	buf = binary.BigEndian.AppendUint64(buf, f.Fence)
	buf = binary.BigEndian.AppendUint64(buf, f.Epoch)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(f.Payload)))
	buf = append(buf, f.Payload...)
	sum := crc32.Checksum(buf[start:], castagnoli)
	return binary.BigEndian.AppendUint32(buf, sum)
}

// WriteFrame writes one frame to w in a single Write.
func WriteFrame(w io.Writer, f Frame) error {
	if len(f.Payload) > MaxFramePayload {
		return fmt.Errorf("frame %s: payload %d bytes exceeds %d", f.Type, len(f.Payload), MaxFramePayload)
	}
	_, err := w.Write(AppendFrame(make([]byte, 0, frameHeaderLen+len(f.Payload)+4), f))
	return err
}

// ReadFrame reads and verifies one frame. The payload is freshly allocated.
func ReadFrame(r io.Reader) (Frame, error) { return ReadFrameMax(r, MaxFramePayload) }

// ReadFrameMax is ReadFrame refusing, before it allocates, a payload
// longer than max.
func ReadFrameMax(r io.Reader, max int) (Frame, error) {
	var hdr [frameHeaderLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return Frame{}, err
	}
	f, n, err := parseHeader(hdr[:])
	if err != nil {
		return Frame{}, err
	}
	if n > max {
		return Frame{}, fmt.Errorf("%w: %s frame of %d bytes where at most %d are expected", ErrFrameLarge, f.Type, n, max)
	}
	body := make([]byte, n+4)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return Frame{}, err
	}
	sum := crc32.Update(crc32.Checksum(hdr[:], castagnoli), castagnoli, body[:n])
	if sum != binary.BigEndian.Uint32(body[n:]) {
		return Frame{}, ErrFrameCRC
	}
	if hdr[6] != 0 || hdr[7] != 0 {
		return Frame{}, ErrFrameReserved
	}
	f.Payload = body[:n:n]
	return f, nil
}

// DecodeFrame decodes one frame from the start of b and returns the number
// of bytes it used.
func DecodeFrame(b []byte) (Frame, int, error) {
	if len(b) < frameHeaderLen {
		return Frame{}, 0, io.ErrUnexpectedEOF
	}
	f, n, err := parseHeader(b[:frameHeaderLen])
	if err != nil {
		return Frame{}, 0, err
	}
	total := frameHeaderLen + n + 4
	if len(b) < total {
		return Frame{}, 0, io.ErrUnexpectedEOF
	}
	if crc32.Checksum(b[:total-4], castagnoli) != binary.BigEndian.Uint32(b[total-4:total]) {
		return Frame{}, 0, ErrFrameCRC
	}
	if b[6] != 0 || b[7] != 0 {
		return Frame{}, 0, ErrFrameReserved
	}
	f.Payload = b[frameHeaderLen : frameHeaderLen+n : frameHeaderLen+n]
	return f, total, nil
}

func parseHeader(hdr []byte) (Frame, int, error) {
	if [4]byte(hdr[0:4]) != frameMagic {
		return Frame{}, 0, ErrBadMagic
	}
	if hdr[4] != ProtocolVersion {
		return Frame{}, 0, &VersionError{Got: hdr[4]}
	}
	n := binary.BigEndian.Uint32(hdr[24:28])
	if n > MaxFramePayload {
		return Frame{}, 0, ErrFrameLarge
	}
	return Frame{
		Type:  FrameType(hdr[5]),
		Fence: binary.BigEndian.Uint64(hdr[8:16]),
		Epoch: binary.BigEndian.Uint64(hdr[16:24]),
	}, int(n), nil
}
