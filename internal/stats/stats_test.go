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

// Nearest rank: of five samples the p99 is the largest and the p50 the
// third (the index rounding down gave the fourth for p99).
func TestPercentileFewSamples(t *testing.T) {
	s := []time.Duration{757, 687, 704, 650, 866}
	if p99 := Percentile(s, 99); p99 != 866 {
		t.Errorf("p99 of %v: %v, want 866", s, p99)
	}
	if p50 := Percentile(s, 50); p50 != 704 {
		t.Errorf("p50 of %v: %v, want 704", s, p50)
	}
	if p0 := Percentile(s, 0); p0 != 650 {
		t.Errorf("p0 of %v: %v, want 650", s, p0)
	}
}
