package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/remora-ha/remora/arbiter"
	"github.com/remora-ha/remora/checkpoint"
	"github.com/remora-ha/remora/internal/atomicfile"
)

// States persisted for a guest beyond the live replication states.
const (
	StateFailingOver = "failing-over"
	StateFailedOver  = "failed-over"
	StateFenced      = "fenced" // a higher epoch runs elsewhere; the local copy was destroyed
)

// Record is the durable knowledge about one guest on this agent.
type Record struct {
	Name string `json:"name"`
	Role string `json:"role"`
	Peer string `json:"peer,omitempty"` // primary: the standby's replication address
	// StandbyAgent (primary) is the standby's agent id, pinned at the
	// first session: a different agent at Peer is refused.
	StandbyAgent string                  `json:"standby_agent,omitempty"`
	Primary      string                  `json:"primary,omitempty"` // standby: the primary agent's id
	Shell        string                  `json:"shell,omitempty"`   // standby: the shell domain's name
	Fence        uint64                  `json:"fence"`
	State        string                  `json:"state,omitempty"` // failing-over, failed-over; empty while replicating
	Enrolled     time.Time               `json:"enrolled"`
	FailedOver   time.Time               `json:"failed_over,omitzero"`
	Replica      checkpoint.ReplicaState `json:"replica"`
	Probe        arbiter.ProbeSpec       `json:"probe,omitzero"`  // how clients reach the guest, for the arbiter
	Disks        []checkpoint.DiskSpec   `json:"disks,omitempty"` // standby: the replicated disks
	// Domain (primary) is the libvirt domain that runs the guest here when
	// it is not Name: a guest failed over to this host runs in the shell
	// it was restored into, and is protected from there.
	Domain string `json:"domain,omitempty"`
	// Superseded (standby) is this host's old copy of the guest, replaced
	// when the guest failed or was switched over elsewhere: libvirt's hook
	// refuses to start it.
	Superseded string `json:"superseded,omitempty"`
	// Home is the agent the guest was first enrolled from: failback
	// returns it there.
	Home string `json:"home,omitempty"`
	// Images are replica images kept elsewhere than the default: the
	// disks of this host's superseded copy, which hold the guest's disks
	// but for what changed since, so that its resync copies only the
	// blocks that differ. A primary running in its promoted shell keeps
	// them: they are its disks.
	Images map[string]string `json:"images,omitempty"`
	// HeldRAM is a copy of the guest's RAM this host took as it handed
	// the guest over (a switchover): the standby shell it gets next
	// starts from it, so that its resync sends only the pages that differ.
	HeldRAM string `json:"held_ram,omitempty"`
}

// domain is the libvirt domain that runs the guest on this host.
func (r *Record) domain() string {
	if r.Domain != "" {
		return r.Domain
	}
	return r.Name
}

type recordStore struct{ dir string }

func (s recordStore) path(name string) string {
	return filepath.Join(s.dir, "guests", name+".json")
}

func (s recordStore) save(r *Record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(s.path(r.Name), b)
}

func (s recordStore) remove(name string) error {
	err := os.Remove(s.path(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

func (s recordStore) loadAll() ([]*Record, error) {
	entries, err := os.ReadDir(filepath.Join(s.dir, "guests"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*Record
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		r, err := s.load(strings.TrimSuffix(e.Name(), ".json"))
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// load reads one guest's record.
func (s recordStore) load(name string) (*Record, error) {
	b, err := os.ReadFile(s.path(name))
	if err != nil {
		return nil, err
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("guest record %s is corrupt: %w (move it aside and re-enroll the guest)", s.path(name), err)
	}
	return &r, nil
}
