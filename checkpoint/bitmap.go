package checkpoint

import "math/bits"

// Bitmap is a set of page indices.
type Bitmap struct {
	words []uint64
	n     uint64
}

// NewBitmap returns an empty set over n pages.
func NewBitmap(n uint64) *Bitmap {
	return &Bitmap{words: make([]uint64, (n+63)/64), n: n}
}

func (b *Bitmap) Len() uint64       { return b.n }
func (b *Bitmap) Set(i uint64)      { b.words[i/64] |= 1 << (i % 64) }
func (b *Bitmap) Has(i uint64) bool { return b.words[i/64]&(1<<(i%64)) != 0 }
func (b *Bitmap) Clear()            { clear(b.words) }
func (b *Bitmap) Or(o *Bitmap)      { orWords(b.words, o.words) }
func (b *Bitmap) Clone() *Bitmap    { return &Bitmap{words: append([]uint64(nil), b.words...), n: b.n} }
func orWords(dst, src []uint64) {
	for i := range dst {
		dst[i] |= src[i]
	}
}

// SetAll marks every page.
func (b *Bitmap) SetAll() {
	for i := range b.words {
		b.words[i] = ^uint64(0)
	}
	if r := b.n % 64; r != 0 {
		b.words[len(b.words)-1] = 1<<r - 1
	}
}

// Count returns the number of pages in the set.
func (b *Bitmap) Count() uint64 {
	var c int
	for _, w := range b.words {
		c += bits.OnesCount64(w)
	}
	return uint64(c)
}

// Each calls fn for every page in increasing order.
func (b *Bitmap) Each(fn func(i uint64)) {
	for wi, w := range b.words {
		for w != 0 {
			t := bits.TrailingZeros64(w)
			fn(uint64(wi*64 + t))
			w &= w - 1
		}
	}
}
