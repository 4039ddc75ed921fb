package qemu

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// MapRAM maps a guest's RAM file. The primary maps it read-only; the
// standby maps its shell's RAM writable to apply epochs.
func MapRAM(path string, size int64, writable bool) ([]byte, error) {
	flag, prot := os.O_RDONLY, unix.PROT_READ
	if writable {
		flag, prot = os.O_RDWR, unix.PROT_READ|unix.PROT_WRITE
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open guest RAM: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() < size {
		return nil, fmt.Errorf("guest RAM file %s is %d bytes, want %d", path, fi.Size(), size)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map guest RAM %s: %w", path, err)
	}
	return mem, nil
}

// UnmapRAM releases a mapping from MapRAM.
func UnmapRAM(mem []byte) error {
	if mem == nil {
		return nil
	}
	return unix.Munmap(mem)
}
