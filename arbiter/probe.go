package arbiter

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"sync"
	"time"
)

// Probe runs one check as described by spec and returns its latency.
// Timeout bounds the whole exchange (connect, send, reply).
func Probe(ctx context.Context, spec ProbeSpec) (time.Duration, error) {
	if spec.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, spec.Timeout)
		defer cancel()
	}
	start := time.Now()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", spec.Address)
	if err != nil {
		return time.Since(start), err
	}
	defer conn.Close()
	if spec.Kind != ProbeLine {
		return time.Since(start), nil
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := conn.Write([]byte(spec.Send + "\n")); err != nil {
		return time.Since(start), fmt.Errorf("send: %w", err)
	}
	// Bound the reply so a misbehaving service cannot make us buffer
	// without limit; an unterminated or over-long line still counts.
	line, err := bufio.NewReader(io.LimitReader(conn, 4096)).ReadString('\n')
	if err != nil && !(errors.Is(err, io.EOF) && line != "") {
		return time.Since(start), fmt.Errorf("read reply: %w", err)
	}
	lat := time.Since(start)
	reply := strings.TrimRight(string(line), "\r\n")
	if spec.ExpectPrefix != "" && !strings.HasPrefix(reply, spec.ExpectPrefix) {
		return lat, fmt.Errorf("reply %q lacks prefix %q", clip(reply), spec.ExpectPrefix)
	}
	if spec.ExpectRegexp != "" {
		re, err := regexp.Compile(spec.ExpectRegexp)
		if err != nil {
			return lat, err
		}
		if !re.MatchString(reply) {
			return lat, fmt.Errorf("reply %q does not match %q", clip(reply), spec.ExpectRegexp)
		}
	}
	return lat, nil
}

func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// probeRunner runs probes periodically, one goroutine per target, and keeps
// the latest result of each. Targets are keyed ("service/<guest>",
// "agent/<id>") and reconciled from the arbiter state with set.
type probeRunner struct {
	ctx context.Context

	mu      sync.Mutex
	targets map[string]*probeTarget
	wg      sync.WaitGroup
}

type probeTarget struct {
	spec   ProbeSpec
	cancel context.CancelFunc
	status ProbeStatus
	// started is when the probe behind status began; an older probe that
	// finishes late must not overwrite a newer result.
	started time.Time
}

func newProbeRunner(ctx context.Context) *probeRunner {
	return &probeRunner{ctx: ctx, targets: map[string]*probeTarget{}}
}

// set makes the running targets equal want: new ones are started, changed
// ones restarted (losing their history), missing ones stopped.
func (p *probeRunner) set(want map[string]ProbeSpec) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, t := range p.targets {
		if spec, ok := want[key]; !ok || spec != t.spec {
			t.cancel()
			delete(p.targets, key)
		}
	}
	if p.ctx.Err() != nil {
		return
	}
	for key, spec := range want {
		if _, ok := p.targets[key]; ok {
			continue
		}
		ctx, cancel := context.WithCancel(p.ctx)
		t := &probeTarget{spec: spec, cancel: cancel, status: ProbeStatus{Kind: spec.Kind, Address: spec.Address}}
		p.targets[key] = t
		p.wg.Add(1)
		go p.loop(ctx, t)
	}
}

func (p *probeRunner) loop(ctx context.Context, t *probeTarget) {
	defer p.wg.Done()
	tick := time.NewTicker(t.spec.Interval)
	defer tick.Stop()
	for {
		p.runOnce(ctx, t)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// runOnce probes and records the result. It returns this probe's own
// outcome, which may be newer than what a concurrent probe recorded.
func (p *probeRunner) runOnce(ctx context.Context, t *probeTarget) ProbeStatus {
	start := time.Now()
	lat, err := Probe(ctx, t.spec)
	p.mu.Lock()
	defer p.mu.Unlock()
	if ctx.Err() != nil && err != nil {
		// Cancelled (shutdown or spec change), not a real failure.
		return t.status
	}
	now := time.Now()
	s := t.status
	s.At, s.Latency, s.OK = now, lat, err == nil
	if err != nil {
		s.Error = err.Error()
		s.ConsecutiveFailures++
	} else {
		s.Error = ""
		s.ConsecutiveFailures = 0
		s.LastOK = now
	}
	if start.After(t.started) {
		t.started = start
		t.status = s
	}
	return s
}

// probeNow runs the key's probe immediately and returns the result; ok is
// false if there is no such target.
func (p *probeRunner) probeNow(ctx context.Context, key string) (ProbeStatus, bool) {
	p.mu.Lock()
	t, ok := p.targets[key]
	p.mu.Unlock()
	if !ok {
		return ProbeStatus{}, false
	}
	return p.runOnce(ctx, t), true
}

func (p *probeRunner) status(key string) (ProbeStatus, ProbeSpec, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.targets[key]
	if !ok {
		return ProbeStatus{}, ProbeSpec{}, false
	}
	return t.status, t.spec, true
}

func (p *probeRunner) wait() { p.wg.Wait() }

// fresh reports whether a probe result is recent enough to act on: no
// older than two intervals plus a timeout.
func fresh(st ProbeStatus, spec ProbeSpec) bool {
	return !st.At.IsZero() && time.Since(st.At) <= 2*spec.Interval+spec.Timeout
}

func describe(st ProbeStatus) string {
	if st.At.IsZero() {
		return fmt.Sprintf("%s %s: not probed yet", st.Kind, st.Address)
	}
	ago := time.Since(st.At).Round(time.Millisecond)
	if st.OK {
		return fmt.Sprintf("%s %s ok in %v, %v ago", st.Kind, st.Address, st.Latency.Round(time.Microsecond), ago)
	}
	return fmt.Sprintf("%s %s failing x%d: %s, %v ago", st.Kind, st.Address, st.ConsecutiveFailures, st.Error, ago)
}
