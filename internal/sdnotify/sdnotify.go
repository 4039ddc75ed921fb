// Package sdnotify tells systemd (or any service manager speaking its
// notify protocol) that a daemon is ready, alive, or stopping. Without
// $NOTIFY_SOCKET every call does nothing: the daemons run the same by
// hand, under a test, or in a container.
package sdnotify

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// States the daemons send.
const (
	Ready    = "READY=1"
	Stopping = "STOPPING=1"
	Alive    = "WATCHDOG=1"
)

// Notify sends state to $NOTIFY_SOCKET. It reports false, with no error,
// when no service manager listens.
func Notify(state string) (bool, error) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return false, nil
	}
	if path[0] == '@' { // abstract socket
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("notify the service manager: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return false, fmt.Errorf("notify the service manager: %w", err)
	}
	return true, nil
}

// WatchdogInterval returns how often to send Alive: half the service's
// WatchdogSec, or 0 when no watchdog is set for this process.
func WatchdogInterval() time.Duration {
	if pid := os.Getenv("WATCHDOG_PID"); pid != "" && pid != strconv.Itoa(os.Getpid()) {
		return 0
	}
	usec, err := strconv.ParseInt(os.Getenv("WATCHDOG_USEC"), 10, 64)
	if err != nil || usec <= 0 {
		return 0
	}
	return time.Duration(usec) * time.Microsecond / 2
}

// Watchdog sends Alive every WatchdogInterval until ctx ends, each time
// alive returns nil within the interval: a daemon whose check hangs (a
// deadlock) or fails stops the pings, and the service manager restarts
// it. Without a watchdog it returns at once.
func Watchdog(ctx context.Context, alive func() error) {
	every := WatchdogInterval()
	if every <= 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var running chan error // a check still under way
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if running == nil {
			running = make(chan error, 1)
			go func(c chan<- error) { c <- alive() }(running)
		}
		select {
		case err := <-running:
			running = nil
			if err == nil {
				_, _ = Notify(Alive)
			}
		case <-time.After(every / 2):
			// still checking: no ping this round
		case <-ctx.Done():
			return
		}
	}
}
