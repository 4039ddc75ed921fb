package arbiter

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"
)

func TestProbe(t *testing.T) {
	svc := lineService(t) // answers "PONG <request>"
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	ok(t, err)
	defer silent.Close()
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accept, never answer
		}
	}()
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	ok(t, err)
	closedAddr := closed.Addr().String()
	closed.Close()

	to := 300 * time.Millisecond
	cases := []struct {
		name    string
		spec    ProbeSpec
		wantErr string // "" means success
	}{
		{"tcp ok", ProbeSpec{Kind: ProbeTCP, Address: svc.Addr().String(), Timeout: to}, ""},
		{"tcp refused", ProbeSpec{Kind: ProbeTCP, Address: closedAddr, Timeout: to}, "refused"},
		{"line prefix", ProbeSpec{Kind: ProbeLine, Address: svc.Addr().String(), Send: "PING", ExpectPrefix: "PONG", Timeout: to}, ""},
		{"line regexp", ProbeSpec{Kind: ProbeLine, Address: svc.Addr().String(), Send: "x42", ExpectRegexp: `^PONG x\d+$`, Timeout: to}, ""},
		{"line any reply", ProbeSpec{Kind: ProbeLine, Address: svc.Addr().String(), Send: "hi", Timeout: to}, ""},
		{"line wrong prefix", ProbeSpec{Kind: ProbeLine, Address: svc.Addr().String(), Send: "PING", ExpectPrefix: "OK", Timeout: to}, "lacks prefix"},
		{"line regexp mismatch", ProbeSpec{Kind: ProbeLine, Address: svc.Addr().String(), Send: "abc", ExpectRegexp: `\d`, Timeout: to}, "does not match"},
		{"line silent", ProbeSpec{Kind: ProbeLine, Address: silent.Addr().String(), Send: "PING", Timeout: to}, "timeout"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ok(t, c.spec.Validate())
			start := time.Now()
			lat, err := Probe(context.Background(), c.spec)
			if el := time.Since(start); el > to+time.Second {
				t.Fatalf("probe took %v, timeout %v", el, to)
			}
			if c.wantErr == "" {
				if err != nil {
					t.Fatalf("probe failed: %v", err)
				}
				if lat <= 0 {
					t.Fatalf("latency %v", lat)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Fatalf("got %v, want error containing %q", err, c.wantErr)
			}
		})
	}
}

func TestProbeSpecValidate(t *testing.T) {
	bad := []ProbeSpec{
		{Kind: "icmp", Address: "a:1"},
		{Kind: ProbeTCP, Address: "nohost"},
		{Kind: ProbeTCP, Address: "a:1", Send: "x"},
		{Kind: ProbeLine, Address: "a:1", ExpectRegexp: "("},
		{Kind: ProbeTCP, Address: "a:1", Timeout: -1},
	}
	for _, s := range bad {
		if s.Validate() == nil {
			t.Errorf("%+v accepted", s)
		}
	}
	if err := (ProbeSpec{}).Validate(); err != nil {
		t.Errorf("empty spec: %v", err)
	}
}

func TestProbeRunner(t *testing.T) {
	svc := lineService(t)
	ctx, cancel := context.WithCancel(context.Background())
	p := newProbeRunner(ctx)
	defer func() { cancel(); p.wait() }()
	spec := ProbeSpec{Kind: ProbeTCP, Address: svc.Addr().String(), Interval: 20 * time.Millisecond, Timeout: 200 * time.Millisecond}
	p.set(map[string]ProbeSpec{"s": spec})
	eventually(t, "first probe", func() bool {
		st, _, _ := p.status("s")
		return st.OK && !st.LastOK.IsZero()
	})
	svc.Close()
	eventually(t, "failures counted", func() bool {
		st, _, _ := p.status("s")
		return !st.OK && st.ConsecutiveFailures >= 2 && st.Error != ""
	})
	st, sp, _ := p.status("s")
	if !fresh(st, sp) || !strings.Contains(describe(st), "failing") {
		t.Fatalf("status %+v: %s", st, describe(st))
	}
	p.set(nil)
	if _, _, found := p.status("s"); found {
		t.Fatal("target not removed")
	}
}
