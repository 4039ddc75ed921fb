package disk

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func reqBytes(flags, typ uint16, handle, off uint64, n uint32) []byte {
	b := make([]byte, requestLen)
	binary.BigEndian.PutUint32(b, nbdReqMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], n)
	return b
}

func TestParseRequest(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name  string
		b     []byte
		err   bool
		errno uint32
	}{
		{"read", reqBytes(0, cmdRead, 7, 4096, 512), false, 0},
		{"write FUA", reqBytes(cmdFlagFUA, cmdWrite, 7, 0, 4096), false, 0},
		{"write to the last byte", reqBytes(0, cmdWrite, 1, size-512, 512), false, 0},
		{"write past the end", reqBytes(0, cmdWrite, 1, size-512, 1024), false, errNoSpc},
		{"read past the end", reqBytes(0, cmdRead, 1, size, 1), false, errInval},
		{"offset overflow", reqBytes(0, cmdRead, 1, ^uint64(0), 2), false, errInval},
		{"read too long", reqBytes(0, cmdRead, 1, 0, maxPayload+1), false, errInval},
		{"zeroes no-hole", reqBytes(cmdFlagNoHole, cmdWriteZeroes, 1, 0, size), false, 0},
		{"trim", reqBytes(0, cmdTrim, 1, 0, 4096), false, 0},
		{"flush", reqBytes(0, cmdFlush, 1, 0, 0), false, 0},
		{"flush with a range", reqBytes(0, cmdFlush, 1, 0, 4096), false, errInval},
		{"disc", reqBytes(0, cmdDisc, 1, 0, 0), false, errInval}, // handled before check
		{"block status", reqBytes(0, 7, 1, 0, 4096), false, errInval},
		{"unknown flag", reqBytes(1<<6, cmdRead, 1, 0, 512), false, errInval},
		{"bad magic", append([]byte{1, 2, 3, 4}, reqBytes(0, cmdRead, 1, 0, 1)[4:]...), true, 0},
		{"short", reqBytes(0, cmdRead, 1, 0, 1)[:27], true, 0},
	} {
		r, err := parseRequest(tc.b)
		if (err != nil) != tc.err {
			t.Errorf("%s: err %v", tc.name, err)
			continue
		}
		if err == nil && r.typ != cmdDisc {
			if got := r.check(size); got != tc.errno {
				t.Errorf("%s: errno %d, want %d", tc.name, got, tc.errno)
			}
		}
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add(reqBytes(0, cmdRead, 1, 0, 512), int64(1<<20))
	f.Add(reqBytes(cmdFlagFUA, cmdWrite, 1, 1<<20-512, 512), int64(1<<20))
	f.Add(reqBytes(0, cmdWriteZeroes, 1, ^uint64(0)-10, 100), int64(1<<20))
	f.Fuzz(func(t *testing.T, b []byte, size int64) {
		if size < 0 {
			size = -size
		}
		r, err := parseRequest(b)
		if err != nil {
			return
		}
		if r.check(size) == 0 && r.typ != cmdFlush {
			if r.offset+uint64(r.length) > uint64(size) || r.offset+uint64(r.length) < r.offset {
				t.Fatalf("accepted out-of-range request %+v on a %d-byte export", r, size)
			}
		}
	})
}

func TestParseInfoRequest(t *testing.T) {
	good := binary.BigEndian.AppendUint32(nil, 3)
	good = append(good, "vda"...)
	good = binary.BigEndian.AppendUint16(good, 2)
	good = binary.BigEndian.AppendUint16(good, infoBlockSize)
	good = binary.BigEndian.AppendUint16(good, 1)
	name, reqs, err := parseInfoRequest(good)
	if err != nil || name != "vda" || len(reqs) != 2 || reqs[0] != infoBlockSize {
		t.Fatal(name, reqs, err)
	}
	for _, bad := range [][]byte{nil, good[:5], good[:len(good)-1], append(bytes.Clone(good), 0),
		{0xff, 0xff, 0xff, 0xff, 0, 0}} {
		if _, _, err := parseInfoRequest(bad); err == nil {
			t.Errorf("%x accepted", bad)
		}
	}
}

func FuzzParseInfoRequest(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 'a', 0, 1, 0, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		name, reqs, err := parseInfoRequest(b)
		if err == nil && 4+len(name)+2+2*len(reqs) != len(b) {
			t.Fatalf("parsed %q %v from %d bytes", name, reqs, len(b))
		}
	})
}

// nbdClient is a minimal NBD client for tests.
type nbdClient struct {
	c     net.Conn
	r     *bufio.Reader
	size  uint64
	flags uint16
	block [3]uint32
}

func readFull(t *testing.T, r io.Reader, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		t.Fatal(err)
	}
	return b
}

func sendOpt(c net.Conn, opt uint32, data []byte) error {
	h := binary.BigEndian.AppendUint64(nil, nbdOptMagic)
	h = binary.BigEndian.AppendUint32(h, opt)
	h = binary.BigEndian.AppendUint32(h, uint32(len(data)))
	_, err := c.Write(append(h, data...))
	return err
}

type optRep struct {
	opt, typ uint32
	data     []byte
}

func readOptReply(t *testing.T, r io.Reader) optRep {
	t.Helper()
	h := readFull(t, r, 20)
	if binary.BigEndian.Uint64(h) != nbdRepMagic {
		t.Fatal("bad option reply magic")
	}
	return optRep{binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:]), readFull(t, r, int(binary.BigEndian.Uint32(h[16:])))}
}

func goRequest(name string, reqs ...uint16) []byte {
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = binary.BigEndian.AppendUint16(d, uint16(len(reqs)))
	for _, r := range reqs {
		d = binary.BigEndian.AppendUint16(d, r)
	}
	return d
}

// dialTest connects a test client to s over a pipe and negotiates export
// with NBD_OPT_GO (or NBD_OPT_EXPORT_NAME).
func dialTest(t *testing.T, s *Server, export string, useGo bool) (*nbdClient, chan error) {
	t.Helper()
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(b) }()
	t.Cleanup(func() { a.Close() })
	a.SetDeadline(time.Now().Add(10 * time.Second))
	cl := &nbdClient{c: a, r: bufio.NewReader(a)}
	h := readFull(t, cl.r, 18)
	if binary.BigEndian.Uint64(h) != nbdMagic || binary.BigEndian.Uint64(h[8:]) != nbdOptMagic ||
		binary.BigEndian.Uint16(h[16:]) != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("greeting %x", h)
	}
	a.Write([]byte{0, 0, 0, flagFixedNewstyle | flagNoZeroes})
	// An unsupported option first, as QEMU's structured-reply request.
	sendOpt(a, 8, nil)
	if r := readOptReply(t, cl.r); r.typ != repErrUnsup {
		t.Fatalf("structured reply option answered %d", r.typ)
	}
	if !useGo {
		sendOpt(a, optExportName, []byte(export))
		h := readFull(t, cl.r, 10)
		cl.size, cl.flags = binary.BigEndian.Uint64(h), binary.BigEndian.Uint16(h[8:])
		return cl, done
	}
	sendOpt(a, optGo, goRequest(export, infoBlockSize))
	for {
		r := readOptReply(t, cl.r)
		switch r.typ {
		case repInfo:
			switch binary.BigEndian.Uint16(r.data) {
			case infoExport:
				cl.size, cl.flags = binary.BigEndian.Uint64(r.data[2:]), binary.BigEndian.Uint16(r.data[10:])
			case infoBlockSize:
				for i := range 3 {
					cl.block[i] = binary.BigEndian.Uint32(r.data[2+4*i:])
				}
			}
		case repAck:
			return cl, done
		default:
			t.Fatalf("GO answered %#x %q", r.typ, r.data)
		}
	}
}

func (c *nbdClient) do(t *testing.T, flags, typ uint16, off uint64, n uint32, payload []byte) (uint32, []byte) {
	t.Helper()
	const handle = 0xfeedface
	if _, err := c.c.Write(append(reqBytes(flags, typ, handle, off, n), payload...)); err != nil {
		t.Fatal(err)
	}
	if typ == cmdDisc {
		return 0, nil
	}
	h := readFull(t, c.r, replyLen)
	if binary.BigEndian.Uint32(h) != nbdSimpleMagic || binary.BigEndian.Uint64(h[8:]) != handle {
		t.Fatalf("reply %x", h)
	}
	errno := binary.BigEndian.Uint32(h[4:])
	if typ == cmdRead && errno == 0 {
		return 0, readFull(t, c.r, int(n))
	}
	return errno, nil
}

func TestNBDSession(t *testing.T) {
	for _, useGo := range []bool{true, false} {
		t.Run(fmt.Sprintf("go=%v", useGo), func(t *testing.T) {
			tg, img := newMemTarget(1<<20, Options{})
			s := NewServer(tg, "vda")
			cl, done := dialTest(t, s, "vda", useGo)
			if cl.size != 1<<20 || cl.flags != transmissionFlags {
				t.Fatalf("size %d flags %#x", cl.size, cl.flags)
			}
			if useGo && cl.block != [3]uint32{minBlock, preferredBlock, maxPayload} {
				t.Fatalf("block sizes %v", cl.block)
			}
			if e, _ := cl.do(t, 0, cmdWrite, 4096, 4096, pattern(4096, 1)); e != 0 {
				t.Fatal("write", e)
			}
			tg.Cut(1)
			if e, _ := cl.do(t, cmdFlagFUA, cmdWrite, 8192, 512, pattern(512, 2)); e != 0 {
				t.Fatal("FUA write", e)
			}
			if e, _ := cl.do(t, 0, cmdWriteZeroes, 4096, 1024, nil); e != 0 {
				t.Fatal("write zeroes", e)
			}
			if e, _ := cl.do(t, 0, cmdTrim, 5120, 512, nil); e != 0 {
				t.Fatal("trim", e)
			}
			if e, _ := cl.do(t, 0, cmdFlush, 0, 0, nil); e != 0 {
				t.Fatal("flush", e)
			}
			want := make([]byte, 8192)
			copy(want[:4096], pattern(4096, 1))
			clear(want[:1536])
			copy(want[4096:], pattern(512, 2))
			if e, got := cl.do(t, 0, cmdRead, 4096, 8192, nil); e != 0 || !bytes.Equal(got, want) {
				t.Fatalf("read: errno %d, data equal %v", e, bytes.Equal(got, want))
			}
			if !bytes.Equal(img.b[4096:8192], pattern(4096, 1)) || !bytes.Equal(img.b[8192:8704], make([]byte, 512)) {
				t.Fatal("image: the direct write is missing or a buffered write reached it")
			}
			if e, _ := cl.do(t, 0, cmdWrite, 1<<20-512, 1024, make([]byte, 1024)); e != errNoSpc {
				t.Fatalf("write past the end: errno %d", e)
			}
			if e, _ := cl.do(t, 0, 9, 0, 0, nil); e != errInval {
				t.Fatalf("unknown command: errno %d", e)
			}
			cl.do(t, 0, cmdDisc, 0, 0, nil)
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if err := tg.Err(); err != nil {
				t.Fatalf("a clean disconnect put the replica out of sync: %v", err)
			}
			if st, _ := tg.Cut(2); st.Writes != 3 {
				t.Fatalf("epoch 2 has %d writes, want 3", st.Writes)
			}
		})
	}
}

func TestNBDUnknownExport(t *testing.T) {
	tg, _ := newMemTarget(4096, Options{})
	s := NewServer(tg, "vda")
	a, b := net.Pipe()
	defer a.Close()
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(b) }()
	r := bufio.NewReader(a)
	readFull(t, r, 18)
	a.Write([]byte{0, 0, 0, 1})
	sendOpt(a, optGo, goRequest("vdb"))
	if rep := readOptReply(t, r); rep.typ != repErrUnknown {
		t.Fatalf("GO of an unknown export: %#x", rep.typ)
	}
	sendOpt(a, optList, nil)
	if rep := readOptReply(t, r); rep.typ != repServer || string(rep.data[4:]) != "vda" {
		t.Fatalf("LIST: %#x %q", rep.typ, rep.data)
	}
	readOptReply(t, r) // ack
	sendOpt(a, optExportName, []byte("vdb"))
	if err := <-done; err == nil || !strings.Contains(err.Error(), "unknown export") {
		t.Fatalf("EXPORT_NAME of an unknown export: %v", err)
	}
}

func TestNBDAbnormalEndWhileProtected(t *testing.T) {
	tg, _ := newMemTarget(1<<20, Options{})
	s := NewServer(tg, "vda")
	cl, done := dialTest(t, s, "vda", true)
	cl.do(t, 0, cmdWrite, 0, 512, pattern(512, 1))
	tg.Cut(1)
	cl.do(t, 0, cmdWrite, 0, 512, pattern(512, 2))
	// A write whose payload never fully arrives.
	cl.c.Write(reqBytes(0, cmdWrite, 1, 0, 4096))
	cl.c.Write(make([]byte, 100))
	cl.c.Close()
	<-done
	if _, err := tg.Cut(2); !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("cut after the mirror connection broke: %v", err)
	}
	if !strings.Contains(tg.Stats().OutOfSync, "without a disconnect request") {
		t.Fatal(tg.Stats().OutOfSync)
	}
}

// A mirror connection opened before the replica was reset (the primary
// mirrors afresh; the old connection lingers behind a partition) may
// neither write into the new replica nor, when it finally breaks, put it
// out of sync. The same break of a connection of the new mirror does
// (the negative control).
func TestNBDReplacedConnectionIsIgnored(t *testing.T) {
	tg, _ := newMemTarget(1<<20, Options{})
	s := NewServer(tg, "vda")
	old, oldDone := dialTest(t, s, "vda", true)
	tg.Reset()
	cur, curDone := dialTest(t, s, "vda", true)
	if errno, _ := cur.do(t, 0, cmdWrite, 0, 512, pattern(512, 1)); errno != 0 {
		t.Fatalf("write of the current mirror: errno %d", errno)
	}
	tg.Cut(1)
	if errno, _ := old.do(t, 0, cmdWrite, 0, 512, pattern(512, 9)); errno == 0 {
		t.Fatal("a write of the replaced mirror's connection was accepted")
	}
	old.c.Close() // no disconnect request
	<-oldDone
	if _, err := tg.Cut(2); err != nil {
		t.Fatalf("the replaced connection's end put the replica out of sync: %v", err)
	}
	got := make([]byte, 512)
	if err := tg.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern(512, 1)) {
		t.Fatalf("replica block 0 after the replaced write: %v", err)
	}
	cur.c.Close()
	<-curDone
	if _, err := tg.Cut(3); !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("the current mirror's connection broke and the cut went on: %v", err)
	}
}

func TestNBDServeAndClose(t *testing.T) {
	tg, _ := newMemTarget(1<<20, Options{})
	s := NewServer(tg, "vda")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	readFull(t, c, 18)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err != nil {
		t.Fatalf("Serve after Close: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after Close")
	}
}

// Whatever a client sends after the handshake, the server does not panic
// and never writes out of range.
func FuzzNBDTransmission(f *testing.F) {
	seed := append(reqBytes(0, cmdWrite, 1, 0, 8), 1, 2, 3, 4, 5, 6, 7, 8)
	seed = append(seed, reqBytes(0, cmdRead, 2, 0, 8)...)
	f.Add(seed)
	f.Add(reqBytes(0, cmdWriteZeroes, 1, 4000, 200))
	f.Add(reqBytes(0, cmdDisc, 1, 0, 0))
	f.Fuzz(func(t *testing.T, in []byte) {
		tg, _ := newMemTarget(4096, Options{MaxBufferedBytes: 1 << 16})
		tg.Cut(1)
		s := NewServer(tg, "x")
		nc := &nbdConn{s: s, t: tg, r: bufio.NewReader(bytes.NewReader(in)), w: bufio.NewWriter(io.Discard)}
		nc.transmit()
	})
}

// QEMU's own NBD client (qemu-io) against the server, when installed.
func TestNBDWithQemuIO(t *testing.T) {
	qemuIO, err := exec.LookPath("qemu-io")
	if err != nil {
		t.Skip("qemu-io not installed")
	}
	dir := t.TempDir()
	imgPath := filepath.Join(dir, "replica.img")
	os.WriteFile(imgPath, make([]byte, 4<<20), 0o600)
	tg, err := OpenTarget(imgPath, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	s := NewServer(tg, "vda")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(l)
	defer s.Close()
	url := fmt.Sprintf("nbd://%s/vda", l.Addr())
	run := func(cmds ...string) string {
		t.Helper()
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out, err := exec.Command(qemuIO, append(args, url)...).CombinedOutput()
		if err != nil || strings.Contains(string(out), "error") || strings.Contains(string(out), "failed") {
			t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
		}
		return string(out)
	}
	run("write -P 0xab 0 64k", "flush")
	tg.Cut(1)
	run("write -P 0xcd 4k 8k", "write -z 1M 128k", "write -P 0xef -f 2M 4k")
	run("read -P 0xab 0 4k", "read -P 0xcd 4k 8k", "read -P 0 1M 128k", "read -P 0xef 2M 4k")
	if _, err := tg.Cut(2); err != nil {
		t.Fatalf("cut after qemu-io sessions: %v (each must end with a clean disconnect)", err)
	}
	b, _ := os.ReadFile(imgPath)
	if b[4096] != 0xab || b[0] != 0xab {
		t.Fatal("image: the write before the first cut is missing, or a later one reached it")
	}
	redo := filepath.Join(dir, "redo")
	if _, err := tg.Stage(2, redo); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.Apply(redo); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(imgPath)
	if b[4096] != 0xcd || b[2<<20] != 0xef || b[64<<10-1] != 0xab {
		t.Fatal("image after apply differs")
	}
	if st := tg.Stats(); st.AppliedWrites != 3 {
		t.Fatalf("stats %+v", st)
	}
}
