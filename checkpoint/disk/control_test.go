package disk

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

func TestCutOverTheControlPath(t *testing.T) {
	tg, _ := newMemTarget(1<<20, Options{MaxBufferedBytes: 8192})
	a, b := net.Pipe()
	served := make(chan error, 1)
	go func() { served <- ServeControl(b, tg) }()
	cl := NewCutClient(a)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if err := cl.Cut(ctx, 1); err != nil {
		t.Fatal(err)
	}
	tg.Write(0, pattern(4096, 1))
	tg.Write(4096, pattern(512, 2))
	if err := cl.Cut(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if l := cl.Last(); l != (EpochStats{Epoch: 2, Writes: 2, Bytes: 4608}) {
		t.Fatalf("last cut %+v", l)
	}
	// Refused, but the connection goes on.
	err := cl.Cut(ctx, 2)
	var ce *CutError
	if !errors.As(err, &ce) || errors.Is(err, ErrOutOfSync) {
		t.Fatalf("repeated cut: %v", err)
	}
	tg.Write(0, pattern(8192, 3)) // over the limit
	if err := cl.Cut(ctx, 3); !errors.Is(err, ErrOutOfSync) {
		t.Fatalf("cut after overflow: %v", err)
	}
	tg.Reset()
	if err := cl.Cut(ctx, 4); err != nil {
		t.Fatalf("cut after Reset: %v", err)
	}
	a.Close()
	if err := <-served; err != nil && !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ServeControl: %v", err)
	}
}

func TestCutClientDeadlineBreaksIt(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	go func() { // reads requests, never answers
		buf := make([]byte, 64)
		for {
			if _, err := b.Read(buf); err != nil {
				return
			}
		}
	}()
	cl := NewCutClient(a)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := cl.Cut(ctx, 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cut without an answer: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("cut returned after %v", d)
	}
	if err := cl.Cut(context.Background(), 2); err == nil {
		t.Fatal("a broken client sent another cut")
	}
}

func TestControlRequestParse(t *testing.T) {
	op, ep, err := parseControlRequest(encodeCutRequest(42))
	if err != nil || op != ctlOpCut || ep != 42 {
		t.Fatal(op, ep, err)
	}
	bad := encodeCutRequest(1)
	bad[6] = 1
	if _, _, err := parseControlRequest(bad); err == nil {
		t.Fatal("reserved bytes not checked")
	}
	if _, _, err := parseControlRequest([]byte("RDC2xxxxxxxxxxxx")); err == nil {
		t.Fatal("bad magic accepted")
	}
}

// One cut round trip over loopback TCP.
func BenchmarkCutRoundTrip(b *testing.B) {
	tg, _ := newMemTarget(1<<20, Options{})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			ServeControl(c, tg)
		}
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	cl := NewCutClient(c)
	ctx := context.Background()
	b.ResetTimer()
	for i := range b.N {
		if err := cl.Cut(ctx, uint64(i+1)); err != nil {
			b.Fatal(err)
		}
	}
}
