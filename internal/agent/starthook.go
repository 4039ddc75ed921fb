package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/internal/agent/api"
	"github.com/remora-ha/remora/internal/names"
	"github.com/remora-ha/remora/migrate/virt"
)

// CheckStart answers libvirt's qemu hook ("prepare begin": before QEMU
// runs, for `virsh start` and for autostart at boot alike): may domain
// name start on this host? Not a copy a failover superseded, nor a
// protected guest the arbiter places on another host, nor one whose
// place nobody can confirm: a host rebooted after a crash must not serve
// a second, stale copy before its agent has learned of the failover.
//
// domainXML is the XML libvirt hands the hook: a domain that waits for an
// incoming migration (a standby's shell) runs nothing by itself and may
// always start.
func CheckStart(ctx context.Context, cfg api.Config, name, domainXML string) error {
	if !names.ValidGuest(name) || virt.WaitsForIncoming(domainXML) {
		return nil // not a name remora enrolls, or a shell
	}
	r, err := recordOfDomain(recordStore{dir: cfg.StateDir}, name)
	if err != nil {
		return fmt.Errorf("remora: cannot read its guest records (%v): refusing to start a guest remora may have failed over", err)
	}
	if r == nil {
		return nil // not protected here
	}
	unenroll := fmt.Sprintf("to run this copy anyway, unprotected, first `remora vm unenroll %s` on this host", r.Name)
	if r.Role != api.RolePrimary {
		if r.Superseded == name {
			return fmt.Errorf("remora: guest %q runs on %s since fencing epoch %d; this host keeps its standby (shell %q): this old copy %q is stale and must not start; %s", r.Name, r.Primary, r.Fence, r.Shell, name, unenroll)
		}
		return nil // a standby's shell: the agent starts it itself
	}
	if r.State == StateFenced {
		return fmt.Errorf("remora: guest %q was failed over to another host (fencing epoch %d): this copy is stale and must not start; %s", r.Name, r.Fence, unenroll)
	}
	if cfg.Arbiter == "" {
		return nil // nobody to ask: failover is by hand
	}
	_, tlsCli, err := tlsConfigs(&cfg)
	if err != nil {
		return fmt.Errorf("remora: cannot ask the arbiter where guest %q runs: %v", name, err)
	}
	c, err := arbiter.NewClient(cfg.Arbiter, arbiterTLS(tlsCli, cfg.ArbiterName))
	if err != nil {
		return fmt.Errorf("remora: cannot ask the arbiter where guest %q runs: %v", name, err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil {
		return fmt.Errorf("remora: the arbiter %s does not answer (%v), so nothing confirms guest %q is not running on its standby: start it once `remora arbiter status` shows %s as its primary; %s",
			cfg.Arbiter, err, name, cfg.AgentID, unenroll)
	}
	if gs, ok := activeGuest(st, r.Name); ok {
		if gs.Primary == cfg.AgentID {
			return nil
		}
		return fmt.Errorf("remora: guest %q runs on %s since fencing epoch %d (the arbiter says): this copy is stale and must not start; %s", r.Name, gs.Primary, gs.Epoch, unenroll)
	}
	return fmt.Errorf("remora: the arbiter %s does not know guest %q, so nothing confirms it is not running elsewhere: start it once the arbiter shows %s as its primary; %s", cfg.Arbiter, r.Name, cfg.AgentID, unenroll)
}

// recordOfDomain finds the record of the guest libvirt domain runs: a
// primary's whose domain it is, or a standby's whose superseded copy it
// is; nil when remora keeps none.
func recordOfDomain(s recordStore, domain string) (*Record, error) {
	r, err := s.load(domain)
	switch {
	case err == nil && (r.Role != api.RolePrimary || r.domain() == domain):
		return r, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return nil, err
	}
	all, err := s.loadAll()
	if err != nil {
		return nil, err
	}
	for _, r := range all {
		if r.Role == api.RolePrimary && r.domain() == domain || r.Role != api.RolePrimary && r.Superseded == domain {
			return r, nil
		}
	}
	return nil, nil
}
