package main

import (
	"fmt"
	"os"
	"syscall"
	"unsafe"
)

const oDirect = syscall.O_DIRECT

// Block device ioctls (linux/fs.h).
const (
	blkDiscard = 0x1277 // BLKDISCARD
	blkZeroOut = 0x127f // BLKZEROOUT
)

// discardRange discards [start, start+n) of the device, or zeroes it when
// discard is not supported, and says which.
func discardRange(f *os.File, start, n uint64) (string, error) {
	r := [2]uint64{start, n}
	for _, op := range []struct {
		name string
		req  uintptr
	}{{"discarded", blkDiscard}, {"zeroed", blkZeroOut}} {
		_, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), op.req, uintptr(unsafe.Pointer(&r)))
		if e == 0 {
			return fmt.Sprintf("%s %d bytes at %d", op.name, n, start), nil
		}
		if e != syscall.EOPNOTSUPP && e != syscall.ENOTTY && e != syscall.EINVAL {
			return "", fmt.Errorf("%s: %w", op.name, e)
		}
	}
	return "", fmt.Errorf("the disk supports neither discard nor zero-out")
}
