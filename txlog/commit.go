package txlog

import (
	"context"
	"fmt"
)

// Group commit. Appenders encode their record into the newest queued batch
// under l.mu and wait on the batch's done channel. One syncer goroutine
// takes batches in order, writes each with one write per segment touched
// and one fdatasync, then wakes every waiter of the batch. While it syncs,
// the next batch fills up, so concurrent appenders share fsyncs without any
// timer or tuning.

// batch is a run of records written and synced together.
type batch struct {
	chunks []chunk
	bytes  int
	last   LSN  // every LSN <= last is written once this batch is done
	sync   bool // fdatasync after writing: someone waits for durability
	done   chan struct{}
	err    error // valid after done is closed
}

// chunk is the part of a batch that goes to one segment.
type chunk struct {
	newSeg *segHeader // if set, rotate to a new segment before writing buf
	buf    []byte
}

// Append writes r and returns once it is durable (fdatasync done). The LSN,
// Type, Epoch and TxID of r are checked first: a stale epoch or an illegal
// transaction step is rejected without writing anything.
//
// If ctx ends while waiting, Append returns the LSN and an error wrapping
// ctx.Err(); the record is queued and may still become durable, so treat
// the outcome as unknown.
func (l *Log) Append(ctx context.Context, r Record) (LSN, error) {
	return l.submit(ctx, &r, true, false)
}

// AppendAsync queues r and returns without waiting for it to be written or
// synced. The record may be lost on a crash; use it for records whose loss
// is harmless, e.g. BEGIN and DATA of a transaction whose COMMIT is
// appended durably later (presumed abort). Records become durable in LSN
// order, so a later durable Append or Sync covers it. It blocks only while
// the write queue is full.
func (l *Log) AppendAsync(ctx context.Context, r Record) (LSN, error) {
	return l.submit(ctx, &r, false, false)
}

// Sync returns once every record appended so far is durable.
func (l *Log) Sync(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	l.mu.Lock()
	if err := l.writableLocked(); err != nil {
		l.mu.Unlock()
		return err
	}
	target := l.nextLSN - 1
	if l.synced >= target {
		l.mu.Unlock()
		return nil
	}
	b := l.tailBatchLocked()
	b.sync = true
	b.last = max(b.last, target)
	l.cond.Signal()
	l.mu.Unlock()
	return l.wait(ctx, b, target)
}

func (l *Log) submit(ctx context.Context, r *Record, durable, internal bool) (LSN, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	l.mu.Lock()
	if err := l.waitRoomLocked(ctx); err != nil {
		l.mu.Unlock()
		return 0, err
	}
	b, lsn, err := l.enqueueLocked(r, durable, internal)
	l.mu.Unlock()
	if err != nil || !durable {
		return lsn, err
	}
	return lsn, l.wait(ctx, b, lsn)
}

func (l *Log) wait(ctx context.Context, b *batch, lsn LSN) error {
	select {
	case <-b.done:
		return b.err
	case <-ctx.Done():
		return fmt.Errorf("txlog: stopped waiting for LSN %d to become durable; it may still be written: %w", lsn, ctx.Err())
	}
}

func (l *Log) writableLocked() error {
	switch {
	case l.opts.ReadOnly:
		return ErrReadOnly
	case l.closed:
		return ErrClosed
	case l.failed != nil:
		return l.failed
	}
	return nil
}

// waitRoomLocked applies backpressure so a fast appender cannot queue
// unbounded memory ahead of the disk.
func (l *Log) waitRoomLocked(ctx context.Context) error {
	for l.queued >= 4*l.opts.MaxBatchBytes && l.writableLocked() == nil {
		var ch chan struct{}
		switch {
		case l.flushing != nil:
			ch = l.flushing.done
		case len(l.queue) > 0:
			ch = l.queue[0].done
		default:
			return nil
		}
		l.mu.Unlock()
		select {
		case <-ch:
			l.mu.Lock()
		case <-ctx.Done():
			l.mu.Lock()
			return ctx.Err()
		}
	}
	return nil
}

// tailBatchLocked returns the batch new records join. Without group commit
// every record gets its own batch and therefore its own fdatasync.
func (l *Log) tailBatchLocked() *batch {
	if n := len(l.queue); n > 0 && !l.opts.NoGroupCommit && l.queue[n-1].bytes < l.opts.MaxBatchBytes {
		return l.queue[n-1]
	}
	b := &batch{done: make(chan struct{})}
	l.queue = append(l.queue, b)
	return b
}

// enqueueLocked validates r, assigns its LSN, decides its segment and
// encodes it into the tail batch. Validation happens here, under the same
// lock that orders LSNs, so the checks hold in log order.
func (l *Log) enqueueLocked(r *Record, durable, internal bool) (*batch, LSN, error) {
	if err := l.writableLocked(); err != nil {
		return nil, 0, err
	}
	if r.Epoch < l.epoch {
		return nil, 0, fmt.Errorf("%w: %v record has epoch %d but this log has accepted epoch %d; a newer primary has taken over, stop writing",
			ErrStaleEpoch, r.Type, r.Epoch, l.epoch)
	}
	if !internal {
		if err := checkTxn(l.live, r); err != nil {
			return nil, 0, err
		}
	}
	size := int64(recHeaderSize + len(r.Payload))
	if size > l.opts.SegmentSize-segHeaderSize {
		return nil, 0, fmt.Errorf("%w: %d-byte payload does not fit in a %d-byte segment; raise Options.SegmentSize",
			ErrInvalidRecord, len(r.Payload), l.opts.SegmentSize)
	}
	lsn := l.nextLSN
	b := l.tailBatchLocked()
	if l.enqOff+size > l.enqCap {
		b.chunks = append(b.chunks, chunk{newSeg: &segHeader{firstLSN: lsn, epoch: r.Epoch}})
		l.enqOff, l.enqCap = segHeaderSize, l.opts.SegmentSize
	} else if len(b.chunks) == 0 {
		b.chunks = append(b.chunks, chunk{})
	}
	c := &b.chunks[len(b.chunks)-1]
	c.buf = appendRecord(c.buf, r, lsn, l.synced)

	l.nextLSN++
	l.enqOff += size
	l.epoch = r.Epoch
	if !internal {
		applyLive(l.live, r, lsn)
	}
	b.bytes += int(size)
	b.last = lsn
	b.sync = b.sync || durable
	l.queued += int(size)
	l.cond.Signal()
	return b, lsn, nil
}

// run is the syncer goroutine. It owns l.active and l.wOff.
func (l *Log) run() {
	defer close(l.stopped)
	for {
		l.mu.Lock()
		for len(l.queue) == 0 && !l.closed {
			l.cond.Wait()
		}
		if len(l.queue) == 0 {
			l.mu.Unlock()
			return
		}
		b := l.queue[0]
		l.queue[0] = nil
		l.queue = l.queue[1:]
		l.flushing = b
		err := l.failed
		l.mu.Unlock()

		if err == nil {
			err = l.flush(b)
		}

		l.mu.Lock()
		l.flushing = nil
		l.queued -= b.bytes
		if err != nil && l.failed == nil {
			// After a failed write or fsync the page cache state is unknown
			// (the kernel may have dropped dirty pages), so stop here.
			l.failed = fmt.Errorf("%w; the log refuses further writes, reopen it to recover", err)
		}
		if err == nil {
			l.written = max(l.written, b.last)
			if b.sync {
				l.synced = max(l.synced, b.last)
			}
		}
		l.mu.Unlock()
		b.err = err
		close(b.done)
	}
}

func (l *Log) flush(b *batch) error {
	for _, c := range b.chunks {
		if c.newSeg != nil {
			if err := l.rotate(*c.newSeg); err != nil {
				return err
			}
		}
		if len(c.buf) == 0 {
			continue
		}
		if _, err := l.active.WriteAt(c.buf, l.wOff); err != nil {
			return fmt.Errorf("txlog: write %d bytes to %s at offset %d: %w", len(c.buf), l.activePath, l.wOff, err)
		}
		l.wOff += int64(len(c.buf))
	}
	if b.sync {
		if err := fdatasync(l.active); err != nil {
			return fmt.Errorf("txlog: fdatasync %s: %w", l.activePath, err)
		}
	}
	return nil
}

// rotate seals the active segment and starts a new one. The old segment is
// synced first: recovery relies on every segment but the last being
// complete, so damage there is never mistaken for a torn write.
func (l *Log) rotate(h segHeader) error {
	if err := fdatasync(l.active); err != nil {
		return fmt.Errorf("txlog: fdatasync %s before rotation: %w", l.activePath, err)
	}
	f, path, err := createSegment(l.dir, h, l.opts.SegmentSize)
	if err != nil {
		return err
	}
	l.active.Close()
	l.active, l.activePath, l.wOff = f, path, segHeaderSize
	l.mu.Lock()
	l.segs = append(l.segs, segment{path: path, hdr: h, size: l.opts.SegmentSize})
	l.mu.Unlock()
	return nil
}
