//go:build linux

package labkit

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/florianl/go-nfqueue/v2"
)

// Netem delays and drops the packets between a lab namespace and one
// peer, as `tc qdisc ... netem delay D J loss L` would: this machine's
// kernel has no sch_netem. iptables hands the packets to an NFQUEUE and
// the verdict (accept, or drop with probability Loss) comes after Delay
// plus or minus up to Jitter, so packets can also be reordered, as with
// netem's jitter.
type Netem struct {
	ns, peer string
	queue    uint16
	nf       *nfqueue.Nfqueue
	cancel   context.CancelFunc

	mu      sync.Mutex // verdicts are sent one at a time
	rnd     *rand.Rand
	delay   time.Duration
	jitter  time.Duration
	loss    float64
	pending sync.WaitGroup
}

var netemQueues struct {
	sync.Mutex
	next uint16
}

// StartNetem impairs the traffic between namespace ns and peer (an IP),
// both ways, until Stop.
func StartNetem(ns, peer string, delay, jitter time.Duration, loss float64, seed uint64) (*Netem, error) {
	netemQueues.Lock()
	netemQueues.next++
	q := 100 + netemQueues.next
	netemQueues.Unlock()
	n := &Netem{ns: ns, peer: peer, queue: q, delay: delay, jitter: jitter, loss: loss, rnd: rand.New(rand.NewPCG(seed, uint64(q)))}
	f, err := os.Open(NetnsPath(ns))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	nf, err := nfqueue.Open(&nfqueue.Config{NetNS: int(f.Fd()), NfQueue: q, MaxPacketLen: 0, MaxQueueLen: 1 << 16,
		Copymode: nfqueue.NfQnlCopyMeta, WriteTimeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("labkit: netem: open NFQUEUE %d in %s: %w", q, ns, err)
	}
	n.nf = nf
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	if err := nf.RegisterWithErrorFunc(ctx, n.packet, func(error) int { return 0 }); err != nil {
		cancel()
		nf.Close()
		return nil, fmt.Errorf("labkit: netem: %w", err)
	}
	if err := n.rules("-I"); err != nil {
		n.Stop()
		return nil, err
	}
	return n, nil
}

func (n *Netem) rules(op string) error {
	qn := strconv.Itoa(int(n.queue))
	for _, r := range [][]string{
		{"OUTPUT", "-d", n.peer},
		{"INPUT", "-s", n.peer},
	} {
		args := append([]string{op}, r...)
		args = append(args, "-j", "NFQUEUE", "--queue-num", qn, "--queue-bypass")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := NetnsCommand(ctx, n.ns, "iptables", args...).CombinedOutput()
		cancel()
		if err != nil && op != "-D" {
			return fmt.Errorf("labkit: netem: iptables %v in %s: %v: %s", args, n.ns, err, out)
		}
	}
	return nil
}

// packet decides one packet's fate.
func (n *Netem) packet(a nfqueue.Attribute) int {
	if a.PacketID == nil {
		return 0
	}
	id := *a.PacketID
	n.mu.Lock()
	drop := n.rnd.Float64() < n.loss
	d := n.delay
	if n.jitter > 0 {
		d += time.Duration(n.rnd.Int64N(int64(2*n.jitter))) - n.jitter
	}
	n.mu.Unlock()
	verdict := nfqueue.NfAccept
	if drop {
		verdict = nfqueue.NfDrop
		d = 0
	}
	n.pending.Add(1)
	time.AfterFunc(max(d, 0), func() {
		defer n.pending.Done()
		n.mu.Lock()
		_ = n.nf.SetVerdict(id, verdict)
		n.mu.Unlock()
	})
	return 0
}

// Stop lets the traffic flow again: queued packets are passed on.
func (n *Netem) Stop() {
	_ = n.rules("-D")
	n.pending.Wait()
	n.cancel()
	n.nf.Close()
}
