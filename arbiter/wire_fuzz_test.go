package arbiter

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/remora-ha/remora/internal/pki"
)

// fuzzFrame is body with the wire's length prefix.
func fuzzFrame(body string) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
}

// FuzzReadFrame: readFrame splits any stream at its length prefixes, only
// up to MaxFrame, and says how a stream that is not whole frames ends. A
// request read back from writeFrame equals the one written.
func FuzzReadFrame(f *testing.F) {
	f.Add(slices.Concat(fuzzFrame(`{"v":1,"id":1,"op":"status"}`), fuzzFrame(`{}`)))
	f.Add(fuzzFrame(`{"v":1,"id":2,"op":"heartbeat","agent":"host-a","epochs":{"vm1":3}}`)[:9])
	f.Add(fuzzFrame(`{}`)[:4])
	f.Add(binary.BigEndian.AppendUint32(nil, MaxFrame+1))
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, stream []byte) {
		r := bytes.NewReader(stream)
		off := 0
		for {
			body, err := readFrame(r)
			if err != nil {
				checkReadFrameEnd(t, stream[off:], err)
				return
			}
			n := int(binary.BigEndian.Uint32(stream[off:]))
			if n > MaxFrame || !bytes.Equal(body, stream[off+4:off+4+n]) {
				t.Fatalf("frame at %d: %d bytes read, header says %d", off, len(body), n)
			}
			off += 4 + n
			var req request
			if json.Unmarshal(body, &req) == nil {
				checkRequestRoundTrip(t, req)
			}
		}
	})
}

// checkReadFrameEnd checks the error readFrame ended with on rest, the
// bytes after the last whole frame.
func checkReadFrameEnd(t *testing.T, rest []byte, err error) {
	t.Helper()
	var ok bool
	switch {
	case len(rest) == 0:
		ok = err == io.EOF
	case len(rest) >= 4 && binary.BigEndian.Uint32(rest) > MaxFrame:
		ok = strings.Contains(err.Error(), "exceeds limit")
	default: // a cut header, or a header without all of its body
		ok = err == io.ErrUnexpectedEOF
	}
	if !ok {
		t.Fatalf("%d bytes after the last frame (%x): %v", len(rest), rest[:min(len(rest), 8)], err)
	}
}

func checkRequestRoundTrip(t *testing.T, req request) {
	t.Helper()
	var buf bytes.Buffer
	if err := writeFrame(&buf, req); err != nil {
		return // too big for a frame: refused, not sent
	}
	body, err := readFrame(&buf)
	if err != nil {
		t.Fatalf("reading back %+v: %v", req, err)
	}
	var back request
	if err := json.Unmarshal(body, &back); err != nil || !reflect.DeepEqual(normalRequest(back), normalRequest(req)) {
		t.Fatalf("%+v came back as %+v (%v)", req, back, err)
	}
}

// normalRequest drops an empty epochs map, which omitempty leaves out.
func normalRequest(r request) request {
	if len(r.Epochs) == 0 {
		r.Epochs = nil
	}
	return r
}

// fuzzServer opens an arbiter on a fresh state directory with probes off:
// a fuzzer must not dial the addresses it invents.
func fuzzServer(t *testing.T, tc *tls.Config) *Server {
	s, err := Open(Config{StateDir: t.TempDir(), TLS: tc, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	off, cancel := context.WithCancel(context.Background())
	cancel()
	s.probes = newProbeRunner(off)
	t.Cleanup(func() { s.Close() })
	return s
}

func fuzzPKI(f *testing.F) (dir string, server *tls.Config) {
	dir = f.TempDir()
	if err := pki.InitCA(dir, false); err != nil {
		f.Fatal(err)
	}
	for _, n := range []string{"arbiter", "host-a"} {
		if err := pki.Issue(dir, n, net.ParseIP("127.0.0.1")); err != nil {
			f.Fatal(err)
		}
	}
	tc, err := pki.ServerConfig(dir, "arbiter")
	if err != nil {
		f.Fatal(err)
	}
	return dir, tc
}

// FuzzHandleFrame: the arbiter's server answers any request body from a
// peer whose certificate names host-a with a reply of its own version that
// fits a frame; it refuses undecodable bodies and other versions and
// closes, and takes no decision for a peer claiming another agent.
func FuzzHandleFrame(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"id":1,"op":"status"}`,
		`{"v":1,"id":2,"op":"heartbeat","agent":"host-a","epochs":{"vm1":3}}`,
		`{"v":1,"id":3,"op":"register","agent":"host-a","guest":"vm1","spec":{"guest":"vm1","agent_id":"host-a","role":"primary"}}`,
		`{"v":1,"id":4,"op":"register","agent":"host-b","guest":"vm1","spec":{"guest":"vm1","agent_id":"host-b","role":"standby"}}`,
		`{"v":1,"id":5,"op":"renew","agent":"host-a","guest":"vm1","epoch":1}`,
		`{"v":1,"id":6,"op":"synced","agent":"host-a","guest":"vm1","epoch":1,"standby":"../x"}`,
		`{"v":1,"id":7,"op":"explode","agent":"host-a"}`,
		`{"v":2,"id":8,"op":"status"}`,
		`{"v":1,"id":"nine"}`,
		`[]`,
	} {
		f.Add([]byte(s))
	}
	_, tc := fuzzPKI(f)
	names := []string{"host-a"}
	f.Fuzz(func(t *testing.T, body []byte) {
		s := fuzzServer(t, tc)
		resp, keep := s.handleFrame("fuzz", names, body)
		if resp == nil || resp.V != ProtocolVersion {
			t.Fatalf("reply %+v", resp)
		}
		if err := writeFrame(io.Discard, resp); err != nil {
			t.Fatalf("reply cannot be sent: %v", err)
		}
		code := Code("")
		if resp.Err != nil {
			code = resp.Err.Code
		}
		v, verr := peekVersion(body)
		var req request
		rerr := json.Unmarshal(body, &req)
		switch {
		case verr != nil || (v == ProtocolVersion && rerr != nil):
			if code != CodeBadRequest || keep {
				t.Fatalf("undecodable %q: code %q keep %v", body, code, keep)
			}
		case v != ProtocolVersion:
			if code != CodeVersion || keep {
				t.Fatalf("version %d: code %q keep %v", v, code, keep)
			}
		case resp.ID != req.ID:
			t.Fatalf("reply id %d for request %d", resp.ID, req.ID)
		case !slices.Contains(names, req.Agent) && !(req.Agent == "" && req.Op == opStatus):
			if code != CodeUnauthorized || keep || len(s.Status().Guests) != 0 {
				t.Fatalf("agent %q claimed by host-a: code %q keep %v, guests %v", req.Agent, code, keep, s.Status().Guests)
			}
		case !keep:
			t.Fatalf("decodable request %q from its agent closed the connection (%q)", body, code)
		}
	})
}

// replyServer answers every request frame on its TLS connections with
// the current body.
type replyServer struct {
	mu   sync.Mutex
	body []byte
}

func (rs *replyServer) set(b []byte) {
	rs.mu.Lock()
	rs.body = b
	rs.mu.Unlock()
}

func (rs *replyServer) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			for {
				if _, err := readFrame(c); err != nil {
					return
				}
				rs.mu.Lock()
				b := fuzzFrame(string(rs.body))
				rs.mu.Unlock()
				if _, err := c.Write(b); err != nil {
					return
				}
			}
		}()
	}
}

// FuzzClientReply: the agent's client decodes any reply body an arbiter
// could send: it succeeds only on a reply of its version, without an
// error, for its request; it hands back the arbiter's own error, and
// reports anything undecodable as a bad request.
func FuzzClientReply(f *testing.F) {
	for _, s := range []string{
		`{"v":1,"id":0}`,
		`{"v":1,"status":{"protocol_version":1,"guests":[],"agents":[]}}`,
		`{"v":1,"error":{"code":"stale_epoch","current_epoch":4,"role":"none"}}`,
		`{"v":1,"error":{"code":"unauthorized"}}`,
		`{"v":1,"id":99}`,
		`{"v":2}`,
		`{"v":1,"lease":{"duration":"x"}}`,
		`not json`,
	} {
		f.Add([]byte(s))
	}
	dir, tc := fuzzPKI(f)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tc)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ln.Close() })
	rs := &replyServer{}
	go rs.serve(ln)
	cc, err := pki.ClientConfig(dir, "host-a")
	if err != nil {
		f.Fatal(err)
	}
	cl, err := NewClient(ln.Addr().String(), cc)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { cl.Close() })
	f.Fuzz(func(t *testing.T, body []byte) {
		if len(body) > MaxFrame {
			return
		}
		rs.set(body)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		req := &request{Op: opStatus}
		_, err := cl.call(ctx, req)
		var want response
		v, verr := peekVersion(body)
		uerr := json.Unmarshal(body, &want)
		var got *Error
		if err != nil && !errors.As(err, &got) {
			t.Fatalf("client error %v is not an *Error", err)
		}
		switch {
		case verr != nil || (v == ProtocolVersion && uerr != nil):
			if got == nil || got.Code != CodeBadRequest {
				t.Fatalf("undecodable reply %q: %v", body, err)
			}
		case v != ProtocolVersion:
			if got == nil || got.Code != CodeVersion {
				t.Fatalf("reply of version %d: %v", v, err)
			}
		case want.ID != 0 && want.ID != req.ID:
			if got == nil || got.Code != CodeUnavailable {
				t.Fatalf("reply id %d for request %d: %v", want.ID, req.ID, err)
			}
		case want.Err != nil:
			if got == nil || got.Code != want.Err.Code || got.CurrentEpoch != want.Err.CurrentEpoch {
				t.Fatalf("arbiter error %+v came back as %v", want.Err, err)
			}
		case err != nil:
			t.Fatalf("good reply %q refused: %v", body, err)
		}
	})
}
