// Command failbench crashes a protected lab guest's primary host N times,
// alternating a kill (the agent SIGKILLed and the guest destroyed) and a
// power cut (the host's link down first: no FIN, no RST), and prints how
// long automatic failover took: detection (crash until the standby
// suspects the primary), decision (until the arbiter grants promotion),
// restore (until the guest runs again on the standby) and total (until
// the guest's service answers a client), p50 and p99 per kind. Then, on a
// guest with a 1 GiB disk, planned switchovers back and forth: the
// downtime each reports and the client's longest gap, and the automatic
// re-protect that follows each: its time and bytes (memory and disk).
// Needs root and the lab (test/lab/lab.sh up).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/remora-ha/remora/arbiter/heartbeat"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/stats"
	"github.com/remora-ha/remora/test/labkit"
)

var (
	runs     = flag.Int("n", 6, "crashes (kills and power cuts alternating)")
	switches = flag.Int("switchovers", 6, "planned switchovers (back and forth)")
	diskMiB  = flag.Int("disk", 1024, "data disk of the switchover guest, MiB")
	lease    = flag.Duration("lease", 3*time.Second, "arbiter lease duration")
	hbEvery  = flag.Duration("heartbeat", heartbeat.DefaultInterval, "heartbeat interval (default: the agent's and the arbiter's)")
	hbMissed = flag.Int("missed", heartbeat.DefaultMissed, "heartbeats missed before suspicion")
	diskRate = flag.Int("disk-rate", 50, "disk records (4 KiB) the guest writes per second while its copies are apart")
	outages  = durations{10 * time.Second, 5 * time.Minute}
)

// durations is a comma-separated list of durations as a flag.
type durations []time.Duration

func (d *durations) String() string {
	var parts []string
	for _, v := range *d {
		parts = append(parts, v.String())
	}
	return strings.Join(parts, ",")
}

func (d *durations) Set(s string) error {
	*d = nil
	if s == "" {
		return nil
	}
	for _, part := range strings.Split(s, ",") {
		v, err := time.ParseDuration(strings.TrimSpace(part))
		if err != nil {
			return fmt.Errorf("outage %q: %w (want e.g. 10s,5m)", part, err)
		}
		*d = append(*d, v)
	}
	return nil
}

func main() {
	flag.Var(&outages, "outages", "how long the copies stay apart before each resync measured (empty: none)")
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "failbench:", err)
		os.Exit(1)
	}
}

type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func start(ns, log string, args ...string) (*proc, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	f, err := os.Create(log)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); f.Close(); close(p.done) }()
	return p, nil
}

func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

func run() error {
	ctx := context.Background()
	if err := labkit.CheckLab(ctx); err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "remora-failbench-")
	if err != nil {
		return err
	}
	if err := os.Chmod(work, 0o711); err != nil { // QEMU (libvirt-qemu) reaches the sockets and images in it
		return err
	}
	if os.Getenv("FAILBENCH_KEEP") == "" {
		defer os.RemoveAll(work)
	}
	bin, err := labkit.BuildRemora(work)
	if err != nil {
		return err
	}
	pkiDir := filepath.Join(work, "pki")
	for _, args := range [][]string{{"certs", "init", pkiDir},
		{"certs", "issue", "arbiter", "--dir", pkiDir, "--ip", labkit.IPArbiter},
		{"certs", "issue", "host-a", "--dir", pkiDir}, {"certs", "issue", "host-b", "--dir", pkiDir}} {
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			return fmt.Errorf("%v: %v %s", args, err, out)
		}
	}
	arbAddr := labkit.IPArbiter + ":7410"
	arbCfg := filepath.Join(work, "arbiter.yaml")
	os.WriteFile(arbCfg, []byte(fmt.Sprintf("listen: %s\nstate_dir: %s\ntls:\n  cert: %s/arbiter.crt\n  key: %s/arbiter.key\n  ca: %s/ca.crt\nlease_duration: %s\nheartbeat:\n  interval: %s\n  missed: %d\nprobe:\n  interval: 250ms\n  timeout: 200ms\nlog_level: warn\n",
		arbAddr, filepath.Join(work, "arb"), pkiDir, pkiDir, pkiDir, *lease, *hbEvery, *hbMissed)), 0o644)
	arb, err := start(labkit.NetnsArbiter, filepath.Join(work, "arbiter.log"), bin, "arbiter", "--config", arbCfg)
	if err != nil {
		return err
	}
	defer arb.kill()
	reprotect := "manual" // each crash has its own guest, unenrolled after
	logLevel := "warn"
	agentCfg := func(name, ip string) string {
		dir := filepath.Join(work, name)
		os.MkdirAll(dir, 0o755)
		p := filepath.Join(dir, "agent.yaml")
		os.WriteFile(p, []byte(fmt.Sprintf("agent_id: %s\nlisten: %s:7400\napi_socket: %s/agent.sock\nstate_dir: %s/state\nruntime_dir: %s/run\nshell_suffix: \"-%s\"\narbiter: %s\ntls_cert: %s/%s.crt\ntls_key: %s/%s.key\ntls_ca: %s/ca.crt\nheartbeat_interval: %s\nheartbeat_missed: %d\nlog_level: %s\nboot_dirs: [%s]\nreprotect: %s\n",
			name, ip, dir, dir, dir, name, arbAddr, pkiDir, name, pkiDir, name, pkiDir, *hbEvery, *hbMissed, logLevel, labkit.LabDir(), reprotect)), 0o644)
		return p
	}
	cfgA, cfgB := agentCfg("host-a", labkit.IPA), agentCfg("host-b", labkit.IPB)
	b, err := start(labkit.NetnsB, filepath.Join(work, "b.log"), bin, "agent", "--config", cfgB)
	if err != nil {
		return err
	}
	defer b.kill()
	clientA := api.NewClient(filepath.Join(work, "host-a", "agent.sock"))
	clientB := api.NewClient(filepath.Join(work, "host-b", "agent.sock"))

	type figures struct{ detect, decide, restore, total []time.Duration }
	byKind := map[string]*figures{"kill": {}, "power cut": {}}
	for i := 0; i < *runs; i++ {
		kind := "kill"
		if i%2 == 1 {
			kind = "power cut"
		}
		f := byKind[kind]
		name := fmt.Sprintf("failbench-%d", i)
		g, err := labkit.Boot(ctx, labkit.GuestOptions{Name: name, IP: labkit.GuestIP(40 + i%10)})
		if err != nil {
			return err
		}
		a, err := start(labkit.NetnsA, filepath.Join(work, fmt.Sprintf("a-%d.log", i)), bin, "agent", "--config", cfgA)
		if err != nil {
			return err
		}
		if err := waitFor(60*time.Second, func() bool { _, err := clientA.Status(ctx); return err == nil }); err != nil {
			return fmt.Errorf("agent A: %w", err)
		}
		out, err := exec.Command("ip", "netns", "exec", labkit.NetnsA, bin, "--config", cfgA, "vm", "enroll", name,
			"--standby", labkit.IPB+":7400", "--probe", fmt.Sprintf("line:%s:%d:get:", g.IP, labkit.GuestPort)).CombinedOutput()
		if err != nil {
			return fmt.Errorf("enroll: %v\n%s", err, out)
		}
		// In sync at the arbiter: wait a few renewals past protection.
		if err := waitFor(time.Minute, func() bool {
			st, _ := clientA.VM(ctx, name)
			return st.State == checkpoint.StateProtected && st.LeaseHolder == "host-a"
		}); err != nil {
			return err
		}
		time.Sleep(3 * time.Second)

		// The client probes from the crash on, in short attempts: a SYN lost
		// while no copy serves would otherwise wait out TCP's one-second
		// retry, whatever the failover took. Only an attempt begun after
		// the crash counts (the crashed copy holds its output).
		crash := time.Now()
		answeredc := make(chan time.Time, 1)
		pctx, stopProbe := context.WithTimeout(ctx, 2*time.Minute)
		go func() {
			defer close(answeredc)
			for pctx.Err() == nil {
				cctx, cancel := context.WithTimeout(pctx, 300*time.Millisecond)
				c, err := labkit.DialContext(cctx, g.Addr())
				if err == nil {
					_, err = c.Get(cctx)
					c.Close()
				}
				cancel()
				if err == nil {
					answeredc <- time.Now()
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
		if kind == "power cut" {
			exec.Command("ip", "link", "set", "rmv-a", "down").Run() // no FIN, no RST
			time.Sleep(100 * time.Millisecond)
		}
		a.kill()
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		labkit.Virsh(dctx, "destroy", name)
		cancel()
		exec.Command("ip", "link", "set", "rmv-a", "up").Run()
		answered, ok := <-answeredc
		stopProbe()
		if !ok {
			return fmt.Errorf("guest never answered within 2 minutes after crash %d", i)
		}
		var st api.VMStatus
		if err := waitFor(30*time.Second, func() bool {
			st, _ = clientB.VM(ctx, name)
			return !st.RestoredAt.IsZero()
		}); err != nil {
			return err
		}
		f.detect = append(f.detect, st.SuspectedAt.Sub(crash))
		f.decide = append(f.decide, st.GrantedAt.Sub(st.SuspectedAt))
		f.restore = append(f.restore, st.RestoredAt.Sub(st.GrantedAt))
		f.total = append(f.total, answered.Sub(crash))
		fmt.Fprintf(os.Stderr, "%s %d: detect %s decide %s restore %s total %s\n", kind, i, st.SuspectedAt.Sub(crash), st.GrantedAt.Sub(st.SuspectedAt), st.RestoredAt.Sub(st.GrantedAt), answered.Sub(crash))
		labkit.Destroy(name + "-host-b")
		labkit.Destroy(name)
		clientB.Unenroll(ctx, name)
	}
	fmt.Printf("automatic failover, %d crashes of the primary host: kill (agent SIGKILLed, guest destroyed) and power cut (link down first)\n", *runs)
	fmt.Printf("heartbeat %s x %d missed (suspicion after %s), lease %s, arbiter probes every 250ms\n\n", *hbEvery, *hbMissed, *hbEvery*time.Duration(*hbMissed), *lease)
	fmt.Printf("%-10s %-10s %10s %10s\n", "crash", "phase", "p50", "p99")
	for _, kind := range []string{"kill", "power cut"} {
		f := byKind[kind]
		for _, r := range []struct {
			name string
			d    []time.Duration
		}{{"detection", f.detect}, {"decision", f.decide}, {"restore", f.restore}, {"total", f.total}} {
			fmt.Printf("%-10s %-10s %10s %10s\n", kind, r.name, stats.Percentile(r.d, 50).Round(time.Millisecond), stats.Percentile(r.d, 99).Round(time.Millisecond))
		}
	}
	fmt.Println("\ndetection: a kill resets the replication connection, a power cut is found by missed heartbeats.")
	fmt.Println("decision: the arbiter grants once it has lost the primary's agent too (its heartbeats), else when the lease runs out.")
	b.kill()
	logLevel = "info" // the switchovers' steps, timed in the agents' logs
	if *switches == 0 && len(outages) == 0 {
		return nil
	}
	return switchBench(ctx, bin, work, agentCfg, &reprotect)
}

func waitFor(d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s", d)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// switchBench switches one guest back and forth between the hosts and
// measures each switchover and the automatic re-protect that follows it.
func switchBench(ctx context.Context, bin, work string, agentCfg func(name, ip string) string, reprotect *string) error {
	*reprotect = "auto"
	for _, h := range []string{"host-a", "host-b"} {
		os.RemoveAll(filepath.Join(work, h, "state"))
	}
	cfgs := map[string]string{"host-a": agentCfg("host-a", labkit.IPA), "host-b": agentCfg("host-b", labkit.IPB)}
	clients := map[string]*api.Client{}
	procs := map[string]*proc{}
	netns := map[string]string{"host-a": labkit.NetnsA, "host-b": labkit.NetnsB}
	startAgent := func(h string) error {
		p, err := start(netns[h], filepath.Join(work, fmt.Sprintf("%s-switch-%d.log", h, time.Now().UnixNano())), bin, "agent", "--config", cfgs[h])
		if err != nil {
			return err
		}
		procs[h] = p
		clients[h] = api.NewClient(filepath.Join(work, h, "agent.sock"))
		c := clients[h]
		if err := waitFor(60*time.Second, func() bool { _, err := c.Status(ctx); return err == nil }); err != nil {
			return fmt.Errorf("agent %s: %w", h, err)
		}
		return nil
	}
	defer func() {
		for _, p := range procs {
			p.kill()
		}
	}()
	for _, h := range []string{"host-a", "host-b"} {
		if err := startAgent(h); err != nil {
			return err
		}
	}
	const name = "switchbench"
	img := filepath.Join(work, "switch.img")
	if err := labkit.CreateDataDisk(img, int64(*diskMiB)<<20); err != nil {
		return err
	}
	g, err := labkit.Boot(ctx, labkit.GuestOptions{Name: name, IP: labkit.GuestIP(49), DataDisk: img})
	if err != nil {
		return err
	}
	defer func() {
		for _, d := range []string{name, name + "-host-a", name + "-host-b"} {
			labkit.Destroy(d)
		}
	}()
	out, err := exec.Command("ip", "netns", "exec", labkit.NetnsA, bin, "--config", cfgs["host-a"], "vm", "enroll", name,
		"--standby", labkit.IPB+":7400", "--timeout", "10m", "--probe", fmt.Sprintf("line:%s:%d:get:", g.IP, labkit.GuestPort)).CombinedOutput()
	if err != nil {
		return fmt.Errorf("enroll: %v\n%s", err, out)
	}
	// A client asking the guest back to back: its longest gap per move.
	var mu sync.Mutex
	var replies []time.Time
	stop := make(chan struct{})
	go func() {
		var c *labkit.Client
		for {
			select {
			case <-stop:
				return
			default:
			}
			if c == nil {
				if c, err = labkit.DialContext(ctx, g.Addr()); err != nil {
					c = nil
					time.Sleep(20 * time.Millisecond)
					continue
				}
			}
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_, err := c.Get(cctx)
			cancel()
			if err != nil {
				c.Close()
				c = nil
				continue
			}
			mu.Lock()
			replies = append(replies, time.Now())
			mu.Unlock()
			time.Sleep(10 * time.Millisecond)
		}
	}()
	defer close(stop)
	gapSince := func(t time.Time) time.Duration {
		mu.Lock()
		defer mu.Unlock()
		var gap time.Duration
		for i := 1; i < len(replies); i++ {
			if replies[i].After(t) {
				from := replies[i-1]
				if from.Before(t) {
					from = t
				}
				gap = max(gap, replies[i].Sub(from))
			}
		}
		return gap
	}
	var downtime, gaps, reprotectTime []time.Duration
	var memBytes, diskBytes []float64
	from, to := "host-a", "host-b"
	for i := 0; i < *switches; i++ {
		var res api.SwitchoverResult
		t0 := time.Now()
		// Refused until the arbiter counts the standby in sync.
		if err := waitFor(5*time.Minute, func() bool {
			res, err = clients[from].Switchover(ctx, name)
			if err != nil {
				time.Sleep(500 * time.Millisecond)
			}
			return err == nil
		}); err != nil {
			return fmt.Errorf("switchover %d from %s: %v (%w)", i, from, err, err)
		}
		moved := time.Now()
		time.Sleep(time.Second) // replies from the new primary
		gap := gapSince(t0)
		var st api.VMStatus
		if err := waitFor(10*time.Minute, func() bool {
			st, _ = clients[to].VM(ctx, name)
			return st.Role == api.RolePrimary && st.State == checkpoint.StateProtected && st.Disk != nil && st.Disk.State == "mirrored"
		}); err != nil {
			return fmt.Errorf("re-protect after switchover %d: %w (%+v)", i, err, st)
		}
		downtime = append(downtime, res.Downtime)
		gaps = append(gaps, gap)
		reprotectTime = append(reprotectTime, time.Since(moved))
		memBytes = append(memBytes, float64(st.Bytes))
		if st.Disk != nil {
			diskBytes = append(diskBytes, float64(st.Disk.LastResyncBytes))
		}
		fmt.Fprintf(os.Stderr, "switchover %d %s -> %s: downtime %s, client gap %s, re-protected in %s (%.0f MiB sent, disk copy %.0f MiB)\n",
			i, from, to, res.Downtime.Round(time.Millisecond), gap.Round(time.Millisecond), time.Since(moved).Round(100*time.Millisecond),
			float64(st.Bytes)/(1<<20), float64(st.Disk.LastResyncBytes)/(1<<20))
		from, to = to, from
	}
	fmt.Printf("\nplanned switchovers of a 256 MiB guest with a %d MiB disk, back and forth, %d times (reprotect: auto):\n", *diskMiB, *switches)
	fmt.Printf("%-34s %10s %10s\n", "", "p50", "p99")
	for _, r := range []struct {
		name string
		d    []time.Duration
	}{{"downtime (pause to running there)", downtime}, {"client's longest gap", gaps}, {"re-protect (to protected, mirrored)", reprotectTime}} {
		fmt.Printf("%-34s %10s %10s\n", r.name, stats.Percentile(r.d, 50).Round(time.Millisecond), stats.Percentile(r.d, 99).Round(time.Millisecond))
	}
	fmt.Printf("re-protect sends (median): %.0f MiB of memory on the wire (pages that differ from the old copy's, lz4) and %.0f MiB of disk (blocks that differ); a full resync is %d MiB of RAM and %d MiB of disk\n",
		median(memBytes)/(1<<20), median(diskBytes)/(1<<20), 256, *diskMiB)
	if len(outages) == 0 {
		return nil
	}
	return outageBench(ctx, g, name, from, to, startAgent, procs, clients)
}

// outageBench parts the copies of a protected guest for each of the
// outages while the guest writes its disk and dirties memory, and measures
// the resync that follows: a standby agent down that long and restarted,
// a primary host crashed, failed over, and back that long after (the
// automatic re-protect), and a primary host cut off that long.
func outageBench(ctx context.Context, g *labkit.Guest, name, primary, standby string, startAgent func(string) error, procs map[string]*proc, clients map[string]*api.Client) error {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	c, err := labkit.DialContext(cctx, g.Addr())
	if err == nil {
		var reply string
		reply, err = c.Do(cctx, fmt.Sprintf("disk %d", *diskRate))
		if err == nil && !strings.HasPrefix(reply, "ok") {
			err = fmt.Errorf("guest answered %q", reply)
		}
		c.Close()
	}
	cancel()
	if err != nil {
		return fmt.Errorf("start the guest's disk writer: %w", err)
	}
	type row struct {
		kind   string
		apart  time.Duration
		took   time.Duration
		memory uint64 // pages sent by the memory resync
		disk   int64
	}
	var rows []row
	// resynced waits until the guest is protected and mirrored again on
	// its primary and returns what that took.
	resynced := func(h string, since time.Time) (api.VMStatus, time.Duration, error) {
		var st api.VMStatus
		err := waitFor(15*time.Minute, func() bool {
			st, _ = clients[h].VM(ctx, name)
			return st.Role == api.RolePrimary && st.State == checkpoint.StateProtected && st.Disk != nil && st.Disk.State == "mirrored"
		})
		return st, time.Since(since), err
	}
	// measure waits for the resync onto h and records what it sent.
	measure := func(kind, h string, apart time.Duration, since time.Time) error {
		st, took, err := resynced(h, since)
		if err != nil {
			return fmt.Errorf("%s %s apart: %w (%+v)", kind, apart, err, st)
		}
		rows = append(rows, row{kind, apart, took, st.SyncPages, st.Disk.LastResyncBytes})
		fmt.Fprintf(os.Stderr, "%s %s apart: resynced in %s, %d pages, %d KiB of disk\n", kind, apart, took.Round(100*time.Millisecond), st.SyncPages, st.Disk.LastResyncBytes>>10)
		return nil
	}
	for _, apart := range outages {
		// The standby's agent killed, restarted after apart.
		procs[standby].kill()
		delete(procs, standby)
		time.Sleep(apart)
		back := time.Now()
		if err := startAgent(standby); err != nil {
			return err
		}
		if err := measure("standby restart", primary, apart, back); err != nil {
			return err
		}

		// The primary host crashed (agent killed, guest destroyed): the
		// standby takes over; the old primary's agent is back apart later
		// and is re-protected automatically.
		// In sync at the arbiter: a few renewals past protection.
		time.Sleep(3 * time.Second)
		dom := name
		if s, err := clients[primary].VM(ctx, name); err == nil && s.Domain != "" {
			dom = s.Domain
		}
		procs[primary].kill()
		delete(procs, primary)
		labkit.Destroy(dom)
		if err := waitFor(2*time.Minute, func() bool {
			s, _ := clients[standby].VM(ctx, name)
			return s.State == "failed-over"
		}); err != nil {
			return fmt.Errorf("failover after the crash: %w", err)
		}
		time.Sleep(apart)
		back = time.Now()
		if err := startAgent(primary); err != nil {
			return err
		}
		if err := measure("re-protect after a crash", standby, apart, back); err != nil {
			return err
		}
		primary, standby = standby, primary

		// The (new) primary's host cut off from everyone, its guest's
		// link too: the standby takes over, the isolated copy pauses;
		// apart later the links are back, the old primary learns it was
		// superseded and keeps its copy's RAM as the resync's base.
		time.Sleep(3 * time.Second)
		dom = name
		if s, err := clients[primary].VM(ctx, name); err == nil && s.Domain != "" {
			dom = s.Domain
		}
		tap := labkit.DomainTap(dom)
		veth := map[string]string{"host-a": "rmv-a", "host-b": "rmv-b"}[primary]
		links := []string{veth, tap}
		for _, l := range links {
			if out, err := exec.Command("ip", "link", "set", l, "down").CombinedOutput(); err != nil {
				return fmt.Errorf("cut %s off: link %s down: %v %s", primary, l, err, out)
			}
		}
		err := waitFor(2*time.Minute, func() bool {
			s, _ := clients[standby].VM(ctx, name)
			return s.State == "failed-over"
		})
		if err == nil {
			time.Sleep(apart)
		}
		back = time.Now()
		for _, l := range links {
			exec.Command("ip", "link", "set", l, "up").Run()
		}
		if err != nil {
			return fmt.Errorf("failover after cutting %s off: %w", primary, err)
		}
		if err := measure("re-protect after a partition", standby, apart, back); err != nil {
			return err
		}
		primary, standby = standby, primary
	}
	fmt.Printf("\nresync after the copies parted, the guest writing %d disk records/s (4 KiB, over its first 16 MiB) and dirtying memory; full resync: 256 MiB of RAM, %d MiB of disk\n", *diskRate, *diskMiB)
	fmt.Printf("%-28s %8s %10s %12s %12s %10s\n", "", "apart", "took", "memory MiB", "disk MiB", "of full")
	for _, r := range rows {
		mem := float64(r.memory*checkpoint.PageSize) / (1 << 20)
		disk := float64(r.disk) / (1 << 20)
		fmt.Printf("%-28s %8s %10s %12.1f %12.1f %9.1f%%\n", r.kind, r.apart, r.took.Round(100*time.Millisecond), mem, disk, 100*(mem+disk)/float64(256+*diskMiB))
	}
	return nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
