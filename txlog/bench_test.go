package txlog

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const benchPayload = 256

// fsyncRate holds the records/s of the fsync-per-record run for each
// appender count, so the group-commit run can report its speedup.
var fsyncRate sync.Map

// BenchmarkGroupCommit measures durable Append throughput and latency with
// 1, 8 and 64 concurrent appenders, fsync-per-record first as the baseline,
// then group commit with its speedup over that baseline (x-vs-fsync).
//
//	go test -run='^$' -bench=GroupCommit -benchtime=2s ./txlog
func BenchmarkGroupCommit(b *testing.B) {
	for _, n := range []int{1, 8, 64} {
		b.Run(fmt.Sprintf("appenders=%d/fsync-per-record", n), func(b *testing.B) { benchAppend(b, n, true) })
		b.Run(fmt.Sprintf("appenders=%d/group-commit", n), func(b *testing.B) { benchAppend(b, n, false) })
	}
}

func benchAppend(b *testing.B, appenders int, noGroupCommit bool) {
	l, _ := mustOpen(b, b.TempDir(), Options{NoGroupCommit: noGroupCommit})
	defer l.Close()
	ctx := context.Background()
	payload := bytes.Repeat([]byte{'r'}, benchPayload)
	lat := make([][]time.Duration, appenders)
	var issued atomic.Int64
	var wg sync.WaitGroup
	b.SetBytes(recHeaderSize + benchPayload)
	b.ResetTimer()
	start := time.Now()
	for g := range appenders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for issued.Add(1) <= int64(b.N) {
				t0 := time.Now()
				if _, err := l.Append(ctx, Record{Type: TypePlain, Epoch: 1, TxID: uint64(g), Payload: payload}); err != nil {
					b.Error(err)
					return
				}
				lat[g] = append(lat[g], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()

	all := slices.Concat(lat...)
	slices.Sort(all)
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[min(len(all)-1, int(p*float64(len(all))))].Microseconds())
	}
	rate := float64(b.N) / elapsed.Seconds()
	b.ReportMetric(rate, "records/s")
	b.ReportMetric(pct(0.50), "p50-µs")
	b.ReportMetric(pct(0.99), "p99-µs")
	if noGroupCommit {
		fsyncRate.Store(appenders, rate)
	} else if base, ok := fsyncRate.Load(appenders); ok {
		b.ReportMetric(rate/base.(float64), "x-vs-fsync")
	}
}
