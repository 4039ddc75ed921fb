package outcommit

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"strings"
	"testing"
)

func testFrame(i, n int) []byte {
	b := make([]byte, n)
	for j := range b {
		b[j] = byte(i + j)
	}
	if n >= 4 {
		binary.BigEndian.PutUint32(b, uint32(i))
	}
	return b
}

func TestParserSplitsAnywhere(t *testing.T) {
	for _, vnet := range []bool{false, true} {
		var stream []byte
		var want [][]byte
		var wantStart []int64
		for i := range 50 {
			f := testFrame(i, 12+i*37%1600)
			wantStart = append(wantStart, int64(len(stream)))
			stream = appendRecord(stream, f, vnet, 12)
			want = append(want, f)
		}
		rng := rand.New(rand.NewPCG(1, 2))
		for trial := range 200 {
			p := parser{vnetHdr: vnet}
			var got []record
			rest := stream
			for len(rest) > 0 {
				n := 1 + rng.IntN(min(len(rest), 1+trial*13))
				if err := p.feed(rest[:n], func(r record) { got = append(got, r) }); err != nil {
					t.Fatal(err)
				}
				rest = rest[n:]
			}
			if len(got) != len(want) {
				t.Fatalf("vnet=%v trial %d: %d records, want %d", vnet, trial, len(got), len(want))
			}
			for i, r := range got {
				if !bytes.Equal(r.frame(), want[i]) {
					t.Fatalf("record %d: frame differs", i)
				}
				if r.start != wantStart[i] {
					t.Fatalf("record %d: start %d, want %d", i, r.start, wantStart[i])
				}
				if i+1 < len(got) && r.end() != got[i+1].start {
					t.Fatalf("record %d: end %d, next starts at %d", i, r.end(), got[i+1].start)
				}
				// Released records are the bytes as read.
				if !bytes.Equal(r.raw, stream[r.start:r.end()]) {
					t.Fatalf("record %d: raw bytes differ from the stream", i)
				}
				if vnet {
					if r.vnet != 12 || !bytes.Equal(r.ethernet(), want[i][12:]) {
						t.Fatalf("record %d: vnet %d", i, r.vnet)
					}
				}
			}
		}
	}
}

func TestParserRejectsCorruption(t *testing.T) {
	p := parser{vnetHdr: true}
	bad := binary.BigEndian.AppendUint32(nil, MaxFrameLen+1)
	bad = binary.BigEndian.AppendUint32(bad, 12)
	err := p.feed(bad, func(record) { t.Fatal("emitted a record") })
	if err == nil || !strings.Contains(err.Error(), "frame length") {
		t.Fatalf("err = %v", err)
	}
	p = parser{vnetHdr: true}
	bad = binary.BigEndian.AppendUint32(nil, 10)
	bad = binary.BigEndian.AppendUint32(bad, 11)
	if err := p.feed(bad, func(record) {}); err == nil || !strings.Contains(err.Error(), "vnet header") {
		t.Fatalf("err = %v", err)
	}
}

func TestParserSkipsEmptyRecords(t *testing.T) {
	p := parser{}
	s := appendRecord(nil, nil, false, 0)
	s = appendRecord(s, []byte("abc"), false, 0)
	var got []record
	if err := p.feed(s, func(r record) { got = append(got, r) }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || string(got[0].frame()) != "abc" || got[0].start != 4 {
		t.Fatalf("got %+v", got)
	}
}
