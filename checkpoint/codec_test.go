package checkpoint

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"
)

type decodedPage struct {
	index uint64
	data  []byte // nil for a zero page
}

// decodeAll decodes a batch and copies out every page.
func decodeAll(b []byte, totalPages uint64) ([]decodedPage, error) {
	var out []decodedPage
	_, n, err := DecodeBatch(b, totalPages, nil, func(i uint64, d []byte) error {
		if d != nil {
			d = append([]byte(nil), d...)
		}
		out = append(out, decodedPage{i, d})
		return nil
	})
	if err == nil && n != len(out) {
		return nil, fmt.Errorf("DecodeBatch reports %d pages, called back %d times", n, len(out))
	}
	return out, err
}

func checkSamePages(t *testing.T, in []Page, out []decodedPage) {
	t.Helper()
	if len(in) != len(out) {
		t.Fatalf("decoded %d pages, encoded %d", len(out), len(in))
	}
	for i := range in {
		if in[i].Index != out[i].index {
			t.Fatalf("page %d: index %d, want %d", i, out[i].index, in[i].Index)
		}
		if in[i].Data == nil || isZero(in[i].Data) {
			if out[i].data != nil {
				t.Fatalf("page %d (index %d) is zero but decoded with data", i, in[i].Index)
			}
			continue
		}
		if !bytes.Equal(in[i].Data, out[i].data) {
			t.Fatalf("page %d (index %d): data differs", i, in[i].Index)
		}
	}
}

type pageKind int

const (
	kindZero pageKind = iota
	kindZeroNil
	kindRandom
	kindText
	kindSparse // mostly zero with a few bytes set
)

func makePage(r *rand.Rand, k pageKind) []byte {
	switch k {
	case kindZeroNil:
		return nil
	case kindZero:
		return make([]byte, PageSize)
	case kindRandom:
		b := make([]byte, PageSize)
		fillRandom(r, b)
		return b
	case kindText:
		b := make([]byte, PageSize)
		fillText(r, b)
		return b
	default:
		b := make([]byte, PageSize)
		for range 5 {
			b[r.IntN(PageSize)] = byte(r.IntN(255) + 1)
		}
		return b
	}
}

func makeBatch(r *rand.Rand, n int, kinds []pageKind, sparseIdx bool) []Page {
	pages := make([]Page, n)
	idx := uint64(r.IntN(3))
	for i := range pages {
		pages[i] = Page{Index: idx, Data: makePage(r, kinds[r.IntN(len(kinds))])}
		if sparseIdx {
			idx += 1 + uint64(r.IntN(100000))
		} else {
			idx++
		}
	}
	return pages
}

func TestBatchRoundTrip(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	r := newRand(1)
	cases := []struct {
		name   string
		n      int
		kinds  []pageKind
		sparse bool
		// limit on the encoding size as a fraction of raw page bytes
		maxRatio float64
	}{
		{"empty", 0, []pageKind{kindZero}, false, 1},
		{"one-zero", 1, []pageKind{kindZero}, false, 1},
		{"one-random", 1, []pageKind{kindRandom}, false, 1.01},
		{"all-zero", MaxBatchPages, []pageKind{kindZero, kindZeroNil}, false, 0.001},
		{"all-random", MaxBatchPages, []pageKind{kindRandom}, false, 1.01},
		{"all-text", MaxBatchPages, []pageKind{kindText}, false, 0.5},
		{"sparse-content", 300, []pageKind{kindSparse}, false, 0.2},
		{"mixed", MaxBatchPages, []pageKind{kindZero, kindZeroNil, kindRandom, kindText, kindSparse}, false, 1},
		{"mixed-sparse-indices", 500, []pageKind{kindZero, kindRandom, kindText}, true, 1},
	}
	var enc BatchEncoder // reused across cases, as the sender does
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pages := makeBatch(r, c.n, c.kinds, c.sparse)
			total := uint64(1)
			if len(pages) > 0 {
				total = pages[len(pages)-1].Index + 1
			}
			prefix := []byte("xyz")
			b, err := enc.EncodeBatch(append([]byte(nil), prefix...), pages)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b[:3], prefix) {
				t.Fatal("EncodeBatch clobbered dst")
			}
			b = b[3:]
			if lim := float64(c.n*PageSize)*c.maxRatio + float64(16+11*c.n); float64(len(b)) > lim {
				t.Errorf("%d pages encoded to %d bytes, want at most %.0f", c.n, len(b), lim)
			}
			out, err := decodeAll(b, total)
			if err != nil {
				t.Fatal(err)
			}
			checkSamePages(t, pages, out)
			// Every index must stay below totalPages: one page less is refused.
			if len(pages) > 0 {
				if _, err := decodeAll(b, total-1); !errors.Is(err, ErrBadBatch) {
					t.Fatalf("last index %d with totalPages %d: %v, want ErrBadBatch", total-1, total-1, err)
				}
			}
		})
	}
}

func TestBatchScratchReuse(t *testing.T) {
	t.Parallel() // mostly waits (or CPU-bound): overlaps with the others
	r := newRand(2)
	var enc BatchEncoder
	var scratch []byte
	for round := range 20 {
		pages := makeBatch(r, 1+r.IntN(200), []pageKind{kindText, kindZero, kindSparse, kindRandom}, round%2 == 0)
		b, err := enc.EncodeBatch(nil, pages)
		if err != nil {
			t.Fatal(err)
		}
		var out []decodedPage
		var n int
		scratch, n, err = DecodeBatch(b, ^uint64(0), scratch, func(i uint64, d []byte) error {
			if d != nil {
				d = append([]byte(nil), d...)
			}
			out = append(out, decodedPage{i, d})
			return nil
		})
		if err != nil || n != len(pages) {
			t.Fatalf("round %d: n=%d err=%v", round, n, err)
		}
		checkSamePages(t, pages, out)
	}
}

func TestBatchHugeIndices(t *testing.T) {
	max := ^uint64(0)
	pages := []Page{{Index: max - 2}, {Index: max - 1, Data: bytes.Repeat([]byte{7}, PageSize)}}
	var enc BatchEncoder
	b, err := enc.EncodeBatch(nil, pages)
	if err != nil {
		t.Fatal(err)
	}
	out, err := decodeAll(b, max)
	if err != nil {
		t.Fatal(err)
	}
	checkSamePages(t, pages, out)
}

func TestEncodeBatchRefuses(t *testing.T) {
	var enc BatchEncoder
	page := bytes.Repeat([]byte{1}, PageSize)
	for name, pages := range map[string][]Page{
		"too many":        make([]Page, MaxBatchPages+1),
		"equal indices":   {{Index: 4, Data: page}, {Index: 4, Data: page}},
		"decreasing":      {{Index: 5}, {Index: 4}},
		"short page":      {{Index: 0, Data: []byte{1, 2, 3}}},
		"long page":       {{Index: 0, Data: append(page, 1)}},
		"decreasing at 0": {{Index: 1}, {Index: 0}},
	} {
		if name == "too many" {
			for i := range pages {
				pages[i].Index = uint64(i)
			}
		}
		if _, err := enc.EncodeBatch(nil, pages); err == nil {
			t.Errorf("%s: EncodeBatch accepted it", name)
		}
	}
	// The encoder still works after refusing.
	b, err := enc.EncodeBatch(nil, []Page{{Index: 0, Data: page}})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := decodeAll(b, 1); err != nil || !bytes.Equal(out[0].data, page) {
		t.Fatalf("encoder broken after an error: %v", err)
	}
}

// batchBytes hand-assembles a batch.
type tableEntry struct {
	delta uint64
	kind  byte
}

func batchBytes(count uint32, table []tableEntry, codec byte, body []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, count)
	for _, e := range table {
		b = binary.AppendUvarint(b, e.delta)
		b = append(b, e.kind)
	}
	b = append(b, codec)
	return append(b, body...)
}

func TestDecodeBatchRefuses(t *testing.T) {
	page := bytes.Repeat([]byte{9}, PageSize)
	overlongVarint := append(bytes.Repeat([]byte{0xff}, 10), 0x01) // 11 bytes: overflows 64 bits
	cases := map[string][]byte{
		"empty":                  {},
		"short header":           {0, 0, 1},
		"count too large":        batchBytes(MaxBatchPages+1, nil, batchRaw, nil),
		"count huge":             batchBytes(^uint32(0), nil, batchRaw, nil),
		"count beyond table":     batchBytes(3, []tableEntry{{0, pageZero}, {1, pageZero}}, batchRaw, nil),
		"repeated index":         batchBytes(2, []tableEntry{{5, pageZero}, {0, pageZero}}, batchRaw, nil),
		"index wraps around":     batchBytes(2, []tableEntry{{5, pageZero}, {^uint64(0) - 2, pageZero}}, batchRaw, nil),
		"index beyond RAM":       batchBytes(1, []tableEntry{{100, pageZero}}, batchRaw, nil),
		"later index beyond":     batchBytes(2, []tableEntry{{10, pageZero}, {90, pageZero}}, batchRaw, nil),
		"bad page kind":          batchBytes(1, []tableEntry{{0, 2}}, batchRaw, nil),
		"bad page kind 255":      batchBytes(1, []tableEntry{{0, 255}}, batchRaw, nil),
		"missing codec byte":     batchBytes(1, []tableEntry{{0, pageZero}}, batchRaw, nil)[:6],
		"bad codec 2":            batchBytes(1, []tableEntry{{0, pageZero}}, 2, nil),
		"bad codec 255":          batchBytes(1, []tableEntry{{0, pageData}}, 255, page),
		"raw data short":         batchBytes(1, []tableEntry{{0, pageData}}, batchRaw, page[:PageSize-1]),
		"raw data long":          batchBytes(1, []tableEntry{{0, pageData}}, batchRaw, append(page, 0)),
		"raw data for zero":      batchBytes(1, []tableEntry{{0, pageZero}}, batchRaw, page),
		"lz4 garbage":            batchBytes(1, []tableEntry{{0, pageData}}, batchLZ4, []byte{0xff, 0xff, 0xff}),
		"lz4 empty":              batchBytes(1, []tableEntry{{0, pageData}}, batchLZ4, nil),
		"overlong varint":        append(binary.BigEndian.AppendUint32(nil, 1), overlongVarint...),
		"table cut after varint": append(binary.BigEndian.AppendUint32(nil, 1), 5),
	}
	for name, b := range cases {
		_, n, err := DecodeBatch(b, 64, nil, func(uint64, []byte) error {
			t.Errorf("%s: callback called for a corrupt batch", name)
			return nil
		})
		if !errors.Is(err, ErrBadBatch) {
			t.Errorf("%s: DecodeBatch = %v, want ErrBadBatch", name, err)
		}
		if n != 0 {
			t.Errorf("%s: DecodeBatch reports %d pages with an error", name, n)
		}
	}
}

func TestDecodeBatchTruncatedAnywhere(t *testing.T) {
	r := newRand(3)
	var enc BatchEncoder
	for _, kinds := range [][]pageKind{{kindZero}, {kindRandom}, {kindText}, {kindZero, kindText, kindRandom}} {
		pages := makeBatch(r, 12, kinds, true)
		b, err := enc.EncodeBatch(nil, pages)
		if err != nil {
			t.Fatal(err)
		}
		total := pages[len(pages)-1].Index + 1
		// Every cut in the header, the page table and the first and last
		// 256 bytes of data; a sample of cuts in between.
		for n := 0; n < len(b); n++ {
			if n > 4+12*4+256 && n < len(b)-256 && n%61 != 0 {
				continue
			}
			_, _, err := DecodeBatch(b[:n], total, nil, func(uint64, []byte) error { return nil })
			if !errors.Is(err, ErrBadBatch) {
				t.Fatalf("kinds %v: batch cut to %d/%d bytes: %v, want ErrBadBatch", kinds, n, len(b), err)
			}
		}
	}
}

// lz4PanicBodies are lz4 blocks that make lz4.UncompressBlock fault when
// its destination is a nil slice.
var lz4PanicBodies = [][]byte{
	{0x7b, 0x30, 0x84, 0x2c, 0x87, 0x0c, 0xc6, 0x0e, 0x19, 0x2b, 0x6f, 0xb1, 0x48, 0x07, 0x8c, 0x91, 0xa3, 0x4d},
	{0x04, 0x93, 0x02, 0x5a, 0x4c, 0x89, 0x20, 0xd2, 0x3c, 0xc0, 0xea, 0xe8, 0xf4, 0x58, 0xef, 0x9c, 0x82, 0x0f, 0x3a, 0x3d},
	{0x06, 0x95, 0x8c, 0x6e, 0x12, 0x3f, 0x58, 0x72, 0xb6, 0xac, 0x56, 0x6a, 0x9b, 0xee, 0x62, 0x45, 0x7c, 0xeb, 0x5b},
}

// A batch that says "lz4" but has no data pages is corrupt; decoding it must
// not reach lz4 with an empty (nil) destination, which faults.
func TestDecodeBatchLZ4WithoutDataPages(t *testing.T) {
	for _, body := range lz4PanicBodies {
		for _, table := range [][]tableEntry{nil, {{0, pageZero}}, {{0, pageZero}, {3, pageZero}}} {
			b := batchBytes(uint32(len(table)), table, batchLZ4, body)
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Fatalf("DecodeBatch panicked on an lz4 batch without data pages: %v", r)
					}
				}()
				_, _, err := DecodeBatch(b, 10, nil, func(uint64, []byte) error { return nil })
				if !errors.Is(err, ErrBadBatch) {
					t.Fatalf("lz4 batch without data pages: %v, want ErrBadBatch", err)
				}
			}()
		}
	}
}

func TestDecodeBatchCallbackError(t *testing.T) {
	var enc BatchEncoder
	pages := []Page{{Index: 1}, {Index: 2}, {Index: 3}}
	b, _ := enc.EncodeBatch(nil, pages)
	stop := errors.New("stop")
	calls := 0
	_, _, err := DecodeBatch(b, 10, nil, func(i uint64, _ []byte) error {
		calls++
		if i == 2 {
			return stop
		}
		return nil
	})
	if err != stop || calls != 2 {
		t.Fatalf("callback error: err=%v calls=%d, want the callback's own error after 2 calls", err, calls)
	}
	if errors.Is(err, ErrBadBatch) {
		t.Fatal("a callback error must not be reported as a corrupt batch")
	}
}

// FuzzDecodeBatch: arbitrary bytes never panic; accepted batches have
// increasing indices below totalPages and whole pages; and what is accepted
// re-encodes to a batch that decodes to the same pages.
func FuzzDecodeBatch(f *testing.F) {
	r := newRand(4)
	var enc BatchEncoder
	for _, kinds := range [][]pageKind{{kindZero}, {kindRandom}, {kindText}, {kindSparse, kindZero}} {
		for _, n := range []int{0, 1, 3, 17, 200} {
			pages := makeBatch(r, n, kinds, n == 3)
			b, _ := enc.EncodeBatch(nil, pages)
			if len(b) > 2048 {
				continue // big seeds make the minimizer crawl
			}
			total := uint64(1)
			if n > 0 {
				total = pages[n-1].Index + 1
			}
			f.Add(b, total)
		}
	}
	f.Add([]byte{0, 0, 0, 1, 0, 1, 0}, uint64(1))
	f.Add(batchBytes(2, []tableEntry{{5, pageZero}, {0, pageZero}}, batchRaw, nil), uint64(64))
	f.Fuzz(func(t *testing.T, b []byte, totalPages uint64) {
		var got []decodedPage
		var prev uint64
		_, n, err := DecodeBatch(b, totalPages, nil, func(i uint64, d []byte) error {
			if i >= totalPages {
				t.Fatalf("index %d not below totalPages %d", i, totalPages)
			}
			if len(got) > 0 && i <= prev {
				t.Fatalf("index %d after %d", i, prev)
			}
			if d != nil && len(d) != PageSize {
				t.Fatalf("page %d has %d bytes", i, len(d))
			}
			prev = i
			got = append(got, decodedPage{i, bytes.Clone(d)})
			return nil
		})
		if err != nil {
			if !errors.Is(err, ErrBadBatch) {
				t.Fatalf("error not marked ErrBadBatch: %v", err)
			}
			return
		}
		if n != len(got) || n > MaxBatchPages {
			t.Fatalf("DecodeBatch reports %d pages, called back %d times", n, len(got))
		}
		pages := make([]Page, len(got))
		for i, p := range got {
			pages[i] = Page{Index: p.index, Data: p.data}
		}
		var e BatchEncoder
		re, err := e.EncodeBatch(nil, pages)
		if err != nil {
			t.Fatalf("re-encoding accepted pages: %v", err)
		}
		again, err := decodeAll(re, totalPages)
		if err != nil {
			t.Fatalf("re-encoded batch does not decode: %v", err)
		}
		checkSamePages(t, pages, again)
	})
}

func benchPages(kind string, n int) []Page {
	r := newRand(5)
	pages := make([]Page, n)
	for i := range pages {
		var k pageKind
		switch kind {
		case "mostly-zero": // 90% zero pages, the rest sparse data
			k = kindZero
			if r.IntN(10) == 0 {
				k = kindSparse
			}
		case "text":
			k = kindText
		case "random":
			k = kindRandom
		case "mixed": // a plausible guest: zero, text, binary
			k = []pageKind{kindZero, kindZero, kindText, kindText, kindSparse, kindRandom}[r.IntN(6)]
		}
		pages[i] = Page{Index: uint64(i * 2), Data: makePage(r, k)}
		if pages[i].Data == nil {
			pages[i].Data = make([]byte, PageSize)
		}
	}
	return pages
}

func BenchmarkEncodeBatch(b *testing.B) {
	for _, kind := range []string{"mostly-zero", "text", "random", "mixed"} {
		b.Run(kind, func(b *testing.B) {
			pages := benchPages(kind, MaxBatchPages)
			var enc BatchEncoder
			var buf []byte
			var err error
			raw := float64(len(pages) * PageSize)
			start := time.Now()
			for i := 0; i < b.N; i++ {
				if buf, err = enc.EncodeBatch(buf[:0], pages); err != nil {
					b.Fatal(err)
				}
			}
			el := time.Since(start).Seconds()
			b.ReportMetric(raw*float64(b.N)/el/1e6, "MB/s")
			b.ReportMetric(raw/float64(len(buf)), "ratio")
		})
	}
}

func BenchmarkDecodeBatch(b *testing.B) {
	for _, kind := range []string{"mostly-zero", "text", "random", "mixed"} {
		b.Run(kind, func(b *testing.B) {
			pages := benchPages(kind, MaxBatchPages)
			var enc BatchEncoder
			batch, err := enc.EncodeBatch(nil, pages)
			if err != nil {
				b.Fatal(err)
			}
			mem := make([]byte, 2*MaxBatchPages*PageSize)
			var scratch []byte
			raw := float64(len(pages) * PageSize)
			start := time.Now()
			for i := 0; i < b.N; i++ {
				scratch, _, err = DecodeBatch(batch, 2*MaxBatchPages, scratch, func(idx uint64, d []byte) error {
					dst := mem[idx*PageSize : (idx+1)*PageSize]
					if d == nil {
						clear(dst)
					} else {
						copy(dst, d)
					}
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(raw*float64(b.N)/time.Since(start).Seconds()/1e6, "MB/s")
		})
	}
}

func TestDevStateRoundTrip(t *testing.T) {
	var enc BatchEncoder
	compressible := bytes.Repeat([]byte("virtio-net queue 0 state "), 50000)[:MaxDevStateChunk]
	random := make([]byte, 70000)
	for i := range random {
		random[i] = byte(rand.Uint32())
	}
	for _, tc := range []struct {
		name  string
		chunk []byte
		want  FrameType
	}{
		{"compressible", compressible, FrameDevStateLZ4},
		{"random", random, FrameDevState},
		{"tiny", []byte{1, 2, 3}, FrameDevState},
	} {
		payload, ft, err := enc.EncodeDevState(nil, tc.chunk)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if ft != tc.want {
			t.Fatalf("%s: sent as %v, want %v", tc.name, ft, tc.want)
		}
		got := payload
		if ft == FrameDevStateLZ4 {
			if got, err = DecodeDevStateLZ4(payload, nil); err != nil {
				t.Fatalf("%s: %v", tc.name, err)
			}
			t.Logf("%s: %d bytes -> %d on the wire", tc.name, len(tc.chunk), len(payload))
		}
		if !bytes.Equal(got, tc.chunk) {
			t.Fatalf("%s: round trip differs", tc.name)
		}
	}
	if _, _, err := enc.EncodeDevState(nil, make([]byte, MaxDevStateChunk+1)); err == nil {
		t.Fatal("oversized chunk accepted")
	}
}

func TestDecodeDevStateLZ4Refuses(t *testing.T) {
	var enc BatchEncoder
	good, _, err := enc.EncodeDevState(nil, bytes.Repeat([]byte{7, 0, 0, 0}, 4096))
	if err != nil {
		t.Fatal(err)
	}
	withLen := func(n uint32) []byte {
		b := bytes.Clone(good)
		binary.BigEndian.PutUint32(b, n)
		return b
	}
	for name, payload := range map[string][]byte{
		"empty":            nil,
		"short header":     {0, 0, 1},
		"zero length":      withLen(0),
		"beyond the limit": withLen(MaxDevStateChunk + 1),
		"longer than data": withLen(16385),
		"shorter block":    good[:len(good)-2],
		"garbage block":    append(bytes.Clone(good[:4]), 0xff, 0xff, 0xff, 0xff),
	} {
		if _, err := DecodeDevStateLZ4(payload, nil); !errors.Is(err, ErrBadDevState) {
			t.Errorf("%s: %v, want ErrBadDevState", name, err)
		}
	}
}

func FuzzDecodeDevStateLZ4(f *testing.F) {
	var enc BatchEncoder
	good, _, _ := enc.EncodeDevState(nil, bytes.Repeat([]byte("device"), 1000))
	f.Add(good)
	f.Add([]byte{0, 0, 0, 4, 0x40, 1, 2, 3, 4})
	f.Fuzz(func(t *testing.T, payload []byte) {
		out, err := DecodeDevStateLZ4(payload, nil)
		if err != nil {
			if !errors.Is(err, ErrBadDevState) {
				t.Fatalf("error %v is not ErrBadDevState", err)
			}
			return
		}
		if want := binary.BigEndian.Uint32(payload); uint32(len(out)) != want {
			t.Fatalf("decoded %d bytes, header says %d", len(out), want)
		}
	})
}
