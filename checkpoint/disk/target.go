// Package disk replicates a protected guest's disk writes on the standby,
// consistently with the memory epochs.
//
// The primary's QEMU mirrors the guest disk (blockdev-mirror, copy-mode
// write-blocking: a guest write completes only after the target acked it)
// to an NBD Server on the standby, backed by a Target: the replica image
// plus the writes of epochs not yet applied to it. Before the first Cut
// writes go straight to the image (initial sync: nothing is consistent
// yet). After it, writes are held in memory per epoch; the primary calls
// Cut(n) through the control path while its guest is paused, so epoch n
// holds exactly the writes the guest made before that pause. The standby
// then Stages the epoch to a durable redo file before it commits the epoch,
// and Applies the file to the image when it applies the epoch. On the
// primary, a Relay carries QEMU's NBD connection to the standby and breaks
// it when the standby stops answering.
package disk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Image is the replica image: a raw disk image the size of the guest's.
// *os.File is one.
type Image interface {
	io.ReaderAt
	io.WriterAt
	Sync() error
}

// DefaultMaxBufferedBytes bounds the writes a Target holds in memory.
const DefaultMaxBufferedBytes = 256 << 20

// extentOverhead is what one buffered write costs besides its data, so
// that a flood of tiny writes also meets the limit.
const extentOverhead = 64

var (
	// ErrOutOfSync means the replica can no longer follow the guest's disk
	// (a write was refused, or the mirror's connection broke while epochs
	// were being cut): Cut fails until Reset and a new full mirror.
	// Epochs cut before that stay valid and can be staged and applied.
	ErrOutOfSync = errors.New("disk replica out of sync with the guest's disk")
	// ErrNotCut means Stage was asked for an epoch the primary has not cut.
	ErrNotCut = errors.New("epoch not cut yet")
)

// Options tune a Target.
type Options struct {
	// MaxBufferedBytes bounds the writes held in memory (the open epoch
	// and sealed epochs not yet applied); default DefaultMaxBufferedBytes.
	// A write past it is refused (ENOSPC to the mirror, whose job then
	// fails with the guest unaffected) and the replica is out of sync: the
	// primary must Reset it and mirror again.
	MaxBufferedBytes int64
}

// extent is one buffered write; data nil means zeroes.
type extent struct {
	off  int64
	n    int64
	data []byte
}

// epochWrites is the writes of one epoch, in arrival order. Sealed ones are
// never modified again, so readers may use them without the lock.
type epochWrites struct {
	epoch  uint64
	writes []extent
	bytes  int64 // bytes written (zeroes included)
	cost   int64 // memory held
	lo, hi int64 // range covered
}

func (e *epochWrites) add(x extent) {
	if len(e.writes) == 0 || x.off < e.lo {
		e.lo = x.off
	}
	if x.off+x.n > e.hi {
		e.hi = x.off + x.n
	}
	e.writes = append(e.writes, x)
	e.bytes += x.n
	e.cost += int64(len(x.data)) + extentOverhead
}

// overlay copies the parts of e's writes that fall in [off, off+len(p))
// over p, oldest first.
func (e *epochWrites) overlay(p []byte, off int64) {
	end := off + int64(len(p))
	if len(e.writes) == 0 || e.hi <= off || e.lo >= end {
		return
	}
	for _, x := range e.writes {
		lo, hi := max(x.off, off), min(x.off+x.n, end)
		if lo >= hi {
			continue
		}
		dst := p[lo-off : hi-off]
		if x.data == nil {
			clear(dst)
		} else {
			copy(dst, x.data[lo-x.off:hi-x.off])
		}
	}
}

// EpochStats describes the writes of one epoch.
type EpochStats struct {
	Epoch  uint64
	Writes int
	Bytes  int64
}

// Stats are a Target's counters.
type Stats struct {
	Protected   bool   // epochs are being cut (writes are buffered)
	OutOfSync   string // why, if out of sync
	LastCut     uint64
	LastStaged  uint64
	LastApplied uint64

	Open       EpochStats // writes since the last cut
	LastSealed EpochStats // the epoch of the last cut
	MaxEpoch   EpochStats // the largest epoch sealed so far
	HeldEpochs int        // sealed epochs not applied yet
	HeldBytes  int64      // memory held by buffered writes (open and sealed)

	DirectWrites  uint64 // written straight to the image (before the first cut)
	DirectBytes   uint64
	Reads         uint64
	ReadBytes     uint64
	StagedBytes   uint64 // data bytes written to redo files
	AppliedWrites uint64
	AppliedBytes  uint64
}

// Target is the standby's copy of one guest disk: the replica image and
// the writes of epochs not yet applied to it. It is safe for concurrent
// use.
type Target struct {
	img   Image
	size  int64
	limit int64
	file  *os.File // closed by Close when OpenTarget opened it

	mu            sync.RWMutex
	protected     bool
	open          *epochWrites
	sealed        []*epochWrites // not applied, oldest first
	lastCut       uint64
	lastStaged    uint64
	lastApplied   uint64
	imageUnsynced bool // direct writes not yet fsynced
	outOfSync     error
	stats         Stats
	// resets counts Reset calls: a connection opened before the last one
	// belongs to a replaced mirror, and neither its late writes nor its
	// end may touch the new replica.
	resets uint64
}

// errReplaced refuses a write of a mirror connection opened before the
// last Reset (its writes arrive late, e.g. after a partition healed).
var errReplaced = errors.New("this mirror connection predates the replica's reset: its mirror was replaced")

// Resets returns how many times the Target was Reset.
func (t *Target) Resets() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.resets
}

// NewTarget returns a Target over img, which holds size bytes.
func NewTarget(img Image, size int64, opts Options) *Target {
	if opts.MaxBufferedBytes <= 0 {
		opts.MaxBufferedBytes = DefaultMaxBufferedBytes
	}
	return &Target{img: img, size: size, limit: opts.MaxBufferedBytes, open: &epochWrites{}}
}

// OpenTarget opens the raw image file at path (it must exist and have the
// guest disk's size).
func OpenTarget(path string, opts Options) (*Target, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	t, err := NewFileTarget(f, opts)
	if err != nil {
		f.Close()
	}
	return t, err
}

// NewFileTarget is a Target on an open image file of the guest disk's
// size; Close closes f.
func NewFileTarget(f *os.File, opts Options) (*Target, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	t := NewTarget(f, fi.Size(), opts)
	t.file = f
	return t, nil
}

// Size is the size of the image in bytes.
func (t *Target) Size() int64 { return t.size }

// Close closes the image file if OpenTarget opened it.
func (t *Target) Close() error {
	if t.file == nil {
		return nil
	}
	return t.file.Close()
}

func (t *Target) inRange(off, n int64) error {
	if off < 0 || n < 0 || off > t.size || n > t.size-off {
		return fmt.Errorf("range [%d, +%d) outside the %d-byte image", off, n, t.size)
	}
	return nil
}

// writeError is a write the replica refused; the NBD server answers it
// with ENOSPC (over the memory limit) or EIO.
type writeError struct {
	err     error
	nospace bool
}

func (e *writeError) Error() string { return e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

// Write writes data at off: to the image before the first cut, to the open
// epoch after it. data is copied.
func (t *Target) Write(off int64, data []byte) error {
	return t.write(anyResets, off, int64(len(data)), data)
}

// WriteZeroes writes n zero bytes at off.
func (t *Target) WriteZeroes(off, n int64) error { return t.write(anyResets, off, n, nil) }

// anyResets: a write not tied to a connection's reset count.
const anyResets = ^uint64(0)

var zeroBlock = make([]byte, 64<<10)

// zeroRange makes [off, off+n) of img read as zeroes: a hole punched in a
// file (a TRIM of gigabytes costs nothing), else zeroes written.
func zeroRange(img Image, off, n int64) error {
	if f, ok := img.(interface{ Fd() uintptr }); ok {
		err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
			return err
		}
	}
	for done := int64(0); done < n; {
		c := min(n-done, int64(len(zeroBlock)))
		if _, err := img.WriteAt(zeroBlock[:c], off+done); err != nil {
			return err
		}
		done += c
	}
	return nil
}

func (t *Target) write(resets uint64, off, n int64, data []byte) error {
	if err := t.inRange(off, n); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if resets != anyResets && resets != t.resets {
		return &writeError{err: errReplaced}
	}
	if t.outOfSync != nil {
		return &writeError{err: t.outOfSync}
	}
	if !t.protected {
		var err error
		if data != nil {
			_, err = t.img.WriteAt(data, off)
		} else {
			err = zeroRange(t.img, off, n)
		}
		if err != nil {
			return &writeError{err: fmt.Errorf("write to the replica image: %w", err)}
		}
		t.imageUnsynced = true
		t.stats.DirectWrites++
		t.stats.DirectBytes += uint64(n)
		return nil
	}
	x := extent{off: off, n: n}
	cost := int64(extentOverhead)
	if data != nil {
		x.data = append([]byte(nil), data...)
		cost += n
	}
	if held := t.heldLocked(); held+cost > t.limit {
		t.outOfSync = fmt.Errorf("%w: buffered disk writes would exceed %d bytes (epoch after %d holds %d writes, %d sealed epochs not applied); reset the replica and mirror again",
			ErrOutOfSync, t.limit, t.lastCut, len(t.open.writes), len(t.sealed))
		return &writeError{err: t.outOfSync, nospace: true}
	}
	t.open.add(x)
	return nil
}

func (t *Target) heldLocked() int64 {
	h := t.open.cost
	for _, e := range t.sealed {
		h += e.cost
	}
	return h
}

// ReadAt reads the disk as the guest wrote it: the image with the buffered
// writes over it.
func (t *Target) ReadAt(p []byte, off int64) error {
	if err := t.inRange(off, int64(len(p))); err != nil {
		return err
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	if _, err := t.img.ReadAt(p, off); err != nil && !(errors.Is(err, io.EOF)) {
		return fmt.Errorf("read the replica image: %w", err)
	}
	for _, e := range t.sealed {
		e.overlay(p, off)
	}
	t.open.overlay(p, off)
	return nil
}

// Flush makes direct writes durable. Buffered writes become durable when
// their epoch is staged, so it does nothing for them.
func (t *Target) Flush() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.protected || !t.imageUnsynced {
		return nil
	}
	if err := t.img.Sync(); err != nil {
		return fmt.Errorf("sync the replica image: %w", err)
	}
	t.imageUnsynced = false
	return nil
}

// Cut seals the writes since the last cut as epoch's. The primary calls it
// (through the control path) while its guest is paused, after QEMU's stop
// drained the guest's I/O, so the epoch holds exactly the writes the guest
// completed before the pause. The first cut starts buffering: the image
// then holds everything written before it.
func (t *Target) Cut(epoch uint64) (EpochStats, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.outOfSync != nil {
		return EpochStats{}, t.outOfSync
	}
	if epoch <= t.lastCut {
		return EpochStats{}, fmt.Errorf("cut of epoch %d: not after the last cut epoch %d", epoch, t.lastCut)
	}
	t.protected = true
	e := t.open
	e.epoch = epoch
	t.open = &epochWrites{}
	if len(e.writes) > 0 {
		t.sealed = append(t.sealed, e)
	}
	t.lastCut = epoch
	st := EpochStats{Epoch: epoch, Writes: len(e.writes), Bytes: e.bytes}
	t.stats.LastSealed = st
	if st.Bytes > t.stats.MaxEpoch.Bytes || t.stats.MaxEpoch.Epoch == 0 {
		t.stats.MaxEpoch = st
	}
	return st, nil
}

// StageInfo describes a redo file Stage wrote.
type StageInfo struct {
	First, Last uint64 // the epochs it brings the image from (First-1) to
	Epochs      int    // sealed epochs with writes in it
	Writes      int
	Bytes       int64 // data bytes (zeroes included)
	FileBytes   int64
}

// Stage writes the sealed writes of every epoch up to epoch that is not
// applied yet, in order, to a redo file at path (CRC'd, fsynced, renamed
// into place), so that Apply(path) brings the image to epoch even after a
// crash. Call it when epoch is complete on the standby, before recording
// its commit. The first Stage also makes the initial sync durable.
func (t *Target) Stage(epoch uint64, path string) (StageInfo, error) {
	t.mu.RLock()
	lastCut, applied, unsynced := t.lastCut, t.lastApplied, t.imageUnsynced
	var eps []*epochWrites
	for _, e := range t.sealed {
		if e.epoch <= epoch {
			eps = append(eps, e)
		}
	}
	t.mu.RUnlock()
	if epoch > lastCut {
		return StageInfo{}, fmt.Errorf("stage epoch %d: %w (last cut %d)", epoch, ErrNotCut, lastCut)
	}
	if epoch <= applied {
		return StageInfo{}, fmt.Errorf("stage epoch %d: already applied (applied through %d)", epoch, applied)
	}
	if unsynced {
		if err := t.syncImage(); err != nil {
			return StageInfo{}, err
		}
	}
	info, err := writeRedo(path, applied+1, epoch, t.size, eps)
	if err != nil {
		return StageInfo{}, fmt.Errorf("stage epoch %d: %w", epoch, err)
	}
	t.mu.Lock()
	t.lastStaged = max(t.lastStaged, epoch)
	t.stats.StagedBytes += uint64(info.Bytes)
	t.mu.Unlock()
	return info, nil
}

func (t *Target) syncImage() error {
	if err := t.img.Sync(); err != nil {
		return fmt.Errorf("sync the replica image: %w", err)
	}
	t.mu.Lock()
	if t.protected {
		t.imageUnsynced = false // no direct writes can follow
	}
	t.mu.Unlock()
	return nil
}

// ApplyInfo describes an applied redo file.
type ApplyInfo struct {
	First, Last uint64
	Writes      int
	Bytes       int64
}

// Apply writes a redo file from Stage into the image and fsyncs it, then
// drops the epochs it holds from memory. Applying the same file again is
// harmless, so a crash in the middle is repaired by applying it again; a
// corrupt file is rejected before anything is written. Apply files in
// the order they were staged.
func (t *Target) Apply(path string) (ApplyInfo, error) {
	// Reads meanwhile still see the epochs in memory over the image, so
	// the image may change under them without the lock.
	info, err := applyRedo(t.img, t.size, path)
	if err != nil {
		return info, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	kept := t.sealed[:0]
	for _, e := range t.sealed {
		if e.epoch > info.Last {
			kept = append(kept, e)
		}
	}
	clear(t.sealed[len(kept):])
	t.sealed = kept
	t.lastApplied = max(t.lastApplied, info.Last)
	t.lastCut = max(t.lastCut, info.Last)
	t.stats.AppliedWrites += uint64(info.Writes)
	t.stats.AppliedBytes += uint64(info.Bytes)
	return info, nil
}

// Discard drops the writes of epochs after epoch, and those of the open
// epoch: on failover, epoch is the last committed one. Epochs already
// applied cannot be discarded.
func (t *Target) Discard(epoch uint64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if epoch < t.lastApplied {
		return fmt.Errorf("discard after epoch %d: epochs through %d are already applied", epoch, t.lastApplied)
	}
	kept := t.sealed[:0]
	for _, e := range t.sealed {
		if e.epoch <= epoch {
			kept = append(kept, e)
		}
	}
	clear(t.sealed[len(kept):])
	t.sealed = kept
	t.open = &epochWrites{}
	t.lastCut = min(t.lastCut, epoch)
	t.lastStaged = min(t.lastStaged, epoch)
	return nil
}

// Reset drops every buffered write and returns to initial sync (writes go
// to the image), for a new full mirror after the replica fell out of sync.
// Epoch numbers keep growing: the next Cut must be after the last one.
func (t *Target) Reset() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.protected = false
	t.open = &epochWrites{}
	t.sealed = nil
	t.outOfSync = nil
	t.resets++
	t.imageUnsynced = true
	// A new mirror comes with a new primary generation (its agent
	// restarted, say), whose epochs count from 1 again.
	t.lastCut, t.lastStaged, t.lastApplied = 0, 0, 0
}

// markOutOfSync records why the replica cannot follow the guest anymore;
// only while epochs are being cut (before, a new mirror starts over anyway).
func (t *Target) markOutOfSync(resets uint64, reason string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.protected && t.outOfSync == nil && resets == t.resets {
		t.outOfSync = fmt.Errorf("%w: %s after epoch %d", ErrOutOfSync, reason, t.lastCut)
	}
}

// Err returns why the replica is out of sync, or nil.
func (t *Target) Err() error {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.outOfSync
}

// Stats returns the Target's counters.
func (t *Target) Stats() Stats {
	t.mu.RLock()
	defer t.mu.RUnlock()
	s := t.stats
	s.Protected = t.protected
	if t.outOfSync != nil {
		s.OutOfSync = t.outOfSync.Error()
	}
	s.LastCut, s.LastStaged, s.LastApplied = t.lastCut, t.lastStaged, t.lastApplied
	s.Open = EpochStats{Writes: len(t.open.writes), Bytes: t.open.bytes}
	s.HeldEpochs = len(t.sealed)
	s.HeldBytes = t.heldLocked()
	return s
}

func (t *Target) countRead(n int) {
	t.mu.Lock()
	t.stats.Reads++
	t.stats.ReadBytes += uint64(n)
	t.mu.Unlock()
}
