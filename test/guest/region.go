package main

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"sync"
	"syscall"
)

// PageSize is the size of one integrity page. It matches the guest's page
// size, so a checkpoint copies (or misses) whole integrity pages.
const PageSize = 4096

// Page layout (little endian):
//
//	[0:8)       magic "RMRPAGE1"
//	[8:16)      round
//	[16:24)     page index
//	[24:4088)   content: 508 words derived from (round, index)
//	[4088:4092) zero
//	[4092:4096) CRC-32C of [0:4092)
//
// A page from another round or with another index has a different header and
// different content; a page torn by a copy (part old, part new) fails the
// checksum.
const (
	offMagic   = 0
	offRound   = 8
	offIndex   = 16
	offContent = 24
	offPad     = PageSize - 8
	offCRC     = PageSize - 4
	nWords     = (offPad - offContent) / 8
)

var pageMagic = binary.LittleEndian.Uint64([]byte("RMRPAGE1"))

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// mix64 is the splitmix64 finalizer.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

func pageSeed(round, index uint64) uint64 {
	return mix64(round*0x9e3779b97f4a7c15 ^ mix64(index+0x632be59bd9b4e019))
}

// contentWord is word j of the content of page index in round.
func contentWord(seed uint64, j int) uint64 {
	return seed ^ (uint64(j+1) * 0xd6e8feb86659fd93)
}

// stampPage writes the complete page for (round, index) into p.
func stampPage(p []byte, round, index uint64) {
	p = p[:PageSize]
	binary.LittleEndian.PutUint64(p[offMagic:], pageMagic)
	binary.LittleEndian.PutUint64(p[offRound:], round)
	binary.LittleEndian.PutUint64(p[offIndex:], index)
	seed := pageSeed(round, index)
	c := p[offContent:offPad]
	for j := 0; j < nWords; j++ {
		binary.LittleEndian.PutUint64(c[j*8:], contentWord(seed, j))
	}
	binary.LittleEndian.PutUint32(p[offPad:], 0)
	sealPage(p)
}

// sealPage stores the checksum of p.
func sealPage(p []byte) {
	binary.LittleEndian.PutUint32(p[offCRC:], crc32.Checksum(p[:offCRC], castagnoli))
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// verifyPage checks that p is a complete, intact page with the given index
// stamped in round want. The error says what is wrong, without the page
// number (the caller adds it).
func verifyPage(p []byte, index, want uint64) error {
	p = p[:PageSize]
	if binary.LittleEndian.Uint64(p[offMagic:]) != pageMagic {
		if allZero(p) {
			return fmt.Errorf("all zero (never written, or not copied)")
		}
		return fmt.Errorf("bad magic %#016x (garbage or torn page)", binary.LittleEndian.Uint64(p[offMagic:]))
	}
	round := binary.LittleEndian.Uint64(p[offRound:])
	idx := binary.LittleEndian.Uint64(p[offIndex:])
	stored := binary.LittleEndian.Uint32(p[offCRC:])
	if sum := crc32.Checksum(p[:offCRC], castagnoli); sum != stored {
		return fmt.Errorf("checksum mismatch, stored %08x computed %08x (torn or corrupted page; header round=%d index=%d)",
			stored, sum, round, idx)
	}
	if idx != index {
		return fmt.Errorf("holds the content of page %d (round %d)", idx, round)
	}
	if round != want {
		kind := "stale: a write was lost, e.g. missed by dirty tracking"
		if round > want {
			kind = "newer than the writer's state"
		}
		return fmt.Errorf("round %d, want %d (%s)", round, want, kind)
	}
	if binary.LittleEndian.Uint32(p[offPad:]) != 0 {
		return fmt.Errorf("nonzero padding")
	}
	seed := pageSeed(round, index)
	c := p[offContent:offPad]
	for j := 0; j < nWords; j++ {
		if binary.LittleEndian.Uint64(c[j*8:]) != contentWord(seed, j) {
			return fmt.Errorf("content word %d does not derive from round %d index %d", j, round, index)
		}
	}
	return nil
}

// checkRegion checks a region whose writer is about to write page boundary
// of round: pages [0, boundary) must be of round, pages [boundary, n) of
// round-1, and every page intact. It returns nil or an error naming the first
// bad page and the number of bad pages.
func checkRegion(buf []byte, round uint64, boundary int) error {
	n := len(buf) / PageSize
	if boundary < 0 || boundary > n {
		return fmt.Errorf("boundary %d out of range [0,%d]", boundary, n)
	}
	if round < 1 || (round == 1 && boundary < n) {
		return fmt.Errorf("writer state round=%d boundary=%d is invalid", round, boundary)
	}
	var first error
	bad := 0
	for i := 0; i < n; i++ {
		want := round
		if i >= boundary {
			want = round - 1
		}
		if err := verifyPage(buf[i*PageSize:(i+1)*PageSize], uint64(i), want); err != nil {
			if first == nil {
				first = fmt.Errorf("page %d: %v", i, err)
			}
			bad++
		}
	}
	if first != nil {
		return fmt.Errorf("%v [%d bad of %d pages; writer at round %d boundary %d]", first, bad, n, round, boundary)
	}
	return nil
}

// Region is the integrity region and the writer's position in it. The
// region is allocated once and never reallocated. Every page write and the
// whole check run under mu, so the check never sees a page the writer is in
// the middle of.
type Region struct {
	mu      sync.Mutex
	buf     []byte
	pages   int
	round   uint64 // round being written
	next    int    // next page to write in round
	written uint64 // pages written since start (including the initial fill)
}

// NewRegion allocates a region of pages pages and stamps all of them as
// round 1; the writer then continues with round 2 at page 0.
func NewRegion(pages int) *Region {
	if pages < 1 {
		pages = 1
	}
	r := &Region{buf: regionMemory(pages * PageSize), pages: pages}
	for i := 0; i < pages; i++ {
		stampPage(r.page(i), 1, uint64(i))
	}
	r.round, r.next, r.written = 2, 0, uint64(pages)
	return r
}

// regionMemory is anonymous memory outside the Go heap: a region in the
// heap would let the garbage collector grow the heap to twice its size,
// and the campaign's 128 MiB guest ran out of memory (its workload was
// OOM-killed and restarted, which the client saw as lost state).
func regionMemory(n int) []byte {
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		return make([]byte, n)
	}
	return b
}

func (r *Region) page(i int) []byte { return r.buf[i*PageSize : (i+1)*PageSize] }

// Pages returns the number of pages in the region.
func (r *Region) Pages() int { return r.pages }

// WriteNext writes the next page of the current round and advances.
func (r *Region) WriteNext() {
	r.mu.Lock()
	stampPage(r.page(r.next), r.round, uint64(r.next))
	r.written++
	r.next++
	if r.next == r.pages {
		r.next = 0
		r.round++
	}
	r.mu.Unlock()
}

// State returns the writer position and the number of pages written.
func (r *Region) State() (round uint64, boundary int, written uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.round, r.next, r.written
}

// Check verifies the whole region against the writer's position while
// holding the writer's lock.
func (r *Region) Check() (round uint64, boundary int, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.round, r.next, checkRegion(r.buf, r.round, r.next)
}
