package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
	"github.com/remora-ha/remora/txlog"
)

// pauseDomain pauses a running domain through QMP; it reports success.
func (a *Agent) pauseDomain(name string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m := virt.NewMonitor(a.virt, name)
	defer m.Close()
	return qemu.Exec(ctx, m, "stop", nil, nil) == nil
}

// contDomain resumes a paused domain through QMP; it reports success.
func (a *Agent) contDomain(name string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m := virt.NewMonitor(a.virt, name)
	defer m.Close()
	return qemu.Exec(ctx, m, "cont", nil, nil) == nil
}

// Failover resumes a replica's guest on this host from the last committed
// epoch. Without force it refuses while the primary is still replicating.
// The steps are recorded so that an agent that dies midway finishes the
// failover on restart instead of leaving it half done.
func (a *Agent) Failover(ctx context.Context, name string, force bool) (api.FailoverResult, error) {
	if a.arb == nil || force {
		return a.failoverAt(ctx, name, force, 0)
	}
	// With an arbiter, a manual failover needs the same grant as an
	// automatic one: that is what keeps two copies from running.
	a.mu.Lock()
	sg, ok := a.standby[name]
	a.mu.Unlock()
	if !ok || sg.rec.State != "" {
		return a.failoverAt(ctx, name, force, 0) // reports what is wrong
	}
	sg.mu.Lock()
	fence := sg.rec.Fence
	sg.mu.Unlock()
	g, err := a.arb.RequestPromotion(ctx, name, a.cfg.AgentID, fence)
	if err != nil {
		return api.FailoverResult{}, fmt.Errorf("the arbiter refused promotion of %q: %w (pass --force only if you know the primary is dead and fenced)", name, err)
	}
	res, err := a.failoverAt(ctx, name, true, g.Epoch)
	if err == nil {
		go a.promotedCoordination(a.runCtx, sg, g.Lease)
	}
	return res, err
}

// failoverAt fails over; a non-zero fence is the epoch the arbiter granted.
func (a *Agent) failoverAt(ctx context.Context, name string, force bool, fence uint64) (api.FailoverResult, error) {
	a.failover.Lock()
	defer a.failover.Unlock()
	start := time.Now()
	a.mu.Lock()
	sg, ok := a.standby[name]
	_, isPrimary := a.primary[name]
	a.mu.Unlock()
	if !ok {
		if isPrimary {
			return api.FailoverResult{}, fmt.Errorf("domain %q runs on this host as the primary: run failover on its standby host", name)
		}
		return api.FailoverResult{}, fmt.Errorf("domain %q: %w as a replica: see `remora vm status`", name, errNotEnrolled)
	}
	sg.mu.Lock()
	defer sg.mu.Unlock()
	rec := sg.rec
	switch rec.State {
	case StateFailedOver:
		return api.FailoverResult{}, fmt.Errorf("domain %q was already failed over to this host at %s", name, rec.FailedOver.Format(time.RFC3339))
	case StateFailingOver:
		force = true // resuming our own interrupted failover
	default:
		if sg.session != nil && time.Since(sg.lastFrame) < 3*time.Second && !force {
			return api.FailoverResult{}, fmt.Errorf("the primary %s is still replicating %q (last frame %s ago): failing over now would run two copies; stop the primary first, or pass --force if you know it is dead", sg.sessionFrom, name, time.Since(sg.lastFrame).Round(time.Millisecond))
		}
	}
	if sg.session != nil {
		sg.session.Close()
		sg.session = nil
	}
	if tx, resuming := a.resume[name]; resuming {
		return a.resumeFailover(ctx, sg, tx, start)
	}
	if sg.replica == nil {
		if err := a.attachShell(ctx, sg, "", 0); err != nil {
			return api.FailoverResult{}, fmt.Errorf("no usable replica of %q: %w", name, err)
		}
	}
	sg.replica.Abort() // an epoch still arriving is not committed: drop it
	a.journal.epochAbort(name, 0)
	epoch := sg.replica.State().Applied
	if err := sg.replica.Consistent(); err != nil {
		return api.FailoverResult{}, fmt.Errorf("cannot fail over %q: %w", name, err)
	}
	if err := a.finishDisks(sg, epoch); err != nil {
		return api.FailoverResult{}, fmt.Errorf("cannot fail over %q: %w", name, err)
	}
	// One journal transaction covers the whole failover: a crash anywhere
	// in it is resumed (or rolled back) from the journal on restart.
	tx := failTxn{id: a.journal.newTx(), fence: max(rec.Fence+1, fence)}
	ev := journalEvent{Kind: "failover", Guest: name, Epoch: epoch, Fence: tx.fence}
	if err := a.journal.append(ctx, true, txlog.TypeBegin, tx.id, ev); err != nil {
		return api.FailoverResult{}, err
	}
	ev.Step = "resolved" // in-flight epochs aborted; restoring the last applied one
	if err := a.journal.append(ctx, false, txlog.TypeData, tx.id, ev); err != nil {
		return api.FailoverResult{}, err
	}
	ev.Step = "prepared"
	if err := a.journal.append(ctx, true, txlog.TypePrepare, tx.id, ev); err != nil {
		return api.FailoverResult{}, err
	}
	a.resume[name] = tx
	rec.State = StateFailingOver
	rec.Fence = tx.fence // the old primary's frames are stale from now on
	if err := a.store.save(rec); err != nil {
		return api.FailoverResult{}, err
	}
	return a.finishFailover(ctx, sg, tx, epoch, start)
}

// resumeFailover continues a failover the journal shows unfinished. It is
// rolled back only if the shell is gone before the guest was started.
func (a *Agent) resumeFailover(ctx context.Context, sg *standbyGuest, tx failTxn, start time.Time) (api.FailoverResult, error) {
	rec := sg.rec
	a.log.Warn("resuming an interrupted failover", "domain", rec.Name, "steps_done", tx.steps, "committed", tx.committed)
	rec.Fence = max(rec.Fence, tx.fence)
	exists, err := a.virt.DomainExists(ctx, rec.Shell)
	if err != nil {
		return api.FailoverResult{}, err
	}
	if !exists && !tx.committed {
		ev := journalEvent{Kind: "failover", Guest: rec.Name, Fence: tx.fence, Step: "rolled back: shell gone"}
		if err := a.journal.append(ctx, true, txlog.TypeAbort, tx.id, ev); err != nil {
			return api.FailoverResult{}, err
		}
		delete(a.resume, rec.Name)
		rec.State = ""
		a.detachShell(sg)
		if err := a.store.save(rec); err != nil {
			return api.FailoverResult{}, err
		}
		return api.FailoverResult{}, fmt.Errorf("failover of %q rolled back: its standby shell %q is gone, so there is nothing to resume; re-enroll the guest from a running copy", rec.Name, rec.Shell)
	}
	if exists && sg.replica == nil {
		st, err := qemu.Status(ctx, virt.NewMonitor(a.virt, rec.Shell))
		if err != nil {
			return api.FailoverResult{}, err
		}
		if st == "inmigrate" { // not restored yet: the replica is needed
			if err := a.attachShell(ctx, sg, "", 0); err != nil {
				return api.FailoverResult{}, err
			}
		}
	}
	var epoch uint64
	if sg.replica != nil {
		epoch = sg.replica.State().Applied
	} else {
		epoch = rec.Replica.Applied
	}
	return a.finishFailover(ctx, sg, tx, epoch, start)
}

// finishFailover restores the shell unless that was done, then records the
// promotion and ends the journal transaction.
func (a *Agent) finishFailover(ctx context.Context, sg *standbyGuest, tx failTxn, epoch uint64, start time.Time) (api.FailoverResult, error) {
	rec, name := sg.rec, sg.rec.Name
	step := func(s string, typ txlog.RecordType, durable bool) error {
		return a.journal.append(ctx, durable, typ, tx.id, journalEvent{Kind: "failover", Guest: name, Epoch: epoch, Fence: tx.fence, Step: s})
	}
	a.log.Info("failing over", "domain", name, "epoch", epoch, "fence", rec.Fence)
	if exists, err := a.virt.DomainExists(ctx, rec.Shell); err != nil {
		return api.FailoverResult{}, err
	} else if exists {
		mon := virt.NewMonitor(a.virt, rec.Shell)
		defer mon.Close()
		st, err := qemu.Status(ctx, mon)
		if err != nil {
			return api.FailoverResult{}, err
		}
		if a.faultHook != nil {
			a.faultHook("failover-begun", epoch)
		}
		if st == "inmigrate" {
			f, err := os.Open(sg.replica.DevStatePath())
			if err != nil {
				return api.FailoverResult{}, fmt.Errorf("device state of epoch %d: %w", epoch, err)
			}
			shell := &qemu.Guest{Name: rec.Shell, Mon: mon}
			err = qemu.Restore(ctx, shell, filepath.Join(a.cfg.RuntimeDir, name+".incoming.sock"), f)
			f.Close()
			if err != nil {
				return api.FailoverResult{}, fmt.Errorf("restore %q from epoch %d: %w", name, epoch, err)
			}
		} else if st != "running" {
			if err := qemu.Exec(ctx, mon, "cont", nil, nil); err != nil {
				return api.FailoverResult{}, err
			}
		}
	} else {
		a.log.Error("the promoted guest's domain is gone", "domain", name, "shell", rec.Shell)
	}
	if a.faultHook != nil {
		a.faultHook("failover-restored", epoch)
	}
	if !tx.committed {
		if err := step("restored and started", txlog.TypeCommit, true); err != nil {
			return api.FailoverResult{}, err
		}
		if err := a.journal.append(ctx, true, txlog.TypePlain, 0, journalEvent{Kind: "promote", Guest: name, Fence: rec.Fence}); err != nil {
			return api.FailoverResult{}, err
		}
	}
	rec.State = StateFailedOver
	rec.FailedOver = time.Now().UTC()
	sg.lastError = ""
	if err := a.store.save(rec); err != nil {
		return api.FailoverResult{}, err
	}
	if err := step("announced", txlog.TypeEnd, false); err != nil {
		return api.FailoverResult{}, err
	}
	delete(a.resume, name)
	a.detachShell(sg)
	_ = os.RemoveAll(a.replicaDir(name))
	res := api.FailoverResult{Guest: name, Epoch: epoch, Fence: rec.Fence, Duration: time.Since(start)}
	a.log.Info("failover complete: guest running on this host", "domain", name, "shell", rec.Shell, "epoch", epoch, "took", res.Duration)
	return res, nil
}
