package checkpoint

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// FuzzUnmarshalEpochEnd: only a trailer of exactly epochEndLen bytes is
// accepted, and it re-encodes to the same bytes; every EpochEnd survives
// Marshal then UnmarshalEpochEnd.
func FuzzUnmarshalEpochEnd(f *testing.F) {
	f.Add(EpochEnd{Pages: 3, Batches: 1, DevStateLen: 4096, CRC: 0xdeadbeef, DevStateCRC: 7}.Marshal(), uint64(1), uint32(2), uint64(3), uint32(4), uint32(5))
	f.Add(EpochEnd{}.Marshal(), ^uint64(0), ^uint32(0), ^uint64(0), ^uint32(0), ^uint32(0))
	f.Add(make([]byte, epochEndLen-1), uint64(0), uint32(0), uint64(0), uint32(0), uint32(0))
	f.Add(make([]byte, epochEndLen+1), uint64(0), uint32(0), uint64(0), uint32(0), uint32(0))
	f.Fuzz(func(t *testing.T, b []byte, pages uint64, batches uint32, devLen uint64, crc, devCRC uint32) {
		e, err := UnmarshalEpochEnd(b)
		if (err == nil) != (len(b) == epochEndLen) {
			t.Fatalf("%d-byte trailer: err %v", len(b), err)
		}
		if err == nil && !bytes.Equal(e.Marshal(), b) {
			t.Fatalf("%x decodes to %+v, which encodes to %x", b, e, e.Marshal())
		}
		want := EpochEnd{Pages: pages, Batches: batches, DevStateLen: devLen, CRC: crc, DevStateCRC: devCRC}
		if got, err := UnmarshalEpochEnd(want.Marshal()); err != nil || got != want {
			t.Fatalf("round trip of %+v: %+v, %v", want, got, err)
		}
	})
}

// helloRecorder is a StandbyHandler that records what the Standby hands
// it and refuses every session, so ServeConn always answers with one
// frame and returns.
type helloRecorder struct {
	hello *Hello
	disk  *DiskHello
}

var errRecorded = errors.New("recorded, refused")

func (r *helloRecorder) Accept(_ context.Context, _ net.Conn, h Hello, _ uint64) (Accepted, error) {
	r.hello = &h
	return Accepted{}, errRecorded
}

func (r *helloRecorder) Unenroll(_ context.Context, _ net.Conn, h Hello, _ uint64) (Welcome, error) {
	r.hello = &h
	return Welcome{}, errRecorded
}

func (r *helloRecorder) Move(context.Context, net.Conn, Move, uint64) error {
	return errors.New("no moves here")
}

func (r *helloRecorder) Restarting(context.Context, net.Conn, Restarting, uint64) error {
	return errRecorded
}

func (r *helloRecorder) Disk(_ context.Context, _ net.Conn, _ FrameType, _ uint64, h DiskHello) error {
	r.disk = &h
	return errRecorded
}

// serveFirstFrame runs a Standby on one connection that opens with f and
// returns the handler's record and the Standby's answer.
func serveFirstFrame(t *testing.T, f Frame) (*helloRecorder, Frame) {
	rec := &helloRecorder{}
	sb := &Standby{Handler: rec, Log: slog.New(slog.DiscardHandler), HandshakeTimeout: 5 * time.Second}
	cli, srv := net.Pipe()
	defer cli.Close()
	done := make(chan struct{})
	go func() { defer close(done); sb.ServeConn(context.Background(), srv) }()
	cli.SetDeadline(time.Now().Add(5 * time.Second))
	if err := WriteFrame(cli, f); err != nil {
		t.Fatalf("send %s: %v", f.Type, err)
	}
	reply, err := ReadFrame(cli)
	if err != nil {
		t.Fatalf("no answer to a %s frame: %v", f.Type, err)
	}
	<-done
	return rec, reply
}

// FuzzStandbyHello feeds the first frame of a connection, a Hello or
// DiskHello of any JSON, to a real Standby. The handler must get exactly
// the decoded hello when it is usable (a guest, and a dev for disks; the
// page size for sessions) and never otherwise; an unusable one gets a
// fatal refusal, since sending it again cannot help. Whatever the handler
// gets survives a JSON round trip.
func FuzzStandbyHello(f *testing.F) {
	kinds := []FrameType{FrameHello, FrameUnenroll, FrameDiskNBD, FrameDiskControl}
	hello, _ := json.Marshal(Hello{Agent: "host-a", Guest: "vm1", Generation: "g1", RAMBytes: 1 << 30, PageSize: PageSize,
		DomainXML: "<domain/>", ShellBase: "vm1", Disks: []DiskSpec{{Dev: "vda", Size: 1 << 30}}})
	disk, _ := json.Marshal(DiskHello{Agent: "host-a", Guest: "vm1", Dev: "vda", Reset: true})
	for i := range kinds {
		f.Add(uint8(i), hello)
		f.Add(uint8(i), disk)
	}
	f.Add(uint8(0), []byte(`{"agent":"a","guest":"vm1","page_size":8192}`))
	f.Add(uint8(0), []byte(`{"agent":"a","guest":"vm1","page_size":4096,"disks":[]}`))
	f.Add(uint8(2), []byte(`{"agent":"a","guest":"vm1"}`))
	f.Add(uint8(0), []byte(`{"agent":"a","guest":"../../etc","page_size":4096}`))
	f.Add(uint8(2), []byte(`{"agent":"a","guest":"vm1","dev":"../vda"}`))
	f.Add(uint8(0), []byte(`{"agent":"a","guest":"vm1","page_size":4096,"disks":[{"dev":"vda","size":-1}]}`))
	f.Add(uint8(1), []byte(`{"guest":""}`))
	f.Add(uint8(3), []byte(`null`))
	f.Add(uint8(0), []byte(`{"guest":"vm1","ram_bytes":"x"}`))
	f.Fuzz(func(t *testing.T, sel uint8, payload []byte) {
		kind := kinds[int(sel)%len(kinds)]
		rec, reply := serveFirstFrame(t, Frame{Type: kind, Fence: 7, Payload: payload})
		var usable bool
		if kind == FrameDiskNBD || kind == FrameDiskControl {
			var want DiskHello
			usable = json.Unmarshal(payload, &want) == nil && want.validate() == nil
			if rec.hello != nil || usable != (rec.disk != nil) {
				t.Fatalf("%s %q: usable %v, handler got hello %v disk %v", kind, payload, usable, rec.hello, rec.disk)
			}
			if usable {
				checkOneComponent(t, want.Guest, want.Dev)
				checkSame(t, *rec.disk, want)
				checkJSONRoundTrip(t, *rec.disk)
			}
		} else {
			var want Hello
			usable = json.Unmarshal(payload, &want) == nil && want.validate() == nil && (kind == FrameUnenroll || want.PageSize == PageSize)
			if rec.disk != nil || usable != (rec.hello != nil) {
				t.Fatalf("%s %q: usable %v, handler got hello %v disk %v", kind, payload, usable, rec.hello, rec.disk)
			}
			if usable {
				checkOneComponent(t, want.Guest, want.ShellBase)
				for _, d := range want.Disks {
					checkOneComponent(t, d.Dev)
				}
				checkSame(t, *rec.hello, want)
				checkJSONRoundTrip(t, normalHello(*rec.hello))
			}
		}
		var msg ErrorMsg
		if reply.Type != FrameError || json.Unmarshal(reply.Payload, &msg) != nil || msg.Error == "" {
			t.Fatalf("%s %q: answer %s %q, want an error frame", kind, payload, reply.Type, reply.Payload)
		}
		if !usable && !msg.Fatal {
			t.Fatalf("%s %q: unusable hello refused as retryable: %q", kind, payload, msg.Error)
		}
	})
}

// checkOneComponent fails when a name the handler gets could reach
// outside the directory it is joined to.
func checkOneComponent(t *testing.T, names ...string) {
	t.Helper()
	for _, n := range names {
		if n != "" && filepath.Join("/state", n) != "/state/"+n {
			t.Fatalf("name %q handed to the handler leaves its directory", n)
		}
	}
}

func checkSame[T any](t *testing.T, got, want T) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("handler got %+v, the payload decodes to %+v", got, want)
	}
}

// normalHello drops an empty disk list, which omitempty leaves out of the
// JSON, so that it round trips.
func normalHello(h Hello) Hello {
	if len(h.Disks) == 0 {
		h.Disks = nil
	}
	return h
}

func checkJSONRoundTrip[T any](t *testing.T, v T) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("marshal %+v: %v", v, err)
	}
	var back T
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, v) {
		t.Fatalf("%+v -> %s -> %+v (%v)", v, b, back, err)
	}
}

// The fuzz seeds are valid hellos: check they reach the handler at all.
func TestStandbyHelloSeedsReachTheHandler(t *testing.T) {
	h, _ := json.Marshal(Hello{Agent: "host-a", Guest: "vm1", PageSize: PageSize})
	if rec, _ := serveFirstFrame(t, Frame{Type: FrameHello, Payload: h}); rec.hello == nil || rec.hello.Guest != "vm1" {
		t.Fatalf("valid hello not handed over: %+v", rec.hello)
	}
	d, _ := json.Marshal(DiskHello{Agent: "host-a", Guest: "vm1", Dev: "vda"})
	if rec, _ := serveFirstFrame(t, Frame{Type: FrameDiskControl, Payload: d}); rec.disk == nil || rec.disk.Dev != "vda" {
		t.Fatalf("valid disk hello not handed over: %+v", rec.disk)
	}
}
