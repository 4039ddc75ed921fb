package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/remora-ha/remora/internal/agent/api"
)

// Status lists every guest this agent knows.
func (a *Agent) Status() []api.VMStatus {
	var out []api.VMStatus
	for _, g := range a.guestList() {
		out = append(out, g.status())
	}
	return out
}

// status is one guest's line of `vm status`: everything comes from its
// machine's state and the figures of its engine or replica.
func (g *guest) status() api.VMStatus {
	a := g.a
	timeout := a.cfg.HeartbeatTimeout()
	var v api.VMStatus
	if s := g.standby; s != nil {
		s.mu.Lock()
		v = s.status(timeout)
		g.mu.Lock()
		g.fill(&v)
		g.mu.Unlock()
		s.mu.Unlock()
		return v
	}
	p := g.primary
	g.mu.Lock()
	v = api.VMStatus{Role: api.RolePrimary, Peer: g.rec.Peer}
	g.fill(&v)
	g.mu.Unlock()
	if p.engine == nil || v.State == string(PhaseFenced) {
		return v
	}
	s := p.engine.Status()
	v.Epoch, v.Started, v.AckedEpoch, v.EpochsPerSec = s.Epoch, s.Started, s.AckedEpoch, s.EpochsPerSec
	v.PauseP50, v.PauseP99, v.PauseMax, v.DirtyPages, v.DirtyTotal, v.Incremental = s.PauseP50, s.PauseP99, s.PauseMax, s.DirtyPages, s.DirtyTotal, s.Incremental
	v.Bytes, v.RawBytes, v.PageWire, v.Lag, v.Tracker = s.BytesSent, s.RawBytes, s.PageWireBytes, s.Lag, s.Tracker
	v.DevStateBytes, v.DevStateWire, v.OutputTriggered, v.StaleAcks = s.DevStateBytes, s.DevStateWire, s.OutputTriggered, s.StaleAcks
	v.SyncPages, v.SyncDone, v.SyncTotal, v.LastError, v.NextRetry, v.LastPause, v.PauseMedian = s.SyncPages, s.SyncDone, s.SyncTotal, s.LastError, s.NextRetry, &s.LastPause, &s.PauseMedian
	v.Output = p.outputStatus(v.State != string(PhaseUnprotected))
	v.Disk = p.disks.status()
	if !s.LastAck.IsZero() {
		if age := time.Since(s.LastAck); age < timeout {
			v.Heartbeat = "ok"
		} else {
			v.Heartbeat = fmt.Sprintf("standby silent %s", age.Round(100*time.Millisecond))
		}
	}
	return v
}

// fill adds the machine's view (g.mu held).
func (g *guest) fill(v *api.VMStatus) {
	st := &g.m.State
	v.Guest, v.Fence, v.State, v.Home = g.name, st.Fence, string(st.Phase()), g.rec.Home
	if g.rec.Role == api.RolePrimary && g.rec.Domain != "" {
		v.Domain = g.rec.Domain
	}
	if st.Role == Standby {
		if st.Promoted {
			v.Role = api.RolePromoted
		}
		if v.Peer == "" {
			v.Peer = g.rec.Primary
		}
		if v.Shell == "" {
			v.Shell = g.rec.Shell
		}
		if v.Epoch == 0 {
			v.Epoch, v.AckedEpoch, v.Applied = g.rec.Replica.Committed, g.rec.Replica.Committed, g.rec.Replica.Applied
		}
		if st.Promoted { // the replication figures ended with the failover
			v.Lag, v.Heartbeat, v.EpochsPerSec = 0, "", 0
		}
	}
	if g.a.arb == nil {
		return
	}
	if !st.Lease.ValidUntil.IsZero() {
		v.LeaseHolder = st.Lease.Holder
		if d := time.Until(st.Lease.ValidUntil); d > 0 {
			v.LeaseValid = d
		}
	}
	if p := g.probe; p != nil && !p.At.IsZero() {
		if p.OK {
			v.Probe = fmt.Sprintf("ok %s (%s ago)", p.Latency.Round(time.Millisecond), time.Since(p.At).Round(time.Second))
		} else {
			v.Probe = fmt.Sprintf("failing x%d: %s", p.ConsecutiveFailures, p.Error)
		}
	}
	v.Arbiter = st.Note
	v.SuspectedAt, v.GrantedAt, v.RestoredAt = st.SuspectedAt, st.GrantedAt, st.RestoredAt
}

// status is the replica's figures (s.mu held).
func (s *standbyRun) status(hbTimeout time.Duration) api.VMStatus {
	v := api.VMStatus{Role: api.RoleStandby, Peer: s.sessionFrom, Bytes: s.bytesIn, LastError: s.lastError}
	if s.replica != nil {
		r := s.replica.State()
		v.Epoch, v.AckedEpoch, v.Applied = r.Committed, r.Committed, r.Applied
	}
	if s.shell != nil {
		v.Shell = s.shell.Name
	}
	if !s.lastCommit.IsZero() {
		v.Lag = time.Since(s.lastCommit)
	}
	v.Disk = s.diskStatus()
	if !s.lastFrame.IsZero() {
		if age := time.Since(s.lastFrame); s.session != nil && age < hbTimeout {
			v.Heartbeat = "ok"
		} else {
			v.Heartbeat = fmt.Sprintf("primary silent %s", age.Round(100*time.Millisecond))
		}
	}
	// Commits are in time order: the recent ones are a suffix.
	now := time.Now()
	i := len(s.commits)
	for i > 0 && now.Sub(s.commits[i-1]) < 10*time.Second {
		i--
	}
	if n := len(s.commits) - i; n > 1 {
		v.EpochsPerSec = float64(n) / now.Sub(s.commits[i]).Seconds()
	}
	return v
}

// Events is guest name's history on this agent, from its journal; it
// outlives an unenroll.
func (a *Agent) Events(name string) ([]api.Event, error) {
	if a.journal == nil {
		return nil, fmt.Errorf("the agent's journal is not open yet: try again")
	}
	ev := a.journal.events(name)
	if len(ev) == 0 && a.guest(name) == nil {
		return nil, fmt.Errorf("guest %q: %w, and its journal has no events of it", name, errNotEnrolled)
	}
	return ev, nil
}

func (a *Agent) serveAPI(ctx context.Context, ln net.Listener, gid int) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Status())
	})
	mux.HandleFunc("GET /v1/vms/{guest}/events", func(w http.ResponseWriter, r *http.Request) {
		ev, err := a.Events(r.PathValue("guest"))
		if err != nil {
			writeJSON(w, http.StatusNotFound, api.Error{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, ev)
	})
	mux.HandleFunc("GET /v1/agent", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Info())
	})
	mux.HandleFunc("POST /v1/enroll", func(w http.ResponseWriter, r *http.Request) {
		var req api.EnrollRequest
		if !readJSON(w, r, &req) {
			return
		}
		if err := a.Enroll(r.Context(), req.Guest, req.Standby, req.Probe); err != nil {
			writeJSON(w, http.StatusBadRequest, api.Error{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, a.Status())
	})
	mux.HandleFunc("POST /v1/failover", func(w http.ResponseWriter, r *http.Request) {
		var req api.GuestRequest
		if !readJSON(w, r, &req) {
			return
		}
		res, err := a.Failover(r.Context(), req.Guest, req.Force)
		if err != nil {
			writeJSON(w, http.StatusConflict, api.Error{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, res)
	})
	mux.HandleFunc("POST /v1/reprotect", func(w http.ResponseWriter, r *http.Request) {
		var req api.EnrollRequest
		if !readJSON(w, r, &req) {
			return
		}
		if err := a.Reprotect(r.Context(), req.Guest, req.Standby); err != nil {
			writeJSON(w, http.StatusConflict, api.Error{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	})
	move := func(fn func(context.Context, string) (api.SwitchoverResult, error)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			var req api.GuestRequest
			if !readJSON(w, r, &req) {
				return
			}
			res, err := fn(r.Context(), req.Guest)
			if err != nil {
				writeJSON(w, http.StatusConflict, api.Error{Error: err.Error()})
				return
			}
			writeJSON(w, http.StatusOK, res)
		}
	}
	mux.HandleFunc("POST /v1/switchover", move(a.Switchover))
	mux.HandleFunc("POST /v1/failback", move(a.Failback))
	mux.HandleFunc("POST /v1/drain", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Drain(r.Context()))
	})
	mux.HandleFunc("POST /v1/undrain", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Undrain(r.Context()))
	})
	mux.HandleFunc("POST /v1/unenroll", func(w http.ResponseWriter, r *http.Request) {
		var req api.GuestRequest
		if !readJSON(w, r, &req) {
			return
		}
		if err := a.Unenroll(r.Context(), req.Guest); err != nil {
			writeJSON(w, http.StatusConflict, api.Error{Error: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	})
	_, overTCP := ln.Addr().(*net.TCPAddr)
	handler := a.authorize(mux, overTCP, gid)
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: time.Minute, ConnContext: connCred}
	go func() { <-ctx.Done(); srv.Close() }()
	err := srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Unenroll stops protecting a guest: on the primary the guest keeps running
// and the standby drops its replica; on the standby the replica is dropped.
func (a *Agent) Unenroll(ctx context.Context, name string) error {
	g := a.guest(name)
	switch {
	case g == nil:
		// A record the agent could not take up at its start (the guest
		// was not running): the admin's unenroll forgets it.
		if _, err := a.store.load(name); err == nil {
			if err := a.store.remove(name); err != nil {
				return err
			}
			a.journal.note(name, "unenrolled", "record of a guest this agent had not taken up removed", 0)
			a.log.Info("unenrolled a guest this agent had not taken up", "guest", name)
			return nil
		}
		return fmt.Errorf("guest %q: %w", name, errNotEnrolled)
	case g.primary != nil:
		return a.unenrollPrimary(ctx, g)
	case g.state().Promoted:
		// The guest runs here now, unprotected: forget the record and
		// retire it at the arbiter, where this host is its primary, so
		// that an enrollment under the same name (a re-protect) starts
		// afresh instead of meeting this one.
		g.stop()
		warn := a.retire(ctx, name, g.state())
		// The journal forgets it too: its fencing epoch must not carry
		// over to a later replica of the same name (after a restart, that
		// replica would refuse its primary as stale forever).
		if err := a.journalDrop(ctx, name); err != nil {
			return err
		}
		a.forget(g)
		if err := a.store.remove(name); err != nil {
			return err
		}
		return warn
	}
	return a.dropReplica(ctx, name, ^uint64(0), "")
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeJSON(w, http.StatusBadRequest, api.Error{Error: "bad request: " + err.Error()})
		return false
	}
	return true
}
