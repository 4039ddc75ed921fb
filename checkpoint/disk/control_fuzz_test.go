package disk

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"testing"
)

// FuzzControlRequest: parseControlRequest accepts exactly the 16-byte
// requests with the magic and zero reserved bytes, and those are what
// encodeCutRequest writes (with their op).
func FuzzControlRequest(f *testing.F) {
	f.Add(encodeCutRequest(1), uint64(1))
	f.Add(encodeCutRequest(^uint64(0)), uint64(0))
	f.Add([]byte("RDC1\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x07"), uint64(7))
	f.Add([]byte("RDC1\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x07"), uint64(7))
	f.Fuzz(func(t *testing.T, b []byte, epoch uint64) {
		op, ep, err := parseControlRequest(b)
		valid := len(b) == ctlReqLen && string(b[:4]) == ctlReqMagic && b[5] == 0 && b[6] == 0 && b[7] == 0
		if (err == nil) != valid {
			t.Fatalf("%x: err %v", b, err)
		}
		if err == nil {
			want := encodeCutRequest(ep)
			want[4] = op
			if !bytes.Equal(want, b) {
				t.Fatalf("%x parses to op %d epoch %d, which encodes to %x", b, op, ep, want)
			}
		}
		if op, ep, err := parseControlRequest(encodeCutRequest(epoch)); err != nil || op != ctlOpCut || ep != epoch {
			t.Fatalf("cut of epoch %d parses to op %d epoch %d, %v", epoch, op, ep, err)
		}
	})
}

// duplex reads from r and collects writes.
type duplex struct {
	r io.Reader
	w bytes.Buffer
}

func (d *duplex) Read(p []byte) (int, error)  { return d.r.Read(p) }
func (d *duplex) Write(p []byte) (int, error) { return d.w.Write(p) }

// FuzzServeControl: ServeControl answers each well-formed request in
// order, as a model of the Target's cuts says (only later epochs cut),
// block hashes as the Target computes them, stops at the first malformed
// or truncated one, and the CutClient reads every answer back as what it
// is.
func FuzzServeControl(f *testing.F) {
	f.Add(slices.Concat(encodeCutRequest(1), encodeCutRequest(2), encodeCutRequest(2)))
	f.Add(slices.Concat(encodeCutRequest(1), encodeRequest(ctlOpHashes, 512), encodeRequest(ctlOpHashes, 0), encodeCutRequest(2)))
	f.Add(slices.Concat(encodeCutRequest(5), []byte("RDC1\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x06"), encodeCutRequest(3)))
	f.Add(slices.Concat(encodeCutRequest(1), []byte("RDC2")))
	f.Add(slices.Concat(encodeCutRequest(1), []byte("XXXXXXXXXXXXXXXX")))
	f.Fuzz(func(t *testing.T, in []byte) {
		tg, _ := newMemTarget(4096, Options{})
		rw := &duplex{r: bytes.NewReader(in)}
		err := ServeControl(rw, tg)
		replies := rw.w.Bytes()
		var last uint64
		rest := in
		for ; len(rest) >= ctlReqLen; rest = rest[ctlReqLen:] {
			op, epoch, perr := parseControlRequest(rest[:ctlReqLen])
			if perr != nil {
				break
			}
			if op == ctlOpHashes {
				replies = checkHashesReply(t, replies, tg, int64(epoch))
				continue
			}
			wantOK := op == ctlOpCut && epoch > last
			if wantOK {
				last = epoch
			}
			replies = checkCutReply(t, replies, epoch, wantOK)
		}
		if len(replies) != 0 {
			t.Fatalf("%d bytes written beyond the answers", len(replies))
		}
		if (err == nil) != (len(rest) == 0) {
			t.Fatalf("ServeControl returned %v with %d bytes of the input not served", err, len(rest))
		}
	})
}

// checkCutReply decodes the answer at the start of replies with a
// CutClient asking for epoch, and returns the rest.
func checkCutReply(t *testing.T, replies []byte, epoch uint64, wantOK bool) []byte {
	t.Helper()
	r := bytes.NewReader(replies)
	cl := NewCutClient(&duplex{r: r})
	err := cl.Cut(context.Background(), epoch)
	var ce *CutError
	switch {
	case wantOK && err != nil:
		t.Fatalf("cut of epoch %d: %v", epoch, err)
	case wantOK && cl.Last() != (EpochStats{Epoch: epoch}):
		t.Fatalf("cut of epoch %d: stats %+v", epoch, cl.Last())
	case !wantOK && !errors.As(err, &ce):
		t.Fatalf("refused cut of epoch %d: %v, want a CutError", epoch, err)
	}
	// The client reads through a bufio.Reader: find the end by length.
	n := ctlReplyLen + int(binary.BigEndian.Uint32(replies[32:]))
	return replies[n:]
}

// checkHashesReply decodes the block hashes answer at the start of
// replies with a CutClient, checks it against tg's own hashes (or its
// refusal), and returns the rest.
func checkHashesReply(t *testing.T, replies []byte, tg *Target, block int64) []byte {
	t.Helper()
	want, werr := tg.BlockHashes(block)
	got, err := NewCutClient(&duplex{r: bytes.NewReader(replies)}).BlockHashes(context.Background(), block)
	var ce *CutError
	switch {
	case werr != nil && !errors.As(err, &ce):
		t.Fatalf("hashes of %d-byte blocks: %v, want the refusal %v", block, err, werr)
	case werr == nil && (err != nil || !slices.Equal(got, want)):
		t.Fatalf("hashes of %d-byte blocks: %v %v, want %v", block, got, err, want)
	}
	n := ctlReplyLen + int(binary.BigEndian.Uint32(replies[32:])) + 8*len(want)
	return replies[n:]
}

func cutReply(status byte, epoch uint64, writes, nbytes uint64, msg string) []byte {
	b := []byte(ctlReplyMagic + "\x00\x00\x00\x00")
	b[4] = status
	b = binary.BigEndian.AppendUint64(b, epoch)
	b = binary.BigEndian.AppendUint64(b, writes)
	b = binary.BigEndian.AppendUint64(b, nbytes)
	b = binary.BigEndian.AppendUint32(b, uint32(len(msg)))
	return append(b, msg...)
}

// FuzzCutReply: whatever the standby answers, the primary's CutClient
// accepts only a well-formed OK reply for the epoch it asked, reports a
// refusal as a CutError with the standby's message, and is broken by
// anything else, so it never sends another cut on a stream out of step.
func FuzzCutReply(f *testing.F) {
	f.Add(cutReply(statusOK, 9, 3, 4096, ""), uint64(9))
	f.Add(cutReply(statusOutOfSync, 9, 0, 0, "buffer full"), uint64(9))
	f.Add(cutReply(statusError, 9, 0, 0, "not after the last cut"), uint64(9))
	f.Add(cutReply(statusOK, 8, 0, 0, ""), uint64(9))
	f.Add(cutReply(statusOK, 9, 0, 0, "")[:30], uint64(9))
	f.Fuzz(func(t *testing.T, in []byte, epoch uint64) {
		rw := &duplex{r: bytes.NewReader(in)}
		cl := NewCutClient(rw)
		err := cl.Cut(context.Background(), epoch)
		wellFormed := len(in) >= ctlReplyLen && string(in[:4]) == ctlReplyMagic &&
			binary.BigEndian.Uint64(in[8:]) == epoch && binary.BigEndian.Uint32(in[32:]) <= ctlMaxMessage &&
			len(in) >= ctlReplyLen+int(binary.BigEndian.Uint32(in[32:]))
		var ce *CutError
		switch {
		case err == nil:
			want := EpochStats{Epoch: epoch, Writes: int(binary.BigEndian.Uint64(in[16:])), Bytes: int64(binary.BigEndian.Uint64(in[24:]))}
			if !wellFormed || in[4] != statusOK || cl.Last() != want {
				t.Fatalf("accepted %x as %+v", in, cl.Last())
			}
		case errors.As(err, &ce):
			msg := string(in[ctlReplyLen : ctlReplyLen+int(binary.BigEndian.Uint32(in[32:]))])
			if !wellFormed || in[4] == statusOK || ce.Epoch != epoch || ce.Msg != msg || ce.OutOfSync != (in[4] == statusOutOfSync) {
				t.Fatalf("%x read as %+v", in, ce)
			}
		default:
			if wellFormed {
				t.Fatalf("well-formed reply %x refused: %v", in, err)
			}
			sent := rw.w.Len()
			if cl.Cut(context.Background(), epoch+1) == nil || rw.w.Len() != sent {
				t.Fatalf("after %v the client sent another cut", err)
			}
		}
	})
}
