package unixsock

import (
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// The test binary, run with UNIXSOCK_TEST_DIAL set, is another process
// that connects to the socket and waits to be closed.
func init() {
	if p := os.Getenv("UNIXSOCK_TEST_DIAL"); p != "" {
		c, err := net.Dial("unix", p)
		if err != nil {
			os.Exit(2)
		}
		_, _ = io.Copy(io.Discard, c)
		os.Exit(0)
	}
}

func TestPeerListener(t *testing.T) {
	ln, err := Listen(filepath.Join(t.TempDir(), "p.sock"), 0o666)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	l := &PeerListener{UnixListener: ln, PID: func() (int, error) { return os.Getpid(), nil }}

	// Another process connects first: it is closed, the next
	// connection (ours) is accepted.
	other := exec.Command(os.Args[0], "-test.run=^$")
	other.Env = append(os.Environ(), "UNIXSOCK_TEST_DIAL="+ln.Addr().String())
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- other.Wait() }()
	accepted := make(chan *net.UnixConn, 1)
	go func() {
		c, err := l.AcceptUnix()
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	select {
	case err := <-done: // it read EOF: refused
		if err != nil {
			t.Fatalf("the other process: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the other process's connection was not closed")
	}
	if l.Refused() != 1 {
		t.Fatalf("refused %d, want 1", l.Refused())
	}
	mine, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	c := <-accepted
	if pid, err := PeerPID(c); err != nil || pid != os.Getpid() {
		t.Fatalf("accepted peer %d %v", pid, err)
	}
	c.Close()

	// Negative control: a listener for another pid refuses us too.
	wrong := &PeerListener{UnixListener: ln, PID: func() (int, error) { return os.Getpid() + 1, nil }}
	go func() {
		if c, err := net.Dial("unix", ln.Addr().String()); err == nil {
			_, _ = io.Copy(io.Discard, c)
		}
		ln.Close()
	}()
	if c, err := wrong.AcceptUnix(); err == nil {
		t.Fatalf("accepted %v from a process it does not allow", c.RemoteAddr())
	}
	if wrong.Refused() != 1 {
		t.Fatalf("refused %d, want 1", wrong.Refused())
	}
}

func TestPeerListenerUnknownPID(t *testing.T) {
	ln, err := Listen(filepath.Join(t.TempDir(), "p.sock"), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	l := &PeerListener{UnixListener: ln, PID: func() (int, error) { return 0, errors.New("no pid file") }}
	c, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := l.AcceptUnix(); !errors.Is(err, ErrNoPeerPID) {
		t.Fatalf("accept with no pid: %v", err)
	}
}

func TestDiscardPending(t *testing.T) {
	ln, err := Listen(filepath.Join(t.TempDir(), "d.sock"), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if n, err := DiscardPending(ln); n != 0 || err != nil {
		t.Fatalf("empty backlog: %d %v", n, err)
	}
	var stale []net.Conn
	for range 3 {
		c, err := net.Dial("unix", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		stale = append(stale, c)
	}
	if n, err := DiscardPending(ln); n != 3 || err != nil {
		t.Fatalf("discarded %d %v, want 3", n, err)
	}
	for _, c := range stale {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("a discarded connection reads %v, want EOF", err)
		}
	}
	fresh, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	_ = ln.SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}
