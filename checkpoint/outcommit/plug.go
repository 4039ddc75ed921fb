//go:build linux

package outcommit

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"sync"
	"time"

	"github.com/remora-ha/remora/internal/stats"
	"golang.org/x/sys/unix"
)

// Plug is the kernel backend of Buffer, as in Xen's Remus: no QEMU
// object, the frames never leave the kernel.
//
// Set-up (NewPlug), for the guest's tap device:
//
//   - an ifb device (PlugOptions.IfbName), up;
//   - a plug qdisc (sch_plug) as the ifb's root qdisc, limited to
//     PlugOptions.MaxBytes;
//   - on the tap, an ingress qdisc (an existing ingress or clsact qdisc is
//     reused) and, at prio 1 so that no other filter can pass frames first,
//     a matchall filter with the action mirred egress redirect to the ifb.
//     Prio 1 of the tap's ingress hook is Plug's: a filter found there is
//     taken for a dead agent's and removed.
//
// The tap's ingress is what the guest sends. Each frame goes through the
// plug; when the plug lets it out, the ifb hands it back to the tap's
// receive path (past the tc hook), and on it goes, to the bridge or the
// host's stack. While the filter is there, libvirt's outbound bandwidth
// policing on the same hook does not apply.
//
// The exact cut: the frame reaches the plug synchronously with QEMU's
// write to the tap. tun_get_user hands the skb to netif_receive_skb in the
// writer's context (tun_rx_batched with rx-batching off, the default, and
// no IFF_NAPI: QEMU sets neither); the tc ingress hook runs there, mirred's
// egress redirect calls dev_queue_xmit on the ifb, and that enqueues on
// the plug under the qdisc lock before write returns. Once QMP stop has
// returned, QEMU writes nothing more, so at Cut every frame of the epoch is
// in the plug (or already out). TestPlugCutIsExact checks it in a real
// kernel.
//
// Epochs. The kernel's plug counts frames in two epochs only: the current
// one and the last one closed by TCQ_PLUG_BUFFER; a second BUFFER before
// the TCQ_PLUG_RELEASE_ONE of the first overwrites the count of the last
// one, and a later RELEASE_ONE would then let out that many frames from the
// head of the queue: possibly frames of epochs not yet acknowledged. The
// agent pipelines epochs (it cuts the next before the standby acks the
// last), so Plug keeps this bookkeeping:
//
//   - Cut(n) sends BUFFER only when the kernel holds no closed epoch still
//     waiting for its ack (pending). Then epoch n is pending, exactly.
//   - Otherwise Cut(n) sends nothing: epoch n's frames stay in the kernel's
//     current epoch, merged with the frames of the epochs after it, and are
//     released with the first epoch cut by a later BUFFER (the first Cut after
//     the pending epoch's release), when that one is acknowledged.
//   - Release(n) sends RELEASE_ONE if the pending epoch is <= n.
//
// So output is never released before its epoch is acknowledged; with
// pipelining it is held longer: an epoch cut while another is pending
// waits for an epoch cut after that one's release. When acks come within one
// epoch interval (the usual case) nothing is merged and every epoch is exact.
// Plug reads the qdisc's counters at each Cut (the guest is paused, so they
// are exact), and knows how many bytes each epoch holds: an epoch that holds
// none is not pending, and costs no netlink message beyond that read.
//
// Limits. The plug holds at most MaxBytes; the kernel drops frames that
// come while it is full (Stats.DroppedFrames: the qdisc's drop counter);
// the guest's TCP retransmits them. Frame counts are the qdisc's packet
// counts: a GSO frame counts as its segments once it has left the plug.
// Stats.HeldFrames/HeldBytes are the qdisc's queue (qlen, backlog), which
// includes released frames the ifb has not yet taken. ReleaseP50/P99 are,
// per released epoch, the time from its Cut to its release.
//
// If the agent dies, the filter and the plug stay: the guest's output stays
// held (never leaked) until a new Plug on the same tap, which first removes
// the ifb and filter left behind, or until someone deletes them.
type Plug struct {
	nl       *nlConn
	tap, ifb string
	tapIndex int
	ifbIndex int
	prio     uint16 // of the redirect filter: one of plugFilterPrios
	opts     PlugOptions
	limit    uint32
	log      *slog.Logger

	mu         sync.Mutex
	handle     uint32 // the plug qdisc's handle (alternates when replaced)
	ownIngress bool   // NewPlug created the tap's ingress qdisc
	forwarding bool   // released indefinitely: frames pass as they come
	fwdStart   pos    // enqueued position where forwarding began
	pending    *plugSeg
	curStart   pos // start of the kernel's current epoch (the last BUFFER)
	mergedEnd  pos // end of the last epoch cut into the current one without a BUFFER
	relPos     pos // frames up to here are released or forwarded
	cutAny     bool
	lastCut    uint64
	lastRel    uint64
	lagged     bool // frames of a forwarding period were still queued at a BUFFER

	released, forwarded, discarded pos
	dropsBase                      uint64 // drops of replaced plug qdiscs
	lastStats                      qdiscStats
	lat                            *stats.Window

	closed   bool
	closeErr error
}

var _ Buffer = (*Plug)(nil)

// PlugOptions configure a Plug.
type PlugOptions struct {
	// IfbName names the ifb device (and, with a "b" added, the one a Plug
	// taking over uses). Default "ifb-<tap>", or "ifb-" and a hash of the
	// tap's name when that is longer than a link name allows.
	IfbName string
	// MaxBytes bounds the bytes the plug holds; frames that come while it
	// is full are dropped by the kernel and counted. Default 16 MiB.
	MaxBytes int64
	// HoldFromStart holds frames from creation on, as Options.HoldFromStart.
	HoldFromStart bool
	// Timeout bounds the waits for the ifb to take frames already released
	// (before a cut out of forwarding, before DiscardAfter replaces the
	// plug, and Close's drain after ReleaseAll). Default 10 s.
	Timeout time.Duration
	Logger  *slog.Logger
}

func (o PlugOptions) withDefaults(tap string) PlugOptions {
	if o.IfbName == "" {
		// One byte is left for the name's alternate (see ifbNames).
		o.IfbName = "ifb-" + tap
		if len(o.IfbName) > unix.IFNAMSIZ-2 {
			h := sha256.Sum256([]byte(tap))
			o.IfbName = "ifb-" + hex.EncodeToString(h[:])[:9]
		}
	}
	if o.MaxBytes <= 0 {
		o.MaxBytes = 16 << 20
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o
}

// ErrPlugUnsupported is wrapped by the errors of NewPlug and PlugSupported
// when the kernel lacks a feature (the message names the module).
var ErrPlugUnsupported = errors.New("kernel feature missing")

// plugFilterPrio is the prio of the redirect filter on the tap's ingress:
// first, so that no other filter passes a frame around the plug. A Plug
// taking over from a dead agent's puts its filter at the other prio of
// plugFilterPrios (and its ifb under the other name) before it removes the
// old one, so every frame always meets one of them.
const plugFilterPrio = 1

var plugFilterPrios = [2]uint16{1, 2}

// ifbNames are the two names a tap's ifb alternates between, one per prio.
func ifbNames(base string) [2]string { return [2]string{base, base + "b"} }

// pos is a position in the stream of frames the plug qdisc has enqueued
// since it was created: enqueued = dequeued + queued, from its counters.
type pos struct{ frames, bytes uint64 }

func (s qdiscStats) enq() pos {
	return pos{s.Packets + uint64(s.Qlen), s.Bytes + uint64(s.Backlog)}
}

func (p pos) sub(q pos) pos {
	if p.bytes < q.bytes || p.frames < q.frames {
		return pos{}
	}
	return pos{p.frames - q.frames, p.bytes - q.bytes}
}
func (p pos) add(q pos) pos { return pos{p.frames + q.frames, p.bytes + q.bytes} }

// plugSeg is the epoch the kernel holds as its last one.
type plugSeg struct {
	epoch      uint64
	start, end pos
	cutAt      time.Time
}

// step wraps a netlink error of one set-up step; feature names the kernel
// module whose absence the kernel reports with ENOENT/EOPNOTSUPP.
func step(what, feature string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%s: %w (needs CAP_NET_ADMIN: run as root)", what, err)
	}
	if feature != "" && noFeature(err) {
		return fmt.Errorf("%s: %w: %w: no %s in this kernel (modprobe %s)", what, err, ErrPlugUnsupported, feature, feature)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// NewPlug sets output commit up on the tap device tapName: see Plug. The
// calling thread's network namespace is the one used. A previous Plug's ifb
// and filter on the same tap (an agent that died) are removed first.
func NewPlug(ctx context.Context, tapName string, opts PlugOptions) (_ *Plug, err error) {
	opts = opts.withDefaults(tapName)
	p := &Plug{
		tap:    tapName,
		ifb:    opts.IfbName,
		opts:   opts,
		limit:  uint32(min(opts.MaxBytes, math.MaxUint32)),
		log:    opts.Logger.With("tap", tapName, "component", "outcommit-plug"),
		handle: 0x00010000,
		lat:    stats.NewWindow(8192),
	}
	wrap := func(e error) error { return fmt.Errorf("outcommit: plug on %s: %w", tapName, e) }
	if err := ctx.Err(); err != nil {
		return nil, wrap(err)
	}
	if len(p.ifb)+1 > unix.IFNAMSIZ-1 {
		return nil, wrap(fmt.Errorf("ifb name %q is longer than %d bytes", p.ifb, unix.IFNAMSIZ-2))
	}
	if p.nl, err = openNetlink(); err != nil {
		return nil, wrap(err)
	}
	defer func() {
		if err != nil {
			p.teardown()
			p.nl.Close()
		}
	}()
	if p.tapIndex, err = p.nl.linkIndex(tapName); err != nil {
		return nil, wrap(fmt.Errorf("no device %s: %w", tapName, err))
	}
	// Ours goes beside what a dead agent left: the other name and prio.
	names, other := ifbNames(opts.IfbName), 1
	p.ifb, p.prio = names[0], plugFilterPrios[0]
	if _, err := p.nl.linkIndex(names[0]); err == nil {
		p.ifb, p.prio, other = names[1], plugFilterPrios[1], 0
	}
	p.removeLeftover(p.ifb, p.prio) // an older generation still: it holds nothing the filter sends
	if err = step("create ifb "+p.ifb, "ifb", p.nl.addLink(p.ifb, "ifb")); err != nil {
		return nil, wrap(err)
	}
	if p.ifbIndex, err = p.nl.linkIndex(p.ifb); err != nil {
		return nil, wrap(err)
	}
	if err = step("set "+p.ifb+" up", "", p.nl.setLinkUp(p.ifbIndex)); err != nil {
		return nil, wrap(err)
	}
	if err = step("add plug qdisc on "+p.ifb, "sch_plug", p.nl.addPlug(p.ifbIndex, p.handle, p.limit, false)); err != nil {
		return nil, wrap(err)
	}
	if !opts.HoldFromStart {
		// A new plug holds; pass frames on until the first Cut.
		if err = step("release plug", "", p.nl.plugAction(p.ifbIndex, p.handle, tcqPlugReleaseIndefinite, p.limit)); err != nil {
			return nil, wrap(err)
		}
		p.forwarding = true
	}
	switch ierr := p.nl.addIngress(p.tapIndex); {
	case ierr == nil:
		p.ownIngress = true
	case errors.Is(ierr, unix.EEXIST):
		// An ingress or clsact qdisc is there: share it.
	default:
		return nil, wrap(step("add ingress qdisc on "+tapName, "sch_ingress", ierr))
	}
	if err = step(fmt.Sprintf("add redirect filter on %s to %s", tapName, p.ifb), "cls_matchall or act_mirred",
		p.nl.addRedirect(p.tapIndex, p.prio, p.ifbIndex)); err != nil {
		return nil, wrap(err)
	}
	// Now the dead agent's filter and plug can go: its frames, of epochs
	// never acknowledged, are dropped with its ifb.
	if n := p.removeLeftover(names[other], plugFilterPrios[other]); n > 0 {
		p.log.Warn("took over from the output-commit plug an earlier agent left (the guest's output was held or dropped while no agent ran)", "objects", n)
	}
	return p, nil
}

// removeLeftover removes a filter at prio on the tap and the ifb named ifb.
func (p *Plug) removeLeftover(ifb string, prio uint16) int {
	n := 0
	if p.nl.delFilter(p.tapIndex, prio) == nil {
		n++
	}
	if idx, err := p.nl.linkIndex(ifb); err == nil && p.nl.delLink(idx) == nil {
		n++
	}
	return n
}

// Detach lets go of the tap without removing the filter and the plug: the
// agent is stopping (an upgrade, a restart) and the guest's output must
// stay held. The next Plug on the tap takes over (see NewPlug).
func (p *Plug) Detach() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.closed = true
	p.nl.Close()
}

// teardown removes what NewPlug made; safe on a partial set-up.
func (p *Plug) teardown() error {
	var errs []error
	if p.tapIndex != 0 {
		var err error
		if p.ownIngress {
			err = p.nl.delIngress(p.tapIndex)
		} else {
			err = p.nl.delFilter(p.tapIndex, p.prio)
		}
		if err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("remove the redirect from %s: %w", p.tap, err))
		}
	}
	if p.ifbIndex != 0 {
		if err := p.nl.delLink(p.ifbIndex); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("delete %s: %w", p.ifb, err))
		}
	}
	return errors.Join(errs...)
}

// PlugSupported reports whether this kernel can run a Plug: it makes a
// scratch ifb with a plug qdisc, an ingress qdisc and a matchall/mirred
// filter, then deletes it. The error names what is missing (it wraps
// ErrPlugUnsupported then) or says that it needs CAP_NET_ADMIN.
func PlugSupported() error {
	nl, err := openNetlink()
	if err != nil {
		return err
	}
	defer nl.Close()
	name := fmt.Sprintf("rmrprobe%d", os.Getpid()%10000000)
	if err := step("create a scratch ifb", "ifb", nl.addLink(name, "ifb")); err != nil {
		return err
	}
	idx, err := nl.linkIndex(name)
	if err != nil {
		return err
	}
	defer nl.delLink(idx)
	if err := step("add a plug qdisc", "sch_plug", nl.addPlug(idx, 0x00010000, 1<<20, false)); err != nil {
		return err
	}
	if err := step("add an ingress qdisc", "sch_ingress", nl.addIngress(idx)); err != nil {
		return err
	}
	if err := step("add a matchall filter with mirred", "cls_matchall or act_mirred", nl.addRedirect(idx, plugFilterPrio, idx)); err != nil {
		return err
	}
	return nil
}

func (p *Plug) errf(format string, a ...any) error {
	return fmt.Errorf("outcommit: plug on %s: "+format, append([]any{p.tap}, a...)...)
}

// stats reads the plug's counters. Caller holds mu.
func (p *Plug) statsLocked() (qdiscStats, error) {
	s, err := p.nl.rootStats(p.ifbIndex)
	if err != nil {
		return s, p.errf("read plug counters: %w", err)
	}
	if s.Kind != "plug" || s.Handle != p.handle {
		return s, p.errf("the root qdisc of %s is %s %x:, not our plug %x: (removed by someone else?)", p.ifb, s.Kind, s.Handle>>16, p.handle>>16)
	}
	p.lastStats = s
	return s, nil
}

// waitDequeued waits (up to d) until the ifb has taken every frame up to
// target out of the plug; returns the last counters read.
func (p *Plug) waitDequeued(target pos, d time.Duration) (qdiscStats, bool, error) {
	deadline := time.Now().Add(d)
	for {
		s, err := p.statsLocked()
		if err != nil {
			return s, false, err
		}
		if s.Bytes >= target.bytes {
			return s, true, nil
		}
		if time.Now().After(deadline) {
			return s, false, nil
		}
		time.Sleep(200 * time.Microsecond)
	}
}

// drainTimeout bounds a wait for released frames to leave the plug; short
// when the kernel lags behind relPos (then they are not all released).
func (p *Plug) drainTimeout() time.Duration {
	if p.lagged {
		return min(p.opts.Timeout, 500*time.Millisecond)
	}
	return p.opts.Timeout
}

// Cut closes the current epoch (see Buffer and Plug). Called while the
// guest is paused: one netlink read of the counters, and a BUFFER when the
// kernel has no pending epoch.
func (p *Plug) Cut(epoch uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return p.errf("Cut(%d) after Close", epoch)
	}
	if p.cutAny && epoch <= p.lastCut {
		return p.errf("Cut(%d) after Cut(%d): epochs must increase", epoch, p.lastCut)
	}
	s, err := p.statsLocked()
	if err != nil {
		return err
	}
	now := time.Now()
	end := s.enq()
	if p.forwarding {
		// Out of forwarding, BUFFER makes the kernel hold what is queued,
		// uncounted: frames released indefinitely that the ifb has not
		// taken yet (it takes 32 at a time). Let them go first.
		if s.Qlen > 0 {
			var ok bool
			if s, ok, err = p.waitDequeued(end, min(p.opts.Timeout, 100*time.Millisecond)); err != nil {
				return err
			} else if !ok && !p.lagged {
				// Safe: the kernel releases by count from the head, so
				// every later release lets out that many fewer frames of
				// its own epoch (held longer) until ReleaseAll.
				p.lagged = true
				p.log.Warn("frames released before a cut were still queued at it; later epochs are held longer", "frames", s.Qlen)
			}
		}
		if err := p.nl.plugAction(p.ifbIndex, p.handle, tcqPlugBuffer, p.limit); err != nil {
			return p.errf("Cut(%d): plug buffer: %w", epoch, err)
		}
		p.forwarded = p.forwarded.add(end.sub(p.fwdStart))
		p.relPos = end
		p.curStart = end
		p.mergedEnd = end
		p.forwarding = false
		p.pending = nil
	} else {
		held := end.sub(p.curStart)
		switch {
		case p.pending != nil && p.pending.end.bytes > p.pending.start.bytes:
			// The kernel's last epoch waits for its ack: merge this one
			// into the current epoch (see Plug).
			p.mergedEnd = end
		case held.bytes == 0:
			// Nothing to hold: the kernel's counts stay right without a
			// BUFFER (its last and current epochs are empty).
		default:
			if err := p.nl.plugAction(p.ifbIndex, p.handle, tcqPlugBuffer, p.limit); err != nil {
				return p.errf("Cut(%d): plug buffer: %w", epoch, err)
			}
			p.pending = &plugSeg{epoch: epoch, start: p.curStart, end: end, cutAt: now}
			p.curStart = end
			p.mergedEnd = end
		}
	}
	p.cutAny = true
	p.lastCut = epoch
	return nil
}

// Release lets the kernel send on the held frames of epochs <= epoch that
// it can tell apart: the pending epoch, when it is <= epoch. Frames of
// epochs merged behind it wait for a later release (see Plug). Release
// returns once the kernel has been told; the ifb sends the frames on
// asynchronously, within microseconds.
func (p *Plug) Release(epoch uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return p.errf("Release(%d) after Close", epoch)
	}
	seg := p.pending
	if seg == nil || seg.epoch > epoch {
		return nil
	}
	if err := p.nl.plugAction(p.ifbIndex, p.handle, tcqPlugReleaseOne, p.limit); err != nil {
		return p.errf("Release(%d): plug release_one: %w", epoch, err)
	}
	p.pending = nil
	p.released = p.released.add(seg.end.sub(seg.start))
	p.relPos = seg.end
	p.lastRel = seg.epoch
	p.lat.Add(time.Since(seg.cutAt))
	return nil
}

// ReleaseAll sends on every held frame and passes frames on as they come
// until the next Cut (as Redirector.ReleaseAll): TCQ_PLUG_RELEASE_INDEFINITE.
func (p *Plug) ReleaseAll() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return p.errf("ReleaseAll after Close")
	}
	if p.forwarding {
		return nil
	}
	s, err := p.statsLocked()
	if err != nil {
		return err
	}
	if err := p.nl.plugAction(p.ifbIndex, p.handle, tcqPlugReleaseIndefinite, p.limit); err != nil {
		return p.errf("ReleaseAll: plug release_indefinite: %w", err)
	}
	end := s.enq()
	p.released = p.released.add(end.sub(p.relPos))
	if p.cutAny {
		p.lastRel = p.lastCut // what was held counts as released under the last cut
	}
	p.relPos = end
	p.fwdStart = end
	p.pending = nil
	p.forwarding = true
	p.lagged = false
	return nil
}

// DiscardAfter drops the frames of epochs > epoch and of the open epoch.
// The plug is one FIFO: the only way to drop its tail is to replace the
// qdisc, which drops all it holds, so held frames of epochs <= epoch go too
// (counted as discarded; dropping is safe, the guest's TCP resends). Frames
// already released are let out first (up to Timeout). Frames the guest
// sends while the plug is swapped may be dropped by the kernel. Nothing
// happens while frames are passed on (forwarding).
func (p *Plug) DiscardAfter(epoch uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.forwarding {
		return
	}
	s, ok, err := p.waitDequeued(p.relPos, p.drainTimeout())
	if err != nil {
		p.log.Warn("DiscardAfter: reading the plug failed; replacing it anyway", "err", err)
	} else if !ok {
		p.log.Warn("DiscardAfter: released frames still queued after the timeout; dropping them", "frames", s.Qlen)
	}
	next := uint32(0x00020000)
	if p.handle == next {
		next = 0x00010000
	}
	if err := p.nl.addPlug(p.ifbIndex, next, p.limit, true); err != nil {
		p.log.Error("DiscardAfter: replacing the plug failed; the frames stay held", "err", err)
		return
	}
	p.handle = next
	p.discarded = p.discarded.add(pos{uint64(s.Qlen), uint64(s.Backlog)})
	p.dropsBase += uint64(s.Drops)
	p.pending = nil
	p.curStart, p.mergedEnd, p.relPos, p.fwdStart = pos{}, pos{}, pos{}, pos{}
	p.lagged = false
	if p.cutAny && p.lastCut > epoch {
		p.lastCut = epoch
	}
}

// Stats returns the counters (one netlink read; on error, the last read).
func (p *Plug) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.lastStats
	if !p.closed {
		if fresh, err := p.statsLocked(); err == nil {
			s = fresh
		}
	}
	end := s.enq()
	st := Stats{
		LastCut:         p.lastCut,
		LastReleased:    p.lastRel,
		ReleasedFrames:  p.released.frames,
		ReleasedBytes:   p.released.bytes,
		ForwardedFrames: p.forwarded.frames,
		ForwardedBytes:  p.forwarded.bytes,
		DroppedFrames:   p.dropsBase + uint64(s.Drops),
		DiscardedFrames: p.discarded.frames,
		DiscardedBytes:  p.discarded.bytes,
	}
	if !p.closed {
		st.HeldFrames, st.HeldBytes = int(s.Qlen), int64(s.Backlog)
		if p.forwarding {
			f := end.sub(p.fwdStart)
			st.ForwardedFrames += f.frames
			st.ForwardedBytes += f.bytes
		} else {
			st.OpenFrames = int(end.sub(p.mergedEnd).frames)
		}
	}
	lat := p.lat.Samples()
	st.ReleaseP50, st.ReleaseP99, st.LatencySamples = stats.Percentile(lat, 50), stats.Percentile(lat, 99), len(lat)
	return st
}

// Close removes the filter (the guest's frames go their way directly
// again), then the ifb with the plug. Frames still held are dropped
// (Stats.DiscardedFrames) unless ReleaseAll was called before: then Close
// waits (up to Timeout) until the ifb has taken them, and nothing is lost
// (frames sent while Close runs may overtake them; close while the guest is
// paused for strict order). Calling it again returns the first result.
func (p *Plug) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return p.closeErr
	}
	p.closed = true
	var errs []error
	// 1. Direct flow: no more frames into the plug.
	var err error
	if p.ownIngress {
		err = p.nl.delIngress(p.tapIndex)
	} else {
		err = p.nl.delFilter(p.tapIndex, p.prio)
	}
	if err != nil && !isNotExist(err) {
		errs = append(errs, fmt.Errorf("remove the redirect from %s: %w", p.tap, err))
	}
	// 2. Let what was released out, count what was held.
	s, serr := p.nl.rootStats(p.ifbIndex)
	if serr == nil && s.Kind == "plug" {
		if !p.forwarding {
			s, _, _ = p.waitDequeued(p.relPos, p.drainTimeout())
		} else {
			s, _, _ = p.waitDequeued(s.enq(), p.opts.Timeout)
			f := s.enq().sub(p.fwdStart)
			p.forwarded = p.forwarded.add(f)
		}
		p.lastStats = s
		p.discarded = p.discarded.add(pos{uint64(s.Qlen), uint64(s.Backlog)})
	}
	// 3. The ifb, and its plug with it.
	if err := p.nl.delLink(p.ifbIndex); err != nil && !isNotExist(err) {
		errs = append(errs, fmt.Errorf("delete %s: %w", p.ifb, err))
	}
	p.nl.Close()
	if len(errs) > 0 {
		p.closeErr = p.errf("Close: %w", errors.Join(errs...))
	}
	return p.closeErr
}
