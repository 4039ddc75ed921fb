package checkpoint

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
)

var allFrameTypes = []FrameType{
	FrameHello, FrameWelcome, FrameError, FrameEpochBegin, FramePages,
	FrameDevState, FrameEpochEnd, FrameAck, FramePing, FrameUnenroll,
}

// testPayloads are payload shapes every frame type is tried with.
func testPayloads() [][]byte {
	big := make([]byte, 1<<20+3)
	for i := range big {
		big[i] = byte(i*7 + i>>9)
	}
	return [][]byte{
		nil,
		{},
		{0},
		[]byte(`{"agent":"a","committed":42}`),
		bytes.Repeat([]byte{0xff}, 4096),
		big,
	}
}

func sampleFrames() []Frame {
	var fs []Frame
	for i, t := range allFrameTypes {
		for j, p := range testPayloads() {
			fs = append(fs, Frame{
				Type:    t,
				Fence:   uint64(i)<<40 | uint64(j),
				Epoch:   ^uint64(0) - uint64(i*31+j),
				Payload: p,
			})
		}
	}
	// Extreme header values.
	fs = append(fs, Frame{Type: FrameAck}, Frame{Type: FramePing, Fence: ^uint64(0), Epoch: ^uint64(0)})
	return fs
}

func sameFrame(a, b Frame) bool {
	return a.Type == b.Type && a.Fence == b.Fence && a.Epoch == b.Epoch && bytes.Equal(a.Payload, b.Payload)
}

func TestFrameTypeString(t *testing.T) {
	want := map[FrameType]string{
		FrameHello: "hello", FrameWelcome: "welcome", FrameError: "error",
		FrameEpochBegin: "epoch-begin", FramePages: "pages", FrameDevState: "devstate",
		FrameEpochEnd: "epoch-end", FrameAck: "ack", FramePing: "ping", FrameUnenroll: "unenroll", FrameDiskNBD: "disk-nbd", FrameDiskControl: "disk-control",
		FrameDevStateLZ4: "devstate-lz4", FramePageHashes: "page-hashes", FrameRestarting: "restarting", FrameMove: "move", 0: "frame-type-0", 17: "frame-type-17", 255: "frame-type-255",
	}
	for ft, s := range want {
		if got := ft.String(); got != s {
			t.Errorf("FrameType(%d).String() = %q, want %q", uint8(ft), got, s)
		}
	}
}

func TestFrameRoundTrip(t *testing.T) {
	for _, f := range sampleFrames() {
		// Stream API.
		var buf bytes.Buffer
		if err := WriteFrame(&buf, f); err != nil {
			t.Fatalf("WriteFrame(%s): %v", f.Type, err)
		}
		wire := append([]byte(nil), buf.Bytes()...)
		if len(wire) != frameHeaderLen+len(f.Payload)+4 {
			t.Fatalf("%s frame is %d bytes on the wire, want %d", f.Type, len(wire), frameHeaderLen+len(f.Payload)+4)
		}
		got, err := ReadFrame(&buf)
		if err != nil {
			t.Fatalf("ReadFrame(%s): %v", f.Type, err)
		}
		if !sameFrame(got, f) {
			t.Fatalf("ReadFrame round trip of %s changed the frame", f.Type)
		}
		if cap(got.Payload) != len(got.Payload) {
			t.Errorf("ReadFrame payload has spare capacity %d > %d: an append would scribble past it", cap(got.Payload), len(got.Payload))
		}
		if buf.Len() != 0 {
			t.Fatalf("ReadFrame left %d bytes unread", buf.Len())
		}

		// Buffer API, appended after a prefix that must be preserved.
		prefix := []byte("prefix")
		b := AppendFrame(append([]byte(nil), prefix...), f)
		if !bytes.Equal(b[:len(prefix)], prefix) {
			t.Fatal("AppendFrame clobbered the bytes before it")
		}
		if !bytes.Equal(b[len(prefix):], wire) {
			t.Fatalf("AppendFrame and WriteFrame encode %s differently", f.Type)
		}
		got, n, err := DecodeFrame(b[len(prefix):])
		if err != nil {
			t.Fatalf("DecodeFrame(%s): %v", f.Type, err)
		}
		if n != len(wire) || !sameFrame(got, f) {
			t.Fatalf("DecodeFrame(%s) = n %d (want %d), same=%v", f.Type, n, len(wire), sameFrame(got, f))
		}
		if cap(got.Payload) != len(got.Payload) {
			t.Errorf("DecodeFrame payload has spare capacity: appending to it would overwrite the CRC")
		}
	}
}

func TestFrameStreamOfManyFrames(t *testing.T) {
	frames := sampleFrames()
	var stream []byte
	for _, f := range frames {
		stream = AppendFrame(stream, f)
	}
	// Buffer API: walk the concatenation.
	rest := stream
	for i, want := range frames {
		got, n, err := DecodeFrame(rest)
		if err != nil || !sameFrame(got, want) {
			t.Fatalf("frame %d: DecodeFrame err=%v same=%v", i, err, sameFrame(got, want))
		}
		rest = rest[n:]
	}
	if len(rest) != 0 {
		t.Fatalf("%d bytes left after the last frame", len(rest))
	}
	// Stream API through readers that return short reads and data with EOF
	// (byte-at-a-time reads over small frames only: they are slow).
	stream = stream[:0:0]
	frames = slices.DeleteFunc(frames, func(f Frame) bool { return len(f.Payload) > 8192 })
	for _, f := range frames {
		stream = AppendFrame(stream, f)
	}
	for name, r := range map[string]io.Reader{
		"plain":    bytes.NewReader(stream),
		"onebyte":  iotest.OneByteReader(bytes.NewReader(stream)),
		"half":     iotest.HalfReader(bytes.NewReader(stream)),
		"dataerr":  iotest.DataErrReader(bytes.NewReader(stream)),
		"timeout1": &retryReader{r: iotest.TimeoutReader(bytes.NewReader(stream))},
	} {
		for i, want := range frames {
			got, err := ReadFrame(r)
			if err != nil || !sameFrame(got, want) {
				t.Fatalf("%s: frame %d: ReadFrame err=%v same=%v", name, i, err, sameFrame(got, want))
			}
		}
		if _, err := ReadFrame(r); err != io.EOF {
			t.Fatalf("%s: ReadFrame at a clean end of stream = %v, want io.EOF", name, err)
		}
	}
}

// retryReader hides the single timeout of iotest.TimeoutReader by retrying once.
type retryReader struct {
	r       io.Reader
	retried bool
}

func (r *retryReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if errors.Is(err, iotest.ErrTimeout) && !r.retried {
		r.retried = true
		return r.r.Read(p)
	}
	return n, err
}

// expectCorruptErr checks that corrupting byte i of a frame gives the error
// that byte's field must give.
func expectCorruptErr(t *testing.T, api string, i int, err error) {
	t.Helper()
	var ve *VersionError
	switch {
	case err == nil:
		t.Fatalf("%s: byte %d corrupted, frame accepted", api, i)
	case i < 4:
		if !errors.Is(err, ErrBadMagic) {
			t.Fatalf("%s: magic byte %d corrupted: %v, want ErrBadMagic", api, i, err)
		}
	case i == 4:
		if !errors.As(err, &ve) {
			t.Fatalf("%s: version byte corrupted: %v, want *VersionError", api, err)
		}
	case i >= 24 && i < 28:
		// A corrupt length makes the frame end elsewhere: the CRC will not
		// match, the stream looks truncated, or the length is impossible.
		if !errors.Is(err, ErrFrameCRC) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, ErrFrameLarge) {
			t.Fatalf("%s: length byte %d corrupted: %v", api, i, err)
		}
	default:
		if !errors.Is(err, ErrFrameCRC) {
			t.Fatalf("%s: byte %d corrupted: %v, want ErrFrameCRC", api, i, err)
		}
	}
}

func TestFrameCorruptionAnywhereIsDetected(t *testing.T) {
	frames := []Frame{
		{Type: FrameEpochEnd, Fence: 7, Epoch: 99, Payload: EpochEnd{Pages: 3, Batches: 1, DevStateLen: 10, CRC: 0xdeadbeef}.Marshal()},
		{Type: FrameAck, Fence: 1, Epoch: 2},
		{Type: FramePages, Fence: 3, Epoch: 4, Payload: bytes.Repeat([]byte("page data "), 50)},
	}
	for _, f := range frames {
		wire := AppendFrame(nil, f)
		for i := range wire {
			for _, mask := range []byte{0x01, 0x10, 0x80, 0xff, 0x5a} {
				bad := append([]byte(nil), wire...)
				bad[i] ^= mask
				_, _, err := DecodeFrame(bad)
				expectCorruptErr(t, "DecodeFrame", i, err)
				_, err = ReadFrame(bytes.NewReader(bad))
				expectCorruptErr(t, "ReadFrame", i, err)
			}
		}
	}
}

func TestFrameVersionError(t *testing.T) {
	wire := AppendFrame(nil, Frame{Type: FrameHello, Payload: []byte("{}")})
	for _, v := range []byte{0, ProtocolVersion - 1, ProtocolVersion + 1, 255} {
		bad := append([]byte(nil), wire...)
		bad[4] = v
		for api, err := range map[string]error{
			"DecodeFrame": func() error { _, _, err := DecodeFrame(bad); return err }(),
			"ReadFrame":   func() error { _, err := ReadFrame(bytes.NewReader(bad)); return err }(),
		} {
			var ve *VersionError
			if !errors.As(err, &ve) {
				t.Fatalf("%s with version %d: %v, want *VersionError", api, v, err)
			}
			if ve.Got != v {
				t.Errorf("%s: VersionError.Got = %d, want %d", api, ve.Got, v)
			}
			msg := err.Error()
			if !strings.Contains(msg, "v"+strconv.Itoa(int(v))) || !strings.Contains(msg, "v"+strconv.Itoa(ProtocolVersion)) {
				t.Errorf("%s: version error %q does not name both v%d and v%d", api, msg, v, ProtocolVersion)
			}
		}
	}
}

// headerOnly is a reader that serves a frame header and fails the test if
// the reader asks for anything more.
type headerOnly struct {
	t   *testing.T
	hdr []byte
}

func (h *headerOnly) Read(p []byte) (int, error) {
	if len(h.hdr) == 0 {
		h.t.Error("ReadFrame read past the header of an oversized frame")
		return 0, io.ErrUnexpectedEOF
	}
	n := copy(p, h.hdr)
	h.hdr = h.hdr[n:]
	return n, nil
}

func TestFrameTooLarge(t *testing.T) {
	for _, n := range []uint32{MaxFramePayload + 1, 1 << 30, ^uint32(0)} {
		hdr := AppendFrame(nil, Frame{Type: FramePages, Epoch: 1})[:frameHeaderLen]
		binary.BigEndian.PutUint32(hdr[24:28], n)

		if _, _, err := DecodeFrame(hdr); !errors.Is(err, ErrFrameLarge) {
			t.Fatalf("DecodeFrame with length %d: %v, want ErrFrameLarge", n, err)
		}
		if _, err := ReadFrame(&headerOnly{t: t, hdr: hdr}); !errors.Is(err, ErrFrameLarge) {
			t.Fatalf("ReadFrame with length %d: %v, want ErrFrameLarge", n, err)
		}
		// It must not allocate for the announced payload.
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for range 50 {
			_, _ = ReadFrame(bytes.NewReader(hdr))
			_, _, _ = DecodeFrame(hdr)
		}
		runtime.ReadMemStats(&after)
		if grew := after.TotalAlloc - before.TotalAlloc; grew > 1<<20 {
			t.Fatalf("50 reads of an oversized header allocated %d bytes", grew)
		}
	}
	// The largest legal payload goes through.
	f := Frame{Type: FramePages, Epoch: 5, Payload: make([]byte, MaxFramePayload)}
	f.Payload[0], f.Payload[MaxFramePayload-1] = 1, 2
	var buf bytes.Buffer
	if err := WriteFrame(&buf, f); err != nil {
		t.Fatalf("WriteFrame at the limit: %v", err)
	}
	got, err := ReadFrame(&buf)
	if err != nil || !sameFrame(got, f) {
		t.Fatalf("ReadFrame at the limit: %v", err)
	}
	// And WriteFrame refuses one byte more, writing nothing.
	f.Payload = make([]byte, MaxFramePayload+1)
	buf.Reset()
	if err := WriteFrame(&buf, f); err == nil {
		t.Fatal("WriteFrame accepted a payload over MaxFramePayload")
	}
	if buf.Len() != 0 {
		t.Fatalf("WriteFrame wrote %d bytes of a refused frame", buf.Len())
	}
}

func TestFrameTruncated(t *testing.T) {
	for _, f := range []Frame{
		{Type: FrameAck, Epoch: 3},
		{Type: FrameDevState, Epoch: 3, Payload: bytes.Repeat([]byte{1, 2, 3}, 100)},
	} {
		wire := AppendFrame(nil, f)
		for n := 0; n < len(wire); n++ {
			_, _, err := DecodeFrame(wire[:n])
			if err != io.ErrUnexpectedEOF {
				t.Fatalf("DecodeFrame of %d/%d bytes: %v, want io.ErrUnexpectedEOF", n, len(wire), err)
			}
			_, err = ReadFrame(bytes.NewReader(wire[:n]))
			want := io.ErrUnexpectedEOF
			if n == 0 {
				want = io.EOF // nothing at all is a clean end of stream
			}
			if err != want {
				t.Fatalf("ReadFrame of %d/%d bytes: %v, want %v", n, len(wire), err, want)
			}
			// A good frame followed by a cut one: the good one still reads.
			r := bytes.NewReader(append(AppendFrame(nil, Frame{Type: FramePing}), wire[:n]...))
			if _, err := ReadFrame(r); err != nil {
				t.Fatal(err)
			}
			if _, err := ReadFrame(r); err != want {
				t.Fatalf("ReadFrame of a cut second frame (%d bytes): %v, want %v", n, err, want)
			}
		}
	}
}

func TestFrameReadErrorPassesThrough(t *testing.T) {
	boom := errors.New("boom")
	wire := AppendFrame(nil, Frame{Type: FrameAck, Payload: []byte("abc")})
	for n := 0; n < len(wire); n++ {
		r := io.MultiReader(bytes.NewReader(wire[:n]), iotest.ErrReader(boom))
		if _, err := ReadFrame(r); !errors.Is(err, boom) {
			t.Fatalf("reader error after %d bytes: ReadFrame = %v, want boom", n, err)
		}
	}
}

func TestFrameReservedBytesRejected(t *testing.T) {
	wire := AppendFrame(nil, Frame{Type: FrameAck, Epoch: 1})
	wire[6] = 1
	binary.BigEndian.PutUint32(wire[len(wire)-4:], crc32c(wire[:len(wire)-4]))
	if _, _, err := DecodeFrame(wire); err == nil {
		t.Fatal("DecodeFrame accepted a frame with a reserved header byte set")
	}
}

// FuzzDecodeFrame: arbitrary bytes never panic, and any accepted frame
// re-encodes to exactly the bytes it was decoded from. Each input is tried
// as is, and again with its CRC fixed so the fuzzer reaches the paths past
// the checksum.
func FuzzDecodeFrame(f *testing.F) {
	for _, fr := range sampleFrames() {
		if len(fr.Payload) > 256 { // big seeds make the minimizer crawl
			continue
		}
		f.Add(AppendFrame(nil, fr))
	}
	f.Add(AppendFrame(AppendFrame(nil, Frame{Type: FramePing}), Frame{Type: FrameAck, Epoch: 9}))
	f.Add([]byte{})
	f.Add([]byte("RMRA"))
	f.Add(make([]byte, frameHeaderLen+4))
	f.Fuzz(func(t *testing.T, data []byte) {
		checkDecode(t, data)
		if len(data) >= frameHeaderLen+4 {
			n := int(binary.BigEndian.Uint32(data[24:28]))
			if n <= MaxFramePayload && frameHeaderLen+n+4 <= len(data) {
				fixed := append([]byte(nil), data...)
				end := frameHeaderLen + n
				binary.BigEndian.PutUint32(fixed[end:], crc32c(fixed[:end]))
				checkDecode(t, fixed)
			}
		}
	})
}

func checkDecode(t *testing.T, data []byte) {
	fr, n, err := DecodeFrame(data)
	rf, rerr := ReadFrame(bytes.NewReader(data))
	if err != nil {
		var ve *VersionError
		if !errors.Is(err, ErrBadMagic) && !errors.Is(err, ErrFrameCRC) && !errors.Is(err, ErrFrameLarge) && !errors.Is(err, ErrFrameReserved) &&
			!errors.Is(err, io.ErrUnexpectedEOF) && !errors.As(err, &ve) {
			t.Fatalf("DecodeFrame: unexpected error %v", err)
		}
		if n != 0 {
			t.Fatalf("DecodeFrame failed but reports %d bytes used", n)
		}
		if rerr == nil {
			t.Fatalf("DecodeFrame refused (%v) what ReadFrame accepted", err)
		}
		return
	}
	if rerr != nil || !sameFrame(fr, rf) {
		t.Fatalf("ReadFrame disagrees with DecodeFrame: %v", rerr)
	}
	if n != frameHeaderLen+len(fr.Payload)+4 || n > len(data) {
		t.Fatalf("DecodeFrame used %d bytes for a %d-byte payload (input %d)", n, len(fr.Payload), len(data))
	}
	re := AppendFrame(nil, fr)
	if !bytes.Equal(re, data[:n]) {
		t.Fatalf("accepted frame re-encodes differently:\n in %x\nout %x", data[:n], re)
	}
}
