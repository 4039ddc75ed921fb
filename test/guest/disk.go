package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// RecordSize is the size of one disk record: one write.
const RecordSize = 4096

// Disk record layout (little endian):
//
//	[0:8)       magic "RMRDISK1"
//	[8:16)      index, from 1
//	[16:24)     seed of the writer's run
//	[24:4088)   content: 508 words derived from (seed, index)
//	[4088:4092) zero
//	[4092:4096) CRC-32C of [0:4092)
//
// Record i goes to slot (i-1) mod slots of the device, so the writer
// cycles over a fixed area. A record of another run (other seed) counts
// as absent; one torn by a partial write fails the checksum.
const (
	recMagicOff = 0
	recIndexOff = 8
	recSeedOff  = 16
	recBodyOff  = 24
	recPadOff   = RecordSize - 8
	recCRCOff   = RecordSize - 4
	recWords    = (recPadOff - recBodyOff) / 8
)

var recMagic = binary.LittleEndian.Uint64([]byte("RMRDISK1"))

func stampRecord(p []byte, seed, index uint64) {
	p = p[:RecordSize]
	binary.LittleEndian.PutUint64(p[recMagicOff:], recMagic)
	binary.LittleEndian.PutUint64(p[recIndexOff:], index)
	binary.LittleEndian.PutUint64(p[recSeedOff:], seed)
	s := pageSeed(seed, index)
	for j := 0; j < recWords; j++ {
		binary.LittleEndian.PutUint64(p[recBodyOff+8*j:], contentWord(s, j))
	}
	binary.LittleEndian.PutUint32(p[recPadOff:], 0)
	binary.LittleEndian.PutUint32(p[recCRCOff:], crc32.Checksum(p[:recCRCOff], castagnoli))
}

// parseRecord returns the index of an intact record of run seed, 0 for a
// slot that holds none (zeroes, or an intact record of another run), or
// an error for anything torn or corrupt.
func parseRecord(p []byte, seed uint64) (uint64, error) {
	p = p[:RecordSize]
	if binary.LittleEndian.Uint64(p[recMagicOff:]) != recMagic {
		if allZero(p) {
			return 0, nil
		}
		return 0, errors.New("garbage (bad magic, not zero)")
	}
	if sum, stored := crc32.Checksum(p[:recCRCOff], castagnoli), binary.LittleEndian.Uint32(p[recCRCOff:]); sum != stored {
		return 0, fmt.Errorf("torn: checksum %08x, stored %08x (index %d)", sum, stored, binary.LittleEndian.Uint64(p[recIndexOff:]))
	}
	index := binary.LittleEndian.Uint64(p[recIndexOff:])
	if rs := binary.LittleEndian.Uint64(p[recSeedOff:]); rs != seed {
		return 0, nil
	}
	if index == 0 || binary.LittleEndian.Uint32(p[recPadOff:]) != 0 {
		return 0, fmt.Errorf("bad header (index %d)", index)
	}
	s := pageSeed(seed, index)
	for j := 0; j < recWords; j++ {
		if binary.LittleEndian.Uint64(p[recBodyOff+8*j:]) != contentWord(s, j) {
			return 0, fmt.Errorf("content of record %d does not derive from it", index)
		}
	}
	return index, nil
}

// checkSlot checks the record in slot s of a device of slots slots, of a
// writer that completed records 1..n: the slot must hold the newest record
// <= n that maps to it (or nothing, if there is none), except that record
// n+1 (written, not counted yet) may be there instead. It reports whether
// it found n+1.
func checkSlot(p []byte, s, slots, seed, n uint64) (extra bool, err error) {
	got, err := parseRecord(p, seed)
	if err != nil {
		return false, err
	}
	var want uint64 // 0: none
	if n >= s+1 {
		want = s + 1 + (n-(s+1))/slots*slots
	}
	switch {
	case got == want:
		return false, nil
	case got == n+1 && n%slots == s:
		return true, nil
	case got > n+1:
		return false, fmt.Errorf("holds record %d, beyond the %d written", got, n)
	case got != 0 && (got-1)%slots != s:
		return false, fmt.Errorf("holds record %d, which belongs to slot %d", got, (got-1)%slots)
	case want == 0:
		return false, fmt.Errorf("holds record %d, want none", got)
	case got == 0:
		return false, fmt.Errorf("record %d missing (lost write)", want)
	default:
		return false, fmt.Errorf("holds record %d, want %d (lost write)", got, want)
	}
}

// checkRecords checks a device image r of slots slots against a writer
// that completed records 1..n; extra is 1 if record n+1 is there too.
func checkRecords(r io.ReaderAt, slots, seed, n uint64, buf []byte) (extra int, err error) {
	if len(buf) < RecordSize {
		buf = make([]byte, 64*RecordSize)
	}
	per := uint64(len(buf) / RecordSize)
	var first error
	bad := 0
	for s := uint64(0); s < slots; s += per {
		k := min(per, slots-s)
		b := buf[:k*RecordSize]
		if _, err := r.ReadAt(b, int64(s*RecordSize)); err != nil && !(errors.Is(err, io.EOF)) {
			return 0, fmt.Errorf("read slots %d..%d: %w", s, s+k-1, err)
		}
		for i := uint64(0); i < k; i++ {
			x, err := checkSlot(b[i*RecordSize:(i+1)*RecordSize], s+i, slots, seed, n)
			if err != nil {
				if first == nil {
					first = fmt.Errorf("slot %d: %v", s+i, err)
				}
				bad++
			}
			if x {
				extra = 1
			}
		}
	}
	if first != nil {
		return extra, fmt.Errorf("%v [%d bad slots of %d; %d records written]", first, bad, slots, n)
	}
	return extra, nil
}

// DiskWriter appends records to a disk device at a rate. A record counts
// only after its write returned; with O_DIRECT that means the virtual disk
// completed it. Writes and the check hold mu, so a check never sees a
// write in progress of this process, and a checkpoint taken at any
// instant holds a count that matches the disk of the same instant.
type DiskWriter struct {
	path  string
	f     *os.File
	slots uint64
	seed  uint64
	rate  atomic.Int64

	mu  sync.Mutex // held by a write and its count, and by a check
	buf []byte     // aligned for O_DIRECT

	// The figures have their own lock, so stats answer while a write
	// waits on the disk.
	statMu  sync.Mutex
	count   uint64 // written under both locks
	lat     []time.Duration
	latNext int
	latSum  time.Duration // over latN writes
	latN    uint64
	latMax  time.Duration
	errs    uint64
	lastErr string
	checks  uint64
}

const diskLatWindow = 1024

// alignedBuffer returns n bytes aligned to 4096, as O_DIRECT needs.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+4096)
	off := int(-uintptr(unsafe.Pointer(&b[0])) & 4095)
	return b[off : off+n]
}

// OpenDiskWriter opens the device at path (O_DIRECT when direct) and uses
// up to maxSlots records of it (0: all of it).
func OpenDiskWriter(path string, direct bool, maxSlots uint64, seed uint64) (*DiskWriter, error) {
	flags := os.O_RDWR
	if direct {
		flags |= oDirect
	}
	f, err := os.OpenFile(path, flags, 0)
	if err != nil {
		return nil, err
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, err
	}
	slots := uint64(size) / RecordSize
	if maxSlots > 0 {
		slots = min(slots, maxSlots)
	}
	if slots == 0 {
		f.Close()
		return nil, fmt.Errorf("%s: %d bytes, too small for a record", path, size)
	}
	return &DiskWriter{path: path, f: f, slots: slots, seed: seed, buf: alignedBuffer(256 << 10)}, nil
}

func (d *DiskWriter) SetRate(recordsPerSec int64) { d.rate.Store(max(recordsPerSec, 0)) }
func (d *DiskWriter) Rate() int64                 { return d.rate.Load() }

// WriteNext writes record count+1 and counts it once the write returned.
func (d *DiskWriter) WriteNext() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	i := d.count + 1
	p := d.buf[:RecordSize]
	stampRecord(p, d.seed, i)
	start := time.Now()
	_, err := d.f.WriteAt(p, int64((i-1)%d.slots*RecordSize))
	if err != nil {
		d.statMu.Lock()
		defer d.statMu.Unlock()
		d.errs++
		d.lastErr = err.Error()
		return err
	}
	lat := time.Since(start)
	d.statMu.Lock()
	defer d.statMu.Unlock()
	if len(d.lat) < diskLatWindow {
		d.lat = append(d.lat, lat)
	} else {
		d.lat[d.latNext] = lat
		d.latNext = (d.latNext + 1) % diskLatWindow
	}
	d.latSum += lat
	d.latN++
	d.latMax = max(d.latMax, lat)
	d.count = i
	return nil
}

// Discard trims (or, where the disk cannot, zeroes) n bytes of the device
// past the records' area, as an fstrim of free space does; the records
// must survive it.
func (d *DiskWriter) Discard(n uint64) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	start := d.slots * RecordSize
	size, err := d.f.Seek(0, io.SeekEnd)
	if err != nil {
		return "", err
	}
	n = min(n, uint64(size)-start)
	if n == 0 {
		return "", fmt.Errorf("no room past the %d records of %s", d.slots, d.path)
	}
	return discardRange(d.f, start, n)
}

// Check reads the device and checks it against the count.
func (d *DiskWriter) Check() (n uint64, extra int, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.statMu.Lock()
	d.checks++
	d.statMu.Unlock()
	extra, err = checkRecords(d.f, d.slots, d.seed, d.count, d.buf)
	return d.count, extra, err
}

// DiskStats are the writer's figures.
type DiskStats struct {
	Count, Errors, Checks uint64
	Slots                 uint64
	Rate                  int64
	LatAvg, LatP50        time.Duration
	LatP99, LatMax        time.Duration
	LastErr               string
}

func (d *DiskWriter) Stats() DiskStats {
	d.statMu.Lock()
	defer d.statMu.Unlock()
	s := DiskStats{Count: d.count, Errors: d.errs, Checks: d.checks, Slots: d.slots, Rate: d.Rate(), LatMax: d.latMax, LastErr: d.lastErr}
	if d.latN > 0 {
		s.LatAvg = d.latSum / time.Duration(d.latN)
	}
	if len(d.lat) > 0 {
		l := slices.Clone(d.lat)
		slices.Sort(l)
		s.LatP50 = l[len(l)/2]
		s.LatP99 = l[min(len(l)-1, len(l)*99/100)]
	}
	return s
}

// ResetLatency forgets the latency figures (for a new measurement).
func (d *DiskWriter) ResetLatency() {
	d.statMu.Lock()
	defer d.statMu.Unlock()
	d.lat, d.latNext, d.latMax = d.lat[:0], 0, 0
	d.latSum, d.latN = 0, 0
}

// Run writes at the set rate until stop is closed, like Writer: the
// records owed since the last tick in one burst, debt capped.
func (d *DiskWriter) Run(stop <-chan struct{}) {
	t := time.NewTicker(writerTick)
	defer t.Stop()
	last := time.Now()
	credit := 0.0
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			dt := min(now.Sub(last), maxDebt)
			last = now
			rate := float64(d.rate.Load())
			if rate == 0 {
				credit = 0
				continue
			}
			credit = min(credit+rate*dt.Seconds(), rate*maxDebt.Seconds()+1)
			n := int(credit)
			credit -= float64(n)
			for i := 0; i < n; i++ {
				if d.WriteNext() != nil {
					credit = 0
					break
				}
			}
		}
	}
}
