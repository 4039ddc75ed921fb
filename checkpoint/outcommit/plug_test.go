//go:build linux

package outcommit

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The Plug tests need root and a kernel with sch_plug, ifb, act_mirred,
// sch_ingress, cls_matchall and tun (Debian's kernel; test/kernelvm boots
// one under QEMU). Without them they skip, or fail when
// REMORA_REQUIRE_KERNEL_FEATURES=1. Each test runs in a network namespace
// of its own: "the guest" is the test writing frames into a tap; they are
// UDP datagrams to the tap's address, read by a UDP socket behind it, so a
// frame is seen only once it has come through the plug and the ifb.

const (
	plugTapName  = "rmrtap0"
	plugHostIP   = "10.210.0.1"
	plugGuestIP  = "10.210.0.2"
	plugPort     = 5555
	plugPayload  = 64
	plugFrameLen = 14 + 20 + 8 + plugPayload
)

func requireKernelFeatures() bool { return os.Getenv("REMORA_REQUIRE_KERNEL_FEATURES") == "1" }

func skipOrFail(t *testing.T, format string, a ...any) {
	t.Helper()
	if requireKernelFeatures() {
		t.Fatalf(format, a...)
	}
	t.Skipf(format+" (set REMORA_REQUIRE_KERNEL_FEATURES=1 to fail instead; test/kernelvm runs these tests in Debian's kernel)", a...)
}

type plugMsg struct{ epoch, seq uint32 }

// plugLab is a tap in a network namespace of its own, and a UDP receiver.
type plugLab struct {
	t    *testing.T
	tap  int
	mac  net.HardwareAddr
	rx   *net.UDPConn
	got  chan plugMsg
	seq  uint32
	sent []plugMsg
}

// newPlugLab locks the test goroutine to its thread and moves that thread
// into a new network namespace (the thread is discarded when the test
// ends); NewPlug must be called from the test goroutine.
func newPlugLab(t *testing.T) *plugLab {
	t.Helper()
	runtime.LockOSThread() // never unlocked: the thread dies with the test
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		skipOrFail(t, "plug tests need root (unshare a network namespace): %v", err)
	}
	if err := PlugSupported(); err != nil {
		skipOrFail(t, "plug output commit unsupported here: %v", err)
	}
	l := &plugLab{t: t, got: make(chan plugMsg, 4096)}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		skipOrFail(t, "no /dev/net/tun (modprobe tun): %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	ifr, err := unix.NewIfreq(plugTapName)
	if err != nil {
		t.Fatal(err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		t.Fatalf("TUNSETIFF: %v", err)
	}
	l.tap = fd

	nl, err := openNetlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	idx, err := nl.linkIndex(plugTapName)
	if err != nil {
		t.Fatal(err)
	}
	// No IPv6 on the tap: the kernel's own router solicitations and MLD
	// reports would be frames in the plug the tests do not count (seen
	// once: 16 dropped where 15 were sent past the bound).
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+plugTapName+"/disable_ipv6", []byte("1"), 0o644); err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("disable IPv6 on %s: %v", plugTapName, err)
	}
	if err := nl.setLinkUp(idx); err != nil {
		t.Fatal(err)
	}
	if err := addAddr(nl, idx, net.ParseIP(plugHostIP).To4(), 24); err != nil {
		t.Fatalf("address on %s: %v", plugTapName, err)
	}
	var a attrs
	a.str(unix.IFLA_IFNAME, plugTapName)
	msgs, err := nl.do(unix.RTM_GETLINK, 0, append(ifinfomsg(0, 0, 0), a.b...))
	if err != nil || len(msgs) == 0 || len(msgs[0]) < unix.SizeofIfInfomsg {
		t.Fatalf("RTM_GETLINK %s: %v", plugTapName, err)
	}
	l.mac = net.HardwareAddr(parseAttrs(msgs[0][unix.SizeofIfInfomsg:])[unix.IFLA_ADDRESS])
	if len(l.mac) != 6 {
		t.Fatalf("tap address %v", l.mac)
	}

	l.rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(plugHostIP), Port: plugPort})
	if err != nil {
		t.Fatal(err)
	}
	_ = l.rx.SetReadBuffer(4 << 20)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, err := l.rx.Read(buf)
			if err != nil {
				return
			}
			if n >= 8 {
				l.got <- plugMsg{binary.BigEndian.Uint32(buf[0:]), binary.BigEndian.Uint32(buf[4:])}
			}
		}
	}()
	t.Cleanup(func() { l.rx.Close(); <-done })
	return l
}

func addAddr(nl *nlConn, index int, ip net.IP, prefix uint8) error {
	m := make([]byte, unix.SizeofIfAddrmsg)
	m[0] = unix.AF_INET
	m[1] = prefix
	binary.NativeEndian.PutUint32(m[4:], uint32(index))
	var a attrs
	a.add(unix.IFA_LOCAL, ip)
	a.add(unix.IFA_ADDRESS, ip)
	_, err := nl.do(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_EXCL, append(m, a.b...))
	return err
}

// frame is an Ethernet/IPv4/UDP frame from the guest to the host's socket.
func (l *plugLab) frame(epoch, seq uint32) []byte {
	b := make([]byte, plugFrameLen)
	copy(b[0:6], l.mac)
	copy(b[6:12], []byte{0x02, 0, 0, 0, 0, 0x02})
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	ip := b[14:34]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+plugPayload))
	ip[8] = 64
	ip[9] = unix.IPPROTO_UDP
	copy(ip[12:16], net.ParseIP(plugGuestIP).To4())
	copy(ip[16:20], net.ParseIP(plugHostIP).To4())
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	udp := b[34:42]
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], plugPort)
	binary.BigEndian.PutUint16(udp[4:], 8+plugPayload)
	binary.BigEndian.PutUint32(b[42:], epoch)
	binary.BigEndian.PutUint32(b[46:], seq)
	return b
}

// send writes n frames tagged epoch into the tap, as the guest would.
func (l *plugLab) send(epoch uint32, n int) {
	l.t.Helper()
	for i := 0; i < n; i++ {
		l.seq++
		if _, err := unix.Write(l.tap, l.frame(epoch, l.seq)); err != nil {
			l.t.Fatalf("write to the tap: %v", err)
		}
		l.sent = append(l.sent, plugMsg{epoch, l.seq})
	}
}

// expect waits for exactly n frames and returns them.
func (l *plugLab) expect(n int, what string) []plugMsg {
	l.t.Helper()
	var out []plugMsg
	timeout := time.After(10 * time.Second)
	for len(out) < n {
		select {
		case m := <-l.got:
			out = append(out, m)
		case <-timeout:
			l.t.Fatalf("%s: got %d frames %v, want %d", what, len(out), out, n)
		}
	}
	return out
}

// quiet asserts that no frame comes within d.
func (l *plugLab) quiet(d time.Duration, what string) {
	l.t.Helper()
	select {
	case m := <-l.got:
		l.t.Fatalf("%s: frame %+v came through, want none", what, m)
	case <-time.After(d):
	}
}

// drain returns the frames that come within d.
func (l *plugLab) drain(d time.Duration) []plugMsg {
	var out []plugMsg
	deadline := time.After(d)
	for {
		select {
		case m := <-l.got:
			out = append(out, m)
		case <-deadline:
			return out
		}
	}
}

func checkOrder(t *testing.T, ms []plugMsg, last *uint32) {
	t.Helper()
	for _, m := range ms {
		if m.seq <= *last {
			t.Fatalf("frame %+v out of order (after seq %d)", m, *last)
		}
		*last = m.seq
	}
}

func newTestPlug(t *testing.T, opts PlugOptions) *Plug {
	t.Helper()
	p, err := NewPlug(context.Background(), plugTapName, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

const plugQuiet = 150 * time.Millisecond

func TestPlugHoldsUntilRelease(t *testing.T) {
	l := newPlugLab(t)
	p := newTestPlug(t, PlugOptions{})
	l.send(0, 3)
	l.expect(3, "before the first cut frames pass")
	if err := p.Cut(1); err != nil {
		t.Fatal(err)
	}
	l.send(2, 4)
	l.quiet(plugQuiet, "after Cut(1)")
	if err := p.Cut(2); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(1); err != nil {
		t.Fatal(err)
	}
	l.quiet(plugQuiet, "after Release(1): epoch 2 is not acked")
	if st := p.Stats(); st.HeldFrames != 4 || st.HeldBytes != 4*plugFrameLen || st.LastCut != 2 {
		t.Fatalf("held: %+v", st)
	}
	if err := p.Release(2); err != nil {
		t.Fatal(err)
	}
	got := l.expect(4, "after Release(2)")
	var last uint32 = 3
	checkOrder(t, got, &last)
	for _, m := range got {
		if m.epoch != 2 {
			t.Fatalf("released %+v with epoch 2", m)
		}
	}
	st := p.Stats()
	if st.ReleasedFrames != 4 || st.ReleasedBytes != 4*plugFrameLen || st.ForwardedFrames != 3 || st.HeldFrames != 0 || st.LastReleased != 2 || st.LatencySamples != 1 {
		t.Fatalf("stats: %+v", st)
	}
	t.Logf("stats: %+v", st)
}

// The agent cuts epochs before the standby acks them: never release one
// early, release all in the end, in order.
func TestPlugPipelinedEpochsNeverReleasedEarly(t *testing.T) {
	l := newPlugLab(t)
	p := newTestPlug(t, PlugOptions{HoldFromStart: true})
	const lag, epochs = 3, 14
	var last uint32
	var got []plugMsg
	for e := uint32(1); e <= epochs; e++ {
		l.send(e, 1+int(e%3))
		if err := p.Cut(uint64(e)); err != nil {
			t.Fatal(err)
		}
		if e <= lag {
			continue
		}
		acked := e - lag
		if err := p.Release(uint64(acked)); err != nil {
			t.Fatal(err)
		}
		var ms []plugMsg
		if acked == 1 {
			// Cut alone (nothing pending before it): released exactly.
			ms = l.expect(2, "Release(1)")
		}
		ms = append(ms, l.drain(60*time.Millisecond)...)
		for _, m := range ms {
			if m.epoch > acked {
				t.Fatalf("frame %+v released after the ack of epoch %d only", m, acked)
			}
		}
		checkOrder(t, ms, &last)
		got = append(got, ms...)
	}
	for e := uint32(epochs - lag + 1); e <= epochs; e++ {
		if err := p.Release(uint64(e)); err != nil {
			t.Fatal(err)
		}
	}
	// Merged epochs go with the next epoch cut after the release.
	if err := p.Cut(epochs + 1); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(epochs + 1); err != nil {
		t.Fatal(err)
	}
	rest := l.expect(len(l.sent)-len(got), "after the last release")
	checkOrder(t, rest, &last)
	l.quiet(plugQuiet, "everything was released")
	st := p.Stats()
	if st.ReleasedFrames != uint64(len(l.sent)) || st.HeldFrames != 0 {
		t.Fatalf("stats: %+v (sent %d)", st, len(l.sent))
	}
	t.Logf("%d frames in %d epochs, acks %d epochs behind: %d released at once, the rest merged; stats %+v", len(l.sent), epochs, lag, len(got), st)
}

// A frame written to the tap is in the plug when write returns: Cut right
// after the writes (as after QMP stop) splits epochs exactly.
func TestPlugCutIsExact(t *testing.T) {
	l := newPlugLab(t)
	p := newTestPlug(t, PlugOptions{HoldFromStart: true})
	var last uint32
	pendingNext := 0 // frames written after the previous cut: this epoch's
	for r := uint32(1); r <= 60; r++ {
		k := int(r%5) + 1
		l.send(r, k)
		if err := p.Cut(uint64(r)); err != nil {
			t.Fatal(err)
		}
		after := int(r % 3)
		l.send(r+1, after) // next epoch's, written right after the cut
		select {
		case m := <-l.got:
			t.Fatalf("round %d: frame %+v out before its release", r, m)
		default:
		}
		if err := p.Release(uint64(r)); err != nil {
			t.Fatal(err)
		}
		got := l.expect(pendingNext+k, "round release")
		checkOrder(t, got, &last)
		for _, m := range got {
			if m.epoch != r {
				t.Fatalf("round %d: released %+v", r, m)
			}
		}
		pendingNext = after
	}
	l.quiet(plugQuiet, "the last epoch is not released")
	if st := p.Stats(); st.HeldFrames != pendingNext {
		t.Fatalf("held %d, want %d: %+v", st.HeldFrames, pendingNext, st)
	}
}

func TestPlugDiscardAfter(t *testing.T) {
	l := newPlugLab(t)
	p := newTestPlug(t, PlugOptions{HoldFromStart: true})
	l.send(1, 3)
	if err := p.Cut(1); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(1); err != nil {
		t.Fatal(err)
	}
	l.send(2, 2)
	if err := p.Cut(2); err != nil {
		t.Fatal(err)
	}
	l.send(3, 2) // open epoch
	// Discard with epoch 1's frames released but perhaps not all taken by
	// the ifb yet: they must not be lost.
	p.DiscardAfter(1)
	first := l.expect(3, "epoch 1, released before the discard")
	l.quiet(plugQuiet, "after DiscardAfter(1)")
	st := p.Stats()
	if st.DiscardedFrames != 4 || st.DiscardedBytes != 4*plugFrameLen || st.HeldFrames != 0 || st.LastCut != 1 {
		t.Fatalf("stats after the discard: %+v", st)
	}
	// Epoch numbers above 1 are cut again; output flows as before.
	l.send(2, 2)
	if err := p.Cut(2); err != nil {
		t.Fatal(err)
	}
	l.quiet(plugQuiet, "new epoch 2 held")
	if err := p.Release(2); err != nil {
		t.Fatal(err)
	}
	got := append(first, l.expect(2, "new epoch 2")...)
	want := []uint32{1, 2, 3, 8, 9}
	var seqs []uint32
	for _, m := range got {
		seqs = append(seqs, m.seq)
	}
	if !slices.Equal(seqs, want) {
		t.Fatalf("received seqs %v, want %v (4-7 discarded)", seqs, want)
	}
}

func TestPlugReleaseAllAndClose(t *testing.T) {
	l := newPlugLab(t)
	p := newTestPlug(t, PlugOptions{HoldFromStart: true})
	var last uint32
	l.send(1, 3)
	if err := p.Cut(1); err != nil {
		t.Fatal(err)
	}
	l.send(2, 2)
	l.quiet(plugQuiet, "held")
	if err := p.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	checkOrder(t, l.expect(5, "after ReleaseAll"), &last)
	l.send(3, 2)
	checkOrder(t, l.expect(2, "forwarding after ReleaseAll"), &last)
	if err := p.Cut(3); err != nil {
		t.Fatal(err)
	}
	l.send(4, 2)
	l.quiet(plugQuiet, "held again after a Cut")
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	st := p.Stats()
	if st.DiscardedFrames != 2 || st.ReleasedFrames != 5 || st.ForwardedFrames != 2 {
		t.Fatalf("stats after Close: %+v", st)
	}
	l.send(5, 3)
	checkOrder(t, l.expect(3, "direct flow after Close"), &last)
	for _, m := range l.drain(0) {
		t.Fatalf("unexpected frame %+v", m)
	}
	nl, err := openNetlink()
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	if _, err := nl.linkIndex(p.ifb); err == nil {
		t.Fatalf("%s still exists after Close", p.ifb)
	}
	if err := nl.delIngress(p.tapIndex); err == nil {
		t.Fatal("the ingress qdisc was still on the tap after Close")
	}
	if err := p.Cut(9); err == nil {
		t.Fatal("Cut after Close accepted")
	}
	p.DiscardAfter(0) // no-op

	// ReleaseAll then Close loses nothing.
	p2 := newTestPlug(t, PlugOptions{HoldFromStart: true})
	l.send(6, 4)
	if err := p2.Cut(6); err != nil {
		t.Fatal(err)
	}
	l.send(7, 1)
	l.quiet(plugQuiet, "second plug holds")
	if err := p2.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	if err := p2.Close(); err != nil {
		t.Fatal(err)
	}
	checkOrder(t, l.expect(5, "ReleaseAll, Close"), &last)
	if st := p2.Stats(); st.DiscardedFrames != 0 {
		t.Fatalf("ReleaseAll then Close discarded: %+v", st)
	}
}

func TestPlugBoundedBuffer(t *testing.T) {
	l := newPlugLab(t)
	p := newTestPlug(t, PlugOptions{HoldFromStart: true, MaxBytes: 10 * plugFrameLen})
	l.send(1, 25)
	if err := p.Cut(1); err != nil {
		t.Fatal(err)
	}
	st := p.Stats()
	if st.HeldFrames != 10 || st.DroppedFrames != 15 {
		t.Fatalf("a plug of 10 frames, 25 sent: %+v", st)
	}
	if err := p.Release(1); err != nil {
		t.Fatal(err)
	}
	got := l.expect(10, "release of a full plug")
	for i, m := range got {
		if m.seq != uint32(i+1) {
			t.Fatalf("released %v: want the first 10 frames", got)
		}
	}
	// It takes frames again once released.
	l.send(2, 3)
	if err := p.Cut(2); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(2); err != nil {
		t.Fatal(err)
	}
	l.expect(3, "after the release")
	if st := p.Stats(); st.DroppedFrames != 15 || st.ReleasedFrames != 13 {
		t.Fatalf("stats: %+v", st)
	}
}

// An agent that died left its ifb and filter: output stayed held, and a
// new Plug replaces them (dropping what the old one held, never leaking it).
func TestPlugReplacesLeftovers(t *testing.T) {
	l := newPlugLab(t)
	old, err := NewPlug(context.Background(), plugTapName, PlugOptions{HoldFromStart: true})
	if err != nil {
		t.Fatal(err)
	}
	old.nl.Close() // the agent died: nothing removed
	l.send(1, 2)
	l.quiet(plugQuiet, "held by the dead agent's plug")
	p := newTestPlug(t, PlugOptions{HoldFromStart: true})
	l.quiet(plugQuiet, "the old plug's frames are dropped, not sent")
	l.send(2, 2)
	if err := p.Cut(2); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(2); err != nil {
		t.Fatal(err)
	}
	for _, m := range l.expect(2, "new plug") {
		if m.epoch != 2 {
			t.Fatalf("got %+v", m)
		}
	}
}

// A restarted agent takes over a plug that a stopped one detached, and
// then one more time (the names and prios alternate): while the guest
// sends through the takeovers, no frame passes unheld.
func TestPlugTakeoverLeaksNothing(t *testing.T) {
	l := newPlugLab(t)
	old, err := NewPlug(context.Background(), plugTapName, PlugOptions{HoldFromStart: true})
	if err != nil {
		t.Fatal(err)
	}
	old.Detach()
	for gen := uint32(1); gen <= 2; gen++ {
		stop := make(chan struct{})
		done := make(chan struct{})
		go func() { // the guest keeps sending through the takeover
			defer close(done)
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := unix.Write(l.tap, l.frame(100, 1)); err != nil {
					return
				}
				time.Sleep(200 * time.Microsecond)
			}
		}()
		p, err := NewPlug(context.Background(), plugTapName, PlugOptions{HoldFromStart: true})
		time.Sleep(20 * time.Millisecond)
		close(stop)
		<-done
		if err != nil {
			t.Fatal(err)
		}
		l.quiet(plugQuiet, fmt.Sprintf("takeover %d: frames sent while the plug changed hands", gen))
		p.Detach()
	}
	p := newTestPlug(t, PlugOptions{HoldFromStart: true})
	l.send(7, 2)
	if err := p.Cut(7); err != nil {
		t.Fatal(err)
	}
	if err := p.Release(7); err != nil {
		t.Fatal(err)
	}
	for _, m := range l.drain(time.Second) {
		if m.epoch != 7 {
			t.Fatalf("after the takeovers: %+v came through, want only epoch 7's frames", m)
		}
	}
}

func TestNewPlugErrors(t *testing.T) {
	newPlugLab(t)
	_, err := NewPlug(context.Background(), "rmr-no-such", PlugOptions{})
	if err == nil || !strings.Contains(err.Error(), "no device rmr-no-such") {
		t.Fatalf("missing tap: %v", err)
	}
	if _, err := NewPlug(context.Background(), plugTapName, PlugOptions{IfbName: "a-name-too-long-for-linux"}); err == nil {
		t.Fatal("an ifb name longer than IFNAMSIZ was accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := NewPlug(ctx, plugTapName, PlugOptions{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled context: %v", err)
	}
}

// Runs anywhere: the probe answers, and its error names what is missing.
func TestPlugSupportedExplains(t *testing.T) {
	err := PlugSupported()
	t.Logf("PlugSupported: %v", err)
	if err != nil && errors.Is(err, ErrPlugUnsupported) && !strings.Contains(err.Error(), "modprobe") {
		t.Fatalf("error does not say what to load: %v", err)
	}
	if err != nil && requireKernelFeatures() && os.Geteuid() == 0 {
		t.Fatalf("REMORA_REQUIRE_KERNEL_FEATURES=1: %v", err)
	}
}

func TestPlugIfbName(t *testing.T) {
	if n := (PlugOptions{}).withDefaults("vnet3").IfbName; n != "ifb-vnet3" {
		t.Fatalf("ifb name %q", n)
	}
	long := (PlugOptions{}).withDefaults("a-long-tap-name").IfbName
	if len(long) > unix.IFNAMSIZ-2 || long == (PlugOptions{}).withDefaults("a-long-tap-namf").IfbName {
		t.Fatalf("ifb name %q for a long tap name", long)
	}
}
