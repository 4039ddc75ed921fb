package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"syscall"

	"github.com/remora-ha/remora/arbiter"
)

// Client talks to a local agent's API socket.
type Client struct {
	socket string // or the TCP address
	base   string // URL prefix; empty for the unix socket
	http   *http.Client
}

// NewTLSClient returns a client for an agent's admin API over TCP with
// mutual TLS (api_listen), presenting the certificate in cfg.
func NewTLSClient(addr string, cfg *tls.Config) *Client {
	return &Client{socket: addr, base: "https://" + addr, http: &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}}
}

// NewClient returns a client for the agent serving socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}}
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body bytes.Buffer
	if in != nil {
		if err := json.NewEncoder(&body).Encode(in); err != nil {
			return err
		}
	}
	base := c.base
	if base == "" {
		base = "http://agent"
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, &body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("no agent at %s: start one with `remora agent --config agent.yaml`, or point --socket at its api_socket", c.socket)
		}
		return fmt.Errorf("agent at %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e Error
		if json.NewDecoder(resp.Body).Decode(&e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("agent answered %s", resp.Status)
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func (c *Client) Status(ctx context.Context) ([]VMStatus, error) {
	var out []VMStatus
	err := c.do(ctx, http.MethodGet, "/v1/vms", nil, &out)
	return out, err
}

// Agent returns the agent's own status.
func (c *Client) Agent(ctx context.Context) (AgentInfo, error) {
	var out AgentInfo
	err := c.do(ctx, http.MethodGet, "/v1/agent", nil, &out)
	return out, err
}

// VM returns the status of one guest, or an error naming it if the agent
// does not list it.
func (c *Client) VM(ctx context.Context, name string) (VMStatus, error) {
	st, err := c.Status(ctx)
	if err != nil {
		return VMStatus{}, err
	}
	for _, s := range st {
		if s.Guest == name {
			return s, nil
		}
	}
	return VMStatus{}, fmt.Errorf("guest %q is not listed by the agent at %s (`remora vm status` lists the guests it has)", name, c.socket)
}

// Events returns a guest's history on the agent, oldest first.
func (c *Client) Events(ctx context.Context, guest string) ([]Event, error) {
	var out []Event
	err := c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(guest)+"/events", nil, &out)
	return out, err
}

func (c *Client) Enroll(ctx context.Context, guest, standby string, probe arbiter.ProbeSpec) error {
	return c.do(ctx, http.MethodPost, "/v1/enroll", EnrollRequest{Guest: guest, Standby: standby, Probe: probe}, nil)
}

func (c *Client) Failover(ctx context.Context, guest string, force bool) (FailoverResult, error) {
	var out FailoverResult
	err := c.do(ctx, http.MethodPost, "/v1/failover", GuestRequest{Guest: guest, Force: force}, &out)
	return out, err
}

// Reprotect protects a guest failed over to the agent's host onto standby
// (host:port), or onto the standby the arbiter names when it is empty.
func (c *Client) Reprotect(ctx context.Context, guest, standby string) error {
	return c.do(ctx, http.MethodPost, "/v1/reprotect", EnrollRequest{Guest: guest, Standby: standby}, nil)
}

// Switchover moves a guest protected from the agent's host to its standby
// with no loss; Failback moves it to its home host (its standby).
func (c *Client) Switchover(ctx context.Context, guest string) (SwitchoverResult, error) {
	var out SwitchoverResult
	err := c.do(ctx, http.MethodPost, "/v1/switchover", GuestRequest{Guest: guest}, &out)
	return out, err
}

func (c *Client) Failback(ctx context.Context, guest string) (SwitchoverResult, error) {
	var out SwitchoverResult
	err := c.do(ctx, http.MethodPost, "/v1/failback", GuestRequest{Guest: guest}, &out)
	return out, err
}

// Drain switches every guest the agent's host runs as primary over to its
// standby; Undrain has the guests whose home it is switched back.
func (c *Client) Drain(ctx context.Context) ([]MoveOutcome, error) {
	var out []MoveOutcome
	err := c.do(ctx, http.MethodPost, "/v1/drain", struct{}{}, &out)
	return out, err
}

func (c *Client) Undrain(ctx context.Context) ([]MoveOutcome, error) {
	var out []MoveOutcome
	err := c.do(ctx, http.MethodPost, "/v1/undrain", struct{}{}, &out)
	return out, err
}

func (c *Client) Unenroll(ctx context.Context, guest string) error {
	return c.do(ctx, http.MethodPost, "/v1/unenroll", GuestRequest{Guest: guest}, nil)
}
