package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/remora-ha/remora/migrate"
)

// FailoverResult says what a failover restored.
type FailoverResult struct {
	Domain   string        `json:"domain"`
	Epoch    uint64        `json:"epoch"`
	Fence    uint64        `json:"fence"`
	Duration time.Duration `json:"duration_ns"`
}

func removeAll(p string) error { return os.RemoveAll(p) }

// Failover resumes a replica's guest on this host from the last committed
// epoch. Without force it refuses while the primary is still replicating.
// The steps are recorded so that an agent that dies midway finishes the
// failover on restart instead of leaving it half done.
func (a *Agent) Failover(ctx context.Context, name string, force bool) (FailoverResult, error) {
	a.failover.Lock()
	defer a.failover.Unlock()
	start := time.Now()
	a.mu.Lock()
	sg, ok := a.standby[name]
	_, isPrimary := a.primary[name]
	a.mu.Unlock()
	if !ok {
		if isPrimary {
			return FailoverResult{}, fmt.Errorf("domain %q runs on this host as the primary: run failover on its standby host", name)
		}
		return FailoverResult{}, fmt.Errorf("domain %q: %w as a replica: see `remora vm status`", name, errNotEnrolled)
	}
	sg.mu.Lock()
	defer sg.mu.Unlock()
	rec := sg.rec
	switch rec.State {
	case StateFailedOver:
		return FailoverResult{}, fmt.Errorf("domain %q was already failed over to this host at %s", name, rec.FailedOver.Format(time.RFC3339))
	case StateFailingOver:
		force = true // resuming our own interrupted failover
	default:
		if sg.session != nil && time.Since(sg.lastFrame) < 3*time.Second && !force {
			return FailoverResult{}, fmt.Errorf("the primary %s is still replicating %q (last frame %s ago): failing over now would run two copies; stop the primary first, or pass --force if you know it is dead", sg.sessionFrom, name, time.Since(sg.lastFrame).Round(time.Millisecond))
		}
	}
	if sg.session != nil {
		sg.session.Close()
		sg.session = nil
	}
	if sg.replica == nil {
		if err := a.attachShell(ctx, sg, "", 0); err != nil {
			return FailoverResult{}, fmt.Errorf("no usable replica of %q: %w", name, err)
		}
	}
	sg.replica.Abort() // an epoch still arriving is not committed: drop it
	if rec.State != StateFailingOver {
		if err := sg.replica.Consistent(); err != nil {
			return FailoverResult{}, fmt.Errorf("cannot fail over %q: %w", name, err)
		}
		rec.State = StateFailingOver
		rec.Fence++ // the old primary's frames are stale from now on
		if err := a.store.save(rec); err != nil {
			return FailoverResult{}, err
		}
	}
	epoch := sg.replica.State().Applied
	a.log.Info("failing over", "domain", name, "epoch", epoch, "fence", rec.Fence)

	st, err := migrate.Status(sg.shell.Mon)
	if err != nil {
		return FailoverResult{}, err
	}
	if st == "inmigrate" {
		f, err := os.Open(sg.replica.DevStatePath())
		if err != nil {
			return FailoverResult{}, fmt.Errorf("device state of epoch %d: %w", epoch, err)
		}
		err = migrate.Restore(ctx, sg.shell, filepath.Join(a.cfg.RuntimeDir, name+".incoming.sock"), f)
		f.Close()
		if err != nil {
			return FailoverResult{}, fmt.Errorf("restore %q from epoch %d: %w", name, epoch, err)
		}
	} else if st != "running" {
		if err := migrate.Exec(sg.shell.Mon, "cont", nil, nil); err != nil {
			return FailoverResult{}, err
		}
	}
	rec.State = StateFailedOver
	rec.FailedOver = time.Now().UTC()
	sg.lastError = ""
	if err := a.store.save(rec); err != nil {
		return FailoverResult{}, err
	}
	a.detachShell(sg)
	_ = removeAll(a.replicaDir(name))
	res := FailoverResult{Domain: name, Epoch: epoch, Fence: rec.Fence, Duration: time.Since(start)}
	a.log.Info("failover complete: guest running on this host", "domain", name, "shell", rec.Shell, "epoch", epoch, "took", res.Duration)
	return res, nil
}
