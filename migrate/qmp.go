package migrate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
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

func (m *Monitor) Connect() error    { return nil }
func (m *Monitor) Disconnect() error { return nil }

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

// QMPError is an error QEMU returned for a command.
type QMPError struct {
	Command string
	Class   string
	Desc    string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("QMP %s: %s (%s)", e.Command, e.Desc, e.Class)
}

// Exec runs a QMP command with optional arguments and decodes its return
// value into out (when out is not nil).
func Exec(m qmp.Monitor, command string, args any, out any) error {
	req, err := json.Marshal(qmp.Command{Execute: command, Args: args})
	if err != nil {
		return err
	}
	raw, err := m.Run(req)
	if err != nil {
		return fmt.Errorf("QMP %s: %w", command, err)
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(raw, &resp); err != nil {
		return fmt.Errorf("QMP %s: bad reply %q: %w", command, truncate(string(raw), 200), err)
	}
	if resp.Error != nil {
		return &QMPError{Command: command, Class: resp.Error.Class, Desc: resp.Error.Desc}
	}
	if out != nil && len(resp.Return) > 0 {
		if err := json.Unmarshal(resp.Return, out); err != nil {
			return fmt.Errorf("QMP %s: decode reply: %w", command, err)
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// Status returns QEMU's run state (running, paused, postmigrate, inmigrate...).
func Status(m qmp.Monitor) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	err := Exec(m, "query-status", nil, &st)
	return st.Status, err
}

type capability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// SetIgnoreShared turns x-ignore-shared on or off: with it on, migration
// leaves out RAM that lives in a shared file (the agent copies that itself).
func SetIgnoreShared(m qmp.Monitor, on bool) error {
	return Exec(m, "migrate-set-capabilities", map[string]any{
		"capabilities": []capability{{Capability: "x-ignore-shared", State: on}},
	}, nil)
}

// SetUnlimitedBandwidth lifts QEMU's default migration throttle, which
// would otherwise stretch a checkpoint's pause.
func SetUnlimitedBandwidth(m qmp.Monitor) error {
	return Exec(m, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil)
}

// MigrationStatus returns query-migrate's status and error description.
func MigrationStatus(m qmp.Monitor) (status, errDesc string, err error) {
	var st struct {
		Status    string `json:"status"`
		ErrorDesc string `json:"error-desc"`
	}
	err = Exec(m, "query-migrate", nil, &st)
	return st.Status, st.ErrorDesc, err
}

// RAMBackend describes the guest's main RAM backing object.
type RAMBackend struct {
	Path  string
	Size  int64
	Share bool
}

// MainRAM finds the file that holds the guest's main RAM via QOM.
func MainRAM(m qmp.Monitor) (RAMBackend, error) {
	var objs []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := Exec(m, "qom-list", map[string]string{"path": "/objects"}, &objs); err != nil {
		return RAMBackend{}, err
	}
	for _, o := range objs {
		if !strings.HasPrefix(o.Type, "child<memory-backend-file") {
			continue
		}
		p := "/objects/" + o.Name
		var rb RAMBackend
		if err := Exec(m, "qom-get", map[string]string{"path": p, "property": "mem-path"}, &rb.Path); err != nil {
			return RAMBackend{}, err
		}
		if err := Exec(m, "qom-get", map[string]string{"path": p, "property": "size"}, &rb.Size); err != nil {
			return RAMBackend{}, err
		}
		if err := Exec(m, "qom-get", map[string]string{"path": p, "property": "share"}, &rb.Share); err != nil {
			return RAMBackend{}, err
		}
		return rb, nil
	}
	return RAMBackend{}, ErrNoSharedMemory
}
