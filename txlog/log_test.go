package txlog

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestAppendReopenIterate(t *testing.T) {
	dir := t.TempDir()
	l, rec := mustOpen(t, dir, Options{SegmentSize: 64 << 10})
	if rec.FirstLSN != 1 || rec.LastLSN != 0 || len(rec.Records) != 0 {
		t.Fatalf("fresh log recovery = %+v", rec)
	}
	var want []Record
	for i := 1; i <= 50; i++ {
		r := Record{Type: TypePlain, Epoch: 1, TxID: uint64(i % 3), Payload: payloadFor(LSN(i), i*3)}
		var lsn LSN
		var err error
		if i%2 == 0 {
			lsn, err = l.AppendAsync(context.Background(), r)
		} else {
			lsn, err = l.Append(context.Background(), r)
		}
		if err != nil || lsn != LSN(i) {
			t.Fatalf("append %d: lsn %d, %v", i, lsn, err)
		}
		r.LSN = lsn
		want = append(want, r)
	}
	if err := l.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if l.DurableLSN() != 50 || l.LastLSN() != 50 {
		t.Fatalf("durable %d last %d, want 50", l.DurableLSN(), l.LastLSN())
	}
	got := readAllRecords(t, l, 20)
	if len(got) != 31 || !sameRecord(got[0], want[19]) {
		t.Fatalf("Iterate(20) returned %d records, first %+v", len(got), got[0])
	}
	mustClose(t, l)
	if err := l.Close(); !errors.Is(err, ErrClosed) {
		t.Fatalf("second Close = %v, want ErrClosed", err)
	}
	if _, err := l.Append(context.Background(), Record{Type: TypePlain, Epoch: 1}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close = %v, want ErrClosed", err)
	}

	l, rec = mustOpen(t, dir, Options{SegmentSize: 64 << 10})
	defer mustClose(t, l)
	if rec.LastLSN != 50 || len(rec.Records) != 50 || rec.Torn != nil || rec.MaxEpoch != 1 {
		t.Fatalf("reopen: last %d, %d records, torn %v, epoch %d", rec.LastLSN, len(rec.Records), rec.Torn, rec.MaxEpoch)
	}
	for i, r := range rec.Records {
		if !sameRecord(r, want[i]) {
			t.Fatalf("record %d = %+v, want %+v", i, r, want[i])
		}
	}
	if lsn := mustAppend(t, l, Record{Type: TypePlain, Epoch: 1}); lsn != 51 {
		t.Fatalf("append after reopen got LSN %d, want 51", lsn)
	}
}

func TestSegmentRotation(t *testing.T) {
	cases := []struct {
		name    string
		segSize int64
		sizes   func(i int) int
		n       int
	}{
		{"tiny records", 1024, func(i int) int { return i % 7 }, 300},
		{"mixed sizes", 1024, func(i int) int { return (i * 37) % 400 }, 200},
		{"exact fit", 1024, func(i int) int { return 1024 - segHeaderSize - recHeaderSize }, 5},
		{"half segments", 4096, func(i int) int { return 2000 }, 9},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{SegmentSize: c.segSize}
			l, _ := mustOpen(t, dir, opts)
			var want []Record
			var wg sync.WaitGroup
			var mu sync.Mutex
			for g := 0; g < 4; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := g; i < c.n; i += 4 {
						r := Record{Type: TypePlain, Epoch: 1, TxID: uint64(i), Payload: payloadFor(LSN(i), c.sizes(i))}
						lsn, err := l.Append(context.Background(), r)
						if err != nil {
							t.Error(err)
							return
						}
						r.LSN = lsn
						mu.Lock()
						want = append(want, r)
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			if _, err := l.Append(context.Background(), Record{Type: TypePlain, Epoch: 1, Payload: make([]byte, c.segSize)}); !errors.Is(err, ErrInvalidRecord) {
				t.Fatalf("oversized record: err = %v, want ErrInvalidRecord", err)
			}
			got := readAllRecords(t, l, 0)
			mustClose(t, l)

			files := segFiles(t, dir)
			if len(files) < 2 {
				t.Fatalf("only %d segment files after %d records", len(files), c.n)
			}
			for _, f := range files {
				fi, err := os.Stat(f)
				if err != nil || fi.Size() != c.segSize {
					t.Fatalf("segment %s: size %v, err %v; want preallocated %d", f, fi.Size(), err, c.segSize)
				}
			}
			byLSN := map[LSN]Record{}
			for _, r := range want {
				byLSN[r.LSN] = r
			}
			check := func(what string, recs []Record) {
				if len(recs) != c.n {
					t.Fatalf("%s: %d records, want %d", what, len(recs), c.n)
				}
				for i, r := range recs {
					if r.LSN != LSN(i+1) || !sameRecord(r, byLSN[r.LSN]) {
						t.Fatalf("%s: record %d = %+v, want %+v", what, i, r, byLSN[LSN(i+1)])
					}
				}
			}
			check("Iterate", got)
			l, rec := mustOpen(t, dir, opts)
			defer mustClose(t, l)
			if rec.Segments != len(files) {
				t.Fatalf("recovery saw %d segments, want %d", rec.Segments, len(files))
			}
			check("Recovery.Records", rec.Records)
			check("Iterate after reopen", readAllRecords(t, l, 0))
		})
	}
}

func TestFencingEpoch(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	l, _ := mustOpen(t, dir, Options{})
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 5})
	if _, err := l.Append(ctx, Record{Type: TypePlain, Epoch: 4}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("lower epoch: err = %v, want ErrStaleEpoch", err)
	}
	if _, err := l.AppendAsync(ctx, Record{Type: TypePlain, Epoch: 4}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("lower epoch async: err = %v, want ErrStaleEpoch", err)
	}
	if _, err := l.Checkpoint(ctx, 4, nil); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("lower epoch checkpoint: err = %v, want ErrStaleEpoch", err)
	}
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 5})
	if err := l.Fence(8); err != nil {
		t.Fatal(err)
	}
	if err := l.Fence(7); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("Fence below current: err = %v", err)
	}
	if _, err := l.Append(ctx, Record{Type: TypePlain, Epoch: 7}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("below fence: err = %v, want ErrStaleEpoch", err)
	}
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 9})
	mustClose(t, l)

	// The highest epoch survives a restart, and MinFencingEpoch raises it.
	l, rec := mustOpen(t, dir, Options{})
	if rec.MaxEpoch != 9 || l.Epoch() != 9 {
		t.Fatalf("recovered epoch %d / %d, want 9", rec.MaxEpoch, l.Epoch())
	}
	if _, err := l.Append(ctx, Record{Type: TypePlain, Epoch: 8}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("after reopen: err = %v, want ErrStaleEpoch", err)
	}
	mustClose(t, l)
	l, _ = mustOpen(t, dir, Options{MinFencingEpoch: 12})
	defer mustClose(t, l)
	if _, err := l.Append(ctx, Record{Type: TypePlain, Epoch: 11}); !errors.Is(err, ErrStaleEpoch) {
		t.Fatalf("below MinFencingEpoch: err = %v, want ErrStaleEpoch", err)
	}
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 12})
	// Nothing stale reached the disk.
	for _, r := range readAllRecords(t, l, 0) {
		if r.Epoch < 5 || (r.LSN > 2 && r.Epoch < 9) {
			t.Fatalf("stale record on disk: %+v", r)
		}
	}
}

func TestEpochSurvivesEmptyNewSegment(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 1024}
	l, _ := mustOpen(t, dir, opts)
	// Fill the first segment exactly so the next append rotates.
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 3, Payload: make([]byte, 1024-segHeaderSize-recHeaderSize)})
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 4})
	mustClose(t, l)
	if n := len(segFiles(t, dir)); n != 2 {
		t.Fatalf("%d segments, want 2", n)
	}
	l, rec := mustOpen(t, dir, opts)
	defer mustClose(t, l)
	if rec.MaxEpoch != 4 {
		t.Fatalf("MaxEpoch = %d, want 4", rec.MaxEpoch)
	}
}

func TestTxnTransitions(t *testing.T) {
	type step struct {
		typ  RecordType
		txid uint64
		want error
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"data without begin", []step{{TypeData, 1, ErrTxnState}}},
		{"prepare without begin", []step{{TypePrepare, 1, ErrTxnState}}},
		{"commit without begin", []step{{TypeCommit, 1, ErrTxnState}}},
		{"end while active", []step{{TypeBegin, 1, nil}, {TypeEnd, 1, ErrTxnState}}},
		{"end while prepared", []step{{TypeBegin, 1, nil}, {TypePrepare, 1, nil}, {TypeEnd, 1, ErrTxnState}}},
		{"double begin", []step{{TypeBegin, 1, nil}, {TypeBegin, 1, ErrTxnState}}},
		{"double commit", []step{{TypeBegin, 1, nil}, {TypeCommit, 1, nil}, {TypeCommit, 1, ErrTxnState}}},
		{"abort after commit", []step{{TypeBegin, 1, nil}, {TypeCommit, 1, nil}, {TypeAbort, 1, ErrTxnState}}},
		{"data after prepare", []step{{TypeBegin, 1, nil}, {TypePrepare, 1, nil}, {TypeData, 1, ErrTxnState}}},
		{"data after abort", []step{{TypeBegin, 1, nil}, {TypeAbort, 1, nil}, {TypeData, 1, ErrTxnState}}},
		{"commit after end", []step{{TypeBegin, 1, nil}, {TypeCommit, 1, nil}, {TypeEnd, 1, nil}, {TypeCommit, 1, ErrTxnState}}},
		{"zero txid", []step{{TypeBegin, 0, ErrInvalidRecord}}},
		{"checkpoint via Append", []step{{TypeCheckpoint, 0, ErrInvalidRecord}}},
		{"unknown type", []step{{RecordType(42), 1, ErrInvalidRecord}}},
		{"abort unknown is a no-op", []step{{TypeAbort, 7, nil}, {TypeEnd, 7, nil}}},
		{"full lifecycle", []step{{TypeBegin, 1, nil}, {TypeData, 1, nil}, {TypePrepare, 1, nil}, {TypeCommit, 1, nil}, {TypeEnd, 1, nil}, {TypeBegin, 1, nil}}},
		{"plain ignores txid", []step{{TypePlain, 0, nil}, {TypePlain, 5, nil}, {TypeBegin, 5, nil}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l, _ := mustOpen(t, t.TempDir(), Options{SegmentSize: 8192})
			defer mustClose(t, l)
			for i, s := range c.steps {
				before := l.LastLSN()
				_, err := l.Append(context.Background(), Record{Type: s.typ, Epoch: 1, TxID: s.txid})
				if !errors.Is(err, s.want) || (s.want == nil) != (err == nil) {
					t.Fatalf("step %d (%v tx %d): err = %v, want %v", i, s.typ, s.txid, err, s.want)
				}
				if err != nil && l.LastLSN() != before {
					t.Fatalf("step %d: rejected record still got an LSN", i)
				}
			}
		})
	}
}

func TestRecoveryClassification(t *testing.T) {
	type op struct {
		typ  RecordType // TypeCheckpoint means l.Checkpoint
		txid uint64
	}
	B, D, P, C, A, E, K := TypeBegin, TypeData, TypePrepare, TypeCommit, TypeAbort, TypeEnd, TypeCheckpoint
	type want struct {
		state    TxnState
		presumed bool
		ended    bool
		data     int
	}
	cases := []struct {
		name    string
		ops     []op
		want    map[uint64]want
		records int // records after the checkpoint (or all)
	}{
		{"committed", []op{{B, 1}, {D, 1}, {D, 1}, {C, 1}}, map[uint64]want{1: {TxnCommitted, false, false, 2}}, 4},
		{"aborted", []op{{B, 1}, {D, 1}, {A, 1}}, map[uint64]want{1: {TxnAborted, false, false, 0}}, 3},
		{"in doubt", []op{{B, 1}, {D, 1}, {P, 1}}, map[uint64]want{1: {TxnInDoubt, false, false, 1}}, 3},
		{"presumed abort", []op{{B, 1}, {D, 1}}, map[uint64]want{1: {TxnAborted, true, false, 0}}, 2},
		{"prepared then committed", []op{{B, 1}, {D, 1}, {P, 1}, {C, 1}}, map[uint64]want{1: {TxnCommitted, false, false, 1}}, 4},
		{"prepared then aborted", []op{{B, 1}, {D, 1}, {P, 1}, {A, 1}}, map[uint64]want{1: {TxnAborted, false, false, 0}}, 4},
		{"committed and ended", []op{{B, 1}, {D, 1}, {C, 1}, {E, 1}}, map[uint64]want{1: {TxnCommitted, false, true, 0}}, 4},
		{"abort of unknown", []op{{A, 9}}, map[uint64]want{9: {TxnAborted, false, false, 0}}, 1},
		{"interleaved", []op{{B, 1}, {B, 2}, {B, 3}, {B, 4}, {D, 1}, {D, 2}, {D, 3}, {D, 1}, {C, 1}, {P, 2}, {A, 3}, {TypePlain, 0}},
			map[uint64]want{1: {TxnCommitted, false, false, 2}, 2: {TxnInDoubt, false, false, 1}, 3: {TxnAborted, false, false, 0}, 4: {TxnAborted, true, false, 0}}, 12},
		{"data before checkpoint kept", []op{{B, 1}, {D, 1}, {K, 0}, {D, 1}, {C, 1}}, map[uint64]want{1: {TxnCommitted, false, false, 2}}, 2},
		{"in doubt across checkpoint", []op{{B, 1}, {D, 1}, {P, 1}, {K, 0}}, map[uint64]want{1: {TxnInDoubt, false, false, 1}}, 0},
		{"active across checkpoint is presumed aborted", []op{{B, 1}, {D, 1}, {K, 0}, {TypePlain, 0}}, map[uint64]want{1: {TxnAborted, true, false, 0}}, 1},
		{"finished before checkpoint is forgotten", []op{{B, 1}, {C, 1}, {E, 1}, {B, 2}, {A, 2}, {K, 0}, {B, 3}, {P, 3}},
			map[uint64]want{3: {TxnInDoubt, false, false, 0}}, 2},
		{"aborted after checkpoint", []op{{B, 1}, {D, 1}, {K, 0}, {A, 1}}, map[uint64]want{1: {TxnAborted, false, false, 0}}, 1},
		{"id reused after end", []op{{B, 1}, {D, 1}, {C, 1}, {E, 1}, {B, 1}, {D, 1}}, map[uint64]want{1: {TxnAborted, true, false, 0}}, 6},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{SegmentSize: 1024} // small: checkpointed data spans segments
			l, _ := mustOpen(t, dir, opts)
			for i, o := range c.ops {
				var err error
				if o.typ == K {
					_, err = l.Checkpoint(context.Background(), 1, []byte("snapshot"))
				} else {
					_, err = l.Append(context.Background(), Record{Type: o.typ, Epoch: 1, TxID: o.txid, Payload: payloadFor(LSN(i), 300)})
				}
				if err != nil {
					t.Fatalf("op %d: %v", i, err)
				}
			}
			mustClose(t, l)
			l, rec := mustOpen(t, dir, opts)
			defer mustClose(t, l)
			if len(rec.Txns) != len(c.want) {
				t.Fatalf("recovered %d transactions %v, want %d", len(rec.Txns), rec.Txns, len(c.want))
			}
			for id, w := range c.want {
				got := rec.Txns[id]
				if got == nil {
					t.Fatalf("transaction %d missing", id)
				}
				if got.State != w.state || got.Presumed != w.presumed || got.Ended != w.ended || len(got.Data) != w.data {
					t.Fatalf("transaction %d = {%v presumed=%v ended=%v data=%d}, want {%v presumed=%v ended=%v data=%d}",
						id, got.State, got.Presumed, got.Ended, len(got.Data), w.state, w.presumed, w.ended, w.data)
				}
				for _, d := range got.Data {
					if d.Type != TypeData || d.TxID != id {
						t.Fatalf("transaction %d has foreign data record %+v", id, d)
					}
				}
			}
			if len(rec.Records) != c.records {
				t.Fatalf("%d records after checkpoint, want %d", len(rec.Records), c.records)
			}
		})
	}
}

func TestResolveInDoubtAfterReopen(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	l, _ := mustOpen(t, dir, Options{})
	for _, r := range []Record{
		{Type: TypeBegin, TxID: 1}, {Type: TypePrepare, TxID: 1},
		{Type: TypeBegin, TxID: 2}, {Type: TypePrepare, TxID: 2},
		{Type: TypeBegin, TxID: 3}, {Type: TypeData, TxID: 3},
		{Type: TypeBegin, TxID: 4}, {Type: TypeCommit, TxID: 4},
	} {
		r.Epoch = 1
		mustAppend(t, l, r)
	}
	mustClose(t, l)

	// A promoted standby with a higher epoch resolves what it found.
	l, rec := mustOpen(t, dir, Options{MinFencingEpoch: 2})
	if rec.Txns[1].State != TxnInDoubt || rec.Txns[2].State != TxnInDoubt || !rec.Txns[3].Presumed || rec.Txns[4].State != TxnCommitted {
		t.Fatalf("unexpected recovery: %v %v %v %v", rec.Txns[1], rec.Txns[2], rec.Txns[3], rec.Txns[4])
	}
	mustAppend(t, l, Record{Type: TypeCommit, Epoch: 2, TxID: 1})
	mustAppend(t, l, Record{Type: TypeAbort, Epoch: 2, TxID: 2})
	if _, err := l.Append(ctx, Record{Type: TypeData, Epoch: 2, TxID: 3}); !errors.Is(err, ErrTxnState) {
		t.Fatalf("data for presumed-aborted txn: err = %v, want ErrTxnState", err)
	}
	if _, err := l.Append(ctx, Record{Type: TypeCommit, Epoch: 2, TxID: 3}); !errors.Is(err, ErrTxnState) {
		t.Fatalf("commit of presumed-aborted txn: err = %v, want ErrTxnState", err)
	}
	mustAppend(t, l, Record{Type: TypeEnd, Epoch: 2, TxID: 4})
	mustClose(t, l)

	l, rec = mustOpen(t, dir, Options{})
	defer mustClose(t, l)
	if rec.Txns[1].State != TxnCommitted || rec.Txns[2].State != TxnAborted || rec.Txns[2].Presumed || !rec.Txns[4].Ended {
		t.Fatalf("after resolution: %v %v %v", rec.Txns[1], rec.Txns[2], rec.Txns[4])
	}
}

func TestCheckpointAndCompact(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	opts := Options{SegmentSize: 1024}
	l, _ := mustOpen(t, dir, opts)
	mustAppend(t, l, Record{Type: TypeBegin, Epoch: 1, TxID: 100})
	mustAppend(t, l, Record{Type: TypeData, Epoch: 1, TxID: 100, Payload: []byte("long-running")})
	for i := 0; i < 60; i++ {
		mustAppend(t, l, Record{Type: TypePlain, Epoch: 1, Payload: payloadFor(LSN(i), 200)})
	}
	if n, err := l.Compact(ctx); err != nil || n != 0 {
		t.Fatalf("Compact without checkpoint removed %d, err %v", n, err)
	}
	mustAppend(t, l, Record{Type: TypeCommit, Epoch: 1, TxID: 100})
	ck1, err := l.Checkpoint(ctx, 1, []byte("snap-1"))
	if err != nil {
		t.Fatal(err)
	}
	before := len(segFiles(t, dir))
	// Committed but not ended: its BEGIN in the first segment pins it.
	if n, err := l.Compact(ctx); err != nil || n != 0 {
		t.Fatalf("Compact with a live transaction removed %d segments (err %v)", n, err)
	}
	mustAppend(t, l, Record{Type: TypeEnd, Epoch: 1, TxID: 100})
	// The old checkpoint still lists txn 100, but it has ended since.
	n, err := l.Compact(ctx)
	if err != nil || n == 0 || n >= before {
		t.Fatalf("Compact removed %d of %d segments, err %v", n, before, err)
	}
	if l.FirstLSN() > ck1 {
		t.Fatalf("compacted past the checkpoint: first LSN %d > checkpoint %d", l.FirstLSN(), ck1)
	}
	if err := l.Iterate(1, func(Record) error { return nil }); !errors.Is(err, ErrCompacted) {
		t.Fatalf("Iterate(1) after compaction: err = %v, want ErrCompacted", err)
	}
	mustAppend(t, l, Record{Type: TypeBegin, Epoch: 1, TxID: 200})
	ck2, err := l.Checkpoint(ctx, 1, []byte("snap-2"))
	if err != nil {
		t.Fatal(err)
	}
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 1, Payload: []byte("after")})
	mustClose(t, l)

	l, rec := mustOpen(t, dir, opts)
	defer mustClose(t, l)
	if rec.Checkpoint == nil || rec.Checkpoint.LSN != ck2 || string(rec.Checkpoint.Data) != "snap-2" {
		t.Fatalf("recovered checkpoint %+v, want LSN %d", rec.Checkpoint, ck2)
	}
	if len(rec.Checkpoint.Live) != 1 || rec.Checkpoint.Live[0].ID != 200 {
		t.Fatalf("checkpoint live set %+v", rec.Checkpoint.Live)
	}
	if len(rec.Records) != 1 || string(rec.Records[0].Payload) != "after" {
		t.Fatalf("records after checkpoint: %+v", rec.Records)
	}
	if rec.FirstLSN == 1 || rec.Txns[100] != nil || rec.Txns[200] == nil || !rec.Txns[200].Presumed {
		t.Fatalf("recovery after compaction: first %d txns %v", rec.FirstLSN, rec.Txns)
	}
}

func TestRecoveryStartsAtCheckpoint(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 1024}
	l, _ := mustOpen(t, dir, opts)
	for i := 0; i < 100; i++ {
		mustAppend(t, l, Record{Type: TypePlain, Epoch: 1, Payload: payloadFor(LSN(i), 150)})
	}
	if _, err := l.Checkpoint(context.Background(), 1, nil); err != nil {
		t.Fatal(err)
	}
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 1})
	mustClose(t, l)

	l, rec := mustOpen(t, dir, opts)
	mustClose(t, l)
	if rec.ScannedRecords >= 50 || len(rec.Records) != 1 {
		t.Fatalf("recovery scanned %d records and returned %d; the checkpoint should spare the history", rec.ScannedRecords, len(rec.Records))
	}
	l, rec = mustOpen(t, dir, Options{SegmentSize: 1024, VerifyAll: true, ReadOnly: true})
	mustClose(t, l)
	if rec.ScannedRecords != 102 {
		t.Fatalf("VerifyAll scanned %d records, want 102", rec.ScannedRecords)
	}
}

func TestReadOnlyAndLocking(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := Open(filepath.Join(dir, "missing"), Options{ReadOnly: true}); err == nil {
		t.Fatal("read-only open of a missing directory succeeded")
	}
	if _, _, err := Open(dir, Options{ReadOnly: true}); !errors.Is(err, ErrNoLog) {
		t.Fatalf("read-only open of an empty directory: err = %v, want ErrNoLog", err)
	}
	l, _ := mustOpen(t, dir, Options{})
	mustAppend(t, l, Record{Type: TypePlain, Epoch: 1, Payload: []byte("x")})
	if _, _, err := Open(dir, Options{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second writer: err = %v, want ErrLocked", err)
	}
	ro, rec := mustOpen(t, dir, Options{ReadOnly: true})
	if rec.LastLSN != 1 {
		t.Fatalf("read-only view while writer is open: last %d", rec.LastLSN)
	}
	if _, err := ro.Append(context.Background(), Record{Type: TypePlain, Epoch: 1}); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("Append on read-only: err = %v", err)
	}
	if _, err := ro.Compact(context.Background()); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("Compact on read-only: err = %v", err)
	}
	mustClose(t, ro)
	mustClose(t, l)
	l, _ = mustOpen(t, dir, Options{}) // lock released by Close
	mustClose(t, l)
}

func TestConcurrentAppendersAndReaders(t *testing.T) {
	dir := t.TempDir()
	l, _ := mustOpen(t, dir, Options{SegmentSize: 16 << 10})
	ctx := context.Background()
	const writers, per = 8, 60
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				tx := uint64(w*1000 + i + 1)
				steps := []Record{{Type: TypeBegin, TxID: tx}, {Type: TypeData, TxID: tx, Payload: payloadFor(LSN(tx), 50)}, {Type: TypeCommit, TxID: tx}}
				for k, r := range steps {
					r.Epoch = 1
					var err error
					if k < 2 {
						_, err = l.AppendAsync(ctx, r)
					} else {
						_, err = l.Append(ctx, r)
					}
					if err != nil {
						t.Error(err)
						return
					}
				}
			}
		}()
	}
	stop := make(chan struct{})
	var rwg sync.WaitGroup
	rwg.Add(1)
	go func() {
		defer rwg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			next := LSN(1)
			err := l.Iterate(0, func(r Record) error {
				if r.LSN != next {
					return fmt.Errorf("iterate: got LSN %d, want %d", r.LSN, next)
				}
				next++
				return nil
			})
			if err != nil {
				t.Error(err)
				return
			}
		}
	}()
	wg.Wait()
	close(stop)
	rwg.Wait()
	mustClose(t, l)
	l, rec := mustOpen(t, dir, Options{SegmentSize: 16 << 10})
	defer mustClose(t, l)
	if rec.LastLSN != writers*per*3 || len(rec.Txns) != writers*per {
		t.Fatalf("recovered last LSN %d and %d txns", rec.LastLSN, len(rec.Txns))
	}
	for id, tx := range rec.Txns {
		if tx.State != TxnCommitted || len(tx.Data) != 1 {
			t.Fatalf("txn %d: %v with %d data records", id, tx.State, len(tx.Data))
		}
	}
}

func TestAppendContext(t *testing.T) {
	l, _ := mustOpen(t, t.TempDir(), Options{})
	defer mustClose(t, l)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Append(ctx, Record{Type: TypePlain, Epoch: 1}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Append with a cancelled context: err = %v", err)
	}
	if l.LastLSN() != 0 {
		t.Fatal("cancelled Append was queued")
	}
	ctx, cancel = context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := l.Sync(ctx); err != nil {
		t.Fatal(err)
	}
}

// A transaction active at a checkpoint and presumed aborted after a crash
// leaves the live set, so Compact may drop its BEGIN. Recovery from that
// same checkpoint must then not demand the dropped records.
func TestCompactAfterPresumedAbort(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	opts := Options{SegmentSize: 1024}
	l, _ := mustOpen(t, dir, opts)
	mustAppend(t, l, Record{Type: TypeBegin, Epoch: 1, TxID: 3})
	for i := 0; i < 20; i++ {
		mustAppend(t, l, Record{Type: TypePlain, Epoch: 1, Payload: payloadFor(LSN(i), 200)})
	}
	if _, err := l.Checkpoint(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	mustClose(t, l) // as good as a crash: txn 3 never decided

	l, rec := mustOpen(t, dir, opts)
	if tx := rec.Txns[3]; tx == nil || !tx.Presumed {
		t.Fatalf("txn 3 = %+v, want presumed abort", tx)
	}
	if n, err := l.Compact(ctx); err != nil || n == 0 {
		t.Fatalf("Compact removed %d segments (err %v); txn 3 no longer pins them", n, err)
	}
	mustClose(t, l)

	l, rec = mustOpen(t, dir, opts)
	defer mustClose(t, l)
	if tx := rec.Txns[3]; tx == nil || !tx.Presumed {
		t.Fatalf("after compaction txn 3 = %+v, want presumed abort", tx)
	}
}

func TestCompactTable(t *testing.T) {
	// Each op appends one record; "ckpt" writes a checkpoint, "pad" a
	// 200-byte plain record so the 1 KiB segments fill quickly. pin names
	// the op whose LSN must survive as the oldest needed one: the first
	// remaining segment holds it, and the one after starts beyond it.
	type op struct {
		typ  RecordType // 0: pad; TypeCheckpoint: Log.Checkpoint
		txid uint64
	}
	pad := func(n int) []op { return make([]op, n) }
	cat := func(parts ...[]op) []op {
		var all []op
		for _, p := range parts {
			all = append(all, p...)
		}
		return all
	}
	K := TypeCheckpoint
	cases := []struct {
		name string
		ops  []op
		pin  int // index into ops; -1: nothing may be removed
	}{
		{"no checkpoint", cat(pad(20)), -1},
		{"checkpoint covers everything", cat(pad(20), []op{{K, 0}}), 20},
		{"active txn pins its BEGIN", cat(pad(5), []op{{TypeBegin, 1}}, pad(15), []op{{K, 0}}), 5},
		{"in-doubt txn pins its BEGIN", cat(pad(5), []op{{TypeBegin, 1}, {TypePrepare, 1}}, pad(15), []op{{K, 0}}), 5},
		{"committed txn pins until END", cat(pad(5), []op{{TypeBegin, 1}, {TypeCommit, 1}}, pad(15), []op{{K, 0}}), 5},
		{"ended txn releases", cat(pad(5), []op{{TypeBegin, 1}, {TypeCommit, 1}}, pad(15), []op{{K, 0}, {TypeEnd, 1}}), 22},
		{"aborted txn releases", cat(pad(5), []op{{TypeBegin, 1}}, pad(15), []op{{K, 0}, {TypeAbort, 1}}), 21},
		{"oldest of two txns pins", cat(pad(3), []op{{TypeBegin, 1}}, pad(5), []op{{TypeBegin, 2}}, pad(10), []op{{TypeCommit, 1}, {TypeEnd, 1}, {K, 0}}), 9},
		{"txn begun after checkpoint does not pin", cat(pad(20), []op{{K, 0}, {TypeBegin, 1}}), 20},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			ctx := context.Background()
			opts := Options{SegmentSize: 1024}
			l, _ := mustOpen(t, dir, opts)
			lsns := make([]LSN, len(c.ops))
			for i, o := range c.ops {
				var err error
				switch o.typ {
				case 0:
					lsns[i], err = l.Append(ctx, Record{Type: TypePlain, Epoch: 1, Payload: payloadFor(LSN(i), 200)})
				case K:
					lsns[i], err = l.Checkpoint(ctx, 1, nil)
				default:
					lsns[i], err = l.Append(ctx, Record{Type: o.typ, Epoch: 1, TxID: o.txid})
				}
				if err != nil {
					t.Fatalf("op %d: %v", i, err)
				}
			}
			before := len(segFiles(t, dir))
			n, err := l.Compact(ctx)
			if err != nil {
				t.Fatal(err)
			}
			after := segFiles(t, dir)
			if n != before-len(after) {
				t.Fatalf("Compact reported %d removed, %d files went away", n, before-len(after))
			}
			if c.pin < 0 {
				if n != 0 {
					t.Fatalf("removed %d segments, want none", n)
				}
			} else {
				pin := lsns[c.pin]
				first, _ := parseSegName(filepath.Base(after[0]))
				if first > pin {
					t.Fatalf("removed LSN %d, which is still needed (oldest segment starts at %d)", pin, first)
				}
				if len(after) > 1 {
					if second, _ := parseSegName(filepath.Base(after[1])); second <= pin {
						t.Fatalf("kept segment %s although LSN %d is the oldest needed", after[0], pin)
					}
				}
			}
			mustClose(t, l)
			l, rec := mustOpen(t, dir, opts) // recovery agrees with what was kept
			mustClose(t, l)
			if rec.LastLSN != lsns[len(lsns)-1] {
				t.Fatalf("recovered up to %d, want %d", rec.LastLSN, lsns[len(lsns)-1])
			}
		})
	}
}

// A read-only open (`remora txlog verify` on a running agent's journal)
// sees the tail move under it: that is neither damage nor a torn tail.
func TestReadOnlyOpenWhileAWriterAppends(t *testing.T) {
	dir := t.TempDir()
	l, _ := mustOpen(t, dir, Options{SegmentSize: 1 << 20})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ctx.Err() == nil; i++ {
			r := Record{Type: TypePlain, Epoch: 1, Payload: payloadFor(LSN(i), 100)}
			var err error
			if i%3 == 0 {
				_, err = l.Append(ctx, r)
			} else {
				_, err = l.AppendAsync(ctx, r)
			}
			if err != nil && ctx.Err() == nil {
				t.Error(err)
				return
			}
		}
	}()
	var last LSN
	for i := 0; i < 50; i++ {
		ro, rec, err := Open(dir, Options{ReadOnly: true})
		if err != nil {
			t.Fatalf("read-only open %d while appending: %v", i, err)
		}
		if rec.Torn != nil {
			t.Fatalf("read-only open %d while appending: torn tail %+v", i, *rec.Torn)
		}
		if rec.LastLSN < last {
			t.Fatalf("read-only open %d: last LSN %d, before %d", i, rec.LastLSN, last)
		}
		last = rec.LastLSN
		ro.Close()
	}
	cancel()
	<-done
	mustClose(t, l)
	if last == 0 {
		t.Fatal("the reader never saw a record")
	}
}
