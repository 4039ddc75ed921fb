package txlog

import (
	"fmt"
	"os"
	"path/filepath"
)

// Recovery is what Open found on disk.
type Recovery struct {
	FirstLSN LSN    // oldest LSN still on disk
	LastLSN  LSN    // last intact record, FirstLSN-1 if there are none
	MaxEpoch uint64 // highest fencing epoch seen

	// Checkpoint is the latest checkpoint, nil if there is none in the
	// segments recovery read.
	Checkpoint *Checkpoint
	// Records are the records after Checkpoint (all records if there is
	// none), in LSN order.
	Records []Record
	// Txns classifies every transaction that was live at the checkpoint or
	// has records after it.
	Txns map[uint64]*TxnInfo

	// Torn describes a torn tail that was cut (or, read-only, would be).
	Torn *TornTail

	Segments       int // segment files in the log
	ScannedRecords int // records read and checksummed
}

// TornTail describes bytes after the last intact record of the last segment
// that are not a valid record: a write that was never acknowledged.
type TornTail struct {
	Segment  string // path of the segment
	Offset   int64  // where the cut is
	Bytes    int64  // length of the cut region, trailing zeros excluded
	AfterLSN LSN    // last intact record before the cut
	Reason   string // why the first cut byte is not a record
	SavedAs  string // file holding the cut bytes; empty when read-only

	data []byte
}

type recovered struct {
	rec     Recovery
	segs    []segment
	tailEnd int64 // offset just past the last record of the last segment
	ckpt    *ckptMark
}

// recoverLog reads the log in dir. It scans segments from the newest
// backwards until it has the latest checkpoint and every segment a live
// transaction still needs, so a checkpointed log is not read in full
// (unless opts.VerifyAll). Nothing is modified until every check passed.
func recoverLog(dir string, opts Options) (*recovered, error) {
	segs, tmps, err := listSegments(dir)
	if err != nil {
		return nil, err
	}
	if len(segs) == 0 {
		return &recovered{}, nil
	}
	last := len(segs) - 1
	scans := make([]*segScan, len(segs))
	scan := func(i int, keep bool) error {
		s, err := scanSegment(segs[i], i == last, keep, opts.ReadOnly)
		if err != nil {
			return err
		}
		if i < last && s.next != segs[i+1].hdr.firstLSN {
			return &CorruptionError{Segment: segs[i].path, Offset: s.end, LSN: s.next,
				Reason: fmt.Sprintf("segment ends before LSN %d but the next segment %s starts at LSN %d",
					s.next, segs[i+1].path, segs[i+1].hdr.firstLSN)}
		}
		scans[i] = s
		return nil
	}

	if err := scan(last, true); err != nil {
		return nil, err
	}
	low := last
	var ck *Checkpoint
	var needed map[uint64]bool
	var lowWater LSN
	for {
		if ck == nil {
			ck, err = latestCheckpoint(scans[low], segs[low].path)
			if err != nil {
				return nil, err
			}
			if ck != nil {
				needed, lowWater = neededByCheckpoint(ck, scans[low:])
			}
		}
		if (ck != nil && segs[low].hdr.firstLSN <= lowWater) || low == 0 {
			break
		}
		low--
		if err := scan(low, true); err != nil {
			return nil, err
		}
	}
	if ck != nil && segs[low].hdr.firstLSN > lowWater {
		return nil, &CorruptionError{Segment: segs[low].path, Offset: 0,
			Reason: fmt.Sprintf("checkpoint at LSN %d needs records from LSN %d for an unfinished transaction, but the oldest segment starts at LSN %d; were segments removed by hand?",
				ck.LSN, lowWater, segs[low].hdr.firstLSN)}
	}
	scanned := 0
	if opts.VerifyAll {
		for i := low - 1; i >= 0; i-- {
			if err := scan(i, false); err != nil {
				return nil, err
			}
			scanned += scans[i].count
		}
	}

	r := &recovered{segs: segs, tailEnd: scans[last].end}
	rec := &r.rec
	rec.FirstLSN = segs[0].hdr.firstLSN
	rec.LastLSN = scans[last].next - 1
	rec.Segments = len(segs)
	rec.Torn = scans[last].torn
	rec.Checkpoint = ck
	for _, sg := range segs {
		rec.MaxEpoch = max(rec.MaxEpoch, sg.hdr.epoch)
	}
	var before, after []Record
	for _, s := range scans[low:] {
		for _, r := range s.records {
			if ck != nil && r.LSN <= ck.LSN {
				before = append(before, r)
			} else {
				after = append(after, r)
			}
		}
		scanned += s.count
		rec.MaxEpoch = max(rec.MaxEpoch, s.maxEp)
	}
	rec.ScannedRecords = scanned
	rec.Records = after
	rec.Txns = replay(ck, before, after, needed)
	if ck != nil {
		r.ckpt = &ckptMark{lsn: ck.LSN, live: ck.Live}
	}

	if opts.ReadOnly {
		return r, nil
	}
	if rec.Torn != nil {
		if err := cutTail(rec.Torn, max(segs[last].size, opts.SegmentSize)); err != nil {
			return nil, err
		}
	}
	for _, t := range tmps {
		// Half-created segments never got their final name; nothing in
		// them was acknowledged.
		if err := os.Remove(t); err != nil {
			return nil, fmt.Errorf("txlog: remove leftover %s: %w", t, err)
		}
	}
	return r, nil
}

func latestCheckpoint(s *segScan, path string) (*Checkpoint, error) {
	for i := len(s.records) - 1; i >= 0; i-- {
		if s.records[i].Type != TypeCheckpoint {
			continue
		}
		c, err := DecodeCheckpoint(s.records[i])
		if err != nil {
			return nil, &CorruptionError{Segment: path, Offset: s.offs[i], LSN: s.records[i].LSN, Reason: err.Error()}
		}
		return c, nil
	}
	return nil, nil
}

// neededByCheckpoint returns the checkpoint's live transactions whose
// records recovery must still read: those that end up in doubt, or
// committed and not ended, after replaying the records that follow the
// checkpoint. It also returns the lowest LSN recovery must read. A
// transaction that ends up presumed aborted needs nothing, which matches
// the running log dropping it from its live set (and Compact its records).
func neededByCheckpoint(ck *Checkpoint, scans []*segScan) (map[uint64]bool, LSN) {
	var after []Record
	for _, s := range scans {
		for _, r := range s.records {
			if r.LSN > ck.LSN {
				after = append(after, r)
			}
		}
	}
	tt := replay(ck, nil, after, nil)
	needed := map[uint64]bool{}
	low := ck.LSN
	for _, t := range ck.Live {
		e := tt[t.ID]
		if e != nil && e.FirstLSN == t.FirstLSN && (e.State == TxnInDoubt || (e.State == TxnCommitted && !e.Ended)) {
			needed[t.ID] = true
			low = min(low, t.FirstLSN)
		}
	}
	return needed, low
}

// replay classifies transactions: it starts from the checkpoint's live set
// (if any), takes the DATA of needed transactions from the records before
// the checkpoint, and applies the records after it.
func replay(ck *Checkpoint, before, after []Record, needed map[uint64]bool) txnTable {
	tt := txnTable{}
	if ck != nil {
		for _, t := range ck.Live {
			tt[t.ID] = &TxnInfo{ID: t.ID, State: t.State, FirstLSN: t.FirstLSN, LastLSN: t.FirstLSN}
		}
		for _, r := range before {
			t := tt[r.TxID]
			if r.Type == TypeCheckpoint || r.Type == TypePlain || t == nil || r.LSN < t.FirstLSN {
				continue
			}
			t.LastLSN, t.Epoch = r.LSN, r.Epoch
			if r.Type == TypeData && needed[r.TxID] {
				t.Data = append(t.Data, r)
			}
		}
	}
	for i := range after {
		tt.apply(&after[i])
	}
	tt.finish()
	return tt
}

// cutTail saves the torn bytes next to the segment, then zeroes them in
// the segment. Saving first means a crash in between only repeats the cut.
func cutTail(t *TornTail, capacity int64) error {
	name := fmt.Sprintf("%s%s%0*x", t.Segment, tornInfix, segNameDigits, uint64(t.AfterLSN+1))
	var f *os.File
	var err error
	for n := 0; ; n++ {
		t.SavedAs = name
		if n > 0 {
			t.SavedAs = fmt.Sprintf("%s.%d", name, n)
		}
		f, err = os.OpenFile(t.SavedAs, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if !os.IsExist(err) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("txlog: save torn tail: %w", err)
	}
	_, err = f.Write(t.data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("txlog: save torn tail to %s: %w", t.SavedAs, err)
	}
	if err := syncDir(filepath.Dir(t.Segment)); err != nil {
		return err
	}
	seg, err := os.OpenFile(t.Segment, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("txlog: cut torn tail: %w", err)
	}
	defer seg.Close()
	// Truncate then re-preallocate: the cut region reads back as zeros,
	// which is the normal end of a segment.
	if err := seg.Truncate(t.Offset); err != nil {
		return fmt.Errorf("txlog: cut torn tail of %s at offset %d: %w", t.Segment, t.Offset, err)
	}
	if err := preallocate(seg, capacity); err != nil {
		return fmt.Errorf("txlog: re-preallocate %s: %w", t.Segment, err)
	}
	if err := seg.Sync(); err != nil {
		return fmt.Errorf("txlog: sync %s after cutting torn tail: %w", t.Segment, err)
	}
	return nil
}
