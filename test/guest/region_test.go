package main

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"
)

func newTestRegion(t *testing.T, pages int, writes int) *Region {
	t.Helper()
	r := NewRegion(pages)
	for i := 0; i < writes; i++ {
		r.WriteNext()
	}
	return r
}

func mustFail(t *testing.T, r *Region, want ...string) {
	t.Helper()
	_, _, err := r.Check()
	if err == nil {
		t.Fatalf("check passed, want failure containing %q", want)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Fatalf("check failed with %q, want it to contain %q", err, w)
		}
	}
	t.Logf("detected: %v", err)
}

func TestFreshRegionPasses(t *testing.T) {
	r := NewRegion(16)
	round, boundary, err := r.Check()
	if err != nil || round != 2 || boundary != 0 {
		t.Fatalf("fresh region: round=%d boundary=%d err=%v", round, boundary, err)
	}
}

// Every boundary position in several rounds is legitimate.
func TestLegitimateBoundariesPass(t *testing.T) {
	const n = 8
	r := NewRegion(n)
	for i := 0; i < 3*n+1; i++ {
		round, boundary, err := r.Check()
		if err != nil {
			t.Fatalf("after %d writes: %v", i, err)
		}
		if want := uint64(2 + i/n); round != want || boundary != i%n {
			t.Fatalf("after %d writes: round=%d boundary=%d, want %d %d", i, round, boundary, want, i%n)
		}
		r.WriteNext()
	}
}

// A page whose latest write was lost (e.g. missed by dirty tracking, so the
// standby kept the previous round's copy) is detected.
func TestStalePageDetected(t *testing.T) {
	r := newTestRegion(t, 16, 10) // round 2, pages 0..9 written
	stampPage(r.page(4), 1, 4)    // page 4 reverts to round 1
	mustFail(t, r, "page 4:", "round 1, want 2", "stale")
}

// A page that was never copied at all (zero in the replica) is detected.
func TestZeroPageDetected(t *testing.T) {
	r := newTestRegion(t, 16, 3)
	clear(r.page(12))
	mustFail(t, r, "page 12:", "all zero")
}

// A page torn by a copy (first half new round, second half old round) fails
// the checksum.
func TestTornPageDetected(t *testing.T) {
	r := newTestRegion(t, 16, 5) // pages 0..4 in round 2
	old := make([]byte, PageSize)
	stampPage(old, 1, 2)
	copy(r.page(2)[PageSize/2:], old[PageSize/2:]) // second half from round 1
	mustFail(t, r, "page 2:", "checksum mismatch")
}

// Tearing in the header only (new header, old content) is detected too.
func TestTornHeaderDetected(t *testing.T) {
	r := newTestRegion(t, 16, 5)
	fresh := make([]byte, PageSize)
	stampPage(fresh, 2, 7)
	copy(r.page(7)[:offContent], fresh[:offContent]) // header of round 2, body of round 1
	mustFail(t, r, "page 7:", "checksum mismatch")
}

// A page holding another page's (intact) content is detected.
func TestWrongIndexDetected(t *testing.T) {
	r := newTestRegion(t, 16, 0)
	stampPage(r.page(9), 1, 10)
	mustFail(t, r, "page 9:", "content of page 10")
}

// A page from a newer round than the writer's state (the state was lost,
// or pages were applied from a later epoch) is detected.
func TestNewerPageDetected(t *testing.T) {
	r := newTestRegion(t, 16, 4)
	stampPage(r.page(6), 2, 6) // writer is at page 4 of round 2
	mustFail(t, r, "page 6:", "round 2, want 1")
}

// A page with a valid checksum but content not derived from its stamp is
// detected.
func TestForgedContentDetected(t *testing.T) {
	p := make([]byte, PageSize)
	stampPage(p, 3, 5)
	p[offContent+100] ^= 1
	sealPage(p) // valid checksum: only the content check can catch it
	if err := verifyPage(p, 5, 3); err == nil || !strings.Contains(err.Error(), "content word") {
		t.Fatalf("got %v, want content error", err)
	}
}

func TestCountsBadPages(t *testing.T) {
	r := newTestRegion(t, 16, 8)
	stampPage(r.page(1), 1, 1)
	stampPage(r.page(3), 1, 3)
	mustFail(t, r, "page 1:", "2 bad of 16 pages")
}

func TestStampsDiffer(t *testing.T) {
	a := make([]byte, PageSize)
	b := make([]byte, PageSize)
	stampPage(a, 5, 7)
	stampPage(b, 6, 7)
	same := 0
	for j := offContent; j < offPad; j += 8 {
		if string(a[j:j+8]) == string(b[j:j+8]) {
			same++
		}
	}
	if same != 0 {
		t.Fatalf("%d content words equal between rounds", same)
	}
}

func TestWriterRate(t *testing.T) {
	r := NewRegion(64)
	w := NewWriter(r, 5000)
	stop := make(chan struct{})
	go w.Run(stop)
	time.Sleep(300 * time.Millisecond)
	w.SetRate(0)
	time.Sleep(30 * time.Millisecond)
	_, _, n1 := r.State()
	time.Sleep(100 * time.Millisecond)
	_, _, n2 := r.State()
	close(stop)
	written := n1 - 64
	if written < 500 || written > 2500 {
		t.Fatalf("wrote %d pages in 300ms at 5000/s", written)
	}
	if n2 != n1 {
		t.Fatalf("writer kept writing at rate 0: %d -> %d", n1, n2)
	}
	if _, _, err := r.Check(); err != nil {
		t.Fatal(err)
	}
}

// Check runs concurrently with a fast writer and never sees a half-written page.
func TestCheckConcurrentWithWriter(t *testing.T) {
	r := NewRegion(256)
	w := NewWriter(r, 200000)
	stop := make(chan struct{})
	go w.Run(stop)
	defer close(stop)
	for i := 0; i < 20; i++ {
		if _, _, err := r.Check(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestProtocol(t *testing.T) {
	r := NewRegion(32)
	s := NewServer(r, NewWriter(r, 0), nil)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go s.Serve(l)
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	ask := func(cmd string) string {
		t.Helper()
		if _, err := c.Write([]byte(cmd + "\n")); err != nil {
			t.Fatal(err)
		}
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSuffix(line, "\n")
	}
	steps := []struct{ cmd, prefix string }{
		{"get", "0"},
		{"inc", "1"},
		{"inc", "2"},
		{"get", "2"},
		{"writer 1000", "ok"},
		{"writer -1", "err "},
		{"writer", "err "},
		{"check", "ok round=2 boundary=0"},
		{"bogus", "err unknown command"},
		{"stats", "counter=2 round=2 boundary=0 written=32 rate=1000 region_pages=32 page_size=4096 checks=1 uptime="},
	}
	for _, st := range steps {
		if got := ask(st.cmd); !strings.HasPrefix(got, st.prefix) {
			t.Fatalf("%q -> %q, want prefix %q", st.cmd, got, st.prefix)
		}
	}
	stampPage(r.page(3), 0, 3)
	if got := ask("check"); !strings.HasPrefix(got, "fail page 3: round 0, want 1") {
		t.Fatalf("check after corruption: %q", got)
	}
}

func TestCmdlineParams(t *testing.T) {
	m := cmdlineParams("console=ttyS0 remora.ip=10.77.0.10/24 remora.region_pages=100 remora.rate=0 quiet\n")
	if m["ip"] != "10.77.0.10/24" || m["region_pages"] != "100" || m["rate"] != "0" || len(m) != 3 {
		t.Fatalf("%v", m)
	}
	if intParam(m, "rate", 5) != 0 || intParam(m, "port", 7000) != 7000 {
		t.Fatal("intParam")
	}
}

func BenchmarkStampPage(b *testing.B) {
	p := make([]byte, PageSize)
	b.SetBytes(PageSize)
	for i := 0; i < b.N; i++ {
		stampPage(p, uint64(i), 3)
	}
}
