package checkpoint

import (
	"fmt"
	"runtime"
	"sync"

	"github.com/zeebo/xxh3"
)

// Tracker finds the guest pages written since its previous call. It is
// called with the guest paused, so the answer is exact for that cut.
// The first call reports every page.
type Tracker interface {
	Name() string
	// Dirty adds the pages written since the last call to into.
	Dirty(mem []byte, into *Bitmap) error
	Close() error
}

// Tracker names accepted in configuration.
const (
	TrackerAuto      = "auto"
	TrackerScan      = "scan"
	TrackerSoftDirty = "softdirty"
)

// ScanTracker compares a per-page hash with the previous epoch's. It needs
// nothing from the kernel and costs one pass over guest RAM per epoch.
type ScanTracker struct {
	hashes  []uint64
	primed  bool
	workers int
}

// NewScanTracker returns a tracker for a guest of the given RAM size.
func NewScanTracker(ramBytes int) *ScanTracker {
	return &ScanTracker{hashes: make([]uint64, ramBytes/PageSize), workers: runtime.GOMAXPROCS(0)}
}

func (t *ScanTracker) Name() string { return TrackerScan }
func (t *ScanTracker) Close() error { return nil }

func (t *ScanTracker) Dirty(mem []byte, into *Bitmap) error {
	pages := len(mem) / PageSize
	if pages != len(t.hashes) || uint64(pages) != into.Len() {
		return fmt.Errorf("scan tracker: RAM is %d pages, tracker has %d, bitmap %d", pages, len(t.hashes), into.Len())
	}
	// Workers own whole bitmap words, so they never write the same word.
	words := (pages + 63) / 64
	per := (words + t.workers - 1) / t.workers
	var wg sync.WaitGroup
	for w := 0; w < t.workers; w++ {
		lo, hi := w*per, min((w+1)*per, words)
		if lo >= hi {
			break
		}
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			for p := lo * 64; p < min(hi*64, pages); p++ {
				h := xxh3.Hash(mem[p*PageSize : (p+1)*PageSize])
				if !t.primed || h != t.hashes[p] {
					t.hashes[p] = h
					into.Set(uint64(p))
				}
			}
		}(lo, hi)
	}
	wg.Wait()
	t.primed = true
	return nil
}
