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
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/migrate/virt"
)

// Agent is one host's remora agent.
type Agent struct {
	cfg     api.Config
	log     *slog.Logger
	virt    *virt.Conn
	store   recordStore
	journal *journal
	resume  map[string]failTxn // failovers the journal says were not finished
	arb     *arbiter.Client    // nil without an arbiter
	tlsSrv  *tls.Config
	tlsCli  *tls.Config
	runCtx  context.Context

	mu       sync.Mutex
	primary  map[string]*primaryGuest
	standby  map[string]*standbyGuest
	failover sync.Mutex // one failover at a time

	// faultHook lets end-to-end tests crash the agent at a named point.
	faultHook func(point string, epoch uint64)
}

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
	a := &Agent{cfg: cfg, log: log, store: recordStore{dir: cfg.StateDir},
		primary: map[string]*primaryGuest{}, standby: map[string]*standbyGuest{}}
	a.faultHook = faultHookFromEnv(log)
	return a, nil
}

// Run serves until ctx ends: replication from primaries, the admin API, and
// the protection of every guest enrolled here.
func (a *Agent) Run(ctx context.Context) (err error) {
	a.runCtx = ctx
	if a.tlsSrv, a.tlsCli, err = tlsConfigs(&a.cfg); err != nil {
		return err
	}
	if err := a.dialArbiter(ctx, a.tlsCli); err != nil {
		return err
	}
	virt, err := virt.Dial(ctx, a.cfg.LibvirtURI)
	if err != nil {
		return err
	}
	a.virt = virt
	defer virt.Close()

	repl, err := net.Listen("tcp", a.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen for replication on %s: %w (another agent running? change `listen`)", a.cfg.Listen, err)
	}
	defer repl.Close()
	if a.tlsSrv != nil {
		repl = tls.NewListener(repl, a.tlsSrv)
	}
	apiLn, err := listenAPI(a.cfg.APISocket)
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
				a.log.Error("cannot resume protection; fix and re-enroll", "domain", r.Name, "err", err)
			}
		case api.RoleStandby:
			a.loadStandby(ctx, r)
		}
	}
	a.log.Info("agent running", "agent", a.cfg.AgentID, "replication", repl.Addr().String(), "api", a.cfg.APISocket)

	go a.arbiterHeartbeat(ctx)
	errc := make(chan error, 3)
	go func() { errc <- a.serveReplication(ctx, repl) }()
	go func() { errc <- a.serveAPI(ctx, apiLn) }()
	if apiTLS != nil {
		go func() { errc <- a.serveAPI(ctx, apiTLS) }()
	}
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	a.shutdown()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

func (a *Agent) shutdown() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range a.primary {
		p.stop()
		// The guest runs on unprotected while the agent is down; held
		// output would cut it off its network.
		a.closeOutput(p)
	}
	for _, s := range a.standby {
		s.closeSession()
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
