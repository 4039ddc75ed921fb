// Package stats keeps the figures remora reports: a window of recent
// durations and its percentiles, and a rate over a sliding span.
package stats

import (
	"math"
	"slices"
	"sync"
	"time"
)

// Window keeps the last N samples for percentiles.
type Window struct {
	buf  []time.Duration
	next int
	full bool
}

// NewWindow keeps the last n samples.
func NewWindow(n int) *Window { return &Window{buf: make([]time.Duration, n)} }

// Add records a sample, replacing the oldest once full.
func (w *Window) Add(d time.Duration) {
	w.buf[w.next] = d
	w.next++
	if w.next == len(w.buf) {
		w.next, w.full = 0, true
	}
}

// Samples returns a copy of the samples kept.
func (w *Window) Samples() []time.Duration {
	n := w.next
	if w.full {
		n = len(w.buf)
	}
	return slices.Clone(w.buf[:n])
}

// Percentile returns the p-th percentile (0-100) of ds by nearest rank
// (the smallest sample at least p% of the samples do not exceed), or 0
// when empty: with few samples a p99 is their largest, not one below it.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	rank := int(math.Ceil(p / 100 * float64(len(s))))
	return s[min(max(rank, 1), len(s))-1]
}

// Rate counts events over a sliding time span.
type Rate struct {
	mu    sync.Mutex
	times []time.Time
	Span  time.Duration
}

// Add records an event at t.
func (r *Rate) Add(t time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.times = append(r.times, t)
	r.trim(t)
}

func (r *Rate) trim(now time.Time) {
	i := 0
	for i < len(r.times) && now.Sub(r.times[i]) > r.Span {
		i++
	}
	r.times = r.times[i:]
}

// PerSecond is the rate over the span ending at now.
func (r *Rate) PerSecond(now time.Time) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.trim(now)
	if len(r.times) < 2 {
		return 0
	}
	el := now.Sub(r.times[0])
	if el <= 0 {
		return 0
	}
	return float64(len(r.times)) / el.Seconds()
}
