package main

import (
	"sync/atomic"
	"time"
)

// Writer rewrites the region at a page rate. Each tick it writes the pages
// owed since the last tick in one burst, so high rates (tens of thousands of
// pages per second) need no fine-grained timer. If the guest was paused, or
// the CPU cannot keep up, the debt is capped at maxDebt of pages: the
// writer never tries to catch up on a long pause in one go.
type Writer struct {
	region *Region
	rate   atomic.Int64 // pages per second; 0 stops the writer
}

const (
	writerTick = 10 * time.Millisecond
	maxDebt    = 100 * time.Millisecond
)

func NewWriter(r *Region, rate int64) *Writer {
	w := &Writer{region: r}
	w.SetRate(rate)
	return w
}

func (w *Writer) SetRate(pagesPerSec int64) {
	if pagesPerSec < 0 {
		pagesPerSec = 0
	}
	w.rate.Store(pagesPerSec)
}

func (w *Writer) Rate() int64 { return w.rate.Load() }

// Run writes until stop is closed.
func (w *Writer) Run(stop <-chan struct{}) {
	t := time.NewTicker(writerTick)
	defer t.Stop()
	last := time.Now()
	credit := 0.0
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			dt := now.Sub(last)
			last = now
			rate := float64(w.rate.Load())
			if rate == 0 {
				credit = 0
				continue
			}
			if dt > maxDebt {
				dt = maxDebt
			}
			credit += rate * dt.Seconds()
			if limit := rate*maxDebt.Seconds() + 1; credit > limit {
				credit = limit
			}
			n := int(credit)
			credit -= float64(n)
			for i := 0; i < n; i++ {
				w.region.WriteNext()
			}
		}
	}
}
