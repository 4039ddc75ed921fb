//go:build linux

package txlog

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const crashChildEnv = "TXLOG_CRASH_CHILD_DIR"

var crashOpts = Options{SegmentSize: 64 << 10} // small: rotations happen under fire

// TestCrashRecovery re-executes the test binary as a child that appends from
// several goroutines and prints every record Append acknowledged as
// durable. The parent SIGKILLs it at a random moment, reopens the log and
// checks that nothing acknowledged was lost or changed and that LSNs are
// contiguous; then it starts the next child on the same log.
func TestCrashRecovery(t *testing.T) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(dir)
		return
	}
	iterations := 30
	if testing.Short() {
		iterations = 8
	}
	dir := t.TempDir()
	acked := map[LSN][]byte{}     // durable plain records
	committed := map[uint64]LSN{} // transactions whose COMMIT was durable
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	start := time.Now()
	for it := 0; it < iterations; it++ {
		lines, stderr := runAndKill(t, dir, time.Duration(5+rng.IntN(120))*time.Millisecond)
		for _, ln := range lines {
			f := strings.Fields(ln)
			switch {
			case len(f) == 3 && f[0] == "R":
				lsn, err1 := strconv.ParseUint(f[1], 10, 64)
				p, err2 := hex.DecodeString(strings.TrimPrefix(f[2], "p"))
				if err1 != nil || err2 != nil {
					t.Fatalf("bad child line %q", ln)
				}
				acked[LSN(lsn)] = p
			case len(f) == 3 && f[0] == "C":
				id, err1 := strconv.ParseUint(f[1], 10, 64)
				lsn, err2 := strconv.ParseUint(f[2], 10, 64)
				if err1 != nil || err2 != nil {
					t.Fatalf("bad child line %q", ln)
				}
				committed[id] = LSN(lsn)
			default:
				t.Fatalf("bad child line %q (stderr: %s)", ln, stderr)
			}
		}

		l, rec, err := Open(dir, crashOpts)
		if err != nil {
			t.Fatalf("iteration %d: reopen after SIGKILL: %v", it, err)
		}
		seen := 0
		next := rec.FirstLSN
		err = l.Iterate(0, func(r Record) error {
			if r.LSN != next {
				return fmt.Errorf("LSN %d follows %d", r.LSN, next-1)
			}
			next++
			if p, ok := acked[r.LSN]; ok {
				if r.Type != TypePlain || !bytes.Equal(r.Payload, p) {
					return fmt.Errorf("acknowledged LSN %d came back as %v %q, want PLAIN %q", r.LSN, r.Type, r.Payload, p)
				}
				seen++
			}
			return nil
		})
		if err != nil {
			t.Fatalf("iteration %d: %v", it, err)
		}
		for lsn := range acked {
			if lsn > rec.LastLSN {
				t.Fatalf("iteration %d: acknowledged LSN %d lost, log ends at %d", it, lsn, rec.LastLSN)
			}
			if lsn >= rec.FirstLSN {
				seen--
			}
		}
		if seen != 0 {
			t.Fatalf("iteration %d: %d acknowledged records missing", it, -seen)
		}
		for id, lsn := range committed {
			tx := rec.Txns[id]
			switch {
			case tx != nil && tx.State != TxnCommitted:
				t.Fatalf("iteration %d: txn %d committed durably at LSN %d but recovered as %v", it, id, lsn, tx.State)
			case tx == nil && (rec.Checkpoint == nil || lsn > rec.Checkpoint.LSN):
				t.Fatalf("iteration %d: txn %d committed durably at LSN %d is missing from recovery", it, id, lsn)
			}
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%d kills in %v: %d acknowledged records, %d committed transactions", iterations, time.Since(start).Round(time.Millisecond), len(acked), len(committed))
	if len(acked) == 0 || len(committed) == 0 {
		t.Fatal("the child never acknowledged anything; the test proved nothing")
	}
}

// runAndKill starts a child on dir, lets it run for d after its first
// acknowledgement, SIGKILLs it and returns the complete lines it printed.
func runAndKill(t *testing.T, dir string, d time.Duration) ([]string, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashRecovery$", "-test.timeout=30s")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
	// Never leave a writer running if the parent dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var lines []string
	first := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		r := bufio.NewReader(out)
		for {
			ln, err := r.ReadString('\n')
			if err != nil {
				return // a line cut by the kill was never fully acknowledged
			}
			if len(lines) == 0 {
				close(first)
			}
			lines = append(lines, strings.TrimSuffix(ln, "\n"))
		}
	}()
	select {
	case <-first:
		time.Sleep(d)
	case <-done:
	case <-time.After(10 * time.Second):
	}
	cmd.Process.Kill()
	<-done
	err = cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
		t.Fatalf("child exited on its own (%v): %s", err, stderr.String())
	}
	_, _ = io.Copy(io.Discard, out)
	return lines, stderr.String()
}

// crashChild appends until it is killed. Each line it prints is printed
// only after the matching Append returned, i.e. after fdatasync.
func crashChild(dir string) {
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "crash child:", err)
		os.Exit(3)
	}
	l, _, err := Open(dir, crashOpts)
	if err != nil {
		fail(err)
	}
	time.AfterFunc(20*time.Second, func() { fail(fmt.Errorf("not killed in time")) })
	var outMu sync.Mutex
	say := func(format string, args ...any) {
		line := fmt.Sprintf(format, args...)
		outMu.Lock()
		os.Stdout.WriteString(line) // one write per line, unbuffered
		outMu.Unlock()
	}
	ctx := context.Background()
	ep := l.Epoch()
	for g := 0; g < 6; g++ {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(os.Getpid()), uint64(g)))
			for i := 0; ; i++ {
				p := make([]byte, rng.IntN(300))
				for k := range p {
					p[k] = byte(rng.Uint32())
				}
				switch i % 5 {
				case 0, 1, 2:
					lsn, err := l.Append(ctx, Record{Type: TypePlain, Epoch: ep, Payload: p})
					if err != nil {
						fail(err)
					}
					say("R %d p%x\n", lsn, p) // "p" keeps an empty payload a field
				case 3:
					if _, err := l.AppendAsync(ctx, Record{Type: TypePlain, Epoch: ep, Payload: p}); err != nil {
						fail(err)
					}
				case 4:
					id := rng.Uint64() | 1
					for _, r := range []Record{{Type: TypeBegin, TxID: id}, {Type: TypeData, TxID: id, Payload: p}} {
						r.Epoch = ep
						if _, err := l.AppendAsync(ctx, r); err != nil {
							fail(err)
						}
					}
					lsn, err := l.Append(ctx, Record{Type: TypeCommit, Epoch: ep, TxID: id})
					if err != nil {
						fail(err)
					}
					say("C %d %d\n", id, lsn)
					if i%2 == 0 {
						if _, err := l.AppendAsync(ctx, Record{Type: TypeEnd, Epoch: ep, TxID: id}); err != nil {
							fail(err)
						}
					}
				}
			}
		}()
	}
	for {
		time.Sleep(20 * time.Millisecond)
		if _, err := l.Checkpoint(ctx, ep, []byte("crash-test state")); err != nil {
			fail(err)
		}
		if _, err := l.Compact(ctx); err != nil {
			fail(err)
		}
	}
}
