package labkit

import (
	"bufio"
	"context"
	"encoding/xml"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

func TestDomainXML(t *testing.T) {
	o := GuestOptions{Name: "g0", IP: GuestIP(0), Cmdline: "quiet"}
	x := DomainXML(o)
	var d struct {
		Type   string `xml:"type,attr"`
		Name   string `xml:"name"`
		Memory struct {
			Unit  string `xml:"unit,attr"`
			Value int    `xml:",chardata"`
		} `xml:"memory"`
		OS struct {
			Type struct {
				Machine string `xml:"machine,attr"`
			} `xml:"type"`
			Kernel  string `xml:"kernel"`
			Initrd  string `xml:"initrd"`
			Cmdline string `xml:"cmdline"`
		} `xml:"os"`
		Iface struct {
			Source struct {
				Bridge string `xml:"bridge,attr"`
			} `xml:"source"`
			MAC struct {
				Address string `xml:"address,attr"`
			} `xml:"mac"`
			Model struct {
				Type string `xml:"type,attr"`
			} `xml:"model"`
		} `xml:"devices>interface"`
	}
	if err := xml.Unmarshal([]byte(x), &d); err != nil {
		t.Fatalf("%v\n%s", err, x)
	}
	if d.Type != "qemu" || d.Name != "g0" || d.Memory.Value != 256 || d.Memory.Unit != "MiB" ||
		d.OS.Type.Machine != "pc" || d.OS.Kernel != KernelPath() || d.OS.Initrd != InitrdPath() ||
		d.Iface.Source.Bridge != Bridge || d.Iface.Model.Type != "virtio" || d.Iface.MAC.Address != "52:54:00:4d:00:0a" {
		t.Fatalf("unexpected domain %+v\n%s", d, x)
	}
	want := "console=ttyS0 panic=1 remora.ip=10.77.0.10/24 remora.gw=10.77.0.1 remora.region_pages=8192 remora.rate=2000 quiet"
	if d.OS.Cmdline != want {
		t.Fatalf("cmdline %q, want %q", d.OS.Cmdline, want)
	}
	for _, s := range []string{
		"<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>",
		"<video><model type='none'/></video>",
		"<memballoon model='none'/>",
		"<controller type='usb' model='none'/>",
		"<on_poweroff>destroy</on_poweroff>",
		"<log file='" + ConsoleLogPath("g0") + "' append='off'/>",
		"<remora:lab xmlns:remora='" + MetadataURI + "'",
	} {
		if !strings.Contains(x, s) {
			t.Errorf("XML lacks %s", s)
		}
	}
	if strings.Contains(x, "-incoming") {
		t.Error("-incoming without Incoming")
	}
	o.Incoming, o.Name = true, "g0-standby"
	if x := DomainXML(o); !strings.Contains(x, "<qemu:arg value='defer'/>") || !strings.Contains(x, "52:54:00:4d:00:0a") {
		t.Errorf("standby shell XML:\n%s", x)
	}
}

func TestOptionsValidation(t *testing.T) {
	for _, o := range []GuestOptions{
		{IP: GuestIP(0)},
		{Name: "a b", IP: GuestIP(0)},
		{Name: "x", IP: "nope"},
		{Name: "x", IP: GuestIP(0), MemoryMiB: 64},
	} {
		if _, err := o.withDefaults(); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
}

// fakeWorkload answers like test/guest does.
func fakeWorkload(t *testing.T, replies map[string]string) string {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					r, ok := replies[sc.Text()]
					if !ok {
						r = "err unknown command"
					}
					if r == "HANG" {
						continue
					}
					c.Write([]byte(r + "\n"))
				}
			}()
		}
	}()
	return l.Addr().String()
}

func TestClient(t *testing.T) {
	addr := fakeWorkload(t, map[string]string{
		"inc":        "7",
		"get":        "7",
		"check":      "ok round=3 boundary=17",
		"writer 500": "ok",
		"stats":      "counter=7 round=3 boundary=17 written=20000 rate=500 region_pages=8192 page_size=4096 checks=1 uptime=12.500",
		"slow":       "HANG",
	})
	ctx := context.Background()
	c, err := Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if v, err := c.Inc(ctx); err != nil || v != 7 {
		t.Fatalf("inc: %v %v", v, err)
	}
	if r, err := c.Check(ctx); err != nil || !r.OK || r.Round != 3 || r.Boundary != 17 {
		t.Fatalf("check: %+v %v", r, err)
	}
	if err := c.SetWriterRate(ctx, 500); err != nil {
		t.Fatal(err)
	}
	if err := c.SetWriterRate(ctx, 1); !errors.Is(err, ErrReply) {
		t.Fatalf("writer 1: %v", err)
	}
	s, err := c.Stats(ctx)
	if err != nil || s.Written != 20000 || s.Rate != 500 || s.Uptime != 12500*time.Millisecond || s.Fields["page_size"] != "4096" {
		t.Fatalf("stats: %+v %v", s, err)
	}
	tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if _, err := c.Do(tctx, "slow"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow: %v", err)
	}
	if _, err := c.Get(ctx); err == nil {
		t.Fatal("client usable after a timed-out request")
	}

	addr2 := fakeWorkload(t, map[string]string{"check": "fail page 4: round 1, want 2 (stale)"})
	c2, err := Dial(addr2)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if r, err := c2.Check(ctx); err != nil || r.OK || r.Reason != "page 4: round 1, want 2 (stale)" {
		t.Fatalf("failed check: %+v %v", r, err)
	}
}
