package stats

import (
	"testing"
	"time"
)

// The window keeps the newest samples; percentiles are over those.
func TestWindowPercentiles(t *testing.T) {
	w := NewWindow(100)
	if s := w.Samples(); Percentile(s, 50) != 0 || Percentile(s, 99) != 0 || len(s) != 0 {
		t.Fatal("empty")
	}
	for i := 1; i <= 250; i++ {
		w.Add(time.Duration(i) * time.Millisecond)
	}
	s := w.Samples()
	p50, p99, n := Percentile(s, 50), Percentile(s, 99), len(s)
	if n != 100 || p50 != 200*time.Millisecond || p99 != 249*time.Millisecond {
		t.Fatalf("p50 %v p99 %v n %d", p50, p99, n)
	}
}
