package unixsock

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Cred is who is at the other end of a unix socket, as the kernel
// recorded it when the peer connected (SO_PEERCRED).
type Cred struct{ PID, UID, GID int }

// PeerCred returns c's peer's credentials.
func PeerCred(c *net.UnixConn) (Cred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var uc *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		uc, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Cred{}, err
	}
	if cerr != nil {
		return Cred{}, fmt.Errorf("peer credentials: %w", cerr)
	}
	return Cred{PID: int(uc.Pid), UID: int(uc.Uid), GID: int(uc.Gid)}, nil
}

// PeerPID is the process id of c's peer.
func PeerPID(c *net.UnixConn) (int, error) {
	cr, err := PeerCred(c)
	return cr.PID, err
}

// PeerListener accepts only the connections of one process: a socket QEMU
// connects to must be reachable by QEMU's user, so any other local process
// of that user (or root) could connect first and be taken for QEMU.
// Connections of other processes are closed at once and counted.
type PeerListener struct {
	*net.UnixListener
	// PID names the one process allowed. It is asked once and again when
	// a peer does not match (the process may have been restarted).
	PID func() (int, error)

	mu      sync.Mutex
	pid     int
	refused atomic.Int64
}

// ErrNoPeerPID is returned by Accept when the allowed process is unknown.
var ErrNoPeerPID = errors.New("cannot tell which process may connect")

// Refused is how many connections of other processes were closed.
func (l *PeerListener) Refused() int64 { return l.refused.Load() }

// Accept implements net.Listener.
func (l *PeerListener) Accept() (net.Conn, error) { return l.AcceptUnix() }

// AcceptUnix waits for a connection of the allowed process.
func (l *PeerListener) AcceptUnix() (*net.UnixConn, error) {
	for {
		c, err := l.UnixListener.AcceptUnix()
		if err != nil {
			return nil, err
		}
		ok, err := l.allowed(c)
		if err != nil {
			c.Close()
			return nil, err
		}
		if ok {
			return c, nil
		}
		c.Close()
		l.refused.Add(1)
	}
}

func (l *PeerListener) allowed(c *net.UnixConn) (bool, error) {
	peer, err := PeerPID(c)
	if err != nil {
		return false, nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.pid != 0 && peer == l.pid {
		return true, nil
	}
	// Unknown yet, or a mismatch: the process may have been restarted.
	pid, err := l.PID()
	if err != nil {
		return false, fmt.Errorf("%w on %s: %v", ErrNoPeerPID, l.Addr(), err)
	}
	l.pid = pid
	return peer == pid, nil
}

// DiscardPending closes the connections waiting in ln's backlog, without
// blocking: they belong to an earlier client that gave up (an abandoned
// migration), and the next Accept must get the next client's.
func DiscardPending(ln *net.UnixListener) (int, error) {
	raw, err := ln.SyscallConn()
	if err != nil {
		return 0, err
	}
	n := 0
	var aerr error
	if err := raw.Control(func(fd uintptr) {
		for {
			nfd, _, err := unix.Accept4(int(fd), unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				if err != unix.EAGAIN {
					aerr = err
				}
				return
			}
			unix.Close(nfd)
			n++
		}
	}); err != nil {
		return n, err
	}
	return n, aerr
}
