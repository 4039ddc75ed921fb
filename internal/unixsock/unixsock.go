// Package unixsock is the one way remora listens on a unix socket: the
// path fits a socket address, a live listener already there is an error
// (another agent), a stale socket file is replaced, and the socket gets
// the mode its peers need.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"
)

// MaxPath is the longest path a unix socket address holds (sun_path is
// 108 bytes with its terminating NUL).
const MaxPath = 107

// ErrInUse means another process listens on the path.
var ErrInUse = errors.New("another process is listening there")

// Listen listens on path with the socket file set to mode, creating the
// directory (0755) if needed.
func Listen(path string, mode os.FileMode) (*net.UnixListener, error) {
	if len(path) > MaxPath {
		return nil, fmt.Errorf("socket path %s is %d bytes, longer than a unix socket address allows (%d): use a shorter directory or name", path, len(path), MaxPath)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen on %s: %w: stop it first", path, ErrInUse)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}
