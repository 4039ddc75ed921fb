package arbiter

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/remora-ha/remora/arbiter/heartbeat"
	"github.com/remora-ha/remora/internal/pki"
)

// Clock abstracts time for tests; the zero Config uses the real clock.
type Clock = heartbeat.Clock

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

// Defaults for Config fields left zero.
const (
	DefaultLeaseDuration    = 3 * time.Second
	DefaultProbeInterval    = time.Second
	DefaultProbeTimeout     = 500 * time.Millisecond
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultIdleTimeout      = 5 * time.Minute
	DefaultMaxSuspend       = 30 * time.Second
	DefaultMaxGuests        = 1024
)

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("arbiter: server closed")

// Config configures a Server.
type Config struct {
	// StateDir holds the durable guest records; required.
	StateDir string
	// TLS must require and verify client certificates (see
	// pki.ServerConfig); TLS 1.3 is enforced.
	TLS *tls.Config
	// LeaseDuration is the primary's lease; default 3 s.
	LeaseDuration time.Duration
	// Heartbeat is how agents heartbeat the arbiter; an agent silent for
	// Heartbeat.Timeout() counts as lost for ReportStandbyLost.
	Heartbeat heartbeat.Config
	// ProbeInterval and ProbeTimeout apply to agent reachability probes
	// and to service probes that do not set their own; see
	// ValidateProbeTiming for their bounds.
	ProbeInterval time.Duration
	ProbeTimeout  time.Duration
	// MaxSuspend bounds the d of Client.Suspend; default 30 s.
	MaxSuspend time.Duration
	// MaxGuests bounds the guests the arbiter tracks (unenrolled ones kept
	// for their epochs and ones being recovered included); registrations
	// of new guests beyond it are refused. Default 1024.
	MaxGuests int
	// Services configures the client-side check per guest. It takes
	// precedence over the ProbeSpec an agent sends when registering.
	Services map[string]ProbeSpec
	// Logger receives decisions and refusals; default slog.Default().
	Logger *slog.Logger
	// Clock drives leases and heartbeat timeouts; default real time.
	Clock            Clock
	HandshakeTimeout time.Duration
	IdleTimeout      time.Duration
}

// Server is the arbiter. Create it with Open, run it with Serve.
type Server struct {
	cfg    Config
	log    *slog.Logger
	clock  Clock
	tls    *tls.Config
	hb     *heartbeat.Detector
	probes *probeRunner
	ctx    context.Context
	cancel context.CancelFunc

	mu sync.Mutex // serialises all decisions
	m  *machine

	reqMu sync.Mutex
	reqs  map[RequestKey]uint64 // answered requests, for metrics

	connMu    sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	wg        sync.WaitGroup
}

// Open loads (or creates) the state in cfg.StateDir, locks it against a
// second arbiter, and starts the probes. Leases found in the state are
// assumed held for a full lease duration from now.
func Open(cfg Config) (*Server, error) {
	if cfg.TLS == nil {
		return nil, errors.New("arbiter: TLS config required")
	}
	if cfg.TLS.ClientAuth != tls.RequireAndVerifyClientCert || cfg.TLS.ClientCAs == nil {
		return nil, errors.New("arbiter: TLS config must require and verify client certificates against a CA")
	}
	if cfg.LeaseDuration <= 0 {
		cfg.LeaseDuration = DefaultLeaseDuration
	}
	if cfg.ProbeInterval <= 0 {
		cfg.ProbeInterval = DefaultProbeInterval
	}
	if cfg.ProbeTimeout <= 0 {
		cfg.ProbeTimeout = DefaultProbeTimeout
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.MaxSuspend <= 0 {
		cfg.MaxSuspend = DefaultMaxSuspend
	}
	if cfg.MaxGuests <= 0 {
		cfg.MaxGuests = DefaultMaxGuests
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Clock == nil {
		cfg.Clock = realClock{}
	}
	if err := ValidateProbeTiming(cfg.ProbeInterval, cfg.ProbeTimeout); err != nil {
		return nil, fmt.Errorf("arbiter: default probe timing: %w", err)
	}
	for g, spec := range cfg.Services {
		if err := validName("guest", g); err != nil {
			return nil, err
		}
		if err := validateService(spec, cfg); err != nil {
			return nil, fmt.Errorf("arbiter: service probe for guest %s: %w", g, err)
		}
	}
	tc := cfg.TLS.Clone()
	tc.MinVersion = tls.VersionTLS13

	st, recs, err := openStore(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		clock:     cfg.Clock,
		tls:       tc,
		hb:        heartbeat.New(cfg.Heartbeat, cfg.Clock),
		probes:    newProbeRunner(ctx),
		ctx:       ctx,
		cancel:    cancel,
		listeners: map[net.Listener]struct{}{},
		conns:     map[net.Conn]struct{}{},
	}
	mc := machineConfig{leaseDur: cfg.LeaseDuration, maxSuspend: cfg.MaxSuspend, maxGuests: cfg.MaxGuests, log: cfg.Logger}
	s.m = newMachine(st, recs, mc, cfg.Clock.Now())
	s.m.onRecover = func(r *guestRecord) {
		s.watchLocked(r)
		s.reconcileProbesLocked()
	}
	s.mu.Lock()
	for _, r := range recs {
		if err := validateService(r.Service, cfg); err != nil {
			// Recorded before probe timing was bounded: keep the check,
			// not its timing, until the primary registers again.
			s.log.Warn("arbiter: stored service probe out of bounds; using the default timing", "guest", r.Guest, "reason", err)
			r.Service.Interval, r.Service.Timeout = 0, 0
		}
		s.watchLocked(r)
		s.log.Info("arbiter: loaded guest", "guest", r.Guest, "fence", r.Epoch, "primary", r.Primary,
			"standby", r.Standby, "in_sync", r.InSync, "lease_holder", r.LeaseHolder, "lease_until", r.leaseExpiry.Round(0),
			"suspended", r.SuspendedFor != 0)
	}
	s.reconcileProbesLocked()
	s.mu.Unlock()
	return s, nil
}

// validateService checks a service probe as it will run, with the
// arbiter's default timing filled in.
func validateService(spec ProbeSpec, cfg Config) error {
	if err := spec.Validate(); err != nil || spec.Kind == ProbeNone {
		return err
	}
	eff := spec.WithDefaults(cfg.ProbeInterval, cfg.ProbeTimeout)
	return ValidateProbeTiming(eff.Interval, eff.Timeout)
}

// watchLocked starts heartbeat tracking of a record's agents.
func (s *Server) watchLocked(r *guestRecord) {
	s.hb.Watch(r.Primary)
	if r.Standby != "" {
		s.hb.Watch(r.Standby)
	}
}

// ListenAndServe listens on addr (TCP) and serves until Close.
func (s *Server) ListenAndServe(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return s.Serve(ln)
}

// Serve accepts connections on ln (a plain TCP listener; TLS is added
// here) until Close. It always returns a non-nil error.
func (s *Server) Serve(ln net.Listener) error {
	s.connMu.Lock()
	if s.closed {
		s.connMu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.connMu.Unlock()
	defer func() {
		s.connMu.Lock()
		delete(s.listeners, ln)
		s.connMu.Unlock()
		ln.Close()
	}()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ECONNABORTED) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("arbiter: accept", "err", err, "retry_in", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		if !s.track(c) {
			c.Close()
			return ErrServerClosed
		}
		s.wg.Add(1)
		go s.serveConn(c)
	}
}

func (s *Server) isClosed() bool {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	return s.closed
}

func (s *Server) track(c net.Conn) bool {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.connMu.Lock()
	delete(s.conns, c)
	s.connMu.Unlock()
	c.Close()
}

// Close stops listening, drops connections, stops probes and releases the
// state dir. Decisions in progress finish (and persist) first.
func (s *Server) Close() error {
	s.connMu.Lock()
	if s.closed {
		s.connMu.Unlock()
		return nil
	}
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.connMu.Unlock()
	s.cancel()
	s.wg.Wait()
	s.probes.wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m.st.close()
}

func (s *Server) serveConn(raw net.Conn) {
	defer s.wg.Done()
	defer s.untrack(raw)
	peer := raw.RemoteAddr().String()
	tc := tls.Server(raw, s.tls)
	hctx, cancel := context.WithTimeout(s.ctx, s.cfg.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		if !s.isClosed() {
			s.log.Warn("arbiter: refused connection", "peer", peer, "reason", "TLS handshake failed: "+err.Error())
		}
		return
	}
	// RequireAndVerifyClientCert guarantees a verified chain here.
	names := pki.Names(tc.ConnectionState().PeerCertificates[0])
	for {
		tc.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout))
		body, err := readFrame(tc)
		if err != nil {
			if !errors.Is(err, io.EOF) && !s.isClosed() {
				s.log.Debug("arbiter: connection ended", "peer", peer, "names", names, "err", err)
			}
			return
		}
		resp, keep := s.handleFrame(peer, names, body)
		tc.SetWriteDeadline(time.Now().Add(10 * time.Second))
		if err := writeFrame(tc, resp); err != nil {
			s.log.Debug("arbiter: write reply", "peer", peer, "err", err)
			return
		}
		if !keep {
			return
		}
	}
}

// handleFrame decodes, authenticates and dispatches one request. keep is
// false when the connection must be closed after the reply.
func (s *Server) handleFrame(peer string, names []string, body []byte) (resp *response, keep bool) {
	v, err := peekVersion(body)
	if err != nil {
		s.log.Warn("arbiter: refused request", "peer", peer, "reason", "undecodable frame: "+err.Error())
		return &response{V: ProtocolVersion, Err: errorf(CodeBadRequest, "undecodable request: %v", err)}, false
	}
	if v != ProtocolVersion {
		s.log.Warn("arbiter: refused request", "peer", peer, "names", names,
			"reason", fmt.Sprintf("protocol version %d, this arbiter speaks %d", v, ProtocolVersion))
		return &response{V: ProtocolVersion, Err: errorf(CodeVersion, "protocol version %d not supported; this arbiter speaks version %d", v, ProtocolVersion)}, false
	}
	var req request
	if err := json.Unmarshal(body, &req); err != nil {
		s.log.Warn("arbiter: refused request", "peer", peer, "reason", "undecodable request: "+err.Error())
		return &response{V: ProtocolVersion, Err: errorf(CodeBadRequest, "undecodable request: %v", err)}, false
	}
	resp = &response{V: ProtocolVersion, ID: req.ID}
	if req.Agent != "" || req.Op != opStatus {
		if !slices.Contains(names, req.Agent) {
			reason := fmt.Sprintf("certificate names %v do not match claimed agent id %q", names, req.Agent)
			s.log.Warn("arbiter: refused request", "peer", peer, "op", req.Op, "reason", reason)
			resp.Err = errorf(CodeUnauthorized, "%s", reason)
			return resp, false
		}
	}
	resp.Err = toError(s.dispatch(&req, resp))
	s.count(req.Op, resp.Err)
	return resp, true
}

// RequestKey is an operation and its result: "ok" or the error code.
type RequestKey struct{ Op, Result string }

func (s *Server) count(op string, err *Error) {
	switch op {
	case opRegister, opRenew, opSuspend, opRelease, opPromote, opStandbyLost, opHandover, opSynced, opRetire, opHeartbeat, opStatus:
	default:
		op = "unknown" // a peer's made-up operation is not a new series
	}
	k := RequestKey{Op: op, Result: "ok"}
	if err != nil {
		k.Result = string(err.Code)
	}
	s.reqMu.Lock()
	if s.reqs == nil {
		s.reqs = map[RequestKey]uint64{}
	}
	s.reqs[k]++
	s.reqMu.Unlock()
}

// RequestCounts returns how many requests the arbiter has answered since
// it started, by operation and result (promotions granted and refused
// among them).
func (s *Server) RequestCounts() map[RequestKey]uint64 {
	s.reqMu.Lock()
	defer s.reqMu.Unlock()
	out := make(map[RequestKey]uint64, len(s.reqs))
	for k, v := range s.reqs {
		out[k] = v
	}
	return out
}

func toError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return errorf(CodeInternal, "%v", err)
}

func (s *Server) dispatch(req *request, resp *response) error {
	switch req.Op {
	case opStatus:
		st := s.Status()
		resp.Status = &st
		return nil
	case opHeartbeat:
		s.hb.Heartbeat(req.Agent)
		s.mu.Lock()
		resp.Assignments = s.m.heartbeat(s.clock.Now(), req.Agent, req.Epochs)
		s.mu.Unlock()
		resp.SuspectAfterMs = s.hb.Config().Timeout().Milliseconds()
		return nil
	case opRegister:
		reg, err := s.register(req)
		if err == nil {
			resp.Registration = &reg
		}
		return err
	}
	if err := validName("guest", req.Guest); err != nil {
		return err
	}
	switch req.Op {
	case opRenew:
		s.mu.Lock()
		l, err := s.m.renew(s.clock.Now(), req.Guest, req.Agent, req.Epoch)
		s.mu.Unlock()
		if err == nil {
			resp.Lease = &l
		}
		return err
	case opSuspend:
		s.mu.Lock()
		l, err := s.m.suspend(s.clock.Now(), req.Guest, req.Agent, req.Epoch, req.Duration)
		s.mu.Unlock()
		if err != nil {
			s.log.Info("arbiter: suspension refused", "guest", req.Guest, "agent", req.Agent, "fence", req.Epoch, "reason", err)
			return err
		}
		s.log.Info("arbiter: lease suspended for a planned agent restart", "guest", req.Guest, "agent", req.Agent, "fence", req.Epoch, "until", l.Expires)
		resp.Lease = &l
		return nil
	case opRelease:
		s.mu.Lock()
		err := s.m.release(s.clock.Now(), req.Guest, req.Agent, req.Epoch)
		s.mu.Unlock()
		if err == nil {
			s.log.Info("arbiter: lease released", "guest", req.Guest, "agent", req.Agent, "fence", req.Epoch)
		}
		return err
	case opPromote:
		g, err := s.promote(req)
		if err == nil {
			resp.Grant = &g
		}
		return err
	case opHandover:
		if err := validName("agent", req.Standby); err != nil {
			return err
		}
		s.mu.Lock()
		g, err := s.m.handover(s.clock.Now(), req.Guest, req.Agent, req.Epoch, req.Standby)
		s.mu.Unlock()
		if err != nil {
			s.log.Info("arbiter: handover refused", "guest", req.Guest, "primary", req.Agent, "to", req.Standby, "fence", req.Epoch, "reason", err)
			return err
		}
		s.log.Info("arbiter: guest handed over (planned switchover)", "guest", req.Guest, "from", req.Agent, "to", req.Standby, "fence", g.Epoch)
		resp.Grant = &g
		return nil
	case opStandbyLost:
		l, err := s.standbyLost(req)
		if err == nil {
			resp.Lease = &l
		}
		return err
	case opRetire:
		s.mu.Lock()
		err := s.m.retire(s.clock.Now(), req.Guest, req.Agent, req.Epoch)
		if err == nil {
			s.reconcileProbesLocked()
		}
		s.mu.Unlock()
		if err == nil {
			s.log.Info("arbiter: guest unenrolled", "guest", req.Guest, "primary", req.Agent, "fence", req.Epoch)
		}
		return err
	case opSynced:
		if err := validName("agent", req.Standby); err != nil {
			return err
		}
		s.mu.Lock()
		err := s.m.synced(s.clock.Now(), req.Guest, req.Agent, req.Epoch, req.Standby)
		s.mu.Unlock()
		if err == nil {
			s.log.Info("arbiter: standby in sync", "guest", req.Guest, "primary", req.Agent, "standby", req.Standby, "fence", req.Epoch)
		}
		return err
	}
	return errorf(CodeBadRequest, "unknown operation %q", req.Op)
}

func (s *Server) register(req *request) (Registration, error) {
	spec := req.Spec
	if spec == nil {
		return Registration{}, errorf(CodeBadRequest, "register without a guest spec")
	}
	if spec.AgentID != req.Agent {
		return Registration{}, errorf(CodeUnauthorized, "spec agent id %q differs from the request's %q", spec.AgentID, req.Agent)
	}
	if err := validName("guest", spec.Guest); err != nil {
		return Registration{}, err
	}
	if spec.AgentAddr != "" {
		if _, _, err := net.SplitHostPort(spec.AgentAddr); err != nil {
			return Registration{}, errorf(CodeBadRequest, "agent address %q: %v", spec.AgentAddr, err)
		}
	}
	service := ProbeSpec{}
	if spec.Role == RolePrimary {
		if err := validateService(spec.Service, s.cfg); err != nil {
			return Registration{}, errorf(CodeBadRequest, "service probe: %v", err)
		}
		service = spec.Service
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	reg, err := s.m.register(s.clock.Now(), *spec, service)
	if err != nil {
		s.log.Info("arbiter: registration refused", "guest", spec.Guest, "agent", spec.AgentID, "role", spec.Role, "reason", err)
		return reg, err
	}
	s.hb.Watch(spec.AgentID)
	s.reconcileProbesLocked()
	s.log.Info("arbiter: registered", "guest", spec.Guest, "agent", spec.AgentID, "role", reg.Role, "fence", reg.Epoch)
	return reg, nil
}

// promote checks everything it can from cached observations, then probes
// the guest's service afresh (a cached "down" may be a second old) and
// decides again with the fresh result.
func (s *Server) promote(req *request) (Grant, error) {
	s.mu.Lock()
	_, err := s.m.promote(s.clock.Now(), req.Guest, req.Agent, req.Epoch, s.observeLocked(req.Guest, nil), true)
	s.mu.Unlock()
	if err != nil {
		s.log.Info("arbiter: promotion refused", "guest", req.Guest, "agent", req.Agent, "fence", req.Epoch, "reason", err)
		return Grant{}, err
	}
	freshRes := map[string]ProbeStatus{}
	if !s.serviceDownSincePrimaryLost(req.Guest) {
		if st, ok := s.probes.probeNow(s.ctx, serviceKey(req.Guest)); ok {
			freshRes[serviceKey(req.Guest)] = st
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	g, err := s.m.promote(s.clock.Now(), req.Guest, req.Agent, req.Epoch, s.observeLocked(req.Guest, freshRes), false)
	if err != nil {
		s.log.Info("arbiter: promotion refused", "guest", req.Guest, "agent", req.Agent, "fence", req.Epoch, "reason", err)
		return Grant{}, err
	}
	s.reconcileProbesLocked()
	s.log.Info("arbiter: promotion granted", "guest", req.Guest, "new_primary", req.Agent,
		"old_primary", g.PreviousPrimary, "fence", g.Epoch, "previous_fence", g.PreviousEpoch, "detail", s.m.guests[req.Guest].Last.Detail)
	return g, nil
}

// serviceDownSincePrimaryLost: the guest's service probe last failed, in a
// probe begun after the arbiter last heard the primary's agent and still
// fresh. A promotion then needs no fresh probe, which against a dead host
// waits out the probe's whole timeout.
func (s *Server) serviceDownSincePrimaryLost(guest string) bool {
	st, spec, ok := s.probes.status(serviceKey(guest))
	if !ok || st.OK || !fresh(st, spec) {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.m.guests[guest]
	if !ok || r.Primary == "" {
		return false
	}
	last := s.hb.State(r.Primary).LastSeen
	return !last.IsZero() && st.At.Add(-st.Latency).After(last)
}

func (s *Server) standbyLost(req *request) (Lease, error) {
	s.mu.Lock()
	_, err := s.m.standbyLost(s.clock.Now(), req.Guest, req.Agent, req.Epoch, s.observeLocked(req.Guest, nil), true)
	var key string
	if r, ok := s.m.guests[req.Guest]; ok && r.StandbyAddr != "" {
		key = agentKey(r.Standby, r.StandbyAddr)
	}
	s.mu.Unlock()
	if err != nil {
		s.log.Info("arbiter: standby-lost refused", "guest", req.Guest, "agent", req.Agent, "fence", req.Epoch, "reason", err)
		return Lease{}, err
	}
	// Probe afresh: the grant records what the arbiter sees of the standby.
	freshRes := map[string]ProbeStatus{}
	if key != "" {
		if st, ok := s.probes.probeNow(s.ctx, key); ok {
			freshRes[key] = st
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	before := s.m.guests[req.Guest].Epoch
	l, err := s.m.standbyLost(s.clock.Now(), req.Guest, req.Agent, req.Epoch, s.observeLocked(req.Guest, freshRes), false)
	if err != nil {
		s.log.Info("arbiter: standby-lost refused", "guest", req.Guest, "agent", req.Agent, "fence", req.Epoch, "reason", err)
		return Lease{}, err
	}
	if l.Epoch != before {
		s.log.Info("arbiter: primary continues unprotected", "guest", req.Guest, "primary", req.Agent, "fence", l.Epoch, "previous_fence", before,
			"detail", s.m.guests[req.Guest].Last.Detail)
	}
	return l, nil
}

func serviceKey(guest string) string     { return "service/" + guest }
func agentKey(agent, addr string) string { return "agent/" + agent + "@" + addr }

// observeLocked summarises probes and heartbeats for a guest's decisions.
// Results in freshRes (just taken for this decision) win over the cache.
func (s *Server) observeLocked(guest string, freshRes map[string]ProbeStatus) observation {
	status := func(key string) (ProbeStatus, ProbeSpec, bool) {
		st, spec, ok := s.probes.status(key)
		if f, found := freshRes[key]; found && ok {
			st = f
		}
		return st, spec, ok
	}
	var o observation
	if st, spec, ok := status(serviceKey(guest)); ok {
		o.serviceAnswering = st.OK && fresh(st, spec)
		o.serviceDetail = describe(st)
	} else {
		o.serviceDetail = "no service probe configured"
	}
	r, ok := s.m.guests[guest]
	if ok && r.Primary != "" {
		ps := s.hb.State(r.Primary)
		o.primaryLost = ps.Suspected && !ps.LastSeen.IsZero()
		if !ps.LastSeen.IsZero() {
			since := s.clock.Now().Sub(ps.LastSeen)
			o.primaryDetail = fmt.Sprintf("heartbeat %v ago (missed %d)", since.Round(time.Millisecond), ps.Missed)
			if !o.primaryLost {
				o.primaryLostIn = max(s.hb.Config().Timeout()-since, time.Millisecond)
			}
		}
	}
	if !ok || r.Standby == "" {
		return o
	}
	hs := s.hb.State(r.Standby)
	var parts []string
	if hs.LastSeen.IsZero() {
		parts = append(parts, fmt.Sprintf("no heartbeat since arbiter start (missed %d)", hs.Missed))
	} else {
		parts = append(parts, fmt.Sprintf("heartbeat %v ago (missed %d)", s.clock.Now().Sub(hs.LastSeen).Round(time.Millisecond), hs.Missed))
	}
	o.standbyLost = hs.Suspected
	if r.StandbyAddr != "" {
		if st, spec, ok := status(agentKey(r.Standby, r.StandbyAddr)); ok {
			parts = append(parts, "reachability "+describe(st))
			if !st.OK && fresh(st, spec) {
				o.standbyLost = true
			}
		}
	}
	o.standbyDetail = strings.Join(parts, "; ")
	return o
}

func (s *Server) serviceSpecLocked(r *guestRecord) ProbeSpec {
	spec, ok := s.cfg.Services[r.Guest]
	if !ok {
		spec = r.Service
	}
	return spec.WithDefaults(s.cfg.ProbeInterval, s.cfg.ProbeTimeout)
}

func (s *Server) reconcileProbesLocked() {
	want := map[string]ProbeSpec{}
	agent := func(id, addr string) {
		if id != "" && addr != "" {
			want[agentKey(id, addr)] = ProbeSpec{Kind: ProbeTCP, Address: addr, Interval: s.cfg.ProbeInterval, Timeout: s.cfg.ProbeTimeout}
		}
	}
	for _, r := range s.m.guests {
		if r.Retired {
			continue
		}
		if spec := s.serviceSpecLocked(r); spec.Kind != ProbeNone {
			want[serviceKey(r.Guest)] = spec
		}
		agent(r.Primary, r.PrimaryAddr)
		agent(r.Standby, r.StandbyAddr)
	}
	s.probes.set(want)
}

// Status returns a snapshot of all guests and agents.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.clock.Now()
	st := Status{
		Now:             now.Round(0).UTC(),
		ProtocolVersion: ProtocolVersion,
		LeaseDuration:   s.cfg.LeaseDuration,
		Guests:          []GuestStatus{},
		Agents:          []AgentStatus{},
	}
	type agentAddr struct{ id, addr string }
	agents := map[agentAddr]bool{}
	for _, name := range s.m.names() {
		if rc, ok := s.m.recovering[name]; ok {
			st.Guests = append(st.Guests, GuestStatus{Guest: name, Recovering: rc.status()})
			continue
		}
		r := s.m.guests[name]
		g := GuestStatus{
			Guest:            r.Guest,
			Epoch:            r.Epoch,
			Primary:          r.Primary,
			Standby:          r.Standby,
			InSync:           r.InSync,
			UnprotectedSince: r.UnprotectedSince,
			LeaseHolder:      r.LeaseHolder,
			Last:             r.Last,
			Retired:          r.Retired,
		}
		if r.LeaseHolder != "" {
			g.LeaseExpires = r.leaseExpiry.Round(0).UTC()
			g.LeaseRemaining = max(0, r.leaseExpiry.Sub(now))
		}
		if r.SuspendedFor != 0 {
			g.SuspendedUntil = g.LeaseExpires
		}
		if ps, _, ok := s.probes.status(serviceKey(name)); ok {
			g.Service = &ps
		}
		st.Guests = append(st.Guests, g)
		if r.Retired {
			continue
		}
		agents[agentAddr{r.Primary, r.PrimaryAddr}] = true
		if r.Standby != "" {
			agents[agentAddr{r.Standby, r.StandbyAddr}] = true
		}
	}
	for _, p := range s.hb.Peers() {
		found := false
		for a := range agents {
			found = found || a.id == p.Peer
		}
		if !found {
			agents[agentAddr{p.Peer, ""}] = true
		}
	}
	for a := range agents {
		hs := s.hb.State(a.id)
		as := AgentStatus{Agent: a.id, Addr: a.addr, LastHeartbeat: hs.LastSeen.Round(0).UTC(), HeartbeatSuspected: hs.Suspected}
		if a.addr != "" {
			if ps, _, ok := s.probes.status(agentKey(a.id, a.addr)); ok {
				as.Reachability = &ps
			}
		}
		st.Agents = append(st.Agents, as)
	}
	sort.Slice(st.Agents, func(i, j int) bool {
		if st.Agents[i].Agent != st.Agents[j].Agent {
			return st.Agents[i].Agent < st.Agents[j].Agent
		}
		return st.Agents[i].Addr < st.Agents[j].Addr
	})
	return st
}
