// Command bench measures checkpoints of a real lab guest: for each epoch
// interval and dirtying rate it runs two agents (primary and standby on
// loopback), protects the guest, and reads the agents' figures; then, as the
// baseline in the same run, it takes full-RAM migration checkpoints of the
// same guest (x-ignore-shared off) and prints the ratio of pauses.
// Needs root and the lab (test/lab/lab.sh up).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
	"github.com/remora-ha/remora/internal/stats"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
	"github.com/remora-ha/remora/test/labkit"
)

var (
	measure = flag.Duration("measure", 8*time.Second, "measuring time per configuration")
	lowRate = flag.Int("low", 500, "low dirtying rate, pages/s")
	hiRate  = flag.Int("high", 10000, "high dirtying rate, pages/s")
	reps    = flag.Int("baseline-reps", 10, "full-RAM checkpoints for the baseline")
	minIv   = flag.Duration("min-interval", 20*time.Millisecond, "epoch_min_interval of the main table (0: epochs only on the tick)")
)

const guestName = "bench"

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type row struct {
	interval time.Duration
	rate     int
	s        result
}

type result struct {
	p50, p99        time.Duration
	rtt, rttBase    latency // request/response round trip, protected and not
	disk, diskBase  diskFigures
	dirtyPerEpoch   float64
	wirePerEpoch    float64
	compression     float64
	epochsPerSec    float64
	devRaw, devWire float64 // device state per epoch, whole and as sent
	triggered       float64 // share of epochs started by held output
}

func run() error {
	ctx := context.Background()
	if err := labkit.CheckLab(ctx); err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "remora-bench-")
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
	bctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	img := filepath.Join(work, "data.img")
	if err := labkit.CreateDataDisk(img, 64<<20); err != nil {
		cancel()
		return err
	}
	g, err := labkit.Boot(bctx, labkit.GuestOptions{Name: guestName, IP: labkit.GuestIP(30), Rate: -1, DataDisk: img})
	cancel()
	if err != nil {
		return err
	}
	defer labkit.Destroy(guestName)
	defer exec.Command("virsh", "-q", "destroy", guestName+"-b").Run()
	wl, err := g.Dial(ctx)
	if err != nil {
		return err
	}
	defer wl.Close()
	fmt.Printf("guest: %s, 256 MiB, TCG; tracker: %s\n\n", guestName, trackerName())

	standby := startAgent(bin, work, "b", "127.0.0.1:7412", 100*time.Millisecond, 0)
	defer standby.stop()
	if err := standby.wait(); err != nil {
		return err
	}

	var rows []row
	for _, iv := range []time.Duration{25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond} {
		for _, rate := range []int{*lowRate, *hiRate} {
			r, err := measureOne(ctx, bin, work, wl, iv, *minIv, rate)
			if err != nil {
				return fmt.Errorf("interval %s rate %d: %w", iv, rate, err)
			}
			rows = append(rows, row{iv, rate, r})
			fmt.Fprintf(os.Stderr, "measured interval %s rate %d: p50 %s\n", iv, rate, r.p50)
		}
	}
	// Output-triggered epochs against tick-only ones, same run, same guest.
	type pair struct {
		interval      time.Duration
		tick, trigger result
	}
	var pairs []pair
	for _, iv := range []time.Duration{50 * time.Millisecond, 100 * time.Millisecond} {
		pr := pair{interval: iv}
		for _, m := range []time.Duration{0, 20 * time.Millisecond} {
			r, err := measureOne(ctx, bin, work, wl, iv, m, *lowRate)
			if err != nil {
				return fmt.Errorf("interval %s min interval %s: %w", iv, m, err)
			}
			if m == 0 {
				pr.tick = r
			} else {
				pr.trigger = r
			}
		}
		pairs = append(pairs, pr)
		fmt.Fprintf(os.Stderr, "measured output trigger at interval %s\n", iv)
	}
	base, err := baseline(ctx, wl)
	if err != nil {
		return fmt.Errorf("baseline: %w", err)
	}

	fmt.Printf("epoch_min_interval %s (epochs start early while output is held)\n", *minIv)
	fmt.Printf("%-9s %-9s %9s %9s %12s %14s %8s %9s %12s %16s\n", "interval", "dirty/s", "pause p50", "pause p99", "dirty pg/ep", "wire bytes/ep", "compr", "epochs/s", "base/remora", "devstate raw/wire")
	for _, r := range rows {
		fmt.Printf("%-9s %-9d %9s %9s %12.0f %14.0f %7.1fx %9.1f %11.1fx %8.0f/%-7.0f\n", r.interval, r.rate, ms(r.s.p50), ms(r.s.p99),
			r.s.dirtyPerEpoch, r.s.wirePerEpoch, r.s.compression, r.s.epochsPerSec, float64(base.p50)/float64(r.s.p50), r.s.devRaw, r.s.devWire)
	}
	fmt.Printf("\noutput-triggered epochs (epoch_min_interval 20ms) against epochs on the tick only, dirty %d pages/s, same run:\n", *lowRate)
	fmt.Printf("%-9s %12s %12s %12s %12s %12s %12s %10s %10s\n", "interval", "tick p50", "tick p99", "trig p50", "trig p99", "tick ep/s", "trig ep/s", "triggered", "p50 ratio")
	for _, p := range pairs {
		fmt.Printf("%-9s %12s %12s %12s %12s %12.1f %12.1f %9.0f%% %9.2fx\n", p.interval, ms(p.tick.rtt.p50), ms(p.tick.rtt.p99), ms(p.trigger.rtt.p50), ms(p.trigger.rtt.p99),
			p.tick.epochsPerSec, p.trigger.epochsPerSec, 100*p.trigger.triggered, float64(p.tick.rtt.p50)/float64(max(p.trigger.rtt.p50, 1)))
	}
	fmt.Printf("\nrequest/response round trip to the guest (output commit: %s), protected vs unprotected in the same run:\n", outputBackend)
	fmt.Printf("%-9s %-9s %12s %12s %12s %12s %10s\n", "interval", "dirty/s", "rtt p50", "rtt p99", "unprot p50", "unprot p99", "p50 ratio")
	for _, r := range rows {
		fmt.Printf("%-9s %-9d %12s %12s %12s %12s %9.1fx\n", r.interval, r.rate, ms(r.s.rtt.p50), ms(r.s.rtt.p99),
			ms(r.s.rttBase.p50), ms(r.s.rttBase.p99), float64(r.s.rtt.p50)/float64(max(r.s.rttBase.p50, 1)))
	}
	fmt.Printf("\nguest disk writes (4 KiB O_DIRECT, flat out; the disk mirrored to the standby and cut per epoch) protected vs unprotected:\n")
	fmt.Printf("%-9s %-9s %12s %12s %12s %12s %12s %12s %11s\n", "interval", "dirty/s", "writes/s", "lat p50", "lat p99", "unprot w/s", "unprot p50", "unprot p99", "w/s ratio")
	for _, r := range rows {
		fmt.Printf("%-9s %-9d %12.0f %12s %12s %12.0f %12s %12s %10.2fx\n", r.interval, r.rate, r.s.disk.perSec, ms(r.s.disk.p50), ms(r.s.disk.p99),
			r.s.diskBase.perSec, ms(r.s.diskBase.p50), ms(r.s.diskBase.p99), r.s.disk.perSec/max(r.s.diskBase.perSec, 1))
	}
	fmt.Printf("\nbaseline: full-RAM migration checkpoint (stop, migrate all RAM with x-ignore-shared off, cont), %d reps:\n", *reps)
	fmt.Printf("  pause p50 %s  p99 %s  stream %.1f MiB\n", ms(base.p50), ms(base.p99), float64(base.bytes)/(1<<20))
	fmt.Println("base/remora = baseline pause p50 / remora pause p50 (higher is better)")
	return nil
}

func trackerName() string {
	if checkpoint.SoftDirtySupported() {
		return "softdirty"
	}
	return "scan (kernel lacks soft-dirty)"
}

var outputBackend = "qemu filter-redirector"

func ms(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d)/1e6) }

// diskFigures are the guest's disk writer's, flat out: 4 KiB O_DIRECT
// records, each counted once the write returned.
type diskFigures struct {
	perSec   float64
	p50, p99 time.Duration
}

func diskRun(ctx context.Context, wl *labkit.Client, d time.Duration) (diskFigures, error) {
	s0, err := wl.Stats(ctx)
	if err != nil {
		return diskFigures{}, err
	}
	if _, err := wl.Do(ctx, "disk 1000000"); err != nil {
		return diskFigures{}, err
	}
	time.Sleep(d)
	s1, err := wl.Stats(ctx)
	if _, err2 := wl.Do(ctx, "disk 0"); err == nil {
		err = err2
	}
	if err != nil {
		return diskFigures{}, err
	}
	num := func(s labkit.Stats, k string) float64 {
		var v float64
		fmt.Sscan(s.Fields[k], &v)
		return v
	}
	us := func(k string) time.Duration { return time.Duration(num(s1, k)) * time.Microsecond }
	return diskFigures{
		perSec: (num(s1, "disk_records") - num(s0, "disk_records")) / (s1.Uptime - s0.Uptime).Seconds(),
		p50:    us("disk_lat_p50_us"), p99: us("disk_lat_p99_us"),
	}, nil
}

// latency is a round-trip distribution.
type latency struct{ p50, p99 time.Duration }

// roundTrips times request/response exchanges with the guest's workload,
// back to back, for d.
func roundTrips(ctx context.Context, wl *labkit.Client, d time.Duration) (latency, error) {
	var rtts []time.Duration
	for end := time.Now().Add(d); time.Now().Before(end); {
		t := time.Now()
		if _, err := wl.Get(ctx); err != nil {
			return latency{}, err
		}
		rtts = append(rtts, time.Since(t))
	}
	return latency{stats.Percentile(rtts, 50), stats.Percentile(rtts, 99)}, nil
}

func measureOne(ctx context.Context, bin, work string, wl *labkit.Client, iv, minIv time.Duration, rate int) (result, error) {
	// The baseline round trip: the same guest, writer and agents' host,
	// unprotected, just before.
	if err := wl.SetWriterRate(ctx, rate); err != nil {
		return result{}, err
	}
	base, err := roundTrips(ctx, wl, 3*time.Second)
	if err != nil {
		return result{}, err
	}
	diskBase, err := diskRun(ctx, wl, 3*time.Second)
	if err != nil {
		return result{}, err
	}
	if err := wl.SetWriterRate(ctx, 0); err != nil {
		return result{}, err
	}
	a := startAgent(bin, work, "a", "127.0.0.1:7411", iv, minIv)
	defer a.stop()
	if err := a.wait(); err != nil {
		return result{}, err
	}
	c := a.client()
	if err := c.Enroll(ctx, guestName, "127.0.0.1:7412", arbiter.ProbeSpec{}); err != nil {
		return result{}, err
	}
	defer c.Unenroll(ctx, guestName)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		s, err := c.VM(ctx, guestName)
		if err == nil && s.State == checkpoint.StateProtected {
			break
		}
		if time.Now().After(deadline) {
			return result{}, fmt.Errorf("not protected after 3m: %+v %v", s, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := wl.SetWriterRate(ctx, rate); err != nil {
		return result{}, err
	}
	time.Sleep(2 * time.Second)
	s0, err := c.VM(ctx, guestName)
	if err != nil {
		return result{}, err
	}
	t0 := time.Now()
	rtt, err := roundTrips(ctx, wl, *measure)
	if err != nil {
		return result{}, err
	}
	dsk, err := diskRun(ctx, wl, 3*time.Second)
	if err != nil {
		return result{}, err
	}
	s1, err := c.VM(ctx, guestName)
	if err != nil {
		return result{}, err
	}
	el := time.Since(t0)
	epochs := float64(s1.Incremental - s0.Incremental)
	if epochs == 0 {
		return result{}, fmt.Errorf("no epochs in %s", el)
	}
	wire := float64(s1.Bytes - s0.Bytes)
	raw := float64(s1.RawBytes - s0.RawBytes)
	return result{
		p50: s1.PauseP50, p99: s1.PauseP99, rtt: rtt, rttBase: base, disk: dsk, diskBase: diskBase,
		dirtyPerEpoch: float64(s1.DirtyTotal-s0.DirtyTotal) / epochs,
		wirePerEpoch:  wire / epochs,
		compression:   raw / max(wire, 1),
		epochsPerSec:  epochs / el.Seconds(),
		devRaw:        float64(s1.DevStateBytes),
		devWire:       float64(s1.DevStateWire),
		triggered:     float64(s1.OutputTriggered-s0.OutputTriggered) / epochs,
	}, nil
}

type baseResult struct {
	p50, p99 time.Duration
	bytes    int64
}

// baseline takes full-RAM migration checkpoints of the same guest.
func baseline(ctx context.Context, wl *labkit.Client) (baseResult, error) {
	if err := wl.SetWriterRate(ctx, *hiRate); err != nil {
		return baseResult{}, err
	}
	conn, err := virt.Dial(ctx, labkit.LibvirtURI)
	if err != nil {
		return baseResult{}, err
	}
	defer conn.Close()
	g, err := conn.OpenGuest(ctx, guestName)
	if err != nil {
		return baseResult{}, err
	}
	if err := qemu.SetIgnoreShared(context.Background(), g.Mon, false); err != nil {
		return baseResult{}, err
	}
	defer qemu.SetIgnoreShared(context.Background(), g.Mon, true)
	if err := qemu.SetUnlimitedBandwidth(context.Background(), g.Mon); err != nil {
		return baseResult{}, err
	}
	dir, err := os.MkdirTemp("", "remora-bench-sock-")
	if err != nil {
		return baseResult{}, err
	}
	if err := os.Chmod(dir, 0o711); err != nil { // QEMU (libvirt-qemu) reaches the sockets and images in it
		return baseResult{}, err
	}
	defer os.RemoveAll(dir)
	sink, err := qemu.ListenDeviceState(filepath.Join(dir, "full.sock"))
	if err != nil {
		return baseResult{}, err
	}
	defer sink.Close()
	var pauses []time.Duration
	var n int64
	for i := 0; i < *reps; i++ {
		time.Sleep(200 * time.Millisecond)
		start := time.Now()
		if err := qemu.Exec(context.Background(), g.Mon, "stop", nil, nil); err != nil {
			return baseResult{}, err
		}
		n, err = sink.Save(ctx, g, io.Discard)
		if cerr := qemu.Exec(context.Background(), g.Mon, "cont", nil, nil); err == nil {
			err = cerr
		}
		if err != nil {
			return baseResult{}, err
		}
		pauses = append(pauses, time.Since(start))
	}
	return baseResult{p50: stats.Percentile(pauses, 50), p99: stats.Percentile(pauses, 99), bytes: n}, nil
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

type proc struct {
	cmd *exec.Cmd
	dir string
}

func startAgent(bin, work, name, addr string, iv, minIv time.Duration) *proc {
	dir := filepath.Join(work, name)
	os.MkdirAll(dir, 0o755)
	// Mutual TLS, as deployed: one CA for the run.
	ca := filepath.Join(work, "pki")
	if err := pki.InitCA(ca, false); err != nil && !errors.Is(err, pki.ErrCAExists) {
		fatal(err)
	}
	if err := pki.Issue(ca, "bench-"+name); err != nil {
		fatal(err)
	}
	cfg := fmt.Sprintf("agent_id: bench-%s\nlisten: %s\napi_socket: %s/agent.sock\nstate_dir: %s/state\nruntime_dir: %s/run\nepoch_interval: %s\nepoch_min_interval: %s\nshell_suffix: \"-%s\"\nlog_level: warn\ntls_cert: %s\ntls_key: %s\ntls_ca: %s/ca.crt\nboot_dirs: [%s]\n",
		name, addr, dir, dir, dir, iv, minIv, name, pki.CertPath(ca, "bench-"+name), pki.KeyPath(ca, "bench-"+name), ca, labkit.LabDir())
	path := filepath.Join(dir, "agent.yaml")
	os.WriteFile(path, []byte(cfg), 0o644)
	cmd := exec.Command(bin, "agent", "--config", path)
	log, _ := os.Create(filepath.Join(dir, "agent.log"))
	cmd.Stdout, cmd.Stderr = log, log
	_ = cmd.Start()
	return &proc{cmd: cmd, dir: dir}
}

func (p *proc) client() *api.Client { return api.NewClient(filepath.Join(p.dir, "agent.sock")) }

func (p *proc) wait() error {
	for i := 0; i < 100; i++ {
		if _, err := p.client().Status(context.Background()); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	b, _ := os.ReadFile(filepath.Join(p.dir, "agent.log"))
	return fmt.Errorf("agent did not start:\n%s", b)
}

func (p *proc) stop() {
	if p.cmd.Process != nil {
		p.cmd.Process.Signal(os.Interrupt)
		p.cmd.Wait()
	}
}
