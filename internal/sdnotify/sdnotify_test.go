package sdnotify

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// manager listens where a service manager would and returns what it got.
func manager(t *testing.T) <-chan string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	got := make(chan string, 16)
	go func() {
		buf := make([]byte, 256)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			got <- string(buf[:n])
		}
	}()
	return got
}

func TestNotify(t *testing.T) {
	got := manager(t)
	if ok, err := Notify(Ready); !ok || err != nil {
		t.Fatalf("Notify: %v %v", ok, err)
	}
	select {
	case s := <-got:
		if s != Ready {
			t.Fatalf("got %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nothing reached the service manager")
	}
}

func TestNotifyWithoutManager(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if ok, err := Notify(Ready); ok || err != nil {
		t.Fatalf("Notify with no manager: %v %v", ok, err)
	}
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "gone.sock"))
	if _, err := Notify(Ready); err == nil {
		t.Fatal("a missing socket went unreported")
	}
}

func TestWatchdogInterval(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "2000000")
	t.Setenv("WATCHDOG_PID", "")
	if d := WatchdogInterval(); d != time.Second {
		t.Fatalf("interval %v, want 1s", d)
	}
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()+1))
	if d := WatchdogInterval(); d != 0 {
		t.Fatalf("another process's watchdog: interval %v", d)
	}
	t.Setenv("WATCHDOG_PID", "")
	t.Setenv("WATCHDOG_USEC", "")
	if d := WatchdogInterval(); d != 0 {
		t.Fatalf("no watchdog: interval %v", d)
	}
}

// Pings go out while the check passes and stop while it fails.
func TestWatchdogFollowsTheCheck(t *testing.T) {
	got := manager(t)
	t.Setenv("WATCHDOG_USEC", "40000") // ping every 20 ms
	var failing atomic.Bool
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Watchdog(ctx, func() error {
			if failing.Load() {
				return errors.New("stuck")
			}
			return nil
		})
	}()
	select {
	case s := <-got:
		if s != Alive {
			t.Fatalf("got %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no ping while the check passed")
	}
	failing.Store(true)
	time.Sleep(50 * time.Millisecond) // a ping already under way may land
	for len(got) > 0 {
		<-got
	}
	select {
	case s := <-got:
		t.Fatalf("pinged %q while the check failed", s)
	case <-time.After(200 * time.Millisecond):
	}
	cancel()
	<-done
}

// A check that hangs (a deadlocked daemon) stops the pings too.
func TestWatchdogStopsOnAHungCheck(t *testing.T) {
	got := manager(t)
	t.Setenv("WATCHDOG_USEC", "40000")
	hang := make(chan struct{})
	defer close(hang)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	Watchdog(ctx, func() error { <-hang; return nil })
	if len(got) != 0 {
		t.Fatalf("%d pings while the check hung", len(got))
	}
}
