// Command bench measures checkpoints of real lab guests. For each guest
// size and dirtying rate it runs two agents (primary and standby on
// loopback), protects the guest and reads the agents' figures: pause and
// its breakdown, dirty pages, wire bytes against the lz4 of the dirty
// pages alone, epochs/s. Beside them in the same run: the device-state
// save as it was (QMP stop, migrate, query-migrate, cont) against the
// migration stopping the guest itself, and a full-RAM migration checkpoint
// of the same guest. Then, on the 256 MiB guest: epoch intervals, the
// highest epoch rate, output-triggered epochs, round trips, guest disk
// writes and an HTTP server under load, protected against unprotected.
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
	"regexp"
	"strconv"
	"strings"
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
	measure  = flag.Duration("measure", 8*time.Second, "measuring time per configuration")
	sizes    = flag.String("sizes", "256,1024,4096", "guest RAM sizes in MiB for the size table (empty: no size table)")
	rates    = flag.String("rates", "500,5000", "dirtying rates in pages/s for the size table")
	sizeIv   = flag.Duration("interval", 50*time.Millisecond, "epoch_interval of the size table")
	lowRate  = flag.Int("low", 500, "low dirtying rate of the 256 MiB tables, pages/s")
	hiRate   = flag.Int("high", 5000, "high dirtying rate of the 256 MiB tables, pages/s")
	reps     = flag.Int("baseline-reps", 5, "full-RAM checkpoints for the baseline")
	devReps  = flag.Int("devstate-reps", 20, "device-state saves each way for the comparison")
	minIv    = flag.Duration("min-interval", 20*time.Millisecond, "epoch_min_interval (0: epochs only on the tick)")
	skipMain = flag.Bool("sizes-only", false, "only the size table")
)

const standbyAddr = "127.0.0.1:7412"

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type result struct {
	p50, p99        time.Duration
	breakdown       checkpoint.PauseBreakdown // each step's median
	rtt, rttBase    latency                   // request/response round trip, protected and not
	disk, diskBase  diskFigures
	dirtyPerEpoch   float64
	wirePerEpoch    float64
	pageWirePerEp   float64 // of wirePerEpoch, page batches (lz4 of the dirty pages)
	compression     float64
	epochsPerSec    float64
	devRaw, devWire float64 // device state per epoch, whole and as sent
	triggered       float64 // share of epochs started by held output
}

// what measureOne measures besides the agents' figures.
type extras struct {
	rtt, disk bool
}

type bench struct {
	bin, work string
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
	b := &bench{bin: bin, work: work}
	fmt.Printf("tracker: %s; guests under TCG; 2 shared cores\n\n", trackerName())

	standby := startAgent(bin, work, "b", standbyAddr, 100*time.Millisecond, 0)
	defer standby.stop()
	if err := standby.wait(); err != nil {
		return err
	}
	if err := b.sizeTable(ctx); err != nil {
		return err
	}
	if *skipMain {
		return nil
	}
	return b.mainTables(ctx)
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return nil, fmt.Errorf("%q: %w", s, err)
		}
		out = append(out, n)
	}
	return out, nil
}

// bootGuest boots a lab guest with a 64 MiB data disk.
func (b *bench) bootGuest(ctx context.Context, name string, ip, mib int) (*labkit.Guest, *labkit.Client, error) {
	bctx, cancel := context.WithTimeout(ctx, 6*time.Minute)
	defer cancel()
	img := filepath.Join(b.work, name+".img")
	if err := labkit.CreateDataDisk(img, 64<<20); err != nil {
		return nil, nil, err
	}
	g, err := labkit.Boot(bctx, labkit.GuestOptions{Name: name, IP: labkit.GuestIP(ip), Rate: -1, DataDisk: img, MemoryMiB: mib})
	if err != nil {
		return nil, nil, err
	}
	wl, err := g.Dial(ctx)
	if err != nil {
		labkit.Destroy(name)
		return nil, nil, err
	}
	return g, wl, nil
}

func dropGuest(name string) {
	labkit.Destroy(name)
	exec.Command("virsh", "-q", "destroy", name+"-b").Run()
	exec.Command("virsh", "-q", "undefine", name+"-b").Run()
}

type sizeRow struct {
	mib, rate int
	r         result
}

type sizeExtra struct {
	mib            int
	old, new       time.Duration // device-state save pause p50: QMP stop first, or the migration stopping the guest
	oldP99, newP99 time.Duration
	base           baseResult
}

// sizeTable: pause, breakdown and bytes per guest size and dirtying rate,
// with the device-state comparison and the full-RAM baseline per size.
func (b *bench) sizeTable(ctx context.Context) error {
	if *sizes == "" {
		return nil
	}
	ms, err := parseInts(*sizes)
	if err != nil {
		return err
	}
	rs, err := parseInts(*rates)
	if err != nil {
		return err
	}
	var rows []sizeRow
	var ex []sizeExtra
	for i, mib := range ms {
		name := fmt.Sprintf("bench-%d", mib)
		g, wl, err := b.bootGuest(ctx, name, 40+i, mib)
		if err != nil {
			return fmt.Errorf("%d MiB guest: %w", mib, err)
		}
		fmt.Fprintf(os.Stderr, "booted %s (%d MiB) in %s\n", name, mib, g.BootTime.Round(time.Second))
		for _, rate := range rs {
			r, err := b.measureOne(ctx, name, wl, *sizeIv, *minIv, rate, extras{})
			if err != nil {
				wl.Close()
				dropGuest(name)
				return fmt.Errorf("%d MiB, %d pages/s: %w", mib, rate, err)
			}
			rows = append(rows, sizeRow{mib, rate, r})
			fmt.Fprintf(os.Stderr, "measured %d MiB at %d pages/s: pause p50 %s\n", mib, rate, ms1(r.p50))
		}
		e := sizeExtra{mib: mib}
		err = wl.SetWriterRate(ctx, rs[len(rs)-1])
		if err == nil {
			e.old, e.oldP99, e.new, e.newP99, err = devStateCompare(ctx, name, b.work, *devReps)
		}
		if err == nil {
			e.base, err = baseline(ctx, name, b.work, max(2, *reps*256/max(mib, 256)))
		}
		wl.Close()
		dropGuest(name)
		if err != nil {
			return fmt.Errorf("%d MiB: %w", mib, err)
		}
		ex = append(ex, e)
	}
	fmt.Printf("pause by guest size and dirtying rate (epoch_interval %s, epoch_min_interval %s); breakdown: each step's median\n", *sizeIv, *minIv)
	fmt.Printf("%-6s %-7s %9s %9s | %7s %7s %7s %7s %8s %7s | %9s %11s %11s %10s %8s\n", "RAM", "dirty/s", "pause p50", "pause p99",
		"stop", "cut", "track", "copy", "devstate", "cont", "dirty/ep", "wire B/ep", "pages B/ep", "wire/pages", "epochs/s")
	for _, r := range rows {
		bd := r.r.breakdown
		fmt.Printf("%-6s %-7d %9s %9s | %7s %7s %7s %7s %8s %7s | %9.0f %11.0f %11.0f %9.2fx %8.1f\n", mibName(r.mib), r.rate, ms1(r.r.p50), ms1(r.r.p99),
			ms1(bd.Stop), ms1(bd.Cut), ms1(bd.Track), ms1(bd.Copy), ms1(bd.DevState), ms1(bd.Cont),
			r.r.dirtyPerEpoch, r.r.wirePerEpoch, r.r.pageWirePerEp, r.r.wirePerEpoch/max(r.r.pageWirePerEp, 1), r.r.epochsPerSec)
	}
	fmt.Printf("\ndevice-state save alone, same guest and run (%d each way, alternating): the pause with QMP stop, migrate,\n", *devReps)
	fmt.Printf("query-migrate and cont (before) against the migration stopping the guest itself and cont (now); and a\n")
	fmt.Printf("full-RAM migration checkpoint (stop, migrate all RAM with x-ignore-shared off, cont):\n")
	fmt.Printf("%-6s %12s %12s %12s %12s %9s | %13s %13s %11s\n", "RAM", "before p50", "before p99", "now p50", "now p99", "ratio", "full-RAM p50", "full-RAM p99", "stream MiB")
	for _, e := range ex {
		fmt.Printf("%-6s %12s %12s %12s %12s %8.1fx | %13s %13s %11.1f\n", mibName(e.mib), ms1(e.old), ms1(e.oldP99), ms1(e.new), ms1(e.newP99),
			float64(e.old)/float64(max(e.new, 1)), ms1(e.base.p50), ms1(e.base.p99), float64(e.base.bytes)/(1<<20))
	}
	fmt.Println()
	return nil
}

func mibName(mib int) string {
	if mib%1024 == 0 {
		return fmt.Sprintf("%dG", mib/1024)
	}
	return fmt.Sprintf("%dM", mib)
}

// mainTables are the 256 MiB guest's: intervals, the highest epoch rate,
// output-triggered epochs, round trips, disk writes, HTTP under load.
func (b *bench) mainTables(ctx context.Context) error {
	const name = "bench"
	_, wl, err := b.bootGuest(ctx, name, 30, 256)
	if err != nil {
		return err
	}
	defer dropGuest(name)
	defer wl.Close()

	type row struct {
		interval time.Duration
		rate     int
		s        result
	}
	var rows []row
	for _, iv := range []time.Duration{25 * time.Millisecond, 100 * time.Millisecond} {
		for _, rate := range []int{*lowRate, *hiRate} {
			r, err := b.measureOne(ctx, name, wl, iv, *minIv, rate, extras{rtt: true, disk: true})
			if err != nil {
				return fmt.Errorf("interval %s rate %d: %w", iv, rate, err)
			}
			rows = append(rows, row{iv, rate, r})
			fmt.Fprintf(os.Stderr, "measured interval %s rate %d: p50 %s\n", iv, rate, r.p50)
		}
	}
	// The highest sustained epoch rate: the shortest interval the agent
	// takes (5 ms), so that an epoch starts as soon as the last one is
	// captured and max_in_flight allows.
	var fastest []row
	for _, rate := range []int{*lowRate, *hiRate} {
		r, err := b.measureOne(ctx, name, wl, 5*time.Millisecond, 0, rate, extras{})
		if err != nil {
			return fmt.Errorf("highest epoch rate: %w", err)
		}
		fastest = append(fastest, row{5 * time.Millisecond, rate, r})
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
			r, err := b.measureOne(ctx, name, wl, iv, m, *lowRate, extras{rtt: true})
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
	// A standard server under a standard load generator.
	var httpRows []httpRow
	for _, conns := range []int{1, 32} {
		if err := wl.SetWriterRate(ctx, *lowRate); err != nil {
			return err
		}
		base, err := wrk(ctx, labkit.GuestIP(30), conns, *measure)
		if err != nil {
			return err
		}
		err = b.protected(ctx, name, wl, 50*time.Millisecond, *minIv, *lowRate, func(*api.Client) error {
			r, err := wrk(ctx, labkit.GuestIP(30), conns, *measure)
			httpRows = append(httpRows, httpRow{conns: conns, base: base, prot: r})
			return err
		})
		if err != nil {
			return fmt.Errorf("http, %d connections: %w", conns, err)
		}
	}

	fmt.Printf("256 MiB guest, epoch_min_interval %s (epochs start early while output is held)\n", *minIv)
	fmt.Printf("%-9s %-9s %9s %9s %12s %14s %8s %9s %16s\n", "interval", "dirty/s", "pause p50", "pause p99", "dirty pg/ep", "wire bytes/ep", "compr", "epochs/s", "devstate raw/wire")
	for _, r := range rows {
		fmt.Printf("%-9s %-9d %9s %9s %12.0f %14.0f %7.1fx %9.1f %8.0f/%-7.0f\n", r.interval, r.rate, ms1(r.s.p50), ms1(r.s.p99),
			r.s.dirtyPerEpoch, r.s.wirePerEpoch, r.s.compression, r.s.epochsPerSec, r.s.devRaw, r.s.devWire)
	}
	fmt.Printf("\nhighest sustained epoch rate (epoch_interval 5ms, max_in_flight 3):\n")
	fmt.Printf("%-9s %9s %9s %9s\n", "dirty/s", "epochs/s", "pause p50", "pause p99")
	for _, r := range fastest {
		fmt.Printf("%-9d %9.1f %9s %9s\n", r.rate, r.s.epochsPerSec, ms1(r.s.p50), ms1(r.s.p99))
	}
	fmt.Printf("\noutput-triggered epochs (epoch_min_interval 20ms) against epochs on the tick only, dirty %d pages/s, same run:\n", *lowRate)
	fmt.Printf("%-9s %12s %12s %12s %12s %12s %12s %10s %10s\n", "interval", "tick p50", "tick p99", "trig p50", "trig p99", "tick ep/s", "trig ep/s", "triggered", "p50 ratio")
	for _, p := range pairs {
		fmt.Printf("%-9s %12s %12s %12s %12s %12.1f %12.1f %9.0f%% %9.2fx\n", p.interval, ms1(p.tick.rtt.p50), ms1(p.tick.rtt.p99), ms1(p.trigger.rtt.p50), ms1(p.trigger.rtt.p99),
			p.tick.epochsPerSec, p.trigger.epochsPerSec, 100*p.trigger.triggered, float64(p.tick.rtt.p50)/float64(max(p.trigger.rtt.p50, 1)))
	}
	fmt.Printf("\nrequest/response round trip to the guest (output commit: %s), protected vs unprotected in the same run:\n", outputBackend)
	fmt.Printf("%-9s %-9s %12s %12s %12s %12s %10s\n", "interval", "dirty/s", "rtt p50", "rtt p99", "unprot p50", "unprot p99", "p50 ratio")
	for _, r := range rows {
		fmt.Printf("%-9s %-9d %12s %12s %12s %12s %9.1fx\n", r.interval, r.rate, ms1(r.s.rtt.p50), ms1(r.s.rtt.p99),
			ms1(r.s.rttBase.p50), ms1(r.s.rttBase.p99), float64(r.s.rtt.p50)/float64(max(r.s.rttBase.p50, 1)))
	}
	fmt.Printf("\nguest disk writes (4 KiB O_DIRECT, flat out; the disk mirrored to the standby and cut per epoch) protected vs unprotected:\n")
	fmt.Printf("%-9s %-9s %12s %12s %12s %12s %12s %12s %11s\n", "interval", "dirty/s", "writes/s", "lat p50", "lat p99", "unprot w/s", "unprot p50", "unprot p99", "w/s ratio")
	for _, r := range rows {
		fmt.Printf("%-9s %-9d %12.0f %12s %12s %12.0f %12s %12s %10.2fx\n", r.interval, r.rate, r.s.disk.perSec, ms1(r.s.disk.p50), ms1(r.s.disk.p99),
			r.s.diskBase.perSec, ms1(r.s.diskBase.p50), ms1(r.s.diskBase.p99), r.s.disk.perSec/max(r.s.diskBase.perSec, 1))
	}
	fmt.Printf("\nbusybox httpd in the guest under wrk (GET /, %s each), protected (epoch_interval 50ms, min 20ms, %d pages/s) vs unprotected:\n", *measure, *lowRate)
	fmt.Printf("%-6s %12s %12s %12s %12s %12s %12s %10s\n", "conns", "req/s", "lat p50", "lat p99", "unprot r/s", "unprot p50", "unprot p99", "r/s ratio")
	for _, h := range httpRows {
		fmt.Printf("%-6d %12.0f %12s %12s %12.0f %12s %12s %9.0f%%\n", h.conns, h.prot.perSec, ms1(h.prot.p50), ms1(h.prot.p99),
			h.base.perSec, ms1(h.base.p50), ms1(h.base.p99), 100*h.prot.perSec/max(h.base.perSec, 1))
	}
	return nil
}

type httpRow struct {
	conns      int
	base, prot wrkResult
}

type wrkResult struct {
	perSec   float64
	p50, p99 time.Duration
}

var (
	wrkRate    = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	wrkLatency = regexp.MustCompile(`(?m)^\s+(50|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s)\s*$`)
)

// wrk runs the wrk load generator against the guest's httpd.
func wrk(ctx context.Context, ip string, conns int, d time.Duration) (wrkResult, error) {
	out, err := exec.CommandContext(ctx, "wrk", "-t1", fmt.Sprintf("-c%d", conns), fmt.Sprintf("-d%ds", int(d.Seconds())),
		"--latency", "--timeout", "10s", "http://"+ip+"/").CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk: %v\n%s", err, out)
	}
	var r wrkResult
	m := wrkRate.FindSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("wrk: no Requests/sec in\n%s", out)
	}
	r.perSec, _ = strconv.ParseFloat(string(m[1]), 64)
	for _, l := range wrkLatency.FindAllSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(string(l[2]), 64)
		unit := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second}[string(l[3])]
		if string(l[1]) == "50" {
			r.p50 = time.Duration(v * float64(unit))
		} else {
			r.p99 = time.Duration(v * float64(unit))
		}
	}
	return r, nil
}

func trackerName() string {
	if checkpoint.SoftDirtySupported() {
		return "softdirty"
	}
	return "scan (kernel lacks soft-dirty)"
}

var outputBackend = "qemu filter-redirector"

func ms1(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d)/1e6) }

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

// protected starts a primary agent, protects the guest and runs fn once
// it is protected and dirtying rate pages/s; the guest is unenrolled after.
func (b *bench) protected(ctx context.Context, name string, wl *labkit.Client, iv, minIv time.Duration, rate int, fn func(*api.Client) error) error {
	if err := wl.SetWriterRate(ctx, 0); err != nil {
		return err
	}
	a := startAgent(b.bin, b.work, "a", "127.0.0.1:7411", iv, minIv)
	defer a.stop()
	if err := a.wait(); err != nil {
		return err
	}
	c := a.client()
	if err := c.Enroll(ctx, name, standbyAddr, arbiter.ProbeSpec{}); err != nil {
		return err
	}
	defer c.Unenroll(ctx, name)
	deadline := time.Now().Add(10 * time.Minute)
	for {
		s, err := c.VM(ctx, name)
		if err == nil && s.State == checkpoint.StateProtected {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not protected after 10m: %+v %v", s, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := wl.SetWriterRate(ctx, rate); err != nil {
		return err
	}
	time.Sleep(2 * time.Second)
	return fn(c)
}

func (b *bench) measureOne(ctx context.Context, name string, wl *labkit.Client, iv, minIv time.Duration, rate int, x extras) (result, error) {
	var r result
	// The baseline round trip and disk writes: the same guest, writer and
	// agents' host, unprotected, just before.
	if x.rtt || x.disk {
		if err := wl.SetWriterRate(ctx, rate); err != nil {
			return r, err
		}
	}
	var err error
	if x.rtt {
		if r.rttBase, err = roundTrips(ctx, wl, 3*time.Second); err != nil {
			return r, err
		}
	}
	if x.disk {
		if r.diskBase, err = diskRun(ctx, wl, 3*time.Second); err != nil {
			return r, err
		}
	}
	err = b.protected(ctx, name, wl, iv, minIv, rate, func(c *api.Client) error {
		s0, err := c.VM(ctx, name)
		if err != nil {
			return err
		}
		t0 := time.Now()
		if x.rtt {
			if r.rtt, err = roundTrips(ctx, wl, *measure); err != nil {
				return err
			}
		} else {
			time.Sleep(*measure)
		}
		if x.disk {
			if r.disk, err = diskRun(ctx, wl, 3*time.Second); err != nil {
				return err
			}
		}
		s1, err := c.VM(ctx, name)
		if err != nil {
			return err
		}
		el := time.Since(t0)
		epochs := float64(s1.Incremental - s0.Incremental)
		if epochs == 0 {
			return fmt.Errorf("no epochs in %s", el)
		}
		wire := float64(s1.Bytes - s0.Bytes)
		r.p50, r.p99 = s1.PauseP50, s1.PauseP99
		if s1.PauseMedian != nil {
			r.breakdown = *s1.PauseMedian
		}
		r.dirtyPerEpoch = float64(s1.DirtyTotal-s0.DirtyTotal) / epochs
		r.wirePerEpoch = wire / epochs
		r.pageWirePerEp = float64(s1.PageWire-s0.PageWire) / epochs
		r.compression = float64(s1.RawBytes-s0.RawBytes) / max(wire, 1)
		r.epochsPerSec = epochs / el.Seconds()
		r.devRaw, r.devWire = float64(s1.DevStateBytes), float64(s1.DevStateWire)
		r.triggered = float64(s1.OutputTriggered-s0.OutputTriggered) / epochs
		return nil
	})
	return r, err
}

type baseResult struct {
	p50, p99 time.Duration
	bytes    int64
}

func openGuest(ctx context.Context, name string) (*virt.Conn, *qemu.Guest, error) {
	conn, err := virt.Dial(ctx, labkit.LibvirtURI)
	if err != nil {
		return nil, nil, err
	}
	g, err := conn.OpenGuest(ctx, name)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	if err := qemu.SetUnlimitedBandwidth(ctx, g.Mon); err != nil {
		conn.Close()
		return nil, nil, err
	}
	return conn, g, nil
}

func sink(work, sock string) (*qemu.DeviceStateSink, func(), error) {
	dir, err := os.MkdirTemp(work, "sock-")
	if err != nil {
		return nil, nil, err
	}
	if err := os.Chmod(dir, 0o711); err != nil { // QEMU (libvirt-qemu) reaches the socket
		return nil, nil, err
	}
	sk, err := qemu.ListenDeviceState(filepath.Join(dir, sock))
	if err != nil {
		return nil, nil, err
	}
	return sk, func() { sk.Close(); os.RemoveAll(dir) }, nil
}

// baseline takes full-RAM migration checkpoints of the guest.
func baseline(ctx context.Context, name, work string, reps int) (baseResult, error) {
	conn, g, err := openGuest(ctx, name)
	if err != nil {
		return baseResult{}, err
	}
	defer conn.Close()
	if err := qemu.SetIgnoreShared(ctx, g.Mon, false); err != nil {
		return baseResult{}, err
	}
	defer qemu.SetIgnoreShared(context.Background(), g.Mon, true)
	sk, done, err := sink(work, "full.sock")
	if err != nil {
		return baseResult{}, err
	}
	defer done()
	var pauses []time.Duration
	var n int64
	for i := 0; i < reps; i++ {
		time.Sleep(200 * time.Millisecond)
		start := time.Now()
		if err := qemu.Stop(ctx, g.Mon); err != nil {
			return baseResult{}, err
		}
		n, err = sk.Save(ctx, g, io.Discard)
		if cerr := qemu.Cont(ctx, g.Mon); err == nil {
			err = cerr
		}
		if err != nil {
			return baseResult{}, err
		}
		pauses = append(pauses, time.Since(start))
	}
	return baseResult{p50: stats.Percentile(pauses, 50), p99: stats.Percentile(pauses, 99), bytes: n}, nil
}

// devStateCompare saves the guest's device state (x-ignore-shared on) both
// ways, alternating, and returns the pause p50/p99 of each: before = QMP
// stop, migrate, query-migrate until completed, cont; now = the migration
// stops the guest itself, the stream's end proves completion, cont.
func devStateCompare(ctx context.Context, name, work string, reps int) (oldP50, oldP99, newP50, newP99 time.Duration, err error) {
	conn, g, err := openGuest(ctx, name)
	if err != nil {
		return
	}
	defer conn.Close()
	if err = qemu.SetIgnoreShared(ctx, g.Mon, true); err != nil {
		return
	}
	sk, done, err := sink(work, "dev.sock")
	if err != nil {
		return
	}
	defer done()
	var olds, news []time.Duration
	for i := 0; i < reps; i++ {
		time.Sleep(100 * time.Millisecond)
		start := time.Now()
		if err = qemu.Stop(ctx, g.Mon); err != nil {
			return
		}
		_, err = sk.Save(ctx, g, io.Discard)
		if err == nil {
			err = waitCompleted(ctx, g) // what the save did before the stream told completion
		}
		if cerr := qemu.Cont(ctx, g.Mon); err == nil {
			err = cerr
		}
		if err != nil {
			return
		}
		olds = append(olds, time.Since(start))

		time.Sleep(100 * time.Millisecond)
		var sv *qemu.DeviceSave
		if sv, err = sk.Begin(ctx, g); err != nil {
			return
		}
		_, err = sv.Finish(ctx, io.Discard)
		if cerr := qemu.Cont(ctx, g.Mon); err == nil {
			err = cerr
		}
		if err != nil {
			return
		}
		news = append(news, time.Since(sv.StoppedAt()))
	}
	return stats.Percentile(olds, 50), stats.Percentile(olds, 99), stats.Percentile(news, 50), stats.Percentile(news, 99), nil
}

func waitCompleted(ctx context.Context, g *qemu.Guest) error {
	for {
		st, desc, err := qemu.MigrationStatus(ctx, g.Mon)
		switch {
		case err != nil:
			return err
		case st == "completed":
			return nil
		case st == "failed" || st == "cancelled":
			return fmt.Errorf("migration %s: %s", st, desc)
		}
		time.Sleep(200 * time.Microsecond)
	}
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
