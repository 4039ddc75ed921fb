package arbiter

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// DefaultCallTimeout bounds a request whose context has no deadline.
const DefaultCallTimeout = 10 * time.Second

// Client talks to one arbiter over a single mutual-TLS connection. It is
// safe for concurrent use, but requests are sent one at a time: an agent
// with many guests may prefer one Client per guest so that a slow request
// never delays another guest's renewal. After a connection failure the
// next request (or the retry of the failed one) dials again.
type Client struct {
	addr string
	cfg  *tls.Config

	mu     sync.Mutex
	conn   *tls.Conn
	nextID uint64
	closed bool
}

// Dial connects to the arbiter at addr (host:port). cfg must carry the
// agent's certificate (see pki.ClientConfig); if cfg.ServerName is empty
// the host part of addr is used to verify the arbiter's certificate.
func Dial(ctx context.Context, addr string, cfg *tls.Config) (*Client, error) {
	c, err := NewClient(addr, cfg)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.connectLocked(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// NewClient is Dial without connecting: the first call connects. Agents use
// it so that an arbiter that is down at start does not stop them.
func NewClient(addr string, cfg *tls.Config) (*Client, error) {
	if cfg == nil {
		return nil, errors.New("arbiter: TLS config required")
	}
	cfg = cfg.Clone()
	if cfg.MinVersion < tls.VersionTLS13 {
		cfg.MinVersion = tls.VersionTLS13
	}
	if cfg.ServerName == "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("arbiter: address %q: %w", addr, err)
		}
		cfg.ServerName = host
	}
	return &Client{addr: addr, cfg: cfg}, nil
}

// Addr returns the arbiter address.
func (c *Client) Addr() string { return c.addr }

// Close closes the connection; later calls fail.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn = nil
	return err
}

func (c *Client) connectLocked(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCallTimeout)
		defer cancel()
	}
	d := tls.Dialer{Config: c.cfg}
	conn, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return transportError(c.addr, "connect", err)
	}
	c.conn = conn.(*tls.Conn)
	return nil
}

// transportError wraps a network failure. An alert from the arbiter
// (typically: our certificate was refused) is reported as ErrUnauthorized,
// which retrying cannot fix.
func transportError(addr, what string, err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "remote error" {
		return &Error{Code: CodeUnauthorized, Message: fmt.Sprintf("arbiter %s rejected the TLS session (%v); check the certificate and CA", addr, err), cause: err}
	}
	return &Error{Code: CodeUnavailable, Message: fmt.Sprintf("%s %s: %v", what, addr, err), cause: err}
}

// call sends req and returns the response, retrying once on a fresh
// connection if a reused one turns out to be broken. All operations are
// idempotent for a given epoch, so a retry after a lost reply is safe.
func (c *Client) call(ctx context.Context, req *request) (*response, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, &Error{Code: CodeUnavailable, Message: "client closed"}
	}
	req.V = ProtocolVersion
	var lastErr error
	for attempt := 0; attempt < 2; attempt++ {
		fresh := false
		if c.conn == nil {
			if err := c.connectLocked(ctx); err != nil {
				return nil, err
			}
			fresh = true
		}
		resp, err := c.roundTripLocked(ctx, req)
		if err == nil {
			if resp.Err != nil {
				if resp.Err.Code == CodeUnauthorized || resp.Err.Code == CodeVersion {
					// The arbiter closes the connection after these.
					c.conn.Close()
					c.conn = nil
				}
				return nil, resp.Err
			}
			return resp, nil
		}
		c.conn.Close()
		c.conn = nil
		lastErr = err
		if fresh || ctx.Err() != nil || !errors.Is(err, ErrUnavailable) {
			break
		}
	}
	return nil, lastErr
}

func (c *Client) roundTripLocked(ctx context.Context, req *request) (*response, error) {
	c.nextID++
	req.ID = c.nextID
	conn := c.conn
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(DefaultCallTimeout)
	}
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	fail := func(what string, err error) error {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return transportError(c.addr, what, err)
	}
	if err := writeFrame(conn, req); err != nil {
		return nil, fail("send to", err)
	}
	body, err := readFrame(conn)
	if err != nil {
		return nil, fail("receive from", err)
	}
	v, err := peekVersion(body)
	if err != nil {
		return nil, &Error{Code: CodeBadRequest, Message: fmt.Sprintf("undecodable reply from %s: %v", c.addr, err)}
	}
	if v != ProtocolVersion {
		return nil, &Error{Code: CodeVersion, Message: fmt.Sprintf("arbiter %s speaks protocol version %d, this client speaks %d", c.addr, v, ProtocolVersion)}
	}
	var resp response
	if err := json.Unmarshal(body, &resp); err != nil {
		return nil, &Error{Code: CodeBadRequest, Message: fmt.Sprintf("undecodable reply from %s: %v", c.addr, err)}
	}
	if resp.ID != req.ID && resp.ID != 0 {
		return nil, &Error{Code: CodeUnavailable, Message: fmt.Sprintf("reply id %d for request %d from %s", resp.ID, req.ID, c.addr)}
	}
	return &resp, nil
}

// localLease fills in ValidUntil from the time the request was sent.
func localLease(l Lease, sent time.Time) Lease {
	margin := time.Duration(float64(l.Duration) * DriftMargin)
	l.ValidUntil = sent.Add(l.Duration - margin)
	return l
}

// Register announces the agent as primary or standby for spec.Guest. See
// the package documentation for the epoch rules.
func (c *Client) Register(ctx context.Context, spec GuestSpec) (Registration, error) {
	sent := time.Now()
	resp, err := c.call(ctx, &request{Op: opRegister, Agent: spec.AgentID, Guest: spec.Guest, Epoch: spec.Epoch, Spec: &spec})
	if err != nil {
		return Registration{}, err
	}
	if resp.Registration == nil {
		return Registration{}, &Error{Code: CodeBadRequest, Message: "register reply without registration"}
	}
	reg := *resp.Registration
	if reg.Lease != nil {
		l := localLease(*reg.Lease, sent)
		reg.Lease = &l
	}
	return reg, nil
}

// Renew extends the primary's lease. On ErrStaleEpoch the caller has been
// replaced and must stop the guest at once.
func (c *Client) Renew(ctx context.Context, guest, agentID string, epoch uint64) (Lease, error) {
	return c.leaseCall(ctx, &request{Op: opRenew, Agent: agentID, Guest: guest, Epoch: epoch})
}

// Suspend asks the arbiter to hold off promotion for d (at most the
// arbiter's MaxSuspend) because the primary's agent is about to restart
// on purpose, for an upgrade, while its guest keeps running. The epoch
// rules are those of Renew. The returned lease is a normal one for the
// caller (use ValidUntil as after Renew); Lease.Expires is when the
// arbiter's hold ends. Registering or renewing again ends the hold.
func (c *Client) Suspend(ctx context.Context, guest, agentID string, epoch uint64, d time.Duration) (Lease, error) {
	return c.leaseCall(ctx, &request{Op: opSuspend, Agent: agentID, Guest: guest, Epoch: epoch, Duration: d})
}

// Release gives up the primary's lease early (planned switchover), so the
// standby can be promoted without waiting for expiry. Call it only after
// the guest has stopped.
func (c *Client) Release(ctx context.Context, guest, agentID string, epoch uint64) error {
	_, err := c.call(ctx, &request{Op: opRelease, Agent: agentID, Guest: guest, Epoch: epoch})
	return err
}

// Handover makes the in-sync standby the primary at a new epoch, on the
// primary's request (planned switchover): the caller must have stopped
// its guest and taken the final checkpoint the standby acknowledged. The
// Grant is for the standby (its lease, its new epoch); the caller hands
// it over, and its own copy is stale from now on. Retrying after a lost
// answer returns the same grant.
func (c *Client) Handover(ctx context.Context, guest, agentID string, epoch uint64, standbyID string) (Grant, error) {
	return c.grantCall(ctx, &request{Op: opHandover, Agent: agentID, Guest: guest, Epoch: epoch, Standby: standbyID})
}

// grantCall makes a call answered with a Grant, its lease valid until a
// time on the local clock.
func (c *Client) grantCall(ctx context.Context, req *request) (Grant, error) {
	sent := time.Now()
	resp, err := c.call(ctx, req)
	if err != nil {
		return Grant{}, err
	}
	if resp.Grant == nil {
		return Grant{}, &Error{Code: CodeBadRequest, Message: req.Op + " reply without grant"}
	}
	g := *resp.Grant
	g.Lease = localLease(g.Lease, sent)
	return g, nil
}

// RequestPromotion asks for the standby to become primary. On success the
// caller is primary at Grant.Epoch and holds Grant.Lease.
func (c *Client) RequestPromotion(ctx context.Context, guest, agentID string, epoch uint64) (Grant, error) {
	return c.grantCall(ctx, &request{Op: opPromote, Agent: agentID, Guest: guest, Epoch: epoch})
}

// ReportStandbyLost asks that the primary may continue without its
// standby. On success the returned lease carries the primary's new epoch
// (the old one is now stale, fencing the standby's copy).
func (c *Client) ReportStandbyLost(ctx context.Context, guest, agentID string, epoch uint64) (Lease, error) {
	return c.leaseCall(ctx, &request{Op: opStandbyLost, Agent: agentID, Guest: guest, Epoch: epoch})
}

// ReportSynced tells the arbiter that standbyID holds a complete,
// consistent copy, making the guest protected (promotable) again.
func (c *Client) ReportSynced(ctx context.Context, guest, agentID string, epoch uint64, standbyID string) error {
	_, err := c.call(ctx, &request{Op: opSynced, Agent: agentID, Guest: guest, Epoch: epoch, Standby: standbyID})
	return err
}

// Retire tells the arbiter that the primary unenrolled guest: its roles
// and lease are forgotten and its epoch moves on, so that copies left from
// the enrollment are stale. Retrying after a lost answer is safe.
func (c *Client) Retire(ctx context.Context, guest, agentID string, epoch uint64) error {
	_, err := c.call(ctx, &request{Op: opRetire, Agent: agentID, Guest: guest, Epoch: epoch})
	return err
}

// HeartbeatReply is the arbiter's answer to a heartbeat.
type HeartbeatReply struct {
	Assignments []Assignment
	// SuspectAfter is the arbiter's detector timeout: silent this long,
	// the agent's primaries may be failed over (zero from an arbiter that
	// does not say).
	SuspectAfter time.Duration
}

// Heartbeat tells the arbiter the agent is alive and returns its current
// assignments. epochs (optional) maps guests to the epoch the agent holds;
// assignments for guests whose epoch moved on are marked Stale.
func (c *Client) Heartbeat(ctx context.Context, agentID string, epochs map[string]uint64) (HeartbeatReply, error) {
	resp, err := c.call(ctx, &request{Op: opHeartbeat, Agent: agentID, Epochs: epochs})
	if err != nil {
		return HeartbeatReply{}, err
	}
	return HeartbeatReply{Assignments: resp.Assignments, SuspectAfter: time.Duration(resp.SuspectAfterMs) * time.Millisecond}, nil
}

// Status returns the arbiter's view of all guests and agents. Any
// certificate from the CA may ask.
func (c *Client) Status(ctx context.Context) (Status, error) {
	resp, err := c.call(ctx, &request{Op: opStatus})
	if err != nil {
		return Status{}, err
	}
	if resp.Status == nil {
		return Status{}, &Error{Code: CodeBadRequest, Message: "status reply without status"}
	}
	return *resp.Status, nil
}

func (c *Client) leaseCall(ctx context.Context, req *request) (Lease, error) {
	sent := time.Now()
	resp, err := c.call(ctx, req)
	if err != nil {
		return Lease{}, err
	}
	if resp.Lease == nil {
		return Lease{}, &Error{Code: CodeBadRequest, Message: req.Op + " reply without lease"}
	}
	return localLease(*resp.Lease, sent), nil
}
