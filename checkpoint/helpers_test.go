package checkpoint

import (
	"encoding/binary"
	"hash/crc32"
	"math/rand/v2"
)

var testCastagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc32c(b []byte) uint32 { return crc32.Checksum(b, testCastagnoli) }

// newRand returns a deterministic generator for test data.
func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)) }

// fillRandom fills b with incompressible bytes.
func fillRandom(r *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	for i := len(b) &^ 7; i < len(b); i++ {
		b[i] = byte(r.Uint32())
	}
}

var words = []string{"remora ", "replica ", "epoch ", "checkpoint ", "guest ", "page ", "the ", "of ", "standby ", "primary ", "\n", "0x7f3a ", "kernel: ", "[ok] "}

// fillText fills b with text-like, compressible bytes.
func fillText(r *rand.Rand, b []byte) {
	i := 0
	for i < len(b) {
		i += copy(b[i:], words[r.IntN(len(words))])
	}
}
