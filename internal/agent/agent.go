// Package agent is the remora agent: it protects guests on its host as a
// primary and keeps replicas of other hosts' guests as a standby.
//
// Every guest has one state machine (machine.go: pure, table-tested) and
// one driver goroutine that feeds it what the replication engine, the
// standby session, the arbiter and the hypervisor report, and carries out
// what it orders (hold or release output, pause, resume, destroy, fail
// over). The agent meets libvirt and the arbiter through the Hypervisor
// and Coordinator interfaces.
package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/remora-ha/remora/internal/sdnotify"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/arbiter/heartbeat"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/pki"
	"github.com/remora-ha/remora/migrate/qemu"
	"github.com/remora-ha/remora/migrate/virt"
)

// Hypervisor is the host's libvirt as the agent uses it (migrate/virt.Conn).
type Hypervisor interface {
	OpenGuest(ctx context.Context, name string) (*qemu.Guest, error)
	Guest(name string) *qemu.Guest
	DomainXML(ctx context.Context, name string) (string, error)
	LiveXML(ctx context.Context, name string) (string, error)
	DomainState(ctx context.Context, name string) (string, error)
	DomainExists(ctx context.Context, name string) (bool, error)
	Destroy(ctx context.Context, name string) error
	Undefine(ctx context.Context, name string) error
	MakePersistent(ctx context.Context, name string) error
	NoAutostart(ctx context.Context, name string) error
	CreatePaused(ctx context.Context, xml string) error
	FindDisk(ctx context.Context, g *qemu.Guest, dev string) (qemu.DiskNode, error)
}

// Coordinator is the arbiter as the agent uses it (arbiter.Client).
type Coordinator interface {
	Addr() string
	Register(ctx context.Context, spec arbiter.GuestSpec) (arbiter.Registration, error)
	Renew(ctx context.Context, guest, agentID string, epoch uint64) (arbiter.Lease, error)
	RequestPromotion(ctx context.Context, guest, agentID string, epoch uint64) (arbiter.Grant, error)
	// Handover makes the in-sync standby the primary (planned switchover).
	Handover(ctx context.Context, guest, agentID string, epoch uint64, standbyID string) (arbiter.Grant, error)
	ReportStandbyLost(ctx context.Context, guest, agentID string, epoch uint64) (arbiter.Lease, error)
	ReportSynced(ctx context.Context, guest, agentID string, epoch uint64, standbyID string) error
	Retire(ctx context.Context, guest, agentID string, epoch uint64) error
	Heartbeat(ctx context.Context, agentID string, epochs map[string]uint64) (arbiter.HeartbeatReply, error)
	Status(ctx context.Context) (arbiter.Status, error)
	// Suspend holds a restarting primary's lease for d (no promotion).
	Suspend(ctx context.Context, guest, agentID string, epoch uint64, d time.Duration) (arbiter.Lease, error)
}

// Agent is one host's remora agent.
type Agent struct {
	cfg  api.Config
	log  *slog.Logger
	virt Hypervisor
	arb  Coordinator // nil without an arbiter
	// heartbeatLanes carry the arbiter heartbeats, each on its own
	// connection (arb's when there is one lane): see arbiterHeartbeat.
	heartbeatLanes []heartbeater
	store          recordStore
	journal        *journal
	resume         map[string]failTxn // failovers the journal says were not finished
	tlsSrv         *tls.Config
	tlsCli         *tls.Config
	runCtx         context.Context
	// qemu is libvirt's QEMU user (zero: root), from qemuConfPath.
	qemu         virt.QEMUConf
	qemuConfPath string
	appArmor     virt.AppArmorFiles

	mu     sync.Mutex
	guests map[string]*guest
	// reprotectTry is when each guest's last automatic re-protect began.
	reprotectTry map[string]time.Time

	// detector suspects the primary of a replica whose frames stopped.
	detector *heartbeat.Detector
	// arbiterHeard is when the latest heartbeat the arbiter answered was
	// sent (unix ns), arbiterSuspects its detector's timeout: a primary
	// silent at the arbiter that long may be failed over.
	arbiterHeard    atomic.Int64
	arbiterSuspects atomic.Int64

	failover    sync.Mutex // one failover at a time
	standbyNew  sync.Mutex // one replica record created at a time
	reprotectMu sync.Mutex // one re-protect (or switchover) at a time

	// faultHook lets end-to-end tests crash the agent at a named point.
	faultHook func(point string, epoch uint64)
}

// consoleDir holds the console logs of the standby shells.
func consoleDir(cfg api.Config) string { return filepath.Join(cfg.StateDir, "console") }

// New checks the configuration and prepares directories.
func New(cfg api.Config, log *slog.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	for _, d := range []string{cfg.StateDir, cfg.RuntimeDir, filepath.Dir(cfg.APISocket)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	// Standby shells log their serial consoles here (root's: virtlogd).
	if err := os.MkdirAll(consoleDir(cfg), 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", consoleDir(cfg), err)
	}
	a := &Agent{cfg: cfg, log: log, store: recordStore{dir: cfg.StateDir}, guests: map[string]*guest{},
		detector:     heartbeat.New(heartbeat.Config{Interval: cfg.HeartbeatInterval, Missed: cfg.HeartbeatMissed}, nil),
		qemuConfPath: virt.QEMUConfPath, appArmor: virt.DefaultAppArmor}
	a.faultHook = faultHookFromEnv(log)
	return a, nil
}

func (a *Agent) settings() Settings {
	return Settings{Arbiter: a.arb != nil, HeartbeatTimeout: a.cfg.HeartbeatTimeout(), RetryAfter: time.Second}
}

// Run serves until ctx ends: replication from primaries, the admin API, and
// the protection of every guest enrolled here.
func (a *Agent) Run(ctx context.Context) (err error) {
	a.runCtx = ctx
	if a.tlsSrv, a.tlsCli, err = tlsConfigs(&a.cfg); err != nil {
		return err
	}
	if a.cfg.TLS() {
		go a.watchCertificates(ctx)
	}
	if a.cfg.InsecurePlaintext {
		a.log.Warn("INSECURE: insecure_plaintext is set: the replication port takes any peer unauthenticated; set up TLS with `remora certs cluster` for anything but a closed lab")
	}
	if a.cfg.Arbiter != "" {
		// The arbiter is dialled by address; its certificate is checked by
		// chain and name.
		tlsCfg := arbiterTLS(a.tlsCli, a.cfg.ArbiterName)
		c, err := arbiter.NewClient(a.cfg.Arbiter, tlsCfg)
		if err != nil {
			return err
		}
		a.arb = c
		for range heartbeatConns {
			lane, err := arbiter.NewClient(a.cfg.Arbiter, tlsCfg)
			if err != nil {
				return err
			}
			a.heartbeatLanes = append(a.heartbeatLanes, lane)
		}
	}
	if err := a.checkQEMUHost(); err != nil {
		return err
	}
	conn, err := virt.Dial(ctx, a.cfg.LibvirtURI)
	if err != nil {
		return err
	}
	a.virt = conn
	defer conn.Close()

	repl, err := net.Listen("tcp", a.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen for replication on %s: %w (another agent running? change `listen`)", a.cfg.Listen, err)
	}
	defer repl.Close()
	if a.tlsSrv != nil {
		repl = tls.NewListener(repl, a.tlsSrv)
	}
	gid, err := apiGroupID(a.cfg)
	if err != nil {
		return err
	}
	apiLn, err := listenAPI(a.cfg.APISocket, gid)
	if err != nil {
		return err
	}
	defer apiLn.Close()
	var apiTLS net.Listener
	if a.cfg.APIListen != "" {
		if apiTLS, err = net.Listen("tcp", a.cfg.APIListen); err != nil {
			return fmt.Errorf("listen for the admin API on %s: %w", a.cfg.APIListen, err)
		}
		apiTLS = tls.NewListener(apiTLS, a.tlsSrv)
		defer apiTLS.Close()
	}
	var metricsLn net.Listener
	if a.cfg.MetricsListen != "" {
		if metricsLn, err = net.Listen("tcp", a.cfg.MetricsListen); err != nil {
			return fmt.Errorf("listen for metrics on %s: %w (change metrics_listen, or leave it empty to serve none)", a.cfg.MetricsListen, err)
		}
		defer metricsLn.Close()
	}

	j, jst, err := openJournal(a.cfg.StateDir, a.log)
	if err != nil {
		return err
	}
	a.journal = j
	defer j.close()
	a.resume = jst.failovers
	records, err := a.store.loadAll()
	if err != nil {
		return err
	}
	for _, r := range records {
		if g, ok := jst.guests[r.Name]; ok && r.Role == api.RoleStandby {
			r.Replica = g.Replica // the journal is newer than the record file
			r.Fence = max(r.Fence, g.Fence)
		}
	}
	for _, r := range records {
		switch r.Role {
		case api.RolePrimary:
			if err := a.startPrimary(ctx, r); err != nil {
				a.notResumed(ctx, r, err)
			}
		case api.RoleStandby:
			a.loadStandby(ctx, r)
		}
	}
	a.log.Info("agent running", "agent", a.cfg.AgentID, "replication", repl.Addr().String(), "api", a.cfg.APISocket)
	if _, err := sdnotify.Notify(sdnotify.Ready); err != nil {
		a.log.Warn("cannot tell the service manager the agent is ready", "err", err)
	}
	go sdnotify.Watchdog(ctx, a.alive)

	go a.arbiterHeartbeat(ctx)
	errc := make(chan error, 3)
	sb := &checkpoint.Standby{Handler: standbyHandler{a}, Log: a.log}
	go func() { errc <- sb.Serve(ctx, repl) }()
	go func() { errc <- a.serveAPI(ctx, apiLn, gid) }()
	if apiTLS != nil {
		go func() { errc <- a.serveAPI(ctx, apiTLS, gid) }()
	}
	if metricsLn != nil {
		go a.serveMetrics(ctx, metricsLn)
	}
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	_, _ = sdnotify.Notify(sdnotify.Stopping)
	a.shutdown()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// alive is the service watchdog's check: the lock every request and
// session takes is free (not deadlocked).
func (a *Agent) alive() error {
	a.guestList()
	return nil
}

// shutdown stops the agent on purpose (SIGTERM: an upgrade, a restart).
// Protection pauses, it does not end: each protected guest's output stays
// held (and is dropped while no agent runs: fail closed), and its standby
// and the arbiter are told the primary is back within restart_grace, so
// they do not fail it over meanwhile. The restarted agent resumes from
// what the standby holds.
func (a *Agent) shutdown() {
	var wg sync.WaitGroup
	for _, g := range a.guestList() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.stop()
			switch {
			case g.primary != nil:
				a.handOver(g)
			case g.standby != nil:
				g.standby.closeSession()
			}
		}()
	}
	wg.Wait()
}

// handOver tells a protected guest's standby and the arbiter that its
// agent restarts, then lets go of the guest without releasing its output.
func (a *Agent) handOver(g *guest) {
	p, st := g.primary, g.state()
	if st.Fenced || p.engine == nil {
		return
	}
	grace := a.cfg.RestartGrace
	if grace > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := a.dialPeer(ctx, g.rec.Peer, checkpoint.FrameRestarting, st.Fence, checkpoint.Restarting{Agent: a.cfg.AgentID, Guest: g.name, Grace: grace})
		if err == nil {
			conn.Close()
		} else {
			g.log.Warn("could not tell the standby this agent restarts; it may fail the guest over", "err", err)
		}
		if a.arb != nil {
			if _, err := a.arb.Suspend(ctx, g.name, a.cfg.AgentID, st.Fence, grace); err != nil {
				g.log.Warn("could not tell the arbiter this agent restarts; the standby may be promoted once the lease runs out", "err", err)
			}
		}
		cancel()
	}
	p.stopEngine()
	if p.out != nil {
		p.out.Detach()
	}
	g.log.Info("agent stopping: the guest runs on with its output held until the agent is back", "grace", grace)
}

// notResumed explains a protected guest this restarted agent could not
// take up again. A guest that is not running here may run elsewhere since
// a failover: the arbiter says which, so that nobody starts a superseded
// copy on this agent's advice.
func (a *Agent) notResumed(ctx context.Context, r *Record, err error) {
	log := a.log.With("guest", r.Name)
	gone := errors.Is(err, virt.ErrNotRunning) || errors.Is(err, virt.ErrNoDomain)
	if !gone {
		log.Error("cannot resume protection; fix and re-enroll", "err", err)
		return
	}
	if a.arb == nil {
		log.Error("the guest is not running here; if it was failed over to its standby, do not start this copy: unenroll it here", "err", err)
		return
	}
	// A host back from a crash may not reach the arbiter at once (its
	// network comes up): ask until it answers.
	go func() {
		for wait := time.Second; ctx.Err() == nil; wait = min(2*wait, 10*time.Second) {
			if a.askWhereItRuns(ctx, r, err, wait == time.Second) {
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
		}
	}()
}

// askWhereItRuns asks the arbiter about a guest this agent protected but
// found not running; it reports whether the arbiter answered.
func (a *Agent) askWhereItRuns(ctx context.Context, r *Record, err error, first bool) bool {
	log := a.log.With("guest", r.Name)
	if _, lerr := a.store.load(r.Name); lerr != nil || a.guest(r.Name) != nil {
		return true // unenrolled, or enrolled again, meanwhile
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, rerr := a.arb.Register(cctx, arbiter.GuestSpec{Guest: r.Name, AgentID: a.cfg.AgentID, Role: arbiter.RolePrimary, Epoch: r.Fence, AgentAddr: a.cfg.Advertise})
	var ae *arbiter.Error
	switch {
	case errors.As(rerr, &ae) && errors.Is(rerr, arbiter.ErrStaleEpoch) && ae.Role == arbiter.RoleNone:
		note := fmt.Sprintf("superseded: running on %s since fencing epoch %d; this copy must not be started", ae.Primary, ae.CurrentEpoch)
		log.Warn(note)
		r.State, r.Fence = StateFenced, max(r.Fence, ae.CurrentEpoch)
		if err := a.store.save(r); err != nil {
			log.Error("cannot record the guest as superseded", "err", err)
		}
		g := newGuest(a, r, NewPrimary(a.settings(), r.Fence, false, true))
		g.m.Note = note
		g.primary = &primaryRun{}
		a.mu.Lock()
		a.guests[r.Name] = g
		a.mu.Unlock()
		_ = a.virt.NoAutostart(cctx, r.domain())
		// Offer this host as the guest's new standby: the agent that runs
		// it re-protects it here (reprotect: auto there).
		if _, err := a.arb.Register(cctx, arbiter.GuestSpec{Guest: r.Name, AgentID: a.cfg.AgentID, Role: arbiter.RoleStandby, Epoch: r.Fence, AgentAddr: a.cfg.Advertise}); err != nil {
			log.Warn("could not offer this host as the guest's new standby", "err", err)
		}
	case rerr == nil:
		log.Error("the guest is not running here and the arbiter still has this host as its primary: start it (virsh start) to resume protection", "err", err)
	default:
		if first {
			log.Error("the guest is not running here and the arbiter cannot say whether it runs elsewhere (asking again): do not start it before `remora arbiter status` shows this host as its primary", "err", err, "arbiter_err", rerr)
		}
		return false
	}
	return true
}

// guest returns the guest named name, or nil.
func (a *Agent) guest(name string) *guest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.guests[name]
}

func (a *Agent) guestList() []*guest {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*guest, 0, len(a.guests))
	for _, g := range a.guests {
		out = append(out, g)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

func (a *Agent) forget(g *guest) {
	a.mu.Lock()
	if a.guests[g.name] == g {
		delete(a.guests, g.name)
	}
	a.mu.Unlock()
}

// heartbeatConns is how many connections carry the arbiter heartbeats.
// One lost packet stalls a TCP connection for a retransmission timeout
// (200 ms or more, plus a round trip), longer than a quick detector
// tolerates; the same heartbeat sent on two connections reaches the
// arbiter unless both lose a packet at once.
const heartbeatConns = 2

// heartbeater is the part of the arbiter a heartbeat lane uses.
type heartbeater interface {
	Heartbeat(ctx context.Context, agentID string, epochs map[string]uint64) (arbiter.HeartbeatReply, error)
}

// heartbeatAnswer is one lane's answer to the heartbeat of tick seq.
type heartbeatAnswer struct {
	lane   int
	seq    uint64
	sent   time.Time
	epochs map[string]uint64
	guests map[string]*guest
	reply  arbiter.HeartbeatReply
	err    error
}

// arbiterHeartbeat tells the arbiter this agent is alive and learns epoch
// changes it missed (e.g. while it was cut off). Every tick's heartbeat
// goes out on each lane not still waiting for an answer; the first answer
// to a tick is acted on, later or older ones only say the arbiter heard.
func (a *Agent) arbiterHeartbeat(ctx context.Context) {
	if a.arb == nil {
		return
	}
	lanes := a.heartbeatLanes
	if len(lanes) == 0 {
		lanes = []heartbeater{a.arb}
	}
	answers := make(chan heartbeatAnswer, len(lanes))
	busy := make([]bool, len(lanes))
	tick := time.NewTicker(a.cfg.HeartbeatInterval)
	defer tick.Stop()
	var seq, actedOn uint64
	acted := 0
	for {
		select {
		case <-ctx.Done():
			return
		case ans := <-answers:
			busy[ans.lane] = false
			if ans.err != nil {
				continue
			}
			if ns := ans.sent.UnixNano(); ns > a.arbiterHeard.Load() {
				a.arbiterHeard.Store(ns)
			}
			a.arbiterSuspects.Store(int64(ans.reply.SuspectAfter))
			if ans.seq <= actedOn {
				continue
			}
			actedOn = ans.seq
			a.heartbeatAnswered(ctx, ans)
			if acted++; acted%8 == 0 {
				a.refreshProbes(ctx, ans.guests)
			}
		case <-tick.C:
			epochs := map[string]uint64{}
			guests := map[string]*guest{}
			for _, g := range a.guestList() {
				// Only a copy the arbiter confirmed is asked about: an
				// enrollment still registering holds the fence an unenroll
				// retired, and would be taken for superseded.
				if st := g.state(); !st.Fenced && st.Registered {
					epochs[g.name] = st.Fence
					guests[g.name] = g
				}
			}
			seq++
			this := seq
			for i, lane := range lanes {
				if busy[i] {
					continue
				}
				busy[i] = true
				go func() {
					ans := heartbeatAnswer{lane: i, seq: this, sent: time.Now(), epochs: epochs, guests: guests}
					ans.reply, ans.err = lane.Heartbeat(ctx, a.cfg.AgentID, epochs)
					answers <- ans
				}()
			}
		}
	}
}

// heartbeatAnswered acts on the arbiter's assignments in a heartbeat's
// answer.
func (a *Agent) heartbeatAnswered(ctx context.Context, ans heartbeatAnswer) {
	for _, as := range ans.reply.Assignments {
		g := ans.guests[as.Guest]
		if g == nil {
			continue
		}
		if as.Epoch == ans.epochs[as.Guest] {
			a.autoReprotect(ctx, g, as)
		}
		if as.Role == arbiter.RolePrimary && as.Epoch == ans.epochs[as.Guest] && !as.InSync {
			if st := g.state(); st.Role == Primary && st.InSync {
				g.log.Info("the arbiter counts the standby out of sync: reporting it again once it acknowledges", "fence", as.Epoch, "standby", as.Standby)
				g.post(OutOfSyncAtArbiter{Fence: as.Epoch})
			}
		}
		if as.Role != arbiter.RoleNone || as.Epoch <= ans.epochs[as.Guest] {
			continue
		}
		if st := g.state(); st.Role == Primary || st.Promoted {
			g.post(Superseded{Fence: as.Epoch, Primary: as.Primary})
		}
	}
}

// arbiterContact is when the arbiter last answered a heartbeat (its send
// time: the arbiter heard it no sooner) and after how long of silence it
// suspects this agent: its own detector's timeout if the arbiter does not
// say (an older arbiter uses the same default).
func (a *Agent) arbiterContact() (heard time.Time, suspects time.Duration) {
	if ns := a.arbiterHeard.Load(); ns != 0 {
		heard = time.Unix(0, ns)
	}
	suspects = time.Duration(a.arbiterSuspects.Load())
	if suspects <= 0 {
		suspects = a.cfg.HeartbeatTimeout()
	}
	return heard, suspects
}

// arbiterVouches: the arbiter cannot be promoting g's standby now, so an
// acknowledgement after the ack window may release output. It promotes
// only once this primary's lease ran out, or once it missed this agent's
// heartbeats for its timeout; the lease holds and the arbiter answered a
// heartbeat sent less than half that timeout ago, so neither can happen
// before the released output is on the wire.
func (a *Agent) arbiterVouches(g *guest, now time.Time) bool {
	if a.arb == nil {
		return false
	}
	if until := g.leaseUntil.Load(); until == 0 || now.UnixNano() >= until {
		return false
	}
	heard, suspects := a.arbiterContact()
	return !heard.IsZero() && now.Sub(heard) < suspects/2
}

// refreshProbes copies the arbiter's client-side probe results for status.
func (a *Agent) refreshProbes(ctx context.Context, guests map[string]*guest) {
	st, err := a.arb.Status(ctx)
	if err != nil {
		return
	}
	for _, s := range st.Guests {
		if g := guests[s.Guest]; g != nil && s.Service != nil {
			p := *s.Service
			g.setProbe(&p)
		}
	}
}

// faultHookFromEnv reads REMORA_FAULT_INJECT=point:epoch. When the capture
// loop reaches that point at or after that epoch the agent kills itself
// with SIGKILL, so tests can crash a primary at an exact point of an epoch.
func faultHookFromEnv(log *slog.Logger) func(string, uint64) {
	spec := os.Getenv("REMORA_FAULT_INJECT")
	if spec == "" {
		return nil
	}
	point, num, _ := strings.Cut(spec, ":")
	epoch, _ := strconv.ParseUint(num, 10, 64)
	log.Warn("fault injection armed", "point", point, "epoch", epoch)
	return func(p string, e uint64) {
		if p == point && e >= epoch {
			log.Warn("fault injection: killing agent", "point", p, "epoch", e)
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
	}
}

var errNotEnrolled = errors.New("not enrolled on this agent")

// Info is the agent's own status (GET /v1/agent).
func (a *Agent) Info() api.AgentInfo {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	info := api.AgentInfo{Agent: a.cfg.AgentID, Goroutines: runtime.NumGoroutine(), HeapBytes: ms.HeapAlloc, Warnings: a.warnings()}
	for _, g := range a.guestList() {
		if g.standby != nil {
			info.Replicas++
		}
	}
	return info
}

// warnings are what an admin should act on.
func (a *Agent) warnings() []string {
	var out []string
	if a.cfg.InsecurePlaintext {
		out = append(out, "insecure_plaintext: every port accepts any peer unauthenticated")
	}
	if !a.cfg.TLS() {
		return out
	}
	for _, p := range []string{a.cfg.TLSCert, a.cfg.TLSCA} {
		cert, err := pki.ReadCert(p)
		if err != nil {
			out = append(out, fmt.Sprintf("cannot read certificate %s: %v", p, err))
			continue
		}
		if w := pki.ExpiryWarningIn(filepath.Dir(p), cert, time.Now()); w != "" {
			out = append(out, w)
		}
	}
	return out
}

// watchCertificates logs, at start and daily, the warnings (a certificate
// within pki.WarnBefore of expiry).
func (a *Agent) watchCertificates(ctx context.Context) {
	for {
		for _, w := range a.warnings() {
			a.log.Warn(w)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(24 * time.Hour):
		}
	}
}
