package checkpoint

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func bitmapIndices(b *Bitmap) []uint64 {
	var out []uint64
	b.Each(func(i uint64) { out = append(out, i) })
	return out
}

// dirtyOnce runs one tracker call into a fresh bitmap.
func dirtyOnce(t *testing.T, tr Tracker, mem []byte) []uint64 {
	t.Helper()
	into := NewBitmap(uint64(len(mem) / PageSize))
	if err := tr.Dirty(mem, into); err != nil {
		t.Fatal(err)
	}
	return bitmapIndices(into)
}

func TestScanTrackerReportsExactlyTheWrittenPages(t *testing.T) {
	const pages = 1000 // not a multiple of 64: the last bitmap word is partial
	for _, workers := range []int{1, 2, 3, 7, 16, 64} {
		mem := make([]byte, pages*PageSize)
		tr := NewScanTracker(len(mem))
		tr.workers = workers
		if tr.Name() != TrackerScan {
			t.Fatalf("Name() = %q", tr.Name())
		}

		// First call: everything, even though RAM is all zeros.
		if got := dirtyOnce(t, tr, mem); len(got) != pages || got[0] != 0 || got[pages-1] != pages-1 {
			t.Fatalf("workers=%d: first call reported %d pages, want all %d", workers, len(got), pages)
		}
		// Nothing written: nothing reported.
		if got := dirtyOnce(t, tr, mem); len(got) != 0 {
			t.Fatalf("workers=%d: idle guest reported %v", workers, got)
		}
		// Single bytes at the edges of pages and of bitmap words.
		write := map[uint64]int{0: 0, 1: PageSize - 1, 63: 2048, 64: 0, 65: 1, 127: 4095, 128: 17, 511: 3000, 998: 1, pages - 1: PageSize - 1}
		for p, off := range write {
			mem[int(p)*PageSize+off] ^= 0x40
		}
		got := dirtyOnce(t, tr, mem)
		want := make([]uint64, 0, len(write))
		for p := range write {
			want = append(want, p)
		}
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("workers=%d: reported %v, want %v", workers, got, want)
		}
		if got := dirtyOnce(t, tr, mem); len(got) != 0 {
			t.Fatalf("workers=%d: pages reported twice: %v", workers, got)
		}
		if err := tr.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestScanTrackerEveryByteOfAPage(t *testing.T) {
	mem := make([]byte, 3*PageSize)
	tr := NewScanTracker(len(mem))
	dirtyOnce(t, tr, mem)
	for off := 0; off < PageSize; off++ {
		mem[PageSize+off]++
		got := dirtyOnce(t, tr, mem)
		if len(got) != 1 || got[0] != 1 {
			t.Fatalf("one byte at offset %d of page 1: reported %v", off, got)
		}
	}
}

func TestScanTrackerRewrittenToSameContent(t *testing.T) {
	mem := make([]byte, 8*PageSize)
	for i := range mem {
		mem[i] = byte(i / 7)
	}
	tr := NewScanTracker(len(mem))
	dirtyOnce(t, tr, mem)
	// Page 2 written and written back between two calls: its content did not
	// change, so not reporting it is correct (the replica already has it).
	orig := bytes.Clone(mem[2*PageSize : 3*PageSize])
	fillRandom(newRand(9), mem[2*PageSize:3*PageSize])
	copy(mem[2*PageSize:], orig)
	// Page 5 written to new content.
	mem[5*PageSize+100] = 0xee
	if got := dirtyOnce(t, tr, mem); !slices.Equal(got, []uint64{5}) {
		t.Fatalf("reported %v, want [5]", got)
	}
}

func TestScanTrackerAddsToTheBitmap(t *testing.T) {
	mem := make([]byte, 200*PageSize)
	tr := NewScanTracker(len(mem))
	dirtyOnce(t, tr, mem)
	into := NewBitmap(200)
	into.Set(7) // from an earlier, failed capture
	mem[150*PageSize] = 1
	if err := tr.Dirty(mem, into); err != nil {
		t.Fatal(err)
	}
	if got := bitmapIndices(into); !slices.Equal(got, []uint64{7, 150}) {
		t.Fatalf("bitmap holds %v, want [7 150]: Dirty must add, not replace", got)
	}
}

// The tracker's report must equal the set of pages whose content differs
// from what it saw at the previous call, over many random rounds.
func TestScanTrackerRandomModel(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	r := newRand(10)
	const pages = 777
	mem := make([]byte, pages*PageSize)
	fillText(r, mem)
	tr := NewScanTracker(len(mem))
	dirtyOnce(t, tr, mem)
	prev := bytes.Clone(mem)
	for round := range 30 {
		for range r.IntN(60) {
			p := r.IntN(pages)
			switch r.IntN(4) {
			case 0:
				mem[p*PageSize+r.IntN(PageSize)] = byte(r.Uint32())
			case 1:
				clear(mem[p*PageSize : (p+1)*PageSize])
			case 2:
				fillRandom(r, mem[p*PageSize:(p+1)*PageSize])
			case 3: // rewrite with what it already holds
				copy(mem[p*PageSize:(p+1)*PageSize], bytes.Clone(mem[p*PageSize:(p+1)*PageSize]))
			}
		}
		var want []uint64
		for p := range pages {
			if !bytes.Equal(mem[p*PageSize:(p+1)*PageSize], prev[p*PageSize:(p+1)*PageSize]) {
				want = append(want, uint64(p))
			}
		}
		if got := dirtyOnce(t, tr, mem); !slices.Equal(got, want) {
			t.Fatalf("round %d: reported %v, want %v", round, got, want)
		}
		copy(prev, mem)
	}
}

func TestScanTrackerSizeMismatch(t *testing.T) {
	mem := make([]byte, 64*PageSize)
	tr := NewScanTracker(len(mem))
	for name, c := range map[string]struct {
		mem  []byte
		bits uint64
	}{
		"smaller RAM":    {mem[:63*PageSize], 63},
		"larger RAM":     {make([]byte, 65*PageSize), 65},
		"smaller bitmap": {mem, 63},
		"larger bitmap":  {mem, 65},
		"empty RAM":      {nil, 0},
	} {
		err := tr.Dirty(c.mem, NewBitmap(c.bits))
		if err == nil || !strings.Contains(err.Error(), "scan tracker") {
			t.Errorf("%s: Dirty = %v, want a size error", name, err)
		}
	}
	// A refused call does not prime the tracker: the first real call still
	// reports everything.
	if got := dirtyOnce(t, tr, mem); len(got) != 64 {
		t.Fatalf("first good call after refused ones reported %d pages, want 64", len(got))
	}
}

func TestScanTrackerEmpty(t *testing.T) {
	tr := NewScanTracker(0)
	if err := tr.Dirty(nil, NewBitmap(0)); err != nil {
		t.Fatalf("zero-size guest: %v", err)
	}
}

func TestSoftDirtySupportedDoesNotPanic(t *testing.T) {
	a := SoftDirtySupported()
	b := SoftDirtySupported()
	if a != b {
		t.Fatalf("SoftDirtySupported changed its answer: %v then %v", a, b)
	}
	t.Logf("soft-dirty tracking supported by this kernel: %v", a)
}

// shmMapping maps a fresh file of n pages shared, as QEMU maps guest RAM.
func shmMapping(t *testing.T, n int) (string, []byte) {
	t.Helper()
	dir := "/dev/shm"
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = t.TempDir()
	}
	f, err := os.CreateTemp(dir, "remora-checkpoint-test-*")
	if err != nil {
		t.Fatal(err)
	}
	path := f.Name()
	t.Cleanup(func() { os.Remove(path) })
	defer f.Close()
	if err := f.Truncate(int64(n * PageSize)); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, n*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	return path, mem
}

func TestNewSoftDirtyTrackerFindsTheMapping(t *testing.T) {
	const pages = 64
	path, mem := shmMapping(t, pages)
	start, size, err := findMapping(os.Getpid(), path)
	if err != nil {
		t.Fatal(err)
	}
	if start != uint64(uintptrOf(mem)) || size != pages*PageSize {
		t.Fatalf("findMapping = %#x+%d, want %#x+%d", start, size, uintptrOf(mem), pages*PageSize)
	}
	if _, err := NewSoftDirtyTracker(os.Getpid(), path, (pages+1)*PageSize); err == nil {
		t.Fatal("a RAM size larger than the mapping was accepted")
	}
	missing := filepath.Join(filepath.Dir(path), "remora-not-mapped")
	if _, err := NewSoftDirtyTracker(os.Getpid(), missing, PageSize); err == nil || !strings.Contains(err.Error(), "not mapped") {
		t.Fatalf("unmapped path: %v", err)
	}
	tr, err := NewSoftDirtyTracker(os.Getpid(), path, pages*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if tr.Name() != TrackerSoftDirty {
		t.Fatalf("Name() = %q", tr.Name())
	}
}

func TestSoftDirtyTrackerOnOwnProcess(t *testing.T) {
	if !SoftDirtySupported() {
		t.Skip("kernel without CONFIG_MEM_SOFT_DIRTY")
	}
	const pages = 256
	path, mem := shmMapping(t, pages)
	for i := range mem { // make every page present
		mem[i] = byte(i)
	}
	tr, err := NewSoftDirtyTracker(os.Getpid(), path, pages*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if got := dirtyOnce(t, tr, mem); len(got) != pages {
		t.Fatalf("first call reported %d pages, want %d", len(got), pages)
	}
	// The Go runtime writes nothing to this mapping, so only our writes show.
	written := []uint64{0, 3, 64, 100, pages - 1}
	for _, p := range written {
		mem[p*PageSize+5]++
	}
	got := dirtyOnce(t, tr, mem)
	for _, p := range written {
		if !slices.Contains(got, p) {
			t.Fatalf("written page %d not reported (got %v)", p, got)
		}
	}
	if len(got) != len(written) {
		t.Fatalf("reported %v, want exactly %v", got, written)
	}
	if got := dirtyOnce(t, tr, mem); len(got) != 0 {
		t.Fatalf("nothing written, reported %v", got)
	}
}

func BenchmarkScanTracker(b *testing.B) {
	const size = 256 << 20
	mem := make([]byte, size)
	r := newRand(11)
	for p := 0; p < size/PageSize; p += 3 { // a third of the pages hold data
		fillText(r, mem[p*PageSize:(p+1)*PageSize])
	}
	tr := NewScanTracker(size)
	into := NewBitmap(size / PageSize)
	if err := tr.Dirty(mem, into); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		mem[(i*7919%(size/PageSize))*PageSize]++ // a page changes between scans
		into.Clear()
		if err := tr.Dirty(mem, into); err != nil {
			b.Fatal(err)
		}
	}
	el := time.Since(start).Seconds()
	b.ReportMetric(float64(size)*float64(b.N)/el/1e9, "GB/s")
	b.ReportMetric(float64(runtime.GOMAXPROCS(0)), "workers")
}
