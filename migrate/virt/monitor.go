package virt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/digitalocean/go-qemu/qmp"
	"libvirt.org/go/libvirt"
)

// Monitor implements go-qemu's qmp.Monitor over libvirt's QEMU monitor
// passthrough, so QMP shares libvirt's connection to QEMU instead of
// fighting it for the socket. libvirt marks the domain tainted
// "custom-monitor": that is expected.
type Monitor struct {
	conn   *Conn
	domain string

	mu  sync.Mutex
	dom *libvirt.Domain // cached: a lookup per command would double the round trips
}

var _ qmp.Monitor = (*Monitor)(nil)

// NewMonitor returns a QMP monitor for the named domain.
func NewMonitor(c *Conn, domain string) *Monitor { return &Monitor{conn: c, domain: domain} }

func (m *Monitor) Connect() error { return nil }

// Disconnect releases the cached domain handle (as Close does).
func (m *Monitor) Disconnect() error { m.Close(); return nil }

// Run sends one QMP command (JSON) and returns QEMU's raw reply.
func (m *Monitor) Run(command []byte) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dom == nil {
		conn, err := m.conn.get(context.Background())
		if err != nil {
			return nil, err
		}
		dom, err := conn.LookupDomainByName(m.domain)
		if err != nil {
			var lerr libvirt.Error
			if errors.As(err, &lerr) && lerr.Code == libvirt.ERR_NO_DOMAIN {
				return nil, fmt.Errorf("%w %q: it is no longer defined in libvirt", ErrNoDomain, m.domain)
			}
			return nil, err
		}
		m.dom = dom
	}
	out, err := m.dom.QemuMonitorCommand(string(command), libvirt.DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
	if err != nil {
		// The domain or the connection may be gone: look it up afresh next time.
		m.dom.Free()
		m.dom = nil
		return nil, err
	}
	return []byte(out), nil
}

// Close releases the cached domain handle.
func (m *Monitor) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.dom != nil {
		m.dom.Free()
		m.dom = nil
	}
}

// Events streams the domain's QMP events until ctx ends.
func (m *Monitor) Events(ctx context.Context) (<-chan qmp.Event, error) {
	ch := make(chan qmp.Event, 64)
	var id int
	err := m.conn.withDomain(ctx, m.domain, func(c *libvirt.Connect, d *libvirt.Domain) error {
		var err error
		id, err = c.DomainQemuMonitorEventRegister(d, "", func(_ *libvirt.Connect, _ *libvirt.Domain, ev *libvirt.DomainQemuMonitorEvent) {
			e := qmp.Event{Event: ev.Event}
			e.Timestamp.Seconds = ev.Seconds
			e.Timestamp.Microseconds = int64(ev.Micros)
			_ = json.Unmarshal([]byte(ev.Details), &e.Data)
			select {
			case ch <- e:
			default: // a slow reader loses events rather than stalling libvirt's loop
			}
		}, 0)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("register QMP events for %s: %w", m.domain, err)
	}
	go func() {
		<-ctx.Done()
		if c, err := m.conn.get(context.Background()); err == nil {
			_ = c.DomainQemuEventDeregister(id)
		}
		close(ch)
	}()
	return ch, nil
}
