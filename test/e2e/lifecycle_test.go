package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/test/labkit"
)

// The life after a failover and planned moves, with the arbiter, mutual
// TLS and reprotect: auto on both agents.

// waitReprotected waits until guest runs on prim, protected onto stby
// and counted in sync by the arbiter; it returns the primary's status.
func (l *arbLab) waitReprotected(t *testing.T, guest string, prim, stby *host) api.VMStatus {
	t.Helper()
	var p api.VMStatus
	waitFor(t, fmt.Sprintf("%s to be re-protected from %s onto %s", guest, prim.name, stby.name), 4*time.Minute, func() bool {
		var ok bool
		p, ok = prim.status(guest)
		s, ok2 := stby.status(guest)
		_, inSync, err := l.arbiterGuest(guest)
		return ok && ok2 && p.Role == api.RolePrimary && p.State == checkpoint.StateProtected &&
			s.Role == api.RoleStandby && s.State == checkpoint.StateProtected && err == nil && inSync
	})
	return p
}

// startDiskWriter has the guest write rate records a second to its data
// disk from now on.
func startDiskWriter(t *testing.T, g *labkit.Guest, rate int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := g.DialFrom(ctx, labkit.NetnsClient)
	if err != nil {
		t.Fatalf("dial the guest: %v", err)
	}
	defer c.Close()
	if reply, err := c.Do(ctx, fmt.Sprintf("disk %d", rate)); err != nil || !strings.HasPrefix(reply, "ok") {
		t.Fatalf("start the guest's disk writer: %v %s", err, reply)
	}
}

// checkIncremental fails unless the last disk resync copied at most a
// tenth of the disk and, when the guest wrote since the copies parted,
// something.
func checkIncremental(t *testing.T, st api.VMStatus, diskBytes int64, wrote bool) {
	t.Helper()
	if st.Disk == nil || st.Disk.LastResyncBytes > diskBytes/10 {
		t.Errorf("re-protect copied %+v of a %d-byte disk, want at most a tenth (only the blocks that differ)", st.Disk, diskBytes)
		return
	}
	if wrote && st.Disk.LastResyncBytes == 0 {
		t.Errorf("re-protect copied nothing though the guest wrote to its disk since the copies parted")
	}
	t.Logf("re-protect copied %d KiB of the %d MiB disk", st.Disk.LastResyncBytes>>10, diskBytes>>20)
}

var downtimeRE = regexp.MustCompile(`downtime ([0-9.]+)(ms|s)`)

// switchover runs `vm switchover` on from and returns the downtime it
// reports.
func switchover(t *testing.T, from *host, verb, guest string) time.Duration {
	t.Helper()
	out, err := from.cli("vm", verb, guest)
	if err != nil || !strings.Contains(out, "switched over") {
		t.Fatalf("vm %s %s on %s: %v\n%s", verb, guest, from.name, err, out)
	}
	m := downtimeRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no downtime in %q", out)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	d := time.Duration(v * float64(time.Millisecond))
	if m[2] == "s" {
		d = time.Duration(v * float64(time.Second))
	}
	t.Logf("%s", strings.TrimSpace(out))
	return d
}

// checkGuest asks the guest's workload for its memory and disk checks.
func checkGuest(t *testing.T, g *labkit.Guest) {
	t.Helper()
	guestChecks(t, g, true)
}

// checkGuestMemory asks the guest's workload for its memory check.
func checkGuestMemory(t *testing.T, g *labkit.Guest) {
	t.Helper()
	guestChecks(t, g, false)
}

func guestChecks(t *testing.T, g *labkit.Guest, disk bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := g.DialFrom(ctx, labkit.NetnsClient)
	if err != nil {
		t.Fatalf("dial the guest: %v", err)
	}
	defer c.Close()
	if res, err := c.Check(ctx); err != nil || !res.OK {
		t.Errorf("memory integrity of %s: %v %s", g.Name, err, res.Reply)
	}
	if !disk {
		return
	}
	if reply, err := c.Do(ctx, "diskcheck"); err != nil || !strings.HasPrefix(reply, "ok ") {
		t.Errorf("disk integrity of %s: %v %s", g.Name, err, reply)
	}
}

// protectedWithDisk boots guest name with a data disk, protected from
// host-a onto host-b, both with reprotect: auto.
func protectedWithDisk(t *testing.T, name string, ip int) (*arbLab, *labkit.Guest) {
	t.Helper()
	needLab(t)
	l := newArbLabWith(t, "reprotect: auto\n")
	img := filepath.Join(labkit.QEMUTempDir(t), "data.img")
	if err := labkit.CreateDataDisk(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	g := bootGuestWith(t, labkit.GuestOptions{Name: name, IP: labkit.GuestIP(ip), Rate: 2000, DataDisk: img})
	l.startArbiter()
	l.a.start()
	l.b.start()
	l.enroll(t, g)
	return l, g
}

// TestSwitchoverBothWays: a planned switchover from A to B and back,
// then a failback, with a client incrementing the guest's counter all
// along: no reply lost or out of order, at most one copy serving, memory
// and disk intact; after each move the new primary re-protects the guest
// onto the old one by itself, and the old one's superseded copy cannot
// be started.
func TestSwitchoverBothWays(t *testing.T) {
	name := "e2e-switch"
	l, g := protectedWithDisk(t, name, 33)
	shellB, shellA := name+"-host-b", name+"-host-a"
	copies := watchCopies(t, g, name, shellB, shellA)
	hist := startIncHistory(t, g)
	waitFor(t, "the client to get replies", 30*time.Second, func() bool { return hist.count() > 10 })
	startDiskWriter(t, g, 200)

	// Not while the standby is out of sync: refused with the reason.
	var downtimes []time.Duration

	// A -> B.
	downtimes = append(downtimes, switchover(t, l.a, "switchover", name))
	if st := domState(name); st == "running" || st == "paused" {
		t.Fatalf("the old primary's copy is %s after the switchover", st)
	}
	if st := domState(shellB); st != "running" && st != "paused" { // paused: a checkpoint
		t.Fatalf("the guest does not run on host-b (%s is %s)", shellB, st)
	}
	n := hist.count()
	waitFor(t, "replies from host-b", time.Minute, func() bool { return hist.count() > n+10 })
	// The promoted guest is a normal libvirt domain of host-b now.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	info, err := labkit.Virsh(ctx, "dominfo", shellB)
	cancel()
	if err != nil || !regexp.MustCompile(`Persistent:\s+yes`).MatchString(info) || !regexp.MustCompile(`Autostart:\s+disable`).MatchString(info) {
		t.Fatalf("the promoted guest %s is not defined persistently with autostart off: %v\n%s", shellB, err, info)
	}
	checkIncremental(t, l.waitReprotected(t, name, l.b, l.a), 64<<20, false)
	// The superseded copy on A must not start, whoever asks.
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	out, err := labkit.Virsh(ctx, "start", "--paused", name)
	cancel()
	if err == nil {
		_, _ = labkit.Virsh(context.Background(), "destroy", name)
		t.Fatalf("virsh start of the superseded copy succeeded: %s", out)
	}
	if !strings.Contains(err.Error(), "runs on host-b") {
		t.Fatalf("virsh start of the superseded copy: %v, want the hook's refusal naming host-b", err)
	}
	checkGuest(t, g)

	// B -> A: the guest runs in A's shell for it.
	downtimes = append(downtimes, switchover(t, l.b, "switchover", name))
	if st := domState(shellA); st != "running" && st != "paused" {
		t.Fatalf("the guest does not run on host-a (%s is %s)", shellA, st)
	}
	n = hist.count()
	waitFor(t, "replies from host-a", time.Minute, func() bool { return hist.count() > n+10 })
	checkIncremental(t, l.waitReprotected(t, name, l.a, l.b), 64<<20, false)
	// A is the guest's home: nothing to fail back.
	if out, err := l.a.cli("vm", "failback", name); err == nil || !strings.Contains(out, "at home") {
		t.Fatalf("failback at home: %v %s", err, out)
	}
	checkGuest(t, g)

	// Away again, then failback from B returns it home.
	downtimes = append(downtimes, switchover(t, l.a, "switchover", name))
	l.waitReprotected(t, name, l.b, l.a)
	downtimes = append(downtimes, switchover(t, l.b, "failback", name))
	l.waitReprotected(t, name, l.a, l.b)
	n = hist.count()
	waitFor(t, "replies after the failback", time.Minute, func() bool { return hist.count() > n+10 })
	checkGuest(t, g)
	hist.check()
	checkOneCopy(t, copies)
	t.Logf("switchover downtimes (pause to the standby running the guest): %v", downtimes)
	if ev, err := l.a.cli("vm", "events", name); err == nil {
		t.Logf("events on host-a:\n%s", ev)
	}
}

// TestReprotectRounds: the primary host crashes (a kill, then a power cut
// with no FIN or RST, alternating), the standby is promoted, and when the
// crashed host's agent is back the new primary re-protects the guest onto
// it by itself; then the other side crashes. Every round: the client's
// history never goes back, one copy serves, memory and disk are intact.
func TestReprotectRounds(t *testing.T) {
	rounds := crashCount(10)
	name := "e2e-rounds"
	l, g := protectedWithDisk(t, name, 34)
	copies := watchCopies(t, g, name, name+"-host-a", name+"-host-b")
	hist := startIncHistory(t, g)
	waitFor(t, "the client to get replies", 30*time.Second, func() bool { return hist.count() > 10 })
	startDiskWriter(t, g, 50) // the copies' disks differ after every crash
	prim, stby, dom := l.a, l.b, name
	var outages []time.Duration
	for round := 1; round <= rounds; round++ {
		crashed := time.Now()
		how := "kill"
		if round%2 == 0 {
			how = "power cut"
			veth := "rmv-" + strings.TrimPrefix(prim.netns, "rm-")
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if out, err := exec.CommandContext(ctx, "ip", "link", "set", veth, "down").CombinedOutput(); err != nil {
				cancel()
				t.Fatalf("link down: %v %s", err, out)
			}
			time.Sleep(100 * time.Millisecond)
			prim.stop(syscall.SIGKILL)
			_, _ = labkit.Virsh(ctx, "destroy", dom)
			_ = exec.CommandContext(ctx, "ip", "link", "set", veth, "up").Run()
			cancel()
		} else {
			prim.stop(syscall.SIGKILL)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, _ = labkit.Virsh(ctx, "destroy", dom)
			cancel()
		}
		waitFor(t, fmt.Sprintf("round %d: %s to be promoted", round, stby.name), 2*time.Minute, func() bool {
			s, ok := stby.status(name)
			return ok && s.State == "failed-over"
		})
		s, _ := stby.status(name)
		n := hist.count()
		waitFor(t, "replies from the promoted guest", time.Minute, func() bool { return hist.count() > n+5 })
		outage := hist.outage(crashed)
		outages = append(outages, outage)
		prim.start() // the crashed host is back
		st := l.waitReprotected(t, name, stby, prim)
		checkIncremental(t, st, 64<<20, true)
		checkGuest(t, g)
		t.Logf("round %d (%s of %s): promoted on %s (%s), client outage %s, re-protected onto %s %s after the crash", round, how, prim.name, stby.name, s.Shell, outage.Round(10*time.Millisecond), prim.name, time.Since(crashed).Round(100*time.Millisecond))
		prim, stby, dom = stby, prim, s.Shell
	}
	hist.check()
	checkOneCopy(t, copies)
	t.Logf("client-observed outages (last reply before the crash to the first after): %v", outages)
}

// TestStandbyRestartResyncsIncrementally: the standby's agent is killed
// while the guest writes its disk and memory; the primary goes on alone
// (its disk relay stands in for the lost mirror) and, when the agent is
// back, resyncs the standby with only the disk blocks and memory pages
// that differ: the replica's page hashes are offered even though the
// primary's tracking never restarted (the disk resync resets the
// replica's epochs, which used to mean a full copy of RAM).
func TestStandbyRestartResyncsIncrementally(t *testing.T) {
	name := "e2e-stby-restart"
	l, g := protectedWithDisk(t, name, 38)
	copies := watchCopies(t, g, name, name+"-host-b")
	hist := startIncHistory(t, g)
	waitFor(t, "the client to get replies", 30*time.Second, func() bool { return hist.count() > 10 })
	startDiskWriter(t, g, 50)
	l.b.stop(syscall.SIGKILL)
	waitFor(t, "the primary to go on without its standby", time.Minute, func() bool {
		s, ok := l.a.status(name)
		return ok && s.State == "unprotected"
	})
	time.Sleep(5 * time.Second) // the copies part further
	l.b.start()
	var s api.VMStatus
	waitFor(t, "the standby resynced", 4*time.Minute, func() bool {
		var ok bool
		s, ok = l.a.status(name)
		return ok && s.State == checkpoint.StateProtected && s.Disk != nil && s.Disk.State == "mirrored"
	})
	ram := uint64(256 << 20 / checkpoint.PageSize)
	if s.SyncPages == 0 || s.SyncPages >= ram/2 {
		t.Errorf("the memory resync after the standby's restart sent %d of %d pages, want only those that differ", s.SyncPages, ram)
	}
	checkIncremental(t, s, 64<<20, true)
	t.Logf("memory resync after the standby's restart: %d of %d pages", s.SyncPages, ram)
	checkGuest(t, g)
	hist.check()
	checkOneCopy(t, copies)
}

// TestReprotectAfterPartition: the primary's host is cut off from
// everyone (its guest's link too) while the guest writes its disk and
// memory. The standby is promoted; the isolated primary pauses its copy,
// and once the link is back it learns it was superseded and destroys the
// copy, keeping its RAM. The new primary re-protects the guest onto it by
// itself, sending only the memory pages and disk blocks that differ from
// that copy. (A crash loses the RAM: TestReprotectRounds re-protects after
// crashes and sends it all.)
func TestReprotectAfterPartition(t *testing.T) {
	name := "e2e-part-reprotect"
	l, g := protectedWithDisk(t, name, 39)
	copies := watchCopies(t, g, name, name+"-host-b")
	hist := startIncHistory(t, g)
	waitFor(t, "the client to get replies", 30*time.Second, func() bool { return hist.count() > 10 })
	startDiskWriter(t, g, 50)
	waitFor(t, "the arbiter to count the standby in sync", time.Minute, func() bool {
		_, inSync, err := l.arbiterGuest(name)
		return err == nil && inSync
	})

	cut := time.Now()
	heal := cutOffHostA(t, name)
	waitFor(t, "the standby to be promoted", 2*time.Minute, func() bool {
		s, ok := l.b.status(name)
		return ok && s.State == "failed-over"
	})
	waitFor(t, "the isolated primary to pause its guest", time.Minute, func() bool {
		return domState(name) == "paused"
	})
	n := hist.count()
	waitFor(t, "replies from the promoted guest", time.Minute, func() bool { return hist.count() > n+5 })
	time.Sleep(5 * time.Second) // the copies part further
	heal()
	healed := time.Now()

	st := l.waitReprotected(t, name, l.b, l.a)
	ram := uint64(256 << 20 / checkpoint.PageSize)
	if st.SyncPages == 0 || st.SyncPages >= ram/2 {
		t.Errorf("re-protect after the partition sent %d of %d memory pages, want only those that differ from the old primary's copy", st.SyncPages, ram)
	}
	checkIncremental(t, st, 64<<20, true)
	t.Logf("cut %s, healed, re-protected onto host-a %s later: %d of %d memory pages sent",
		healed.Sub(cut).Round(100*time.Millisecond), time.Since(healed).Round(100*time.Millisecond), st.SyncPages, ram)
	checkGuest(t, g)
	hist.check()
	checkOneCopy(t, copies)
}

// TestDrainUndrain: draining host A switches its two guests over to B
// (which re-protects them onto A), undraining A brings both home.
func TestDrainUndrain(t *testing.T) {
	needLab(t)
	l := newArbLabWith(t, "reprotect: auto\n")
	names := []string{"e2e-drain1", "e2e-drain2"}
	var gs []*labkit.Guest
	for i, n := range names {
		gs = append(gs, bootGuest(t, n, 35+i, 500))
	}
	l.startArbiter()
	l.a.start()
	l.b.start()
	for _, g := range gs {
		l.enroll(t, g)
	}
	var hists []*incHistory
	for _, g := range gs {
		h := startIncHistory(t, g)
		hists = append(hists, h)
		waitFor(t, "the client to get replies", 30*time.Second, func() bool { return h.count() > 5 })
	}
	out, err := l.a.cli("host", "drain")
	t.Logf("host drain on host-a:\n%s", out)
	if err != nil || strings.Count(out, "switched over from host-a to host-b") != len(names) {
		t.Fatalf("drain: %v", err)
	}
	for _, n := range names {
		if st := domState(n + "-host-b"); st != "running" && st != "paused" { // paused: a checkpoint
			t.Fatalf("%s does not run on host-b after the drain (%s)", n, st)
		}
		l.waitReprotected(t, n, l.b, l.a)
	}
	// A drained host has nothing left to drain.
	if out, err := l.a.cli("host", "drain"); err != nil || !strings.Contains(out, "no guest to drain") {
		t.Fatalf("second drain: %v %s", err, out)
	}
	out, err = l.a.cli("host", "undrain")
	t.Logf("host undrain on host-a:\n%s", out)
	if err != nil || strings.Count(out, "switched over from host-b to host-a") != len(names) {
		t.Fatalf("undrain: %v", err)
	}
	for i, n := range names {
		if st := domState(n + "-host-a"); st != "running" && st != "paused" {
			t.Fatalf("%s does not run on host-a after the undrain (%s)", n, st)
		}
		l.waitReprotected(t, n, l.a, l.b)
		hists[i].check()
		checkGuestMemory(t, gs[i])
	}
}
