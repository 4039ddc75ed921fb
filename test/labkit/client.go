package labkit

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Client talks to the guest workload (test/guest): one request line, one
// reply line. It is safe for concurrent use (requests are serialized). A
// request that fails in transport (or ends with its ctx) breaks the client:
// the reply may still arrive, so later requests fail too; dial again.
type Client struct {
	mu     sync.Mutex
	conn   net.Conn
	r      *bufio.Reader
	broken error
}

// Dial connects from the root namespace, with a 10 s connect timeout.
func Dial(addr string) (*Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return DialContext(ctx, addr)
}

// DialContext connects from the root namespace.
func DialContext(ctx context.Context, addr string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp4", addr)
	if err != nil {
		return nil, err
	}
	return newClient(c), nil
}

func newClient(c net.Conn) *Client {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	return &Client{conn: c, r: bufio.NewReader(c)}
}

// Conn is the underlying connection.
func (c *Client) Conn() net.Conn { return c.conn }

func (c *Client) Close() error { return c.conn.Close() }

// ErrReply is wrapped by errors for "err ..." replies of the workload.
var ErrReply = errors.New("workload error")

// Do sends one command line and returns the reply line (without newline).
// ctx bounds the whole exchange.
func (c *Client) Do(ctx context.Context, cmd string) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.broken != nil {
		return "", fmt.Errorf("labkit: client broken by an earlier error: %w", c.broken)
	}
	dl, _ := ctx.Deadline()
	c.conn.SetDeadline(dl) // zero: none
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	reply, err := c.exchange(cmd)
	// The socket deadline can fire a moment before ctx reports it.
	var ne net.Error
	if err != nil && errors.As(err, &ne) && ne.Timeout() && !dl.IsZero() && !time.Now().Before(dl) && ctx.Err() == nil {
		err = fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
	} else if !stop() || ctx.Err() != nil {
		if err == nil {
			err = ctx.Err()
		} else {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
	}
	if err != nil {
		c.broken = err
		return "", fmt.Errorf("labkit: %s %q: %w", c.conn.RemoteAddr(), cmd, err)
	}
	return reply, nil
}

func (c *Client) exchange(cmd string) (string, error) {
	if _, err := c.conn.Write([]byte(cmd + "\n")); err != nil {
		return "", err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimRight(line, "\r\n"), nil
}

func (c *Client) doValue(ctx context.Context, cmd string) (string, error) {
	r, err := c.Do(ctx, cmd)
	if err != nil {
		return "", err
	}
	if strings.HasPrefix(r, "err") {
		return "", fmt.Errorf("labkit: %q: %w: %s", cmd, ErrReply, r)
	}
	return r, nil
}

func (c *Client) doUint(ctx context.Context, cmd string) (uint64, error) {
	r, err := c.doValue(ctx, cmd)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(r, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("labkit: %q: unexpected reply %q", cmd, r)
	}
	return v, nil
}

// Inc increments the guest's counter and returns the new value.
func (c *Client) Inc(ctx context.Context) (uint64, error) { return c.doUint(ctx, "inc") }

// Get returns the guest's counter.
func (c *Client) Get(ctx context.Context) (uint64, error) { return c.doUint(ctx, "get") }

// CheckResult is the outcome of the workload's integrity check.
type CheckResult struct {
	OK       bool
	Round    uint64 // round being written (OK only)
	Boundary uint64 // next page the writer writes in Round (OK only)
	Reason   string // why it failed (not OK only)
	Reply    string // the raw reply
}

func (r CheckResult) String() string { return r.Reply }

// Check runs the integrity check of the guest's memory region. A failed
// check is a result with OK false, not an error; errors are transport
// errors and unexpected replies.
func (c *Client) Check(ctx context.Context) (CheckResult, error) {
	r, err := c.doValue(ctx, "check")
	if err != nil {
		return CheckResult{}, err
	}
	res := CheckResult{Reply: r}
	switch {
	case strings.HasPrefix(r, "fail "):
		res.Reason = strings.TrimPrefix(r, "fail ")
		return res, nil
	case strings.HasPrefix(r, "ok "):
		if _, err := fmt.Sscanf(r, "ok round=%d boundary=%d", &res.Round, &res.Boundary); err != nil {
			return res, fmt.Errorf("labkit: check: unexpected reply %q", r)
		}
		res.OK = true
		return res, nil
	}
	return res, fmt.Errorf("labkit: check: unexpected reply %q", r)
}

// SetWriterRate sets the guest's memory writer rate in pages per second (0
// stops it).
func (c *Client) SetWriterRate(ctx context.Context, pagesPerSec int) error {
	r, err := c.doValue(ctx, fmt.Sprintf("writer %d", pagesPerSec))
	if err != nil {
		return err
	}
	if r != "ok" {
		return fmt.Errorf("labkit: writer %d: unexpected reply %q", pagesPerSec, r)
	}
	return nil
}

// Stats is the workload's stats line.
type Stats struct {
	Counter     uint64
	Round       uint64
	Boundary    uint64
	Written     uint64 // pages written since the workload started
	Rate        uint64 // writer rate, pages/s
	RegionPages uint64
	Checks      uint64
	Uptime      time.Duration     // of the workload process
	Fields      map[string]string // every key=value of the reply
}

// Stats returns the workload's counters.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	r, err := c.doValue(ctx, "stats")
	if err != nil {
		return Stats{}, err
	}
	s := Stats{Fields: map[string]string{}}
	for _, f := range strings.Fields(r) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return s, fmt.Errorf("labkit: stats: unexpected reply %q", r)
		}
		s.Fields[k] = v
	}
	for k, p := range map[string]*uint64{"counter": &s.Counter, "round": &s.Round, "boundary": &s.Boundary,
		"written": &s.Written, "rate": &s.Rate, "region_pages": &s.RegionPages, "checks": &s.Checks} {
		v, err := strconv.ParseUint(s.Fields[k], 10, 64)
		if err != nil {
			return s, fmt.Errorf("labkit: stats: bad %s in %q", k, r)
		}
		*p = v
	}
	up, err := strconv.ParseFloat(s.Fields["uptime"], 64)
	if err != nil {
		return s, fmt.Errorf("labkit: stats: bad uptime in %q", r)
	}
	s.Uptime = time.Duration(up * float64(time.Second))
	return s, nil
}
