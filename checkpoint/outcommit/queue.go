package outcommit

import (
	"fmt"
	"time"
)

// The per-epoch queue, without I/O. Every captured frame has a position in
// the capture stream (the byte offsets of its record); Cut records the
// stream position at which an epoch ends. A frame belongs to the first
// closed segment whose end is at or after the frame's end, else to the open
// segment. Frames are assigned when they are parsed, which may be after the
// Cut that decides their epoch: the reader is allowed to lag.
//
// A frame that straddles a cut (begins before it, ends after it) goes to
// the later segment: never released early. QEMU writes whole frames before
// `stop` returns, so that does not happen; it is counted (MisalignedFrames)
// so tests can show it.
//
// The caller holds a lock around every method.

type segKind uint8

const (
	segEpoch   segKind = iota // frames held until their epoch is released
	segForward                // frames passed on at once (before the first cut; after ReleaseAll)
	segDiscard                // frames dropped as they come (DiscardAfter)
)

func (k segKind) String() string {
	switch k {
	case segEpoch:
		return "epoch"
	case segForward:
		return "forward"
	default:
		return "discard"
	}
}

type heldFrame struct {
	rec record
	at  time.Time // when the agent read it
}

type segment struct {
	kind   segKind
	epoch  uint64 // for closed epoch segments
	end    int64  // stream offset where it ends; -1 while open
	frames []heldFrame
	bytes  int64
}

func (s *segment) open() bool { return s.end < 0 }

type queue struct {
	max  int64      // held bytes limit
	segs []*segment // closed segments in stream order, the open one last
	base int64      // end of the last segment popped

	heldBytes  int64 // frame bytes in epoch segments
	heldFrames int

	cutAny       bool
	lastCut      uint64
	lastReleased uint64

	out []heldFrame // frames to send on, in order

	releasedFrames, releasedBytes   uint64
	droppedFrames, droppedBytes     uint64
	discardedFrames, discardedBytes uint64
	forwardedFrames, forwardedBytes uint64
	misalignedFrames                uint64
}

// newQueue returns a queue whose open segment holds frames (hold) or
// passes them on until the first cut.
func newQueue(maxBytes int64, hold bool) *queue {
	q := &queue{max: maxBytes}
	k := segForward
	if hold {
		k = segEpoch
	}
	q.segs = []*segment{{kind: k, end: -1}}
	return q
}

func (q *queue) openSeg() *segment { return q.segs[len(q.segs)-1] }

// add assigns a parsed frame to its segment. Frames come in stream order.
func (q *queue) add(r record, at time.Time) {
	end := r.end()
	prev := q.base
	var seg *segment
	for _, s := range q.segs {
		if s.open() || end <= s.end {
			seg = s
			break
		}
		prev = s.end
	}
	if r.start < prev && end > prev {
		q.misalignedFrames++
	}
	n := int64(len(r.frame()))
	switch seg.kind {
	case segForward:
		if seg != q.segs[0] {
			// Earlier epochs are still held: passing this frame on now
			// would overtake them. popTo forwards it after them.
			seg.frames = append(seg.frames, heldFrame{rec: r, at: at})
			return
		}
		q.forward(heldFrame{rec: r, at: at})
	case segDiscard:
		q.discardedFrames++
		q.discardedBytes += uint64(n)
	case segEpoch:
		if q.heldBytes+n > q.max {
			q.droppedFrames++
			q.droppedBytes += uint64(n)
			return
		}
		seg.frames = append(seg.frames, heldFrame{rec: r, at: at})
		seg.bytes += n
		q.heldBytes += n
		q.heldFrames++
	}
}

func (q *queue) forward(f heldFrame) {
	q.out = append(q.out, f)
	q.forwardedFrames++
	q.forwardedBytes += uint64(len(f.rec.frame()))
}

// forwardFront passes on the frames a forward segment kept while it was
// behind held epochs, once it is the first segment.
func (q *queue) forwardFront() {
	if s := q.segs[0]; s.kind == segForward {
		for _, f := range s.frames {
			q.forward(f)
		}
		s.frames = nil
	}
}

// lastEnd is the end of the last closed segment (or of the popped ones).
func (q *queue) lastEnd() int64 {
	for i := len(q.segs) - 1; i >= 0; i-- {
		if !q.segs[i].open() {
			return q.segs[i].end
		}
	}
	return q.base
}

// cut closes the open segment at stream position pos as epoch; the new open
// segment holds frames.
func (q *queue) cut(epoch uint64, pos int64) error {
	if q.cutAny && epoch <= q.lastCut {
		return fmt.Errorf("outcommit: Cut(%d) after Cut(%d): epochs must increase", epoch, q.lastCut)
	}
	if le := q.lastEnd(); pos < le {
		return fmt.Errorf("outcommit: Cut(%d) at stream offset %d, before the previous cut at %d", epoch, pos, le)
	}
	o := q.openSeg()
	o.end = pos
	o.epoch = epoch
	q.segs = append(q.segs, &segment{kind: segEpoch, end: -1})
	q.cutAny = true
	q.lastCut = epoch
	return nil
}

// releaseTarget returns the stream position the reader must have reached
// before release(epoch) can take every frame of epochs <= epoch; ok is
// false when no such epoch is held.
func (q *queue) releaseTarget(epoch uint64) (pos int64, ok bool) {
	for _, s := range q.segs {
		if s.open() {
			break
		}
		if s.kind == segEpoch && s.epoch <= epoch {
			pos, ok = s.end, true
		}
	}
	return pos, ok
}

// popTo moves the frames of every closed segment that ends at or before pos
// to out (epoch segments) and drops those segments. The reader must have
// passed pos.
func (q *queue) popTo(pos int64) {
	i := 0
	for ; i < len(q.segs); i++ {
		s := q.segs[i]
		if s.open() || s.end > pos {
			break
		}
		if s.kind == segEpoch {
			q.out = append(q.out, s.frames...)
			q.heldBytes -= s.bytes
			q.heldFrames -= len(s.frames)
			q.releasedFrames += uint64(len(s.frames))
			q.releasedBytes += uint64(s.bytes)
			if s.epoch > q.lastReleased {
				q.lastReleased = s.epoch
			}
		}
		if s.kind == segForward {
			for _, f := range s.frames {
				q.forward(f)
			}
		}
		q.base = s.end
	}
	q.segs = append(q.segs[:0], q.segs[i:]...)
	q.forwardFront()
}

// gc drops closed forward and discard segments at the front that the
// reader has passed (consumed is its position).
func (q *queue) gc(consumed int64) {
	i := 0
	for ; i < len(q.segs); i++ {
		s := q.segs[i]
		if s.open() || s.kind == segEpoch || s.end > consumed {
			break
		}
		q.base = s.end
	}
	q.segs = append(q.segs[:0], q.segs[i:]...)
	q.forwardFront()
}

func (q *queue) discardSeg(s *segment) {
	q.discardedFrames += uint64(len(s.frames))
	q.discardedBytes += uint64(s.bytes)
	q.heldBytes -= s.bytes
	q.heldFrames -= len(s.frames)
	s.frames, s.bytes = nil, 0
	s.kind = segDiscard
}

// discardAfter drops every frame of epochs > epoch and of the open epoch
// (up to stream position pos, which is where the stream is now: frames
// written after this call belong to the new open epoch). A forward open
// segment holds nothing and stays as it is.
func (q *queue) discardAfter(epoch uint64, pos int64) {
	for _, s := range q.segs {
		if !s.open() && s.kind == segEpoch && s.epoch > epoch {
			q.discardSeg(s)
		}
	}
	if o := q.openSeg(); o.kind == segEpoch {
		if le := q.lastEnd(); pos < le {
			pos = le
		}
		q.discardSeg(o)
		o.end = pos
		q.segs = append(q.segs, &segment{kind: segEpoch, end: -1})
	}
	if q.cutAny && q.lastCut > epoch {
		q.lastCut = epoch
	}
}

// releaseAllTarget closes the open segment at pos so that everything held up
// to there is released by popTo(pos), and makes the new open segment pass
// frames on at once.
func (q *queue) releaseAllTarget(pos int64) int64 {
	if le := q.lastEnd(); pos < le {
		pos = le
	}
	o := q.openSeg()
	o.end = pos
	if o.kind == segEpoch {
		// Not an epoch of the caller's: keep lastCut; count it as released
		// under the last epoch cut.
		o.epoch = q.lastCut
	}
	q.segs = append(q.segs, &segment{kind: segForward, end: -1})
	return pos
}

// dropAll discards every held frame (Close without release).
func (q *queue) dropAll() {
	for _, s := range q.segs {
		if s.kind == segEpoch {
			q.discardSeg(s)
		}
	}
}

// takeOut returns the frames to send on and empties the list.
func (q *queue) takeOut() []heldFrame {
	out := q.out
	q.out = nil
	return out
}

func (q *queue) openFrames() int {
	if o := q.openSeg(); o.kind == segEpoch {
		return len(o.frames)
	}
	return 0
}
