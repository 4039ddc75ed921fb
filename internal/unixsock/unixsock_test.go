package unixsock

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestListen(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "sub", "a.sock")
	ln, err := Listen(p, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v %v", fi.Mode(), err)
	}
	if _, err := Listen(p, 0o600); !errors.Is(err, ErrInUse) {
		t.Fatalf("second listener: %v", err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // leaves a stale socket file
	ln, err = Listen(p, 0o666)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	ln.Close()
	if _, err := Listen(filepath.Join(dir, strings.Repeat("x", 120)), 0o600); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("long path: %v", err)
	}
}
