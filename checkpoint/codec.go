package checkpoint

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/pierrec/lz4/v4"
)

// PageSize is the granularity of dirty tracking and of the wire format.
const PageSize = 4096

// MaxBatchPages bounds one page batch so its frame stays under
// MaxFramePayload even when nothing compresses.
const MaxBatchPages = 1024

const (
	batchRaw = 0 // page data stored as is (it did not compress)
	batchLZ4 = 1 // page data is one lz4 block

	pageData = 0
	pageZero = 1
)

// Page is one guest page in a batch. Data is nil for a zero page.
type Page struct {
	Index uint64
	Data  []byte
}

// BatchEncoder turns runs of pages into compact batches: zero pages cost a
// few bytes and the rest is compressed as one lz4 block.
type BatchEncoder struct {
	comp lz4.Compressor
	raw  []byte
	zbuf []byte
}

// EncodeBatch appends the encoding of pages (strictly increasing indices,
// at most MaxBatchPages) to dst. It reports how many bytes of page data it
// covered (zero pages count as PageSize) so callers can compute ratios.
func (e *BatchEncoder) EncodeBatch(dst []byte, pages []Page) ([]byte, error) {
	if len(pages) > MaxBatchPages {
		return nil, fmt.Errorf("batch of %d pages exceeds %d", len(pages), MaxBatchPages)
	}
	e.raw = e.raw[:0]
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(pages)))
	var prev uint64
	for i, p := range pages {
		if i > 0 && p.Index <= prev {
			return nil, fmt.Errorf("page indices must increase: %d after %d", p.Index, prev)
		}
		delta := p.Index - prev
		if i == 0 {
			delta = p.Index
		}
		prev = p.Index
		dst = binary.AppendUvarint(dst, delta)
		if p.Data == nil || isZero(p.Data) {
			dst = append(dst, pageZero)
			continue
		}
		if len(p.Data) != PageSize {
			return nil, fmt.Errorf("page %d has %d bytes, want %d", p.Index, len(p.Data), PageSize)
		}
		dst = append(dst, pageData)
		e.raw = append(e.raw, p.Data...)
	}
	if len(e.raw) == 0 {
		return append(dst, batchRaw), nil
	}
	if cap(e.zbuf) < lz4.CompressBlockBound(len(e.raw)) {
		e.zbuf = make([]byte, lz4.CompressBlockBound(len(e.raw)))
	}
	n, err := e.comp.CompressBlock(e.raw, e.zbuf[:cap(e.zbuf)])
	if err != nil {
		return nil, fmt.Errorf("lz4: %w", err)
	}
	if n == 0 || n >= len(e.raw) {
		dst = append(dst, batchRaw)
		return append(dst, e.raw...), nil
	}
	dst = append(dst, batchLZ4)
	return append(dst, e.zbuf[:n]...), nil
}

// ErrBadBatch marks a page batch that does not decode: the epoch carrying
// it must be discarded.
var ErrBadBatch = errors.New("corrupt page batch")

// DecodeBatch checks and decodes a batch. Every index must be below
// totalPages. fn is called for each page in order; Data is nil for a zero
// page and is only valid during the call.
func DecodeBatch(b []byte, totalPages uint64, scratch []byte, fn func(index uint64, data []byte) error) ([]byte, int, error) {
	bad := func(format string, a ...any) ([]byte, int, error) {
		return scratch, 0, fmt.Errorf("%w: %s", ErrBadBatch, fmt.Sprintf(format, a...))
	}
	if len(b) < 4 {
		return bad("short header")
	}
	count := int(binary.BigEndian.Uint32(b))
	if count > MaxBatchPages {
		return bad("%d pages exceeds %d", count, MaxBatchPages)
	}
	b = b[4:]
	type entry struct {
		index uint64
		zero  bool
	}
	entries := make([]entry, count)
	var prev uint64
	dataPages := 0
	for i := 0; i < count; i++ {
		delta, n := binary.Uvarint(b)
		if n <= 0 || len(b) < n+1 {
			return bad("truncated page table at entry %d", i)
		}
		idx := prev + delta
		if i > 0 && (delta == 0 || idx < prev) {
			return bad("page index not increasing at entry %d", i)
		}
		if idx >= totalPages {
			return bad("page index %d beyond guest RAM (%d pages)", idx, totalPages)
		}
		prev = idx
		kind := b[n]
		b = b[n+1:]
		switch kind {
		case pageZero:
			entries[i] = entry{idx, true}
		case pageData:
			entries[i] = entry{idx, false}
			dataPages++
		default:
			return bad("unknown page kind %d", kind)
		}
	}
	if len(b) < 1 {
		return bad("missing codec byte")
	}
	codec, body := b[0], b[1:]
	want := dataPages * PageSize
	var data []byte
	switch codec {
	case batchRaw:
		if len(body) != want {
			return bad("raw data is %d bytes, want %d", len(body), want)
		}
		data = body
	case batchLZ4:
		if dataPages == 0 {
			return bad("lz4 block without data pages")
		}
		if cap(scratch) < want {
			scratch = make([]byte, want)
		}
		n, err := lz4.UncompressBlock(body, scratch[:want])
		if err != nil || n != want {
			return bad("lz4 block decodes to %d bytes (%v), want %d", n, err, want)
		}
		data = scratch[:want]
	default:
		return bad("unknown codec %d", codec)
	}
	off := 0
	for _, e := range entries {
		var page []byte
		if !e.zero {
			page = data[off : off+PageSize]
			off += PageSize
		}
		if err := fn(e.index, page); err != nil {
			return scratch, 0, err
		}
	}
	return scratch, count, nil
}

func isZero(b []byte) bool {
	// Compare 8 bytes at a time: this runs over every dirty page.
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// MaxDevStateChunk bounds the device state one frame carries (before
// compression).
const MaxDevStateChunk = 1 << 20

// EncodeDevState appends the payload for one chunk of device state (at most
// MaxDevStateChunk bytes) to dst and says which frame carries it:
// FrameDevStateLZ4 (uncompressed length, then one lz4 block) when lz4
// shrinks it, else FrameDevState with the chunk as is.
func (e *BatchEncoder) EncodeDevState(dst, chunk []byte) ([]byte, FrameType, error) {
	if len(chunk) > MaxDevStateChunk {
		return nil, 0, fmt.Errorf("device state chunk of %d bytes exceeds %d", len(chunk), MaxDevStateChunk)
	}
	if cap(e.zbuf) < lz4.CompressBlockBound(len(chunk)) {
		e.zbuf = make([]byte, lz4.CompressBlockBound(len(chunk)))
	}
	n, err := e.comp.CompressBlock(chunk, e.zbuf[:cap(e.zbuf)])
	if err != nil {
		return nil, 0, fmt.Errorf("lz4: %w", err)
	}
	if n == 0 || n+4 >= len(chunk) {
		return append(dst, chunk...), FrameDevState, nil
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(chunk)))
	return append(dst, e.zbuf[:n]...), FrameDevStateLZ4, nil
}

// ErrBadDevState marks a compressed device state frame that does not
// decode: the epoch carrying it must be discarded.
var ErrBadDevState = errors.New("corrupt device state frame")

// DecodeDevStateLZ4 decodes a FrameDevStateLZ4 payload into scratch (grown
// as needed) and returns the device state bytes.
func DecodeDevStateLZ4(payload, scratch []byte) ([]byte, error) {
	if len(payload) < 4 {
		return nil, fmt.Errorf("%w: short header", ErrBadDevState)
	}
	want := int(binary.BigEndian.Uint32(payload))
	if want == 0 || want > MaxDevStateChunk {
		return nil, fmt.Errorf("%w: declares %d bytes (1..%d allowed)", ErrBadDevState, want, MaxDevStateChunk)
	}
	if cap(scratch) < want {
		scratch = make([]byte, want)
	}
	n, err := lz4.UncompressBlock(payload[4:], scratch[:want])
	if err != nil || n != want {
		return nil, fmt.Errorf("%w: lz4 block decodes to %d bytes (%v), want %d", ErrBadDevState, n, err, want)
	}
	return scratch[:n], nil
}
