package checkpoint

import (
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

// Percentile returns the p-th percentile (0-100) of ds, or 0 when empty.
func Percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(p / 100 * float64(len(s)-1))
	return s[i]
}

// rate counts events over a sliding time span.
type rate struct {
	mu    sync.Mutex
	times []time.Time
	span  time.Duration
}

func (r *rate) add(t time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.times = append(r.times, t)
	r.trim(t)
}

func (r *rate) trim(now time.Time) {
	i := 0
	for i < len(r.times) && now.Sub(r.times[i]) > r.span {
		i++
	}
	r.times = r.times[i:]
}

func (r *rate) perSecond(now time.Time) float64 {
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
