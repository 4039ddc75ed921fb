package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"time"

	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
)

// Status lists every guest this agent knows.
func (a *Agent) Status() []api.VMStatus {
	a.mu.Lock()
	prim := make([]*primaryGuest, 0, len(a.primary))
	for _, p := range a.primary {
		prim = append(prim, p)
	}
	stby := make([]*standbyGuest, 0, len(a.standby))
	for _, s := range a.standby {
		stby = append(stby, s)
	}
	a.mu.Unlock()
	var out []api.VMStatus
	for _, p := range prim {
		if p.engine == nil { // fenced out: nothing runs here any more
			out = append(out, api.VMStatus{Guest: p.rec.Name, Role: api.RolePrimary, State: StateFenced, Peer: p.rec.Peer, Fence: p.rec.Fence, Arbiter: p.coord.snapshot().note})
			continue
		}
		s := p.engine.Status()
		v := api.VMStatus{Guest: p.rec.Name, Role: api.RolePrimary, State: s.State, Peer: p.rec.Peer, Fence: p.engine.Fence(),
			Epoch: s.Epoch, Started: s.Started, AckedEpoch: s.AckedEpoch, EpochsPerSec: s.EpochsPerSec, PauseP50: s.PauseP50, PauseP99: s.PauseP99,
			DirtyPages: s.DirtyPages, DirtyTotal: s.DirtyTotal, Incremental: s.Incremental, Bytes: s.BytesSent, RawBytes: s.RawBytes, Lag: s.Lag, Tracker: s.Tracker,
			SyncDone: s.SyncDone, SyncTotal: s.SyncTotal, LastError: s.LastError, NextRetry: s.NextRetry, LastPause: &s.LastPause}
		v.Output = p.outputStatus()
		v.Disk = p.disks.status()
		co := p.coord.snapshot()
		if !s.LastAck.IsZero() {
			if age := time.Since(s.LastAck); age < a.hbTimeout() {
				v.Heartbeat = "ok"
			} else {
				v.Heartbeat = fmt.Sprintf("standby silent %s", age.Round(100*time.Millisecond))
			}
		}
		a.coordStatus(&v, co)
		if co.unprotect && v.State != checkpoint.StateProtected {
			v.State = "unprotected"
		}
		if co.selfFenced {
			v.State = "self-fenced"
		}
		if p.rec.State == StateFenced {
			v.State = StateFenced
		}
		out = append(out, v)
	}
	for _, sg := range stby {
		v := sg.status(a.hbTimeout())
		a.coordStatus(&v, sg.coord.snapshot())
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Guest < out[j].Guest })
	return out
}

func (a *Agent) hbTimeout() time.Duration {
	return a.cfg.HeartbeatInterval * time.Duration(a.cfg.HeartbeatMissed)
}

// coordStatus adds what the arbiter said to a guest's status.
func (a *Agent) coordStatus(v *api.VMStatus, co coordView) {
	if a.arb == nil {
		return
	}
	if co.leaseOK {
		v.LeaseHolder = co.lease.Holder
		if d := time.Until(co.lease.ValidUntil); d > 0 {
			v.LeaseValid = d
		}
	}
	if co.probe != nil && !co.probe.At.IsZero() {
		if co.probe.OK {
			v.Probe = fmt.Sprintf("ok %s (%s ago)", co.probe.Latency.Round(time.Millisecond), time.Since(co.probe.At).Round(time.Second))
		} else {
			v.Probe = fmt.Sprintf("failing x%d: %s", co.probe.ConsecutiveFailures, co.probe.Error)
		}
	}
	v.Arbiter = co.note
	v.SuspectedAt, v.GrantedAt, v.RestoredAt = co.suspectedAt, co.grantedAt, co.restoredAt
}

func (sg *standbyGuest) status(hbTimeout time.Duration) api.VMStatus {
	sg.mu.Lock()
	defer sg.mu.Unlock()
	rec := sg.rec
	v := api.VMStatus{Guest: rec.Name, Role: api.RoleStandby, Peer: rec.Primary, Fence: rec.Fence, Shell: rec.Shell,
		Epoch: rec.Replica.Committed, AckedEpoch: rec.Replica.Committed, Applied: rec.Replica.Applied, Bytes: sg.bytesIn, LastError: sg.lastError}
	switch {
	case rec.State == StateFailedOver:
		v.State, v.Role = rec.State, "promoted"
	case rec.State != "":
		v.State = rec.State
	case !rec.Replica.Synced:
		v.State = checkpoint.StateSyncing
	case sg.session != nil && time.Since(sg.lastFrame) < 5*time.Second:
		v.State = checkpoint.StateProtected
	default:
		v.State = checkpoint.StateDegraded
	}
	if !sg.lastCommit.IsZero() && rec.State == "" {
		v.Lag = time.Since(sg.lastCommit)
	}
	v.Disk = sg.diskStatus()
	if rec.State == "" && !sg.lastFrame.IsZero() {
		if age := time.Since(sg.lastFrame); sg.session != nil && age < hbTimeout {
			v.Heartbeat = "ok"
		} else {
			v.Heartbeat = fmt.Sprintf("primary silent %s", age.Round(100*time.Millisecond))
		}
	}
	// Commits are in time order: the recent ones are a suffix.
	now := time.Now()
	i := len(sg.commits)
	for i > 0 && now.Sub(sg.commits[i-1]) < 10*time.Second {
		i--
	}
	if n := len(sg.commits) - i; n > 1 {
		v.EpochsPerSec = float64(n) / now.Sub(sg.commits[i]).Seconds()
	}
	return v
}

func listenAPI(path string) (net.Listener, error) {
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("another agent is serving %s: stop it first, or set api_socket", path)
	}
	_ = os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	_ = os.Chmod(path, 0o600) // root only: the API can fail guests over
	return ln, nil
}

func (a *Agent) serveAPI(ctx context.Context, ln net.Listener) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, a.Status())
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
	handler := http.Handler(mux)
	if _, isTLS := ln.Addr().(*net.TCPAddr); isTLS {
		// Over TCP the listener is mutual TLS: every admin is named in the log.
		handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var who []string
			if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
				who = pki.Names(r.TLS.PeerCertificates[0])
			}
			if len(who) == 0 {
				a.log.Warn("admin API request without a client certificate refused", "peer", r.RemoteAddr)
				writeJSON(w, http.StatusUnauthorized, api.Error{Error: "a client certificate signed by the agent's CA is required"})
				return
			}
			if r.Method != http.MethodGet {
				a.log.Info("admin API", "client", who, "peer", r.RemoteAddr, "call", r.Method+" "+r.URL.Path)
			}
			mux.ServeHTTP(w, r)
		})
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second}
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
	a.mu.Lock()
	pg, isP := a.primary[name]
	sg, isS := a.standby[name]
	a.mu.Unlock()
	switch {
	case isP:
		return a.unenrollPrimary(ctx, pg)
	case isS:
		sg.mu.Lock()
		failed := sg.rec.State == StateFailedOver
		sg.mu.Unlock()
		if failed { // the guest runs here now; just forget the replica record
			a.mu.Lock()
			delete(a.standby, name)
			a.mu.Unlock()
			return a.store.remove(name)
		}
		return a.dropReplica(ctx, name, ^uint64(0), "")
	}
	return fmt.Errorf("domain %q: %w", name, errNotEnrolled)
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
