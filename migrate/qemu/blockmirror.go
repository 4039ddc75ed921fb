package qemu

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// Disk replication, primary side: QEMU mirrors a guest disk to the
// standby's NBD server (checkpoint/disk) with blockdev-mirror in
// copy-mode write-blocking, so a guest write completes only after the
// standby acknowledged it, and QMP stop (which drains the guest's I/O)
// leaves every write of the epoch on the standby. The job is never
// completed (no pivot): it runs for as long as the guest is protected.
//
// When the standby fails (QEMU 7.2, block/mirror.c): the guest's write
// goes to the source first and its result is the source's; a failed
// target write only marks the range dirty and applies on-target-error.
// With "report" the job records the error and, from then on, guest writes
// go to the source only; the job ends (concluded, with an error). So the
// guest sees no I/O error from a dead standby. "stop" would keep sending
// every guest write to the dead target (each one failing), and "ignore"
// would retry forever; neither keeps the replica consistent anyway, since
// the failed write is missing on the standby. The NBD node has
// reconnect-delay 0: a broken connection fails requests at once instead
// of holding guest writes while QEMU reconnects. After a failure the
// replica must be re-synced with a new full mirror.
//
// What "report" does not cover: a standby that stops answering without
// closing the connection (host gone, no RST). QEMU 7.2's NBD client has no
// request timeout, so a guest write, and a QMP stop that drains it, wait
// until TCP gives up. The agent must notice the dead standby by its
// heartbeat and break the connection (see CancelMirror's note).

// ErrMirrorNotSynced means the mirror does not guarantee that the standby
// holds every write the guest made.
var ErrMirrorNotSynced = errors.New("disk mirror not in sync")

// DiskNode is a guest disk as QEMU's block layer knows it.
type DiskNode struct {
	Target string // libvirt target dev, e.g. "vda"
	Alias  string // libvirt device alias, e.g. "virtio-disk0"
	Node   string // node name of the disk's top node (the mirror source)
	File   string // image file
	Format string // e.g. raw, qcow2
	Size   int64  // virtual size in bytes: the replica image must match it
}

type blockInfo struct {
	Device   string `json:"device"`
	QDev     string `json:"qdev"`
	Inserted *struct {
		NodeName string `json:"node-name"`
		File     string `json:"file"`
		Drv      string `json:"drv"`
		Image    struct {
			VirtualSize int64 `json:"virtual-size"`
		} `json:"image"`
	} `json:"inserted"`
}

// FindDiskNode finds the block node of the device with libvirt alias
// through query-block (libvirt names the device's QOM path after it:
// /machine/peripheral/<alias>/...).
func FindDiskNode(ctx context.Context, m qmp.Monitor, alias string) (DiskNode, error) {
	var blocks []blockInfo
	if err := Exec(ctx, m, "query-block", nil, &blocks); err != nil {
		return DiskNode{}, err
	}
	prefix := "/machine/peripheral/" + alias
	for _, b := range blocks {
		if b.QDev != prefix && !strings.HasPrefix(b.QDev, prefix+"/") && b.Device != "drive-"+alias {
			continue
		}
		if b.Inserted == nil {
			return DiskNode{}, fmt.Errorf("device %s has no medium", alias)
		}
		return DiskNode{Alias: alias, Node: b.Inserted.NodeName, File: b.Inserted.File, Format: b.Inserted.Drv,
			Size: b.Inserted.Image.VirtualSize}, nil
	}
	return DiskNode{}, fmt.Errorf("no block device for %s in query-block", alias)
}

// NBDServer is where the standby's NBD server listens: Host and Port, or
// a unix socket Path (e.g. a relay of the agent's).
type NBDServer struct {
	Host   string
	Port   int
	Path   string
	Export string
}

func (s NBDServer) qmp() (map[string]any, error) {
	switch {
	case s.Path != "" && s.Host == "":
		return map[string]any{"type": "unix", "path": s.Path}, nil
	case s.Path == "" && s.Host != "" && s.Port > 0 && s.Port < 65536:
		return map[string]any{"type": "inet", "host": s.Host, "port": strconv.Itoa(s.Port)}, nil
	}
	return nil, fmt.Errorf("NBD server: want host and port, or a unix path (got %+v)", s)
}

// MirrorOptions configure StartMirror.
type MirrorOptions struct {
	Server NBDServer
	// Names of the job, the NBD node and the mirror's filter node;
	// default remora-mirror-<dev>, remora-nbd-<dev>, remora-mirror-top-<dev>.
	JobID, TargetNode, FilterNode string
	// Incremental: the standby already holds the disk but for what the
	// caller copies itself (with the guest paused, before the mirror
	// starts): mirror new writes only (sync none), ready at once. The
	// dirty bitmap Bitmap of the disk, when set, is copied first with an
	// incremental backup into the same NBD node.
	Incremental bool
	Bitmap      string
}

// Mirror is a running blockdev-mirror of one guest disk to a standby.
type Mirror struct {
	mon        qmp.Monitor
	Disk       DiskNode
	JobID      string
	TargetNode string
	FilterNode string
}

// StartMirror adds the standby's NBD export as a block node and starts a
// full, write-blocking mirror of disk to it. libvirt does not know the
// job (virsh blockjob shows none); it leaves it alone, and destroying the
// domain still works.
func StartMirror(ctx context.Context, m qmp.Monitor, disk DiskNode, opts MirrorOptions) (*Mirror, error) {
	name := disk.Target
	if name == "" {
		name = disk.Alias
	}
	mr := &Mirror{mon: m, Disk: disk, JobID: opts.JobID, TargetNode: opts.TargetNode, FilterNode: opts.FilterNode}
	if mr.JobID == "" {
		mr.JobID = "remora-mirror-" + name
	}
	if mr.TargetNode == "" {
		mr.TargetNode = "remora-nbd-" + name
	}
	if mr.FilterNode == "" {
		mr.FilterNode = "remora-mirror-top-" + name
	}
	server, err := opts.Server.qmp()
	if err != nil {
		return nil, err
	}
	if opts.Server.Export == "" {
		return nil, errors.New("NBD server: no export name")
	}
	if disk.Node == "" {
		return nil, errors.New("disk has no node name")
	}
	// A blockdev-add that ran out of time may still have added its node
	// (QEMU answers only once the NBD handshake is done): remove it, or the
	// retry fails on a duplicate node name. No job uses it: a job would be
	// ours, and StartMirror is called with none running.
	if err := Exec(ctx, m, "blockdev-del", map[string]any{"node-name": mr.TargetNode}, nil); err != nil && !isNodeGone(err) {
		return nil, fmt.Errorf("remove a stale NBD node %s: %w", mr.TargetNode, err)
	}
	// discard stays "ignore" (the blockdev-add default), as on libvirt's
	// default source, so discards change neither side.
	if err := Exec(ctx, m, "blockdev-add", map[string]any{
		"driver":          "nbd",
		"node-name":       mr.TargetNode,
		"server":          server,
		"export":          opts.Server.Export,
		"reconnect-delay": 0,
	}, nil); err != nil {
		return nil, fmt.Errorf("connect to the standby's NBD export %q: %w", opts.Server.Export, err)
	}
	sync := "full"
	if opts.Incremental {
		sync = "none"
		if opts.Bitmap != "" {
			if err := backupBitmap(ctx, m, mr.JobID+"-backup", disk.Node, mr.TargetNode, opts.Bitmap); err != nil {
				_ = Exec(ctx, m, "blockdev-del", map[string]any{"node-name": mr.TargetNode}, nil)
				return nil, err
			}
		}
	}
	if err := Exec(ctx, m, "blockdev-mirror", map[string]any{
		"job-id":           mr.JobID,
		"device":           disk.Node,
		"target":           mr.TargetNode,
		"sync":             sync,
		"copy-mode":        "write-blocking",
		"on-source-error":  "report",
		"on-target-error":  "report",
		"auto-dismiss":     false, // a failed job stays visible until Cancel
		"filter-node-name": mr.FilterNode,
	}, nil); err != nil {
		_ = Exec(ctx, m, "blockdev-del", map[string]any{"node-name": mr.TargetNode}, nil)
		return nil, fmt.Errorf("start mirror of %s: %w", name, err)
	}
	return mr, nil
}

// AddDirtyBitmap starts tracking the writes to a disk node in a new
// (non-persistent) dirty bitmap.
func AddDirtyBitmap(ctx context.Context, m qmp.Monitor, node, name string) error {
	_ = Exec(ctx, m, "block-dirty-bitmap-remove", map[string]any{"node": node, "name": name}, nil) // a leftover
	return Exec(ctx, m, "block-dirty-bitmap-add", map[string]any{"node": node, "name": name, "persistent": false}, nil)
}

// RemoveDirtyBitmap drops a dirty bitmap; one that is gone is not an error.
func RemoveDirtyBitmap(ctx context.Context, m qmp.Monitor, node, name string) error {
	err := Exec(ctx, m, "block-dirty-bitmap-remove", map[string]any{"node": node, "name": name}, nil)
	var qe *QMPError
	if errors.As(err, &qe) && strings.Contains(qe.Desc, "not found") {
		return nil
	}
	return err
}

// backupBitmap copies the blocks set in bitmap from node to target (an
// incremental backup) and waits for the copy to end.
func backupBitmap(ctx context.Context, m qmp.Monitor, job, node, target, bitmap string) error {
	if err := Exec(ctx, m, "blockdev-backup", map[string]any{
		"job-id": job, "device": node, "target": target, "sync": "incremental", "bitmap": bitmap,
		"auto-finalize": true, "auto-dismiss": false,
	}, nil); err != nil {
		return fmt.Errorf("copy the blocks written since %s: %w", bitmap, err)
	}
	defer Exec(context.WithoutCancel(ctx), m, "job-dismiss", map[string]any{"id": job}, nil)
	for {
		var jobs []struct {
			ID     string `json:"id"`
			Status string `json:"status"`
			Error  string `json:"error"`
		}
		if err := Exec(ctx, m, "query-jobs", nil, &jobs); err != nil {
			return err
		}
		for _, j := range jobs {
			if j.ID != job {
				continue
			}
			if j.Status == "concluded" || j.Status == "null" {
				if j.Error != "" {
					return fmt.Errorf("copy the blocks written since %s: %s", bitmap, j.Error)
				}
				return nil
			}
		}
		select {
		case <-ctx.Done():
			_ = Exec(context.WithoutCancel(ctx), m, "job-cancel", map[string]any{"id": job}, nil)
			return fmt.Errorf("copy the blocks written since %s: %w", bitmap, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// MirrorProgress is the mirror job's state from query-block-jobs.
type MirrorProgress struct {
	Status   string // created, running, ready, concluded, ...
	Ready    bool
	Offset   int64 // bytes copied
	Len      int64 // bytes to copy so far (grows with guest writes)
	IOStatus string
	Paused   bool
	Error    string // why a concluded job failed
}

// Remaining is the number of bytes still to copy.
func (p MirrorProgress) Remaining() int64 { return p.Len - p.Offset }

// ErrNoMirrorJob means QEMU has no job by the mirror's id.
var ErrNoMirrorJob = errors.New("mirror job not found")

// Progress returns the job's state.
func (mr *Mirror) Progress(ctx context.Context) (MirrorProgress, error) {
	var jobs []struct {
		Device   string `json:"device"`
		Status   string `json:"status"`
		Ready    bool   `json:"ready"`
		Offset   int64  `json:"offset"`
		Len      int64  `json:"len"`
		IOStatus string `json:"io-status"`
		Paused   bool   `json:"paused"`
		Error    string `json:"error"`
	}
	if err := Exec(ctx, mr.mon, "query-block-jobs", nil, &jobs); err != nil {
		return MirrorProgress{}, err
	}
	for _, j := range jobs {
		if j.Device == mr.JobID {
			return MirrorProgress{Status: j.Status, Ready: j.Ready, Offset: j.Offset, Len: j.Len,
				IOStatus: j.IOStatus, Paused: j.Paused, Error: j.Error}, nil
		}
	}
	return MirrorProgress{}, fmt.Errorf("%w: %s", ErrNoMirrorJob, mr.JobID)
}

// WaitReady polls the job every interval (default 100 ms) until it is
// ready (the standby holds a full copy and every guest write is mirrored
// synchronously from now on), reporting progress to fn if not nil. It
// fails if the job ends.
func (mr *Mirror) WaitReady(ctx context.Context, interval time.Duration, fn func(MirrorProgress)) error {
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		p, err := mr.Progress(ctx)
		if err != nil {
			return err
		}
		if fn != nil {
			fn(p)
		}
		switch {
		case p.Status == "ready":
			return nil
		case p.Status == "concluded" || p.Status == "aborting" || p.Status == "null":
			return fmt.Errorf("mirror %s ended before it was ready: %s", mr.JobID, orUnknown(p.Error))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("mirror %s not ready (%d of %d bytes copied): %w", mr.JobID, p.Offset, p.Len, ctx.Err())
		case <-t.C:
		}
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "no error given"
	}
	return s
}

// CheckSynced returns nil if every write the guest made has reached the
// standby: the job is ready and has copied all it was given (a failed
// target write leaves offset behind len at once). Call it while the guest
// is paused, before the cut; one QMP round trip.
func (mr *Mirror) CheckSynced(ctx context.Context) error {
	p, err := mr.Progress(ctx)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrMirrorNotSynced, err)
	}
	return p.synced(mr.JobID)
}

func (p MirrorProgress) synced(job string) error {
	switch {
	case p.Status != "ready":
		return fmt.Errorf("%w: job %s is %s (%s)", ErrMirrorNotSynced, job, p.Status, orUnknown(p.Error))
	case p.Offset != p.Len:
		return fmt.Errorf("%w: job %s has %d bytes not on the standby (a write to it failed)", ErrMirrorNotSynced, job, p.Len-p.Offset)
	case p.IOStatus != "" && p.IOStatus != "ok":
		return fmt.Errorf("%w: job %s I/O status %s", ErrMirrorNotSynced, job, p.IOStatus)
	}
	return nil
}

// Cancel stops the mirror without touching the guest's disk: force-cancel
// (no final copy to the standby), dismiss the job, delete the NBD node.
// It works on a failed job too. If the standby hangs without closing the
// connection, a guest write in flight to it keeps the job (and QMP stop)
// waiting; closing that connection (e.g. in a relay of the agent's) ends it.
func (mr *Mirror) Cancel(ctx context.Context) error {
	if err := Exec(ctx, mr.mon, "block-job-cancel", map[string]any{"device": mr.JobID, "force": true}, nil); err != nil && !isJobGone(err) {
		return fmt.Errorf("cancel mirror %s: %w", mr.JobID, err)
	}
	for {
		p, err := mr.Progress(ctx)
		if errors.Is(err, ErrNoMirrorJob) {
			break
		}
		if err != nil {
			return err
		}
		if p.Status == "concluded" {
			if err := Exec(ctx, mr.mon, "job-dismiss", map[string]any{"id": mr.JobID}, nil); err != nil {
				return fmt.Errorf("dismiss mirror %s: %w", mr.JobID, err)
			}
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("mirror %s still %s after cancel: %w", mr.JobID, p.Status, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := Exec(ctx, mr.mon, "blockdev-del", map[string]any{"node-name": mr.TargetNode}, nil); err != nil && !isNodeGone(err) {
		return fmt.Errorf("remove the NBD node %s: %w", mr.TargetNode, err)
	}
	return nil
}

func isJobGone(err error) bool {
	var qe *QMPError
	return errors.As(err, &qe) && (qe.Class == "DeviceNotActive" || strings.Contains(qe.Desc, "not found") ||
		strings.Contains(qe.Desc, "has no") || strings.Contains(qe.Desc, "concluded"))
}

func isNodeGone(err error) bool {
	var qe *QMPError
	return errors.As(err, &qe) && (strings.Contains(qe.Desc, "Failed to find node") || strings.Contains(qe.Desc, "Cannot find node"))
}

// RemoveStaleMirrors cancels the mirror jobs and removes the NBD nodes a
// previous agent left in QEMU (it died, or stopped, with its mirrors
// running; their connections to the standby died with it), so that new
// mirrors of the same disks can start. It returns how many it removed.
func RemoveStaleMirrors(ctx context.Context, m qmp.Monitor) (int, error) {
	var jobs []struct {
		Device string `json:"device"`
	}
	if err := Exec(ctx, m, "query-block-jobs", nil, &jobs); err != nil {
		return 0, err
	}
	n := 0
	for _, j := range jobs {
		if !strings.HasPrefix(j.Device, "remora-mirror-") {
			continue
		}
		mr := &Mirror{mon: m, JobID: j.Device, TargetNode: "remora-nbd-" + strings.TrimPrefix(j.Device, "remora-mirror-")}
		if err := mr.Cancel(ctx); err != nil {
			return n, err
		}
		n++
	}
	var nodes []struct {
		NodeName string `json:"node-name"`
	}
	if err := Exec(ctx, m, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return n, err
	}
	for _, nd := range nodes {
		if strings.HasPrefix(nd.NodeName, "remora-nbd-") {
			if err := Exec(ctx, m, "blockdev-del", map[string]any{"node-name": nd.NodeName}, nil); err != nil && !isNodeGone(err) {
				return n, fmt.Errorf("remove the stale NBD node %s: %w", nd.NodeName, err)
			}
			n++
		}
	}
	return n, nil
}
