package txlog

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"syscall"
	"testing"
)

func TestRecordRoundTrip(t *testing.T) {
	cases := []struct {
		name   string
		rec    Record
		lsn    LSN
		synced LSN
	}{
		{"empty plain", Record{Type: TypePlain}, 1, 0},
		{"begin", Record{Type: TypeBegin, Epoch: 3, TxID: 42}, 7, 6},
		{"data binary", Record{Type: TypeData, Epoch: 1<<63 + 5, TxID: ^uint64(0), Payload: []byte{0, 1, 2, 0xff, 0}}, 1 << 40, 1<<40 - 1},
		{"commit", Record{Type: TypeCommit, Epoch: 9, TxID: 1}, 100, 3},
		{"checkpoint", Record{Type: TypeCheckpoint, Payload: encodeCheckpoint([]LiveTxn{{ID: 1, State: TxnActive, FirstLSN: 2}}, []byte("snap"))}, 10, 9},
		{"large", Record{Type: TypeData, TxID: 2, Payload: bytes.Repeat([]byte("x"), 70000)}, 5, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := appendRecord([]byte("prefix"), &c.rec, c.lsn, c.synced)[6:]
			if len(b) != recHeaderSize+len(c.rec.Payload) {
				t.Fatalf("encoded %d bytes, want %d", len(b), recHeaderSize+len(c.rec.Payload))
			}
			// Trailing bytes (the next record or zeros) must not matter.
			got, n, synced, err := decodeRecord(append(b, 0, 0, 0, 1))
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			want := c.rec
			want.LSN = c.lsn
			if n != len(b) || synced != c.synced || !sameRecord(got, want) {
				t.Fatalf("decode = %+v n=%d synced=%d, want %+v n=%d synced=%d", got, n, synced, want, len(b), c.synced)
			}
		})
	}
}

func TestRecordDecodeRejects(t *testing.T) {
	good := appendRecord(nil, &Record{Type: TypeData, Epoch: 2, TxID: 5, Payload: []byte("payload")}, 9, 8)
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	// resum recomputes the CRC so that only the header check can reject.
	resum := func(b []byte) []byte {
		binary.LittleEndian.PutUint32(b, crc32.Checksum(b[4:], castagnoli))
		return b
	}
	cases := []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, errShortRecord},
		{"short header", good[:recHeaderSize-1], errShortRecord},
		{"short payload", good[:len(good)-1], errShortRecord},
		{"zero header", make([]byte, 64), errZeroHeader},
		{"payload bit flip", mut(func(b []byte) []byte { b[len(b)-1] ^= 1; return b }), errBadCRC},
		{"crc bit flip", mut(func(b []byte) []byte { b[0] ^= 0x80; return b }), errBadCRC},
		{"epoch bit flip", mut(func(b []byte) []byte { b[20] ^= 1; return b }), errBadCRC},
		{"type zero", mut(func(b []byte) []byte { b[8] = 0; return resum(b) }), errBadHeader},
		{"type unknown", mut(func(b []byte) []byte { b[8] = 99; return resum(b) }), errBadHeader},
		{"reserved set", mut(func(b []byte) []byte { b[10] = 1; return resum(b) }), errBadHeader},
		{"lsn zero", mut(func(b []byte) []byte { binary.LittleEndian.PutUint64(b[12:], 0); return resum(b) }), errBadHeader},
		{"synced not below lsn", mut(func(b []byte) []byte { binary.LittleEndian.PutUint64(b[36:], 9); return resum(b) }), errBadHeader},
		{"length past end", mut(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[4:], 1<<31); return b }), errShortRecord},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r, n, _, err := decodeRecord(c.b)
			if !errors.Is(err, c.want) {
				t.Fatalf("decode error = %v (record %+v, n %d), want %v", err, r, n, c.want)
			}
		})
	}
}

func TestSegHeaderRoundTrip(t *testing.T) {
	h := segHeader{firstLSN: 12345, epoch: 7}
	b := h.encode()
	got, err := decodeSegHeader(b)
	if err != nil || got != h {
		t.Fatalf("decode = %+v, %v; want %+v", got, err, h)
	}
	for i := range b {
		c := append([]byte(nil), b...)
		c[i] ^= 0x10
		if _, err := decodeSegHeader(c); err == nil {
			t.Fatalf("header with byte %d flipped decoded without error", i)
		}
	}
	if name := segName(255); name != "00000000000000ff.seg" {
		t.Fatalf("segName(255) = %q", name)
	}
	if lsn, ok := parseSegName("00000000000000ff.seg"); !ok || lsn != 255 {
		t.Fatalf("parseSegName = %d, %v", lsn, ok)
	}
	for _, bad := range []string{"ff.seg", "00000000000000ff.seg.tmp", "000000000000000g.seg", "0000000000000000.seg"} {
		if _, ok := parseSegName(bad); ok {
			t.Fatalf("parseSegName(%q) accepted", bad)
		}
	}
}

func TestCheckpointPayload(t *testing.T) {
	live := []LiveTxn{{ID: 1, State: TxnActive, FirstLSN: 3}, {ID: 9, State: TxnInDoubt, FirstLSN: 4}, {ID: 2, State: TxnCommitted, FirstLSN: 5}}
	rec := Record{LSN: 10, Type: TypeCheckpoint, Epoch: 4, Payload: encodeCheckpoint(live, []byte("state"))}
	c, err := DecodeCheckpoint(rec)
	if err != nil {
		t.Fatal(err)
	}
	if c.LSN != 10 || c.Epoch != 4 || string(c.Data) != "state" || len(c.Live) != 3 || c.Live[1] != live[1] {
		t.Fatalf("decoded %+v", c)
	}
	bad := rec
	bad.Payload = bad.Payload[:20]
	if _, err := DecodeCheckpoint(bad); !errors.Is(err, ErrInvalidRecord) {
		t.Fatalf("truncated checkpoint: err = %v", err)
	}
	if _, err := DecodeCheckpoint(Record{Type: TypeData}); !errors.Is(err, ErrInvalidRecord) {
		t.Fatalf("non-checkpoint: err = %v", err)
	}
}

// FuzzDecodeRecord: the decoder never panics, and whatever it returns
// re-encodes to exactly the bytes it consumed, so it carries a valid CRC.
func FuzzDecodeRecord(f *testing.F) {
	for i, r := range []Record{
		{Type: TypePlain},
		{Type: TypeBegin, Epoch: 1, TxID: 1},
		{Type: TypeData, Epoch: 1, TxID: 1, Payload: []byte("hello, world")},
		{Type: TypeCheckpoint, Epoch: 2, Payload: encodeCheckpoint([]LiveTxn{{ID: 1, State: TxnActive, FirstLSN: 1}}, nil)},
	} {
		b := appendRecord(nil, &r, LSN(i+1), LSN(i))
		f.Add(b)
		f.Add(b[:len(b)-1])
		f.Add(append(b, make([]byte, 16)...))
	}
	f.Add(make([]byte, recHeaderSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, n, synced, err := decodeRecord(b)
		if err != nil {
			return
		}
		if n < recHeaderSize || n > len(b) {
			t.Fatalf("decoded length %d out of range for %d input bytes", n, len(b))
		}
		if crc32.Checksum(b[4:n], castagnoli) != binary.LittleEndian.Uint32(b) {
			t.Fatalf("returned record %+v without a valid CRC", r)
		}
		again := appendRecord(nil, &r, r.LSN, synced)
		if !bytes.Equal(again, b[:n]) {
			t.Fatalf("re-encoding differs:\n got %x\nwant %x", again, b[:n])
		}
	})
}

func TestReadErrorsAreNotTornTails(t *testing.T) {
	for _, err := range []error{io.EOF, io.ErrUnexpectedEOF} {
		if got := shortOr(err); got != errShortRecord {
			t.Fatalf("shortOr(%v) = %v, want errShortRecord", err, got)
		}
	}
	var re *readError
	if got := shortOr(syscall.EIO); !errors.As(got, &re) || !errors.Is(got, syscall.EIO) {
		t.Fatalf("shortOr(EIO) = %v, want a readError wrapping EIO", got)
	}
}
