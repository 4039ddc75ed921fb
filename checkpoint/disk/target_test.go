package disk

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// memImage is an in-memory Image; failSync makes Sync fail.
type memImage struct {
	b        []byte
	syncs    int
	failSync error
}

func (m *memImage) ReadAt(p []byte, off int64) (int, error) { return copy(p, m.b[off:]), nil }
func (m *memImage) WriteAt(p []byte, off int64) (int, error) {
	return copy(m.b[off:], p), nil
}
func (m *memImage) Sync() error { m.syncs++; return m.failSync }

func newMemTarget(size int, opts Options) (*Target, *memImage) {
	img := &memImage{b: make([]byte, size)}
	return NewTarget(img, int64(size), opts), img
}

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed + byte(i*7)
	}
	return p
}

func mustRead(t *testing.T, tg *Target, off, n int64) []byte {
	t.Helper()
	p := make([]byte, n)
	if err := tg.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDirectWritesBeforeFirstCut(t *testing.T) {
	tg, img := newMemTarget(64<<10, Options{})
	if err := tg.Write(4096, pattern(4096, 1)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img.b[4096:8192], pattern(4096, 1)) {
		t.Fatal("a write before the first cut did not reach the image")
	}
	if err := tg.WriteZeroes(4096, 512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img.b[4096:4608], make([]byte, 512)) {
		t.Fatal("write-zeroes before the first cut did not reach the image")
	}
	if err := tg.Flush(); err != nil || img.syncs != 1 {
		t.Fatalf("flush: %v, %d syncs", err, img.syncs)
	}
	if err := tg.Write(60<<10, make([]byte, 8192)); err == nil {
		t.Fatal("write past the end accepted")
	}
	st := tg.Stats()
	if st.Protected || st.DirectWrites != 2 || st.DirectBytes != 4096+512 {
		t.Fatalf("stats %+v", st)
	}
}

func TestBufferedAfterCut(t *testing.T) {
	tg, img := newMemTarget(64<<10, Options{})
	tg.Write(0, pattern(8192, 1)) // initial sync
	if _, err := tg.Cut(1); err != nil {
		t.Fatal(err)
	}
	before := bytes.Clone(img.b)
	tg.Write(4096, pattern(4096, 2))
	tg.WriteZeroes(0, 1024)
	tg.Write(512, pattern(512, 3))
	if !bytes.Equal(img.b, before) {
		t.Fatal("a write after the first cut reached the image")
	}
	want := bytes.Clone(before)
	copy(want[4096:], pattern(4096, 2))
	clear(want[0:1024])
	copy(want[512:], pattern(512, 3))
	if got := mustRead(t, tg, 0, 64<<10); !bytes.Equal(got, want) {
		t.Fatal("reads do not see the buffered writes over the image")
	}
	if got := mustRead(t, tg, 1000, 100); !bytes.Equal(got, want[1000:1100]) {
		t.Fatal("partial read across buffered writes differs")
	}
	st, err := tg.Cut(2)
	if err != nil || st.Writes != 3 || st.Bytes != 4096+1024+512 {
		t.Fatalf("cut 2: %+v %v", st, err)
	}
	if _, err := tg.Cut(2); err == nil {
		t.Fatal("cut 2 twice accepted")
	}
	redo := filepath.Join(t.TempDir(), "redo")
	if _, err := tg.Stage(3, redo); !errors.Is(err, ErrNotCut) {
		t.Fatalf("stage of an uncut epoch: %v", err)
	}
	info, err := tg.Stage(2, redo)
	if err != nil || info.Writes != 3 || info.First != 1 || info.Last != 2 {
		t.Fatalf("stage: %+v %v", info, err)
	}
	if img.syncs == 0 {
		t.Fatal("the first stage did not make the initial sync durable")
	}
	if _, err := tg.Apply(redo); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img.b, want) {
		t.Fatal("image after apply differs")
	}
	if s := tg.Stats(); s.HeldEpochs != 0 || s.HeldBytes != 0 || s.LastApplied != 2 || s.AppliedWrites != 3 {
		t.Fatalf("stats after apply %+v", s)
	}
	if _, err := tg.Stage(2, redo); err == nil {
		t.Fatal("stage of an applied epoch accepted")
	}
}

// A random workload over many epochs against a model of the disk: reads
// always see the latest writes, and each staged epoch applied to the image
// gives exactly the disk as it was at its cut, whatever the staging
// pattern (every epoch, or several at once).
func TestEpochsAgainstModel(t *testing.T) {
	const size = 256 << 10
	rng := rand.New(rand.NewPCG(1, 2))
	tg, img := newMemTarget(size, Options{})
	model := make([]byte, size)
	dir := t.TempDir()
	at := map[uint64][]byte{} // disk at each cut
	var staged []string
	var stagedEpoch []uint64
	for epoch := uint64(1); epoch <= 60; epoch++ {
		for range rng.IntN(20) {
			off := int64(rng.IntN(size/512)) * 512
			n := min(int64(1+rng.IntN(16))*512, size-off)
			if rng.IntN(5) == 0 {
				if err := tg.WriteZeroes(off, n); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+n])
			} else {
				p := pattern(int(n), byte(rng.Uint32()))
				if err := tg.Write(off, p); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], p)
			}
		}
		if got := mustRead(t, tg, 0, size); !bytes.Equal(got, model) {
			t.Fatalf("epoch %d: read differs from the model", epoch)
		}
		if _, err := tg.Cut(epoch); err != nil {
			t.Fatal(err)
		}
		at[epoch] = bytes.Clone(model)
		if rng.IntN(3) == 0 {
			continue // staged later, together with the next ones
		}
		p := filepath.Join(dir, "redo-"+string(rune('a'+epoch%26)))
		if _, err := tg.Stage(epoch, p); err != nil {
			t.Fatal(err)
		}
		staged, stagedEpoch = append(staged, p), append(stagedEpoch, epoch)
		if rng.IntN(2) == 0 { // apply now, or together with a later one
			for i, f := range staged {
				if _, err := tg.Apply(f); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(img.b, at[stagedEpoch[i]]) {
					t.Fatalf("image after applying epoch %d differs from the disk at its cut", stagedEpoch[i])
				}
			}
			staged, stagedEpoch = nil, nil
		}
	}
}

func TestApplyIsIdempotentAndRepairsAPartialApply(t *testing.T) {
	tg, img := newMemTarget(64<<10, Options{})
	tg.Cut(1)
	tg.Write(0, pattern(4096, 1))
	tg.Write(2048, pattern(4096, 2)) // overlaps: order matters
	tg.WriteZeroes(3000, 100)
	tg.Cut(2)
	want := mustRead(t, tg, 0, 64<<10)
	redo := filepath.Join(t.TempDir(), "redo")
	if _, err := tg.Stage(2, redo); err != nil {
		t.Fatal(err)
	}
	// A crash in the middle of an apply: only the first record written.
	b, _ := os.ReadFile(redo)
	_, recs, err := parseRedo(b, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	img.WriteAt(recs[0].data, recs[0].off)
	for range 2 {
		info, err := applyRedo(img, 64<<10, redo)
		if err != nil || info.Writes != 3 {
			t.Fatal(info, err)
		}
		if !bytes.Equal(img.b, want) {
			t.Fatal("image differs after (re)applying")
		}
	}
}

func TestCorruptRedoIsRejectedBeforeWriting(t *testing.T) {
	tg, img := newMemTarget(64<<10, Options{})
	tg.Cut(1)
	tg.Write(0, pattern(8192, 1))
	tg.Cut(2)
	redo := filepath.Join(t.TempDir(), "redo")
	if _, err := tg.Stage(2, redo); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(redo)
	before := bytes.Clone(img.b)
	for name, bad := range map[string][]byte{
		"flipped data byte": func() []byte { b := bytes.Clone(good); b[100] ^= 1; return b }(),
		"truncated":         good[:len(good)-30],
		"header only":       good[:redoHeaderLen],
		"empty":             nil,
		"bad magic":         append([]byte("XXXXXXXX"), good[8:]...),
	} {
		os.WriteFile(redo, bad, 0o600)
		if _, err := tg.Apply(redo); !errors.Is(err, ErrCorruptRedo) {
			t.Errorf("%s: %v, want ErrCorruptRedo", name, err)
		}
		if !bytes.Equal(img.b, before) {
			t.Fatalf("%s: the image changed", name)
		}
	}
	os.WriteFile(redo, good, 0o600)
	if _, err := NewTarget(&memImage{b: make([]byte, 4096)}, 4096, Options{}).Apply(redo); err == nil {
		t.Fatal("redo file for another image size accepted")
	}
}

func TestMemoryLimit(t *testing.T) {
	tg, _ := newMemTarget(1<<20, Options{MaxBufferedBytes: 3*4096 + 3*extentOverhead})
	tg.Cut(1)
	for i := range 3 {
		if err := tg.Write(int64(i)*4096, pattern(4096, byte(i))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tg.Cut(2); err != nil {
		t.Fatal(err)
	}
	err := tg.Write(0, pattern(4096, 9))
	var we *writeError
	if !errors.As(err, &we) || !we.nospace || !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("write over the limit: %v", err)
	}
	if errnoFor(err) != errNoSpc {
		t.Fatalf("errno %d, want ENOSPC", errnoFor(err))
	}
	if _, err := tg.Cut(3); !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("cut after overflow: %v", err)
	}
	if err := tg.Write(0, pattern(512, 9)); errnoFor(err) != errShutdown {
		t.Fatalf("write after overflow: %v (errno %d)", err, errnoFor(err))
	}
	// What was cut before still stages and applies.
	redo := filepath.Join(t.TempDir(), "redo")
	if _, err := tg.Stage(2, redo); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.Apply(redo); err != nil {
		t.Fatal(err)
	}
	if s := tg.Stats(); s.OutOfSync == "" || s.HeldBytes != 0 {
		t.Fatalf("stats %+v", s)
	}
	tg.Reset()
	if err := tg.Write(0, pattern(4096, 1)); err != nil {
		t.Fatalf("write after Reset: %v", err)
	}
	// A new mirror may come from a restarted primary, whose epochs count
	// from 1 again (the campaign's agent restart was refused every cut
	// until its epochs passed the old generation's).
	if _, err := tg.Cut(1); err != nil {
		t.Fatalf("the first epoch of a new generation after Reset: %v", err)
	}
	if _, err := tg.Cut(1); err == nil {
		t.Fatal("epoch numbers went back within one mirror")
	}
	if _, err := tg.Cut(2); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.Stage(2, filepath.Join(t.TempDir(), "redo2")); err != nil {
		t.Fatalf("stage after Reset: %v", err)
	}
}

func TestDiscard(t *testing.T) {
	tg, img := newMemTarget(64<<10, Options{})
	tg.Cut(1)
	tg.Write(0, pattern(4096, 1))
	tg.Cut(2)
	tg.Write(4096, pattern(4096, 2))
	tg.Cut(3)
	tg.Write(8192, pattern(4096, 3)) // open
	if err := tg.Discard(2); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 64<<10)
	copy(want, pattern(4096, 1))
	if got := mustRead(t, tg, 0, 64<<10); !bytes.Equal(got, want) {
		t.Fatal("discarded writes are still visible")
	}
	s := tg.Stats()
	if s.LastCut != 2 || s.HeldEpochs != 1 || s.Open.Writes != 0 {
		t.Fatalf("stats after discard %+v", s)
	}
	redo := filepath.Join(t.TempDir(), "redo")
	if _, err := tg.Stage(3, redo); !errors.Is(err, ErrNotCut) {
		t.Fatalf("stage of a discarded epoch: %v", err)
	}
	if _, err := tg.Stage(2, redo); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.Apply(redo); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(img.b, want) {
		t.Fatal("image differs")
	}
	if err := tg.Discard(1); err == nil {
		t.Fatal("discard of an applied epoch accepted")
	}
}

func TestStageFailsWhenTheImageCannotSync(t *testing.T) {
	tg, img := newMemTarget(4096, Options{})
	tg.Write(0, pattern(512, 1))
	tg.Cut(1)
	img.failSync = errors.New("disk gone")
	if _, err := tg.Stage(1, filepath.Join(t.TempDir(), "redo")); err == nil {
		t.Fatal("stage succeeded though the initial sync could not be made durable")
	}
}

func TestOpenTargetOnAFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "img")
	os.WriteFile(p, make([]byte, 1<<20), 0o600)
	tg, err := OpenTarget(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	if tg.Size() != 1<<20 {
		t.Fatal(tg.Size())
	}
	tg.Cut(1)
	tg.Write(512, pattern(1024, 5))
	tg.Cut(2)
	redo := p + ".redo"
	if _, err := tg.Stage(2, redo); err != nil {
		t.Fatal(err)
	}
	if _, err := ApplyRedo(p, redo); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if !bytes.Equal(b[512:1536], pattern(1024, 5)) {
		t.Fatal("ApplyRedo did not write the file")
	}
}

// A TRIM of gigabytes (NBD allows up to 4 GiB - 1 per request) is staged,
// applied and reads as zeroes; the image stays sparse.
func TestHugeTrimIsAppliable(t *testing.T) {
	const size = 5 << 30
	p := filepath.Join(t.TempDir(), "img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(pattern(8192, 3), 3<<30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	tg, err := OpenTarget(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer tg.Close()
	tg.Cut(1)
	const trim = 4<<30 - 4096
	if err := tg.WriteZeroes(1<<20, trim); err != nil {
		t.Fatal(err)
	}
	tg.Cut(2)
	redo := p + ".redo"
	if _, err := tg.Stage(2, redo); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.Apply(redo); err != nil {
		t.Fatalf("a 4 GiB trim made the replica unappliable: %v", err)
	}
	if got := mustRead(t, tg, 3<<30, 8192); !bytes.Equal(got, make([]byte, 8192)) {
		t.Fatal("trimmed range does not read as zeroes")
	}
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil || st.Blocks*512 > 64<<20 {
		t.Fatalf("image uses %d bytes after the trim (%v): zeroes were written, not punched", st.Blocks*512, err)
	}
}
