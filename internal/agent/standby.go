package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
	"github.com/remora-ha/remora/txlog"
)

type standbyGuest struct {
	coord   coordination
	mu      sync.Mutex
	rec     *Record
	shell   *qemu.Guest
	mem     []byte
	replica *checkpoint.Replica
	disks   []*replicaDisk

	session     net.Conn
	sessionFrom string
	lastFrame   time.Time
	lastCommit  time.Time
	commits     []time.Time
	bytesIn     uint64
	lastError   string
	busy        bool // a failover or unenroll owns the guest
}

func (s *standbyGuest) closeSession() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.session != nil {
		s.session.Close()
		s.session = nil
	}
}

func (a *Agent) replicaDir(name string) string {
	return filepath.Join(a.cfg.RuntimeDir, "replicas", name)
}

// loadStandby restores a replica known before a restart. A shell that
// survived is attached lazily when the primary reconnects.
func (a *Agent) loadStandby(ctx context.Context, rec *Record) {
	sg := &standbyGuest{rec: rec}
	a.mu.Lock()
	a.standby[rec.Name] = sg
	a.mu.Unlock()
	if rec.State == "" || rec.State == StateFailingOver {
		go a.standbyCoordination(ctx, sg)
	}
	a.failover.Lock()
	_, unfinished := a.resume[rec.Name]
	a.failover.Unlock()
	if unfinished && rec.State == "" {
		rec.State = StateFailingOver // the journal has the failover the record file missed
	}
	switch rec.State {
	case StateFailingOver:
		a.log.Warn("a failover was interrupted by an agent restart; finishing it", "domain", rec.Name)
		go func() {
			if _, err := a.Failover(ctx, rec.Name, true); err != nil {
				a.log.Error("resuming interrupted failover failed", "domain", rec.Name, "err", err)
			}
		}()
	case StateFailedOver:
		a.failover.Lock()
		if tx, ok := a.resume[rec.Name]; ok { // crashed between recording and ending it
			_ = a.journal.append(ctx, false, txlog.TypeEnd, tx.id, journalEvent{Kind: "failover", Guest: rec.Name, Fence: tx.fence, Step: "announced"})
			delete(a.resume, rec.Name)
		}
		a.failover.Unlock()
	default:
		sg.mu.Lock()
		err := a.attachShell(ctx, sg, "", 0)
		sg.mu.Unlock()
		if err != nil {
			a.log.Warn("replica not attached yet; it will be rebuilt when the primary reconnects", "domain", rec.Name, "err", err)
		}
	}
}

// attachShell finds or creates the shell domain and opens the replica over
// its RAM. With xml empty it only attaches to an existing shell.
func (a *Agent) attachShell(ctx context.Context, sg *standbyGuest, xml string, ramBytes int64) error {
	if sg.replica != nil {
		if ramBytes == 0 || int64(len(sg.mem)) == ramBytes {
			return nil
		}
		a.log.Warn("guest RAM size changed; rebuilding the shell", "domain", sg.rec.Name)
		a.detachShell(sg)
		if err := a.virt.Destroy(ctx, sg.rec.Shell); err != nil {
			return err
		}
	}
	if sg.rec.Shell == "" {
		sg.rec.Shell = sg.rec.Name + a.cfg.ShellSuffix
	}
	// The replica images exist before the shell that opens them.
	disks, err := a.openReplicaDisksOnce(sg)
	if err != nil {
		return err
	}
	fresh := false
	exists, err := a.virt.DomainExists(ctx, sg.rec.Shell)
	if err != nil {
		return err
	}
	if exists {
		st, err := qemu.Status(ctx, virt.NewMonitor(a.virt, sg.rec.Shell))
		if err != nil {
			return err
		}
		if st != "inmigrate" {
			return fmt.Errorf("domain %q exists and is %s, not a standby shell waiting for a checkpoint; remora will not touch it: remove it, or set shell_suffix so the shell gets another name", sg.rec.Shell, st)
		}
	} else {
		if xml == "" {
			return fmt.Errorf("standby shell %q is gone", sg.rec.Shell)
		}
		images := map[string]string{}
		for _, d := range sg.rec.Disks {
			images[d.Dev] = a.diskImage(sg.rec.Name, d.Dev)
		}
		shellXML, err := virt.ShellXML(xml, virt.ShellOptions{Name: sg.rec.Shell, Images: images})
		if err != nil {
			return err
		}
		if err := a.virt.CreatePaused(ctx, shellXML); err != nil {
			return err
		}
		fresh = true
		a.log.Info("standby shell created", "domain", sg.rec.Name, "shell", sg.rec.Shell)
	}
	shell := a.virt.Guest(sg.rec.Shell)
	if shell.RAM, err = qemu.MainRAM(ctx, shell.Mon); err != nil {
		return fmt.Errorf("standby shell %q: %w", sg.rec.Shell, err)
	}
	if ramBytes != 0 && shell.RAM.Size != ramBytes {
		if !fresh {
			if err := a.virt.Destroy(ctx, sg.rec.Shell); err != nil {
				return err
			}
			return a.attachShell(ctx, sg, xml, ramBytes)
		}
		return fmt.Errorf("standby shell has %d bytes of RAM, primary %d", shell.RAM.Size, ramBytes)
	}
	mem, err := qemu.MapRAM(shell.RAM.Path, shell.RAM.Size, true)
	if err != nil {
		return err
	}
	persist := a.journal.replicaPersist(sg.rec.Name)
	if fresh { // a new shell's RAM is empty: nothing staged or committed applies to it
		_ = os.RemoveAll(a.replicaDir(sg.rec.Name))
		if err := persist(checkpoint.ReplicaState{}); err != nil {
			qemu.UnmapRAM(mem)
			return err
		}
		sg.rec.Replica = checkpoint.ReplicaState{}
	}
	rep, err := checkpoint.OpenReplica(a.replicaDir(sg.rec.Name), mem, sg.rec.Replica, func(st checkpoint.ReplicaState) error {
		if err := persist(st); err != nil {
			return err
		}
		sg.rec.Replica = st
		return nil
	}, disks...)
	if err != nil {
		qemu.UnmapRAM(mem)
		return err
	}
	if err := a.store.save(sg.rec); err != nil {
		qemu.UnmapRAM(mem)
		return err
	}
	sg.shell, sg.mem, sg.replica = shell, mem, rep
	return nil
}

// openReplicaDisksOnce opens the guest's replica disks unless open.
func (a *Agent) openReplicaDisksOnce(sg *standbyGuest) ([]checkpoint.DiskEpochs, error) {
	if sg.disks == nil && len(sg.rec.Disks) > 0 {
		ds, err := a.openReplicaDisks(sg.rec.Name, sg.rec.Disks)
		if err != nil {
			return nil, err
		}
		sg.disks = ds
	}
	var out []checkpoint.DiskEpochs
	for _, d := range sg.disks {
		out = append(out, d)
	}
	return out, nil
}

func (a *Agent) detachShell(sg *standbyGuest) {
	if sg.replica != nil {
		sg.replica.Abort()
	}
	closeReplicaDisks(sg.disks)
	sg.disks = nil
	qemu.UnmapRAM(sg.mem)
	sg.shell, sg.mem, sg.replica = nil, nil, nil
}

func (a *Agent) serveReplication(ctx context.Context, ln net.Listener) error {
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("replication listener: %w", err)
		}
		go a.handleSession(ctx, conn)
	}
}

func sendError(conn net.Conn, fence uint64, err error, fatal bool) {
	_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_ = checkpoint.WriteJSON(conn, checkpoint.FrameError, fence, 0, checkpoint.ErrorMsg{Error: err.Error(), Fatal: fatal})
}

func (a *Agent) handleSession(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	peer := conn.RemoteAddr().String()
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReaderSize(conn, 1<<20)
	f, err := checkpoint.ReadFrame(br)
	if err != nil {
		var ve *checkpoint.VersionError
		if errors.As(err, &ve) {
			sendError(conn, 0, fmt.Errorf("this standby agent speaks replication protocol v%d, the primary v%d: run the same remora release on both hosts", checkpoint.ProtocolVersion, ve.Got), true)
		}
		if errors.Is(err, io.EOF) {
			// Connect-and-close: the arbiter's reachability probe.
			a.log.Debug("connection closed before a handshake", "peer", peer)
			return
		}
		a.log.Warn("replication handshake failed", "peer", peer, "err", err)
		return
	}
	if f.Type == checkpoint.FrameDiskNBD || f.Type == checkpoint.FrameDiskControl {
		var dh checkpoint.DiskHello
		if err := json.Unmarshal(f.Payload, &dh); err != nil || dh.Domain == "" || dh.Dev == "" {
			sendError(conn, 0, fmt.Errorf("bad %s frame: %v", f.Type, err), true)
			return
		}
		if err := a.handleDiskConn(ctx, conn, f.Type, f.Fence, dh); err != nil {
			a.log.Warn("disk connection ended", "domain", dh.Domain, "dev", dh.Dev, "kind", f.Type, "err", err)
			sendError(conn, 0, err, false)
		}
		return
	}
	var hello checkpoint.Hello
	if err := json.Unmarshal(f.Payload, &hello); err != nil || hello.Domain == "" {
		sendError(conn, 0, fmt.Errorf("bad %s frame: %v", f.Type, err), true)
		return
	}
	switch f.Type {
	case checkpoint.FrameUnenroll:
		err := checkPeerName(conn, hello.Agent)
		if err == nil {
			err = a.dropReplica(ctx, hello.Domain, f.Fence, hello.Agent)
		}
		if err != nil {
			a.log.Warn("unenroll refused", "domain", hello.Domain, "from", hello.Agent, "err", err)
			sendError(conn, 0, err, true)
			return
		}
		_ = checkpoint.WriteJSON(conn, checkpoint.FrameWelcome, f.Fence, 0, checkpoint.Welcome{Agent: a.cfg.AgentID})
		return
	case checkpoint.FrameHello:
	default:
		sendError(conn, 0, fmt.Errorf("protocol error: session opened with %s", f.Type), true)
		return
	}
	sg, err := a.acceptPrimary(ctx, conn, hello, f.Fence)
	if err != nil {
		var fatal *fatalError
		sendError(conn, f.Fence, err, errors.As(err, &fatal))
		a.log.Warn("replication refused", "domain", hello.Domain, "primary", hello.Agent, "err", err)
		return
	}
	_ = conn.SetReadDeadline(time.Time{})
	err = a.receive(ctx, sg, conn, br, hello)
	sg.mu.Lock()
	if sg.replica != nil {
		sg.replica.Abort()
		a.journal.epochAbort(hello.Domain, 0)
	}
	if sg.session == conn {
		sg.session = nil
	}
	if err != nil && sg.rec.State == "" {
		sg.lastError = fmt.Sprintf("session with primary %s ended: %v", hello.Agent, err)
	}
	sg.mu.Unlock()
	if err != nil && ctx.Err() == nil {
		a.log.Warn("replication session ended", "domain", hello.Domain, "primary", hello.Agent, "err", err)
	}
}

type fatalError struct{ error }

func (e *fatalError) Unwrap() error { return e.error }

// acceptPrimary validates a Hello and readies the replica and its shell.
func (a *Agent) acceptPrimary(ctx context.Context, conn net.Conn, h checkpoint.Hello, fence uint64) (*standbyGuest, error) {
	if err := checkPeerName(conn, h.Agent); err != nil {
		return nil, &fatalError{err}
	}
	if h.PageSize != checkpoint.PageSize {
		return nil, &fatalError{fmt.Errorf("primary uses %d-byte pages, this agent %d", h.PageSize, checkpoint.PageSize)}
	}
	a.mu.Lock()
	if _, ok := a.primary[h.Domain]; ok {
		a.mu.Unlock()
		return nil, &fatalError{fmt.Errorf("domain %q is protected by this agent as its primary; a host cannot be its own standby", h.Domain)}
	}
	sg, ok := a.standby[h.Domain]
	if !ok {
		sg = &standbyGuest{rec: &Record{Name: h.Domain, Role: api.RoleStandby, Primary: h.Agent, Fence: fence, Enrolled: time.Now().UTC()}}
		a.standby[h.Domain] = sg
		go a.standbyCoordination(a.runCtx, sg)
	}
	a.mu.Unlock()

	sg.mu.Lock()
	defer sg.mu.Unlock()
	switch {
	case sg.busy:
		return nil, fmt.Errorf("domain %q is being failed over or unenrolled on this standby", h.Domain)
	case sg.rec.State == StateFailedOver || sg.rec.State == StateFailingOver:
		return nil, &fatalError{fmt.Errorf("domain %q was failed over to agent %s (fencing epoch %d); the copy on %s is stale: destroy it there (virsh destroy %s) and unenroll it", h.Domain, a.cfg.AgentID, sg.rec.Fence, h.Agent, h.Domain)}
	case fence < sg.rec.Fence:
		// Not fatal: a primary the arbiter moved to a newer epoch learns it
		// and retries; one that was replaced is fenced through the arbiter.
		return nil, fmt.Errorf("stale fencing epoch %d from %s: this replica is at epoch %d", fence, h.Agent, sg.rec.Fence)
	}
	if sg.rec.Primary != h.Agent {
		a.log.Warn("replica taken over by another primary agent", "domain", h.Domain, "was", sg.rec.Primary, "now", h.Agent)
		sg.rec.Primary = h.Agent
	}
	sg.rec.Fence = fence
	if sg.rec.Shell == "" && h.ShellBase != "" {
		sg.rec.Shell = h.ShellBase + a.cfg.ShellSuffix
	}
	if !slices.Equal(sg.rec.Disks, h.Disks) {
		if sg.replica != nil || sg.rec.Replica.Committed != 0 {
			return nil, &fatalError{fmt.Errorf("domain %q: its disks changed (%v, the replica has %v): unenroll it and enroll it again", h.Domain, h.Disks, sg.rec.Disks)}
		}
		sg.rec.Disks = h.Disks
	}
	if err := a.attachShell(ctx, sg, h.DomainXML, h.RAMBytes); err != nil {
		return nil, err
	}
	if sg.session != nil {
		sg.session.Close() // the primary reconnected; the old session is dead
	}
	sg.session, sg.sessionFrom, sg.lastFrame, sg.lastError = conn, h.Agent, time.Now(), ""
	st := sg.replica.State()
	w := checkpoint.Welcome{Agent: a.cfg.AgentID, Generation: st.Generation, Committed: st.Committed}
	if err := checkpoint.WriteJSON(conn, checkpoint.FrameWelcome, fence, 0, w); err != nil {
		sg.session = nil
		return nil, err
	}
	a.log.Info("replication session accepted", "domain", h.Domain, "primary", h.Agent, "committed", st.Committed, "synced", st.Synced)
	return sg, nil
}

func (a *Agent) receive(ctx context.Context, sg *standbyGuest, conn net.Conn, br *bufio.Reader, h checkpoint.Hello) error {
	for {
		f, err := checkpoint.ReadFrame(br)
		if err != nil {
			return err
		}
		sg.mu.Lock()
		if sg.session != conn {
			sg.mu.Unlock()
			return errors.New("session replaced or closed")
		}
		sg.lastFrame = time.Now()
		sg.bytesIn += uint64(len(f.Payload))
		if f.Fence < sg.rec.Fence {
			sg.mu.Unlock()
			err := fmt.Errorf("stale fencing epoch %d in %s frame: this replica is at epoch %d", f.Fence, f.Type, sg.rec.Fence)
			sendError(conn, sg.rec.Fence, err, false)
			return err
		}
		rep := sg.replica
		var ferr error
		ack := false
		switch f.Type {
		case checkpoint.FrameEpochBegin:
			var b checkpoint.EpochBegin
			if ferr = json.Unmarshal(f.Payload, &b); ferr == nil {
				if ferr = a.journal.epochBegin(h.Domain, f.Epoch, h.Generation, b.Full); ferr == nil {
					ferr = rep.Begin(h.Generation, f.Epoch, b)
				}
			}
		case checkpoint.FramePages:
			ferr = rep.AddPages(f.Epoch, f.Payload)
		case checkpoint.FrameDevState:
			ferr = rep.AddDevState(f.Epoch, f.Payload)
		case checkpoint.FrameDevStateLZ4:
			ferr = rep.AddDevStateLZ4(f.Epoch, f.Payload)
		case checkpoint.FrameEpochEnd:
			var end checkpoint.EpochEnd
			if end, ferr = checkpoint.UnmarshalEpochEnd(f.Payload); ferr == nil {
				ferr = rep.End(f.Epoch, end)
			}
			if ferr == nil {
				ack = true
				now := time.Now()
				sg.lastCommit = now
				sg.commits = append(sg.commits, now)
				if len(sg.commits) > 256 {
					sg.commits = sg.commits[len(sg.commits)-256:]
				}
			}
		case checkpoint.FramePing:
		default:
			ferr = fmt.Errorf("protocol error: unexpected %s frame", f.Type)
		}
		sg.mu.Unlock()
		if ferr != nil {
			a.journal.epochAbort(h.Domain, f.Epoch)
			sendError(conn, f.Fence, ferr, false)
			return ferr
		}
		if ack {
			if err := checkpoint.WriteFrame(conn, checkpoint.Frame{Type: checkpoint.FrameAck, Fence: f.Fence, Epoch: f.Epoch}); err != nil {
				return err
			}
		}
	}
}

// dropReplica destroys a replica and its shell when the primary unenrolls
// the guest (or an admin does on the standby).
// dropReplica removes a guest's replica and its shell. primary, when set,
// is the agent asking: only the guest's own primary may.
func (a *Agent) dropReplica(ctx context.Context, name string, fence uint64, primary string) error {
	a.mu.Lock()
	sg, ok := a.standby[name]
	a.mu.Unlock()
	if !ok {
		return nil
	}
	sg.mu.Lock()
	defer sg.mu.Unlock()
	if primary != "" && sg.rec.Primary != "" && primary != sg.rec.Primary {
		return fmt.Errorf("agent %q may not unenroll domain %q: its primary is agent %q", primary, name, sg.rec.Primary)
	}
	if fence < sg.rec.Fence {
		return fmt.Errorf("stale fencing epoch %d: this replica is at epoch %d", fence, sg.rec.Fence)
	}
	if sg.rec.State == StateFailedOver || sg.rec.State == StateFailingOver {
		return fmt.Errorf("domain %q was failed over to this host; it is no longer a replica", name)
	}
	if sg.session != nil {
		sg.session.Close()
		sg.session = nil
	}
	a.detachShell(sg)
	if sg.rec.Shell != "" {
		if err := a.virt.Destroy(ctx, sg.rec.Shell); err != nil {
			return err
		}
	}
	_ = os.RemoveAll(a.replicaDir(name))
	_ = os.RemoveAll(filepath.Dir(a.diskImage(name, "x")))
	if err := a.journal.append(ctx, true, txlog.TypePlain, 0, journalEvent{Kind: "drop", Guest: name}); err != nil {
		return err
	}
	a.mu.Lock()
	delete(a.standby, name)
	a.mu.Unlock()
	a.log.Info("replica dropped", "domain", name)
	return a.store.remove(name)
}
