package txlog

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// tornLog is a single-segment log whose tail the torn-write tests damage.
type tornLog struct {
	dir    string
	seg    string
	data   []byte  // pristine segment bytes
	offs   []int64 // record i (LSN i+1) occupies [offs[i], offs[i+1])
	synced []LSN   // synced watermark stored in record i
}

const tornSegSize = 8 << 10

// buildTornLog writes n records. The last `batch` records are appended
// unsynced and then synced together, so they share one synced watermark:
// that is what an unacknowledged group commit looks like on disk.
func buildTornLog(t testing.TB, n, batch int) *tornLog {
	t.Helper()
	dir := t.TempDir()
	l, _ := mustOpen(t, dir, Options{SegmentSize: tornSegSize})
	ctx := context.Background()
	for i := 1; i <= n; i++ {
		r := Record{Type: TypePlain, Epoch: 1, TxID: uint64(i), Payload: payloadFor(LSN(i), 20+i%17)}
		if i > n-batch {
			if _, err := l.AppendAsync(ctx, r); err != nil {
				t.Fatal(err)
			}
		} else {
			mustAppend(t, l, r)
		}
	}
	mustClose(t, l)
	tl := &tornLog{dir: dir, seg: filepath.Join(dir, segName(1))}
	var err error
	if tl.data, err = os.ReadFile(tl.seg); err != nil {
		t.Fatal(err)
	}
	off := int64(segHeaderSize)
	for i := 0; i < n; i++ {
		tl.offs = append(tl.offs, off)
		tl.synced = append(tl.synced, LSN(binary.LittleEndian.Uint64(tl.data[off+36:])))
		off += recHeaderSize + int64(binary.LittleEndian.Uint32(tl.data[off+4:]))
	}
	tl.offs = append(tl.offs, off)
	return tl
}

// outcome is what recovery must do with a damaged copy of the segment.
type outcome struct {
	corruptAt int64  // >0: a CorruptionError at this offset
	lastLSN   LSN    // otherwise: the last intact record
	cut       []byte // and the bytes cut (nil: clean end)
}

// expect is the oracle. Records before the first damaged one survive. If an
// intact record after it was written when the damaged one was already
// durable, that is corruption; otherwise everything from the damaged record
// on is a torn tail, cut unless it is all zeros.
func (tl *tornLog) expect(damaged []byte) outcome {
	n := len(tl.offs) - 1
	intact := func(i int) bool {
		return int64(len(damaged)) >= tl.offs[i+1] && bytes.Equal(damaged[tl.offs[i]:tl.offs[i+1]], tl.data[tl.offs[i]:tl.offs[i+1]])
	}
	k := 0
	for k < n && intact(k) {
		k++
	}
	if k == n {
		return outcome{lastLSN: LSN(n)} // damage, if any, is past the records
	}
	for j := k + 1; j < n; j++ {
		if intact(j) && tl.synced[j] >= LSN(k+1) {
			return outcome{corruptAt: tl.offs[k]}
		}
	}
	rest := []byte{}
	if int64(len(damaged)) > tl.offs[k] {
		rest = damaged[tl.offs[k]:]
	}
	if i := lastNonZero(rest); i >= 0 {
		return outcome{lastLSN: LSN(k), cut: rest[:i+1]}
	}
	return outcome{lastLSN: LSN(k)}
}

// check opens a copy of the log holding damaged as its segment and compares
// the result with the oracle. It returns an error rather than failing so
// that offsets can be checked in parallel.
func (tl *tornLog) check(dir, what string, damaged []byte, writable bool) error {
	if err := os.WriteFile(filepath.Join(dir, segName(1)), damaged, 0o644); err != nil {
		return err
	}
	want := tl.expect(damaged)
	l, rec, err := Open(dir, Options{SegmentSize: tornSegSize, ReadOnly: !writable})
	if want.corruptAt > 0 {
		var ce *CorruptionError
		if !errors.As(err, &ce) || ce.Offset != want.corruptAt || ce.Segment != filepath.Join(dir, segName(1)) {
			return fmt.Errorf("%s: err = %v, want corruption at offset %d", what, err, want.corruptAt)
		}
		if !strings.Contains(err.Error(), fmt.Sprintf("offset %d", want.corruptAt)) || !errors.Is(err, ErrCorrupt) {
			return fmt.Errorf("%s: error does not name the offset or match ErrCorrupt: %v", what, err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: Open: %v", what, err)
	}
	defer l.Close()
	if rec.LastLSN != want.lastLSN {
		return fmt.Errorf("%s: recovered up to LSN %d, want %d", what, rec.LastLSN, want.lastLSN)
	}
	for i, r := range rec.Records {
		if r.LSN != LSN(i+1) || !bytes.Equal(appendRecord(nil, &r, r.LSN, tl.synced[i]), tl.data[tl.offs[i]:tl.offs[i+1]]) {
			return fmt.Errorf("%s: record %d differs from what was written", what, i)
		}
	}
	if (rec.Torn != nil) != (want.cut != nil) {
		return fmt.Errorf("%s: torn = %+v, want cut of %d bytes", what, rec.Torn, len(want.cut))
	}
	if rec.Torn == nil {
		return nil
	}
	if rec.Torn.Offset != tl.offs[want.lastLSN] || rec.Torn.Bytes != int64(len(want.cut)) || rec.Torn.AfterLSN != want.lastLSN {
		return fmt.Errorf("%s: torn %+v, want offset %d, %d bytes after LSN %d", what, rec.Torn, tl.offs[want.lastLSN], len(want.cut), want.lastLSN)
	}
	if !writable {
		return nil
	}
	saved, err := os.ReadFile(rec.Torn.SavedAs)
	if err != nil || !bytes.Equal(saved, want.cut) {
		return fmt.Errorf("%s: saved-aside file %q holds %d bytes (err %v), want the %d cut bytes", what, rec.Torn.SavedAs, len(saved), err, len(want.cut))
	}
	if !strings.HasPrefix(filepath.Base(rec.Torn.SavedAs), segName(1)+tornInfix) {
		return fmt.Errorf("%s: saved-aside file name %q", what, rec.Torn.SavedAs)
	}
	return nil
}

func TestTornTail(t *testing.T) {
	damages := []struct {
		name     string
		writable bool // also cut for real and check the saved-aside file
		apply    func(d []byte, x int64, rng *rand.Rand) []byte
	}{
		{"truncate", true, func(d []byte, x int64, _ *rand.Rand) []byte { return d[:x] }},
		{"garble", true, func(d []byte, x int64, rng *rand.Rand) []byte {
			end := int64(len(d))
			if nz := lastNonZero(d); nz >= 0 {
				end = int64(nz + 1)
			}
			for i := x; i < end; i++ {
				d[i] = byte(1 + rng.IntN(255))
			}
			return d
		}},
		{"bit flip", false, func(d []byte, x int64, _ *rand.Rand) []byte { d[x] ^= 0x24; return d }},
		{"zero sector", false, func(d []byte, x int64, _ *rand.Rand) []byte {
			s := x &^ 511
			clear(d[s:min(s+512, int64(len(d)))])
			return d
		}},
	}
	for _, pattern := range []struct {
		name  string
		batch int
	}{{"synced one by one", 0}, {"one unsynced batch", 5}} {
		tl := buildTornLog(t, 40, pattern.batch)
		n := len(tl.offs) - 1
		for _, dm := range damages {
			t.Run(pattern.name+"/"+dm.name, func(t *testing.T) {
				// Every byte offset of the last three records, and the end.
				// Workers overlap the fsyncs of writable opens.
				offsets := make(chan int64)
				errs := make(chan error, 1)
				var wg sync.WaitGroup
				for w := 0; w < 8; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						dir := t.TempDir()
						for x := range offsets {
							rng := rand.New(rand.NewPCG(uint64(x), 2))
							d := dm.apply(append([]byte(nil), tl.data...), x, rng)
							what := fmt.Sprintf("%s at offset %d", dm.name, x)
							err := tl.check(dir, what, d, false)
							if err == nil && dm.writable {
								err = tl.check(dir, what+" (writable)", d, true)
							}
							if err != nil {
								select {
								case errs <- err:
								default:
								}
							}
							for _, p := range []string{"*.seg", "*.seg.torn-*", "LOCK"} {
								m, _ := filepath.Glob(filepath.Join(dir, p))
								for _, f := range m {
									os.Remove(f)
								}
							}
						}
					}()
				}
				for x := tl.offs[n-3]; x <= tl.offs[n]; x++ {
					if dm.name == "bit flip" && x == tl.offs[n] {
						continue
					}
					offsets <- x
				}
				close(offsets)
				wg.Wait()
				close(errs)
				if err := <-errs; err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

func TestTornTailCutIsDurableAndAppendable(t *testing.T) {
	tl := buildTornLog(t, 10, 0)
	opts := Options{SegmentSize: tornSegSize}
	cut := tl.offs[9] + 5
	if err := os.Truncate(tl.seg, cut); err != nil {
		t.Fatal(err)
	}
	l, rec := mustOpen(t, tl.dir, opts)
	if rec.LastLSN != 9 || rec.Torn == nil || rec.Torn.Bytes != 5 {
		t.Fatalf("recovery: last %d torn %+v", rec.LastLSN, rec.Torn)
	}
	if lsn := mustAppend(t, l, Record{Type: TypePlain, Epoch: 1, Payload: []byte("after the cut")}); lsn != 10 {
		t.Fatalf("append after cut got LSN %d, want 10", lsn)
	}
	mustClose(t, l)
	fi, err := os.Stat(tl.seg)
	if err != nil || fi.Size() != tornSegSize {
		t.Fatalf("segment not re-preallocated after the cut: %v %v", fi.Size(), err)
	}
	// Cut the new record too: a second torn file must not clobber the first.
	if err := os.Truncate(tl.seg, tl.offs[9]+3); err != nil {
		t.Fatal(err)
	}
	l, rec2 := mustOpen(t, tl.dir, opts)
	defer mustClose(t, l)
	if rec2.Torn == nil || rec2.Torn.SavedAs == rec.Torn.SavedAs {
		t.Fatalf("second cut: %+v (first saved as %s)", rec2.Torn, rec.Torn.SavedAs)
	}
	for _, p := range []string{rec.Torn.SavedAs, rec2.Torn.SavedAs} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("saved-aside file missing: %v", err)
		}
	}
}

func TestReadOnlyLeavesTornTail(t *testing.T) {
	tl := buildTornLog(t, 10, 0)
	if err := os.Truncate(tl.seg, tl.offs[9]+7); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tl.seg+tmpSuffix, []byte("half-created segment"), 0o644); err != nil {
		t.Fatal(err)
	}
	before := dirSnapshot(t, tl.dir)
	l, rec := mustOpen(t, tl.dir, Options{ReadOnly: true, VerifyAll: true})
	wantBytes := int64(lastNonZero(tl.data[tl.offs[9]:tl.offs[9]+7]) + 1) // trailing zeros are not saved
	if rec.Torn == nil || rec.Torn.Bytes != wantBytes || rec.Torn.SavedAs != "" || rec.LastLSN != 9 {
		t.Fatalf("read-only recovery: last %d torn %+v", rec.LastLSN, rec.Torn)
	}
	if got := readAllRecords(t, l, 0); len(got) != 9 {
		t.Fatalf("read-only Iterate returned %d records, want 9", len(got))
	}
	mustClose(t, l)
	after := dirSnapshot(t, tl.dir)
	if len(before) != len(after) {
		t.Fatalf("read-only open changed the file set: %d -> %d files", len(before), len(after))
	}
	for name, b := range before {
		if after[name] != b {
			t.Fatalf("read-only open modified %s", name)
		}
	}
	// A writable open repairs and removes the leftover.
	l, _ = mustOpen(t, tl.dir, Options{SegmentSize: tornSegSize})
	mustClose(t, l)
	if _, err := os.Stat(tl.seg + tmpSuffix); !os.IsNotExist(err) {
		t.Fatalf("leftover temporary segment not removed: %v", err)
	}
}

func TestMidLogCorruption(t *testing.T) {
	opts := Options{SegmentSize: 1024}
	build := func(t *testing.T) (string, []string) {
		dir := t.TempDir()
		l, _ := mustOpen(t, dir, opts)
		for i := 1; i <= 40; i++ {
			mustAppend(t, l, Record{Type: TypePlain, Epoch: 1, Payload: payloadFor(LSN(i), 100)})
		}
		mustClose(t, l)
		segs := segFiles(t, dir)
		if len(segs) < 4 {
			t.Fatalf("want at least 4 segments, got %d", len(segs))
		}
		return dir, segs
	}
	patch := func(t *testing.T, path string, off int64, b []byte) {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	firstRec := int64(segHeaderSize)
	secondRec := int64(segHeaderSize + recHeaderSize + 100)
	fullSegEnd := int64(segHeaderSize + 6*(recHeaderSize+100)) // six records fit in 1 KiB
	cases := []struct {
		name   string
		damage func(t *testing.T, dir string, segs []string) (seg string, off int64)
	}{
		{"bad record in first segment", func(t *testing.T, _ string, s []string) (string, int64) {
			patch(t, s[0], secondRec+50, []byte{0xff})
			return s[0], secondRec
		}},
		{"bad record in middle segment", func(t *testing.T, _ string, s []string) (string, int64) {
			patch(t, s[1], firstRec+3, []byte{0})
			return s[1], firstRec
		}},
		{"bad record in last segment followed by durable records", func(t *testing.T, _ string, s []string) (string, int64) {
			patch(t, s[len(s)-1], firstRec+recHeaderSize, []byte("XX"))
			return s[len(s)-1], firstRec
		}},
		{"zeroed record in non-last segment", func(t *testing.T, _ string, s []string) (string, int64) {
			patch(t, s[1], secondRec, make([]byte, recHeaderSize+100))
			return s[1], secondRec
		}},
		{"garbage in preallocated tail of non-last segment", func(t *testing.T, _ string, s []string) (string, int64) {
			patch(t, s[0], 1020, []byte{1})
			return s[0], fullSegEnd
		}},
		{"bad header in non-last segment", func(t *testing.T, _ string, s []string) (string, int64) {
			patch(t, s[1], 3, []byte{'?'})
			return s[1], 0
		}},
		{"bad header in last segment", func(t *testing.T, _ string, s []string) (string, int64) {
			patch(t, s[len(s)-1], 20, []byte{0xee})
			return s[len(s)-1], 0
		}},
		{"missing middle segment", func(t *testing.T, _ string, s []string) (string, int64) {
			if err := os.Remove(s[2]); err != nil {
				t.Fatal(err)
			}
			return s[1], fullSegEnd
		}},
		{"segment renamed", func(t *testing.T, dir string, s []string) (string, int64) {
			bogus := filepath.Join(dir, segName(1000))
			if err := os.Rename(s[len(s)-1], bogus); err != nil {
				t.Fatal(err)
			}
			return bogus, 16
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir, segs := build(t)
			seg, off := c.damage(t, dir, segs)
			for _, ro := range []bool{true, false} {
				o := opts
				o.ReadOnly, o.VerifyAll = ro, ro
				_, _, err := Open(dir, o)
				var ce *CorruptionError
				if !errors.As(err, &ce) || !errors.Is(err, ErrCorrupt) {
					t.Fatalf("readOnly=%v: err = %v, want a CorruptionError", ro, err)
				}
				if ce.Segment != seg || ce.Offset != off {
					t.Fatalf("readOnly=%v: corruption reported at %s offset %d, want %s offset %d", ro, ce.Segment, ce.Offset, seg, off)
				}
				if !strings.Contains(err.Error(), seg) {
					t.Fatalf("error does not name the segment: %v", err)
				}
			}
		})
	}
}

// fuzzScript is the fixed sequence of appends FuzzRecover's seed logs are
// built from. Whatever recovery returns at LSN n must be record n of the
// full log built from it.
func buildFuzzLog(t testing.TB, dir string, n, batchFrom int) {
	l, _ := mustOpen(t, dir, Options{SegmentSize: fuzzSegSize})
	defer mustClose(t, l)
	ctx := context.Background()
	for i := 1; i <= n; i++ {
		ep := uint64(1 + i/10)
		tx := uint64(1 + (i/4)%3)
		var r Record
		switch i % 8 {
		case 0:
			if _, err := l.Checkpoint(ctx, ep, []byte(fmt.Sprintf("snapshot %d", i))); err != nil {
				t.Fatal(err)
			}
			continue
		case 1:
			r = Record{Type: TypeBegin, TxID: tx}
		case 2, 3:
			r = Record{Type: TypeData, TxID: tx, Payload: payloadFor(LSN(i), i%23)}
		case 4:
			r = Record{Type: TypePrepare, TxID: tx}
		case 5:
			r = Record{Type: TypePlain, Payload: []byte{0, 1, 2, byte(i)}}
		case 6:
			if i%3 == 0 {
				r = Record{Type: TypeAbort, TxID: tx}
			} else {
				r = Record{Type: TypeCommit, TxID: tx}
			}
		case 7:
			if i%3 == 1 {
				r = Record{Type: TypeEnd, TxID: tx}
			} else {
				r = Record{Type: TypePlain}
			}
		}
		r.Epoch = ep
		var err error
		if i >= batchFrom {
			_, err = l.AppendAsync(ctx, r)
		} else {
			_, err = l.Append(ctx, r)
		}
		if err != nil && !errors.Is(err, ErrTxnState) {
			t.Fatal(err)
		}
	}
}

const fuzzSegSize = 4096

// FuzzRecover opens arbitrary bytes as the only segment of a log. Seeds are
// real logs built by buildFuzzLog. Recovery must not panic, and every record
// it returns must be the record written at that LSN: damage is cut or
// reported, never turned into a different record.
func FuzzRecover(f *testing.F) {
	full := f.TempDir()
	buildFuzzLog(f, full, 60, 1000)
	l, _ := mustOpen(f, full, Options{SegmentSize: fuzzSegSize, ReadOnly: true})
	known := readAllRecords(f, l, 0)
	mustClose(f, l)
	if len(known) < 40 {
		f.Fatalf("fuzz seed log has only %d records", len(known))
	}
	for _, s := range []struct{ n, batchFrom int }{{60, 1000}, {60, 45}, {25, 1000}, {9, 3}, {0, 0}} {
		dir := f.TempDir()
		buildFuzzLog(f, dir, s.n, s.batchFrom)
		b, err := os.ReadFile(filepath.Join(dir, segName(1)))
		if err != nil {
			f.Fatal(err)
		}
		b = b[:lastNonZero(b)+1] // EOF ends a segment as well as zeros do; smaller inputs fuzz faster
		f.Add(b)
		if s.n > 0 {
			nz := lastNonZero(b)
			f.Add(b[:nz-10])
			g := append([]byte(nil), b...)
			g[nz/2] ^= 1
			f.Add(g)
		}
	}
	// One directory per worker process, emptied before each input: fuzz
	// inputs run one at a time, and a fresh TempDir per input would cost
	// more than recovery itself.
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			os.Remove(filepath.Join(dir, e.Name()))
		}
		seg := filepath.Join(dir, segName(1))
		if err := os.WriteFile(seg, data, 0o644); err != nil {
			t.Fatal(err)
		}
		check := func(what string, recs []Record) {
			for i, r := range recs {
				if r.LSN == 0 || int(r.LSN) > len(known) || !sameRecord(r, known[r.LSN-1]) {
					t.Fatalf("%s: record %d (LSN %d) was never written: %+v", what, i, r.LSN, r)
				}
				if i > 0 && r.LSN != recs[i-1].LSN+1 {
					t.Fatalf("%s: LSN %d follows %d", what, r.LSN, recs[i-1].LSN)
				}
			}
		}
		l, rec, err := Open(dir, Options{SegmentSize: fuzzSegSize, ReadOnly: true})
		if err != nil {
			return
		}
		check("Recovery.Records", rec.Records)
		for id, tx := range rec.Txns {
			check(fmt.Sprintf("txn %d data", id), tx.Data)
		}
		all := readAllRecords(t, l, 0)
		check("Iterate", all)
		if len(all) > 0 && all[len(all)-1].LSN != rec.LastLSN {
			t.Fatalf("Iterate ends at LSN %d, recovery at %d", all[len(all)-1].LSN, rec.LastLSN)
		}
		mustClose(t, l)
		// Writable opens fsync, which would make fuzzing (and minimizing)
		// crawl; TestTornTail covers cutting at every offset, so only a
		// deterministic sixteenth of torn inputs is cut here.
		if rec.Torn == nil || crc32.ChecksumIEEE(data)%16 != 0 {
			return
		}
		// Cutting for real gives the same log and saves exactly the cut bytes.
		l, rec2, err := Open(dir, Options{SegmentSize: fuzzSegSize})
		if err != nil {
			t.Fatalf("writable open after a clean read-only open: %v", err)
		}
		mustClose(t, l)
		if rec2.LastLSN != rec.LastLSN || rec2.Torn == nil || rec2.Torn.Offset != rec.Torn.Offset {
			t.Fatalf("writable recovery differs: last %d torn %+v, read-only last %d torn %+v", rec2.LastLSN, rec2.Torn, rec.LastLSN, rec.Torn)
		}
		saved, err := os.ReadFile(rec2.Torn.SavedAs)
		if err != nil || !bytes.Equal(saved, data[rec.Torn.Offset:rec.Torn.Offset+rec.Torn.Bytes]) {
			t.Fatalf("saved-aside bytes differ from the cut (err %v)", err)
		}
		l, rec3, err := Open(dir, Options{SegmentSize: fuzzSegSize, ReadOnly: true})
		if err != nil || rec3.Torn != nil || rec3.LastLSN != rec.LastLSN {
			t.Fatalf("after the cut: err %v torn %+v last %d, want clean log ending at %d", err, rec3.Torn, rec3.LastLSN, rec.LastLSN)
		}
		mustClose(t, l)
	})
}
