// Package virt is remora's libvirt layer, the only package that imports
// libvirt (cgo): the connection, QMP through libvirt's monitor passthrough,
// domain lookup, the standby shell and domain XML (read and built with
// libvirtxml).
package virt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"libvirt.org/go/libvirt"
)

var eventLoopOnce sync.Once

// startEventLoop registers libvirt's default event loop; libvirt requires
// it before the first connection for keepalive and monitor events to work.
func startEventLoop() error {
	var err error
	eventLoopOnce.Do(func() {
		if err = libvirt.EventRegisterDefaultImpl(); err != nil {
			return
		}
		go func() {
			for {
				if err := libvirt.EventRunDefaultImpl(); err != nil {
					slog.Error("libvirt event loop", "err", err)
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	})
	return err
}

// Conn is a libvirt connection that reconnects when the daemon restarts.
type Conn struct {
	uri string

	mu   sync.Mutex
	conn *libvirt.Connect
}

// Dial connects to libvirt at uri (e.g. qemu:///system).
func Dial(ctx context.Context, uri string) (*Conn, error) {
	if err := startEventLoop(); err != nil {
		return nil, fmt.Errorf("libvirt event loop: %w", err)
	}
	c := &Conn{uri: uri}
	if _, err := c.get(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// URI returns the libvirt URI this connection uses.
func (c *Conn) URI() string { return c.uri }

func (c *Conn) get(ctx context.Context) (*libvirt.Connect, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		if alive, err := c.conn.IsAlive(); err == nil && alive {
			return c.conn, nil
		}
		c.conn.Close()
		c.conn = nil
	}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		conn, err := libvirt.NewConnect(c.uri)
		if err == nil {
			// Keepalive lets a hung daemon be noticed instead of blocking forever.
			if err := conn.SetKeepAlive(5, 3); err != nil {
				slog.Warn("libvirt keepalive not enabled", "err", err)
			}
			c.conn = conn
			return conn, nil
		}
		lastErr = err
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Duration(attempt+1) * 200 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("connect to libvirt at %s: %w (is libvirtd running? start it with `libvirtd -d`)", c.uri, lastErr)
}

// Close closes the connection.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return nil
	}
	_, err := c.conn.Close()
	c.conn = nil
	return err
}

// ErrNoDomain reports a domain libvirt does not know.
var ErrNoDomain = errors.New("unknown domain")

// withDomain looks a domain up and frees it after fn.
func (c *Conn) withDomain(ctx context.Context, name string, fn func(*libvirt.Connect, *libvirt.Domain) error) error {
	conn, err := c.get(ctx)
	if err != nil {
		return err
	}
	dom, err := conn.LookupDomainByName(name)
	if err != nil {
		var lerr libvirt.Error
		if errors.As(err, &lerr) && lerr.Code == libvirt.ERR_NO_DOMAIN {
			return fmt.Errorf("%w %q on %s: check the name with `virsh -c %s list --all`", ErrNoDomain, name, c.uri, c.uri)
		}
		return fmt.Errorf("look up domain %q: %w", name, err)
	}
	defer dom.Free()
	return fn(conn, dom)
}

// DomainExists reports whether libvirt knows the domain.
func (c *Conn) DomainExists(ctx context.Context, name string) (bool, error) {
	err := c.withDomain(ctx, name, func(*libvirt.Connect, *libvirt.Domain) error { return nil })
	if errors.Is(err, ErrNoDomain) {
		return false, nil
	}
	return err == nil, err
}

// DomainState is a short name for a domain's libvirt state.
func (c *Conn) DomainState(ctx context.Context, name string) (string, error) {
	var state string
	err := c.withDomain(ctx, name, func(_ *libvirt.Connect, d *libvirt.Domain) error {
		s, _, err := d.GetState()
		if err != nil {
			return err
		}
		state = stateName(s)
		return nil
	})
	return state, err
}

func stateName(s libvirt.DomainState) string {
	switch s {
	case libvirt.DOMAIN_RUNNING:
		return "running"
	case libvirt.DOMAIN_PAUSED:
		return "paused"
	case libvirt.DOMAIN_SHUTOFF:
		return "shutoff"
	case libvirt.DOMAIN_SHUTDOWN:
		return "shutdown"
	case libvirt.DOMAIN_CRASHED:
		return "crashed"
	case libvirt.DOMAIN_BLOCKED:
		return "blocked"
	case libvirt.DOMAIN_PMSUSPENDED:
		return "pmsuspended"
	}
	return "unknown"
}

// DomainXML returns the domain's XML in migratable form (no runtime-only
// details), suitable for creating a copy elsewhere.
func (c *Conn) DomainXML(ctx context.Context, name string) (string, error) {
	var x string
	err := c.withDomain(ctx, name, func(_ *libvirt.Connect, d *libvirt.Domain) error {
		var err error
		x, err = d.GetXMLDesc(libvirt.DOMAIN_XML_MIGRATABLE)
		return err
	})
	return x, err
}

// Destroy stops a domain immediately. A domain that does not exist is not
// an error.
func (c *Conn) Destroy(ctx context.Context, name string) error {
	err := c.withDomain(ctx, name, func(_ *libvirt.Connect, d *libvirt.Domain) error {
		return d.Destroy()
	})
	if errors.Is(err, ErrNoDomain) {
		return nil
	}
	var lerr libvirt.Error
	if errors.As(err, &lerr) && lerr.Code == libvirt.ERR_OPERATION_INVALID {
		return nil // not running
	}
	return err
}

// CreatePaused starts a transient domain from xml with its CPUs paused.
func (c *Conn) CreatePaused(ctx context.Context, xml string) error {
	conn, err := c.get(ctx)
	if err != nil {
		return err
	}
	dom, err := conn.DomainCreateXML(xml, libvirt.DOMAIN_START_PAUSED)
	if err != nil {
		return fmt.Errorf("create standby shell domain: %w", err)
	}
	return dom.Free()
}

// Undefine removes a shut-off domain's persistent definition (its managed
// save image and snapshot and checkpoint metadata with it). A domain that
// does not exist is not an error.
func (c *Conn) Undefine(ctx context.Context, name string) error {
	err := c.withDomain(ctx, name, func(_ *libvirt.Connect, d *libvirt.Domain) error {
		return d.UndefineFlags(libvirt.DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
	})
	if errors.Is(err, ErrNoDomain) {
		return nil
	}
	return err
}

// MakePersistent defines a running (transient) domain from its own XML,
// without QEMU arguments that only mattered at its start (the shell's
// -incoming defer), with autostart off: a guest failed over to this host
// becomes a normal libvirt domain of it.
func (c *Conn) MakePersistent(ctx context.Context, name string) error {
	var x string
	err := c.withDomain(ctx, name, func(_ *libvirt.Connect, d *libvirt.Domain) error {
		var err error
		x, err = d.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE | libvirt.DOMAIN_XML_SECURE)
		return err
	})
	if err != nil {
		return err
	}
	if x, err = WithoutIncoming(x); err != nil {
		return err
	}
	conn, err := c.get(ctx)
	if err != nil {
		return err
	}
	dom, err := conn.DomainDefineXML(x)
	if err != nil {
		return fmt.Errorf("define domain %s: %w", name, err)
	}
	defer dom.Free()
	return dom.SetAutostart(false)
}

// NoAutostart turns autostart off for a domain, if it is persistent.
func (c *Conn) NoAutostart(ctx context.Context, name string) error {
	err := c.withDomain(ctx, name, func(_ *libvirt.Connect, d *libvirt.Domain) error {
		persistent, err := d.IsPersistent()
		if err != nil || !persistent {
			return err
		}
		return d.SetAutostart(false)
	})
	if errors.Is(err, ErrNoDomain) {
		return nil
	}
	return err
}
