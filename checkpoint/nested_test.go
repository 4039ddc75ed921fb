package checkpoint

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"

	"github.com/remora-ha/remora/migrate/qemu"
)

// Soft-dirty tracking of a real QEMU guest, end to end: capture with the
// soft-dirty tracker and QEMU's device-state migration, replicate to a
// standby replica over TCP, restore a shell QEMU from it. It needs a
// kernel with CONFIG_MEM_SOFT_DIRTY and qemu-system-x86_64: test/kernelvm
// runs it inside Debian's kernel under QEMU, with a QEMU in its initramfs
// (nested TCG), and requires it there. The guest is tinyGuest: a
// multiboot program that counts and writes the count into a ring of pages.

const (
	tinyRAMMiB  = 64
	tinyCounter = 0x200000 // the count, a little-endian uint32
	// While the word at tinyHold is non-zero the guest spins, writing only
	// the next word: the test sets it through its own mapping, which
	// soft-dirty does not see (it tracks QEMU's), and the guest's write
	// of the same page makes QEMU dirty it.
	tinyHold       = 0x201000
	tinyRegion     = 0x400000 // page i holds the last count c with c%tinyRing == i
	tinyRing       = 1024
	tinyLoadAddr   = 0x100000
	tinyDelayLoops = 20000 // between two counts
)

// tinyGuest is a multiboot image (a.out kludge: flat, loaded at 1 MiB)
// whose program runs in 32-bit protected mode as the multiboot loader
// leaves it:
//
//	cli; xor ecx,ecx
//	loop: cmp dword [tinyHold],0; je run
//	      mov dword [tinyHold+4],1; jmp loop
//	run:  inc ecx; mov [tinyCounter],ecx
//	      mov ebx,ecx; and ebx,tinyRing-1; shl ebx,12; mov [ebx+tinyRegion],ecx
//	      mov eax,tinyDelayLoops; delay: dec eax; jnz delay
//	      jmp loop
func tinyGuest() []byte {
	const magic, flags = 0x1BADB002, 0x00010000
	var b []byte
	le := func(v uint32) { b = binary.LittleEndian.AppendUint32(b, v) }
	le(magic)
	le(flags)
	le(1<<32 - (magic + flags))      // checksum: the three words sum to zero
	le(tinyLoadAddr)                 // header_addr
	le(tinyLoadAddr)                 // load_addr
	le(0)                            // load_end_addr: the whole file
	le(0)                            // bss_end_addr: none
	le(tinyLoadAddr + 32)            // entry_addr: the code after this header
	code := []byte{0xfa, 0x31, 0xc9, // cli; xor ecx,ecx
		0x83, 0x3d, 0x00, 0x10, 0x20, 0x00, 0x00, // loop: cmp dword [0x201000],0
		0x74, 0x0c, // je run
		0xc7, 0x05, 0x04, 0x10, 0x20, 0x00, 0x01, 0, 0, 0, // mov dword [0x201004],1
		0xeb, 0xeb, // jmp loop
		0x41,                         // run: inc ecx
		0x89, 0x0d, 0, 0, 0x20, 0x00, // mov [0x200000],ecx
		0x89, 0xcb, // mov ebx,ecx
		0x81, 0xe3, 0xff, 0x03, 0, 0, // and ebx,0x3ff
		0xc1, 0xe3, 0x0c, // shl ebx,12
		0x89, 0x8b, 0, 0, 0x40, 0x00, // mov [ebx+0x400000],ecx
		0xb8, 0, 0, 0, 0, // mov eax,tinyDelayLoops
		0x48,       // delay: dec eax
		0x75, 0xfd, // jnz delay
		0xeb, 0xc9, // jmp loop
	}
	binary.LittleEndian.PutUint32(code[49:], tinyDelayLoops)
	return append(b, code...)
}

// tinyVM is a QEMU process running tinyGuest, or a shell waiting for its
// state (-incoming defer).
type tinyVM struct {
	cmd *exec.Cmd
	g   *qemu.Guest
	ram string // the shared RAM file
	mem []byte // mapped, writable
}

func requireQEMU(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("qemu-system-x86_64")
	if err == nil {
		return p
	}
	if os.Getenv("REMORA_REQUIRE_KERNEL_FEATURES") == "1" {
		t.Fatal("REMORA_REQUIRE_KERNEL_FEATURES=1 and no qemu-system-x86_64 on PATH")
	}
	t.Skip("no qemu-system-x86_64 (test/kernelvm runs this with QEMU in its initramfs)")
	return ""
}

func startTinyVM(t testing.TB, bin, dir, name string, incoming bool) *tinyVM {
	t.Helper()
	kernel := filepath.Join(dir, "tiny.img")
	if _, err := os.Stat(kernel); err != nil {
		if err := os.WriteFile(kernel, tinyGuest(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	v := &tinyVM{ram: filepath.Join("/dev/shm", "remora-"+name+".ram")}
	if !incoming {
		_ = os.Remove(v.ram)
	}
	f, err := os.OpenFile(v.ram, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(tinyRAMMiB << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	t.Cleanup(func() { os.Remove(v.ram) })
	if v.mem, err = qemu.MapRAM(v.ram, tinyRAMMiB<<20, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qemu.UnmapRAM(v.mem) })
	sock := filepath.Join(dir, name+".qmp")
	args := []string{"-accel", "tcg", "-machine", "pc,memory-backend=pc.ram", "-m", fmt.Sprintf("%dM", tinyRAMMiB),
		"-object", fmt.Sprintf("memory-backend-file,id=pc.ram,size=%dM,mem-path=%s,share=on", tinyRAMMiB, v.ram),
		"-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-serial", "none",
		"-kernel", kernel, "-qmp", "unix:" + sock + ",server=on,wait=off"}
	if incoming {
		args = append(args, "-incoming", "defer", "-S")
	}
	v.cmd = exec.Command(bin, args...)
	var out bytes.Buffer
	v.cmd.Stdout, v.cmd.Stderr = &out, &out
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = v.cmd.Process.Kill()
		_ = v.cmd.Wait()
		if t.Failed() && out.Len() > 0 {
			t.Logf("QEMU %s said: %s", name, out.String())
		}
	})
	var mon *qmp.SocketMonitor
	deadline := time.Now().Add(60 * time.Second)
	for {
		if mon, err = qmp.NewSocketMonitor("unix", sock, 10*time.Second); err == nil {
			if err = mon.Connect(); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("QEMU %s: no QMP socket: %v\n%s", name, err, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() { mon.Disconnect() })
	v.g = &qemu.Guest{Name: name, Mon: mon, RAM: qemu.RAMBackend{Path: v.ram, Size: tinyRAMMiB << 20, Share: true}, Process: v.cmd.Process.Pid}
	return v
}

func (v *tinyVM) counter() uint32 {
	return binary.LittleEndian.Uint32(v.mem[tinyCounter:])
}

// hold stops (or lets go) the guest's writes; it waits until the count
// stands still.
func (v *tinyVM) hold(t *testing.T, on bool) {
	t.Helper()
	var f uint32
	if on {
		f = 1
	}
	binary.LittleEndian.PutUint32(v.mem[tinyHold:], f)
	if !on {
		return
	}
	last := v.counter()
	waitFor(t, time.Minute, "the guest to hold", func() bool {
		time.Sleep(200 * time.Millisecond)
		c := v.counter()
		still := c == last
		last = c
		return still
	})
}

// checkRing checks that every page of the ring holds a count of its own
// residue that is not ahead of the counter.
func (v *tinyVM) checkRing(t *testing.T) {
	t.Helper()
	ring := make([]uint32, tinyRing)
	for i := range ring {
		ring[i] = binary.LittleEndian.Uint32(v.mem[tinyRegion+i*PageSize:])
	}
	c := v.counter() // read after the ring: the guest stores the count first
	for i, got := range ring {
		if got != 0 && (got%tinyRing != uint32(i) || got > c) {
			t.Fatalf("ring page %d holds %d (counter %d)", i, got, c)
		}
	}
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// blindTracker reports the first (full) epoch and nothing after: the
// negative control of the replica comparison.
type blindTracker struct{ Tracker }

func (b *blindTracker) Dirty(mem []byte, into *Bitmap) error {
	return b.Tracker.Dirty(mem, NewBitmap(into.Len()))
}

// protectTiny replicates prim with tracker until the standby committed
// epochs epochs, then holds the guest's writes, lets two more epochs
// capture its still memory, stops, and returns the engine's status.
func protectTiny(t *testing.T, prim *tinyVM, sb *testStandby, tracker Tracker, dir string, epochs uint64) PrimaryStatus {
	t.Helper()
	sink, err := qemu.ListenDeviceState(filepath.Join(dir, "devstate.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	vm := &qemu.CaptureVM{G: prim.g, Sink: sink, Marker: filepath.Join(dir, "capturing")}
	mem, err := qemu.MapRAM(prim.ram, tinyRAMMiB<<20, false)
	if err != nil {
		t.Fatal(err)
	}
	defer qemu.UnmapRAM(mem)
	addr := sb.ln.Addr().String()
	p := NewPrimary(PrimaryConfig{
		Agent: "primary-1", Guest: "tiny", DomainXML: "<domain><name>tiny</name></domain>",
		Interval: 50 * time.Millisecond, Fence: testFence, PeerTimeout: 30 * time.Second,
		Dial: func(ctx context.Context) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		},
		Log: testLogger(t),
	}, vm, mem, tracker)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	stop := func() {
		if cancel == nil {
			return
		}
		cancel()
		cancel = nil
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	defer stop()
	waitFor(t, 5*time.Minute, fmt.Sprintf("%d committed epochs", epochs), func() bool { return sb.lastCommitted() >= epochs })
	prim.hold(t, true)
	after := sb.lastCommitted() + 2
	waitFor(t, 2*time.Minute, "two epochs of the held guest", func() bool { return sb.lastCommitted() >= after })
	st := p.Status()
	stop()
	return st
}

// TestTinyGuestReplicates runs with the scan tracker wherever QEMU is, and
// with the soft-dirty tracker where the kernel has it (test/kernelvm).
func TestTinyGuestReplicates(t *testing.T) {
	bin := requireQEMU(t)
	t.Run("scan", func(t *testing.T) {
		tinyReplicates(t, bin, func(*tinyVM) Tracker { return NewScanTracker(tinyRAMMiB << 20) })
	})
	t.Run("softdirty", func(t *testing.T) {
		requireSoftDirty(t)
		tinyReplicates(t, bin, func(prim *tinyVM) Tracker {
			tr, err := NewSoftDirtyTracker(prim.g.Process, prim.ram, tinyRAMMiB<<20)
			if err != nil {
				t.Fatal(err)
			}
			return tr
		})
	})
}

func tinyReplicates(t *testing.T, bin string, newTracker func(*tinyVM) Tracker) {
	dir := t.TempDir()
	prim := startTinyVM(t, bin, dir, "primary", false)
	waitFor(t, 2*time.Minute, "the guest to count", func() bool { return prim.counter() > 1000 })
	ctx := context.Background()
	_ = ctx
	if err := qemu.SetIgnoreShared(ctx, prim.g.Mon, true); err != nil {
		t.Fatal(err)
	}
	if err := qemu.SetUnlimitedBandwidth(ctx, prim.g.Mon); err != nil {
		t.Fatal(err)
	}

	// Negative control: a tracker blind after the first epoch leaves the
	// replica behind the guest, and the comparison sees it.
	shellRAM := make([]byte, tinyRAMMiB<<20)
	blind := startStandbyOn(t, shellRAM, nil)
	protectTiny(t, prim, blind, &blindTracker{newTracker(prim)}, dir, 6)
	blind.shutdown()
	if n := diffPages(shellRAM, prim.mem); n == 0 {
		t.Fatal("negative control: a blind tracker's replica matches the guest")
	} else {
		t.Logf("negative control: with a blind tracker the replica differs from the guest in %d pages", n)
	}
	prim.hold(t, false)

	// The real thing, into a shell's RAM file.
	shell := startTinyVM(t, bin, dir, "shell", true)
	sb := startStandbyOn(t, shell.mem, nil)
	tracker := newTracker(prim)
	defer tracker.Close()
	st := protectTiny(t, prim, sb, tracker, dir, 20)
	sb.shutdown()
	sb.checkNoErrors(t)
	if st.Tracker != tracker.Name() || st.DirtyTotal == 0 {
		t.Fatalf("tracker %q reported %d dirty pages", st.Tracker, st.DirtyTotal)
	}
	rs := sb.r.State()
	if rs.Applied != rs.Committed || !rs.Synced {
		t.Fatalf("replica %+v", rs)
	}
	if n := diffPages(shell.mem, prim.mem); n != 0 {
		t.Fatalf("the replica differs from the held guest in %d pages (epoch %d)", n, rs.Committed)
	}
	at := prim.counter()
	t.Logf("replica of epoch %d equals the held guest (count %d); pause p50 %v p99 %v, breakdown p50 %+v, %d dirty pages in %d incremental epochs",
		rs.Committed, at, st.PauseP50, st.PauseP99, st.PauseMedian, st.DirtyTotal, st.Incremental)

	// Restore the shell from the replica and see the guest count on.
	_ = prim.cmd.Process.Kill()
	dev, err := os.Open(sb.r.DevStatePath())
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := qemu.Restore(rctx, shell.g, filepath.Join(dir, "incoming.sock"), dev); err != nil {
		t.Fatal(err)
	}
	if c := shell.counter(); c != at {
		t.Fatalf("the restored guest's count is %d, the replica's %d", c, at)
	}
	shell.hold(t, false) // its registers hold the count: it goes on from there
	waitFor(t, 2*time.Minute, "the restored guest to count on", func() bool { return shell.counter() > at+1000 })
	shell.checkRing(t)
	t.Logf("restored: the guest counts on from %d (now %d)", at, shell.counter())
}

// BenchmarkTrackTinyGuest is each tracker's cost per epoch (20 ms of the
// guest running) over the RAM of a QEMU guest, also per GiB of guest RAM
// (ms/GiB). make
// bench-kernel runs it in Debian's kernel, where soft-dirty is there too.
func BenchmarkTrackTinyGuest(b *testing.B) {
	bin := requireQEMU(b)
	dir := b.TempDir()
	prim := startTinyVM(b, bin, dir, "bench", false)
	waitFor(b, 2*time.Minute, "the guest to count", func() bool { return prim.counter() > 1000 })
	mem, err := qemu.MapRAM(prim.ram, tinyRAMMiB<<20, false)
	if err != nil {
		b.Fatal(err)
	}
	defer qemu.UnmapRAM(mem)
	for _, tc := range []struct {
		name string
		new  func() (Tracker, error)
	}{
		{TrackerSoftDirty, func() (Tracker, error) {
			if !SoftDirtySupported() {
				return nil, nil
			}
			return NewSoftDirtyTracker(prim.g.Process, prim.ram, tinyRAMMiB<<20)
		}},
		{TrackerScan, func() (Tracker, error) { return NewScanTracker(tinyRAMMiB << 20), nil }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			tr, err := tc.new()
			if err != nil {
				b.Fatal(err)
			}
			if tr == nil {
				b.Skip("kernel without CONFIG_MEM_SOFT_DIRTY (make bench-kernel runs this in Debian's kernel)")
			}
			defer tr.Close()
			bm := NewBitmap(uint64(len(mem) / PageSize))
			if err := tr.Dirty(mem, bm); err != nil { // primes
				b.Fatal(err)
			}
			var dirty uint64
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				time.Sleep(20 * time.Millisecond) // an epoch of guest activity
				b.StartTimer()
				bm.Clear()
				if err := tr.Dirty(mem, bm); err != nil {
					b.Fatal(err)
				}
				dirty += bm.Count()
			}
			perEpoch := float64(b.Elapsed()) / float64(b.N)
			b.ReportMetric(perEpoch/1e6*float64(1<<30)/float64(len(mem)), "ms/GiB")
			b.ReportMetric(float64(dirty)/float64(b.N), "dirty/op")
		})
	}
}
