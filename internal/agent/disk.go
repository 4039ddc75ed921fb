package agent

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/checkpoint/disk"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/unixsock"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
)

// notSentLowat bounds what waits unsent in the kernel for the checkpoint
// stream (TCP_NOTSENT_LOWAT): a write returns only once it is nearly on
// the wire, so an epoch's end is stamped (Primary's ack window) when it is
// about to go out, not seconds early behind a send buffer autotuned to
// megabytes on a slow link. Bytes in flight are not limited. The disk
// relays gain nothing from it and keep the kernel's default: with it,
// QEMU 7.2 once crashed (heap corruption) as a full standby disk failed a
// resync (CI campaign).
const notSentLowat = 16 << 10

// dialCheckpoints connects the checkpoint stream to the standby's
// replication port (dialAgent, with notSentLowat).
func (a *Agent) dialCheckpoints(ctx context.Context, peer string) (net.Conn, error) {
	return a.dial(ctx, peer, func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, notSentLowat)
		}); err != nil {
			return err
		}
		return serr
	})
}

// dialAgent connects to another agent's replication port, over mutual
// TLS when configured.
func (a *Agent) dialAgent(ctx context.Context, peer string) (net.Conn, error) {
	return a.dial(ctx, peer, nil)
}

func (a *Agent) dial(ctx context.Context, peer string, control func(network, address string, c syscall.RawConn) error) (net.Conn, error) {
	d := net.Dialer{Control: control}
	if a.tlsCli != nil {
		td := tls.Dialer{NetDialer: &d, Config: a.tlsCli}
		return td.DialContext(ctx, "tcp", peer)
	}
	return d.DialContext(ctx, "tcp", peer)
}

// dialPeer connects to another agent's replication port (TLS when
// configured) and opens a connection of kind with hello.
func (a *Agent) dialPeer(ctx context.Context, peer string, kind checkpoint.FrameType, fence uint64, hello any) (net.Conn, error) {
	conn, err := a.dialAgent(ctx, peer)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if err := checkpoint.WriteJSON(conn, kind, fence, 0, hello); err != nil {
		conn.Close()
		return nil, err
	}
	var w checkpoint.Welcome
	if _, err := checkpoint.ReadJSON(conn, checkpoint.FrameWelcome, &w); err != nil {
		conn.Close()
		return nil, fmt.Errorf("standby %s: %w", peer, err)
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, nil
}

// primaryDisk is one guest disk mirrored to the standby.
type primaryDisk struct {
	dev    string
	node   qemu.DiskNode
	sock   string
	relay  *disk.Relay
	mirror *qemu.Mirror
	ctl    net.Conn
	cut    *disk.CutClient
	// stoodIn is the relay's StoodIn count when the mirror started: once
	// it grows, the relay answered writes the standby never got.
	stoodIn uint64
	// copied is what the last resync copied of this disk ourselves (the
	// blocks that differed; the bitmap's backup comes on top).
	copied int64
}

// standbyLost reports whether the relay stood in for the standby since
// the mirror started: QEMU counts the mirror in sync, the replica is not.
func (d *primaryDisk) standbyLost() bool {
	return d.relay.Stats().StoodIn != d.stoodIn
}

// diskSet mirrors a protected guest's writable disks to the standby and
// cuts their writes into epochs.
type diskSet struct {
	a     *Agent
	g     *qemu.Guest
	vm    *qemu.CaptureVM // pauses the guest around a mirror's cancel
	rec   *Record
	fence func() uint64
	disks []*primaryDisk

	mu                  sync.Mutex
	syncDone, syncTotal int64
	state               string // mirroring state for status
	resyncs             int
	lastResync          int64 // bytes the last resync copied, of all disks
	// broken: a cut failed, so the standby's replica may miss writes
	// even if QEMU still counts its mirror in sync (the standby saw the
	// mirror's connection drop): the next session resyncs.
	broken bool
}

func (a *Agent) newDiskSet(ctx context.Context, g *qemu.Guest, rec *Record, fence func() uint64) (*diskSet, error) {
	x, err := a.virt.LiveXML(ctx, g.Name)
	if err != nil {
		return nil, err
	}
	devs, err := virt.WritableDisks(x)
	if err != nil {
		return nil, err
	}
	if len(devs) > 0 {
		// Not protected yet, so no fence can run meanwhile: a throwaway
		// CaptureVM pauses a running guest around the cancels.
		var n int
		quiet := &qemu.CaptureVM{G: g, Marker: filepath.Join(a.cfg.RuntimeDir, rec.Name+".capturing")} // the capture's marker: a restart resumes the guest
		err := quiet.Quiesced(ctx, func() (err error) {
			n, err = qemu.RemoveStaleMirrors(ctx, g.Mon)
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("remove the disk mirrors a previous agent left: %w", err)
		}
		if n > 0 {
			a.log.Warn("removed disk mirrors a previous agent left in QEMU; the disks are resynced", "guest", g.Name, "objects", n)
		}
	}
	ds := &diskSet{a: a, g: g, rec: rec, fence: fence, state: "not mirrored yet"}
	for _, dev := range devs {
		node, err := a.virt.FindDisk(ctx, g, dev)
		if err != nil {
			ds.close()
			return nil, fmt.Errorf("disk %s: %w", dev, err)
		}
		pd := &primaryDisk{dev: dev, node: node, sock: filepath.Join(a.cfg.RuntimeDir, "disk", g.Name+"."+dev+".nbd.sock")}
		ln, err := unixsock.Listen(pd.sock, 0o666) // QEMU may run as another user
		if err != nil {
			ds.close()
			return nil, fmt.Errorf("disk %s: %w", dev, err)
		}
		hello := checkpoint.DiskHello{Agent: a.cfg.AgentID, Guest: rec.Name, Dev: dev}
		pd.relay = disk.NewRelay(func(ctx context.Context) (net.Conn, error) {
			return a.dialPeer(ctx, rec.Peer, checkpoint.FrameDiskNBD, fence(), hello)
		}, a.cfg.HeartbeatTimeout()*3/4) // before a pause waiting on the write gives up (it waits a heartbeat timeout)
		pd.relay.Log = a.log.With("guest", rec.Name, "dev", dev)
		// Only the guest's QEMU may reach the standby through the relay.
		go func() {
			if err := pd.relay.Serve(&unixsock.PeerListener{UnixListener: ln, PID: g.PID}); err != nil {
				pd.relay.Log.Error("disk relay stopped: the disk's mirror cannot reach the standby", "err", err)
			}
		}()
		ds.disks = append(ds.disks, pd)
	}
	return ds, nil
}

func (ds *diskSet) specs() []checkpoint.DiskSpec {
	var s []checkpoint.DiskSpec
	for _, d := range ds.disks {
		s = append(s, checkpoint.DiskSpec{Dev: d.dev, Size: d.node.Size})
	}
	return s
}

func (ds *diskSet) setState(s string) {
	ds.mu.Lock()
	ds.state = s
	ds.mu.Unlock()
}

func (ds *diskSet) status() *api.DiskStatus {
	if ds == nil || len(ds.disks) == 0 {
		return nil
	}
	ds.mu.Lock()
	defer ds.mu.Unlock()
	st := &api.DiskStatus{State: ds.state, SyncDone: ds.syncDone, SyncTotal: ds.syncTotal, Resyncs: ds.resyncs, LastResyncBytes: ds.lastResync}
	for _, d := range ds.disks {
		st.Devs = append(st.Devs, d.dev)
	}
	return st
}

// healthy reports whether every mirror is ready, caught up, and its cut
// path open: the next epoch can be cut consistently.
func (ds *diskSet) healthy(ctx context.Context) bool {
	ds.mu.Lock()
	broken := ds.broken
	ds.mu.Unlock()
	if broken {
		return false
	}
	for _, d := range ds.disks {
		if d.mirror == nil || d.cut == nil || d.standbyLost() || d.mirror.CheckSynced(ctx) != nil {
			return false
		}
	}
	return true
}

// prepare runs at the start of each replication session: with mirrors
// healthy it does nothing; otherwise it resets the standby's replica
// (which then needs a full epoch: memory and disks restart together) and
// mirrors every disk afresh, waiting until each is in sync.
func (ds *diskSet) prepare(ctx context.Context) (resync bool, err error) {
	if len(ds.disks) == 0 || ds.healthy(ctx) {
		return false, nil
	}
	return true, ds.resync(ctx)
}

func (ds *diskSet) resync(ctx context.Context) error {
	ds.stopMirrors()
	ds.mu.Lock()
	ds.resyncs++
	ds.syncDone, ds.syncTotal, ds.lastResync = 0, 0, 0
	for _, d := range ds.disks {
		ds.syncTotal += d.node.Size
	}
	ds.mu.Unlock()
	ds.setState("resetting the standby's replica")
	for _, d := range ds.disks {
		conn, err := ds.a.dialPeer(ctx, ds.rec.Peer, checkpoint.FrameDiskControl, ds.fence(),
			checkpoint.DiskHello{Agent: ds.a.cfg.AgentID, Guest: ds.rec.Name, Dev: d.dev, Reset: true})
		if err != nil {
			ds.setState("resync needed")
			return fmt.Errorf("disk %s: open the cut path to the standby: %w", d.dev, err)
		}
		d.ctl, d.cut = conn, disk.NewCutClient(conn)
	}
	var base int64
	for _, d := range ds.disks {
		ds.setState("syncing " + d.dev)
		d.stoodIn = d.relay.Stats().StoodIn
		var mr *qemu.Mirror
		var err error
		inc, err := ds.copyDifferences(ctx, d)
		if err != nil {
			ds.a.log.Warn("incremental disk resync not possible; copying the whole disk", "guest", ds.rec.Name, "dev", d.dev, "err", err)
		}
		opts := qemu.MirrorOptions{Server: qemu.NBDServer{Path: d.sock, Export: d.dev}}
		if inc {
			opts.Incremental, opts.Bitmap = true, resyncBitmap
		}
		start := func() (err error) {
			sctx, cancel := context.WithTimeout(ctx, ds.a.cfg.HeartbeatTimeout())
			defer cancel()
			mr, err = qemu.StartMirror(sctx, ds.g.Mon, d.node, opts)
			return err
		}
		// Paused, as around a cancel: QEMU 7.2 was seen to corrupt its
		// heap starting a mirror on a disk the guest wrote to, just after
		// the previous mirror was cancelled. Bounded like every call made
		// while the guest is paused.
		if ds.vm != nil {
			err = ds.vm.Quiesced(ctx, start)
		} else {
			err = start()
		}
		if inc {
			_ = qemu.RemoveDirtyBitmap(ctx, ds.g.Mon, d.node.Node, resyncBitmap)
		}
		if err != nil {
			ds.setState("resync needed")
			return fmt.Errorf("disk %s: start mirror: %w", d.dev, err)
		}
		d.mirror = mr
		err = mr.WaitReady(ctx, 200*time.Millisecond, func(p qemu.MirrorProgress) {
			ds.mu.Lock()
			ds.syncDone = base + p.Offset
			ds.mu.Unlock()
		})
		if err != nil {
			ds.setState("resync needed")
			return fmt.Errorf("disk %s: initial copy to the standby: %w", d.dev, err)
		}
		if inc {
			base += d.copied
		} else {
			base += d.node.Size
		}
		if inc {
			ds.a.log.Info("disk mirrored to the standby (incremental: the blocks that differed)", "guest", ds.rec.Name, "dev", d.dev, "copied_bytes", d.copied, "disk_bytes", d.node.Size)
		} else {
			d.copied = d.node.Size
			ds.a.log.Info("disk mirrored to the standby", "guest", ds.rec.Name, "dev", d.dev, "bytes", d.node.Size)
		}
		ds.mu.Lock()
		ds.lastResync += d.copied
		ds.mu.Unlock()
	}
	ds.mu.Lock()
	ds.syncDone = ds.syncTotal
	ds.broken = false
	ds.mu.Unlock()
	ds.setState("mirrored")
	return nil
}

// resyncBitmap tracks a disk's writes while an incremental resync copies
// the blocks that differed.
const resyncBitmap = "remora-resync"

// copyDifferences copies to the standby's replica image the blocks of disk
// d that differ from it, compared by a hash per block, while the guest
// runs; a dirty bitmap tracks the guest's writes meanwhile, for the
// mirror's start to copy (paused). It reports false, and the mirror
// copies the whole disk, when the standby's image cannot be compared.
func (ds *diskSet) copyDifferences(ctx context.Context, d *primaryDisk) (bool, error) {
	if d.node.Format != "raw" || d.node.File == "" {
		return false, fmt.Errorf("the image is %s (%q): only a raw file is compared block by block", d.node.Format, d.node.File)
	}
	src, err := os.Open(d.node.File)
	if err != nil {
		return false, err
	}
	defer src.Close()
	if err := qemu.AddDirtyBitmap(ctx, ds.g.Mon, d.node.Node, resyncBitmap); err != nil {
		return false, err
	}
	ok := false
	defer func() {
		if !ok {
			_ = qemu.RemoveDirtyBitmap(context.WithoutCancel(ctx), ds.g.Mon, d.node.Node, resyncBitmap)
		}
	}()
	ds.setState("comparing " + d.dev + " with the standby's image")
	hctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	remote, err := d.cut.BlockHashes(hctx, disk.HashBlock)
	if err != nil {
		return false, fmt.Errorf("the standby's image hashes: %w", err)
	}
	local, err := disk.BlockHashes(src, d.node.Size, disk.HashBlock)
	if err != nil {
		return false, err
	}
	ranges := disk.DifferingBlocks(local, remote, d.node.Size, disk.HashBlock)
	var total int64
	for _, r := range ranges {
		total += r.Len
	}
	ds.setState(fmt.Sprintf("copying %d MiB of %s that differ", total>>20, d.dev))
	conn, err := ds.a.dialPeer(ctx, ds.rec.Peer, checkpoint.FrameDiskNBD, ds.fence(),
		checkpoint.DiskHello{Agent: ds.a.cfg.AgentID, Guest: ds.rec.Name, Dev: d.dev})
	if err != nil {
		return false, err
	}
	w, err := disk.NewWriter(conn, d.dev)
	if err != nil {
		conn.Close()
		return false, err
	}
	if w.Size() != d.node.Size {
		w.Close()
		return false, fmt.Errorf("the standby's image is %d bytes, the disk %d", w.Size(), d.node.Size)
	}
	n, err := disk.CopyRanges(w, src, ranges)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return false, fmt.Errorf("copy the blocks that differ: %w", err)
	}
	d.copied, ok = n, true
	ds.mu.Lock()
	ds.syncTotal += n - d.node.Size // the full size was counted
	ds.mu.Unlock()
	return true, nil
}

// cutFailed records that the replica may miss writes: resync next time.
func (ds *diskSet) cutFailed() {
	ds.mu.Lock()
	ds.broken = true
	ds.mu.Unlock()
	ds.setState("resync needed")
}

// Cut seals every disk's writes of epoch on the standby (guest paused).
func (ds *diskSet) Cut(ctx context.Context, epoch uint64) error {
	for _, d := range ds.disks {
		if d.mirror == nil || d.cut == nil {
			return fmt.Errorf("disk %s is not mirrored", d.dev)
		}
		if err := d.mirror.CheckSynced(ctx); err != nil {
			ds.cutFailed()
			return fmt.Errorf("disk %s: %w", d.dev, err)
		}
		// After CheckSynced: the pause drained every write, and the relay
		// counts a stand-in before it answers one.
		if d.standbyLost() {
			ds.cutFailed()
			return fmt.Errorf("disk %s: %w: the standby was lost and the agent's relay answered the mirror in its place", d.dev, qemu.ErrMirrorNotSynced)
		}
		if err := d.cut.Cut(ctx, epoch); err != nil {
			ds.cutFailed()
			return fmt.Errorf("disk %s: %w", d.dev, err)
		}
	}
	return nil
}

func (ds *diskSet) stopMirrors() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, d := range ds.disks {
		if d.mirror != nil {
			mr := d.mirror
			cancelMirror := func() error { return mr.Cancel(ctx) }
			var err error
			if ds.vm != nil {
				err = ds.vm.Quiesced(ctx, cancelMirror)
			} else {
				err = cancelMirror()
			}
			if err != nil {
				ds.a.log.Warn("cancel disk mirror", "guest", ds.rec.Name, "dev", d.dev, "err", err)
			}
			d.mirror = nil
		}
		if d.ctl != nil {
			d.ctl.Close()
			d.ctl, d.cut = nil, nil
		}
	}
}

// close stops mirroring; the guest's disks are untouched.
func (ds *diskSet) close() {
	if ds == nil {
		return
	}
	ds.stopMirrors()
	for _, d := range ds.disks {
		if d.relay != nil {
			d.relay.Close()
		}
		_ = os.Remove(d.sock)
	}
}
