package checkpoint

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Soft-dirty needs CONFIG_MEM_SOFT_DIRTY (Debian's kernel has it; test/kernelvm
// boots that kernel under QEMU and runs these tests with
// REMORA_REQUIRE_KERNEL_FEATURES=1, which turns the skips into failures).

func requireSoftDirty(t *testing.T) {
	t.Helper()
	if SoftDirtySupported() {
		return
	}
	if os.Getenv("REMORA_REQUIRE_KERNEL_FEATURES") == "1" {
		t.Fatal("REMORA_REQUIRE_KERNEL_FEATURES=1 and this kernel does not track soft-dirty bits (CONFIG_MEM_SOFT_DIRTY)")
	}
	t.Skip("kernel without CONFIG_MEM_SOFT_DIRTY (test/kernelvm runs this in Debian's kernel)")
}

func TestSoftDirtyRequired(t *testing.T) {
	requireSoftDirty(t)
}

// The kernel interface itself: clear_refs 4 clears bit 55 of every pagemap
// entry, a write sets it again for that page only.
func TestSoftDirtyPagemapBit(t *testing.T) {
	requireSoftDirty(t)
	const pages = 8
	_, mem := shmMapping(t, pages)
	for p := 0; p < pages; p++ {
		mem[p*PageSize] = 1
	}
	bits := func() []bool {
		f, err := os.Open("/proc/self/pagemap")
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, pages*8)
		if _, err := f.ReadAt(b, int64(uintptrOf(mem)/PageSize*8)); err != nil {
			t.Fatal(err)
		}
		out := make([]bool, pages)
		for i := range out {
			e := binary.LittleEndian.Uint64(b[i*8:])
			if e&(1<<63) == 0 {
				t.Fatalf("page %d not present", i)
			}
			out[i] = e&softDirtyBit != 0
		}
		return out
	}
	if err := clearSoftDirty(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if b := bits(); slices.Contains(b, true) {
		t.Fatalf("soft-dirty bits after clear_refs: %v", b)
	}
	mem[2*PageSize+7] = 9
	mem[5*PageSize] = 9
	want := []bool{false, false, true, false, false, true, false, false}
	if b := bits(); !slices.Equal(b, want) {
		t.Fatalf("after writing pages 2 and 5: %v", b)
	}
}

// As in production: the tracker reads another process's mapping of a
// shared RAM file (QEMU's), which writes to it.
func TestSoftDirtyTrackerOtherProcess(t *testing.T) {
	requireSoftDirty(t)
	const pages = 512
	path, _ := shmMapping(t, pages)
	cmd := exec.Command(os.Args[0], "-test.run=^TestSoftDirtyChildHelper$")
	cmd.Env = append(os.Environ(), "REMORA_SOFTDIRTY_CHILD="+path, fmt.Sprintf("REMORA_SOFTDIRTY_PAGES=%d", pages))
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { in.Close(); cmd.Wait() }()
	out := bufio.NewScanner(outPipe)
	wait := func(what string) {
		t.Helper()
		for out.Scan() {
			if out.Text() == "ok" {
				return
			}
		}
		t.Fatalf("child: no answer to %s", what)
	}
	wait("start")
	tr, err := NewSoftDirtyTracker(cmd.Process.Pid, path, pages*PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	dirty := func() []uint64 {
		into := NewBitmap(pages)
		if err := tr.Dirty(nil, into); err != nil {
			t.Fatal(err)
		}
		return bitmapIndices(into)
	}
	if got := dirty(); len(got) != pages {
		t.Fatalf("first call: %d pages, want all %d", len(got), pages)
	}
	for round, written := range [][]uint64{{0, 1, 77, 300, pages - 1}, {}, {64, 65, 66, 128}, {5}} {
		for _, p := range written {
			fmt.Fprintf(in, "w %d\n", p)
			wait("write")
		}
		got := dirty()
		if !slices.Equal(got, written) && !(len(got) == 0 && len(written) == 0) {
			t.Fatalf("round %d: wrote pages %v, tracker reported %v", round, written, got)
		}
	}
}

// TestSoftDirtyChildHelper is the other process of
// TestSoftDirtyTrackerOtherProcess; it does nothing in a normal run.
func TestSoftDirtyChildHelper(t *testing.T) {
	path := os.Getenv("REMORA_SOFTDIRTY_CHILD")
	if path == "" {
		t.Skip("helper process only")
	}
	pages, _ := strconv.Atoi(os.Getenv("REMORA_SOFTDIRTY_PAGES"))
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, pages*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	for p := 0; p < pages; p++ {
		mem[p*PageSize]++
	}
	fmt.Println("ok")
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if n, ok := strings.CutPrefix(sc.Text(), "w "); ok {
			p, _ := strconv.Atoi(n)
			mem[p*PageSize+p%PageSize]++
			fmt.Println("ok")
		}
	}
	os.Exit(0) // no test output on stdout after the protocol
}
