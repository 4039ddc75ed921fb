//go:build unix && !linux

package txlog

import (
	"os"

	"golang.org/x/sys/unix"
)

func fdatasync(f *os.File) error { return f.Sync() }

func preallocate(f *os.File, size int64) error {
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() >= size {
		return nil
	}
	return f.Truncate(size)
}

func lockFile(f *os.File) error {
	return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
}
