package txlog

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"golang.org/x/sys/unix"
)

// DefaultSegmentSize is the preallocated size of a segment file.
const DefaultSegmentSize = 64 << 20

// Options configure Open. The zero value is usable.
type Options struct {
	// SegmentSize is the preallocated size of new segment files (default
	// 64 MiB, minimum 1 KiB). A record must fit in one segment.
	SegmentSize int64
	// NoGroupCommit gives every durable Append its own write and
	// fdatasync. It exists as a baseline for benchmarks.
	NoGroupCommit bool
	// MinFencingEpoch rejects appends with a lower epoch even if the log
	// has not seen that epoch yet, e.g. the epoch this node was promoted in.
	MinFencingEpoch uint64
	// ReadOnly opens without locking, repairing or writing anything; a
	// torn tail is reported in Recovery.Torn but left in place. A writer
	// may be appending meanwhile (verify on a running agent's journal).
	ReadOnly bool
	// VerifyAll also checksums segments older than the latest checkpoint,
	// which recovery otherwise does not need to read.
	VerifyAll bool
	// MaxBatchBytes caps how many bytes one group commit writes (default
	// 4 MiB). Appenders block once four batches' worth is queued.
	MaxBatchBytes int
}

func (o *Options) fill() error {
	if o.SegmentSize == 0 {
		o.SegmentSize = DefaultSegmentSize
	}
	if o.SegmentSize < minSegmentSize {
		return fmt.Errorf("txlog: Options.SegmentSize %d is below the minimum of %d bytes", o.SegmentSize, minSegmentSize)
	}
	if o.MaxBatchBytes <= 0 {
		o.MaxBatchBytes = 4 << 20
	}
	return nil
}

// Log is an open transaction log. Its methods are safe for concurrent use.
type Log struct {
	dir  string
	opts Options
	lock *os.File

	// Guarded by mu.
	mu       sync.Mutex
	cond     *sync.Cond // wakes the syncer
	segs     []segment  // oldest first; the last one is written to
	nextLSN  LSN
	written  LSN    // every LSN <= written was handed to the OS
	synced   LSN    // every LSN <= synced is durable
	epoch    uint64 // highest fencing epoch accepted
	live     map[uint64]*liveTxn
	ckpt     *ckptMark
	enqOff   int64 // end of the active segment, queued records included
	enqCap   int64 // size of the segment enqOff refers to
	queue    []*batch
	queued   int    // bytes in queue and flushing
	flushing *batch // batch the syncer is writing
	closed   bool
	failed   error // sticky write error

	// Owned by the syncer goroutine (run).
	active     *os.File
	activePath string
	wOff       int64
	stopped    chan struct{}
}

// ckptMark remembers the latest checkpoint for Compact.
type ckptMark struct {
	lsn  LSN
	live []LiveTxn
}

// Open opens or creates the log in dir and recovers it: a torn tail is cut
// and saved next to its segment, transactions are classified, and the
// returned Recovery says what the caller must redo or resolve. Damage to
// durable data fails with a *CorruptionError naming segment and offset.
func Open(dir string, opts Options) (*Log, Recovery, error) {
	if err := opts.fill(); err != nil {
		return nil, Recovery{}, err
	}
	var lock *os.File
	if opts.ReadOnly {
		if _, err := os.Stat(dir); err != nil {
			return nil, Recovery{}, fmt.Errorf("txlog: open read-only: %w", err)
		}
	} else {
		if err := mkdirDurable(dir); err != nil {
			return nil, Recovery{}, err
		}
		var err error
		lock, err = os.OpenFile(filepath.Join(dir, lockFileName), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, Recovery{}, fmt.Errorf("txlog: open lock file: %w", err)
		}
		if err := lockFile(lock); err != nil {
			lock.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, Recovery{}, fmt.Errorf("%w: %s; stop the other writer or open with Options.ReadOnly", ErrLocked, dir)
			}
			return nil, Recovery{}, fmt.Errorf("txlog: lock %s: %w", dir, err)
		}
	}
	l, rec, err := open(dir, opts)
	if err != nil {
		if lock != nil {
			lock.Close()
		}
		return nil, Recovery{}, err
	}
	l.lock = lock
	return l, rec, nil
}

// mkdirDurable creates dir if needed and syncs its parent, so a log created
// and acknowledged does not vanish with its directory entry on power loss.
func mkdirDurable(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("txlog: create log directory: %w", err)
	}
	return syncDir(filepath.Dir(filepath.Clean(dir)))
}

func open(dir string, opts Options) (*Log, Recovery, error) {
	res, err := recoverLog(dir, opts)
	if err != nil {
		return nil, Recovery{}, err
	}
	if len(res.segs) == 0 {
		if opts.ReadOnly {
			return nil, Recovery{}, fmt.Errorf("%w: %s", ErrNoLog, dir)
		}
		h := segHeader{firstLSN: 1, epoch: opts.MinFencingEpoch}
		f, path, err := createSegment(dir, h, opts.SegmentSize)
		if err != nil {
			return nil, Recovery{}, err
		}
		f.Close()
		res.segs = []segment{{path: path, hdr: h, size: opts.SegmentSize}}
		res.rec = Recovery{FirstLSN: 1, Txns: map[uint64]*TxnInfo{}, Segments: 1, MaxEpoch: h.epoch}
		res.tailEnd = segHeaderSize
	}
	rec := res.rec
	l := &Log{
		dir:     dir,
		opts:    opts,
		segs:    res.segs,
		nextLSN: rec.LastLSN + 1,
		written: rec.LastLSN,
		synced:  rec.LastLSN,
		epoch:   max(rec.MaxEpoch, opts.MinFencingEpoch),
		live:    map[uint64]*liveTxn{},
		ckpt:    res.ckpt,
		stopped: make(chan struct{}),
	}
	l.cond = sync.NewCond(&l.mu)
	for id, t := range rec.Txns {
		if t.State == TxnInDoubt || (t.State == TxnCommitted && !t.Ended) {
			l.live[id] = &liveTxn{state: t.State, first: t.FirstLSN}
		}
	}
	if opts.ReadOnly {
		close(l.stopped)
		return l, rec, nil
	}
	last := res.segs[len(res.segs)-1]
	f, err := os.OpenFile(last.path, os.O_RDWR, 0)
	if err != nil {
		return nil, Recovery{}, fmt.Errorf("txlog: open active segment: %w", err)
	}
	capacity := max(last.size, opts.SegmentSize)
	if err := preallocate(f, capacity); err != nil {
		f.Close()
		return nil, Recovery{}, fmt.Errorf("txlog: preallocate %s: %w", last.path, err)
	}
	// Recovered records may only be in the page cache of a crashed process;
	// make them durable before new records claim they are.
	if err := fdatasync(f); err != nil {
		f.Close()
		return nil, Recovery{}, fmt.Errorf("txlog: fdatasync %s: %w", last.path, err)
	}
	l.active, l.activePath = f, last.path
	l.wOff, l.enqOff, l.enqCap = res.tailEnd, res.tailEnd, capacity
	go l.run()
	return l, rec, nil
}

// Close flushes queued records, makes them durable and closes the log.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	var final *batch
	if !l.opts.ReadOnly && l.failed == nil && l.synced < l.nextLSN-1 {
		final = l.tailBatchLocked()
		final.sync = true
		final.last = max(final.last, l.nextLSN-1)
	}
	l.closed = true
	l.cond.Signal()
	l.mu.Unlock()
	<-l.stopped

	var err error
	if final != nil {
		err = final.err
	}
	l.mu.Lock()
	if err == nil {
		err = l.failed
	}
	l.mu.Unlock()
	if l.active != nil {
		if cerr := l.active.Close(); err == nil {
			err = cerr
		}
	}
	if l.lock != nil {
		l.lock.Close()
	}
	return err
}

// Fence raises the lowest fencing epoch the log accepts. It fails with
// ErrStaleEpoch if the log has already accepted a higher epoch. The floor
// is kept in memory; every later record carries it, and Open should be
// given it again through Options.MinFencingEpoch.
func (l *Log) Fence(epoch uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if epoch < l.epoch {
		return fmt.Errorf("%w: cannot fence at epoch %d, the log has accepted epoch %d", ErrStaleEpoch, epoch, l.epoch)
	}
	l.epoch = epoch
	return nil
}

// Epoch returns the highest fencing epoch accepted so far.
func (l *Log) Epoch() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.epoch
}

// FirstLSN returns the oldest LSN still on disk.
func (l *Log) FirstLSN() LSN {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.segs[0].hdr.firstLSN
}

// LastLSN returns the LSN of the newest appended record, durable or not.
func (l *Log) LastLSN() LSN {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.nextLSN - 1
}

// DurableLSN returns the highest LSN known to be on disk.
func (l *Log) DurableLSN() LSN {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.synced
}

// Checkpoint durably writes a CHECKPOINT record holding the set of live
// transactions and data (e.g. a snapshot of the caller's state). Recovery
// starts from the latest checkpoint, and Compact may then drop segments
// it covers.
func (l *Log) Checkpoint(ctx context.Context, epoch uint64, data []byte) (LSN, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	l.mu.Lock()
	if err := l.waitRoomLocked(ctx); err != nil {
		l.mu.Unlock()
		return 0, err
	}
	live := make([]LiveTxn, 0, len(l.live))
	for id, t := range l.live {
		live = append(live, LiveTxn{ID: id, State: t.state, FirstLSN: t.first})
	}
	sort.Slice(live, func(i, j int) bool { return live[i].FirstLSN < live[j].FirstLSN })
	r := Record{Type: TypeCheckpoint, Epoch: epoch, Payload: encodeCheckpoint(live, data)}
	b, lsn, err := l.enqueueLocked(&r, true, true)
	if err == nil {
		l.ckpt = &ckptMark{lsn: lsn, live: live}
	}
	l.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return lsn, l.wait(ctx, b, lsn)
}

// Compact removes segments that hold only records older than the latest
// checkpoint and older than the first record of every transaction still
// live from that checkpoint. END committed transactions once applied, or
// they pin their segments. It returns the number of segments removed.
func (l *Log) Compact(ctx context.Context) (int, error) {
	l.mu.Lock()
	if err := l.writableLocked(); err != nil {
		l.mu.Unlock()
		return 0, err
	}
	if l.ckpt == nil {
		l.mu.Unlock()
		return 0, nil
	}
	low := l.ckpt.lsn
	for _, t := range l.ckpt.live {
		if cur := l.live[t.ID]; cur != nil && cur.first == t.FirstLSN {
			low = min(low, t.FirstLSN)
		}
	}
	l.mu.Unlock()
	// The checkpoint and the ABORT/END records that let us ignore older
	// transactions must be durable before their history goes away.
	if err := l.Sync(ctx); err != nil {
		return 0, err
	}
	l.mu.Lock()
	n := 0
	var err error
	for len(l.segs) > 1 && l.segs[1].hdr.firstLSN <= low {
		if err = os.Remove(l.segs[0].path); err != nil && !os.IsNotExist(err) {
			err = fmt.Errorf("txlog: remove compacted segment: %w", err)
			break
		}
		err = nil
		l.segs = l.segs[1:]
		n++
	}
	l.mu.Unlock()
	if n > 0 {
		if serr := syncDir(l.dir); err == nil {
			err = serr
		}
	}
	return n, err
}

// Iterate calls fn for every record with LSN >= from, in order, up to the
// newest record written when Iterate was called (call Sync first to
// include records still queued). from 0 means the oldest record. fn may
// keep the record. Iteration stops at the first error fn returns, which
// Iterate returns. Records are checksummed again as they are read.
func (l *Log) Iterate(from LSN, fn func(Record) error) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	limit := l.written
	first := l.segs[0].hdr.firstLSN
	if from == 0 {
		from = first
	}
	if from < first {
		l.mu.Unlock()
		return fmt.Errorf("%w: LSN %d requested, the oldest record left is LSN %d", ErrCompacted, from, first)
	}
	if from > limit {
		l.mu.Unlock()
		return nil
	}
	i := sort.Search(len(l.segs), func(i int) bool { return l.segs[i].hdr.firstLSN > from }) - 1
	var segs []segment
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	// Open under the lock so Compact cannot remove a segment between
	// choosing it and opening it.
	for ; i < len(l.segs) && l.segs[i].hdr.firstLSN <= limit; i++ {
		f, err := os.Open(l.segs[i].path)
		if err != nil {
			l.mu.Unlock()
			return fmt.Errorf("txlog: open segment for reading: %w", err)
		}
		files = append(files, f)
		segs = append(segs, l.segs[i])
	}
	l.mu.Unlock()

	for k, sg := range segs {
		end := limit
		if k+1 < len(segs) {
			end = segs[k+1].hdr.firstLSN - 1
		}
		if err := readRecords(files[k], sg, from, end, fn); err != nil {
			return err
		}
	}
	return nil
}

// readRecords streams the records of one segment with LSN in [from, end].
func readRecords(f *os.File, sg segment, from, end LSN, fn func(Record) error) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("txlog: stat %s: %w", sg.path, err)
	}
	sr := newSegReader(f, fi.Size(), sg.hdr.firstLSN)
	for sr.next <= end {
		off := sr.off
		r, err := sr.read()
		var re *readError
		if errors.As(err, &re) {
			return fmt.Errorf("txlog: read segment %s at offset %d: %w", sg.path, off, re.err)
		}
		if err != nil {
			return &CorruptionError{Segment: sg.path, Offset: off, LSN: sr.next, Reason: err.Error()}
		}
		if r.LSN >= from {
			if err := fn(r); err != nil {
				return err
			}
		}
	}
	return nil
}
