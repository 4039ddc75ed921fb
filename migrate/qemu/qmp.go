// Package qemu is remora's pure-Go QEMU layer: QMP commands over any
// go-qemu qmp.Monitor, with a context on every call, and what the agent
// builds from them: checkpoint capture (stop, device state, cont),
// restore, network filters for output commit, block mirrors for disk
// replication and guest RAM mapping. It imports no libvirt: the monitor is
// libvirt's passthrough in production (package migrate/virt) and a fake or
// a QMP socket in tests.
package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/digitalocean/go-qemu/qmp"
)

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
// value into out (when out is not nil). When ctx ends first, Exec returns
// at once: the command may still complete in QEMU later, and its answer
// is dropped. That bounds a caller waiting on a stuck QEMU (a stop that
// drains I/O to a dead disk), which is what the guest's pause needs.
func Exec(ctx context.Context, m qmp.Monitor, command string, args any, out any) error {
	req, err := json.Marshal(qmp.Command{Execute: command, Args: args})
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("QMP %s not sent: %w", command, err)
	}
	var raw []byte
	if ctx.Done() == nil {
		raw, err = m.Run(req)
	} else {
		type answer struct {
			raw []byte
			err error
		}
		ch := make(chan answer, 1)
		go func() {
			raw, err := m.Run(req)
			ch <- answer{raw, err}
		}()
		select {
		case a := <-ch:
			raw, err = a.raw, a.err
		case <-ctx.Done():
			return fmt.Errorf("QMP %s: no answer from QEMU: %w", command, ctx.Err())
		}
	}
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
func Status(ctx context.Context, m qmp.Monitor) (string, error) {
	var st struct {
		Status string `json:"status"`
	}
	err := Exec(ctx, m, "query-status", nil, &st)
	return st.Status, err
}

// Stop pauses the guest's CPUs (and drains its block I/O).
func Stop(ctx context.Context, m qmp.Monitor) error { return Exec(ctx, m, "stop", nil, nil) }

// Cont resumes the guest's CPUs.
func Cont(ctx context.Context, m qmp.Monitor) error { return Exec(ctx, m, "cont", nil, nil) }

type capability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// SetIgnoreShared turns x-ignore-shared on or off: with it on, migration
// leaves out RAM that lives in a shared file (the agent copies that itself).
func SetIgnoreShared(ctx context.Context, m qmp.Monitor, on bool) error {
	return Exec(ctx, m, "migrate-set-capabilities", map[string]any{
		"capabilities": []capability{{Capability: "x-ignore-shared", State: on}},
	}, nil)
}

// SetUnlimitedBandwidth lifts QEMU's default migration throttle, which
// would otherwise stretch a checkpoint's pause.
func SetUnlimitedBandwidth(ctx context.Context, m qmp.Monitor) error {
	return Exec(ctx, m, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil)
}

// MigrationStatus returns query-migrate's status and error description.
func MigrationStatus(ctx context.Context, m qmp.Monitor) (status, errDesc string, err error) {
	var st struct {
		Status    string `json:"status"`
		ErrorDesc string `json:"error-desc"`
	}
	err = Exec(ctx, m, "query-migrate", nil, &st)
	return st.Status, st.ErrorDesc, err
}

// RAMBackend describes the guest's main RAM backing object.
type RAMBackend struct {
	Path  string
	Size  int64
	Share bool
}

// MainRAM finds the file that holds the guest's main RAM via QOM.
func MainRAM(ctx context.Context, m qmp.Monitor) (RAMBackend, error) {
	var objs []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := Exec(ctx, m, "qom-list", map[string]string{"path": "/objects"}, &objs); err != nil {
		return RAMBackend{}, err
	}
	for _, o := range objs {
		if !strings.HasPrefix(o.Type, "child<memory-backend-file") {
			continue
		}
		p := "/objects/" + o.Name
		var rb RAMBackend
		if err := Exec(ctx, m, "qom-get", map[string]string{"path": p, "property": "mem-path"}, &rb.Path); err != nil {
			return RAMBackend{}, err
		}
		if err := Exec(ctx, m, "qom-get", map[string]string{"path": p, "property": "size"}, &rb.Size); err != nil {
			return RAMBackend{}, err
		}
		if err := Exec(ctx, m, "qom-get", map[string]string{"path": p, "property": "share"}, &rb.Share); err != nil {
			return RAMBackend{}, err
		}
		return rb, nil
	}
	return RAMBackend{}, ErrNoSharedMemory
}
