package checkpoint

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

const softDirtyBit = 1 << 55

// SoftDirtyTracker reads the kernel's soft-dirty bits for the guest RAM
// mapping inside the QEMU process: exact and cheap, but it needs a kernel
// with CONFIG_MEM_SOFT_DIRTY.
type SoftDirtyTracker struct {
	pid     int
	start   uint64 // address of the RAM mapping in the QEMU process
	pages   int
	pagemap *os.File
	primed  bool
	buf     []byte
}

// NewSoftDirtyTracker tracks the mapping of ramPath inside process pid.
func NewSoftDirtyTracker(pid int, ramPath string, ramBytes int) (*SoftDirtyTracker, error) {
	start, size, err := findMapping(pid, ramPath)
	if err != nil {
		return nil, err
	}
	if size < uint64(ramBytes) {
		return nil, fmt.Errorf("softdirty: mapping of %s in pid %d is %d bytes, RAM is %d", ramPath, pid, size, ramBytes)
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", pid))
	if err != nil {
		return nil, fmt.Errorf("softdirty: %w (the agent must run as root)", err)
	}
	return &SoftDirtyTracker{pid: pid, start: start, pages: ramBytes / PageSize, pagemap: f}, nil
}

func (t *SoftDirtyTracker) Name() string { return TrackerSoftDirty }
func (t *SoftDirtyTracker) Close() error { return t.pagemap.Close() }

func (t *SoftDirtyTracker) Dirty(mem []byte, into *Bitmap) error {
	if !t.primed {
		into.SetAll()
	} else {
		const chunk = 4096 // pagemap entries per read
		if cap(t.buf) < chunk*8 {
			t.buf = make([]byte, chunk*8)
		}
		for p := 0; p < t.pages; p += chunk {
			n := min(chunk, t.pages-p)
			b := t.buf[:n*8]
			if _, err := t.pagemap.ReadAt(b, int64((t.start/PageSize+uint64(p))*8)); err != nil {
				return fmt.Errorf("softdirty: read pagemap of pid %d: %w", t.pid, err)
			}
			for i := 0; i < n; i++ {
				if binary.LittleEndian.Uint64(b[i*8:])&softDirtyBit != 0 {
					into.Set(uint64(p + i))
				}
			}
		}
	}
	if err := clearSoftDirty(t.pid); err != nil {
		return err
	}
	t.primed = true
	return nil
}

func clearSoftDirty(pid int) error {
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("4"), 0); err != nil {
		return fmt.Errorf("softdirty: clear_refs of pid %d: %w", pid, err)
	}
	return nil
}

func findMapping(pid int, path string) (start, size uint64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return 0, 0, fmt.Errorf("softdirty: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || fields[5] != path {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		a, err1 := strconv.ParseUint(lo, 16, 64)
		b, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		return a, b - a, nil
	}
	return 0, 0, fmt.Errorf("softdirty: %s is not mapped in pid %d", path, pid)
}

// SoftDirtySupported reports whether this kernel tracks soft-dirty bits,
// by writing a page of our own and looking for the bit.
func SoftDirtySupported() bool {
	mem, err := unix.Mmap(-1, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return false
	}
	defer unix.Munmap(mem)
	mem[0] = 1
	if clearSoftDirty(os.Getpid()) != nil {
		return false
	}
	if bit, err := ownSoftDirty(mem); err != nil || bit {
		return false // the bit survived a clear: not tracked
	}
	mem[0] = 2
	bit, err := ownSoftDirty(mem)
	return err == nil && bit
}

func ownSoftDirty(mem []byte) (bool, error) {
	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return false, err
	}
	defer f.Close()
	var e [8]byte
	addr := uint64(uintptrOf(mem))
	if _, err := f.ReadAt(e[:], int64(addr/PageSize*8)); err != nil {
		return false, err
	}
	v := binary.LittleEndian.Uint64(e[:])
	if v&(1<<63) == 0 {
		return false, errors.New("page not present")
	}
	return v&softDirtyBit != 0, nil
}
