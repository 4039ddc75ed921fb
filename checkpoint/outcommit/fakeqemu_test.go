//go:build linux

package outcommit

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
)

// fakeQEMU answers the QMP commands a Redirector sends and behaves like
// QEMU's filter-redirector pair on one netdev: the guest's frames go to the
// capture chardev (written completely before send returns, as QEMU does)
// or, without a capture filter, to the tap; frames read from the release
// chardev go to the tap.
type fakeQEMU struct {
	t      *testing.T
	netdev string

	mu       sync.Mutex
	chardevs map[string]net.Conn
	filters  map[string]map[string]any
	order    []string // filter ids from the head (nearest the tap) to the tail
	tap      []int    // frame ids that reached the tap, in order
	nextID   int      // next frame of a numbered sequence
	gone     bool     // QEMU exited: every command fails
	log      []string
	tapCond  *sync.Cond
}

func newFakeQEMU(t *testing.T) *fakeQEMU {
	f := &fakeQEMU{t: t, netdev: "hostnet0", chardevs: map[string]net.Conn{}, filters: map[string]map[string]any{}}
	f.tapCond = sync.NewCond(&f.mu)
	return f
}

var _ qmp.Monitor = (*fakeQEMU)(nil)

func (f *fakeQEMU) Connect() error    { return nil }
func (f *fakeQEMU) Disconnect() error { return nil }
func (f *fakeQEMU) Events(context.Context) (<-chan qmp.Event, error) {
	return nil, fmt.Errorf("no events")
}

func qmpErr(class, desc string) ([]byte, error) {
	return json.Marshal(map[string]any{"error": map[string]string{"class": class, "desc": desc}})
}

func (f *fakeQEMU) Run(cmd []byte) ([]byte, error) {
	var c struct {
		Execute   string         `json:"execute"`
		Arguments map[string]any `json:"arguments"`
	}
	if err := json.Unmarshal(cmd, &c); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, c.Execute)
	if f.gone {
		return nil, fmt.Errorf("Requested operation is not valid: domain is not running")
	}
	ok := []byte(`{"return":{}}`)
	a := c.Arguments
	switch c.Execute {
	case "query-status":
		return []byte(`{"return":{"status":"running"}}`), nil
	case "chardev-add":
		id := a["id"].(string)
		path := a["backend"].(map[string]any)["data"].(map[string]any)["addr"].(map[string]any)["data"].(map[string]any)["path"].(string)
		conn, err := net.Dial("unix", path)
		if err != nil {
			return qmpErr("GenericError", "Failed to connect to '"+path+"': "+err.Error())
		}
		f.chardevs[id] = conn
		return ok, nil
	case "chardev-remove":
		id := a["id"].(string)
		c, found := f.chardevs[id]
		if !found {
			return qmpErr("GenericError", "Chardev '"+id+"' not found")
		}
		for _, fl := range f.filters {
			if fl["indev"] == id || fl["outdev"] == id {
				return qmpErr("GenericError", "Chardev '"+id+"' is busy")
			}
		}
		c.Close()
		delete(f.chardevs, id)
		return ok, nil
	case "object-add":
		if a["netdev"] != f.netdev {
			return qmpErr("GenericError", "Parameter 'netdev' expects a network backend id")
		}
		if a["queue"] != "rx" {
			f.t.Errorf("filter %v on queue %v: the guest's output is queue rx", a["id"], a["queue"])
		}
		id := a["id"].(string)
		if in, _ := a["indev"].(string); in != "" {
			conn, found := f.chardevs[in]
			if !found {
				return qmpErr("DeviceNotFound", "IN Device '"+in+"' not found")
			}
			go f.releaseReader(conn, id)
		}
		f.filters[id] = a
		f.insert(id, a)
		return ok, nil
	case "object-del":
		id := a["id"].(string)
		if _, found := f.filters[id]; !found {
			return qmpErr("GenericError", "object '"+id+"' not found")
		}
		delete(f.filters, id)
		f.order = slices.DeleteFunc(f.order, func(x string) bool { return x == id })
		return ok, nil
	case "query-chardev":
		var out []map[string]string
		for id := range f.chardevs {
			out = append(out, map[string]string{"label": id, "filename": "unix:"})
		}
		b, _ := json.Marshal(map[string]any{"return": out})
		return b, nil
	case "qom-list":
		if a["path"] == "/objects" {
			var out []map[string]string
			for _, id := range f.order {
				out = append(out, map[string]string{"name": id, "type": "child<filter-redirector>"})
			}
			b, _ := json.Marshal(map[string]any{"return": out})
			return b, nil
		}
		if a["path"] == "/machine/peripheral" {
			return []byte(`{"return":[{"name":"type","type":"string"},{"name":"net0","type":"child<virtio-net-pci>"}]}`), nil
		}
		if a["path"] == "/machine/peripheral/net0" {
			return []byte(`{"return":[{"name":"netdev","type":"str"}]}`), nil
		}
		return []byte(`{"return":[]}`), nil
	case "qom-get":
		return []byte(`{"return":"` + f.netdev + `"}`), nil
	}
	return qmpErr("CommandNotFound", "The command "+c.Execute+" has not been found")
}

// insert places filter id in the chain as QEMU does for its position
// ("head", "tail" or "id=X") and insert ("before" or "behind" X).
func (f *fakeQEMU) insert(id string, a map[string]any) {
	pos, _ := a["position"].(string)
	switch {
	case pos == "head":
		f.order = append([]string{id}, f.order...)
	case strings.HasPrefix(pos, "id="):
		at := slices.Index(f.order, strings.TrimPrefix(pos, "id="))
		if ins, _ := a["insert"].(string); ins != "before" {
			at++
		}
		f.order = slices.Insert(f.order, at, id)
	default:
		f.order = append(f.order, id)
	}
}

// passFrom sends a frame on from chain index i towards the head: the first
// capture filter takes it, else it reaches the tap.
func (f *fakeQEMU) passFrom(i, id int) {
	for ; i >= 0; i-- {
		if out, _ := f.filters[f.order[i]]["outdev"].(string); out != "" {
			rec := appendRecord(nil, testFrame(id, 60+id%200), true, 12)
			if c := f.chardevs[out]; c != nil {
				c.Write(rec) // a failed write drops the frame, as QEMU does
			}
			return
		}
	}
	f.tap = append(f.tap, id)
	f.tapCond.Broadcast()
}

// releaseReader parses what the agent writes to filter's release chardev.
func (f *fakeQEMU) releaseReader(c net.Conn, filter string) {
	p := parser{vnetHdr: true}
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			f.mu.Lock()
			perr := p.feed(buf[:n], func(r record) { f.passFrom(slices.Index(f.order, filter)-1, frameID(r)) })
			f.tapCond.Broadcast()
			f.mu.Unlock()
			if perr != nil {
				f.t.Error(perr)
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// send has the guest send frame id: to the capture chardev if there is a
// capture filter, else to the tap.
func (f *fakeQEMU) send(id int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sendLocked(id)
}

func (f *fakeQEMU) sendLocked(id int) { f.passFrom(len(f.order)-1, id) }

func (f *fakeQEMU) tapFrames() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.tap)
}

// waitTap waits until the tap has seen n frames.
func (f *fakeQEMU) waitTap(t *testing.T, n int) []int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if got := f.tapFrames(); len(got) >= n {
			return got
		}
		time.Sleep(time.Millisecond)
	}
	got := f.tapFrames()
	t.Fatalf("tap saw %d frames, want %d: %v", len(got), n, got)
	return nil
}

func newFakeRedirector(t *testing.T, f *fakeQEMU, opts Options) *Redirector {
	t.Helper()
	r, err := newRedirector(context.Background(), f, "fake", t.TempDir(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestFakeHoldCutRelease(t *testing.T) {
	f := newFakeQEMU(t)
	r := newFakeRedirector(t, f, Options{HoldFromStart: true})
	for i := range 5 {
		f.send(i)
	}
	if err := r.Cut(1); err != nil {
		t.Fatal(err)
	}
	for i := 5; i < 8; i++ {
		f.send(i)
	}
	if err := r.Cut(2); err != nil {
		t.Fatal(err)
	}
	f.send(8)
	time.Sleep(20 * time.Millisecond)
	if got := f.tapFrames(); len(got) != 0 {
		t.Fatalf("frames reached the tap before any release: %v", got)
	}
	if err := r.Release(1); err != nil {
		t.Fatal(err)
	}
	if got := f.waitTap(t, 5); !slices.Equal(got, seq(0, 5)) {
		t.Fatalf("after Release(1) the tap saw %v", got)
	}
	if err := r.Release(2); err != nil {
		t.Fatal(err)
	}
	if got := f.waitTap(t, 8); !slices.Equal(got, seq(0, 8)) {
		t.Fatalf("after Release(2) the tap saw %v", got)
	}
	st := r.Stats()
	if st.ReleasedFrames != 8 || st.HeldFrames != 1 || st.OpenFrames != 1 || st.LastCut != 2 || st.LastReleased != 2 || st.LatencySamples != 8 {
		t.Fatalf("stats %+v", st)
	}
	// Close without ReleaseAll drops the open epoch's frame and removes
	// everything from QEMU.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.DiscardedFrames != 1 || st.HeldFrames != 0 {
		t.Fatalf("after Close: %+v", st)
	}
	f.mu.Lock()
	nf, nc := len(f.filters), len(f.chardevs)
	f.mu.Unlock()
	if nf != 0 || nc != 0 {
		t.Fatalf("after Close QEMU still has %d filters and %d chardevs", nf, nc)
	}
	f.send(100)
	if got := f.tapFrames(); got[len(got)-1] != 100 {
		t.Fatal("after Close a frame did not go to the tap directly")
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestFakeForwardUntilFirstCut(t *testing.T) {
	f := newFakeQEMU(t)
	r := newFakeRedirector(t, f, Options{})
	f.send(0)
	f.send(1)
	f.waitTap(t, 2)
	if err := r.Cut(1); err != nil {
		t.Fatal(err)
	}
	f.send(2)
	time.Sleep(20 * time.Millisecond)
	if got := f.tapFrames(); len(got) != 2 {
		t.Fatalf("frame after the first cut not held: %v", got)
	}
	if err := r.Cut(2); err != nil {
		t.Fatal(err)
	}
	if err := r.Release(2); err != nil {
		t.Fatal(err)
	}
	if got := f.waitTap(t, 3); !slices.Equal(got, seq(0, 3)) {
		t.Fatalf("tap %v", got)
	}
}

func TestFakeDiscardAfter(t *testing.T) {
	f := newFakeQEMU(t)
	r := newFakeRedirector(t, f, Options{HoldFromStart: true})
	f.send(0)
	r.Cut(1)
	f.send(1)
	r.Cut(2)
	f.send(2)
	r.DiscardAfter(1)
	f.send(3)
	r.Cut(2)
	if err := r.Release(2); err != nil {
		t.Fatal(err)
	}
	if got := f.waitTap(t, 2); !slices.Equal(got, []int{0, 3}) {
		t.Fatalf("tap %v, want [0 3]", got)
	}
	if st := r.Stats(); st.DiscardedFrames != 2 {
		t.Fatalf("discarded %d", st.DiscardedFrames)
	}
}

func TestFakeReleaseAllThenCloseLosesNothing(t *testing.T) {
	f := newFakeQEMU(t)
	r := newFakeRedirector(t, f, Options{HoldFromStart: true})
	for i := range 100 {
		f.send(i)
		if i%10 == 9 {
			r.Cut(uint64(i))
		}
	}
	r.Release(49)
	stop := make(chan struct{})
	done := make(chan int)
	go func() { // the guest keeps sending through ReleaseAll and Close
		i := 100
		for {
			select {
			case <-stop:
				done <- i
				return
			default:
			}
			f.send(i)
			i++
			time.Sleep(50 * time.Microsecond)
		}
	}()
	time.Sleep(5 * time.Millisecond)
	if err := r.ReleaseAll(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Millisecond)
	close(stop)
	n := <-done
	got := f.waitTap(t, n)
	// Nothing lost or doubled. Frames the guest sends while Close runs may
	// overtake the last captured ones (the capture filter is gone, the
	// agent is still passing those on): the order holds up to Close.
	sorted := slices.Sorted(slices.Values(got))
	if !slices.Equal(sorted, seq(0, n)) {
		t.Fatalf("tap saw %d frames, want each of 0..%d once", len(got), n)
	}
	if d := firstDiff(got, seq(0, n)); d < 100 {
		t.Fatalf("tap order differs at frame %d, before Close: %v", d, got[max(0, d-3):min(len(got), d+10)])
	}
	if st := r.Stats(); st.DiscardedFrames != 0 || st.DroppedFrames != 0 {
		t.Fatalf("stats %+v", st)
	}
}

func firstDiff(a, b []int) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func TestFakeConcurrentEpochs(t *testing.T) {
	// The guest sends all the time; "pauses" are emulated by holding the
	// fake's lock around Cut, as QEMU sends nothing while stopped. Acks
	// come late, several epochs at a time. Like a TCP sender, the guest
	// stops when too much of its output is unacknowledged, which keeps
	// the held bytes well under MaxBytes on any machine speed.
	const maxUnreleased = 20000 // frames, at most 5.4 MB
	f := newFakeQEMU(t)
	r := newFakeRedirector(t, f, Options{HoldFromStart: true})
	var epochEnd []int // frames sent before cut e+1
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			f.mu.Lock()
			window := f.nextID-len(f.tap) < maxUnreleased
			if window {
				f.sendLocked(f.nextID)
				f.nextID++
			}
			f.mu.Unlock()
			if !window {
				time.Sleep(100 * time.Microsecond)
			}
		}
	}()
	for e := uint64(1); e <= 60; e++ {
		time.Sleep(500 * time.Microsecond)
		f.mu.Lock() // "stop": the guest sends nothing until "cont"
		if err := r.Cut(e); err != nil {
			f.mu.Unlock()
			t.Fatal(err)
		}
		epochEnd = append(epochEnd, f.nextID)
		f.mu.Unlock()
		if e%3 == 0 {
			if err := r.Release(e - 1); err != nil {
				t.Fatal(err)
			}
			got := f.waitTap(t, epochEnd[e-2])
			if len(got) != epochEnd[e-2] || !slices.Equal(got, seq(0, len(got))) {
				t.Fatalf("after Release(%d): tap saw %d frames (first out of order at %d), want exactly %d in order; %+v",
					e-1, len(got), firstDiff(got, seq(0, len(got))), epochEnd[e-2], r.Stats())
			}
		}
	}
	close(stop)
	wg.Wait()
	st := r.Stats()
	if st.MisalignedFrames != 0 || st.DroppedFrames != 0 {
		t.Fatalf("stats %+v", st)
	}
	t.Logf("%d frames sent, %d released; hold p50 %v p99 %v", f.nextID, st.ReleasedFrames, st.ReleaseP50, st.ReleaseP99)
}

func TestFakeNetdevNotFound(t *testing.T) {
	f := newFakeQEMU(t)
	_, err := newRedirector(context.Background(), f, "fake", t.TempDir(), Options{Netdev: "hostnet7"})
	if err == nil {
		t.Fatal("no error")
	}
	if !strings.Contains(err.Error(), `"hostnet7"`) || !strings.Contains(err.Error(), `/machine/peripheral/net0 (virtio-net-pci) on netdev "hostnet0"`) {
		t.Fatalf("error does not name the netdevs: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.filters) != 0 || len(f.chardevs) != 0 {
		t.Fatalf("failed set-up left %d filters, %d chardevs", len(f.filters), len(f.chardevs))
	}
}

// A restarted agent takes over the filters a stopped (Detach) or dead one
// left: while the guest sends through the takeover, nothing reaches the
// tap unheld, and afterwards only the old objects are gone.
func TestFakeTakeoverLeaksNothing(t *testing.T) {
	f := newFakeQEMU(t)
	r1, err := newRedirector(context.Background(), f, "fake", t.TempDir(), Options{HoldFromStart: true})
	if err != nil {
		t.Fatal(err)
	}
	f.send(1)
	r1.Detach() // a graceful stop: the filters stay
	r0 := r1
	stop := make(chan struct{})
	sent := make(chan int)
	go func() {
		i := 100
		for {
			select {
			case <-stop:
				sent <- i
				return
			default:
			}
			f.send(i)
			i++
			time.Sleep(20 * time.Microsecond)
		}
	}()
	r2 := newFakeRedirector(t, f, Options{HoldFromStart: true})
	close(stop)
	<-sent
	if got := f.tapFrames(); len(got) != 0 {
		t.Fatalf("frames %v reached the tap unheld during the takeover", got)
	}
	f.mu.Lock()
	for id := range f.filters {
		if id == r0.ids.capture || id == r0.ids.release {
			t.Errorf("old filter %s left in QEMU", id)
		}
	}
	for id := range f.chardevs {
		if id == r0.ids.chrOut || id == r0.ids.chrIn {
			t.Errorf("old chardev %s left in QEMU", id)
		}
	}
	f.mu.Unlock()
	f.send(5000)
	if err := r2.Cut(1); err != nil {
		t.Fatal(err)
	}
	if err := r2.Release(1); err != nil {
		t.Fatal(err)
	}
	got := f.waitTap(t, 1)
	if slices.Contains(got, 1) {
		t.Fatalf("a frame held by the stopped agent was sent: %v", got)
	}
	if !slices.Contains(got, 5000) {
		t.Fatalf("the frame sent after the takeover was not released: %v", got)
	}
}

func TestFakeCloseWhenQEMUGone(t *testing.T) {
	f := newFakeQEMU(t)
	r := newFakeRedirector(t, f, Options{HoldFromStart: true, Timeout: time.Second})
	f.send(1)
	f.mu.Lock()
	f.gone = true
	for _, c := range f.chardevs {
		c.Close()
	}
	f.mu.Unlock()
	start := time.Now()
	if err := r.Close(); err != nil {
		t.Fatalf("Close with QEMU gone: %v", err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("Close with QEMU gone took %v", d)
	}
	if err := r.Cut(1); err == nil {
		t.Fatal("Cut after Close accepted")
	}
}

func TestFakeQEMUExitBreaksCut(t *testing.T) {
	f := newFakeQEMU(t)
	r := newFakeRedirector(t, f, Options{HoldFromStart: true})
	f.mu.Lock()
	f.chardevs[r.ids.chrOut].Close()
	f.mu.Unlock()
	deadline := time.Now().Add(2 * time.Second)
	var err error
	for e := uint64(1); time.Now().Before(deadline); e++ {
		if err = r.Cut(e); err != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err == nil || !strings.Contains(err.Error(), "closed the capture socket") {
		t.Fatalf("Cut after QEMU closed the socket: %v", err)
	}
}

// BenchmarkFakeEpoch: per epoch of 64 frames of 1 KiB, the cost of
// capture, Cut and Release through the sockets (the fake QEMU stands in
// for QEMU's side).
func BenchmarkFakeEpoch(b *testing.B) {
	t := &testing.T{}
	f := newFakeQEMU(t)
	f.mu.Lock()
	f.tap = make([]int, 0, 1<<20)
	f.mu.Unlock()
	r, err := newRedirector(context.Background(), f, "bench", b.TempDir(), Options{HoldFromStart: true})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	const perEpoch = 64
	b.SetBytes(perEpoch * 1024)
	b.ResetTimer()
	for i := range b.N {
		for j := range perEpoch {
			f.mu.Lock()
			rec := appendRecord(nil, testFrame(i*perEpoch+j, 1024), true, 12)
			c := f.chardevs[r.ids.chrOut]
			c.Write(rec)
			f.mu.Unlock()
		}
		if err := r.Cut(uint64(i + 1)); err != nil {
			b.Fatal(err)
		}
		if err := r.Release(uint64(i + 1)); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	st := r.Stats()
	b.ReportMetric(float64(st.ReleaseP50.Microseconds()), "hold-p50-µs")
}
