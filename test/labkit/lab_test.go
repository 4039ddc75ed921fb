package labkit

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// Guest IP and name reserved for this test, away from the low addresses
// other tests use.
const (
	selftestName = "labkit-selftest"
	selftestIP   = "10.77.0.250"
)

func TestLabGuest(t *testing.T) {
	RequireLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	bctx, bcancel := context.WithTimeout(ctx, 3*time.Minute)
	g, err := Boot(bctx, GuestOptions{Name: selftestName, IP: selftestIP})
	bcancel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Destroy(); err != nil {
			t.Errorf("destroy: %v", err)
		}
		if st, err := Virsh(context.Background(), "domstate", selftestName); err == nil {
			t.Errorf("domain still exists after Destroy (state %s)", st)
		}
	})
	t.Logf("guest %s booted in %v (addr %s, mac %s)", g.Name, g.BootTime.Round(time.Millisecond), g.Addr(), g.MAC)
	if m, err := g.Machine(ctx); err != nil {
		t.Error(err)
	} else {
		t.Logf("machine type: %s", m)
	}
	if p, err := g.RAMPath(); err != nil {
		t.Error(err)
	} else if fi, err := os.Stat(p); err != nil {
		t.Error(err)
	} else if fi.Size() != int64(g.Options.MemoryMiB)<<20 {
		t.Errorf("RAM file %s has %d bytes, want %d MiB", p, fi.Size(), g.Options.MemoryMiB)
	} else {
		t.Logf("RAM file: %s (%d MiB)", p, fi.Size()>>20)
	}

	// The lab keeps Debian's stock qemu.conf but for memory_backing_dir.
	if u, err := QEMUUser(selftestName); err != nil {
		t.Error(err)
	} else if u != "libvirt-qemu" {
		t.Errorf("QEMU runs as %s, want libvirt-qemu (Debian's stock qemu.conf)", u)
	}

	c, err := g.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v1, err := c.Inc(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v2, err := c.Inc(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if v2 <= v1 {
		t.Fatalf("inc: %d then %d", v1, v2)
	}

	s0, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const rate = 5000
	if err := c.SetWriterRate(ctx, rate); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	s1, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	achieved := float64(s1.Written-s0.Written) / (s1.Uptime - s0.Uptime).Seconds()
	t.Logf("writer: set %d pages/s, achieved %.0f pages/s over %v", rate, achieved, s1.Uptime-s0.Uptime)
	if s1.Rate != rate || s1.Written <= s0.Written {
		t.Fatalf("writer not running: %+v -> %+v", s0, s1)
	}

	start := time.Now()
	r, err := c.Check(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !r.OK {
		t.Fatalf("check failed: %s", r.Reason)
	}
	t.Logf("check: %s (%v)", r.Reply, time.Since(start).Round(time.Millisecond))

	// The same guest from the client namespace, on another connection.
	cc, err := g.DialFrom(ctx, NetnsClient)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	if la := cc.Conn().LocalAddr().String(); !strings.HasPrefix(la, IPClient+":") {
		t.Errorf("connection from %s has local address %s", NetnsClient, la)
	}
	if v, err := cc.Get(ctx); err != nil || v != v2 {
		t.Fatalf("get from %s: %d, %v (want %d)", NetnsClient, v, err, v2)
	}
	if v, err := cc.Inc(ctx); err != nil || v != v2+1 {
		t.Fatalf("inc from %s: %d, %v", NetnsClient, v, err)
	}

	if con := g.Console(); !strings.Contains(con, "remora-init: starting workload") {
		t.Errorf("console log %s lacks the init's messages", g.ConsoleLog)
	}
}

// Netem delays the traffic between two lab hosts by its delay each way,
// and lets it flow at once again after Stop.
func TestNetemDelays(t *testing.T) {
	RequireLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var ln net.Listener
	if err := InNetns(NetnsClient, func() error {
		var err error
		ln, err = net.Listen("tcp", IPClient+":0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	connect := func() time.Duration {
		start := time.Now()
		c, err := DialTCPNetns(ctx, NetnsA, ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		return time.Since(start)
	}
	base := connect()
	n, err := StartNetem(NetnsA, IPClient, 100*time.Millisecond, 0, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	slow := connect()
	n.Stop()
	after := connect()
	t.Logf("connect: %v plain, %v with 100 ms each way, %v after", base, slow, after)
	if slow < 190*time.Millisecond || after > slow/2 {
		t.Fatalf("connect took %v with netem (want >= 200 ms), %v after", slow, after)
	}
}
