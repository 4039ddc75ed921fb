//go:build linux

package labkit

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// Network namespaces.
//
// InNetns runs a function on an OS thread switched into a namespace
// (setns(2) on a locked thread). Sockets keep the namespace they were
// created in, so a connection dialed (or a listener opened) inside InNetns
// keeps working from any goroutine afterwards. NetnsCommand is the other
// way: a child process under `ip netns exec`.

// NetnsPath is the bind mount of a named namespace (ip netns add).
func NetnsPath(ns string) string { return filepath.Join("/run/netns", ns) }

// InNetns runs fn on a locked OS thread that is in network namespace ns,
// then switches the thread back. fn must do its work on the calling
// goroutine: goroutines it starts run on other threads, in the original
// namespace. If the thread cannot be switched back, it is discarded (the
// goroutine exits while still locked).
func InNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("labkit: netns: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open(NetnsPath(ns))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("labkit: network namespace %s (run test/lab/lab.sh up): %w", ns, err)
			return
		}
		defer target.Close()
		if err := setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("labkit: setns %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := setns(orig, unix.CLONE_NEWNET); err != nil {
			// Stay locked: the runtime ends this thread with the goroutine.
			errc <- fmt.Errorf("labkit: restoring the network namespace after %s: %w", ns, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

func setns(f *os.File, nstype int) error { return unix.Setns(int(f.Fd()), nstype) }

// DialTCPNetns dials a TCP connection from network namespace ns.
func DialTCPNetns(ctx context.Context, ns, addr string) (net.Conn, error) {
	var c net.Conn
	err := InNetns(ns, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, "tcp4", addr)
		return err
	})
	return c, err
}

// DialNetns connects a workload client from network namespace ns.
func DialNetns(ctx context.Context, ns, addr string) (*Client, error) {
	c, err := DialTCPNetns(ctx, ns, addr)
	if err != nil {
		return nil, err
	}
	return newClient(c), nil
}

// NetnsCommand returns a command that runs name args... in network
// namespace ns (ip netns exec ns name args...).
func NetnsCommand(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...)
}
