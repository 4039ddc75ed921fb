package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/checkpoint/disk"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/names"
	"github.com/remora-ha/remora/internal/safepath"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
	"github.com/remora-ha/remora/txlog"
)

// standbyRun is the replica side of a guest another host protects here.
type standbyRun struct {
	mu      sync.Mutex // held while a frame is applied; before guest.mu
	shell   *qemu.Guest
	mem     []byte
	replica *checkpoint.Replica
	disks   []*replicaDisk

	session     net.Conn
	sessionFrom string
	lastFrame   time.Time
	lastCommit  time.Time
	lastWelcome time.Time // with lastCommit: a failover waits out the ack window after both
	commits     []time.Time
	bytesIn     uint64
	lastError   string
	busy        bool // a failover or unenroll owns the guest

	shellAlive  bool // as last checked
	shellSeenAt time.Time
}

// ackWindow is how long after its last acknowledgement (or welcome) a
// standby waits before it resumes the guest; the primary releases output
// only on acknowledgements that come sooner (checkpoint.Welcome). The
// failure detector's timeout costs a crash nothing: the standby suspects
// its primary only after that long without a frame, hence without
// acknowledging anything.
func (a *Agent) ackWindow() time.Duration { return a.cfg.HeartbeatTimeout() }

// waitAckWindow waits until an acknowledgement (or welcome) this standby
// sent can no longer release output on the old primary (s.mu held, the
// session closed).
func (a *Agent) waitAckWindow(ctx context.Context, g *guest) error {
	s := g.standby
	last := s.lastCommit
	if s.lastWelcome.After(last) {
		last = s.lastWelcome
	}
	wait := time.Until(last.Add(a.ackWindow()))
	if last.IsZero() || wait <= 0 {
		return nil
	}
	g.log.Info("failover waits out the ack window: the old primary may still release output this standby acknowledged", "wait", wait.Round(time.Millisecond))
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (s *standbyRun) closeSession() {
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

// newStandbyGuest registers a replica and starts its driver.
func (a *Agent) newStandbyGuest(rec *Record) *guest {
	m := NewStandby(a.settings(), rec.Fence, rec.State == StateFailedOver, rec.State == StateFailingOver)
	g := newGuest(a, rec, m)
	g.standby = &standbyRun{}
	a.detector.Watch(rec.Name)
	g.start(func(now time.Time) Observation { return g.standby.observe(g, now) }, a.cfg.HeartbeatInterval)
	a.mu.Lock()
	a.guests[rec.Name] = g
	a.mu.Unlock()
	return g
}

// loadStandby restores a replica known before a restart. A shell that
// survived is attached now; otherwise when the primary reconnects.
func (a *Agent) loadStandby(ctx context.Context, rec *Record) {
	a.failover.Lock()
	tx, unfinished := a.resume[rec.Name]
	a.failover.Unlock()
	if unfinished && rec.State == "" {
		rec.State = StateFailingOver // the journal has the failover the record file missed
	}
	if rec.State == StateFailedOver && unfinished { // crashed between recording and ending it
		_ = a.journal.append(ctx, false, txlog.TypeEnd, tx.id, journalEvent{Kind: "failover", Guest: rec.Name, Fence: tx.fence, Step: "announced"})
		a.failover.Lock()
		delete(a.resume, rec.Name)
		a.failover.Unlock()
	}
	g := a.newStandbyGuest(rec)
	switch rec.State {
	case StateFailingOver:
		g.log.Warn("a failover was interrupted by an agent restart; finishing it")
	case "":
		s := g.standby
		s.mu.Lock()
		err := a.attachShell(ctx, g, "", 0)
		s.mu.Unlock()
		if err != nil {
			g.log.Warn("replica not attached yet; it will be rebuilt when the primary reconnects", "err", err)
		}
	}
}

// observe is the standby driver's tick.
func (s *standbyRun) observe(g *guest, now time.Time) Observation {
	s.mu.Lock()
	consistent := s.replica != nil && s.replica.Consistent() == nil
	session := s.session != nil
	check := consistent && now.Sub(s.shellSeenAt) > time.Second
	shell := ""
	if s.shell != nil {
		shell = s.shell.Name
	}
	alive := s.shellAlive
	s.mu.Unlock()
	if check && shell != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		st, err := g.a.virt.DomainState(ctx, shell)
		cancel()
		alive = err == nil && (st == "paused" || st == "running")
		if err != nil && !errors.Is(err, virt.ErrNoDomain) {
			alive = true // libvirt did not answer: no verdict
		}
		s.mu.Lock()
		s.shellAlive, s.shellSeenAt = alive, now
		s.mu.Unlock()
	}
	return Observation{Now: now, Silent: !session || g.a.detector.Suspected(g.name), Consistent: consistent, ShellAlive: alive || !consistent}
}

// do carries out a local action of the standby's machine.
func (s *standbyRun) do(ctx context.Context, g *guest, act Action) {
	a := g.a
	switch act := act.(type) {
	case DoFailover:
		go func() {
			_, err := a.failoverGuest(a.runCtx, g, act.Fence, false)
			if err != nil && !errors.Is(err, errFailedOver) {
				g.log.Error("automatic failover failed", "err", err)
			}
			g.post(failoverOutcome(err))
		}()
	case DoDropShell:
		g.log.Error("the replica is void: dropping it until the primary resyncs it", "why", act.Why)
		s.mu.Lock()
		if s.session != nil {
			s.session.Close()
			s.session = nil
		}
		s.lastError = act.Why
		a.detachShell(g)
		_ = os.RemoveAll(a.replicaDir(g.name))
		s.mu.Unlock()
		if err := a.journal.replicaPersist(g.name)(checkpoint.ReplicaState{}); err != nil {
			g.log.Error("cannot record the replica reset", "err", err)
		}
		g.mu.Lock()
		g.rec.Replica = checkpoint.ReplicaState{}
		err := a.store.save(g.rec)
		g.mu.Unlock()
		if err != nil {
			g.log.Error("cannot record the replica reset", "err", err)
		}
	case DoPause:
		g.log.Error("self-fence: pausing the promoted guest", "why", act.Why)
		pctx, cancel := context.WithTimeout(ctx, a.cfg.HeartbeatTimeout())
		err := qemu.Stop(pctx, a.virt.Guest(g.shellName()).Mon)
		cancel()
		g.postNow(Paused{Err: err})
	case DoResume:
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := qemu.Cont(rctx, a.virt.Guest(g.shellName()).Mon)
		cancel()
		g.postNow(Resumed{Err: err})
	case DoDestroyCopy:
		g.log.Error("promoted guest was replaced elsewhere: destroying it", "why", act.Why)
		dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := a.virt.Destroy(dctx, g.shellName()); err != nil {
			g.log.Error("cannot destroy the stale copy", "err", err)
		}
		if err := a.virt.Undefine(dctx, g.shellName()); err != nil { // a shell remora made
			g.log.Warn("cannot undefine the stale copy (libvirt's hook still refuses to start it)", "err", err)
		}
		cancel()
	}
}

func (g *guest) shellName() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.rec.Shell
}

// domainName is the libvirt domain of a guest this host runs as primary.
func (g *guest) domainName() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.rec.domain()
}

// attachShell finds or creates the shell domain and opens the replica over
// its RAM. With xml empty it only attaches to an existing shell (s.mu held).
func (a *Agent) attachShell(ctx context.Context, g *guest, xml string, ramBytes int64) (err error) {
	s := g.standby
	g.mu.Lock()
	rec := *g.rec
	g.mu.Unlock()
	if s.replica != nil {
		alive := false
		if st, err := a.virt.DomainState(ctx, rec.Shell); err == nil {
			alive = st == "paused" || st == "running"
		}
		switch {
		case !alive:
			// Epochs applied into a dead shell's RAM are lost with it.
			g.log.Warn("the standby shell is gone; rebuilding it (full resync)", "shell", rec.Shell)
			a.detachShell(g)
		case ramBytes == 0 || int64(len(s.mem)) == ramBytes:
			return nil
		default:
			g.log.Warn("guest RAM size changed; rebuilding the shell")
			a.detachShell(g)
			if err := a.virt.Destroy(ctx, rec.Shell); err != nil {
				return err
			}
		}
	}
	if rec.Shell == "" {
		rec.Shell = rec.Name + a.cfg.ShellSuffix
	}
	// The replica images exist before the shell that opens them.
	disks, err := a.openReplicaDisksOnce(g, &rec)
	if err != nil {
		return err
	}
	fresh := false
	exists, err := a.virt.DomainExists(ctx, rec.Shell)
	if err != nil {
		return err
	}
	if exists {
		// A shut-off domain of the shell's name is this host's superseded
		// copy (no shell_suffix) or one remora made (a shell promoted by
		// an earlier failover, superseded since): its stale definition goes.
		if st, err := a.virt.DomainState(ctx, rec.Shell); err == nil && st == "shutoff" {
			x, err := a.virt.DomainXML(ctx, rec.Shell)
			if err == nil && (rec.Shell == rec.Superseded || virt.IsShell(x)) {
				if err := a.virt.Undefine(ctx, rec.Shell); err != nil {
					return fmt.Errorf("remove the stale copy %q to make room for the guest's standby shell: %w", rec.Shell, err)
				}
				g.log.Info("a stale copy's definition is removed: the standby shell takes its name", "domain", rec.Shell)
				exists = false
			}
		}
	}
	if exists {
		st, err := qemu.Status(ctx, a.virt.Guest(rec.Shell).Mon)
		if err != nil {
			return err
		}
		if st != "inmigrate" {
			return fmt.Errorf("domain %q exists and is %s, not a standby shell waiting for a checkpoint; remora will not touch it: remove it, or set shell_suffix so the shell gets another name", rec.Shell, st)
		}
	} else {
		if xml == "" {
			return fmt.Errorf("standby shell %q is gone", rec.Shell)
		}
		images := map[string]string{}
		for _, d := range rec.Disks {
			images[d.Dev] = a.replicaImage(&rec, d.Dev)
		}
		shellXML, err := virt.ShellXML(xml, virt.ShellOptions{Name: rec.Shell, Images: images, BootDirs: a.cfg.BootDirs, LogDir: consoleDir(a.cfg)})
		if err != nil {
			return err
		}
		if err := a.virt.CreatePaused(ctx, shellXML); err != nil {
			return err
		}
		fresh = true
		defer func() {
			if err != nil { // a shell that holds no replica is of no use
				_ = a.virt.Destroy(context.WithoutCancel(ctx), rec.Shell)
			}
		}()
		g.log.Info("standby shell created", "shell", rec.Shell)
	}
	shell := a.virt.Guest(rec.Shell)
	if shell.RAM, err = qemu.MainRAM(ctx, shell.Mon); err != nil {
		return fmt.Errorf("standby shell %q: %w", rec.Shell, err)
	}
	if ramBytes != 0 && shell.RAM.Size != ramBytes {
		if !fresh {
			if err := a.virt.Destroy(ctx, rec.Shell); err != nil {
				return err
			}
			return a.attachShell(ctx, g, xml, ramBytes)
		}
		return fmt.Errorf("standby shell has %d bytes of RAM, primary %d", shell.RAM.Size, ramBytes)
	}
	mem, err := qemu.MapRAM(shell.RAM.Path, shell.RAM.Size, true)
	if err != nil {
		return err
	}
	persist := a.journal.replicaPersist(rec.Name)
	if fresh { // a new shell's RAM is empty: nothing staged or committed applies to it
		_ = os.RemoveAll(a.replicaDir(rec.Name))
		if err := persist(checkpoint.ReplicaState{}); err != nil {
			qemu.UnmapRAM(mem)
			return err
		}
		rec.Replica = checkpoint.ReplicaState{}
	}
	rep, err := checkpoint.OpenReplica(a.replicaDir(rec.Name), mem, rec.Replica, func(st checkpoint.ReplicaState) error {
		if err := persist(st); err != nil {
			return err
		}
		g.mu.Lock()
		g.rec.Replica = st
		g.mu.Unlock()
		return nil
	}, disks...)
	if err != nil {
		qemu.UnmapRAM(mem)
		return err
	}
	if fresh && rec.HeldRAM != "" {
		a.prefill(g, rep, mem, rec.HeldRAM)
		rec.HeldRAM = ""
	}
	g.mu.Lock()
	g.rec.HeldRAM = rec.HeldRAM
	g.rec.Shell, g.rec.Replica = rec.Shell, rep.State()
	err = a.store.save(g.rec)
	g.mu.Unlock()
	if err != nil {
		qemu.UnmapRAM(mem)
		return err
	}
	s.shell, s.mem, s.replica = shell, mem, rep
	s.shellAlive, s.shellSeenAt = true, time.Now()
	return nil
}

// prefill fills a new shell's RAM with the copy this host kept when it
// handed the guest over: the primary then resyncs against its page hashes
// instead of sending every page. The copy is consumed either way.
func (a *Agent) prefill(g *guest, rep *checkpoint.Replica, mem []byte, held string) {
	defer os.Remove(held)
	f, err := os.Open(held)
	if err == nil {
		defer f.Close()
		var fi os.FileInfo
		if fi, err = f.Stat(); err == nil && fi.Size() != int64(len(mem)) {
			err = fmt.Errorf("the copy is %d bytes, the shell's RAM %d", fi.Size(), len(mem))
		}
	}
	if err == nil {
		_, err = f.ReadAt(mem, 0)
	}
	if err == nil {
		err = rep.MarkPrefilled()
	}
	if err != nil {
		clear(mem)
		g.log.Warn("the shell starts without the guest's RAM copy: a full resync follows", "err", err)
		return
	}
	g.log.Info("the standby shell starts from the RAM this host handed over: the resync sends only the pages that differ")
}

// openReplicaDisksOnce opens the guest's replica disks unless open.
func (a *Agent) openReplicaDisksOnce(g *guest, rec *Record) ([]checkpoint.DiskEpochs, error) {
	s := g.standby
	if s.disks == nil && len(rec.Disks) > 0 {
		ds, err := a.openReplicaDisks(rec, rec.Disks)
		if err != nil {
			return nil, err
		}
		s.disks = ds
		g.mu.Lock()
		g.rec.Images = rec.Images // less the own images it could not use
		g.mu.Unlock()
	}
	var out []checkpoint.DiskEpochs
	for _, d := range s.disks {
		out = append(out, d)
	}
	return out, nil
}

// detachShell closes the replica (s.mu held).
func (a *Agent) detachShell(g *guest) {
	s := g.standby
	if s.replica != nil {
		s.replica.Abort()
		a.journal.epochAbort(g.name, 0)
	}
	closeReplicaDisks(s.disks)
	s.disks = nil
	qemu.UnmapRAM(s.mem)
	s.shell, s.mem, s.replica = nil, nil, nil
}

// standbyHandler is the agent's side of its replication port.
type standbyHandler struct{ a *Agent }

// Accept validates a Hello and readies the replica and its shell.
func (h standbyHandler) Accept(ctx context.Context, conn net.Conn, hello checkpoint.Hello, fence uint64) (checkpoint.Accepted, error) {
	g, w, hashes, err := h.accept(ctx, conn, hello, fence)
	if err != nil {
		return checkpoint.Accepted{}, err
	}
	return checkpoint.Accepted{Guest: g, Welcome: w, PageHashes: hashes}, nil
}

func (h standbyHandler) accept(ctx context.Context, conn net.Conn, hello checkpoint.Hello, fence uint64) (checkpoint.SessionGuest, checkpoint.Welcome, []uint64, error) {
	a := h.a
	if err := checkPeerName(conn, hello.Agent); err != nil {
		return nil, checkpoint.Welcome{}, nil, checkpoint.Fatal(err)
	}
	if err := a.cfg.AcceptsPrimary(hello.Agent, hello.Guest); err != nil {
		return nil, checkpoint.Welcome{}, nil, checkpoint.Fatal(fmt.Errorf("%w: add it on agent %s or protect the guest elsewhere", err, a.cfg.AgentID))
	}
	g, created, err := a.standbyGuestFor(ctx, hello, fence)
	if err != nil {
		return nil, checkpoint.Welcome{}, nil, err
	}
	// Before the replica's lock: this may ask the arbiter.
	if err := a.vetPrimary(ctx, g, hello.Agent, fence, g.state().Fence); err != nil {
		return nil, checkpoint.Welcome{}, nil, err
	}
	s := g.standby
	s.mu.Lock()
	defer s.mu.Unlock()
	st := g.state()
	switch {
	case s.busy:
		return nil, checkpoint.Welcome{}, nil, fmt.Errorf("guest %q is being failed over or unenrolled on this standby", hello.Guest)
	case st.Promoted || st.FailingOver:
		return nil, checkpoint.Welcome{}, nil, checkpoint.Fatal(fmt.Errorf("guest %q was failed over to agent %s (fencing epoch %d); the copy on %s is stale: destroy it there (virsh destroy %s) and unenroll it", hello.Guest, a.cfg.AgentID, st.Fence, hello.Agent, hello.Guest))
	case fence < st.Fence:
		// Not fatal: a primary the arbiter moved to a newer epoch learns it
		// and retries; one that was replaced is fenced through the arbiter.
		return nil, checkpoint.Welcome{}, nil, fmt.Errorf("stale fencing epoch %d from %s: this replica is at fencing epoch %d", fence, hello.Agent, st.Fence)
	}
	g.mu.Lock()
	rec := g.rec
	if rec.Primary != hello.Agent {
		g.log.Warn("replica taken over by the primary the arbiter names", "was", rec.Primary, "now", hello.Agent, "fence", fence)
		rec.Primary = hello.Agent
	}
	if rec.Shell == "" && hello.ShellBase != "" {
		rec.Shell = hello.ShellBase + a.cfg.ShellSuffix
	}
	if hello.Home != "" {
		rec.Home = hello.Home
	}
	disksChanged := !slices.Equal(rec.Disks, hello.Disks)
	if disksChanged && (s.replica != nil || rec.Replica.Committed != 0) {
		g.mu.Unlock()
		return nil, checkpoint.Welcome{}, nil, checkpoint.Fatal(fmt.Errorf("guest %q: its disks changed (%v, the replica has %v): unenroll it and enroll it again", hello.Guest, hello.Disks, rec.Disks))
	}
	if disksChanged {
		rec.Disks = hello.Disks
	}
	g.mu.Unlock()
	if fence > st.Fence {
		g.post(FenceMoved{Fence: fence})
	}
	if err := a.attachShell(ctx, g, hello.DomainXML, hello.RAMBytes); err != nil {
		if created {
			// A first contact refused leaves nothing behind: no record,
			// no images, no goroutine.
			a.discardNewReplica(g)
		}
		return nil, checkpoint.Welcome{}, nil, err
	}
	if s.session != nil {
		s.session.Close() // the primary reconnected; the old session is dead
	}
	s.session, s.sessionFrom, s.lastFrame, s.lastError = conn, hello.Agent, time.Now(), ""
	s.lastWelcome = s.lastFrame
	a.detector.Heartbeat(g.name)
	rst := s.replica.State()
	var hashes []uint64
	if s.replica.Consistent() == nil || rst.Prefilled {
		// Whenever the primary cannot resume from this replica's epochs
		// (its agent restarted, or the disks must be resynced, which
		// resets the replica's epochs), it resyncs against what this
		// replica holds instead of copying all of RAM; it ignores them
		// otherwise. 8 bytes a page, once a session.
		hashes = s.replica.PageHashes()
	}
	w := checkpoint.Welcome{Agent: a.cfg.AgentID, Generation: rst.Generation, Committed: rst.Committed, AckWindowMs: a.ackWindow().Milliseconds()}
	return &sessionGuest{g: g, conn: conn}, w, hashes, nil
}

// standbyGuestFor returns the guest a hello is for, creating its replica
// record on first contact within max_replicas.
func (a *Agent) standbyGuestFor(ctx context.Context, hello checkpoint.Hello, fence uint64) (*guest, bool, error) {
	a.standbyNew.Lock()
	defer a.standbyNew.Unlock()
	if g := a.guest(hello.Guest); g != nil {
		if g.primary != nil && g.state().Fenced {
			g, err := a.supersededToStandby(ctx, g, hello, fence)
			return g, false, err
		}
		if g.primary != nil {
			return nil, false, checkpoint.Fatal(fmt.Errorf("guest %q is protected by this agent as its primary; a host cannot be its own standby", hello.Guest))
		}
		return g, false, nil
	}
	replicas := 0
	for _, g := range a.guestList() {
		if g.standby != nil {
			replicas++
		}
	}
	if replicas >= a.cfg.MaxReplicas {
		return nil, false, checkpoint.Fatal(fmt.Errorf("agent %s keeps %d replicas, its max_replicas: raise it or protect guest %q on another standby", a.cfg.AgentID, replicas, hello.Guest))
	}
	if a.arb != nil && fence > 0 {
		// A first contact at a fencing epoch: only one the arbiter issued
		// to this primary, or a hostile agent could claim a guest's name
		// at a fence its real primary can never reach.
		view, known, err := a.arbiterView(ctx, hello.Guest)
		switch {
		case err != nil:
			return nil, false, fmt.Errorf("cannot check guest %q's fencing epoch %d with the arbiter: %w", hello.Guest, fence, err)
		case !known || view.Primary != hello.Agent || view.Epoch < fence:
			return nil, false, checkpoint.Fatal(fmt.Errorf("agent %s is not guest %q's primary at fencing epoch %d for the arbiter (it has %q at %d)", hello.Agent, hello.Guest, fence, view.Primary, view.Epoch))
		}
	}
	a.journal.note(hello.Guest, "enrolled", "standby on this host of primary "+hello.Agent, fence)
	return a.newStandbyGuest(&Record{Name: hello.Guest, Role: api.RoleStandby, Primary: hello.Agent, Fence: fence, Enrolled: time.Now().UTC(), Home: hello.Home}), true, nil
}

// discardNewReplica undoes standbyGuestFor's creation of g after its first
// hello was refused (g's standby lock held).
func (a *Agent) discardNewReplica(g *guest) {
	a.detachShell(g)
	closeReplicaDisks(g.standby.disks)
	g.standby.disks = nil
	_ = os.RemoveAll(a.replicaDir(g.name))
	_ = os.RemoveAll(filepath.Dir(a.diskImage(g.name, "x")))
	go g.stop() // not under s.mu: the driver's tick takes it
	a.forget(g)
	a.detector.Forget(g.name)
	_ = a.store.remove(g.name)
}

// vetPrimary checks a session's primary against the replica's: the agent
// it was enrolled by, at a fencing epoch no newer than the arbiter issued.
// Another agent takes a replica over only when the arbiter names it.
func (a *Agent) vetPrimary(ctx context.Context, g *guest, agent string, fence, replicaFence uint64) error {
	g.mu.Lock()
	primary := g.rec.Primary
	g.mu.Unlock()
	if primary == agent && (fence <= replicaFence || a.arb == nil) {
		return nil
	}
	if a.arb == nil {
		return checkpoint.Fatal(fmt.Errorf("guest %q's replica on %s belongs to primary %s, not %s: unenroll it here (remora vm unenroll %s) before protecting it from %s", g.name, a.cfg.AgentID, primary, agent, g.name, agent))
	}
	view, known, err := a.arbiterView(ctx, g.name)
	switch {
	case err != nil:
		return fmt.Errorf("cannot check agent %s at fencing epoch %d with the arbiter: %w", agent, fence, err)
	case !known || view.Primary != agent:
		return checkpoint.Fatal(fmt.Errorf("guest %q's replica on %s belongs to primary %s; the arbiter does not name %s its primary (it has %q): unenroll it here before protecting it from %s", g.name, a.cfg.AgentID, primary, agent, view.Primary, agent))
	case view.Epoch < fence:
		return fmt.Errorf("fencing epoch %d from %s was not issued by the arbiter (it has %d for guest %q)", fence, agent, view.Epoch, g.name)
	}
	return nil
}

// arbiterView is the arbiter's record of guest.
func (a *Agent) arbiterView(ctx context.Context, guest string) (arbiter.GuestStatus, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := a.arb.Status(ctx)
	if err != nil {
		return arbiter.GuestStatus{}, false, err
	}
	gs, ok := activeGuest(st, guest)
	return gs, ok, nil
}

// activeGuest finds guest in the arbiter's status, unless retired.
func activeGuest(st arbiter.Status, guest string) (arbiter.GuestStatus, bool) {
	for _, gs := range st.Guests {
		if gs.Guest == guest && !gs.Retired {
			return gs, true
		}
	}
	return arbiter.GuestStatus{}, false
}

// sessionGuest is one session's hold on a replica (checkpoint.SessionGuest).
type sessionGuest struct {
	g    *guest
	conn net.Conn
}

func (sg *sessionGuest) Lock() (*checkpoint.Replica, uint64, error) {
	s := sg.g.standby
	s.mu.Lock()
	if s.session != sg.conn || s.replica == nil {
		s.mu.Unlock()
		return nil, 0, errors.New("session replaced or closed")
	}
	return s.replica, sg.g.fence.Load(), nil
}

func (sg *sessionGuest) Unlock(f checkpoint.Frame, committed bool) {
	s := sg.g.standby
	now := time.Now()
	// After the frame was handled: a slow apply is our own delay, not the
	// primary's silence.
	s.lastFrame = now
	s.bytesIn += uint64(len(f.Payload))
	if committed {
		s.lastCommit = now
		s.commits = append(s.commits, now)
		if len(s.commits) > 256 {
			s.commits = s.commits[len(s.commits)-256:]
		}
	}
	s.mu.Unlock()
	sg.g.a.detector.Heartbeat(sg.g.name)
}

func (sg *sessionGuest) EpochBegin(epoch uint64, gen string, full bool) error {
	return sg.g.a.journal.epochBegin(sg.g.name, epoch, gen, full)
}

func (sg *sessionGuest) EpochAbort(epoch uint64) { sg.g.a.journal.epochAbort(sg.g.name, epoch) }

func (sg *sessionGuest) Ended(err error) {
	s := sg.g.standby
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.replica != nil && s.session == sg.conn {
		s.replica.Abort()
		sg.g.a.journal.epochAbort(sg.g.name, 0)
	}
	if s.session == sg.conn {
		s.session = nil
		if err != nil && !sg.g.state().Promoted {
			s.lastError = fmt.Sprintf("session with primary %s ended: %v", s.sessionFrom, err)
		}
	}
}

// Unenroll drops a replica when its primary unenrolls the guest.
func (h standbyHandler) Unenroll(ctx context.Context, conn net.Conn, hello checkpoint.Hello, fence uint64) (checkpoint.Welcome, error) {
	if err := checkPeerName(conn, hello.Agent); err != nil {
		return checkpoint.Welcome{}, err
	}
	if err := h.a.dropReplica(ctx, hello.Guest, fence, hello.Agent); err != nil {
		return checkpoint.Welcome{}, err
	}
	return checkpoint.Welcome{Agent: h.a.cfg.AgentID}, nil
}

// Restarting notes that a replica's primary agent is restarting on
// purpose: the standby asks for no promotion until the grace runs out.
func (h standbyHandler) Restarting(ctx context.Context, conn net.Conn, r checkpoint.Restarting, fence uint64) error {
	if err := checkPeerName(conn, r.Agent); err != nil {
		return err
	}
	g := h.a.guest(r.Guest)
	if g == nil || g.standby == nil {
		return fmt.Errorf("guest %q has no replica on this standby", r.Guest)
	}
	g.mu.Lock()
	primary := g.rec.Primary
	g.mu.Unlock()
	if st := g.state(); r.Agent != primary || fence < st.Fence {
		return fmt.Errorf("agent %q at fencing epoch %d is not guest %q's primary (%s at %d)", r.Agent, fence, r.Guest, primary, st.Fence)
	}
	grace := min(r.Grace, 5*time.Minute)
	g.log.Info("the primary's agent is restarting on purpose: no promotion meanwhile", "primary", r.Agent, "grace", grace)
	g.post(PrimaryRestarting{Until: time.Now().Add(grace)})
	return nil
}

// dropReplica removes a guest's replica and its shell. primary, when set,
// is the agent asking: only the guest's own primary may.
func (a *Agent) dropReplica(ctx context.Context, name string, fence uint64, primary string) error {
	g := a.guest(name)
	if g == nil || g.standby == nil {
		return nil
	}
	s := g.standby
	s.mu.Lock()
	defer s.mu.Unlock()
	st := g.state()
	g.mu.Lock()
	recPrimary, shell := g.rec.Primary, g.rec.Shell
	g.mu.Unlock()
	if primary != "" && recPrimary != "" && primary != recPrimary {
		return fmt.Errorf("agent %q may not unenroll guest %q: its primary is agent %q", primary, name, recPrimary)
	}
	if fence < st.Fence {
		return fmt.Errorf("stale fencing epoch %d: this replica is at fencing epoch %d", fence, st.Fence)
	}
	if st.Promoted || st.FailingOver {
		return fmt.Errorf("guest %q was failed over to this host; it is no longer a replica", name)
	}
	if s.session != nil {
		s.session.Close()
		s.session = nil
	}
	a.detachShell(g)
	if shell != "" {
		if err := a.virt.Destroy(ctx, shell); err != nil {
			return err
		}
	}
	_ = os.RemoveAll(a.replicaDir(name))
	_ = os.RemoveAll(filepath.Dir(a.diskImage(name, "x")))
	g.mu.Lock()
	if held := g.rec.HeldRAM; held != "" {
		_ = os.Remove(held)
	}
	g.mu.Unlock()
	if err := a.journalDrop(ctx, name); err != nil {
		return err
	}
	go g.stop() // not under s.mu: the driver's tick takes it
	a.forget(g)
	a.detector.Forget(name)
	g.log.Info("replica dropped")
	return a.store.remove(name)
}

// Disk serves a disk connection from a primary: mirror writes (NBD) or
// epoch cuts.
func (h standbyHandler) Disk(ctx context.Context, conn net.Conn, kind checkpoint.FrameType, fence uint64, dh checkpoint.DiskHello) error {
	a := h.a
	if err := checkPeerName(conn, dh.Agent); err != nil {
		return err
	}
	g := a.guest(dh.Guest)
	if g == nil || g.standby == nil {
		return fmt.Errorf("guest %q has no replica on this standby", dh.Guest)
	}
	g.mu.Lock()
	primary := g.rec.Primary
	g.mu.Unlock()
	if dh.Agent != primary {
		return fmt.Errorf("agent %q may not open guest %q's disk %s: its primary is agent %q", dh.Agent, dh.Guest, dh.Dev, primary)
	}
	s := g.standby
	s.mu.Lock()
	st := g.state()
	if fence < st.Fence {
		s.mu.Unlock()
		return fmt.Errorf("stale fencing epoch %d: this replica is at fencing epoch %d", fence, st.Fence)
	}
	if st.Promoted || st.FailingOver || s.busy {
		s.mu.Unlock()
		return fmt.Errorf("guest %q is failing or failed over on this host", dh.Guest)
	}
	d, err := s.disk(g.name, dh.Dev)
	if err == nil && kind == checkpoint.FrameDiskControl && dh.Reset {
		// A new mirror overwrites the image before its first cut: the
		// replica holds no consistent checkpoint until a full epoch commits.
		if s.replica != nil {
			err = s.replica.Reset("")
		}
		if err == nil {
			d.target.Reset()
			g.log.Info("disk replica reset for a new mirror", "dev", dh.Dev)
		}
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if err := checkpoint.WriteJSON(conn, checkpoint.FrameWelcome, fence, 0, checkpoint.Welcome{Agent: a.cfg.AgentID}); err != nil {
		return err
	}
	_ = conn.SetDeadline(time.Time{})
	if kind == checkpoint.FrameDiskNBD {
		return d.server.ServeConn(conn)
	}
	err = disk.ServeControl(conn, d.target)
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// replicaDisk is the standby's copy of one guest disk.
type replicaDisk struct {
	spec   checkpoint.DiskSpec
	target *disk.Target
	server *disk.Server
}

func (d replicaDisk) Stage(epoch uint64, path string) error {
	_, err := d.target.Stage(epoch, path)
	return err
}

func (d replicaDisk) Apply(path string) error {
	_, err := d.target.Apply(path)
	return err
}

// diskImage is where the standby keeps the replica image of a guest disk:
// on the state directory's file system, since its writes are fsynced.
func (a *Agent) diskImage(guest, dev string) string {
	return filepath.Join(a.cfg.StateDir, "images", guest, dev+".img")
}

// replicaImage is the replica image of a guest's disk dev: the default, or
// this host's superseded copy's own image (rec.Images).
func (a *Agent) replicaImage(rec *Record, dev string) string {
	if p := rec.Images[dev]; p != "" {
		return p
	}
	return a.diskImage(rec.Name, dev)
}

// openReplicaDisks opens (creating where missing) the replica images of a
// guest's disks.
func (a *Agent) openReplicaDisks(rec *Record, specs []checkpoint.DiskSpec) ([]*replicaDisk, error) {
	var out []*replicaDisk
	fail := func(err error) ([]*replicaDisk, error) {
		closeReplicaDisks(out)
		return nil, err
	}
	for _, s := range specs {
		if !names.ValidDev(s.Dev) || s.Size <= 0 {
			return fail(fmt.Errorf("bad disk %q of %d bytes in the primary's hello", s.Dev, s.Size))
		}
		var f *os.File
		var err error
		path := a.replicaImage(rec, s.Dev)
		if own := rec.Images[s.Dev]; own != "" {
			// This host's own image of the guest, from its own libvirt
			// definition: its path is not from the wire.
			f, err = os.OpenFile(own, os.O_RDWR, 0)
			if fi, serr := os.Stat(own); err != nil || serr != nil || fi.Size() != s.Size {
				a.log.Warn("the superseded copy's image cannot be the replica's; a new one is copied", "guest", rec.Name, "dev", s.Dev, "image", own, "disk_bytes", s.Size, "err", errors.Join(err, serr))
				if f != nil {
					f.Close()
				}
				rec.Images = maps.Clone(rec.Images)
				delete(rec.Images, s.Dev)
				path = a.replicaImage(rec, s.Dev)
			}
		}
		if rec.Images[s.Dev] == "" {
			// Names from the wire, validated; opened beneath state_dir
			// without following links a local process may have planted.
			// Searchable: QEMU runs the shell as its own user; libvirt
			// gives it the images themselves.
			rel, _ := filepath.Rel(a.cfg.StateDir, path)
			if err := safepath.MkdirAll(a.cfg.StateDir, filepath.Dir(rel), 0o711); err != nil {
				return fail(err)
			}
			f, err = safepath.Open(a.cfg.StateDir, rel, os.O_RDWR|os.O_CREATE, 0o600)
		}
		if err != nil {
			return fail(err)
		}
		fi, err := f.Stat()
		if err == nil && !fi.Mode().IsRegular() {
			err = fmt.Errorf("not a regular file (%s): remove it", fi.Mode().Type())
		}
		if err == nil && fi.Size() != s.Size {
			err = f.Truncate(s.Size) // sparse; the mirror fills it
		}
		if err != nil {
			f.Close()
			return fail(fmt.Errorf("replica image %s: %w", path, err))
		}
		t, err := disk.NewFileTarget(f, disk.Options{})
		if err != nil {
			f.Close()
			return fail(fmt.Errorf("replica image %s: %w", path, err))
		}
		out = append(out, &replicaDisk{spec: s, target: t, server: disk.NewServer(t, s.Dev)})
	}
	return out, nil
}

func closeReplicaDisks(ds []*replicaDisk) {
	for _, d := range ds {
		d.server.Close()
		d.target.Close()
	}
}

// diskStatus sums the replica disks' figures (s.mu held).
func (s *standbyRun) diskStatus() *api.DiskStatus {
	if len(s.disks) == 0 {
		return nil
	}
	st := &api.DiskStatus{State: "replica"}
	for _, d := range s.disks {
		t := d.target.Stats()
		st.Devs = append(st.Devs, d.spec.Dev)
		st.LastEpochWrites += t.LastSealed.Writes
		st.LastEpochBytes += t.LastSealed.Bytes
		st.HeldEpochs = max(st.HeldEpochs, t.HeldEpochs)
		st.HeldBytes += t.HeldBytes
		st.AppliedBytes += t.AppliedBytes
		if t.OutOfSync != "" {
			st.OutOfSync, st.State = d.spec.Dev+": "+t.OutOfSync, "out of sync"
		}
	}
	return st
}

func (s *standbyRun) disk(guest, dev string) (*replicaDisk, error) {
	for _, d := range s.disks {
		if d.spec.Dev == dev {
			return d, nil
		}
	}
	return nil, fmt.Errorf("no replicated disk %q for guest %q on this standby", dev, guest)
}

// finishDisks makes the replica images hold exactly the applied epoch
// before the shell starts from it: writes of later epochs are dropped.
func (s *standbyRun) finishDisks(applied uint64) error {
	for _, d := range s.disks {
		d.server.Close()
		if err := d.target.Discard(applied); err != nil {
			return fmt.Errorf("disk %s: %w", d.spec.Dev, err)
		}
	}
	return nil
}
