package txlog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// LSN is a log sequence number. LSNs start at 1 and are contiguous; 0 means
// "no record".
type LSN uint64

// RecordType says what a record means to recovery.
type RecordType uint8

// Record types. Zero is deliberately invalid so that preallocated (zeroed)
// space never decodes as a record.
const (
	TypePlain      RecordType = 1 // standalone record, outside any transaction
	TypeBegin      RecordType = 2 // starts transaction TxID
	TypeData       RecordType = 3 // payload belonging to transaction TxID
	TypePrepare    RecordType = 4 // TxID is prepared: it may still commit
	TypeCommit     RecordType = 5 // TxID committed: redo its DATA records
	TypeAbort      RecordType = 6 // TxID aborted
	TypeEnd        RecordType = 7 // TxID fully applied; its records are no longer needed
	TypeCheckpoint RecordType = 8 // written by Log.Checkpoint only
)

var typeNames = [...]string{
	TypePlain:      "PLAIN",
	TypeBegin:      "BEGIN",
	TypeData:       "DATA",
	TypePrepare:    "PREPARE",
	TypeCommit:     "COMMIT",
	TypeAbort:      "ABORT",
	TypeEnd:        "END",
	TypeCheckpoint: "CHECKPOINT",
}

func (t RecordType) String() string {
	if t.valid() {
		return typeNames[t]
	}
	return fmt.Sprintf("TYPE(%d)", uint8(t))
}

func (t RecordType) valid() bool { return t >= TypePlain && t <= TypeCheckpoint }

// Record is one log entry. LSN is assigned by the log on append and ignored
// on input.
type Record struct {
	LSN     LSN
	Type    RecordType
	Epoch   uint64 // fencing epoch of the writer
	TxID    uint64 // transaction id; may be 0 for TypePlain
	Payload []byte
}

// Record framing, little endian:
//
//	off size field
//	  0    4 crc32c   Castagnoli over bytes [4, 44+len)
//	  4    4 len      payload length
//	  8    1 type
//	  9    3 reserved must be zero
//	 12    8 lsn
//	 20    8 epoch
//	 28    8 txid
//	 36    8 synced   highest LSN known durable when this record was written
//	 44  len payload
//
// The synced field lets recovery tell a torn, never-acknowledged write from
// damage to a record that had already been made durable.
const recHeaderSize = 44

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Decode failures. errShortRecord and errZeroHeader are what the clean or
// torn end of a segment looks like; the others mean the bytes are not a
// record this package wrote.
var (
	errShortRecord = errors.New("record extends past the end of the segment")
	errZeroHeader  = errors.New("zeroed record header")
	errBadHeader   = errors.New("malformed record header")
	errBadCRC      = errors.New("record checksum mismatch")
)

// header is a decoded record header.
type header struct {
	crc    uint32
	length uint32
	typ    RecordType
	lsn    LSN
	epoch  uint64
	txid   uint64
	synced LSN
}

func appendRecord(dst []byte, r *Record, lsn, synced LSN) []byte {
	start := len(dst)
	var h [recHeaderSize]byte
	binary.LittleEndian.PutUint32(h[4:], uint32(len(r.Payload)))
	h[8] = byte(r.Type)
	binary.LittleEndian.PutUint64(h[12:], uint64(lsn))
	binary.LittleEndian.PutUint64(h[20:], r.Epoch)
	binary.LittleEndian.PutUint64(h[28:], r.TxID)
	binary.LittleEndian.PutUint64(h[36:], uint64(synced))
	dst = append(dst, h[:]...)
	dst = append(dst, r.Payload...)
	crc := crc32.Checksum(dst[start+4:], castagnoli)
	binary.LittleEndian.PutUint32(dst[start:], crc)
	return dst
}

// parseHeader checks the fixed part of a record. maxLen bounds the payload
// length so a damaged length field cannot make us read or allocate past the
// segment.
func parseHeader(b []byte, maxLen int) (header, error) {
	if len(b) < recHeaderSize {
		return header{}, errShortRecord
	}
	h := header{
		crc:    binary.LittleEndian.Uint32(b[0:]),
		length: binary.LittleEndian.Uint32(b[4:]),
		typ:    RecordType(b[8]),
		lsn:    LSN(binary.LittleEndian.Uint64(b[12:])),
		epoch:  binary.LittleEndian.Uint64(b[20:]),
		txid:   binary.LittleEndian.Uint64(b[28:]),
		synced: LSN(binary.LittleEndian.Uint64(b[36:])),
	}
	if h.typ == 0 && allZero(b[:recHeaderSize]) {
		return h, errZeroHeader
	}
	if !h.typ.valid() || b[9]|b[10]|b[11] != 0 || h.lsn == 0 || h.synced >= h.lsn {
		return h, errBadHeader
	}
	if int64(h.length) > int64(maxLen) {
		return h, errShortRecord
	}
	return h, nil
}

func (h *header) checksum(hdr, payload []byte) bool {
	c := crc32.Update(0, castagnoli, hdr[4:recHeaderSize])
	c = crc32.Update(c, castagnoli, payload)
	return c == h.crc
}

func (h *header) record(payload []byte) Record {
	return Record{LSN: h.lsn, Type: h.typ, Epoch: h.epoch, TxID: h.txid, Payload: payload}
}

// decodeRecord decodes the record at the start of b. It returns the record,
// the number of bytes it occupies and its synced watermark. The payload
// aliases b. A record is returned only if its checksum is valid.
func decodeRecord(b []byte) (Record, int, LSN, error) {
	h, err := parseHeader(b, len(b)-recHeaderSize)
	if err != nil {
		return Record{}, 0, 0, err
	}
	n := recHeaderSize + int(h.length)
	payload := b[recHeaderSize:n:n]
	if !h.checksum(b[:recHeaderSize], payload) {
		return Record{}, 0, 0, errBadCRC
	}
	return h.record(payload), n, h.synced, nil
}

// zeroBlock is compared against with bytes.Equal, which is vectorised;
// segments are mostly preallocated zeros and are checked on every open.
var zeroBlock [64 << 10]byte

func allZero(b []byte) bool { return lastNonZero(b) < 0 }

// lastNonZero returns the index of the last non-zero byte of b, or -1.
func lastNonZero(b []byte) int {
	i := len(b)
	for i > 0 {
		n := min(i, len(zeroBlock))
		if !bytes.Equal(b[i-n:i], zeroBlock[:n]) {
			break
		}
		i -= n
	}
	for i > 0 && b[i-1] == 0 {
		i--
	}
	return i - 1
}
