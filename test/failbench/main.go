// Command failbench crashes a protected lab guest's primary host N times
// and prints how long automatic failover took: detection (crash until the
// standby suspects the primary), decision (until the arbiter grants
// promotion), restore (until the guest runs again on the standby) and total
// (until the guest's service answers a client), p50 and p99.
// Needs root and the lab (test/lab/lab.sh up).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/stats"
	"github.com/remora-ha/remora/test/labkit"
)

var (
	runs     = flag.Int("n", 5, "crashes")
	lease    = flag.Duration("lease", 3*time.Second, "arbiter lease duration")
	hbEvery  = flag.Duration("heartbeat", 250*time.Millisecond, "heartbeat interval")
	hbMissed = flag.Int("missed", 4, "heartbeats missed before suspicion")
)

func main() {
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
	defer os.RemoveAll(work)
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
	agentCfg := func(name, ip string) string {
		dir := filepath.Join(work, name)
		os.MkdirAll(dir, 0o755)
		p := filepath.Join(dir, "agent.yaml")
		os.WriteFile(p, []byte(fmt.Sprintf("agent_id: %s\nlisten: %s:7400\napi_socket: %s/agent.sock\nstate_dir: %s/state\nruntime_dir: %s/run\nshell_suffix: \"-%s\"\narbiter: %s\ntls_cert: %s/%s.crt\ntls_key: %s/%s.key\ntls_ca: %s/ca.crt\nheartbeat_interval: %s\nheartbeat_missed: %d\nlog_level: warn\nboot_dirs: [%s]\n",
			name, ip, dir, dir, dir, name, arbAddr, pkiDir, name, pkiDir, name, pkiDir, *hbEvery, *hbMissed, labkit.LabDir())), 0o644)
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

	var detect, decide, restore, total []time.Duration
	for i := 0; i < *runs; i++ {
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

		crash := time.Now()
		a.kill()
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		labkit.Virsh(dctx, "destroy", name)
		cancel()
		var answered time.Time
		if err := waitFor(2*time.Minute, func() bool {
			c, err := labkit.DialContext(ctx, g.Addr())
			if err != nil {
				return false
			}
			defer c.Close()
			cctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			if _, err := c.Get(cctx); err != nil {
				return false
			}
			answered = time.Now()
			return true
		}); err != nil {
			return fmt.Errorf("guest never answered after crash %d: %w", i, err)
		}
		var st api.VMStatus
		if err := waitFor(30*time.Second, func() bool {
			st, _ = clientB.VM(ctx, name)
			return !st.RestoredAt.IsZero()
		}); err != nil {
			return err
		}
		detect = append(detect, st.SuspectedAt.Sub(crash))
		decide = append(decide, st.GrantedAt.Sub(st.SuspectedAt))
		restore = append(restore, st.RestoredAt.Sub(st.GrantedAt))
		total = append(total, answered.Sub(crash))
		fmt.Fprintf(os.Stderr, "crash %d: detect %s decide %s restore %s total %s\n", i, detect[i], decide[i], restore[i], total[i])
		dctx, cancel = context.WithTimeout(ctx, 30*time.Second)
		labkit.Virsh(dctx, "destroy", name+"-host-b")
		cancel()
		labkit.Destroy(name)
		clientB.Unenroll(ctx, name)
	}
	fmt.Printf("automatic failover, %d crashes of the primary host (agent SIGKILLed, guest destroyed)\n", *runs)
	fmt.Printf("heartbeat %s x %d missed (suspicion after %s), lease %s, arbiter probes every 250ms\n\n", *hbEvery, *hbMissed, *hbEvery*time.Duration(*hbMissed), *lease)
	fmt.Printf("%-10s %10s %10s\n", "phase", "p50", "p99")
	for _, r := range []struct {
		name string
		d    []time.Duration
	}{{"detection", detect}, {"decision", decide}, {"restore", restore}, {"total", total}} {
		fmt.Printf("%-10s %10s %10s\n", r.name, stats.Percentile(r.d, 50).Round(time.Millisecond), stats.Percentile(r.d, 99).Round(time.Millisecond))
	}
	fmt.Println("\ndecision waits for the primary's lease to run out: the lease bounds failover time.")
	return nil
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
