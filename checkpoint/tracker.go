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

// Seed makes the next Dirty report the pages that differ from base (page
// hashes of the standby's replica, from PageHashes): a restarted primary
// resyncs what changed, not all of RAM.
func (t *ScanTracker) Seed(base []uint64) {
	copy(t.hashes, base)
	t.primed = true
}

// Seeder is a Tracker that can start from page hashes (ScanTracker).
type Seeder interface {
	Seed(base []uint64)
}

// PageHash is the hash a replica's page is compared by.
func PageHash(page []byte) uint64 { return xxh3.Hash(page) }

// PageHashes returns PageHash of every page of mem, in parallel.
func PageHashes(mem []byte) []uint64 {
	pages := len(mem) / PageSize
	out := make([]uint64, pages)
	workers := runtime.GOMAXPROCS(0)
	per := (pages + workers - 1) / workers
	var wg sync.WaitGroup
	for lo := 0; lo < pages; lo += per {
		hi := min(lo+per, pages)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := lo; p < hi; p++ {
				out[p] = PageHash(mem[p*PageSize : (p+1)*PageSize])
			}
		}()
	}
	wg.Wait()
	return out
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
				h := PageHash(mem[p*PageSize : (p+1)*PageSize])
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
