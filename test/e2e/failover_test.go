package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/test/labkit"
)

// incSample is a counter value the client saw and the first primary epoch
// whose checkpoint certainly contains it: one whose capture began after the
// reply arrived.
type incSample struct {
	value uint64
	epoch uint64
}

// TestFailoverAfterPrimaryCrash protects a guest that dirties memory fast,
// crashes host A (its agent is SIGKILLed at a chosen point of the epoch
// cycle, then its domain is destroyed) and fails over on host B. The
// counter must not go back behind what the standby had committed, and the
// memory integrity check must pass: no partial epoch was applied and no
// dirty page was missed.
func TestFailoverAfterPrimaryCrash(t *testing.T) {
	needLab(t)
	cases := []struct {
		point      string // where host A's agent dies (checkpoint.Primary hook names)
		crashEpoch uint64
		ip         int
		rate       int    // guest memory writer, pages/s
		failCrash  string // where host B's agent dies during the failover, then restarts
	}{
		{"captured", 30, 11, 20000, "failover-begun"},    // guest paused, epoch being captured
		{"transfer", 30, 12, 20000, "failover-restored"}, // half of the epoch's pages sent
		{"acked", 60, 13, 20000, ""},                     // between epochs, right after an ack
	}
	for _, c := range cases {
		t.Run(c.point, func(t *testing.T) {
			crashTest(t, c.point, c.crashEpoch, c.ip, c.rate, c.failCrash)
		})
	}
}

func crashTest(t *testing.T, point string, crashEpoch uint64, ip, rate int, failCrash string) {
	name := "e2e-" + point
	g := bootGuest(t, name, ip, rate)
	a := newHost(t, "host-a", labkit.NetnsA, labkit.IPA, hostOpts{env: []string{fmt.Sprintf("REMORA_FAULT_INJECT=%s:%d", point, crashEpoch)}})
	var bEnv []string
	if failCrash != "" {
		bEnv = []string{"REMORA_FAULT_INJECT=" + failCrash + ":0"}
	}
	b := newHost(t, "host-b", labkit.NetnsB, labkit.IPB, hostOpts{env: bEnv})
	a.start()

	if point == "captured" {
		// Standby not up yet: enrollment must say so and keep retrying.
		out, err := a.cli("vm", "enroll", name, "--standby", b.addr, "--wait=false")
		if err != nil {
			t.Fatalf("enroll: %v\n%s", err, out)
		}
		waitFor(t, "status to show the unreachable standby", 30*time.Second, func() bool {
			s, ok := a.status(name)
			return ok && s.State == checkpoint.StateConnecting && strings.Contains(s.LastError, "connect to standby") && !s.NextRetry.IsZero()
		})
		out, _ = a.cli("vm", "status")
		t.Logf("status while the standby is down:\n%s", out)
		b.start()
		waitFor(t, "protection", 3*time.Minute, func() bool {
			s, ok := a.status(name)
			return ok && s.State == checkpoint.StateProtected
		})
	} else {
		b.start()
		out, err := a.cli("vm", "enroll", name, "--standby", b.addr, "--timeout", "3m")
		if err != nil || !strings.Contains(out, "protected") {
			t.Fatalf("enroll: %v\n%s", err, out)
		}
	}
	if point == "acked" {
		// A standby restart must keep its replica and resume without a full copy.
		b.stop(syscall.SIGTERM)
		b.start()
		waitFor(t, "incremental resume after the standby restarted", time.Minute, func() bool {
			return a.logContains("full_sync=false")
		})
	}

	c := dialGuest(t, g)
	var samples []incSample
	crashed := a.exited()
	deadline := time.After(3 * time.Minute)
loop:
	for {
		select {
		case <-crashed:
			break loop
		case <-deadline:
			t.Fatalf("host A's agent did not reach fault point %s:%d\n%s", point, crashEpoch, a.logTail(30))
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		v, err := c.Inc(ctx)
		cancel()
		if err != nil {
			continue // the guest may be paused by the dying agent
		}
		if s, ok := a.status(name); ok {
			samples = append(samples, incSample{value: v, epoch: s.Started + 1})
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Host A is gone: its guest dies with it.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	if _, err := labkit.Virsh(ctx, "destroy", name); err != nil {
		t.Fatalf("destroy primary domain: %v", err)
	}
	cancel()

	st, ok := b.status(name)
	if !ok {
		t.Fatal("standby lost its replica record")
	}
	committed := st.Epoch
	t.Logf("crash at %s:%d; standby committed epoch %d; %d counter samples", point, crashEpoch, committed, len(samples))
	switch point {
	case "captured", "transfer":
		if committed >= crashEpoch {
			t.Fatalf("standby committed epoch %d, but host A died while epoch %d was being %s", committed, crashEpoch, point)
		}
	case "acked":
		if committed < crashEpoch {
			t.Fatalf("standby committed epoch %d, want >= %d (acked before the crash)", committed, crashEpoch)
		}
	}
	var want uint64
	for _, s := range samples {
		if s.epoch <= committed && s.value > want {
			want = s.value
		}
	}

	out, err := b.cli("vm", "failover", name)
	if failCrash != "" {
		// Host B's agent died in the middle of the failover; on restart it
		// must finish it from its journal, without being asked again.
		if err == nil {
			t.Fatalf("failover succeeded though the agent was to die at %s:\n%s", failCrash, out)
		}
		<-b.exited()
		b.env = nil
		b.start()
		waitFor(t, "the restarted standby to finish the failover", time.Minute, func() bool {
			s, ok := b.status(name)
			return ok && s.State == "failed-over"
		})
		if !b.logContains("resuming an interrupted failover") {
			t.Fatalf("restarted agent did not resume the failover from its journal:\n%s", b.logTail(30))
		}
		out, err = b.cli("txlog", "verify", filepath.Join(b.dir, "state", "journal"))
		if err != nil {
			t.Fatalf("journal not sound after the crash: %v\n%s", err, out)
		}
	} else if err != nil {
		t.Fatalf("failover: %v\n%s", err, out)
	}
	t.Logf("%s", strings.TrimSpace(out))
	c2 := dialGuest(t, g)
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, err := c2.Inc(ctx)
	if err != nil {
		t.Fatalf("counter on the standby: %v", err)
	}
	if got <= want {
		t.Fatalf("counter on the standby answered %d; the standby had committed a state where it was already %d", got, want)
	}
	res, err := c2.Check(ctx)
	if err != nil {
		t.Fatalf("integrity check after failover: %v", err)
	}
	if !res.OK {
		t.Fatalf("integrity check after failover failed: %s", res.Reply)
	}
	t.Logf("after failover: counter %d (committed >= %d), check: %s", got, want, res.Reply)
	state, err := labkit.Virsh(ctx, "domstate", name+"-host-b")
	if err != nil || state != "running" {
		t.Fatalf("promoted guest state %q (%v), want running", state, err)
	}
	if s, _ := b.status(name); s.State != "failed-over" {
		t.Fatalf("standby reports %q, want failed-over", s.State)
	}
	// A second failover must be refused, not redone.
	if out, err := b.cli("vm", "failover", name); err == nil || !strings.Contains(out, "already failed over") {
		t.Fatalf("second failover: err=%v out=%s", err, out)
	}
	// The standby's history, from its journal (across its restart when it
	// died mid-failover).
	out, err = b.cli("vm", "events", name, "--json")
	if err != nil {
		t.Fatalf("vm events: %v\n%s", err, out)
	}
	var events []api.Event
	if err := json.Unmarshal([]byte(out), &events); err != nil {
		t.Fatalf("vm events --json: %v\n%s", err, out)
	}
	var seen []string
	for _, e := range events {
		if e.Time.IsZero() {
			t.Errorf("event without a time: %+v", e)
		}
		seen = append(seen, e.Kind)
	}
	if !inOrder(seen, "enrolled", "synced", "failover", "promoted") {
		t.Fatalf("standby's events %v, want enrolled, synced, failover, promoted in order", seen)
	}
	out, _ = b.cli("vm", "events", name)
	t.Logf("vm events on the standby:\n%s", out)
}

// inOrder reports whether want occur in got in this order (others between).
func inOrder(got []string, want ...string) bool {
	for _, g := range got {
		if len(want) > 0 && g == want[0] {
			want = want[1:]
		}
	}
	return len(want) == 0
}
