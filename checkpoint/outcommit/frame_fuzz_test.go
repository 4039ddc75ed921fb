package outcommit

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// refRecords splits a whole capture stream the obvious way, with no
// state across reads: the model the incremental parser must match.
func refRecords(stream []byte, vnetHdr bool) (recs []record, corrupt bool) {
	h := 4
	if vnetHdr {
		h = 8
	}
	for off := 0; len(stream)-off >= h; {
		flen := int(binary.BigEndian.Uint32(stream[off:]))
		vnet := 0
		if vnetHdr {
			vnet = int(binary.BigEndian.Uint32(stream[off+4:]))
		}
		if flen > MaxFrameLen || (vnet > flen && flen > 0) {
			return recs, true
		}
		if len(stream)-off < h+flen {
			break
		}
		if flen > 0 {
			recs = append(recs, record{raw: stream[off : off+h+flen], hdr: h, vnet: vnet, start: int64(off)})
		}
		off += h + flen
	}
	return recs, false
}

// feedChunks feeds stream to a new parser chunk bytes at a time.
func feedChunks(stream []byte, vnetHdr bool, chunk int) (*parser, []record, error) {
	p := &parser{vnetHdr: vnetHdr}
	var recs []record
	for len(stream) > 0 {
		n := min(chunk, len(stream))
		if err := p.feed(stream[:n], func(r record) { recs = append(recs, r) }); err != nil {
			return p, recs, err
		}
		stream = stream[n:]
	}
	return p, recs, nil
}

// FuzzParser: however the chardev stream is split into reads, the parser
// emits the records of the reference split, each the stream's own bytes
// and re-encodable by appendRecord, and reports corruption exactly where
// the reference finds it.
func FuzzParser(f *testing.F) {
	for _, vnet := range []bool{false, true} {
		var s []byte
		for i := range 4 {
			s = appendRecord(s, testFrame(i, 14+i*100), vnet, 12)
		}
		f.Add(s, vnet, uint16(1))
		f.Add(s, vnet, uint16(7))
		f.Add(s[:len(s)-5], vnet, uint16(64))
		f.Add(appendRecord(appendRecord(nil, nil, vnet, 0), []byte("abc"), vnet, 0), vnet, uint16(3))
	}
	f.Add(binary.BigEndian.AppendUint32(nil, MaxFrameLen+1), false, uint16(2))
	f.Add(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 10), 11), true, uint16(5))
	f.Fuzz(func(t *testing.T, stream []byte, vnet bool, chunk uint16) {
		want, corrupt := refRecords(stream, vnet)
		p, got, err := feedChunks(stream, vnet, 1+int(chunk)%(len(stream)+1))
		if (err != nil) != corrupt {
			t.Fatalf("parser error %v, reference finds corruption: %v", err, corrupt)
		}
		if len(got) != len(want) {
			t.Fatalf("%d records, reference %d", len(got), len(want))
		}
		for i, r := range got {
			w := want[i]
			if !bytes.Equal(r.raw, w.raw) || r.hdr != w.hdr || r.vnet != w.vnet || r.start != w.start {
				t.Fatalf("record %d: start %d hdr %d vnet %d len %d; reference start %d hdr %d vnet %d len %d",
					i, r.start, r.hdr, r.vnet, len(r.raw), w.start, w.hdr, w.vnet, len(w.raw))
			}
			if len(r.frame()) > MaxFrameLen || r.vnet > len(r.frame()) || len(r.ethernet()) != len(r.frame())-r.vnet {
				t.Fatalf("record %d: frame of %d bytes with a %d-byte vnet header", i, len(r.frame()), r.vnet)
			}
			if re := appendRecord(nil, r.frame(), vnet, r.vnet); !bytes.Equal(re, r.raw) {
				t.Fatalf("record %d does not re-encode to its bytes", i)
			}
		}
		if err == nil && (p.off != int64(len(stream)) || len(p.partial) > len(stream)) {
			t.Fatalf("parser at offset %d with %d partial bytes after %d fed", p.off, len(p.partial), len(stream))
		}
	})
}
