package qemu

import (
	"bufio"
	"bytes"
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

// Save migrates the guest's device state into w and leaves the guest
// stopped (postmigrate; `cont` resumes it).
func (s *DeviceStateSink) Save(ctx context.Context, g *Guest, w io.Writer) (int64, error) {
	sv, err := s.Begin(ctx, g)
	if err != nil {
		return 0, err
	}
	return sv.Finish(ctx, w)
}

// A DeviceSave is a device-state migration under way (Begin).
type DeviceSave struct {
	g       *Guest
	conn    net.Conn
	stopped chan struct{} // closed once QEMU stopped the guest
	done    chan struct{} // closed once the stream ended
	buf     bytes.Buffer
	err     error // set before done closes
	// stoppedBy is when QEMU had stopped the guest at the latest, as far
	// as the agent can tell: the end of the last live section it read.
	stoppedBy time.Time
}

// StoppedAt is the earliest moment the guest may have been stopped: the
// arrival of the last data QEMU sent while it ran. A pause measured from
// here is an upper bound.
func (sv *DeviceSave) StoppedAt() time.Time { return sv.stoppedBy }

// Begin starts migrating the guest's device state (x-ignore-shared must be
// on) and returns once QEMU has stopped the guest for it: QEMU copies the
// small non-shared RAM blocks while the guest runs and stops it only for
// the last of them and the device state, which then come while the caller
// works on the stopped guest. Finish (or Abandon) must follow. The guest
// is stopped exactly as by QMP stop (vCPUs paused, block I/O drained).
func (s *DeviceStateSink) Begin(ctx context.Context, g *Guest) (*DeviceSave, error) {
	if s.qemu == nil {
		s.qemu = &unixsock.PeerListener{UnixListener: s.ln, PID: g.PID}
	}
	// A save abandoned after its migrate command took effect left QEMU's
	// connection in the backlog: the next Accept would read that (closed)
	// stream and wait forever for a migration nobody reads.
	if _, err := unixsock.DiscardPending(s.ln); err != nil {
		return nil, fmt.Errorf("device-state socket: %w", err)
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
		return nil, err
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(time.Minute)
	}
	_ = s.ln.SetDeadline(deadline)
	conn, err := s.qemu.Accept()
	if err != nil {
		cancelMigration(ctx, g)
		return nil, fmt.Errorf("QEMU did not connect to the device-state socket: %w", err)
	}
	_ = conn.SetDeadline(deadline)
	sv := &DeviceSave{g: g, conn: conn, stopped: make(chan struct{}), done: make(chan struct{})}
	go sv.read()
	select {
	case <-sv.stopped:
		return sv, nil
	case <-sv.done:
		if sv.err == nil {
			return sv, nil
		}
		err = sv.err
	case <-ctx.Done():
		err = fmt.Errorf("QEMU did not stop the guest for its device state: %w", ctx.Err())
	}
	sv.Abandon(ctx)
	return nil, err
}

// read follows the stream into buf, saying when the guest is stopped.
func (sv *DeviceSave) read() {
	defer close(sv.done)
	defer sv.conn.Close()
	f := &streamFollower{r: bufio.NewReaderSize(io.TeeReader(sv.conn, &sv.buf), 256<<10)}
	err := f.header()
	if err == nil {
		err = f.untilStopped()
	}
	if err != nil {
		sv.err = err
		return
	}
	sv.stoppedBy = f.lastLive
	close(sv.stopped)
	if _, err := io.Copy(io.Discard, f.r); err != nil {
		sv.err = fmt.Errorf("read device state: %w", err)
	}
}

// Finish waits for the rest of the stream and writes all of it to w. The
// guest stays stopped.
func (sv *DeviceSave) Finish(ctx context.Context, w io.Writer) (int64, error) {
	select {
	case <-sv.done:
	case <-ctx.Done():
		sv.Abandon(ctx)
		return 0, fmt.Errorf("read device state: %w", ctx.Err())
	}
	if sv.err != nil {
		cancelMigration(ctx, sv.g)
		return 0, sv.err
	}
	// QEMU closes the stream only after the migration's end; a stream that
	// ends with the device description is a completed one. Without it (a
	// machine that suppresses it, or a failure) QEMU says how it ended.
	if !completeTail(sv.buf.Bytes()) {
		if err := waitMigration(ctx, sv.g, "completed"); err != nil {
			cancelMigration(ctx, sv.g)
			return 0, err
		}
	}
	return sv.buf.WriteTo(w)
}

// Abandon ends a save whose stream is not wanted: the migration is
// cancelled if it still runs, and the stream's end awaited (bounded).
func (sv *DeviceSave) Abandon(ctx context.Context) {
	select {
	case <-sv.done:
		return
	default:
	}
	cancelMigration(ctx, sv.g)
	sv.conn.Close()
	<-sv.done
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
