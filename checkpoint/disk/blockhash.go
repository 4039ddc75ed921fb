package disk

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/zeebo/xxh3"
)

// Incremental resync: a new mirror copies only the blocks whose content
// differs between the primary's image and the standby's replica image
// (a replica that survived its agent's restart, or the old primary's own
// image after a switchover or failover), compared by a hash per block.

// HashBlock is the block size of the comparison: the mirror's default
// granularity.
const HashBlock = 64 << 10

// MaxHashedSize bounds the image a standby hashes for one request.
const MaxHashedSize = 64 << 40

// BlockHashes hashes r (size bytes) per block of block bytes, in
// parallel; the last block is hashed over what is left of the image.
func BlockHashes(r io.ReaderAt, size, block int64) ([]uint64, error) {
	if block < 4096 || block > 64<<20 || size < 0 || size > MaxHashedSize {
		return nil, fmt.Errorf("block hashes of %d bytes in blocks of %d: out of range", size, block)
	}
	n := (size + block - 1) / block
	out := make([]uint64, n)
	workers := int64(runtime.GOMAXPROCS(0))
	per := (n + workers - 1) / max(workers, 1)
	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := int64(0); w < workers; w++ {
		lo, hi := w*per, min((w+1)*per, n)
		if lo >= hi {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, block)
			for i := lo; i < hi; i++ {
				off := i * block
				b := buf[:min(block, size-off)]
				if _, err := r.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
					errs[w] = fmt.Errorf("read block at %d: %w", off, err)
					return
				}
				out[i] = xxh3.Hash(b)
			}
		}()
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

// BlockHashes hashes the replica image (see BlockHashes): for a primary
// about to mirror afresh, so that it sends only the blocks that differ.
func (t *Target) BlockHashes(block int64) ([]uint64, error) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return BlockHashes(t.img, t.size, block)
}

// Range is a byte range of a disk.
type Range struct{ Off, Len int64 }

// DifferingBlocks lists, as merged ranges, the blocks whose hashes
// differ (or that one side lacks), clipped to size.
func DifferingBlocks(local, remote []uint64, size, block int64) []Range {
	var out []Range
	for i := range local {
		if i < len(remote) && local[i] == remote[i] {
			continue
		}
		off := int64(i) * block
		n := min(block, size-off)
		if k := len(out) - 1; k >= 0 && out[k].Off+out[k].Len == off {
			out[k].Len += n
			continue
		}
		out = append(out, Range{off, n})
	}
	return out
}
