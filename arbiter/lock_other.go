//go:build !unix

package arbiter

import "os"

// Without flock the state dir is not protected against a second arbiter;
// remora only supports running the arbiter on Linux.
func lockFile(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
}

func unlockFile(f *os.File) error { return f.Close() }
