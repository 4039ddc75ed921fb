package outcommit

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// qsim drives a queue the way the Redirector does: a stream of records, a
// reader that may lag behind what was "written", cuts at the written end.
type qsim struct {
	t       *testing.T
	q       *queue
	written []record // records the guest sent, in stream order
	pos     int64    // stream end (what Cut sees: read + queued)
	read    int      // records the reader has parsed
	next    int      // frame number
}

func newQsim(t *testing.T, max int64, hold bool) *qsim {
	return &qsim{t: t, q: newQueue(max, hold)}
}

// send has the guest send n frames of size bytes each.
func (s *qsim) send(n, size int) {
	for range n {
		f := testFrame(s.next, size)
		s.next++
		raw := appendRecord(nil, f, true, 0)
		s.written = append(s.written, record{raw: raw, hdr: 8, start: s.pos})
		s.pos += int64(len(raw))
	}
}

// readAll lets the reader catch up.
func (s *qsim) readAll() {
	for ; s.read < len(s.written); s.read++ {
		s.q.add(s.written[s.read], time.Now())
	}
}

func (s *qsim) consumed() int64 {
	if s.read == 0 {
		return 0
	}
	return s.written[s.read-1].end()
}

func (s *qsim) cut(epoch uint64) {
	s.t.Helper()
	if err := s.q.cut(epoch, s.pos); err != nil {
		s.t.Fatal(err)
	}
}

// release releases epoch, letting the reader catch up first if needed;
// returns the frame numbers sent on.
func (s *qsim) release(epoch uint64) []int {
	target, ok := s.q.releaseTarget(epoch)
	if ok {
		if s.consumed() < target {
			s.readAll()
		}
		s.q.popTo(target)
	}
	return s.out()
}

func (s *qsim) out() []int {
	var ids []int
	for _, f := range s.q.takeOut() {
		ids = append(ids, frameID(f.rec))
	}
	return ids
}

func frameID(r record) int {
	f := r.frame()
	return int(f[0])<<24 | int(f[1])<<16 | int(f[2])<<8 | int(f[3])
}

func seq(from, to int) []int {
	var s []int
	for i := from; i < to; i++ {
		s = append(s, i)
	}
	return s
}

func TestQueueEpochsReleasedInOrder(t *testing.T) {
	s := newQsim(t, 1<<20, true)
	s.send(3, 100) // 0..2 -> epoch 1
	s.readAll()
	s.cut(1)
	s.send(2, 100) // 3..4 -> epoch 2 (the reader lags: not read before the cut)
	s.cut(2)
	s.send(4, 100) // 5..8 -> open
	if got := s.q.heldFrames; got != 3 {
		t.Fatalf("held %d before the reader caught up, want 3", got)
	}
	if got := s.release(0); got != nil {
		t.Fatalf("Release(0) sent %v", got)
	}
	if got := s.release(1); !slices.Equal(got, seq(0, 3)) {
		t.Fatalf("Release(1) sent %v", got)
	}
	if got := s.release(1); got != nil {
		t.Fatalf("Release(1) again sent %v", got)
	}
	// The reader caught up for epoch 2 (and read the open epoch's frames
	// too); they must not go out with epoch 2.
	if got := s.release(2); !slices.Equal(got, seq(3, 5)) {
		t.Fatalf("Release(2) sent %v", got)
	}
	if s.q.heldFrames != 4 || s.q.openFrames() != 4 {
		t.Fatalf("held %d open %d, want 4 4", s.q.heldFrames, s.q.openFrames())
	}
	if got := s.release(99); got != nil {
		t.Fatalf("Release(99) sent the open epoch: %v", got)
	}
	s.cut(3)
	if got := s.release(99); !slices.Equal(got, seq(5, 9)) {
		t.Fatalf("Release(99) sent %v", got)
	}
	if s.q.heldFrames != 0 || s.q.heldBytes != 0 || s.q.releasedFrames != 9 || s.q.lastReleased != 3 {
		t.Fatalf("after all: held %d/%d released %d last %d", s.q.heldFrames, s.q.heldBytes, s.q.releasedFrames, s.q.lastReleased)
	}
	if s.q.misalignedFrames != 0 {
		t.Fatal("misaligned frames")
	}
}

func TestQueueReleaseSeveralEpochsAtOnce(t *testing.T) {
	s := newQsim(t, 1<<20, true)
	for e := uint64(1); e <= 5; e++ {
		s.send(int(e), 60)
		s.cut(e)
	}
	// Nothing read yet: Release(4) must wait for the reader (simulated)
	// and send epochs 1..4 = frames 0..9, in order, not epoch 5.
	if got := s.release(4); !slices.Equal(got, seq(0, 10)) {
		t.Fatalf("Release(4) sent %v", got)
	}
	if got := s.release(5); !slices.Equal(got, seq(10, 15)) {
		t.Fatalf("Release(5) sent %v", got)
	}
}

func TestQueueEmptyEpochs(t *testing.T) {
	s := newQsim(t, 1<<20, true)
	s.cut(1)
	s.cut(2)
	s.send(2, 10)
	s.cut(3)
	s.cut(4)
	if got := s.release(2); got != nil {
		t.Fatalf("Release(2) sent %v", got)
	}
	if got := s.release(4); !slices.Equal(got, seq(0, 2)) {
		t.Fatalf("Release(4) sent %v", got)
	}
	if len(s.q.segs) != 1 {
		t.Fatalf("%d segments left, want the open one", len(s.q.segs))
	}
}

func TestQueueEpochsMustIncrease(t *testing.T) {
	q := newQueue(1<<20, true)
	if err := q.cut(5, 0); err != nil {
		t.Fatal(err)
	}
	if err := q.cut(5, 0); err == nil {
		t.Fatal("Cut(5) twice accepted")
	}
	if err := q.cut(4, 0); err == nil {
		t.Fatal("Cut(4) after Cut(5) accepted")
	}
	if err := q.cut(6, 100); err != nil {
		t.Fatal(err)
	}
	if err := q.cut(7, 50); err == nil {
		t.Fatal("a cut before the previous one accepted")
	}
}

func TestQueueFullDrops(t *testing.T) {
	s := newQsim(t, 1000, true)
	s.send(15, 100) // 8 bytes of header each, 100 of frame: 10 fit
	s.readAll()
	if s.q.heldFrames != 10 || s.q.droppedFrames != 5 || s.q.droppedBytes != 500 || s.q.heldBytes != 1000 {
		t.Fatalf("held %d (%d B) dropped %d (%d B)", s.q.heldFrames, s.q.heldBytes, s.q.droppedFrames, s.q.droppedBytes)
	}
	s.cut(1)
	if got := s.release(1); !slices.Equal(got, seq(0, 10)) {
		t.Fatalf("Release(1) sent %v", got)
	}
	s.send(3, 100)
	s.readAll()
	if s.q.heldFrames != 3 {
		t.Fatalf("after release the buffer should take frames again: held %d", s.q.heldFrames)
	}
}

func TestQueueDiscardAfter(t *testing.T) {
	s := newQsim(t, 1<<20, true)
	s.send(2, 50) // 0,1 -> epoch 1
	s.cut(1)
	s.send(3, 50) // 2..4 -> epoch 2
	s.readAll()
	s.cut(2)
	s.send(4, 50) // 5..8 -> epoch 3; reader lags
	s.cut(3)
	s.send(2, 50) // 9,10 -> open; reader lags
	s.q.discardAfter(1, s.pos)
	// Frames the reader reads now, that belong to epochs 3 and open, are
	// dropped as they come.
	s.readAll()
	s.send(3, 50) // 11..13: the new open epoch
	s.readAll()
	if got := s.release(3); !slices.Equal(got, seq(0, 2)) {
		t.Fatalf("Release(3) after DiscardAfter(1) sent %v", got)
	}
	if s.q.discardedFrames != 9 {
		t.Fatalf("discarded %d, want 9", s.q.discardedFrames)
	}
	// Epoch numbers above 1 may be used again.
	s.cut(2)
	if got := s.release(2); !slices.Equal(got, seq(11, 14)) {
		t.Fatalf("Release(2) after the discard sent %v", got)
	}
	if s.q.heldFrames != 0 || s.q.heldBytes != 0 {
		t.Fatalf("held %d/%d", s.q.heldFrames, s.q.heldBytes)
	}
}

func TestQueueForwardUntilFirstCut(t *testing.T) {
	s := newQsim(t, 1<<20, false)
	s.send(2, 10) // forwarded as soon as read
	s.readAll()
	if got := s.out(); !slices.Equal(got, seq(0, 2)) {
		t.Fatalf("forwarded %v", got)
	}
	s.send(2, 10) // 2,3: sent before the first cut, read after it: forwarded
	s.cut(1)
	s.send(2, 10) // 4,5: epoch 2, held
	s.readAll()
	if got := s.out(); !slices.Equal(got, seq(2, 4)) {
		t.Fatalf("forwarded %v", got)
	}
	if got := s.release(1); got != nil {
		t.Fatalf("Release(1) sent %v (epoch 1 was not held)", got)
	}
	s.cut(2)
	if got := s.release(2); !slices.Equal(got, seq(4, 6)) {
		t.Fatalf("Release(2) sent %v", got)
	}
	if s.q.forwardedFrames != 4 || s.q.releasedFrames != 2 {
		t.Fatalf("forwarded %d released %d", s.q.forwardedFrames, s.q.releasedFrames)
	}
}

func TestQueueReleaseAllThenForward(t *testing.T) {
	s2 := newQsim(t, 1<<20, true)
	s2.send(2, 10)
	s2.cut(1)
	s2.send(2, 10)
	target := s2.q.releaseAllTarget(s2.pos)
	s2.readAll() // the reader reaches the target
	s2.q.popTo(target)
	s2.send(2, 10)
	s2.readAll()
	if got := s2.out(); !slices.Equal(got, seq(0, 6)) {
		t.Fatalf("ReleaseAll then forward sent %v", got)
	}
	// A later cut holds again.
	s2.cut(2)
	s2.send(1, 10)
	s2.readAll()
	if got := s2.out(); got != nil {
		t.Fatalf("after a new cut, sent at once: %v", got)
	}
	s2.cut(3)
	if got := s2.release(3); !slices.Equal(got, []int{6}) {
		t.Fatalf("Release(3) sent %v", got)
	}
}

func TestQueueStraddlingFrameGoesLater(t *testing.T) {
	q := newQueue(1<<20, true)
	a := record{raw: appendRecord(nil, testFrame(0, 10), true, 0), hdr: 8, start: 0}
	b := record{raw: appendRecord(nil, testFrame(1, 10), true, 0), hdr: 8, start: a.end()}
	q.add(a, time.Now())
	// A cut in the middle of b (never happens with QEMU).
	if err := q.cut(1, b.start+3); err != nil {
		t.Fatal(err)
	}
	q.add(b, time.Now())
	if q.misalignedFrames != 1 {
		t.Fatalf("misaligned %d", q.misalignedFrames)
	}
	pos, _ := q.releaseTarget(1)
	q.popTo(pos)
	out := q.takeOut()
	if len(out) != 1 || frameID(out[0].rec) != 0 {
		t.Fatalf("epoch 1 released %d frames", len(out))
	}
	if q.openFrames() != 1 {
		t.Fatal("the straddling frame is not in the open epoch")
	}
}

// A randomized check against a model: every frame is released exactly once,
// in stream order, never before its epoch, unless dropped or discarded.
func TestQueueRandomAgainstModel(t *testing.T) {
	for seed := range 50 {
		s := newQsim(t, 5000, true)
		epochOf := map[int]uint64{} // frame -> epoch it was sent in (0 = open at the end)
		var epoch uint64
		var released []int
		lastReleased := uint64(0)
		r := newRand(seed)
		open := []int{}
		for range 300 {
			switch r.IntN(6) {
			case 0, 1:
				n := r.IntN(4)
				for i := range n {
					open = append(open, s.next+i)
				}
				s.send(n, 20+r.IntN(300))
			case 2:
				if r.IntN(2) == 0 {
					s.readAll()
				} else if s.read < len(s.written) {
					s.q.add(s.written[s.read], time.Now())
					s.read++
				}
			case 3:
				epoch++
				s.cut(epoch)
				for _, f := range open {
					epochOf[f] = epoch
				}
				open = nil
			case 4:
				if epoch > 0 {
					e := lastReleased + uint64(r.IntN(int(epoch-lastReleased)+1))
					got := s.release(e)
					for _, f := range got {
						if epochOf[f] == 0 || epochOf[f] > e {
							t.Fatalf("seed %d: frame %d of epoch %d released by Release(%d)", seed, f, epochOf[f], e)
						}
					}
					released = append(released, got...)
					lastReleased = max(lastReleased, e)
				}
			case 5:
				s.q.gc(s.consumed())
			}
		}
		if !slices.IsSorted(released) {
			t.Fatalf("seed %d: released out of order: %v", seed, released)
		}
		if len(slices.Compact(slices.Clone(released))) != len(released) {
			t.Fatalf("seed %d: a frame released twice", seed)
		}
		epoch++
		s.cut(epoch)
		released = append(released, s.release(epoch)...)
		total := uint64(len(released)) + s.q.droppedFrames
		if total != uint64(s.next) {
			t.Fatalf("seed %d: %d released + %d dropped != %d sent", seed, len(released), s.q.droppedFrames, s.next)
		}
		if s.q.heldBytes != 0 || s.q.heldFrames != 0 {
			t.Fatalf("seed %d: held %d/%d at the end", seed, s.q.heldFrames, s.q.heldBytes)
		}
	}
}

func newRand(seed int) *rand.Rand { return rand.New(rand.NewPCG(uint64(seed), 7)) }

// TestQueueReleaseAllKeepsOrder: frames the reader parses after ReleaseAll
// closed the held epochs, but before those were popped, must not overtake
// them (ReleaseAll waits for the reader with the lock released).
func TestQueueReleaseAllKeepsOrder(t *testing.T) {
	s := newQsim(t, 1<<20, true)
	s.send(5, 100) // 0..4 -> epoch 1
	s.cut(1)
	s.send(5, 100) // 5..9 -> open, released by ReleaseAll
	target := s.q.releaseAllTarget(s.pos)
	s.send(5, 100) // 10..14: passed on, after the held ones
	s.readAll()
	if got := s.out(); got != nil {
		t.Fatalf("frames sent on before the held epochs were popped: %v", got)
	}
	s.q.popTo(target)
	if got := s.out(); !slices.Equal(got, seq(0, 15)) {
		t.Fatalf("sent %v, want 0..14 in order", got)
	}
	s.send(2, 100) // 15..16 pass at once
	s.readAll()
	if got := s.out(); !slices.Equal(got, seq(15, 17)) {
		t.Fatalf("after ReleaseAll sent %v", got)
	}
	if s.q.forwardedFrames != 7 || s.q.releasedFrames != 10 {
		t.Fatalf("forwarded %d released %d, want 7 and 10", s.q.forwardedFrames, s.q.releasedFrames)
	}
}
