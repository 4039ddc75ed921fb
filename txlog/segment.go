package txlog

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Segment header, little endian:
//
//	off size field
//	  0    8 magic    "RMRTXLOG"
//	  8    4 version  1
//	 12    4 reserved must be zero
//	 16    8 firstLSN LSN of the first record in this segment
//	 24    8 epoch    highest fencing epoch when the segment was created
//	 32    4 crc32c   Castagnoli over bytes [0, 32)
//	 36    4 reserved must be zero
const (
	segHeaderSize  = 40
	segVersion     = 1
	segSuffix      = ".seg"
	tmpSuffix      = ".tmp"
	tornInfix      = ".torn-"
	lockFileName   = "LOCK"
	segNameDigits  = 16
	minSegmentSize = 1 << 10
)

var segMagic = [8]byte{'R', 'M', 'R', 'T', 'X', 'L', 'O', 'G'}

type segHeader struct {
	firstLSN LSN
	epoch    uint64
}

func (h segHeader) encode() []byte {
	b := make([]byte, segHeaderSize)
	copy(b, segMagic[:])
	binary.LittleEndian.PutUint32(b[8:], segVersion)
	binary.LittleEndian.PutUint64(b[16:], uint64(h.firstLSN))
	binary.LittleEndian.PutUint64(b[24:], h.epoch)
	binary.LittleEndian.PutUint32(b[32:], crc32.Checksum(b[:32], castagnoli))
	return b
}

func decodeSegHeader(b []byte) (segHeader, error) {
	if len(b) < segHeaderSize {
		return segHeader{}, fmt.Errorf("segment header is %d bytes, want %d", len(b), segHeaderSize)
	}
	if [8]byte(b[:8]) != segMagic {
		return segHeader{}, fmt.Errorf("bad magic %q", b[:8])
	}
	if c := crc32.Checksum(b[:32], castagnoli); c != binary.LittleEndian.Uint32(b[32:]) {
		return segHeader{}, errors.New("segment header checksum mismatch")
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != segVersion {
		return segHeader{}, fmt.Errorf("unsupported segment version %d (this build reads version %d)", v, segVersion)
	}
	if binary.LittleEndian.Uint32(b[12:])|binary.LittleEndian.Uint32(b[36:]) != 0 {
		return segHeader{}, errors.New("reserved header bytes are not zero")
	}
	h := segHeader{
		firstLSN: LSN(binary.LittleEndian.Uint64(b[16:])),
		epoch:    binary.LittleEndian.Uint64(b[24:]),
	}
	if h.firstLSN == 0 {
		return segHeader{}, errors.New("first LSN is 0")
	}
	return h, nil
}

func segName(first LSN) string { return fmt.Sprintf("%0*x%s", segNameDigits, uint64(first), segSuffix) }

func parseSegName(name string) (LSN, bool) {
	s, ok := strings.CutSuffix(name, segSuffix)
	if !ok || len(s) != segNameDigits {
		return 0, false
	}
	v, err := strconv.ParseUint(s, 16, 64)
	return LSN(v), err == nil && v != 0
}

// segment is a segment file known to the log.
type segment struct {
	path string
	hdr  segHeader
	size int64 // file size when listed
}

// listSegments returns the segments of dir in LSN order with their headers
// checked. A bad header is corruption no matter where the segment is: a
// segment only gets its final name after its header is durable.
func listSegments(dir string) (segs []segment, tmps []string, err error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("txlog: read log directory: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		if strings.HasSuffix(name, segSuffix+tmpSuffix) {
			tmps = append(tmps, filepath.Join(dir, name))
			continue
		}
		first, ok := parseSegName(name)
		if !ok || !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(dir, name)
		h, size, err := readSegHeader(path)
		if err != nil {
			return nil, nil, err
		}
		if h.firstLSN != first {
			return nil, nil, &CorruptionError{Segment: path, Offset: 16,
				Reason: fmt.Sprintf("header says first LSN %d but the file name says %d", h.firstLSN, first)}
		}
		segs = append(segs, segment{path: path, hdr: h, size: size})
	}
	sort.Slice(segs, func(i, j int) bool { return segs[i].hdr.firstLSN < segs[j].hdr.firstLSN })
	return segs, tmps, nil
}

func readSegHeader(path string) (segHeader, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return segHeader{}, 0, fmt.Errorf("txlog: open segment: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return segHeader{}, 0, fmt.Errorf("txlog: stat segment: %w", err)
	}
	b := make([]byte, segHeaderSize)
	n, err := io.ReadFull(f, b)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return segHeader{}, 0, fmt.Errorf("txlog: read segment header of %s: %w", path, err)
	}
	h, err := decodeSegHeader(b[:n])
	if err != nil {
		return segHeader{}, 0, &CorruptionError{Segment: path, Offset: 0, Reason: "bad segment header: " + err.Error()}
	}
	return h, fi.Size(), nil
}

// createSegment makes a new preallocated segment durably: it is written
// under a temporary name, synced, renamed and the directory synced, so a
// crash leaves either no segment or a complete header.
func createSegment(dir string, h segHeader, size int64) (*os.File, string, error) {
	path := filepath.Join(dir, segName(h.firstLSN))
	tmp := path + tmpSuffix
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, "", fmt.Errorf("txlog: create segment: %w", err)
	}
	fail := func(err error) (*os.File, string, error) {
		f.Close()
		os.Remove(tmp)
		return nil, "", fmt.Errorf("txlog: create segment %s: %w", path, err)
	}
	if _, err := f.WriteAt(h.encode(), 0); err != nil {
		return fail(err)
	}
	if err := preallocate(f, size); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(err)
	}
	if err := syncDir(dir); err != nil {
		f.Close()
		return nil, "", err
	}
	return f, path, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("txlog: open directory for sync: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("txlog: sync directory %s: %w", dir, err)
	}
	return nil
}

// segReader streams the records of one segment in order.
type segReader struct {
	r    *bufio.Reader
	off  int64 // offset of the next record
	size int64
	next LSN // LSN the next record must have
	hb   [recHeaderSize]byte
}

func newSegReader(f *os.File, size int64, first LSN) *segReader {
	return newSegReaderAt(f, size, segHeaderSize, first)
}

// newSegReaderAt reads from off, where the record with LSN next starts.
func newSegReaderAt(f *os.File, size, off int64, next LSN) *segReader {
	return &segReader{
		r:    bufio.NewReaderSize(io.NewSectionReader(f, off, size-off), 1<<18),
		off:  off,
		size: size,
		next: next,
	}
}

// readError is an I/O failure, as opposed to bytes that are not a record.
// It must never be mistaken for a torn tail: that would cut durable data
// because of a failing disk.
type readError struct{ err error }

func (e *readError) Error() string { return e.err.Error() }
func (e *readError) Unwrap() error { return e.err }

func shortOr(err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return errShortRecord
	}
	return &readError{err}
}

// read returns the next record with a freshly allocated payload, or why
// the bytes at sr.off are not that record (a *readError if reading
// failed). After an error the reader must not be used again.
func (sr *segReader) read() (Record, error) {
	if _, err := io.ReadFull(sr.r, sr.hb[:]); err != nil {
		return Record{}, shortOr(err)
	}
	h, err := parseHeader(sr.hb[:], int(sr.size-sr.off-recHeaderSize))
	if err != nil {
		return Record{}, err
	}
	if h.lsn != sr.next {
		return Record{}, fmt.Errorf("record has LSN %d, want %d", h.lsn, sr.next)
	}
	payload := make([]byte, h.length)
	if _, err := io.ReadFull(sr.r, payload); err != nil {
		return Record{}, shortOr(err)
	}
	if !h.checksum(sr.hb[:], payload) {
		return Record{}, errBadCRC
	}
	sr.off += recHeaderSize + int64(h.length)
	sr.next++
	return h.record(payload), nil
}

// segScan is what one pass over a segment found.
type segScan struct {
	records []Record // nil unless kept
	offs    []int64  // offset of each kept record
	count   int      // valid records seen
	end     int64    // offset just past the last valid record
	next    LSN      // LSN the next record would have
	maxEp   uint64
	torn    *TornTail // set only for the last segment
}

// scanSegment validates every record of a segment. Bytes after the last
// valid record must be zero (preallocated space), except in the last
// segment where a torn tail is reported for the caller to cut. Damage that
// something durable was written after is a CorruptionError.
func scanSegment(sg segment, last, keep, live bool) (*segScan, error) {
	f, err := os.Open(sg.path)
	if err != nil {
		return nil, fmt.Errorf("txlog: open segment: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("txlog: stat segment: %w", err)
	}
	size := fi.Size()
	s := &segScan{next: sg.hdr.firstLSN, maxEp: sg.hdr.epoch}
	sr := newSegReader(f, size, sg.hdr.firstLSN)
	var seen []byte // the bad bytes at s.end in the previous round
	for round := 0; ; round++ {
		var why error
		for {
			off := sr.off
			r, err := sr.read()
			var re *readError
			if errors.As(err, &re) {
				return nil, fmt.Errorf("txlog: read segment %s at offset %d: %w", sg.path, off, re.err)
			}
			if err != nil {
				why = err
				break
			}
			if keep {
				s.records = append(s.records, r)
				s.offs = append(s.offs, off)
			}
			s.count++
			s.maxEp = max(s.maxEp, r.Epoch)
		}
		if s.end != sr.off {
			seen = nil // progress: the tail moved
		}
		s.end, s.next = sr.off, sr.next
		nz, err := lastNonZeroAt(f, s.end, size)
		if err != nil {
			return nil, fmt.Errorf("txlog: read segment %s: %w", sg.path, err)
		}
		if nz < 0 {
			return s, nil // preallocated zeros or EOF: the normal end
		}
		if !last {
			return nil, &CorruptionError{Segment: sg.path, Offset: s.end, LSN: s.next,
				Reason: fmt.Sprintf("%v, and this is not the last segment (segments are synced before the next one is created)", why)}
		}
		// Damaged or torn: only now read the rest of the segment in one piece.
		rest := make([]byte, size-s.end)
		if _, err := f.ReadAt(rest, s.end); err != nil {
			return nil, fmt.Errorf("txlog: read segment %s: %w", sg.path, err)
		}
		bad := int(nz - s.end + 1)
		// A writer appending while a read-only open reads (verify on a
		// running agent) writes where the scan just saw zeros: read again
		// until the bad bytes stay the same. Damage and a crash's torn
		// tail do not move.
		if live && !bytes.Equal(seen, rest[:bad]) {
			if round == liveRounds {
				return s, nil // still moving: a writer's tail, not damage
			}
			seen = rest[:bad:bad]
			time.Sleep(2 * time.Millisecond)
			sr = newSegReaderAt(f, size, s.end, s.next)
			continue
		}
		if p, lsn, ok := durableEvidence(rest[:bad], rest, s.next); ok {
			return nil, &CorruptionError{Segment: sg.path, Offset: s.end, LSN: s.next,
				Reason: fmt.Sprintf("%v; the valid record LSN %d at offset %d was written after LSN %d was durable, so this is damage, not a torn write",
					why, lsn, s.end+int64(p), s.next)}
		}
		s.torn = &TornTail{Segment: sg.path, Offset: s.end, Bytes: int64(bad), AfterLSN: s.next - 1,
			Reason: why.Error(), data: rest[:bad:bad]}
		return s, nil
	}
}

// liveRounds bounds how often a read-only scan rereads a moving tail.
const liveRounds = 100

// lastNonZeroAt returns the offset of the last non-zero byte of f in
// [from, size), or -1. It reads backwards in small chunks so a mostly
// preallocated segment costs no large buffer.
func lastNonZeroAt(f *os.File, from, size int64) (int64, error) {
	buf := make([]byte, 1<<20)
	for end := size; end > from; {
		start := max(from, end-int64(len(buf)))
		b := buf[:end-start]
		if _, err := f.ReadAt(b, start); err != nil {
			return 0, err
		}
		if i := lastNonZero(b); i >= 0 {
			return start + int64(i), nil
		}
		end = start
	}
	return -1, nil
}

// durableEvidence looks in the bad region for a valid record with LSN >=
// want whose synced watermark is >= want. Such a record proves LSN want had
// already been fsynced, so the damage before it is not a torn write. region
// is where a record may start; full extends to the end of the segment.
func durableEvidence(region, full []byte, want LSN) (int, LSN, bool) {
	for p := range region {
		b := full[p:]
		if len(b) < recHeaderSize || !RecordType(b[8]).valid() {
			continue // cheap filter before parsing
		}
		h, err := parseHeader(b, len(b)-recHeaderSize)
		if err != nil || h.lsn < want || h.synced < want {
			continue // no proof even if the CRC matched
		}
		n := recHeaderSize + int(h.length)
		if h.checksum(b[:recHeaderSize], b[recHeaderSize:n]) {
			return p, h.lsn, true
		}
	}
	return 0, 0, false
}
