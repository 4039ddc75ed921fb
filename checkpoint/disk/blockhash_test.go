package disk

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"testing"
)

func randomImage(t *testing.T, size int64, seed uint64) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return f
}

// The primary's image and the standby's differ in a few blocks: the
// hashes find exactly those, the Writer copies them through the standby's
// NBD server, and the images are then equal.
func TestIncrementalCopyThroughNBD(t *testing.T) {
	const size = 40*HashBlock + 1000 // a partial last block
	src := randomImage(t, size, 1)
	dst := randomImage(t, size, 1)
	changed := []int64{0, 7, 8, 39, 40} // 7 and 8 merge, and 39 and the partial 40
	for _, b := range changed {
		if _, err := dst.WriteAt([]byte("stale"), b*HashBlock+3); err != nil {
			t.Fatal(err)
		}
	}
	target, err := NewFileTarget(dst, Options{})
	if err != nil {
		t.Fatal(err)
	}
	// The hashes come over the control path, as the agent asks for them.
	ctlA, ctlB := net.Pipe()
	go ServeControl(ctlB, target)
	remote, err := NewCutClient(ctlA).BlockHashes(context.Background(), HashBlock)
	if err != nil {
		t.Fatal(err)
	}
	local, err := BlockHashes(src, size, HashBlock)
	if err != nil {
		t.Fatal(err)
	}
	ranges := DifferingBlocks(local, remote, size, HashBlock)
	want := []Range{{0, HashBlock}, {7 * HashBlock, 2 * HashBlock}, {39 * HashBlock, HashBlock + 1000}}
	if len(ranges) != len(want) {
		t.Fatalf("ranges %v, want %v", ranges, want)
	}
	for i := range want {
		if ranges[i] != want[i] {
			t.Fatalf("ranges %v, want %v", ranges, want)
		}
	}
	srv := NewServer(target, "vda")
	c1, c2 := net.Pipe()
	go srv.ServeConn(c2)
	w, err := NewWriter(c1, "vda")
	if err != nil {
		t.Fatal(err)
	}
	if w.Size() != size {
		t.Fatalf("export size %d", w.Size())
	}
	n, err := CopyRanges(w, src, ranges)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if n != 4*HashBlock+1000 {
		t.Fatalf("copied %d bytes", n)
	}
	a, _ := os.ReadFile(src.Name())
	b, _ := os.ReadFile(dst.Name())
	if !bytes.Equal(a, b) {
		t.Fatal("images differ after the incremental copy")
	}
	// Control: without the copy the images would differ.
	if again, _ := BlockHashes(dst, size, HashBlock); len(DifferingBlocks(local, again, size, HashBlock)) != 0 {
		t.Fatal("hashes still differ")
	}
	if _, err := BlockHashes(src, size, 512); err == nil {
		t.Fatal("a 512-byte block size accepted (a hostile primary could ask for huge replies)")
	}
}
