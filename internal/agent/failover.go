package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/txlog"
)

// The steps of a failover, as the journal names them.
const (
	stepResolved = "resolved"             // in-flight epochs aborted; the last applied one is restored
	stepPrepared = "prepared"             // the intent is durable: the old primary's frames are stale from here
	stepRestored = "restored and started" // the shell runs the guest, the promotion is recorded: the point of no return
)

// errFailedOver: the guest already runs here.
var errFailedOver = errors.New("already failed over to this host")

// retryableError is a failover error worth trying again (the shell still
// waits for its device state).
type retryableError struct{ error }

func (e *retryableError) Unwrap() error { return e.error }

// Failover resumes a replica's guest on this host from the last committed
// epoch. Without force it refuses while the primary is still replicating,
// and with an arbiter it needs the arbiter's grant, as an automatic one
// does: that is what keeps two copies from running.
func (a *Agent) Failover(ctx context.Context, name string, force bool) (api.FailoverResult, error) {
	g := a.guest(name)
	if g == nil {
		return api.FailoverResult{}, fmt.Errorf("guest %q: %w as a replica: see `remora vm status`", name, errNotEnrolled)
	}
	if g.primary != nil {
		return api.FailoverResult{}, fmt.Errorf("guest %q runs on this host as the primary: run failover on its standby host", name)
	}
	st := g.state()
	switch {
	case st.Promoted:
		g.mu.Lock()
		at := g.rec.FailedOver
		g.mu.Unlock()
		return api.FailoverResult{}, fmt.Errorf("guest %q was already failed over to this host at %s", name, at.Format(time.RFC3339))
	case st.FailingOver:
		force = true // resuming our own interrupted failover
	}
	s := g.standby
	s.mu.Lock()
	from, last, live := s.sessionFrom, s.lastFrame, s.session != nil
	s.mu.Unlock()
	if !force && live && time.Since(last) < 3*time.Second {
		return api.FailoverResult{}, fmt.Errorf("the primary %s is still replicating %q (last frame %s ago): failing over now would run two copies; stop the primary first, or pass --force if you know it is dead", from, name, time.Since(last).Round(time.Millisecond))
	}
	fence := uint64(0)
	if a.arb != nil && !force {
		gr, err := a.arb.RequestPromotion(ctx, name, a.cfg.AgentID, st.Fence)
		if err != nil {
			return api.FailoverResult{}, fmt.Errorf("the arbiter refused promotion of %q: %w (pass --force only if you know the primary is dead and fenced)", name, err)
		}
		g.post(FailoverStarted{Now: time.Now(), Fence: gr.Epoch, Lease: gr.Lease})
		fence = gr.Epoch
	} else {
		g.post(FailoverStarted{Now: time.Now(), Fence: st.Fence + 1})
	}
	res, err := a.failoverGuest(ctx, g, fence, false)
	g.post(failoverOutcome(err))
	return res, err
}

// failoverOutcome is the event that reports a failover's result.
func failoverOutcome(err error) Event {
	if err == nil || errors.Is(err, errFailedOver) {
		return FailoverDone{Now: time.Now()}
	}
	var re *retryableError
	return FailoverFailed{Now: time.Now(), Err: err, Retryable: errors.As(err, &re), RolledBack: errors.Is(err, migrate.ErrRolledBack)}
}

// failoverGuest runs (or resumes) the failover move of guest g; a non-zero
// fence is the epoch the arbiter granted. One failover runs at a time.
// Unless its primary handed it over (handedOver), the guest resumes only
// after the ack window (see ackWindow).
func (a *Agent) failoverGuest(ctx context.Context, g *guest, fence uint64, handedOver bool) (api.FailoverResult, error) {
	a.failover.Lock()
	defer a.failover.Unlock()
	start := time.Now()
	s := g.standby
	s.mu.Lock()
	defer s.mu.Unlock()
	g.mu.Lock()
	rec := g.rec
	state := rec.State
	g.mu.Unlock()
	if state == StateFailedOver {
		return api.FailoverResult{Guest: g.name, Fence: rec.Fence}, errFailedOver
	}
	if s.session != nil {
		s.session.Close()
		s.session = nil
	}
	s.busy = true
	defer func() { s.busy = false }()
	if !handedOver {
		if err := a.waitAckWindow(ctx, g); err != nil {
			return api.FailoverResult{}, &retryableError{err}
		}
	}

	tx, resuming := a.resume[g.name]
	var epoch uint64
	if resuming {
		g.log.Warn("resuming an interrupted failover", "steps_done", tx.steps, "committed", tx.committed)
		epoch, fence = tx.epoch, max(fence, tx.fence)
		if !tx.committed {
			exists, err := a.virt.DomainExists(ctx, rec.Shell)
			if err != nil {
				return api.FailoverResult{}, &retryableError{err}
			}
			if !exists {
				m := &migrate.Move{Kind: "failover", Guest: g.name, Fence: tx.fence, Epoch: epoch}
				err := migrate.Abort(ctx, moveJournal{a.journal}, m, tx.progress(), "shell gone")
				delete(a.resume, g.name)
				g.mu.Lock()
				g.rec.State = ""
				serr := a.store.save(g.rec)
				g.mu.Unlock()
				a.detachShell(g)
				return api.FailoverResult{}, errors.Join(fmt.Errorf("failover of %q rolled back: its standby shell %q is gone, so there is nothing to resume; re-enroll the guest from a running copy: %w", g.name, rec.Shell, err), serr)
			}
			if s.replica == nil {
				if st, err := qemu.Status(ctx, a.virt.Guest(rec.Shell).Mon); err == nil && st == "inmigrate" {
					if err := a.attachShell(ctx, g, "", 0); err != nil {
						return api.FailoverResult{}, err
					}
				}
			}
		}
		if s.replica != nil {
			epoch = s.replica.State().Applied
		}
	} else {
		if s.replica == nil {
			if err := a.attachShell(ctx, g, "", 0); err != nil {
				return api.FailoverResult{}, fmt.Errorf("no usable replica of %q: %w", g.name, err)
			}
		}
		epoch = s.replica.State().Applied
		fence = max(rec.Fence+1, fence)
	}
	m := &migrate.Move{Kind: "failover", Guest: g.name, Fence: fence, Epoch: epoch}
	m.Steps = []migrate.Step{
		{Name: stepResolved, Kind: migrate.StepData, Run: func(ctx context.Context) error {
			s.replica.Abort() // an epoch still arriving is not committed: drop it
			a.journal.epochAbort(g.name, 0)
			if err := s.replica.Consistent(); err != nil {
				return err
			}
			return s.finishDisks(epoch)
		}},
		{Name: stepPrepared, Kind: migrate.StepPrepare, Run: func(context.Context) error {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.rec.State, g.rec.Fence = StateFailingOver, fence // the old primary's frames are stale from now on
			g.fence.Store(max(g.fence.Load(), fence))
			return a.store.save(g.rec)
		}},
		{Name: stepRestored, Kind: migrate.StepCommit, Run: func(ctx context.Context) error {
			if err := a.restoreShell(ctx, g, rec.Shell, epoch); err != nil {
				return err
			}
			return a.journal.append(ctx, true, txlog.TypePlain, 0, journalEvent{Kind: "promote", Guest: g.name, Fence: fence, Epoch: epoch, Note: "the guest runs on this host"})
		}},
	}
	if !resuming {
		if err := s.replica.Consistent(); err != nil {
			return api.FailoverResult{}, fmt.Errorf("cannot fail over %q: %w", g.name, err)
		}
	}
	g.log.Info("failing over", "epoch", epoch, "fence", fence)
	p, err := migrate.Run(ctx, moveJournal{a.journal}, m, tx.progress())
	if err != nil {
		a.resume[g.name] = failTxn{id: p.Tx, committed: p.Committed, steps: p.Done, fence: fence, epoch: epoch}
		if exists, xerr := a.virt.DomainExists(ctx, rec.Shell); xerr == nil && !exists && !p.Committed {
			// Nothing left to start the guest from: undo the move.
			aerr := migrate.Abort(ctx, moveJournal{a.journal}, m, p, "shell gone")
			delete(a.resume, g.name)
			g.mu.Lock()
			g.rec.State = ""
			_ = a.store.save(g.rec)
			g.mu.Unlock()
			a.detachShell(g)
			return api.FailoverResult{}, errors.Join(err, aerr)
		}
		return api.FailoverResult{}, err
	}
	delete(a.resume, g.name)
	g.mu.Lock()
	g.rec.State, g.rec.FailedOver = StateFailedOver, time.Now().UTC()
	err = a.store.save(g.rec)
	g.mu.Unlock()
	if err != nil {
		return api.FailoverResult{}, err
	}
	s.lastError = ""
	a.detachShell(g)
	_ = os.RemoveAll(a.replicaDir(g.name))
	// The shell is the guest on this host now: a normal libvirt domain,
	// defined (with its replica images, autostart off) so that it outlives
	// a libvirtd restart and an admin finds it with virsh.
	if err := a.virt.MakePersistent(ctx, rec.Shell); err != nil {
		g.log.Warn("the guest runs here but stays a transient libvirt domain; define it with `virsh dumpxml` and `virsh define` to keep its definition", "domain", rec.Shell, "err", err)
	}
	res := api.FailoverResult{Guest: g.name, Epoch: epoch, Fence: fence, Duration: time.Since(start)}
	g.log.Info("failover complete: guest running on this host", "shell", rec.Shell, "epoch", epoch, "fence", fence, "took", res.Duration)
	return res, nil
}

// restoreShell starts the shell from the applied epoch, or finds it
// already started. A shell that is gone is an error: the guest runs
// nowhere, which must never be reported as a failover done.
func (a *Agent) restoreShell(ctx context.Context, g *guest, shell string, epoch uint64) error {
	exists, err := a.virt.DomainExists(ctx, shell)
	if err != nil {
		return &retryableError{err}
	}
	if !exists {
		return fmt.Errorf("the standby shell %q is gone: the guest runs nowhere; restore it from the replica images by hand, or re-enroll it", shell)
	}
	sg := a.virt.Guest(shell)
	st, err := qemu.Status(ctx, sg.Mon)
	if err != nil {
		return &retryableError{err}
	}
	if a.faultHook != nil {
		a.faultHook("failover-begun", epoch)
	}
	switch st {
	case "inmigrate":
		s := g.standby
		if s.replica == nil {
			return fmt.Errorf("the shell waits for device state but the replica is not open")
		}
		f, err := os.Open(s.replica.DevStatePath())
		if err != nil {
			return fmt.Errorf("device state of epoch %d: %w", epoch, err)
		}
		defer f.Close()
		dir, err := a.qemuOwnedDir("incoming")
		if err != nil {
			return &retryableError{err}
		}
		if err := qemu.Restore(ctx, sg, filepath.Join(dir, g.name+".sock"), f); err != nil {
			if st, serr := qemu.Status(ctx, sg.Mon); serr == nil && st == "inmigrate" {
				return &retryableError{fmt.Errorf("restore from epoch %d: %w", epoch, err)}
			}
			return fmt.Errorf("restore from epoch %d: %w", epoch, err)
		}
	case "running":
	default:
		if err := qemu.Cont(ctx, sg.Mon); err != nil {
			return &retryableError{err}
		}
	}
	if a.faultHook != nil {
		a.faultHook("failover-restored", epoch)
	}
	return nil
}
