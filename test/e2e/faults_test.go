package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/test/labkit"
)

// incHistory is a client in the clients' namespace incrementing the
// guest's counter back to back: every reply must be above every reply seen
// before it, or a client saw state that was later lost.
type incHistory struct {
	t    *testing.T
	stop chan struct{}
	done chan struct{}

	mu      sync.Mutex
	replies []uint64
	at      []time.Time // when each reply came
	bad     []string
}

// outage is the client's longest gap between two replies from moment t
// on (a reply already in flight at t may come just after it).
func (h *incHistory) outage(t time.Time) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	var gap time.Duration
	for i := 1; i < len(h.at); i++ {
		if h.at[i].After(t) {
			from := h.at[i-1]
			if from.Before(t) {
				from = t
			}
			gap = max(gap, h.at[i].Sub(from))
		}
	}
	// Replies that stopped count until now.
	if n := len(h.at); n > 0 {
		gap = max(gap, time.Since(maxTime(h.at[n-1], t)))
	}
	return gap
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func startIncHistory(t *testing.T, g *labkit.Guest) *incHistory {
	h := &incHistory{t: t, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		var c *labkit.Client
		for {
			select {
			case <-h.stop:
				if c != nil {
					c.Close()
				}
				return
			default:
			}
			if c == nil {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				var err error
				c, err = g.DialFrom(ctx, labkit.NetnsClient)
				cancel()
				if err != nil {
					c = nil
					time.Sleep(100 * time.Millisecond)
					continue
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			v, err := c.Inc(ctx)
			cancel()
			if err != nil {
				c.Close()
				c = nil
				continue
			}
			h.mu.Lock()
			if n := len(h.replies); n > 0 && v <= h.replies[n-1] {
				h.bad = append(h.bad, fmt.Sprintf("%s: reply %d after %d", time.Now().Format("15:04:05.000"), v, h.replies[n-1]))
			}
			h.replies = append(h.replies, v)
			h.at = append(h.at, time.Now())
			h.mu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	t.Cleanup(h.end)
	return h
}

func (h *incHistory) end() {
	select {
	case <-h.stop:
	default:
		close(h.stop)
	}
	<-h.done
}

func (h *incHistory) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.replies)
}

// check ends the client and fails on any reply that went back.
func (h *incHistory) check() {
	h.t.Helper()
	h.end()
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, b := range h.bad {
		h.t.Errorf("client history: %s", b)
	}
	h.t.Logf("client saw %d replies", len(h.replies))
}

func watchCopies(t *testing.T, g *labkit.Guest, domains ...string) *labkit.CopyWatch {
	t.Helper()
	t.Cleanup(func() { // the copies other than the guest itself
		for _, d := range domains[1:] {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_, _ = labkit.Virsh(ctx, "destroy", d)
			cancel()
		}
	})
	w, err := labkit.WatchCopies(g.MAC, domains...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	return w
}

func checkOneCopy(t *testing.T, w *labkit.CopyWatch) {
	t.Helper()
	for _, v := range w.Violations() {
		t.Errorf("more than one copy served: %s", v)
	}
}

// TestPrimaryAgentRestart: the primary's agent alone is stopped (SIGTERM,
// an upgrade) while its guest runs on. The standby is told and is not
// promoted; the guest's output stays held, so no client sees state the
// standby lacks; the restarted agent resumes protection against what the
// standby holds, without a full copy of RAM.
func TestPrimaryAgentRestart(t *testing.T) {
	needLab(t)
	l := newArbLab(t)
	name := "e2e-agent-term"
	g := bootGuest(t, name, 16, 2000)
	l.startArbiter()
	l.a.start()
	l.b.start()
	l.enroll(t, g)
	copies := watchCopies(t, g, name, name+"-host-b")
	hist := startIncHistory(t, g)
	waitFor(t, "the client to get replies", 30*time.Second, func() bool { return hist.count() > 10 })

	l.a.stop(syscall.SIGTERM)
	if st := domState(name); st != "running" {
		t.Fatalf("the guest is %s after its agent stopped, want running", st)
	}
	// Two lease durations: a standby not told would be promoted by now.
	time.Sleep(8 * time.Second)
	if s, ok := l.b.status(name); !ok || s.State == "failed-over" || s.State == "failing-over" {
		t.Fatalf("the standby failed over while the primary's agent restarted: %+v", s)
	}
	if last := copies.LastSent(name); time.Since(last) < 6*time.Second {
		t.Fatalf("the guest's output reached the bridge %s ago with no agent holding it", time.Since(last).Round(time.Millisecond))
	}
	l.a.start()
	waitFor(t, "protection to resume", 2*time.Minute, func() bool {
		s, ok := l.a.status(name)
		return ok && s.State == checkpoint.StateProtected
	})
	s, _ := l.a.status(name)
	ram := uint64(256 << 20 / checkpoint.PageSize)
	if s.SyncPages == 0 || s.SyncPages >= ram/2 {
		t.Fatalf("the resync after the restart sent %d of %d pages, want only those that changed", s.SyncPages, ram)
	}
	t.Logf("resync after the restart sent %d of %d pages", s.SyncPages, ram)
	n := hist.count()
	waitFor(t, "the client to get replies again", time.Minute, func() bool { return hist.count() > n+10 })
	hist.check()
	checkOneCopy(t, copies)
}

// TestPrimaryAgentKilled: the primary's agent alone is killed (an OOM
// kill) while QEMU runs on. The orphaned copy cannot reach clients (its
// output is dropped), so the standby is promoted once the lease runs out;
// the restarted agent learns it was superseded and destroys its copy.
func TestPrimaryAgentKilled(t *testing.T) {
	needLab(t)
	l := newArbLab(t)
	name := "e2e-agent-kill"
	g := bootGuest(t, name, 17, 2000)
	l.startArbiter()
	l.a.start()
	l.b.start()
	l.enroll(t, g)
	copies := watchCopies(t, g, name, name+"-host-b")
	hist := startIncHistory(t, g)
	waitFor(t, "the client to get replies", 30*time.Second, func() bool { return hist.count() > 10 })

	l.a.stop(syscall.SIGKILL)
	waitFor(t, "the standby to be promoted", 2*time.Minute, func() bool {
		s, ok := l.b.status(name)
		return ok && s.State == "failed-over"
	})
	n := hist.count()
	waitFor(t, "the client to get replies from the promoted copy", time.Minute, func() bool { return hist.count() > n+10 })
	st := domState(name)
	if st != "running" && st != "paused" { // paused: the agent died mid-checkpoint
		t.Fatalf("the orphaned copy is %s, want it still there (its agent only was killed)", st)
	}
	t.Logf("the orphaned copy is %s", st)
	hist.check()
	checkOneCopy(t, copies)

	// Negative control: take the orphan's fail-closed capture filter away
	// by hand, as the agent's old shutdown did; the watch must catch two
	// copies serving.
	ctl := watchCopies(t, g, name, name+"-host-b")
	if st == "paused" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, _ = labkit.Virsh(ctx, "resume", name)
		cancel()
	}
	removeCaptureFilters(t, name)
	hist2 := startIncHistory(t, g)
	waitFor(t, "the watch to catch the orphan serving too", 30*time.Second, func() bool { return len(ctl.Violations()) > 0 })
	hist2.end()
	t.Logf("negative control: %d windows with two copies serving, first %s", len(ctl.Violations()), ctl.Violations()[0])

	l.a.start()
	waitFor(t, "the restarted agent to destroy its superseded copy", time.Minute, func() bool {
		st := domState(name)
		return st != "running" && st != "paused"
	})
	waitFor(t, "the old primary to show the guest as fenced", 30*time.Second, func() bool {
		s, ok := l.a.status(name)
		return ok && s.State == "fenced"
	})
}

// removeCaptureFilters deletes remora's output-commit capture filters from
// a running domain through its QEMU monitor.
func removeCaptureFilters(t *testing.T, domain string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := labkit.Virsh(ctx, "qemu-monitor-command", domain, `{"execute":"qom-list","arguments":{"path":"/objects"}}`)
	if err != nil {
		t.Fatal(err)
	}
	var r struct {
		Return []struct{ Name string } `json:"return"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, o := range r.Return {
		if strings.HasPrefix(o.Name, "remora-oc-capture") {
			if _, err := labkit.Virsh(ctx, "qemu-monitor-command", domain, `{"execute":"object-del","arguments":{"id":"`+o.Name+`"}}`); err != nil {
				t.Fatal(err)
			}
			n++
		}
	}
	if n == 0 {
		t.Fatalf("no capture filter in %s: %s", domain, out)
	}
}

// TestStandbyShellKilled: the standby's shell dies. The standby must stop
// counting as a place to fail over to, the primary goes on (unprotected,
// then protected again once a new shell is synced), and a primary host
// crash right after the shell died never yields a "failed over" with no
// copy running.
func TestStandbyShellKilled(t *testing.T) {
	needLab(t)
	l := newArbLab(t)
	name := "e2e-shell-kill"
	shell := name + "-host-b"
	g := bootGuest(t, name, 18, 2000)
	l.startArbiter()
	l.a.start()
	l.b.start()
	l.enroll(t, g)
	copies := watchCopies(t, g, name, shell)
	hist := startIncHistory(t, g)
	waitFor(t, "the client to get replies", 30*time.Second, func() bool { return hist.count() > 10 })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, err := labkit.Virsh(ctx, "destroy", shell)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the standby to see its shell is gone", 30*time.Second, func() bool {
		s, ok := l.b.status(name)
		return ok && (s.State == "shell-lost" || s.State == "syncing")
	})
	waitFor(t, "protection to come back with a new shell", 3*time.Minute, func() bool {
		s, ok := l.a.status(name)
		return ok && s.State == checkpoint.StateProtected && domState(shell) == "paused"
	})
	// Now the shell dies and the primary host crashes right after.
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	_, _ = labkit.Virsh(ctx, "destroy", shell)
	cancel()
	l.a.stop(syscall.SIGKILL)
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	_, _ = labkit.Virsh(ctx, "destroy", name)
	cancel()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if s, ok := l.b.status(name); ok && s.State == "failed-over" && domState(shell) != "running" {
			t.Fatalf("the standby reports failed-over with no copy running (shell %s)", domState(shell))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if l.b.logContains("failover complete") {
		t.Fatal("the standby logged a failover it could not have done")
	}
	hist.check()
	checkOneCopy(t, copies)
}
