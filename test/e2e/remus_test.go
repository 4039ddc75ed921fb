package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/remora-ha/remora/test/labkit"
)

// remusClient is a client on the clients' side of the network (netns
// rm-client) that increments the guest's counter back to back and records
// every reply. Replies must only grow: a reply not above every earlier one
// means the client saw state that a failover lost.
type remusClient struct {
	t *testing.T
	g *labkit.Guest

	mu         sync.Mutex
	max        uint64
	replies    int
	reconnects int
	violations []string
	phase      string // the test's current step, for violation reports
	stop       chan struct{}
	done       chan struct{}
}

func startRemusClient(t *testing.T, g *labkit.Guest) *remusClient {
	c := &remusClient{t: t, g: g, stop: make(chan struct{}), done: make(chan struct{})}
	go c.run()
	t.Cleanup(c.halt)
	return c
}

func (c *remusClient) run() {
	defer close(c.done)
	var conn *labkit.Client
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		if conn == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			cl, err := c.g.DialFrom(ctx, labkit.NetnsClient)
			cancel()
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			conn = cl
			c.mu.Lock()
			c.reconnects++
			c.mu.Unlock()
		}
		// Long enough for a failover plus TCP's retransmission backoff:
		// with output commit the connection survives it.
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		v, err := conn.Inc(ctx)
		cancel()
		if err != nil {
			conn.Close()
			conn = nil
			continue
		}
		c.mu.Lock()
		if v <= c.max {
			c.violations = append(c.violations, fmt.Sprintf("%s: reply %d after the client had already seen %d", c.phase, v, c.max))
		} else {
			c.max = v
		}
		c.replies++
		c.mu.Unlock()
	}
}

func (c *remusClient) halt() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
}

func (c *remusClient) setPhase(p string) {
	c.mu.Lock()
	c.phase = p
	c.mu.Unlock()
}

func (c *remusClient) snapshot() (max uint64, replies, reconnects int, violations []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.max, c.replies, c.reconnects, append([]string(nil), c.violations...)
}

// remusRounds protects the guest, crashes its host at a random moment,
// fails over to the other host, and protects it back, crashes times.
// It returns the violations the client saw.
func remusRounds(t *testing.T, g *labkit.Guest, a, b *host, crashes int, holding, withDisk bool, seed uint64) []string {
	rnd := rand.New(rand.NewPCG(seed, 1))
	client := startRemusClient(t, g)
	waitFor(t, "the client's first reply", time.Minute, func() bool { _, n, _, _ := client.snapshot(); return n > 0 })

	prim, stby, dom := a, b, g.Name
	for round := 1; round <= crashes; round++ {
		client.setPhase(fmt.Sprintf("round %d (protect %s on %s)", round, dom, prim.name))
		out, err := prim.cli("vm", "enroll", dom, "--standby", stby.addr, "--timeout", "3m")
		if err != nil || !strings.Contains(out, "protected") {
			t.Fatalf("round %d: enroll %s on %s: %v\n%s", round, dom, prim.name, err, out)
		}
		// Run protected for a random while, so the crash lands anywhere in
		// the epoch cycle.
		run := time.Duration(500+rnd.IntN(2500)) * time.Millisecond
		_, before, _, _ := client.snapshot()
		time.Sleep(run)
		st, _ := prim.status(dom)
		if withDisk && (st.Disk == nil || st.Disk.State != "mirrored") {
			t.Fatalf("round %d: disk not mirrored on %s: %+v", round, prim.name, st.Disk)
		}
		held := 0
		if holding {
			if st.Output == nil || !st.Output.Holding {
				t.Fatalf("round %d: output commit not holding on %s: %+v", round, prim.name, st.Output)
			}
			held = st.Output.HeldFrames
		}
		_, during, _, _ := client.snapshot()

		// The host dies: its agent and its guest.
		client.setPhase(fmt.Sprintf("round %d (after %s crashed)", round, prim.name))
		prim.stop(syscall.SIGKILL)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if _, err := labkit.Virsh(ctx, "destroy", dom); err != nil {
			cancel()
			t.Fatalf("round %d: destroy %s: %v", round, dom, err)
		}
		cancel()
		// Replies until the guest died count as the primary's.
		maxBefore, seen, _, _ := client.snapshot()
		sst, ok := stby.status(dom)
		if !ok {
			t.Fatalf("round %d: %s has no replica of %s", round, stby.name, dom)
		}
		// (The mirror's connection died with the primary: the status says
		// so; the committed epochs are intact.)
		if withDisk && (sst.Disk == nil || sst.Disk.AppliedBytes == 0) {
			t.Fatalf("round %d: standby's replica disks: %+v, want writes applied", round, sst.Disk)
		}
		out, err = stby.cli("vm", "failover", dom)
		if err != nil {
			t.Fatalf("round %d: failover on %s: %v\n%s", round, stby.name, err, out)
		}
		waitFor(t, "a reply from the promoted guest", 90*time.Second, func() bool {
			_, n, _, _ := client.snapshot()
			return n > seen
		})
		maxAfter, after, reconnects, _ := client.snapshot()
		t.Logf("round %d: %s crashed after %s protected (%d replies, highest %d; standby committed epoch %d, output held %d frames); %s; client: replies after failover reach %d, %d replies in all, %d connections",
			round, prim.name, run, during-before, maxBefore, sst.Epoch, held, strings.TrimSpace(out), maxAfter, after, reconnects)

		// Memory integrity of the restored guest.
		ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
		cl, err := g.DialFrom(ctx, labkit.NetnsClient)
		if err != nil {
			cancel()
			t.Fatalf("round %d: dial the promoted guest: %v", round, err)
		}
		res, err := cl.Check(ctx)
		if err != nil || !res.OK {
			cl.Close()
			cancel()
			t.Fatalf("round %d: integrity check after failover: %v %s", round, err, res.Reply)
		}
		if withDisk {
			// The disk holds exactly the records the restored memory counts
			// (plus at most the one being written), none torn.
			reply, err := cl.Do(ctx, "diskcheck")
			if err != nil || !strings.HasPrefix(reply, "ok ") {
				cl.Close()
				cancel()
				t.Fatalf("round %d: disk and memory disagree after failover: %v %s", round, err, reply)
			}
			t.Logf("round %d: memory %s; disk %s", round, res.Reply, reply)
		}
		cl.Close()
		cancel()

		// The crashed host comes back; the admin clears the stale
		// enrollments and protects the guest back onto it.
		newDom := sst.Shell
		prim.start()
		_, _ = prim.cli("vm", "unenroll", dom) // warns: its standby failed over
		if out, err := stby.cli("vm", "unenroll", dom); err != nil {
			t.Fatalf("round %d: forget the failed-over replica on %s: %v\n%s", round, stby.name, err, out)
		}
		prim, stby, dom = stby, prim, newDom
	}
	client.halt()
	_, replies, reconnects, violations := client.snapshot()
	t.Logf("%d crashes: %d replies, %d connections, %d violations", crashes, replies, reconnects, len(violations))
	return violations
}

func crashCount(def int) int {
	if n, err := strconv.Atoi(os.Getenv("REMORA_E2E_CRASHES")); err == nil && n > 0 {
		return n
	}
	return def
}

// TestExternalConsistency is the Remus property, end to end: a client in
// another namespace increments the guest's counter continuously; the
// primary's host crashes at random moments, many times, and the guest
// fails over each time (then is protected back). After each failover the
// first reply must be above every reply the client ever got: with output
// commit nothing the client saw can be lost. Without output commit the
// same loop must catch the violation, or the test proves nothing.
func TestExternalConsistency(t *testing.T) {
	needLab(t)
	t.Run("held", func(t *testing.T) {
		img := filepath.Join(labkit.QEMUTempDir(t), "data.img")
		if err := labkit.CreateDataDisk(img, 32<<20); err != nil {
			t.Fatal(err)
		}
		g := bootGuestWith(t, labkit.GuestOptions{Name: "e2e-remus", IP: labkit.GuestIP(15), Rate: 2000, DataDisk: img})
		dc := dialGuest(t, g)
		if reply, err := dc.Do(context.Background(), "disk 100"); err != nil || reply != "ok" {
			t.Fatalf("start the disk writer: %v %q", err, reply)
		}
		a := newHost(t, "host-a", labkit.NetnsA, labkit.IPA, hostOpts{})
		b := newHost(t, "host-b", labkit.NetnsB, labkit.IPB, hostOpts{})
		a.start()
		b.start()
		if v := remusRounds(t, g, a, b, crashCount(6), true, true, uint64(time.Now().UnixNano())); len(v) > 0 {
			t.Fatalf("%d replies went backwards across failovers:\n%s", len(v), strings.Join(v, "\n"))
		}
	})
	t.Run("unheld", func(t *testing.T) {
		g := bootGuest(t, "e2e-noremus", 16, 2000)
		a := newHost(t, "host-a", labkit.NetnsA, labkit.IPA, hostOpts{extra: "output_commit: off\n"})
		b := newHost(t, "host-b", labkit.NetnsB, labkit.IPB, hostOpts{extra: "output_commit: off\n"})
		a.start()
		b.start()
		v := remusRounds(t, g, a, b, 2, false, false, uint64(time.Now().UnixNano()))
		if len(v) == 0 {
			t.Fatal("without output commit the client saw no lost reply in 2 crashes: the check cannot tell")
		}
		t.Logf("as expected without output commit: %s", v[0])
	})
}
