//go:build linux

package outcommit

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"

	"github.com/remora-ha/remora/internal/stats"
	"github.com/remora-ha/remora/internal/unixsock"
	"github.com/remora-ha/remora/migrate/qemu"
)

// Redirector is the QEMU backend of Buffer: no kernel feature needed.
//
// Set-up (NewRedirector), on the guest's netdev (the tap, "hostnet0" under
// libvirt):
//
//   - the agent listens on two unix sockets in dir; QMP chardev-add adds two
//     socket chardevs in client mode, so QEMU connects to them ("out" and
//     "in");
//   - a filter-redirector "release" with indev=<in>, queue rx, position head:
//     frames the agent writes to the in socket continue to the tap;
//   - a filter-redirector "capture" with outdev=<out>, queue rx, inserted
//     behind the release filter: every frame the guest sends is written to
//     the out socket instead of going to the tap.
//
// queue rx, not tx: in QEMU a netdev's filters see the frames the NIC sends
// to the netdev on its receive queue (rx), and walk them from the tail of
// the filter list to the head. The capture filter is therefore passed
// first; the release filter, nearer the head, hands what it reads to the
// filter before it (none), and so to the tap: released frames are not
// captured again. Both filters use vnet_hdr_support, so the stream is per
// frame be32 length, be32 virtio-net header length, frame (header
// included), and released records are written back byte for byte.
//
// The exact cut: the capture filter writes each frame to its chardev
// completely, synchronously, in QEMU's main loop, before the frame's send
// returns; after QMP stop returns, the NIC sends nothing more (virtio-net's
// transmit bottom half does nothing while the VM is stopped; frames still in
// the ring are sent after cont, in the next epoch, and a standby restored
// from this epoch sends them itself). So when Cut runs, every frame of the epoch is
// in the out socket's receive queue or already read. Cut takes, under the
// lock the reader holds around each read, the bytes read so far plus the
// bytes queued on the socket (ioctl SIOCINQ): that stream offset is the
// epoch's end. The reader may lag: frames are given to epochs by their
// offset when they are parsed, and Release waits for the reader to pass the
// cut. Cut costs one ioctl and does not wait.
//
// If the agent dies, the capture filter keeps taking the guest's frames
// and its writes fail: output is dropped, never leaked, until a new
// Redirector (which first removes stale objects of a previous one) or QEMU
// ends. While the agent lives it must keep reading: QEMU writes to the out
// socket blocking, so a full socket would stall QEMU's main loop. The
// reader goroutine only copies frames into memory (bounded by MaxBytes);
// on a corrupt stream it closes the socket rather than stop reading it.
type Redirector struct {
	mon    qmp.Monitor
	guest  string
	opts   Options
	log    *slog.Logger
	ids    objectIDs
	out    *net.UnixConn // QEMU writes captured frames here
	in     *net.UnixConn // the agent writes released frames here
	outRaw syscall.RawConn
	inRaw  syscall.RawConn

	mu       sync.Mutex
	cond     *sync.Cond
	q        *queue
	p        parser
	consumed int64 // bytes read from out
	readErr  error // the reader stopped (EOF, error, corrupt stream)
	written  uint64
	writeErr error
	lat      *stats.Window
	closing  bool // Close has begun
	stopping bool // the writer may exit once out is empty
	closed   bool
	closeErr error

	wg sync.WaitGroup

	onCapture func(record) // tests: every parsed record, in stream order, under mu

	waiting chan struct{} // a frame is held in the open epoch (see Waiting)
}

var _ Buffer = (*Redirector)(nil)

// Options configure a Redirector.
type Options struct {
	// Netdev is the id of the guest's network backend the filters attach
	// to. Default "hostnet0" (libvirt's name for the first interface).
	Netdev string
	// MaxBytes bounds the frame bytes held; frames that come while it is
	// reached are dropped (and counted). Default 16 MiB.
	MaxBytes int64
	// HoldFromStart holds frames from creation on, in the epoch that the
	// first Cut closes. By default frames are passed on until the first Cut:
	// before an epoch has been acknowledged the standby has nothing to fail
	// over to, so that output need not wait.
	HoldFromStart bool
	// Timeout bounds QEMU connecting to the sockets, Release waiting for
	// the reader to pass the cut and for its frames to be written, and
	// Close's drain. Default 10 s.
	Timeout time.Duration
	Logger  *slog.Logger
	// PeerPID names QEMU's process: no other process may take the place
	// of its chardevs on the sockets (NewRedirector sets the guest's).
	PeerPID func() (int, error)
}

func (o Options) withDefaults() Options {
	if o.Netdev == "" {
		o.Netdev = "hostnet0"
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

// QEMU object ids; one Redirector per guest (QEMU process).
type objectIDs struct {
	chrOut, chrIn, capture, release string
}

// objectPrefix starts the id of every QEMU object a Redirector adds.
const objectPrefix = "remora-oc-"

// newObjectIDs names one Redirector's objects apart from those of an
// earlier one, which may still be in QEMU when this one starts.
func newObjectIDs() objectIDs {
	var b [4]byte
	_, _ = rand.Read(b[:])
	sfx := hex.EncodeToString(b[:])
	return objectIDs{
		chrOut:  objectPrefix + "out-" + sfx,
		chrIn:   objectPrefix + "in-" + sfx,
		capture: objectPrefix + "capture-" + sfx,
		release: objectPrefix + "release-" + sfx,
	}
}

// NewRedirector sets output commit up on guest g: see Redirector. dir is
// where the agent's two sockets are created (it is created if missing; the
// sockets are removed once QEMU has connected). Objects a previous
// Redirector left in QEMU (an agent that died, or stopped with Detach) are
// taken over without a gap: this one's capture filter is in place before
// theirs goes, so no frame of the guest ever reaches the tap unheld.
func NewRedirector(ctx context.Context, g *qemu.Guest, dir string, opts Options) (*Redirector, error) {
	if opts.PeerPID == nil {
		opts.PeerPID = g.PID
	}
	return newRedirector(ctx, g.Mon, g.Name, dir, opts)
}

func newRedirector(ctx context.Context, mon qmp.Monitor, guest, dir string, opts Options) (_ *Redirector, err error) {
	opts = opts.withDefaults()
	r := &Redirector{
		mon:   mon,
		guest: guest,
		opts:  opts,
		log:   opts.Logger.With("guest", guest, "component", "outcommit"),
		ids:   newObjectIDs(),
		q:     newQueue(opts.MaxBytes, opts.HoldFromStart),
		p:     parser{vnetHdr: true},
		lat:   stats.NewWindow(8192),

		waiting: make(chan struct{}, 1),
	}
	r.cond = sync.NewCond(&r.mu)

	stale, err := staleObjects(ctx, mon)
	if err != nil {
		return nil, fmt.Errorf("outcommit: guest %s: list QEMU's objects: %w", guest, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("outcommit: guest %s: %w", guest, err)
	}
	outPath := filepath.Join(dir, guest+".oc-out.sock")
	inPath := filepath.Join(dir, guest+".oc-in.sock")
	if len(outPath) > unixsock.MaxPath {
		return nil, fmt.Errorf("outcommit: guest %s: socket path %s is longer than a unix socket address allows (%d bytes): use a shorter directory", guest, outPath, unixsock.MaxPath)
	}

	deadline := time.Now().Add(opts.Timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	defer func() {
		if err != nil {
			r.teardown(false)
		}
	}()
	if r.out, err = r.connect(ctx, outPath, r.ids.chrOut, deadline); err != nil {
		return nil, err
	}
	if r.in, err = r.connect(ctx, inPath, r.ids.chrIn, deadline); err != nil {
		return nil, err
	}
	if r.outRaw, err = r.out.SyscallConn(); err != nil {
		return nil, err
	}
	if r.inRaw, err = r.in.SyscallConn(); err != nil {
		return nil, err
	}

	// Release filter first, at the head (nearest the tap), so that there
	// is never a capture without a way back and released frames pass no
	// other filter; the capture filter at the tail, so it takes the guest's
	// frames before any an earlier agent left.
	if err = qemu.AddFilterRedirector(ctx, mon, qemu.FilterRedirector{
		ID: r.ids.release, Netdev: opts.Netdev, Queue: "rx", Indev: r.ids.chrIn,
		Position: "head", VnetHdr: true,
	}); err != nil {
		return nil, r.filterError(ctx, err)
	}
	r.wg.Add(2)
	go r.readLoop()
	go r.writeLoop()
	if err = qemu.AddFilterRedirector(ctx, mon, qemu.FilterRedirector{
		ID: r.ids.capture, Netdev: opts.Netdev, Queue: "rx", Outdev: r.ids.chrOut,
		Position: "tail", VnetHdr: true,
	}); err != nil {
		return nil, r.filterError(ctx, err)
	}
	if n := removeObjects(ctx, mon, stale); n > 0 {
		r.log.Warn("took over from output-commit objects an earlier agent left in QEMU (the guest's output was dropped while no agent ran)", "objects", n)
	}
	return r, nil
}

// qemuObjects are a Redirector's objects found in QEMU.
type qemuObjects struct {
	captures, releases, chardevs []string
}

// staleObjects finds the objects earlier Redirectors left in QEMU.
func staleObjects(ctx context.Context, mon qmp.Monitor) (qemuObjects, error) {
	var o qemuObjects
	var objs []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := qemu.Exec(ctx, mon, "qom-list", map[string]string{"path": "/objects"}, &objs); err != nil {
		return o, err
	}
	for _, ob := range objs {
		switch {
		case !strings.HasPrefix(ob.Name, objectPrefix):
		case strings.HasPrefix(ob.Name, objectPrefix+"capture"):
			o.captures = append(o.captures, ob.Name)
		default:
			o.releases = append(o.releases, ob.Name)
		}
	}
	var chrs []struct {
		Label string `json:"label"`
	}
	if err := qemu.Exec(ctx, mon, "query-chardev", nil, &chrs); err != nil {
		return o, err
	}
	for _, c := range chrs {
		if strings.HasPrefix(c.Label, objectPrefix) {
			o.chardevs = append(o.chardevs, c.Label)
		}
	}
	return o, nil
}

// removeObjects removes o from QEMU, captures first (the new capture is in
// place), and returns how many it removed.
func removeObjects(ctx context.Context, mon qmp.Monitor, o qemuObjects) int {
	n := 0
	for _, id := range append(o.captures, o.releases...) {
		if qemu.DeleteObject(ctx, mon, id) == nil {
			n++
		}
	}
	for _, id := range o.chardevs {
		if qemu.RemoveChardev(ctx, mon, id) == nil {
			n++
		}
	}
	return n
}

// connect listens on path, has QEMU connect a chardev to it and accepts.
func (r *Redirector) connect(ctx context.Context, path, id string, deadline time.Time) (*net.UnixConn, error) {
	ln, err := unixsock.Listen(path, 0o666) // QEMU may run as another user
	if err != nil {
		return nil, fmt.Errorf("outcommit: guest %s: %w", r.guest, err)
	}
	defer ln.Close() // also removes the socket file: QEMU does not reconnect
	if err := qemu.AddSocketChardev(ctx, r.mon, id, path); err != nil {
		return nil, fmt.Errorf("outcommit: guest %s: QEMU chardev %s to %s: %w", r.guest, id, path, err)
	}
	_ = ln.SetDeadline(deadline)
	accept := ln.AcceptUnix
	var peer *unixsock.PeerListener
	if r.opts.PeerPID != nil {
		peer = &unixsock.PeerListener{UnixListener: ln, PID: r.opts.PeerPID}
		accept = peer.AcceptUnix
	}
	c, err := accept()
	if err != nil {
		return nil, fmt.Errorf("outcommit: guest %s: QEMU did not connect chardev %s to %s: %w", r.guest, id, path, err)
	}
	if peer != nil && peer.Refused() > 0 {
		r.opts.Logger.Warn("outcommit: closed connections of processes other than QEMU", "guest", r.guest, "socket", path, "refused", peer.Refused())
	}
	return c, nil
}

// filterError explains an object-add failure.
func (r *Redirector) filterError(ctx context.Context, err error) error {
	msg := fmt.Sprintf("outcommit: guest %s: add filter-redirector on netdev %q: %v", r.guest, r.opts.Netdev, err)
	var qe *qemu.QMPError
	if errors.As(err, &qe) {
		switch {
		case strings.Contains(qe.Desc, "netdev"):
			nics, lerr := qemu.ListNICs(ctx, r.mon)
			switch {
			case lerr != nil:
				msg += fmt.Sprintf(" (listing the guest's NICs failed too: %v)", lerr)
			case len(nics) == 0:
				msg += ": the guest has no network device"
			default:
				var s []string
				for _, n := range nics {
					s = append(s, n.String())
				}
				msg += ": no such netdev; the guest's NICs: " + strings.Join(s, ", ") + " (set Options.Netdev)"
			}
		case strings.Contains(qe.Desc, "Vhost"):
			msg += ": QEMU filters need the NIC's userspace datapath; use <driver name='qemu'/> in the interface's XML"
		case strings.Contains(qe.Desc, "multiqueue"):
			msg += ": filters need a single-queue NIC"
		}
	}
	return errors.New(msg)
}

// readLoop reads the capture stream into the queue.
func (r *Redirector) readLoop() {
	defer r.wg.Done()
	buf := make([]byte, 256<<10)
	for {
		var n int
		var rerr error
		err := r.outRaw.Read(func(fd uintptr) bool {
			r.mu.Lock()
			defer r.mu.Unlock()
			n, rerr = unix.Read(int(fd), buf)
			if rerr == unix.EAGAIN || rerr == unix.EINTR {
				return false
			}
			if n <= 0 {
				return true
			}
			now := time.Now()
			perr := r.p.feed(buf[:n], func(rec record) {
				if r.onCapture != nil {
					r.onCapture(rec)
				}
				r.q.add(rec, now)
			})
			r.consumed += int64(n)
			if perr != nil {
				rerr = perr
			}
			if r.q.openFrames() > 0 {
				select {
				case r.waiting <- struct{}{}:
				default:
				}
			}
			r.cond.Broadcast()
			return true
		})
		if err == nil && rerr == nil && n == 0 {
			err = io.EOF
		}
		if err == nil {
			err = rerr
		}
		if err != nil {
			r.mu.Lock()
			if r.closing && (errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)) {
				r.readErr = net.ErrClosed
			} else if errors.Is(err, io.EOF) {
				r.readErr = fmt.Errorf("outcommit: guest %s: QEMU closed the capture socket (QEMU exited or the chardev was removed)", r.guest)
			} else {
				r.readErr = fmt.Errorf("outcommit: guest %s: reading captured frames: %w", r.guest, err)
			}
			closing := r.closing
			r.cond.Broadcast()
			r.mu.Unlock()
			if !closing {
				r.log.Error("output commit capture stopped", "err", r.readErr)
				// Nobody reads the socket any more: close it, or QEMU would
				// block writing the next frames into a full socket (and its
				// main loop with it). The capture filter then drops the
				// guest's frames; output is lost, never leaked.
				r.out.Close()
			}
			return
		}
	}
}

// writeLoop writes released and forwarded frames to QEMU, in order.
func (r *Redirector) writeLoop() {
	defer r.wg.Done()
	for {
		r.mu.Lock()
		for len(r.q.out) == 0 && !r.stopping {
			r.cond.Wait()
		}
		if len(r.q.out) == 0 {
			r.mu.Unlock()
			return
		}
		batch := r.q.takeOut()
		failed := r.writeErr != nil
		r.mu.Unlock()

		var err error
		if !failed {
			bufs := make(net.Buffers, len(batch))
			for i, f := range batch {
				bufs[i] = f.rec.raw
			}
			_ = r.in.SetWriteDeadline(time.Now().Add(r.opts.Timeout))
			_, err = bufs.WriteTo(r.in)
		}
		now := time.Now()
		r.mu.Lock()
		if err != nil && r.writeErr == nil {
			r.writeErr = fmt.Errorf("outcommit: guest %s: writing released frames to QEMU: %w", r.guest, err)
			r.log.Error("output commit release failed", "err", err)
		}
		if !failed && err == nil {
			for _, f := range batch {
				r.lat.Add(now.Sub(f.at))
			}
		}
		r.written += uint64(len(batch))
		r.cond.Broadcast()
		r.mu.Unlock()
	}
}

// waitLocked waits (r.mu held) until done() or the deadline.
func (r *Redirector) waitLocked(deadline time.Time, done func() bool) bool {
	if done() {
		return true
	}
	t := time.AfterFunc(time.Until(deadline), func() {
		r.mu.Lock()
		r.cond.Broadcast()
		r.mu.Unlock()
	})
	defer t.Stop()
	for !done() {
		if !time.Now().Before(deadline) {
			return false
		}
		r.cond.Wait()
	}
	return true
}

// position is the capture stream's end now: bytes read plus bytes queued
// on the socket (r.mu held, so the reader is not inside a read).
func (r *Redirector) positionLocked() (int64, error) {
	var inq int
	var ierr error
	err := r.outRaw.Control(func(fd uintptr) {
		inq, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	})
	if err == nil {
		err = ierr
	}
	if err != nil {
		return r.consumed, fmt.Errorf("outcommit: guest %s: SIOCINQ on the capture socket: %w", r.guest, err)
	}
	return r.consumed + int64(inq), nil
}

// Cut closes the current epoch (see Buffer). It must be called while the
// guest is paused, after QMP stop returned: it takes the capture stream's
// position at that moment as the end of epoch, without waiting.
func (r *Redirector) Cut(epoch uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return fmt.Errorf("outcommit: guest %s: Cut(%d) after Close", r.guest, epoch)
	}
	if r.readErr != nil {
		return r.readErr
	}
	pos, err := r.positionLocked()
	if err != nil {
		return err
	}
	r.q.gc(r.consumed)
	if err := r.q.cut(epoch, pos); err != nil {
		return err
	}
	// What was waiting is in the epoch just cut.
	select {
	case <-r.waiting:
	default:
	}
	return nil
}

// Waiting receives a value (at most one is pending) when a frame the
// guest sent is held in the open epoch: a checkpoint now would let it out
// sooner than the next tick. A Cut takes back the one pending.
func (r *Redirector) Waiting() <-chan struct{} { return r.waiting }

// Release sends on every held frame of epochs <= epoch, in order, and
// returns once they are written to QEMU. It waits (up to Options.Timeout)
// for the reader to pass the epoch's cut.
func (r *Redirector) Release(epoch uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return fmt.Errorf("outcommit: guest %s: Release(%d) after Close", r.guest, epoch)
	}
	target, ok := r.q.releaseTarget(epoch)
	if !ok {
		return r.writeErr
	}
	return r.releaseToLocked(target, fmt.Sprintf("Release(%d)", epoch))
}

func (r *Redirector) releaseToLocked(target int64, what string) error {
	deadline := time.Now().Add(r.opts.Timeout)
	if !r.waitLocked(deadline, func() bool { return r.consumed >= target || r.readErr != nil }) {
		return fmt.Errorf("outcommit: guest %s: %s: the capture reader did not reach the cut (at %d, reader at %d) within %v",
			r.guest, what, target, r.consumed, r.opts.Timeout)
	}
	if r.consumed < target {
		return fmt.Errorf("outcommit: guest %s: %s: %w", r.guest, what, r.readErr)
	}
	r.q.popTo(target)
	r.cond.Broadcast()
	seq := r.q.releasedFrames + r.q.forwardedFrames
	if !r.waitLocked(deadline, func() bool { return r.written >= seq }) {
		return fmt.Errorf("outcommit: guest %s: %s: writing the frames to QEMU took longer than %v", r.guest, what, r.opts.Timeout)
	}
	return r.writeErr
}

// ReleaseAll sends on every held frame, of cut epochs and of the open one,
// and from then on passes frames on as they come (nothing is held) until
// the next Cut, which starts holding again. Use it to stop protecting
// without losing output (ReleaseAll, then Close), or while the standby is
// gone.
func (r *Redirector) ReleaseAll() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return fmt.Errorf("outcommit: guest %s: ReleaseAll after Close", r.guest)
	}
	pos, err := r.positionLocked()
	if err != nil && r.readErr == nil {
		return err
	}
	target := r.q.releaseAllTarget(pos)
	return r.releaseToLocked(target, "ReleaseAll")
}

// DiscardAfter drops the held frames of epochs > epoch and of the open
// epoch: everything the guest sent after epoch's cut up to now. Frames sent
// from now on belong to a new open epoch, and the next Cut may reuse epoch
// numbers above epoch.
func (r *Redirector) DiscardAfter(epoch uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return // Close dropped everything held
	}
	pos, err := r.positionLocked()
	if err != nil {
		r.log.Warn("DiscardAfter: capture stream position unknown; discarding what was read", "err", err)
	}
	r.q.discardAfter(epoch, pos)
}

// Stats returns the counters.
func (r *Redirector) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	q := r.q
	s := Stats{
		LastCut:          q.lastCut,
		LastReleased:     q.lastReleased,
		HeldFrames:       q.heldFrames,
		HeldBytes:        q.heldBytes,
		OpenFrames:       q.openFrames(),
		ReleasedFrames:   q.releasedFrames,
		ReleasedBytes:    q.releasedBytes,
		ForwardedFrames:  q.forwardedFrames,
		ForwardedBytes:   q.forwardedBytes,
		DroppedFrames:    q.droppedFrames,
		DroppedBytes:     q.droppedBytes,
		DiscardedFrames:  q.discardedFrames,
		DiscardedBytes:   q.discardedBytes,
		MisalignedFrames: q.misalignedFrames,
	}
	lat := r.lat.Samples()
	s.ReleaseP50, s.ReleaseP99, s.LatencySamples = stats.Percentile(lat, 50), stats.Percentile(lat, 99), len(lat)
	return s
}

// Close removes the filters and chardevs: the guest's output goes to the
// tap directly again. Frames still held are dropped (Stats.DiscardedFrames)
// unless ReleaseAll was called before: then the capture filter is removed
// first, the frames it captured until then are passed on, and nothing is
// lost (frames the guest sends while Close runs may overtake the last
// captured ones; call Close while the guest is paused for strict order).
// Close waits (up to Options.Timeout) until QEMU has read what was
// written to it. It is safe when QEMU is gone (then it only closes the
// sockets), and calling it again returns the first result.
func (r *Redirector) Close() error {
	r.mu.Lock()
	if r.closed {
		err := r.closeErr
		r.mu.Unlock()
		return err
	}
	r.closed = true
	r.mu.Unlock()
	err := r.teardown(true)
	r.mu.Lock()
	r.closeErr = err
	r.mu.Unlock()
	return err
}

// Detach lets go of the guest without removing the filters: the agent is
// stopping (an upgrade, a restart) and the guest's output must stay held.
// QEMU's capture filter keeps taking the guest's frames and drops them
// (its chardev has no reader) until the next Redirector takes over; held
// frames, of epochs the standby may not have, are dropped too.
func (r *Redirector) Detach() {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return
	}
	r.closed, r.closing, r.stopping = true, true, true
	r.q.dropAll()
	r.cond.Broadcast()
	r.mu.Unlock()
	r.out.Close()
	r.in.Close()
	r.wg.Wait()
}

// teardown undoes NewRedirector; drain says whether the sockets carry a
// stream worth finishing.
func (r *Redirector) teardown(drain bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), r.opts.Timeout)
	defer cancel()
	var errs []error
	gone := false
	qmpDo := func(what string, err error) {
		if err == nil || gone || qemu.IsNotFound(err) {
			return
		}
		if _, serr := qemu.Status(ctx, r.mon); serr != nil {
			gone = true // QEMU (or the domain) is gone, and the objects with it
			return
		}
		errs = append(errs, fmt.Errorf("outcommit: guest %s: %s: %w", r.guest, what, err))
	}

	// 1. Stop capturing: from here on the guest's frames go to the tap.
	qmpDo("remove capture filter", qemu.DeleteObject(ctx, r.mon, r.ids.capture))

	if drain && r.outRaw != nil && !gone {
		r.mu.Lock()
		deadline := time.Now().Add(r.opts.Timeout)
		forwarding := r.q.openSeg().kind == segForward
		if pos, err := r.positionLocked(); err == nil && forwarding {
			// 2. Pass on what was captured before the filter went away.
			if !r.waitLocked(deadline, func() bool { return r.consumed >= pos || r.readErr != nil }) {
				errs = append(errs, fmt.Errorf("outcommit: guest %s: Close: captured frames not read within %v", r.guest, r.opts.Timeout))
			}
			r.q.popTo(r.consumed)
			seq := r.q.releasedFrames + r.q.forwardedFrames
			r.cond.Broadcast()
			r.waitLocked(deadline, func() bool { return r.written >= seq })
		}
		r.closing = true
		r.q.dropAll()
		r.mu.Unlock()
		// 3. Let QEMU read everything written to it before the release
		// filter goes.
		for r.inRaw != nil && time.Now().Before(deadline) {
			var outq int
			var ierr error
			if err := r.inRaw.Control(func(fd uintptr) { outq, ierr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) }); err != nil || ierr != nil || outq == 0 {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	r.mu.Lock()
	r.closing = true
	r.q.dropAll()
	r.stopping = true
	r.cond.Broadcast()
	r.mu.Unlock()

	// 4. Remove the release filter and the chardevs.
	qmpDo("remove release filter", qemu.DeleteObject(ctx, r.mon, r.ids.release))
	qmpDo("remove chardev "+r.ids.chrOut, qemu.RemoveChardev(ctx, r.mon, r.ids.chrOut))
	qmpDo("remove chardev "+r.ids.chrIn, qemu.RemoveChardev(ctx, r.mon, r.ids.chrIn))

	if r.out != nil {
		r.out.Close()
	}
	if r.in != nil {
		r.in.Close()
	}
	r.wg.Wait()
	return errors.Join(errs...)
}
