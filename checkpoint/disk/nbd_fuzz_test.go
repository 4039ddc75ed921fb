package disk

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"slices"
	"testing"
)

// optBytes is one client option of the NBD handshake.
func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, nbdOptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// infoData is the data of NBD_OPT_INFO/NBD_OPT_GO.
func infoData(name string, reqs ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = binary.BigEndian.AppendUint16(b, r)
	}
	return b
}

// optReplyHeader is one option reply the server sent.
type optReplyHeader struct {
	opt, typ uint32
	data     []byte
}

// splitHandshakeOutput parses what the server wrote: the greeting, option
// replies, and, after NBD_OPT_EXPORT_NAME, the export information.
func splitHandshakeOutput(t *testing.T, out []byte) (replies []optReplyHeader, exportInfo []byte) {
	t.Helper()
	if len(out) < 18 || binary.BigEndian.Uint64(out) != nbdMagic || binary.BigEndian.Uint64(out[8:]) != nbdOptMagic ||
		binary.BigEndian.Uint16(out[16:]) != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("bad greeting %x", out[:min(18, len(out))])
	}
	out = out[18:]
	for len(out) >= 20 && binary.BigEndian.Uint64(out) == nbdRepMagic {
		n := int(binary.BigEndian.Uint32(out[16:]))
		if len(out) < 20+n {
			t.Fatalf("option reply of %d bytes truncated to %d", n, len(out)-20)
		}
		replies = append(replies, optReplyHeader{binary.BigEndian.Uint32(out[8:]), binary.BigEndian.Uint32(out[12:]), out[20 : 20+n]})
		out = out[20+n:]
	}
	return replies, out
}

// FuzzNBDHandshake: whatever a client sends in the option phase, the
// server writes only well-formed replies, describes the export truthfully,
// and enters transmission only after a successful NBD_OPT_GO or
// NBD_OPT_EXPORT_NAME for its own export.
func FuzzNBDHandshake(f *testing.F) {
	flags := binary.BigEndian.AppendUint32(nil, flagFixedNewstyle|flagNoZeroes)
	f.Add(slices.Concat(flags, optBytes(optGo, infoData("x", infoBlockSize))))
	f.Add(slices.Concat(flags, optBytes(optList, nil), optBytes(optInfo, infoData("x")), optBytes(optGo, infoData("x"))))
	f.Add(slices.Concat(binary.BigEndian.AppendUint32(nil, flagFixedNewstyle), optBytes(optExportName, []byte("x"))))
	f.Add(slices.Concat(flags, optBytes(optExportName, []byte("y"))))
	f.Add(slices.Concat(flags, optBytes(optGo, infoData("nope")), optBytes(optList, []byte{1}), optBytes(99, nil), optBytes(optAbort, nil)))
	f.Add(slices.Concat(flags, optBytes(optGo, []byte{0, 0, 0, 9, 'x'})))
	f.Add(binary.BigEndian.AppendUint32(nil, 4))
	const size = 1 << 20
	f.Fuzz(func(t *testing.T, in []byte) {
		tg, _ := newMemTarget(size, Options{})
		var out bytes.Buffer
		c := &nbdConn{s: NewServer(tg, "x"), t: tg, r: bufio.NewReader(bytes.NewReader(in)), w: bufio.NewWriter(&out)}
		ok, err := c.handshake()
		c.w.Flush()
		if ok && err != nil {
			t.Fatalf("entered transmission with error %v", err)
		}
		replies, info := splitHandshakeOutput(t, out.Bytes())
		for _, r := range replies {
			if r.typ == repInfo && binary.BigEndian.Uint16(r.data) == infoExport &&
				(len(r.data) != 12 || binary.BigEndian.Uint64(r.data[2:]) != size || binary.BigEndian.Uint16(r.data[10:]) != transmissionFlags) {
				t.Fatalf("export info %x for a %d-byte export", r.data, size)
			}
		}
		if len(info) > 0 {
			noZeros := binary.BigEndian.Uint32(in)&flagNoZeroes != 0
			if !ok || (noZeros && len(info) != 10) || (!noZeros && len(info) != 134) ||
				binary.BigEndian.Uint64(info) != size || binary.BigEndian.Uint16(info[8:]) != transmissionFlags {
				t.Fatalf("export-name answer %x (ok %v, no zeroes %v)", info, ok, noZeros)
			}
			return
		}
		if ok && (len(replies) == 0 || replies[len(replies)-1].opt != optGo || replies[len(replies)-1].typ != repAck) {
			t.Fatalf("entered transmission without acknowledging NBD_OPT_GO: replies %+v", replies)
		}
	})
}

// FuzzNBDRequestRoundTrip: parseRequest accepts exactly the 28-byte
// headers with the request magic, and the fields it returns encode back
// to the same bytes.
func FuzzNBDRequestRoundTrip(f *testing.F) {
	f.Add(reqBytes(0, cmdRead, 1, 0, 512))
	f.Add(reqBytes(cmdFlagFUA|cmdFlagNoHole, cmdWriteZeroes, ^uint64(0), ^uint64(0), ^uint32(0)))
	f.Add(reqBytes(0, cmdDisc, 0, 0, 0)[:27])
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseRequest(b)
		valid := len(b) == requestLen && binary.BigEndian.Uint32(b) == nbdReqMagic
		if (err == nil) != valid {
			t.Fatalf("%x: err %v", b, err)
		}
		if err == nil && !bytes.Equal(reqBytes(r.flags, r.typ, r.handle, r.offset, r.length), b) {
			t.Fatalf("%x parses to %+v, which encodes differently", b, r)
		}
	})
}
