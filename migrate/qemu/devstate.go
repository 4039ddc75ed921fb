package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/remora-ha/remora/internal/unixsock"
)

// DeviceStateSink receives QEMU's migration stream on a unix socket. With
// x-ignore-shared on and the guest stopped, the stream is the device state
// plus the small non-shared RAM blocks.
type DeviceStateSink struct {
	path string
	ln   *net.UnixListener
	qemu *unixsock.PeerListener // only the guest's QEMU is read from
}

// ListenDeviceState listens at path; QEMU must be able to connect to it.
func ListenDeviceState(path string) (*DeviceStateSink, error) {
	// QEMU may run as another user than the agent.
	ln, err := unixsock.Listen(path, 0o666)
	if err != nil {
		return nil, fmt.Errorf("listen for device state: %w", err)
	}
	return &DeviceStateSink{path: path, ln: ln}, nil
}

// Refused is how many connections of processes other than QEMU the sink
// closed.
func (s *DeviceStateSink) Refused() int64 {
	if s.qemu == nil {
		return 0
	}
	return s.qemu.Refused()
}

// Close stops listening and removes the socket.
func (s *DeviceStateSink) Close() error {
	err := s.ln.Close()
	_ = os.Remove(s.path)
	return err
}

// Save migrates the stopped guest's device state into w. The guest must be
// stopped and x-ignore-shared set; afterwards QEMU is in postmigrate and
// `cont` resumes it.
func (s *DeviceStateSink) Save(ctx context.Context, g *Guest, w io.Writer) (int64, error) {
	if s.qemu == nil {
		s.qemu = &unixsock.PeerListener{UnixListener: s.ln, PID: g.PID}
	}
	// A save abandoned after its migrate command took effect left QEMU's
	// connection in the backlog: the next Accept would read that (closed)
	// stream and wait forever for a migration nobody reads.
	if _, err := unixsock.DiscardPending(s.ln); err != nil {
		return 0, fmt.Errorf("device-state socket: %w", err)
	}
	err := Exec(ctx, g.Mon, "migrate", map[string]any{"uri": "unix:" + s.path}, nil)
	if err != nil && strings.Contains(err.Error(), "migration process in progress") {
		// An interrupted save left its migration running (checked only
		// then: a query per checkpoint would lengthen every pause).
		if err = settleMigration(ctx, g); err == nil {
			if _, err = unixsock.DiscardPending(s.ln); err == nil {
				err = Exec(ctx, g.Mon, "migrate", map[string]any{"uri": "unix:" + s.path}, nil)
			}
		}
	}
	if err != nil {
		var qe *QMPError
		if !errors.As(err, &qe) {
			// No answer: the command may have started a migration.
			cancelMigration(ctx, g)
		}
		return 0, err
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(time.Minute)
	}
	_ = s.ln.SetDeadline(deadline)
	conn, err := s.qemu.Accept()
	if err != nil {
		cancelMigration(ctx, g)
		return 0, fmt.Errorf("QEMU did not connect to the device-state socket: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(deadline)
	n, err := io.Copy(w, conn)
	if err != nil {
		cancelMigration(ctx, g)
		return n, fmt.Errorf("read device state: %w", err)
	}
	if err := waitMigration(ctx, g, "completed"); err != nil {
		cancelMigration(ctx, g)
		return n, err
	}
	return n, nil
}

// settleMigration cancels a migration an interrupted save left running
// (its session ended mid-save, say): QEMU refuses a new one meanwhile.
func settleMigration(ctx context.Context, g *Guest) error {
	for i := 0; ; i++ {
		st, _, err := MigrationStatus(ctx, g.Mon)
		if err != nil {
			return err
		}
		switch st {
		case "", "none", "completed", "failed", "cancelled":
			return nil
		}
		if i == 0 {
			cancelMigration(ctx, g)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("an earlier migration is still %s and does not cancel: %w", st, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// cancelMigration stops a failed save; it runs even when ctx has ended
// (the save may have failed for that reason) but is bounded itself.
func cancelMigration(ctx context.Context, g *Guest) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_ = Exec(ctx, g.Mon, "migrate_cancel", nil, nil)
}

func waitMigration(ctx context.Context, g *Guest, want string) error {
	for delay := 200 * time.Microsecond; ; delay = min(delay*2, 20*time.Millisecond) {
		st, desc, err := MigrationStatus(ctx, g.Mon)
		if err != nil {
			return err
		}
		switch st {
		case want:
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("QEMU migration %s: %s", st, desc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for migration (%s): %w", st, ctx.Err())
		case <-time.After(delay):
		}
	}
}

// Restore feeds a saved device-state stream into a shell domain started
// with -incoming defer whose RAM file already holds the checkpoint's pages,
// then resumes the guest.
func Restore(ctx context.Context, g *Guest, sockPath string, state io.Reader) error {
	if err := SetIgnoreShared(ctx, g.Mon, true); err != nil {
		return err
	}
	_ = os.Remove(sockPath)
	if err := Exec(ctx, g.Mon, "migrate-incoming", map[string]any{"uri": "unix:" + sockPath}, nil); err != nil {
		return fmt.Errorf("%w (the shell must have been started with -incoming defer)", err)
	}
	defer os.Remove(sockPath)
	var conn net.Conn
	var err error
	for i := 0; i < 100; i++ {
		if conn, err = net.Dial("unix", sockPath); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("connect to QEMU's incoming socket: %w", err)
	}
	if _, err := io.Copy(conn, state); err != nil {
		conn.Close()
		return fmt.Errorf("send device state to QEMU: %w", err)
	}
	conn.Close()
	for {
		st, err := Status(ctx, g.Mon)
		if err != nil {
			return err
		}
		if st != "inmigrate" {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("QEMU still loading device state: %w", ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
	st, desc, err := MigrationStatus(ctx, g.Mon)
	if err == nil && st == "failed" {
		return fmt.Errorf("QEMU rejected the device state: %s", desc)
	}
	if err := Exec(ctx, g.Mon, "cont", nil, nil); err != nil {
		return err
	}
	// QEMU announces after an incoming migration; once more helps switches
	// that missed it while the host was busy.
	if err := Exec(ctx, g.Mon, "announce-self", map[string]any{"initial": 50, "max": 550, "rounds": 3, "step": 100}, nil); err != nil {
		var qe *QMPError
		if !errors.As(err, &qe) {
			return err
		}
	}
	return nil
}
